"""ADM's evaluator in JAX: Inception Score, FID, sFID, precision and recall of a sample batch against a reference.

    python tools/evaluate.py REF.npz SAMPLES.npz --inception=pt_inception-2015-12-05-6726825d.pth
prints the five numbers as guided-diffusion's evaluations/evaluator.py does and writes them to SAMPLES.eval.json
(--json=PATH elsewhere). REF.npz is an ADM reference batch (arr_0, and mu/sigma/mu_s/sigma_s, which are used when
present, as ADM does), SAMPLES.npz any batch with arr_0 (N, H, W, 3) uint8: `--mode=fid_samples` writes one.
A reference batch of your own data, in the same format:
    python tools/evaluate.py --write_ref=REF.npz --inception=PATH --source=folder --data_dir=RECORDS \
        --image_size=256 --num_images=10000        # ADM center crops of a seeded random subset
    python tools/evaluate.py --write_ref=REF.npz --inception=PATH --source=latents --data_dir=LATENTS --vae=VAE
                                               # a latent cache's posterior means, decoded
    python tools/evaluate.py --write_ref=REF.npz --inception=PATH --images=IMAGES.npz   # any arr_0 batch
FD_DINOv2 (the Frechet distance in DINOv2's CLS feature space at 224x224) beside them, or alone:
    python tools/evaluate.py REF.npz SAMPLES.npz --inception=PATH --dinov2=DINOV2_DIR   # a Dinov2Model directory
Text-to-image samples (samples.npz with `prompts`, from --mode=sample): the CLIP score of each image and its prompt
    python tools/evaluate.py --clip=CLIP_MODEL_DIR samples.npz       # a transformers CLIPModel directory
    python tools/evaluate.py --preference=HPS_v2_compressed.pt --tokenizer=CLIP_TOKENIZER_DIR samples.npz
                                               # an HPS v2-style score from an open_clip checkpoint of your own
The prediction stability of a trained run's EMA weights on its validation set (config.eval.val_*; the formulas are
in docs/evaluation.md), printed and written to WORKDIR/stability.json:
    python tools/evaluate.py --stability --workdir=workdir/digits
The weights are pytorch-fid's Inception (the TF graph's numbers), read with weights_only=True; nothing is
downloaded. Multi-host: the same command on every host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or --distributed); each host computes the features of its block of images on its devices.
"""
import argparse
import os
import sys


def dataset_images(args, log):
  """--source: args.num_images reference images of a seeded random subset of a dataset."""
  import ml_collections

  from jdit.eval.references import dataset_images as reference_images
  data = ml_collections.ConfigDict(dict(source=args.source, data_dir=args.data_dir, name=args.name,
                                        split=args.split, seed=0))
  vae = ml_collections.ConfigDict(dict(path=args.vae, name=args.vae_name, decode_tile=0))
  return reference_images(data, args.num_images, args.image_size, args.seed, vae, args.batch_size, log)


def clip_scores(args) -> int:
  """--clip / --preference: scores of a text-to-image samples.npz, printed and written as JSON (by process 0)."""
  import jax

  from jdit.eval.clip import score_samples
  from jdit.eval.evaluate import write_json
  from jdit.state_dict import CheckpointError
  weights, kind = (args.clip, "clip") if args.clip else (args.preference, "preference")
  path = args.batches[0]
  try:
    results = score_samples(path, weights, kind, args.tokenizer)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() > 0:
    return 0
  print(f"{'CLIP' if kind == 'clip' else 'Preference'} score: {results[kind + '_score']}")
  write_json(args.json or f"{os.path.splitext(path)[0]}.{kind}.json", {**results, "samples": path, kind: weights})
  return 0


