"""Cached latents: extraction round trip (image and flip), resume, fresh draws, and latent DiT training/sampling."""
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from conftest import load_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from data_test import make_image_folder  # noqa: E402

from jdit import sample, train  # noqa: E402
from jdit.convert.vae import load_vae  # noqa: E402
from jdit.data import pipeline, transforms  # noqa: E402
from jdit.data.folder import open_folder  # noqa: E402
from jdit.data.latents import open_latents  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def latent_dataset(tmp_path_factory):
  """A small random-weight SD-style VAE (x2 downsampling) and 12 real digits encoded by the extraction CLI."""
  root = tmp_path_factory.mktemp("latents")
  torch.manual_seed(0)
  vae_dir = str(root / "vae")
  diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                          latent_channels=4).save_pretrained(vae_dir)
  make_image_folder(root / "images")
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_image_folder.py"), f"--src={root / 'images'}",
                  f"--out={root / 'records'}"], check=True, capture_output=True)
  out = str(root / "cache")
  args = [sys.executable, os.path.join(ROOT, "tools", "extract_latents.py"), "--source=folder",
          f"--data_dir={root / 'records'}", "--image_size=16", f"--vae={vae_dir}", f"--out={out}", "--num_shards=3",
          "--batch_size=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(args, capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "done: latents [8, 8, 4]" in result.stdout
  return dict(vae=vae_dir, records=str(root / "records"), out=out, args=args, env=env)


def test_round_trip_equals_the_encoder_mean_of_the_image_or_its_flip(latent_dataset):
  vae, params = load_vae(latent_dataset["vae"])
  images = open_folder(latent_dataset["records"], "train")
  prep = transforms.Preprocess(16, 3)
  pixels = np.stack([prep(images[i])["image"] for i in range(len(images))]).astype(np.float32) / 127.5 - 1
  encode = lambda x: np.asarray(vae.apply({"params": params}, x, method=vae.encode)[0])
  means, flip_means = encode(pixels), encode(pixels[:, :, ::-1])
  source = open_latents(latent_dataset["out"], "train")
  assert len(source) == 12 and source.meta["latent_shape"] == [8, 8, 4] and source.meta["image_size"] == 16
  assert (source.meta["scaling_factor"], source.meta["shift_factor"]) == (vae.scaling_factor, vae.shift_factor)
  draw = transforms.DrawLatent(0.5, shift_factor=0.25, sample=False)
  batch = next(iter(pipeline.make_dataset(source, global_batch=12, transform=draw)))
  candidates = 0.5 * (np.concatenate([means, flip_means]) - 0.25)  # (24, 8, 8, 4): each image, then each flip
  flips = 0
  for latent in batch["image"]:
    distances = np.abs(candidates - latent).reshape(24, -1).max(axis=1)
    best = int(np.argmin(distances))
    assert distances[best] < 1e-5
    flips += best >= 12
  assert 0 < flips < 12  # the flip is picked at random per read
  np.testing.assert_allclose(source.meta["channel_mean"], means.reshape(-1, 4).mean(0), rtol=1e-4, atol=1e-6)


def test_each_read_draws_a_fresh_posterior_sample(latent_dataset):
  record = open_latents(latent_dataset["out"], "train")[0]
  draw = transforms.DrawLatent(1.0, sample=True)
  a = draw(record, np.random.default_rng(1))["image"]
  b = draw(record, np.random.default_rng(2))["image"]
  assert np.abs(a - b).max() > 1e-4
  many = np.mean([draw({**record, "flip_mean": record["mean"], "flip_logvar": record["logvar"]},
                       np.random.default_rng(i))["image"] for i in range(400)], axis=0)
  np.testing.assert_allclose(many, record["mean"], atol=4 * np.exp(0.5 * record["logvar"]).max() / np.sqrt(400))


def test_extraction_resumes_by_skipping_finished_shards(latent_dataset):
  out = latent_dataset["out"]
  shard = sorted(p for p in os.listdir(out) if p.startswith("train.latents-") and not p.endswith(".json"))[1]
  os.remove(os.path.join(out, shard))
  result = subprocess.run(latent_dataset["args"], capture_output=True, text=True, env=latent_dataset["env"])
  assert result.returncode == 0
  assert result.stdout.count("already done, skipping") == 2 and os.path.exists(os.path.join(out, shard))


def test_latent_dit_trains_on_the_cache_and_samples_through_the_vae(latent_dataset, tmp_path):
  config = load_config("digits.py")
  config.unlock()
  config.model.update(dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=4))
  config.data.update(dict(source="latents", data_dir=latent_dataset["out"], image_size=16, channels=3))
  config.vae.update(dict(path=latent_dataset["vae"], decode_tile=4))
  config.update(dict(batch_size=8, num_train_steps=2, log_every=1, checkpoint_every=2, sample_every=2))
  config.diffusion.sampling_steps = 4
  config.sample.update(dict(num_samples=4, per_device_batch=1))
  train.train_and_evaluate(config, str(tmp_path))
  assert os.path.exists(tmp_path / "samples" / "step_0000002.png")
  data = np.load(sample.sample_and_save(config, str(tmp_path)))
  assert data["images"].shape == (4, 16, 16, 3) and data["images"].dtype == np.uint8
  config.model.input_size = 16
  with pytest.raises(ValueError, match="must match the cached latents \\[8, 8, 4\\]"):
    train.train_and_evaluate(config, str(tmp_path / "other"))


