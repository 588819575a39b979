"""Text-to-image sampling inputs: config.sample.prompts, read as a tuple of strings or a text file with one prompt
per line, encoded by the text encoders the model was trained with (the ones its text-embedding cache records) or
those of an SD3 pipeline directory (config.init_from), combined as in training, with the empty prompt as
guidance's unconditional half.

    python -m jdit.main --config=configs/mmdit.py --workdir=DIR --mode=sample --config.sample.prompts=prompts.txt
"""
import os

import numpy as np

from jdit import sd3_pipeline
from jdit.data import records
from jdit.text import cache, captioned


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


def trained_encoders(config) -> dict:
  """The encoder descriptions of the text cache the model trained on (config.data.text_dir)."""
  meta = records.read_json(config.data.text_dir, cache.TEXT_META) if config.data.text_dir else None
  if meta is None:
    raise ValueError(f"data.text_dir={config.data.text_dir!r}: sampling prompts needs the text-embedding cache the "
                     f"model trained on ({cache.TEXT_META} names its encoders)")
  return meta["encoders"]


def prompt_conditions(specs: list, encoders: dict, prompts: list[str], zeros: dict | None = None) -> dict:
  """{"context", "pooled", "null_context", "null_pooled"}: one row per prompt, combined as in training; `zeros`
  ({NAME.sequence: shape}) stands in for an encoder turned off."""
  zeros = {k: np.zeros(shape, np.float32) for k, shape in (zeros or {}).items()}
  encoded = [{f"{s.name}.{k}": v for s in specs for k, v in s.encode(batch).items()} for batch in (prompts, [""])]
  rows = [captioned.combine({**{k: v[i] for k, v in encoded[0].items()}, **zeros}, encoders)
          for i in range(len(prompts))]
  null = captioned.combine({**{k: v[0] for k, v in encoded[1].items()}, **zeros}, encoders)
  return captioned.condition_rows(rows, null)


def conditions_for(config, model, prompts: list[str]) -> dict:
  """The conditioning rows of `prompts`: token ids for a model with its own text encoder (digit scenes); else
  embeddings, with the encoders of an SD3 pipeline (config.init_from; T5 replaced by
  zeros when absent or config.sample.t5 is False), else with those of config.data.text_dir's cache."""
  from jdit.text.encode import TextEncoderSpec
  if model.text_vocab_size:  # the model's own text encoder: token ids of the digit-scenes vocabulary
    from jdit.data import digit_scenes
    return digit_scenes.token_conditions(prompts)
  pipeline = sd3_pipeline.is_pipeline(config.init_from)
  descriptions = sd3_pipeline.encoder_descriptions(config.init_from, config.sample.t5) if pipeline \
      else trained_encoders(config)
  specs = [TextEncoderSpec.from_description(name, d) for name, d in descriptions.items()]
  encoders = {spec.name: spec.describe() for spec in specs}
  zeros = {}
  if pipeline and "t5" not in encoders:
    encoders["t5"] = {"kind": "t5", "width": model.joint_attention_dim, "max_length": sd3_pipeline.T5_LENGTH,
                      "pooled_dim": 0}
    zeros["t5.sequence"] = (sd3_pipeline.T5_LENGTH, model.joint_attention_dim)
  return prompt_conditions(specs, encoders, prompts, zeros)
