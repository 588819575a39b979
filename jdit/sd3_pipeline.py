"""A local diffusers Stable Diffusion 3 / 3.5 pipeline directory as one sampling source (config.init_from):

    transformer/            the MM-DiT (jdit.convert.load_mmdit_checkpoint)
    text_encoder, tokenizer     CLIP-L   (penultimate hidden state, 77 tokens, projected pooled vector)
    text_encoder_2, tokenizer_2 CLIP-G   (the same; its tokenizer pads with "!")
    text_encoder_3, tokenizer_3 T5-XXL   (last hidden state, 256 tokens); optional: zeros when absent or when
                                         config.sample.t5 is False, as the SD3 pipeline allows
    vae/                    the 16-channel VAE, with its scaling and shift
    scheduler/              FlowMatchEulerDiscreteScheduler: its shift
Sampling then follows the pipeline: context = [CLIP-L | CLIP-G padded to T5's width ; T5], pooled = [CLIP-L ;
CLIP-G], the empty prompt as the negative, Euler steps on diffusers' sigma schedule.
"""
import json
import os

from jdit.state_dict import read_json

CLIPS = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))
T5 = ("t5", "text_encoder_3", "tokenizer_3")
T5_LENGTH = 256


def is_pipeline(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "model_index.json")) \
      and os.path.isdir(os.path.join(path, "transformer"))


def check(path: str) -> None:
  """ValueError naming the missing component of an SD3 pipeline directory."""
  with open(os.path.join(path, "model_index.json")) as f:
    index = json.load(f)
  needed = ["transformer", "vae", "scheduler"] + [d for _, *pair in CLIPS for d in pair]
  missing = [d for d in needed if not os.path.isdir(os.path.join(path, d))]
  if missing:
    raise ValueError(f"config.init_from={path}: the {index.get('_class_name', 'pipeline')} directory lacks "
                     f"{', '.join(missing)}")


def encoder_descriptions(path: str, use_t5: bool = True) -> dict:
  """Text-cache style descriptions ({name: {kind, weights, tokenizer, max_length, layer, use_mask}}) of the
  pipeline's encoders; T5 is left out when absent or turned off (the context then holds zeros in its place)."""
  check(path)
  entries = list(CLIPS) + ([T5] if use_t5 and os.path.isdir(os.path.join(path, T5[1])) else [])
  return {name: {"weights": os.path.join(path, encoder), "tokenizer": os.path.join(path, tokenizer),
                 "max_length": T5_LENGTH if name == "t5" else 77, "layer": "last" if name == "t5" else "penultimate",
                 "use_mask": False} for name, encoder, tokenizer in entries}


def scheduler_shift(path: str) -> float:
  """The shift of the pipeline's FlowMatchEulerDiscreteScheduler (SD3: 3.0)."""
  config = read_json(os.path.join(path, "scheduler", "scheduler_config.json")) or {}
  return float(config.get("shift", 3.0))
