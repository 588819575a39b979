"""jdit.eval: Inception-v3 (FID network) parity with torch-fidelity's FeatureExtractorInceptionV3 (the TF graph in
PyTorch) on perturbed weights and real photos, the TF1 resize against a float64 reference of its formula, and the
loader's errors."""
import importlib
import json
import os
import sys
import types

import jax
import numpy as np
import pytest
import skimage.data
from conftest import free_port, load_tool, relative_error
from PIL import Image

torch = pytest.importorskip("torch")

from jdit.state_dict import CheckpointError  # noqa: E402
from jdit.eval import features as features_lib  # noqa: E402
from jdit.eval import inception_features, load_inception  # noqa: E402
from jdit.eval.inception import InceptionV3  # noqa: E402

pytestmark = pytest.mark.xdist_group("eval_inception")


def torch_fidelity_module(name: str):
  """A torch-fidelity module without its package __init__ (which imports torchvision for other extractors)."""
  if "torch_fidelity" not in sys.modules:
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
      pytest.skip("torch-fidelity is not installed (make install adds it, --no-deps)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
  return importlib.import_module(f"torch_fidelity.{name}")


def random_state_dict(seed: int = 0) -> dict:
  """pytorch-fid's keys and shapes with He-scaled convolutions and perturbed BatchNorm statistics, so activations
  keep their scale through all 94 layers."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), np.zeros((1, 299, 299, 3))))["params"]
  weights = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = [p.key for p in path]
    prefix, name = ".".join(names[:-1]), names[-1]
    if name == "kernel" and len(leaf.shape) == 4:  # HWIO -> OIHW
      kh, kw, cin, cout = leaf.shape
      weights[f"{prefix}.weight"] = rng.normal(0, np.sqrt(2 / (kh * kw * cin)), (cout, cin, kh, kw))
    elif name == "kernel":  # fc
      weights["fc.weight"] = rng.normal(0, 0.02, leaf.shape[::-1])
      weights["fc.bias"] = rng.normal(0, 0.1, leaf.shape[1])
    else:
      torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[name]
      value = {"scale": lambda n: rng.uniform(0.8, 1.2, n), "bias": lambda n: rng.normal(0, 0.1, n),
               "mean": lambda n: rng.normal(0, 0.1, n), "var": lambda n: rng.uniform(0.5, 1.5, n)}[name]
      weights[f"{prefix}.{torch_name}"] = value(leaf.shape[0])
      weights[f"{prefix}.num_batches_tracked"] = np.array(100)
  return {k: torch.tensor(v, dtype=torch.float32 if v.dtype.kind == "f" else torch.int64) for k, v in weights.items()}


def photos() -> np.ndarray:
  """Eight 96x128 uint8 crops of skimage photos (differently sized inputs go through the same TF1 resize)."""
  crops = []
  for name in ("astronaut", "coffee", "chelsea", "rocket"):
    image = Image.fromarray(getattr(skimage.data, name)())
    for box in ((0, 0), (1, 1)):
      w, h = image.size
      crop = image.crop((box[0] * w // 4, box[1] * h // 4, box[0] * w // 4 + w * 3 // 4, box[1] * h // 4 + h * 3 // 4))
      crops.append(np.asarray(crop.resize((128, 96), Image.BICUBIC)))
  return np.stack(crops)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")
  torch.save(random_state_dict(), path)
  return path


def test_features_equal_torch_fidelity_on_photos(weights_file):
  reference_module = torch_fidelity_module("feature_extractor_inceptionv3")
  reference = reference_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                           feature_extractor_weights_path=weights_file)
  captured = {}
  reference.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(spatial=out))
  images = photos()
  with torch.no_grad():
    pool, logits = reference(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1).numpy()
  model, params = load_inception(weights_file)
  ours = inception_features(model, params, images, batch_size=8)
  assert ours["pool_3"].shape == (8, 2048) and ours["logits"].shape == (8, 1008) and ours["spatial"].shape == (8, 2023)
  assert np.abs(pool.numpy()).mean() > 0.1  # activations kept their scale: the comparison is not of zeros
  assert relative_error(ours["pool_3"], pool.numpy()) < 1e-5
  assert relative_error(ours["logits"], logits.numpy()) < 1e-5
  assert relative_error(ours["spatial"], spatial) < 1e-5
  few = inception_features(model, params, images[:3], batch_size=2)  # padded batches give the same rows
  assert relative_error(few["pool_3"], ours["pool_3"][:3]) < 1e-5


def _resize_float64(image: np.ndarray, size: int) -> np.ndarray:
  """The TF1 legacy bilinear formula in float64, pixel by pixel: source y * (in / out), corners clamped."""
  height, width = image.shape[:2]
  out = np.zeros((size, size, image.shape[2]))
  for i in range(size):
    y = i * height / size
    y0, wy = int(np.floor(y)), y - np.floor(y)
    y1 = min(y0 + 1, height - 1)
    for j in range(size):
      x = j * width / size
      x0, wx = int(np.floor(x)), x - np.floor(x)
      x1 = min(x0 + 1, width - 1)
      top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * wx
      bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * wx
      out[i, j] = top + (bottom - top) * wy
  return out


@pytest.mark.parametrize("shape, size", [((13, 21), 30), ((40, 32), 29), ((7, 7), 7)])
def test_tf1_resize_is_the_formula_tensorflows_and_torch_fidelitys(shape, size):
  images = np.random.default_rng(0).integers(0, 256, (2, *shape, 3)).astype(np.float32)
  ours = np.asarray(features_lib.tf1_resize_bilinear(images, size))
  tf = pytest.importorskip("tensorflow")  # the op ADM's evaluator graph runs
  adm = tf.compat.v1.image.resize_bilinear(images, (size, size), align_corners=False).numpy()
  np.testing.assert_array_equal(ours, adm)  # bit for bit (also 256x256 -> 299, checked by hand)
  reference = np.stack([_resize_float64(image.astype(np.float64), size) for image in images])
  np.testing.assert_allclose(ours, reference, rtol=0, atol=255 * 4e-6)
  resize = torch_fidelity_module("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
  theirs = resize(torch.from_numpy(images).permute(0, 3, 1, 2), size=(size, size), align_corners=False)
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)


def test_bad_inputs_are_one_line_errors(weights_file, tmp_path):
  model, params = load_inception(weights_file)
  with pytest.raises(ValueError, match=r"^images: expected uint8 images \(N, H, W, 3\) or grayscale \(N, H, W, 1\), "
                     r"got float32 \(2, 8, 8, 3\)$"):
    inception_features(model, params, np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"got uint8 \(8, 8, 3\)"):
    inception_features(model, params, np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(CheckpointError, match="no such file"):
    load_inception(str(tmp_path / "missing.pth"))
  weights = random_state_dict()
  del weights["Mixed_7c.branch_pool.conv.weight"]
  torch.save(weights, str(tmp_path / "partial.pth"))
  with pytest.raises(CheckpointError, match=r"partial.pth: Mixed_7c/branch_pool/conv/kernel: the model .* lacks it"):
    load_inception(str(tmp_path / "partial.pth"))
  assert os.path.exists(weights_file)


def _low_rank_frechet(a: np.ndarray, b: np.ndarray) -> float:
  """The Frechet distance of few samples (n << D) without a D x D square root: the nonzero eigenvalues of
  S_a S_b are those of K K^T / ((n_a - 1)(n_b - 1)), K = A_c B_c^T (centred rows), so tr (S_a S_b)^1/2 is K's
  nuclear norm over sqrt((n_a - 1)(n_b - 1))."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  centred_a, centred_b = a - a.mean(0), b - b.mean(0)
  scale = np.sqrt((len(a) - 1) * (len(b) - 1))
  root_trace = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / scale
  traces = (centred_a ** 2).sum() / (len(a) - 1) + (centred_b ** 2).sum() / (len(b) - 1)
  return float(((a.mean(0) - b.mean(0)) ** 2).sum() + traces - 2 * root_trace)


def test_evaluate_tool_gives_adms_five_numbers_and_writes_reference_batches(weights_file, tmp_path, capsys):
  tool = load_tool("evaluate")

  from jdit.eval import batches, metrics
  images = photos()
  reference, samples = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
  np.savez(samples, arr_0=images[:, :, ::-1], labels=np.zeros(8))  # the photos mirrored
  np.savez(str(tmp_path / "plain.npz"), arr_0=images)
  assert tool.main([f"--write_ref={reference}", f"--inception={weights_file}",
                    f"--images={tmp_path / 'plain.npz'}", "--batch_size=8"]) == 0
  stored = np.load(reference)
  assert np.array_equal(stored["arr_0"], images) and stored["sigma"].shape == (2048, 2048)
  assert stored["mu_s"].shape == (2023,)
  assert tool.main([reference, samples, f"--inception={weights_file}", "--batch_size=8"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in printed[-6:-1]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
  with open(str(tmp_path / "samples.eval.json")) as f:
    results = json.load(f)
  model, params = load_inception(weights_file)
  ref, ours = inception_features(model, params, images), inception_features(model, params, images[:, :, ::-1])
  for key, feature in (("fid", "pool_3"), ("sfid", "spatial")):  # scipy's sqrtm of a rank-7 product of 2048^2
    assert results[key] == pytest.approx(_low_rank_frechet(ours[feature], ref[feature]), rel=1e-4)  # (as ADM)
  assert results["fid"] > 0
  assert results["inception_score"] == pytest.approx(metrics.inception_score(ours["logits"]), rel=1e-9)
  assert (results["precision"], results["recall"]) == metrics.precision_recall(ref["pool_3"], ours["pool_3"])
  assert f"FID: {results['fid']}" in printed
  assert {k: v.tolist() for k, v in batches.read_statistics(reference).items()} == \
      {k: stored[k].tolist() for k in batches.STATISTICS}
  np.savez(str(tmp_path / "floats.npz"), arr_0=images.astype(np.float32))
  np.savez(str(tmp_path / "unnamed.npz"), images=images)
  for bad, message in ((tmp_path / "floats.npz", "arr_0 must be uint8 images (N, H, W, 3) in C order, got float32"),
                       (tmp_path / "unnamed.npz", "no 'arr_0' array (it holds images)"),
                       (tmp_path / "missing.npz", "missing.npz: no such file")):
    capsys.readouterr()
    assert tool.main([reference, str(bad), f"--inception={weights_file}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0], error


def test_two_hosts_compute_the_features_of_one(weights_file, tmp_path):
  """tools/evaluate.py --write_ref under jax.distributed, 2 processes x 2 devices: each host streams and computes
  its block of 7 images (the second block short), the blocks are all-gathered, and process 0 writes the batch
  with the statistics one process computes (the path of evaluate(), without its 15 s matrix square roots)."""
  import subprocess

  import safetensors.torch

  from jdit.eval import batches
  from jdit.eval.evaluate import reference_statistics
  images = photos()[1:]
  source, reference = str(tmp_path / "images.npz"), str(tmp_path / "ref.npz")
  np.savez(source, arr_0=images)
  weights = str(tmp_path / "inception.safetensors")  # no torch import in the subprocesses
  safetensors.torch.save_file(torch.load(weights_file, weights_only=True), weights)
  port = free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "tools/evaluate.py", f"--write_ref={reference}", f"--images={source}",
                             f"--inception={weights}", "--batch_size=4", f"--coordinator_address=localhost:{port}",
                             "--num_processes=2", f"--process_id={i}"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
  assert f"{source}: 4/4 images (this host's share of 7, 2 hosts)" in outs[0][0]
  assert "wrote 7 reference images" in outs[0][0] and "wrote" not in outs[1][0]
  model, params = load_inception(weights_file)
  expected = reference_statistics(inception_features(model, params, images, batch_size=8))  # 1 process, 8 devices
  stored = np.load(reference)
  assert np.array_equal(stored["arr_0"], images)
  for key, value in batches.read_statistics(reference).items():
    assert relative_error(value, expected[key]) < 1e-5, key


def test_training_fid_and_the_fid_samples_evaluation_against_a_reference(weights_file, tmp_path, capsys):
  """config.eval: training's FID scalar is that of the set --mode=fid_samples writes from the same EMA weights, and
  --mode=fid_samples ends with ADM's numbers of that set, once (grayscale digits repeated to RGB)."""
  import re

  from sklearn.datasets import load_digits

  from jdit import config_check, fid_samples, train
  from jdit import config as jdit_config
  from jdit.eval import monitor
  real = np.round(load_digits().images[:8] * (255 / 16)).astype(np.uint8)[..., None]  # (8, 8, 8, 1)
  reference = str(tmp_path / "digits_reference.npz")
  np.savez(reference, arr_0=real)  # no stored statistics: computed from the images once
  config = jdit_config.recipe("digits")
  config.update(dict(num_train_steps=2, checkpoint_every=2, log_every=1, sample_every=0, batch_size=16))
  config.diffusion.sampling_steps = 2
  config.sample.update(dict(per_device_batch=1, fid_samples=8, fid_shard_size=8))
  config.eval.update(dict(reference=reference, inception=weights_file, fid_every=2, fid_num_samples=8, batch_size=8))
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f"FID reference: the pool_3 statistics of 8 images of {reference}" in out
  logged = float(re.search(r"step 2: FID ([0-9.]+) of 8 EMA samples", out).group(1))

  path = fid_samples.write_fid_samples(config, workdir)  # the same 8 images the training FID measured
  out = capsys.readouterr().out
  with open(monitor.evaluation_path(path)) as f:
    results = json.load(f)
  assert logged == pytest.approx(results["fid"], rel=1e-3, abs=1e-4)  # printed to 4 decimals; symmetric eigh vs sqrtm
  assert f"FID: {results['fid']}" in out and results["num_samples"] == results["num_reference"] == 8
  assert results["reference"] == reference and results["samples"] == path  # evaluate(), checked in the tool test
  fid_samples.write_fid_samples(config, workdir)  # complete and evaluated: nothing is redone
  assert "already evaluated" in capsys.readouterr().out

  config.eval.reference = ""
  with pytest.raises(ValueError, match=r"^eval.fid_every=2: needs eval.reference \(an ADM reference batch"):
    config_check.validate(config, "train")
  config.eval.update(dict(reference=reference, inception=str(tmp_path / "missing.pth")))
  with pytest.raises(ValueError, match=r"^eval.inception='.*missing.pth': no such file"):
    config_check.validate(config, "fid_samples")
