"""The text-embedding cache: the captions of a captioned dataset encoded once by frozen text encoders.

    DIR/{split}.text-0000K-of-0000N   array records, one per caption: fields {"index", "caption"} and per
                                      encoder NAME arrays NAME.sequence (L, D), NAME.length () and, for CLIP,
                                      NAME.pooled (P,) in the cache dtype; shard K holds indices K, K+N, ...
    DIR/empty_prompt.npz              the same arrays for "" (the unconditional input of classifier-free guidance)
    DIR/jdit_text.json                written last: split, shards, count, dtype and each encoder's description
Shards are written under temporary names and renamed when complete; a rerun skips finished shards; on several
hosts each encodes shards K with K mod num_hosts == host.
"""
import os
import time

import ml_dtypes
import numpy as np

from jdit.data import records
from jdit.data.readers import ArrayRecordSource
from jdit.data.writers import pending_shards

TEXT_META = "jdit_text.json"
TEXT_SETTINGS = "jdit_text.settings.json"  # what determines the cache, claimed before its first shard
EMPTY_PROMPT = "empty_prompt.npz"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def shard_paths(out: str, split: str, num_shards: int) -> list[str]:
  return [os.path.join(out, f"{split}.text-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]


def encode_all(specs: list, prompts: list[str], dtype) -> dict[str, np.ndarray]:
  """{NAME.sequence, NAME.length, NAME.pooled}: (N, ...) arrays of every spec, cast to `dtype` (a float16 cast
  that overflows is an error naming the encoder)."""
  arrays = {}
  for spec in specs:
    for key, value in spec.encode(prompts).items():
      if value.dtype.kind == "f":
        value = value.astype(dtype)
        if not np.isfinite(value.astype(np.float32)).all():
          raise ValueError(f"encoder {spec.name}: {key} overflows {np.dtype(dtype).name}; cache in bfloat16 or "
                           "float32 (--dtype)")
      arrays[f"{spec.name}.{key}"] = value
  return arrays


def encode_captions(source, specs: list, out: str, *, split: str = "train", num_shards: int = 16,
                    batch_size: int = 64, dtype: str = "bfloat16", host: int = 0, num_hosts: int = 1,
                    log=print) -> dict | None:
  """Encodes the "caption" of every record of `source` with every TextEncoderSpec into this host's shards and
  the empty prompt; once all shards exist writes jdit_text.json and returns it, else returns None. The settings
  (split, shards, dtype, each encoder's description) are claimed before the first shard: resuming under others is
  a one-line error (records.claim_settings)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
  if len(source) and "caption" not in source[0]:
    raise ValueError("the dataset has no captions: convert a captioned imagefolder (metadata.jsonl or .txt "
                     "captions) with tools/prepare_image_folder.py")
  names = [spec.name for spec in specs]
  if len(set(names)) != len(names) or not names:
    raise ValueError(f"encoder names must be distinct and at least one, got {names}")
  from array_record.python.array_record_module import ArrayRecordWriter

  records.require_positive(num_shards=num_shards, batch_size=batch_size)
  records.claim_settings(out, TEXT_SETTINGS, {"split": split, "num_shards": num_shards, "dtype": dtype,
                                              "encoders": {spec.name: spec.describe() for spec in specs}},
                         {"split": "--split", "num_shards": "--num_shards", "dtype": "--dtype",
                          "encoders": "--encoder"})
  cast = DTYPES[dtype]
  empty_path = os.path.join(out, EMPTY_PROMPT)
  if host == 0 and not os.path.exists(empty_path):
    empty = {k: v[0] for k, v in encode_all(specs, [""], cast).items()}
    with open(empty_path + ".tmp", "wb") as f:  # npz cannot hold bfloat16: stored as its uint16 bits
      np.savez(f, **{k: v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v for k, v in empty.items()})
    os.replace(empty_path + ".tmp", empty_path)
  paths = shard_paths(out, split, num_shards)
  start, done = time.time(), 0
  for shard, indices, temporary in pending_shards(paths, len(source), host, num_hosts, log):
    writer = ArrayRecordWriter(temporary, "group_size:1")
    for begin in range(0, len(indices), batch_size):
      batch = indices[begin:begin + batch_size]
      captions = [source[i]["caption"] for i in batch]
      arrays = encode_all(specs, captions, cast)
      for k, index in enumerate(batch):
        writer.write(records.serialize_arrays({"index": index, "caption": captions[k]},
                                              {name: a[k] for name, a in arrays.items()}))
      done += len(batch)
      log(f"shard {shard + 1}/{num_shards}: {begin + len(batch)}/{len(indices)} captions "
          f"({done / max(time.time() - start, 1e-9):.1f} captions/s)")
    writer.close()
  if not all(os.path.exists(p) for p in paths + [empty_path]):
    return None
  meta = {"split": split, "num_shards": num_shards, "count": len(source), "dtype": dtype,
          "encoders": {spec.name: spec.describe() for spec in specs}}
  records.write_json(out, TEXT_META, meta)
  return meta


def load_empty_prompt(directory: str) -> dict[str, np.ndarray]:
  """The cached empty-prompt arrays {NAME.sequence, NAME.length, NAME.pooled} in the cache dtype."""
  meta = records.read_json(directory, TEXT_META)
  if meta is None:
    raise FileNotFoundError(f"{directory}: no finished text-embedding cache ({TEXT_META}); run tools/encode_text.py")
  with np.load(os.path.join(directory, EMPTY_PROMPT), allow_pickle=False) as data:
    arrays = dict(data)
  if meta["dtype"] == "bfloat16":
    arrays = {k: v.view(ml_dtypes.bfloat16) if v.dtype == np.uint16 else v for k, v in arrays.items()}
  return arrays


def open_text_cache(directory: str, split: str = "train"):
  """The finished cache as a random-access source of records {"index", NAME.sequence, ...} in shard order,
  with the cache description as `meta` (an ArrayRecordSource)."""
  meta = records.read_json(directory, TEXT_META)
  paths = shard_paths(directory, split, meta["num_shards"]) if meta else []
  if meta is None or meta["split"] != split or not all(os.path.exists(p) for p in paths):
    raise FileNotFoundError(f"{directory}: no finished {split!r} text-embedding cache ({split}.text-* shards and "
                            f"{TEXT_META}); run tools/encode_text.py --out={directory}")
  return ArrayRecordSource(paths, records.parse_arrays, meta)