def test_sampling_refuses_a_vae_whose_scaling_differs_from_the_cache(latent_dataset):
  config = load_config("digits.py")
  config.unlock()
  config.vae.path = latent_dataset["vae"]
  meta = open_latents(latent_dataset["out"], "train").meta
  decode, factor = sample.make_decoder(config.vae, config.init_from, meta)
  assert factor == 2
  with pytest.raises(ValueError, match="scaling_factor=0.18215, shift_factor=0.0, but the latents .* 0.13025, 0.0"):
    sample.make_decoder(config.vae, config.init_from, {**meta, "scaling_factor": 0.13025})


def test_reference_batch_images_from_a_latent_cache_are_diffusers_decodes_of_the_means(latent_dataset):
  """tools/evaluate.py --write_ref --source=latents: a seeded subset's posterior means through the VAE decoder."""
  import ml_collections

  from jdit.eval.references import dataset_images
  data = ml_collections.ConfigDict(dict(source="latents", data_dir=latent_dataset["out"], name="", split="train"))
  vae = ml_collections.ConfigDict(dict(path=latent_dataset["vae"], name="sd", decode_tile=0))
  images = dataset_images(data, 5, 16, seed=0, vae=vae, batch_size=4, log=lambda msg: None)
  source = open_latents(latent_dataset["out"], "train")
  means = np.stack([source[int(i)]["mean"] for i in np.random.default_rng(0).permutation(12)[:5]])
  reference = diffusers.AutoencoderKL.from_pretrained(latent_dataset["vae"]).eval()
  with torch.no_grad():
    decoded = reference.decode(torch.from_numpy(means).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  expected = np.clip(127.5 * decoded + 128.0, 0, 255)
  assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
  assert np.abs(images - expected).max() <= 1.0  # floor of 127.5 x + 128: a rounding-level x may cross an integer
  assert np.mean(images == expected.astype(np.uint8)) > 0.99
  vae.path = ""
  with pytest.raises(ValueError, match=r"^data.source='latents': reference images of latents need the VAE that "
                                       r"encoded the cache \(vae.path\)"):
    dataset_images(data, 5, 16, vae=vae, log=lambda msg: None)


def test_each_latent_brings_its_source_image_flipped_with_it_for_repa(latent_dataset):
  from jdit.data import latents
  source = open_latents(latent_dataset["out"], "train")
  images = open_folder(latent_dataset["records"], "train")
  prep = transforms.Preprocess(16, 3)
  data = ml_collections.ConfigDict(dict(latent_sampling="mean", random_flip=True, images_dir=latent_dataset["records"],
                                        split="train"))
  draw, flips = latents.draw(data, source.meta), 0
  for i in range(len(source)):
    record = source[i]
    element = draw(record, np.random.default_rng(i))
    flipped = np.allclose(element["image"], source.meta["scaling_factor"] * (record["flip_mean"]
                                                                            - source.meta["shift_factor"]))
    expected = prep(images[record["index"]])["image"]
    np.testing.assert_array_equal(element[transforms.SOURCE_IMAGE], expected[:, ::-1] if flipped else expected)
    flips += flipped
  assert 0 < flips < len(source)  # both kinds drawn
