"""Sampling prompts from a local SD3 pipeline directory (config.init_from): a fake pipeline of tiny components
(MM-DiT, CLIP-L, CLIP-G padding with "!", T5, 16-channel VAE, tokenizers, scheduler) samples through the CLI,
equals diffusers' StableDiffusion3Pipeline given the same initial latents, is deterministic for a seed, runs
with T5 off, and a pipeline missing a component is a one-line error."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import load_config

from jdit import sample
from jdit.models import mmdit
from text_helpers import write_sd3_pipeline

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red square", "a photo of a cat", ""]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
  return write_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


def _config(pipeline_dir: str, **sample_fields):
  config = load_config("mmdit.py", "tiny")
  config.unlock()
  config.init_from = pipeline_dir
  config.diffusion.sampling_steps = 3
  config.sample.update(dict(per_device_batch=1, prompts=tuple(PROMPTS), **sample_fields))
  return config


def reference_images(pipeline: str, **options) -> np.ndarray:
  """diffusers' StableDiffusion3Pipeline from the same directory on the same initial latents (jdit's draw for seed
  0), guidance 7, 16x16, images in [0, 1]."""
  per_call = 8  # per_device_batch 1 x 8 devices
  noise_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
  x_T = np.asarray(jax.random.normal(noise_key, (per_call, 8, 8, 16)))[:len(PROMPTS)]
  load = lambda cls, sub: cls.from_pretrained(os.path.join(pipeline, sub))
  reference = diffusers.StableDiffusion3Pipeline(
      transformer=load(diffusers.SD3Transformer2DModel, "transformer"), vae=load(diffusers.AutoencoderKL, "vae"),
      scheduler=load(diffusers.FlowMatchEulerDiscreteScheduler, "scheduler"),
      text_encoder=load(transformers.CLIPTextModelWithProjection, "text_encoder"),
      text_encoder_2=load(transformers.CLIPTextModelWithProjection, "text_encoder_2"),
      text_encoder_3=load(transformers.T5EncoderModel, "text_encoder_3"),
      tokenizer=load(transformers.CLIPTokenizer, "tokenizer"),
      tokenizer_2=load(transformers.CLIPTokenizer, "tokenizer_2"),
      tokenizer_3=load(transformers.T5Tokenizer, "tokenizer_3"))
  return reference(PROMPTS, negative_prompt="", guidance_scale=7.0, height=16, width=16, output_type="np",
                   latents=torch.tensor(x_T.transpose(0, 3, 1, 2)), **options).images


def test_skip_layer_guidance_matches_diffusers(pipeline, tmp_path):
  config = _config(pipeline)
  config.diffusion.update(sampling_steps=6, guidance_mode="skip_layer", slg_layers=(0,), slg_scale=2.8,
                          slg_start=0.1, slg_stop=0.6)  # steps 1 to 3 of 6 (0.6 < i < 3.6)
  images = np.load(sample.sample_and_save(config, str(tmp_path / "slg")))["images"]
  want = reference_images(pipeline, num_inference_steps=6, skip_guidance_layers=[0], skip_layer_guidance_scale=2.8,
                          skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.6)
  assert np.abs(images / 255.0 - want).max() <= 2.0 / 255
  model, params = sample.restore_for_sampling(config, str(tmp_path / "slg"), log=lambda _: None)
  gates = lambda p: np.asarray(p["transformer_blocks_0"]["norm1_linear"]["kernel"])[:, 2 * 32:3 * 32]  # gate_msa
  skipped = mmdit.skip_layer_params(params, model, (0,))
  assert not np.any(gates(skipped)) and np.any(gates(params))  # the guided block really adds nothing


def test_cli_samples_prompts_from_a_pipeline_like_diffusers(pipeline, tmp_path):
  (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
  result = subprocess.run([sys.executable, "-m", "jdit.main", "--config=configs/mmdit.py:tiny",
                           f"--workdir={tmp_path / 'cli'}", "--mode=sample", f"--config.init_from={pipeline}",
                           f"--config.sample.prompts={tmp_path / 'prompts.txt'}", "--config.sample.per_device_batch=1",
                           "--config.diffusion.sampling_steps=3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  cli = np.load(tmp_path / "cli" / "samples.npz")
  assert cli["images"].shape == (2, 16, 16, 3) and cli["prompts"].tolist() == PROMPTS[:2]

  config = _config(pipeline)
  images = np.load(sample.sample_and_save(config, str(tmp_path / "jdit")))["images"]
  np.testing.assert_array_equal(images[:2], cli["images"])  # deterministic for a seed, file or tuple of prompts

  want = reference_images(pipeline, num_inference_steps=3)
  assert np.abs(images / 255.0 - want).max() <= 2.0 / 255

  no_t5 = np.load(sample.sample_and_save(_config(pipeline, t5=False), str(tmp_path / "no_t5")))["images"]
  assert no_t5.shape == images.shape and not np.array_equal(no_t5, images)


def test_a_pipeline_missing_a_component_is_named(pipeline, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(pipeline, broken)
  shutil.rmtree(broken / "text_encoder_2")
  with pytest.raises(ValueError, match="lacks text_encoder_2"):
    sample.sample_and_save(_config(str(broken)), str(tmp_path / "out"))
