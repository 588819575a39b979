"""Data sources behind one interface; config.data.source names one. Training, sampling and the tools go through
this module and never name a source.

    digits        scikit-learn's bundled 8x8 digits: the embedded default, no download (jdit/data/digits.py)
    digit_scenes  two colored digits per 8x16 canvas with captions, made from the same digits (text-to-image)
    tfds          any tfds dataset prepared in array_record format (read without TensorFlow)
    folder        an image folder converted by tools/prepare_image_folder.py into array_record shards
    latents       VAE posterior moments cached by tools/extract_latents.py
    captioned     such latents joined with their captions' cached text embeddings (tools/encode_text.py)
Any other name is the import path of a module of the same shape (jdit.plugins). A source is a module that defines
    PROVIDES                      the batch keys its elements carry ("image" and the conditioning keys it gives)
    open_source(data)             the random-access source of config.data: len(), [i] -> record; optionally
                                  `meta` (a cache description) and `sizes` ((N, 2) image sizes, for buckets)
    transform(data, source, shape=None)   (record, rng) -> model-input element, or None when unreadable;
                                  `shape` is an aspect-ratio bucket's (H, W)
    check(data, model, source)    ValueError naming the fields when the data does not fit the model
and optionally
    LATENT = True                 elements are VAE latents; source.meta has the VAE's scaling and shift factors
    grid_conditions(data, sample, source) -> (conditioning rows, captions) of a training sample grid (default:
                                  one row per class)
    prompt_conditions(data, model, prompts) -> the conditioning rows of text prompts (--mode=sample)
"""
from jdit import plugins
from jdit.data import transforms

BUILTINS = {name: f"jdit.data.{name}" for name in ("digits", "tfds", "folder", "latents", "captioned",
                                                  "digit_scenes")}
SOURCES = tuple(BUILTINS)
INTERFACE = ("PROVIDES", "open_source", "transform", "check")


def get(name: str):
  """The source module named `name` (a built-in, or an import path)."""
  return plugins.load("data.source", BUILTINS, name, INTERFACE)


def known(name: str) -> bool:
  return plugins.known(BUILTINS, name, INTERFACE)


def open_source(data):
  """The source of config.data; DatasetNotFoundError says where it looked and how to prepare it."""
  return get(data.source).open_source(data)


def transform(data, source, shape: tuple[int, int] | None = None):
  """The per-record transform of config.data's source (images resized to `shape`, default data.image_size), its
  images turned by data.rotate degrees."""
  made = get(data.source).transform(data, source, shape)
  return transforms.Rotated(made, data.rotate // 90) if data.get("rotate") else made


def check(data, model, source) -> None:
  """One-line errors naming the fields when config.data does not fit the model: the conditioning the model reads
  must be what the source gives, then the source's own checks (shapes, caches, buckets)."""
  module = get(data.source)
  missing = [key for key in model.condition_keys if key not in module.PROVIDES]
  if missing:
    givers = [name for name in SOURCES if all(k in get(name).PROVIDES for k in model.condition_keys)]
    raise ValueError(f"model.family={model.FAMILY!r} reads {', '.join(missing)}, which data.source={data.source!r} "
                     f"does not give ({', '.join(module.PROVIDES)}): it trains on data.source="
                     f"{' or '.join(map(repr, givers)) or 'a source that does'}")
  module.check(data, model, source)


def latent_meta(data, source) -> dict | None:
  """The cache description of a latent source (the VAE scaling its latents were made with), else None."""
  return source.meta if getattr(get(data.source), "LATENT", False) else None


def grid_conditions(data, sample, source) -> tuple[dict | None, list[str] | None]:
  """(conditioning rows, captions) of training sample grids, or (None, None): one row per class."""
  rows = getattr(get(data.source), "grid_conditions", None)
  return rows(data, sample, source) if rows else (None, None)


def prompt_conditions(data, model, prompts: list[str]) -> dict:
  """The conditioning rows of text prompts for a model trained on config.data."""
  encode = getattr(get(data.source), "prompt_conditions", None)
  if encode is None:
    raise ValueError(f"data.source={data.source!r} has no captions: sampling prompts needs the text source the "
                     "model trained on (data.source, data.text_dir) or an SD3 pipeline (init_from)")
  return encode(data, model, prompts)
