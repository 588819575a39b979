"""Checks of a dataset against the model that will train on it, shared by the sources: one-line errors naming
the fields, before anything is compiled or written."""
from jdit.data import buckets


def check_bucket_sides(data, model, shapes) -> None:
  """Every bucket's model-input sides are multiples of the model's size multiple."""
  multiple = model.size_multiple
  for height, width in shapes:
    if height % multiple or width % multiple:
      raise ValueError(f"data.buckets={data.buckets!r}: the model input {height}x{width} of a bucket must have "
                       f"sides that are multiples of {multiple} (the model's size multiple)")


def check_channels(model, channels: int) -> None:
  if channels != model.in_channels:
    raise ValueError(f"model.in_channels={model.in_channels} must equal the data's {channels} channels")


def check_images(data, model, source) -> None:
  """Image sources: squares of data.image_size x data.channels as the model's input, or buckets of its channels."""
  del source
  if data.buckets:
    check_channels(model, data.channels)
    check_bucket_sides(data, model, buckets.parse_buckets(data.buckets))
  elif [data.image_size, data.image_size, data.channels] != [*model.input_hw, model.in_channels]:
    raise ValueError(f"model.input_size={model.input_hw[0]}, model.in_channels={model.in_channels} must match "
                     f"data.image_size={data.image_size}, data.channels={data.channels} (latent models train on "
                     "cached VAE latents: data.source='latents')")


def check_latents(data, model, source) -> None:
  """Latent caches (source.meta: jdit_latents.json): the model's input shape and the images they were extracted
  from, or, with data.buckets, the buckets they were extracted with."""
  meta = source.meta
  if data.buckets:
    extracted = meta.get("buckets", "")
    if extracted != data.buckets:
      raise ValueError(f"data.buckets={data.buckets!r} must be the buckets the latent cache in data.data_dir="
                       f"{data.data_dir} was extracted with ({extracted or 'none'}: tools/extract_latents.py "
                       "--buckets=SPEC)")
    check_channels(model, meta["latent_shapes"][0][2])
    check_bucket_sides(data, model, [tuple(s[:2]) for s in meta["latent_shapes"]])
    return
  if meta["latent_shape"] is None:
    raise ValueError(f"data.buckets='': the latent cache in data.data_dir={data.data_dir} holds several shapes "
                     f"(extracted with buckets {meta.get('buckets')!r}): train with --config.data.buckets="
                     f"{meta.get('buckets')}")
  model_shape = [*model.input_hw, model.in_channels]
  if list(meta["latent_shape"]) != model_shape:
    raise ValueError(f"model input {model_shape} (model.input_size, model.in_channels) must match the cached "
                     f"latents {meta['latent_shape']} in data.data_dir={data.data_dir}")
  if (data.image_size, data.channels) != (meta["image_size"], 3):
    raise ValueError(f"data.image_size={data.image_size}, data.channels={data.channels} must match the latent "
                     f"cache in data.data_dir={data.data_dir} (extracted from {meta['image_size']}x"
                     f"{meta['image_size']}x3 images)")


def no_buckets(data, name: str) -> None:
  if data.buckets:
    raise ValueError(f"data.buckets={data.buckets!r} trains on images (data.source digits, tfds or folder) or on "
                     f"a latent cache extracted with buckets (latents, captioned), got data.source={name!r}")
