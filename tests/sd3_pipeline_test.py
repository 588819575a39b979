"""Sampling prompts from a local SD3 pipeline directory (config.init_from): a fake pipeline of tiny components
(MM-DiT, CLIP-L, CLIP-G padding with "!", T5, 16-channel VAE, tokenizers, scheduler) samples through the CLI,
equals diffusers' StableDiffusion3Pipeline given the same initial latents, is deterministic for a seed, runs
with T5 off, and a pipeline missing a component is a one-line error."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import load_config

from jdit import sample
from text_helpers import clip_config, perturbed, t5_config, write_clip_vocab, write_spiece

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red square", "a photo of a cat", ""]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("sd3")
  perturbed(diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
      joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
      pos_embed_max_size=16), scale=0.2).save_pretrained(path / "transformer")
  for i, (encoder, tokenizer, pad) in enumerate((("text_encoder", "tokenizer", None),
                                                 ("text_encoder_2", "tokenizer_2", "!"))):
    perturbed(transformers.CLIPTextModelWithProjection(clip_config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, projection_dim=16,
        hidden_act="quick_gelu" if i == 0 else "gelu")), seed=i).save_pretrained(path / encoder)
    write_clip_vocab(str(path / tokenizer), config={"model_max_length": 77, **({"pad_token": pad} if pad else {})})
  perturbed(transformers.T5EncoderModel(t5_config(d_model=64, num_layers=1)), seed=3).save_pretrained(
      path / "text_encoder_3")
  write_spiece(str(path / "tokenizer_3"))
  diffusers.AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=16,
                          use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                          shift_factor=0.0609).save_pretrained(path / "vae")
  diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(path / "scheduler")
  with open(path / "model_index.json", "w") as f:
    json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)
  return str(path)


def _config(pipeline_dir: str, **sample_fields):
  config = load_config("mmdit.py", "tiny")
  config.unlock()
  config.init_from = pipeline_dir
  config.diffusion.sampling_steps = 3
  config.sample.update(dict(per_device_batch=1, prompts=tuple(PROMPTS), **sample_fields))
  return config


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

  # diffusers' pipeline from the same directory and the same initial latents (jdit's draw for seed 0).
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
  want = reference(PROMPTS, negative_prompt="", num_inference_steps=3, guidance_scale=7.0, height=16, width=16,
                   latents=torch.tensor(x_T.transpose(0, 3, 1, 2)), output_type="np").images
  assert np.abs(images / 255.0 - want).max() <= 2.0 / 255

  no_t5 = np.load(sample.sample_and_save(_config(pipeline, t5=False), str(tmp_path / "no_t5")))["images"]
  assert no_t5.shape == images.shape and not np.array_equal(no_t5, images)


def test_a_pipeline_missing_a_component_is_named(pipeline, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(pipeline, broken)
  shutil.rmtree(broken / "text_encoder_2")
  with pytest.raises(ValueError, match="lacks text_encoder_2"):
    sample.sample_and_save(_config(str(broken)), str(tmp_path / "out"))
