"""Training data of text-to-image models: cached VAE latents joined with cached text embeddings by dataset index.

    data.source = "captioned"
    data.data_dir = the latent cache of a captioned dataset (tools/extract_latents.py on captioned records)
    data.text_dir = its text-embedding cache (tools/encode_text.py)
Every element is {"image": scaled latent, "context": (L, D), "pooled": (P,)}, with the caption replaced by the
empty prompt with probability data.caption_dropout_prob (what classifier-free guidance learns from).

How cached encoders become the model's context (SD3's rule, which also covers one encoder, and Flux's):
    context = [ CLIP sequences side by side (features), zero-padded to D ;  each T5 sequence, zero-padded to D ]
    pooled  = the CLIP pooled vectors side by side
with D = max(sum of CLIP widths, T5 widths): SD3's CLIP-L + CLIP-G (768 + 1280, padded to 4096) then T5-XXL
(4096) give (77 + 256, 4096) and a 2048-wide pooled vector. An encoder described "pooled_only" (Flux's CLIP-L)
gives its pooled vector alone: Flux's context is T5's (512, 4096), its pooled vector CLIP-L's 768.
"""
import numpy as np

from jdit.data import checks, latents, records, text_cache
from jdit.data.transforms import DrawLatent

PROVIDES = ("image", "context", "pooled")
LATENT = True  # source.meta holds the VAE's scaling_factor and shift_factor


def _sequences(encoders: dict) -> tuple[list[str], list[str]]:
  """(CLIP, other) encoder names whose sequences are part of the context."""
  names = [n for n, e in encoders.items() if not e.get("pooled_only", False)]
  return [n for n in names if encoders[n]["kind"] == "clip"], [n for n in names if encoders[n]["kind"] != "clip"]


def text_shape(encoders: dict) -> tuple[int, int, int]:
  """(tokens L, width D, pooled width P) of the combined context for a cache's encoder descriptions."""
  clips, others = _sequences(encoders)
  width = max([sum(encoders[n]["width"] for n in clips)] + [encoders[n]["width"] for n in others])
  tokens = (max(encoders[n]["max_length"] for n in clips) if clips else 0) \
      + sum(encoders[n]["max_length"] for n in others)
  return tokens, width, sum(e["pooled_dim"] for e in encoders.values() if e["kind"] == "clip")


def combine(arrays: dict, encoders: dict) -> tuple[np.ndarray, np.ndarray]:
  """The cached arrays of one caption ({NAME.sequence, NAME.pooled}) -> (context (L, D), pooled (P,)) float32."""
  _, width, pooled_dim = text_shape(encoders)
  pad = lambda a: np.pad(a.astype(np.float32), ((0, 0), (0, width - a.shape[-1])))
  clips, others = _sequences(encoders)
  parts = [pad(np.concatenate([arrays[f"{n}.sequence"] for n in clips], axis=-1))] if clips else []
  parts += [pad(arrays[f"{n}.sequence"]) for n in others]
  pooling = [n for n, e in encoders.items() if e["kind"] == "clip"]
  pooled = np.concatenate([arrays[f"{n}.pooled"].astype(np.float32) for n in pooling]) if pooling \
      else np.zeros((pooled_dim,), np.float32)
  return np.concatenate(parts, axis=0), pooled


