"""Text-to-image sampling inputs: config.sample.prompts, read as a tuple of strings or a text file with one prompt
per line, turned into the model's conditioning by the data source it trained on (e.g. the text encoders its
text-embedding cache records) or by the encoders of a diffusers pipeline directory (config.init_from: SD3, Flux),
with the empty prompt as guidance's unconditional half.

    python -m jdit.main --config=configs/mmdit.py --workdir=DIR --mode=sample --config.sample.prompts=prompts.txt
"""
import os

from jdit import pipelines
from jdit.data import captioned, sources


def read_prompts(value) -> list[str]:
  """config.sample.prompts -> the prompts: a path to a text file (one prompt per line, blank lines skipped) or a
  tuple of strings; ValueError naming the field when there are none."""
  if isinstance(value, str):
    if not os.path.isfile(value):
      raise ValueError(f"sample.prompts={value!r}: no such file (a text file with one prompt per line, or a tuple "
                       "of strings)")
    with open(value, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
  else:
    prompts = [str(p) for p in value]
  if not prompts:
    raise ValueError(f"sample.prompts={value!r} holds no prompts")
  return prompts


def conditions_for(config, model, prompts: list[str]) -> dict:
  """The conditioning rows of `prompts`: embeddings by the encoders of a diffusers pipeline (config.init_from;
  SD3's T5 replaced by zeros when absent or config.sample.t5 is False), else as config.data's source gives them."""
  if not pipelines.is_pipeline(config.init_from):
    return sources.prompt_conditions(config.data, model, prompts)
  from jdit.text.encode import TextEncoderSpec
  descriptions = pipelines.encoder_descriptions(config.init_from, config.sample.t5)
  specs = [TextEncoderSpec.from_description(name, d) for name, d in descriptions.items()]
  encoders = {spec.name: spec.describe() for spec in specs}
  zeros = {}
  for name, length in pipelines.left_out(config.init_from, config.sample.t5).items():
    encoders[name] = {"kind": "t5", "width": model.joint_attention_dim, "max_length": length, "pooled_dim": 0}
    zeros[f"{name}.sequence"] = (length, model.joint_attention_dim)
  return captioned.encode_prompts(specs, encoders, prompts, zeros)
