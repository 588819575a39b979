"""Sampling from pretrained checkpoints: reproducibility, one guided step against PyTorch, the FID sample set
(balance, ADM layout, resume), and RoPE models at other resolutions."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, randomize, relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from convert_test import make_diffusers_dit, to_official  # noqa: E402
from diffusion_parity_test import float64, nchw, nhwc  # noqa: E402

from jdit import checkpoint, fid_samples, sample  # noqa: E402
from jdit.convert import load_dit_checkpoint  # noqa: E402
from jdit.diffusion import gaussian, guidance, samplers  # noqa: E402
from jdit.models import dit as dit_lib  # noqa: E402
from jdit.models import family  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NULL = 10  # the tiny models have 10 classes; class 10 is the null class
SCALE = 4.0


def make_pretrained(root):
  """A tiny DiT in the official .pt layout (weights of a diffusers model, official conventions) and a tiny
  diffusers VAE (x2), as downloaded weights would be."""
  reference = make_diffusers_dit(official_convention=True)
  torch.save(to_official(reference.state_dict()), root / "DiT-tiny.pt")
  torch.manual_seed(0)
  diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                          latent_channels=4).save_pretrained(root / "vae")
  return dict(dit=str(root / "DiT-tiny.pt"), vae=str(root / "vae"), reference=reference)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return make_pretrained(tmp_path_factory.mktemp("pretrained"))


def sampling_config(pretrained, **sample_fields):
  config = load_config("dit_xl.py")
  config.unlock()
  config.init_from = pretrained["dit"]
  config.vae.path = pretrained["vae"]
  config.diffusion.sampling_steps = 3
  config.sample.update(dict(num_samples=4, per_device_batch=1, **sample_fields))
  return config


def test_defaults_are_the_official_sampling_settings():
  config = load_config("dit_xl.py")
  cfg = sample.sampling_config(config)
  assert (cfg.sampler, cfg.sampling_steps, cfg.guidance_scale, cfg.guidance_mode) == ("ddpm", 250, 4.0, "first3")
  config.unlock()
  config.sample.fid = True
  assert sample.sampling_config(config).guidance_scale == 1.5
  assert config.diffusion.guidance_scale == 4.0  # the switch does not edit the config itself


def test_sampling_an_official_checkpoint_gives_identical_images_twice(pretrained, tmp_path):
  config = sampling_config(pretrained)
  first = np.load(sample.sample_and_save(config, str(tmp_path / "a")))
  second = np.load(sample.sample_and_save(config, str(tmp_path / "b")))
  assert first["images"].shape == (4, 16, 16, 3) and first["images"].dtype == np.uint8
  np.testing.assert_array_equal(first["images"], second["images"])
  assert first["images"].std() > 0
  config.sample.seed = 1
  other = np.load(sample.sample_and_save(config, str(tmp_path / "c")))
  assert np.abs(other["images"].astype(int) - first["images"]).mean() > 1


def torch_guided_output(model, x, t, y):
  """The official forward_with_cfg: guidance on the first 3 channels, the rest from the conditional half."""
  with torch.no_grad():
    out = model(torch.from_numpy(np.concatenate([x, x])), torch.full((2 * len(x),), t),
                torch.from_numpy(np.concatenate([y, np.full_like(y, NULL)]))).sample.double()
  cond, uncond = out.chunk(2)
  eps = uncond[:, :3] + SCALE * (cond[:, :3] - uncond[:, :3])
  return torch.cat([eps, cond[:, 3:]], dim=1)


def jax_guided_output(pretrained, x, t, y):
  model, params = load_dit_checkpoint(pretrained["dit"])
  cond = model.condition({"image": nhwc(x), "label": jnp.asarray(y)})  # the conditioning contract
  apply = lambda x, t, cond: family.apply(model, params, x, t, cond)
  guided = guidance.classifier_free_guidance(apply, cond, model.null_condition(cond), SCALE, mode="first3")
  return guided(nhwc(x), jnp.full((len(x),), t, jnp.float32))


def inputs(seed):
  rng = np.random.RandomState(seed)
  return rng.randn(3, 4, 8, 8).astype(np.float32), np.array([1, 5, 9])


def test_one_guided_ddpm_step_of_the_official_250_step_sampler_matches_pytorch(pretrained):
  schedule = gaussian.make_schedule("linear", 1000, "250")
  k = 100  # respaced index; the model sees the original timestep
  t, t_prev = int(schedule.timestep_map[k]), int(schedule.timestep_map[k - 1])
  x, y = inputs(0)
  scheduler = float64(diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range",
                                              clip_sample=False))
  scheduler.set_timesteps(timesteps=[t, t_prev])
  output = torch_guided_output(pretrained["reference"], x, t, y)
  ref = scheduler.step(output, t, torch.from_numpy(x).double(), generator=torch.Generator().manual_seed(3))
  noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
  got = samplers.ddpm_step(schedule, jax_guided_output(pretrained, x, t, y), nhwc(x), jnp.full((3,), k),
                           nhwc(noise))
  assert relative_error(nchw(got), ref.prev_sample.numpy()) < 1e-5


def test_one_guided_ddim_step_with_noise_matches_pytorch(pretrained):
  schedule = gaussian.make_schedule("linear", 1000, "ddim50")
  k = 25
  t = int(schedule.timestep_map[k])
  x, y = inputs(1)
  scheduler = float64(diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                                              steps_offset=0, timestep_spacing="leading"))
  scheduler.set_timesteps(50)
  noise = np.random.RandomState(2).randn(*x.shape)
  output = torch_guided_output(pretrained["reference"], x, t, y)[:, :4]  # DDIM uses eps only
  ref = scheduler.step(output, t, torch.from_numpy(x).double(), eta=1.0, variance_noise=torch.from_numpy(noise))
  got = samplers.ddim_step(schedule, jax_guided_output(pretrained, x, t, y), nhwc(x), jnp.full((3,), k),
                           nhwc(noise), eta=1.0)
  assert relative_error(nchw(got), ref.prev_sample.numpy()) < 1e-5


def test_fid_samples_are_balanced_in_the_adm_layout_and_resume_skipping_finished_shards(pretrained, tmp_path,
                                                                                        monkeypatch):
  config = sampling_config(pretrained, fid=True, fid_samples=20, fid_shard_size=8)
  workdir = str(tmp_path / "resumed")
  calls = []
  real_generate = sample.generate

  def generate_then_fail(*args, **kwargs):
    calls.append(len(args[4]))
    if len(calls) == 3:
      raise KeyboardInterrupt  # killed while sampling the last shard
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(sample, "generate", generate_then_fail)
  with pytest.raises(KeyboardInterrupt):
    fid_samples.write_fid_samples(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "fid_shards"))) == ["settings.json", "shard_00000.npz",
                                                                      "shard_00001.npz"]
  config.diffusion.guidance_mode = "all"
  with pytest.raises(ValueError, match="^config.diffusion.guidance_mode='all': .* written with "
                                       "config.diffusion.guidance_mode='first3'; rerun with the same settings"):
    fid_samples.write_fid_samples(config, workdir)
  config.diffusion.guidance_mode = "first3"
  real_restore = sample.restore_for_sampling

  def nudged(*args, **kwargs):
    model, params = real_restore(*args, **kwargs)
    return model, jax.tree.map(lambda a: a * 1.001, params)

  monkeypatch.setattr(sample, "restore_for_sampling", nudged)  # other weights of the same architecture
  with pytest.raises(ValueError, match="^the sampled weights' content hash='[0-9a-f]{16}': .* written with"):
    fid_samples.write_fid_samples(config, workdir)
  monkeypatch.setattr(sample, "restore_for_sampling", real_restore)

  calls.clear()
  path = fid_samples.write_fid_samples(config, workdir)
  assert calls == [4]  # only the unfinished shard (images 16..19)
  assert os.path.basename(path) == "fid_samples_20x16x16x3.npz"
  assert not os.path.exists(os.path.join(workdir, "fid_shards"))
  data = np.load(path)
  images, labels = data["arr_0"], data["labels"]
  assert images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [2] * 10)

  config.sample.fid_shard_size = 0
  with pytest.raises(ValueError, match="sample.fid_shard_size=0: expected an integer >= 1"):
    fid_samples.write_fid_samples(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")

  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
      [sys.executable, "-m", "jdit.main", "--config=configs/dit_xl.py", f"--workdir={tmp_path / 'cli'}",
       "--mode=fid_samples", f"--config.init_from={pretrained['dit']}", f"--config.vae.path={pretrained['vae']}",
       "--config.diffusion.sampling_steps=3", "--config.sample.per_device_batch=1", "--config.sample.fid=True",
       "--config.sample.fid_samples=20", "--config.sample.fid_shard_size=8"],
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "images/s" in result.stdout and "guidance 1.5" in result.stdout
  np.testing.assert_array_equal(np.load(tmp_path / "cli" / "fid_samples_20x16x16x3.npz")["arr_0"], images)


def test_rope_model_samples_at_another_aspect_ratio(tmp_path):
  model = dit_lib.create_dit("Tiny/2", input_size=8, in_channels=4, num_classes=10, pos_embed="rope")
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  checkpoint.save_pretrained(str(tmp_path / "rope"), model, params)
  config = load_config("digits.py")
  config.unlock()
  config.init_from = str(tmp_path / "rope")
  config.diffusion.sampling_steps = 3
  config.sample.update(dict(num_samples=8, per_device_batch=1, resolution=(8, 12)))
  images = np.load(sample.sample_and_save(config, str(tmp_path / "wide")))["images"]
  assert images.shape == (8, 8, 12, 4)
  assert images.std() > 0
  config.sample.resolution = (8, 11)
  with pytest.raises(ValueError, match=r"sample.resolution=\(8, 11\): .* multiples of 2"):
    sample.sample_and_save(config, str(tmp_path / "bad"))