class TextCache:
  """The finished text-embedding cache with random access by dataset index (shard K holds K, K + N, ...)."""

  def __init__(self, directory: str, split: str = "train"):
    self.source = text_cache.open_text_cache(directory, split)
    self.meta, self.empty = self.source.meta, text_cache.load_empty_prompt(directory)
    shards, count = self.meta["num_shards"], self.meta["count"]
    sizes = [len(range(k, count, shards)) for k in range(shards)]
    self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)

  def __getitem__(self, index: int) -> dict:
    shards = self.meta["num_shards"]
    record = self.source[int(self.offsets[index % shards] + index // shards)]
    if record["index"] != index:
      raise ValueError(f"text cache record {record['index']} found where {index} belongs: the cache is corrupt")
    return record


class CaptionedLatents:
  """Latent records (written with their source index) and each one's cached text embeddings."""

  def __init__(self, latents, text: TextCache):
    self.latents, self.text = latents, text
    self.meta = {**latents.meta, "text": text.meta}
    self.sizes = latents.sizes  # each latent's (h, w) in a bucketed cache (data.buckets), else None
    if len(latents) and latents[0]["index"] < 0:
      raise ValueError("data.data_dir: the latent cache predates stored dataset indices; extract it again with "
                       "tools/extract_latents.py to train on captions")

  def __len__(self) -> int:
    return len(self.latents)

  def __getitem__(self, i: int) -> dict:
    record = self.latents[i]
    return {**record, **self.text[record["index"]]}


class TextLatentTransform:
  """Captioned latent record -> {"image": scaled latent draw, "context", "pooled"}, the caption swapped for the
  empty prompt with probability caption_dropout_prob."""

  def __init__(self, draw: DrawLatent, encoders: dict, empty: dict, caption_dropout_prob: float):
    self.draw, self.encoders, self.dropout = draw, encoders, caption_dropout_prob
    self.empty = combine(empty, encoders)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    image = self.draw(record, rng)["image"]
    context, pooled = self.empty if rng.random() < self.dropout else combine(record, self.encoders)
    return {"image": image, "context": context, "pooled": pooled}


def open_source(data) -> CaptionedLatents:
  """data.data_dir's latents joined with data.text_dir's embeddings."""
  if not data.text_dir:
    raise ValueError("data.text_dir must name the text-embedding cache (tools/encode_text.py) for "
                     "data.source='captioned'")
  return CaptionedLatents(latents.open_latents(data.data_dir, data.split), TextCache(data.text_dir, data.split))


def transform(data, source: CaptionedLatents, shape=None) -> TextLatentTransform:
  del shape  # a bucketed cache holds each latent at its bucket's shape already
  return TextLatentTransform(latents.draw(data, source.meta), source.meta["text"]["encoders"], source.text.empty,
                             data.caption_dropout_prob)


def check(data, model, source: CaptionedLatents) -> None:
  """The combined text embeddings fit the model's widths, and the latents its input."""
  _, width, pooled = text_shape(source.meta["text"]["encoders"])
  if (width, pooled) != (model.joint_attention_dim, model.pooled_projection_dim):
    raise ValueError(f"model.joint_attention_dim={model.joint_attention_dim}, model.pooled_projection_dim="
                     f"{model.pooled_projection_dim} must match the text cache in data.text_dir="
                     f"{data.text_dir} (context width {width}, pooled width {pooled})")
  checks.check_latents(data, model, source)


def empty_condition(source: CaptionedLatents) -> tuple[np.ndarray, np.ndarray]:
  """(null_context, null_pooled) of the cache's empty prompt, for guidance while sampling."""
  return combine(source.text.empty, source.meta["text"]["encoders"])


def grid_conditions(data, sample, source: CaptionedLatents, rows: int = 4) -> tuple[dict, list[str]]:
  """(sampling conditions, captions) for a training grid: the first `rows` training captions, with the empty
  prompt for guidance."""
  del data, sample
  records = [source[i] for i in range(min(rows, len(source)))]
  pairs = [combine(r, source.meta["text"]["encoders"]) for r in records]
  return condition_rows(pairs, empty_condition(source)), [str(r.get("caption", r["index"])) for r in records]


def condition_rows(pairs: list, null: tuple) -> dict:
  """[(context, pooled)] per row and the empty prompt's (context, pooled) -> the sampling conditioning dict
  {"context", "pooled", "null_context", "null_pooled"} of (rows, ...) arrays."""
  return {"context": np.stack([c for c, _ in pairs]), "pooled": np.stack([p for _, p in pairs]),
          "null_context": np.repeat(null[0][None], len(pairs), 0),
          "null_pooled": np.repeat(null[1][None], len(pairs), 0)}


def trained_encoders(data) -> dict:
  """The encoder descriptions of the text cache the model trained on (data.text_dir)."""
  meta = records.read_json(data.text_dir, text_cache.TEXT_META) if data.text_dir else None
  if meta is None:
    raise ValueError(f"data.text_dir={data.text_dir!r}: sampling prompts needs the text-embedding cache the "
                     f"model trained on ({text_cache.TEXT_META} names its encoders)")
  return meta["encoders"]


def encode_prompts(specs: list, encoders: dict, prompts: list[str], zeros: dict | None = None) -> dict:
  """{"context", "pooled", "null_context", "null_pooled"}: one row per prompt encoded by the TextEncoderSpecs
  `specs`, combined as in training; `zeros` ({NAME.sequence: shape}) stands in for an encoder turned off."""
  zeros = {k: np.zeros(shape, np.float32) for k, shape in (zeros or {}).items()}
  encoded = [{f"{s.name}.{k}": v for s in specs for k, v in s.encode(batch).items()} for batch in (prompts, [""])]
  rows = [combine({**{k: v[i] for k, v in encoded[0].items()}, **zeros}, encoders) for i in range(len(prompts))]
  null = combine({**{k: v[0] for k, v in encoded[1].items()}, **zeros}, encoders)
  return condition_rows(rows, null)


def prompt_conditions(data, model, prompts: list[str]) -> dict:
  """Prompts encoded by the encoders of data.text_dir's cache, as the model trained on them."""
  del model
  from jdit.text.encode import TextEncoderSpec
  specs = [TextEncoderSpec.from_description(name, d) for name, d in trained_encoders(data).items()]
  return encode_prompts(specs, {spec.name: spec.describe() for spec in specs}, prompts)
