"""Training data of text-to-image models: cached VAE latents joined with cached text embeddings by dataset index.

    data.source = "captioned"
    data.data_dir = the latent cache of a captioned dataset (tools/extract_latents.py on captioned records)
    data.text_dir = its text-embedding cache (tools/encode_text.py)
Every element is {"image": scaled latent, "context": (L, D), "pooled": (P,)}, with the caption replaced by the
empty prompt with probability data.caption_dropout_prob (what classifier-free guidance learns from).

How cached encoders become the model's context (SD3's rule, which also covers one encoder):
    context = [ CLIP sequences side by side (features), zero-padded to D ;  each T5 sequence, zero-padded to D ]
    pooled  = the CLIP pooled vectors side by side
with D = max(sum of CLIP widths, T5 widths): SD3's CLIP-L + CLIP-G (768 + 1280, padded to 4096) then T5-XXL
(4096) give (77 + 256, 4096) and a 2048-wide pooled vector.
"""
import numpy as np

from jdit.data.transforms import DrawLatent
from jdit.text import cache


def text_shape(encoders: dict) -> tuple[int, int, int]:
  """(tokens L, width D, pooled width P) of the combined context for a cache's encoder descriptions."""
  clips = [e for e in encoders.values() if e["kind"] == "clip"]
  t5s = [e for e in encoders.values() if e["kind"] != "clip"]
  width = max([sum(e["width"] for e in clips)] + [e["width"] for e in t5s])
  tokens = (max(e["max_length"] for e in clips) if clips else 0) + sum(e["max_length"] for e in t5s)
  return tokens, width, sum(e["pooled_dim"] for e in clips)


def combine(arrays: dict, encoders: dict) -> tuple[np.ndarray, np.ndarray]:
  """The cached arrays of one caption ({NAME.sequence, NAME.pooled}) -> (context (L, D), pooled (P,)) float32."""
  _, width, pooled_dim = text_shape(encoders)
  pad = lambda a: np.pad(a.astype(np.float32), ((0, 0), (0, width - a.shape[-1])))
  clips = [n for n, e in encoders.items() if e["kind"] == "clip"]
  parts = [pad(np.concatenate([arrays[f"{n}.sequence"] for n in clips], axis=-1))] if clips else []
  parts += [pad(arrays[f"{n}.sequence"]) for n, e in encoders.items() if e["kind"] != "clip"]
  pooled = np.concatenate([arrays[f"{n}.pooled"].astype(np.float32) for n in clips]) if clips \
      else np.zeros((pooled_dim,), np.float32)
  return np.concatenate(parts, axis=0), pooled


class TextCache:
  """The finished text-embedding cache with random access by dataset index (shard K holds K, K + N, ...)."""

  def __init__(self, directory: str, split: str = "train"):
    self.source = cache.open_text_cache(directory, split)
    self.meta, self.empty = self.source.meta, cache.load_empty_prompt(directory)
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


def open_captioned(data_cfg):
  """The data.source="captioned" source: data.data_dir's latents joined with data.text_dir's embeddings."""
  from jdit.data.sources import open_latents
  if not data_cfg.text_dir:
    raise ValueError("data.text_dir must name the text-embedding cache (tools/encode_text.py) for "
                     "data.source='captioned'")
  return CaptionedLatents(open_latents(data_cfg.data_dir, data_cfg.split), TextCache(data_cfg.text_dir,
                                                                                     data_cfg.split))


def transform_from_config(data_cfg, source: CaptionedLatents) -> TextLatentTransform:
  meta = source.meta
  draw = DrawLatent(meta["scaling_factor"], meta["shift_factor"], sample=data_cfg.latent_sampling == "sample",
                    random_flip=data_cfg.random_flip)
  return TextLatentTransform(draw, meta["text"]["encoders"], source.text.empty, data_cfg.caption_dropout_prob)


def empty_condition(source: CaptionedLatents) -> tuple[np.ndarray, np.ndarray]:
  """(null_context, null_pooled) of the cache's empty prompt, for guidance while sampling."""
  return combine(source.text.empty, source.meta["text"]["encoders"])


def grid_conditions(source: CaptionedLatents, rows: int = 4) -> tuple[dict, list[str]]:
  """(sampling conditions, captions) for a training grid: the first `rows` training captions, with the empty
  prompt for guidance."""
  records = [source[i] for i in range(min(rows, len(source)))]
  pairs = [combine(r, source.meta["text"]["encoders"]) for r in records]
  return condition_rows(pairs, empty_condition(source)), [str(r.get("caption", r["index"])) for r in records]


def condition_rows(pairs: list, null: tuple) -> dict:
  """[(context, pooled)] per row and the empty prompt's (context, pooled) -> the sampling conditioning dict
  {"context", "pooled", "null_context", "null_pooled"} of (rows, ...) arrays."""
  return {"context": np.stack([c for c, _ in pairs]), "pooled": np.stack([p for _, p in pairs]),
          "null_context": np.repeat(null[0][None], len(pairs), 0),
          "null_pooled": np.repeat(null[1][None], len(pairs), 0)}
