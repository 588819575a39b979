"""Sampling prompts from a local Flux.1 pipeline directory (config.init_from): a fake dev pipeline of tiny
components (Flux transformer with guidance embedding, CLIP-L pooled, T5 at 512 tokens, 16-channel VAE, dynamically
shifting scheduler) samples like diffusers' FluxPipeline from the same initial latents, with the distilled
guidance alone, with true classifier-free guidance on top, and with a LoRA adapter (sample.loras) that diffusers
loads too."""
import os

import jax
import numpy as np
import pytest
from conftest import load_config

from jdit import lora, pipelines, sample
from jdit.convert import load_flux_checkpoint
from text_helpers import write_flux_pipeline

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red square", "a photo of a cat", ""]


def _reference(path: str):
  load = lambda cls, sub: cls.from_pretrained(os.path.join(path, sub))
  return diffusers.FluxPipeline(
      transformer=load(diffusers.FluxTransformer2DModel, "transformer"), vae=load(diffusers.AutoencoderKL, "vae"),
      scheduler=load(diffusers.FlowMatchEulerDiscreteScheduler, "scheduler"),
      text_encoder=load(transformers.CLIPTextModel, "text_encoder"),
      tokenizer=load(transformers.CLIPTokenizer, "tokenizer"),
      text_encoder_2=load(transformers.T5EncoderModel, "text_encoder_2"),
      tokenizer_2=load(transformers.T5TokenizerFast, "tokenizer_2"))


def test_samples_prompts_from_a_flux_pipeline_like_diffusers(tmp_path_factory, tmp_path):
  pipeline = write_flux_pipeline(tmp_path_factory.mktemp("flux"))
  assert pipelines.kind(pipeline) == "FluxPipeline"
  assert {n: d["max_length"] for n, d in pipelines.encoder_descriptions(pipeline).items()} == {"clip_l": 77, "t5": 512}
  config = load_config("flux.py", "tiny")
  config.unlock()
  config.init_from = pipeline
  config.model.dtype = "float32"
  config.model.embedded_guidance = 2.5
  config.diffusion.sampling_steps = 3
  config.sample.update(dict(per_device_batch=1, prompts=tuple(PROMPTS), resolution=(16, 16)))
  images = np.load(sample.sample_and_save(config, str(tmp_path / "dev")))["images"]
  config.diffusion.guidance_scale = 2.0  # true classifier-free guidance, the empty prompt as the negative
  true_cfg = np.load(sample.sample_and_save(config, str(tmp_path / "cfg")))["images"]

  per_call = 8  # per_device_batch 1 x 8 devices
  noise_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
  x_T = torch.tensor(np.asarray(jax.random.normal(noise_key, (per_call, 8, 8, 16)))[:len(PROMPTS)].transpose(0, 3, 1, 2))
  latents = diffusers.FluxPipeline._pack_latents(x_T, len(PROMPTS), 16, 8, 8)
  reference = _reference(pipeline)
  options = dict(num_inference_steps=3, guidance_scale=2.5, height=16, width=16, latents=latents, output_type="np")
  want = reference(PROMPTS, **options).images
  assert images.shape == (3, 16, 16, 3) and images.std() > 0
  assert np.abs(images / 255.0 - want).max() <= 2.0 / 255
  want_cfg = reference(PROMPTS, negative_prompt=[""] * 3, true_cfg_scale=2.0, **options).images
  assert np.abs(true_cfg / 255.0 - want_cfg).max() <= 2.0 / 255
  assert np.abs(want_cfg - want).max() > 4.0 / 255  # the guidance changed the images

  # A LoRA written by jdit, merged at scale 0.8 before sampling; diffusers loads the same file.
  model, params = load_flux_checkpoint(pipeline)
  spec = lora.spec_for(model, rank=4, alpha=8.0)
  adapters = lora.init(model, params, spec, jax.random.key(5))
  adapters = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(6), a.shape), adapters)
  lora.save_lora(model, adapters, str(tmp_path / "lora" / "adapter.safetensors"), spec)
  config.diffusion.guidance_scale = 1.0
  config.sample.loras = f"{tmp_path / 'lora' / 'adapter.safetensors'}:0.8"
  adapted = np.load(sample.sample_and_save(config, str(tmp_path / "lora_samples")))["images"]
  reference.load_lora_weights(str(tmp_path / "lora"), weight_name="adapter.safetensors")
  want_lora = reference(PROMPTS, joint_attention_kwargs={"scale": 0.8}, **options).images
  assert np.abs(adapted / 255.0 - want_lora).max() <= 2.0 / 255
  assert np.abs(want_lora - want).max() > 4.0 / 255  # the adapter changed the images
