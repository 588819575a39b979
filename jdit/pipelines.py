"""A local diffusers text-to-image pipeline directory (Stable Diffusion 3 / 3.5, Flux.1) as one sampling source
(config.init_from) and as the text encoders of a text-embedding cache (tools/encode_text.py --pipeline).

    StableDiffusion3Pipeline                        FluxPipeline
    transformer/   the MM-DiT                       the Flux transformer (jdit.convert.load_checkpoint)
    text_encoder   CLIP-L: penultimate state, 77    CLIP-L: its pooled output only, 77 tokens
                   tokens, projected pooled
    text_encoder_2 CLIP-G (the same; pads with "!") T5-XXL: last hidden state, 512 tokens (dev; schnell 256)
    text_encoder_3 T5-XXL: last state, 256 tokens;  -
                   optional (zeros when absent or
                   config.sample.t5 is False)
    vae/           the 16-channel VAE, with its scaling and shift
    scheduler/     FlowMatchEulerDiscreteScheduler: SD3's shift; Flux's shift by the image token count
Sampling then follows the pipeline: context = [CLIP-L | CLIP-G padded to T5's width ; T5] (SD3) or T5 (Flux),
pooled = [CLIP-L ; CLIP-G] (SD3) or CLIP-L (Flux); Euler on diffusers' sigmas; the empty prompt is guidance's
negative (Flux.1-dev reads its distilled guidance from config.model.embedded_guidance instead: set
diffusion.guidance_scale > 1 for true classifier-free guidance on top).
"""
import json
import os

from jdit.state_dict import read_json

# (encoder name, encoder subfolder, tokenizer subfolder, max_length, cached hidden state, pooled only)
SD3 = (("clip_l", "text_encoder", "tokenizer", 77, "penultimate", False),
       ("clip_g", "text_encoder_2", "tokenizer_2", 77, "penultimate", False),
       ("t5", "text_encoder_3", "tokenizer_3", 256, "last", False))
FLUX = (("clip_l", "text_encoder", "tokenizer", 77, "last", True),
        ("t5", "text_encoder_2", "tokenizer_2", 512, "last", False))
PIPELINES = {"StableDiffusion3Pipeline": SD3, "FluxPipeline": FLUX}
OPTIONAL = {"StableDiffusion3Pipeline": "t5"}  # an encoder the pipeline runs without (zeros in its place)
SCHNELL_T5_LENGTH = 256  # Flux.1-schnell (no guidance embedding) reads 256 T5 tokens


def is_pipeline(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "model_index.json")) \
      and os.path.isdir(os.path.join(path, "transformer"))


def kind(path: str) -> str:
  """The pipeline class of model_index.json; ValueError naming the file when jdit does not read that kind."""
  with open(os.path.join(path, "model_index.json")) as f:
    name = json.load(f).get("_class_name", "")
  if name not in PIPELINES:
    raise ValueError(f"{path}/model_index.json: a {name or 'unnamed'} pipeline; jdit reads "
                     f"{', '.join(PIPELINES)}")
  return name


def encoders(path: str) -> tuple:
  """The (name, encoder, tokenizer, max_length, layer, pooled_only) rows of the pipeline's text encoders."""
  name = kind(path)
  rows = PIPELINES[name]
  if name == "FluxPipeline":
    config = read_json(os.path.join(path, "transformer", "config.json")) or {}
    if not config.get("guidance_embeds", True):  # schnell
      rows = tuple(r[:3] + (SCHNELL_T5_LENGTH,) + r[4:] if r[0] == "t5" else r for r in rows)
  return rows


def check(path: str, field: str = "config.init_from") -> None:
  """ValueError naming `field` and the missing component of a pipeline directory."""
  name = kind(path)
  optional = OPTIONAL.get(name)
  needed = ["transformer", "vae", "scheduler"] + [d for row in encoders(path) if row[0] != optional
                                                  for d in row[1:3]]
  missing = [d for d in needed if not os.path.isdir(os.path.join(path, d))]
  if missing:
    raise ValueError(f"{field}={path}: the {name} directory lacks {', '.join(missing)}")


def encoder_descriptions(path: str, use_t5: bool = True, field: str = "config.init_from") -> dict:
  """Text-cache style descriptions ({name: {weights, tokenizer, max_length, layer, use_mask, pooled_only}}) of
  the pipeline's encoders; an optional T5 is left out when absent or turned off (zeros stand in for it)."""
  check(path, field)
  optional = OPTIONAL.get(kind(path))
  return {name: {"weights": os.path.join(path, encoder), "tokenizer": os.path.join(path, tokenizer),
                 "max_length": length, "layer": layer, "use_mask": False, "pooled_only": pooled_only}
          for name, encoder, tokenizer, length, layer, pooled_only in encoders(path)
          if name != optional or (use_t5 and os.path.isdir(os.path.join(path, encoder)))}


def left_out(path: str, use_t5: bool = True) -> dict:
  """{name: max_length} of the optional encoder encoder_descriptions leaves out (its tokens become zeros)."""
  optional = OPTIONAL.get(kind(path))
  return {name: length for name, _, _, length, _, _ in encoders(path)
          if name == optional and name not in encoder_descriptions(path, use_t5)}


def sampling(path: str) -> dict:
  """config.diffusion overrides for the pipeline's scheduler: diffusers' sigmas, SD3's shift (3.0) or Flux's
  resolution-dependent shift."""
  if kind(path) == "FluxPipeline":
    return dict(flow_schedule="flux")
  config = read_json(os.path.join(path, "scheduler", "scheduler_config.json")) or {}
  return dict(flow_schedule="sd3", shift=float(config.get("shift", 3.0)))


def vae_name(path: str) -> str:
  """The jdit VAE preset of the pipeline's vae/ (its config.json's scaling and shift take precedence)."""
  return "flux" if kind(path) == "FluxPipeline" else "sd3"