def stability(args) -> int:
  """--stability: the validation pass's numbers for the EMA weights of the run in args.workdir."""
  import jax

  from jdit import config as jdit_config
  from jdit import sample, sharding
  from jdit.eval.evaluate import write_json
  from jdit.eval.stability import prediction_stability, table
  from jdit.state_dict import CheckpointError
  log = (lambda msg: print(msg, flush=True)) if jax.process_index() == 0 else (lambda msg: None)
  try:
    config = jdit_config.of_run(args.workdir)
    model, params = sample.restore_for_sampling(config, args.workdir, log)
    mesh = sharding.make_mesh(dict(config.mesh))
    numbers = prediction_stability(config, model, jax.device_put(params, sharding.replicated(mesh)), mesh)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    log(f"prediction stability of the EMA weights on {config.eval.val_num_samples} held-out examples x "
        f"{config.eval.val_timesteps} timesteps:\n{table(numbers)}")
    write_json(args.json or os.path.join(args.workdir, "stability.json"),
               {**numbers, "workdir": args.workdir, "weights": "ema"})
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("batches", nargs="*", help="REF.npz SAMPLES.npz")
  parser.add_argument("--inception", default="", help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid)")
  parser.add_argument("--dinov2", default="", help="a transformers Dinov2Model directory: adds FD_DINOv2, the "
                      "Frechet distance of CLS features at 224x224 (alone when --inception is not given)")
  parser.add_argument("--clip", default="", help="a transformers CLIPModel directory (with its tokenizer): the CLIP "
                      "score of SAMPLES.npz's images and prompts")
  parser.add_argument("--preference", default="", help="a preference-tuned CLIP (an HPS v2-style open_clip "
                      "checkpoint): the mean cosine of SAMPLES.npz's images and prompts")
  parser.add_argument("--tokenizer", default="", help="--clip / --preference: a CLIP tokenizer directory (vocab.json, "
                      "merges.txt); default: the weights' directory")
  parser.add_argument("--stability", action="store_true", help="the prediction stability of the run in --workdir "
                      "(its EMA weights, its config.eval validation set)")
  parser.add_argument("--workdir", default="", help="--stability: a training run's workdir")
  parser.add_argument("--json", default="", help="where to write the results (default: SAMPLES.eval.json)")
  parser.add_argument("--batch_size", type=int, default=200)
  parser.add_argument("--write_ref", default="", help="write a reference batch here instead of evaluating")
  parser.add_argument("--images", default="", help="--write_ref from the arr_0 of this .npz")
  parser.add_argument("--source", default="folder", choices=("folder", "tfds", "digits", "latents"))
  parser.add_argument("--data_dir", default="", help="an image folder's records, the tfds data_dir, or a latent cache")
  parser.add_argument("--vae", default="", help="--source=latents: the VAE that encoded the cache")
  parser.add_argument("--vae_name", default="sd", choices=("sd", "sdxl", "sd3", "flux"))
  parser.add_argument("--name", default="", help="tfds dataset name")
  parser.add_argument("--split", default="train")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--num_images", type=int, default=10_000)
  parser.add_argument("--seed", type=int, default=0, help="the random subset of --write_ref")
  parser.add_argument("--coordinator_address", default="", help="multi-host: HOST:PORT of process 0 (each host "
                      "computes the features of its block of images; process 0 prints and writes the results)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with the "
                      "addresses JAX finds itself (Cloud TPU pods)")
  args = parser.parse_args(argv)
  if args.coordinator_address or args.distributed:
    import jax
    jax.distributed.initialize(args.coordinator_address or None, args.num_processes, args.process_id)
  if args.stability:
    if not args.workdir or args.batches:
      parser.error("--stability takes --workdir=WORKDIR (a training run's) and no batches")
    return stability(args)
  if args.clip or args.preference:
    if len(args.batches) != 1 or (args.clip and args.preference):
      parser.error("--clip or --preference takes one SAMPLES.npz (with images and prompts)")
    return clip_scores(args)
  if not args.inception and not (args.dinov2 and not args.write_ref):
    parser.error("--inception=PATH is required (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
  if not args.write_ref and len(args.batches) != 2:
    parser.error("expected REF.npz SAMPLES.npz (or --write_ref=OUT.npz)")

  import jax

  from jdit.state_dict import CheckpointError
  from jdit.eval import load_inception
  from jdit.eval.evaluate import evaluate, report
  log = (lambda msg: print(msg, flush=True)) if jax.process_index() == 0 else (lambda msg: None)
  try:
    for path in args.batches:
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    results = {}
    if args.inception:
      model, params = load_inception(args.inception)
      if args.write_ref:
        from jdit.eval.references import write_reference
        images = args.images or dataset_images(args, log)
        write_reference(args.write_ref, images, model, params, args.batch_size, log)
        return 0
      results = evaluate(*args.batches, model, params, args.batch_size, log)
    if args.dinov2:
      from jdit.eval.dinov2 import load_dinov2
      from jdit.eval.evaluate import fd_dinov2
      encoder, encoder_params = load_dinov2(args.dinov2)
      distance = fd_dinov2(*args.batches, encoder, encoder_params, args.batch_size)
      results = None if results is None else {**results, "fd_dinov2": distance, "dinov2": args.dinov2}
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if results is None:  # another host: process 0 reports
    return 0
  report(results, args.json or os.path.splitext(args.batches[1])[0] + ".eval.json", reference=args.batches[0],
         samples=args.batches[1])
  return 0


if __name__ == "__main__":
  sys.exit(main())
