"""Reading PyTorch weight files into flat {key: float32 numpy} dicts, without executing pickled code.

Accepted: .safetensors; .pt/.pth/.bin/.ckpt read with torch.load(weights_only=True); a directory with a
diffusers model (diffusion_pytorch_model[.safetensors|.bin], sharded via an index json too).
"""
import argparse
import json
import math
import os

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
  """A weight file that cannot be used; the message names the file or key."""


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
MAX_HEADER_BYTES = 100 * 2 ** 20  # the safetensors format's own limit on its JSON header


def _safetensors_header(path: str) -> tuple[dict, int]:
  """(header, the offset of the data) of a safetensors file, its length checked against the file's before
  anything is read into memory."""
  length = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    size = int.from_bytes(prefix, "little")
    if len(prefix) < 8 or size > min(length - 8, MAX_HEADER_BYTES):
      raise ValueError(f"a header of {size} bytes does not fit a file of {length} bytes")
    header = json.loads(f.read(size))
  if not isinstance(header, dict):
    raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
  return header, 8 + size


def _entry_dtype(key: str, entry, data_bytes: int):
  """The numpy dtype of a header entry whose dtype, shape and offsets fit the data; ValueError naming the key."""
  import ml_dtypes
  if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
    raise ValueError(f"{key}: no known dtype")
  name = _SAFETENSORS_DTYPES[entry["dtype"]]
  dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
  shape, offsets = entry.get("shape"), entry.get("data_offsets")
  if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
    raise ValueError(f"{key}: shape {shape!r} is not a list of sizes")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
          and 0 <= offsets[0] <= offsets[1] <= data_bytes):
    raise ValueError(f"{key}: data_offsets {offsets!r} are not within the {data_bytes} data bytes")
  if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
    raise ValueError(f"{key}: {offsets[1] - offsets[0]} bytes do not hold shape {shape} of {name}")
  return dtype


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, metadata) of a .safetensors file: tensors as read-only memory maps in their stored dtype (bfloat16
  via ml_dtypes), so a file larger than memory is only read where used. The header is checked against the file
  (sizes, dtypes, shapes, offsets) before anything is allocated: a damaged or foreign file is a CheckpointError
  naming it."""
  try:
    header, start = _safetensors_header(path)
    data_bytes = os.path.getsize(path) - start
    data = np.memmap(path, np.uint8, "r", offset=start) if data_bytes > 0 else np.zeros(0, np.uint8)
    tensors = {}
    for key, entry in header.items():
      if key != "__metadata__":
        dtype = _entry_dtype(key, entry, data_bytes)
        begin, end = entry["data_offsets"]
        tensors[key] = data[begin:end].view(dtype).reshape(entry["shape"])
    metadata = header.get("__metadata__") or {}
    return tensors, metadata if isinstance(metadata, dict) else {}
  except (ValueError, KeyError, TypeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _to_numpy(tree):
  import torch
  if isinstance(tree, torch.Tensor):
    return tree.detach().to(torch.float32).numpy() if tree.is_floating_point() else tree.numpy()
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return tree


def _read_pickle(path: str) -> dict:
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"reading {os.path.basename(path)} needs PyTorch (pip install 'jdit[torch]')") from e
  with open(path, "rb") as f:
    head = f.read(4)
  if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip archive, or a legacy pickle
    raise CheckpointError(f"{path}: not a PyTorch weight file (it starts with {head!r}, neither a torch.save zip "
                          "archive nor a pickle)")
  # Official DiT training checkpoints also hold the run's argparse.Namespace: a plain data class.
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot be read as PyTorch weights with weights_only=True "
                          f"(pickled code is never executed): {str(e).splitlines()[0]}") from e
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return _to_numpy(obj)


def _read_index(path: str) -> dict[str, np.ndarray]:
  with open(path) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  merged = {}
  for shard in shards:
    merged.update(read_weight_file(os.path.join(os.path.dirname(path), shard)))
  return merged


def read_weight_file(path: str) -> dict:
  """The contents of one weight file: a flat state dict, or a nested dict (training checkpoints)."""
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")
  if path.endswith(".index.json"):
    return _read_index(path)
  if path.endswith(SAFETENSORS_SUFFIXES):
    return read_safetensors(path)[0]
  if path.endswith(PICKLE_SUFFIXES):
    return _read_pickle(path)
  raise CheckpointError(f"{path}: unknown weight format; expected one of "
                        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} or a diffusers directory")


def find_diffusers_weights(directory: str, subfolder: str = "transformer") -> str:
  """The weight file of a diffusers model directory (or of its `subfolder`, as in a pipeline directory)."""
  for folder in (directory, os.path.join(directory, subfolder)):
    for name in DIFFUSERS_WEIGHT_NAMES:
      candidate = os.path.join(folder, name)
      if os.path.exists(candidate):
        return candidate
  raise CheckpointError(f"{directory}: no diffusers weights found (looked for {', '.join(DIFFUSERS_WEIGHT_NAMES)})")


def read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def select_weights(contents: dict, which: str, path: str) -> dict[str, np.ndarray]:
  """Picks the tensors of a training checkpoint ({'model', 'ema', ...}, or Lightning's {'state_dict': ...} as in
  Stable Diffusion .ckpt files) or returns a flat state dict."""
  if which not in ("ema", "model"):
    raise CheckpointError(f"which must be 'ema' or 'model', got {which!r}")
  if isinstance(contents.get("state_dict"), dict):
    contents = contents["state_dict"]
  if any(isinstance(v, dict) for v in contents.values()):
    if which not in contents:
      raise CheckpointError(f"{path}: training checkpoint has no {which!r} entry "
                            f"(entries: {', '.join(sorted(contents))})")
    contents = contents[which]
  weights = {k: v for k, v in contents.items() if isinstance(v, np.ndarray)}
  if not weights:
    raise CheckpointError(f"{path}: holds no tensors")
  return weights


def required(weights: dict, key: str) -> np.ndarray:
  """weights[key] as float32; CheckpointError naming the key when it is missing."""
  if key not in weights:
    raise CheckpointError(f"{key}: missing from the checkpoint")
  return np.asarray(weights[key], np.float32)


def merged_path(key: str) -> tuple[list[str], str]:
  """A PyTorch key as (Flax module path, tensor name), numeric parts joined to the name before them:
  "input_blocks.3.0.in_layers.2.weight" -> (["input_blocks_3_0", "in_layers_2"], "weight")."""
  *parts, leaf = key.split(".")
  path = []
  for part in parts:
    if part.isdigit() and path:
      path[-1] += f"_{part}"
    else:
      path.append(part)
  return path, leaf


def to_flax_tree(weights: dict[str, np.ndarray], flax_path=merged_path, embeddings: tuple[str, ...] = ()) -> dict:
  """PyTorch tensors -> a nested Flax parameter tree at flax_path(key): conv weights (O, I, kh, kw) -> HWIO
  kernels, 1x1 conv1d weights (O, I, 1) and linear weights (O, I) -> (I, O) kernels, 1-D weights -> norm scales,
  and the weights of modules named in `embeddings` -> embedding tables as they are."""
  params = {}
  for key, value in weights.items():
    path, leaf = flax_path(key)
    if leaf == "bias":
      name = "bias"
    elif path[-1] in embeddings:
      name = "embedding"
    elif value.ndim == 4:
      name, value = "kernel", value.transpose(2, 3, 1, 0)
    elif value.ndim in (2, 3):
      name, value = "kernel", value.reshape(value.shape[:2]).T
    else:
      name = "scale"
    node = params
    for part in path:
      node = node.setdefault(part, {})
    node[name] = value
  return params


def check_params(params: dict, expected: dict, describe: str) -> None:
  """Raises CheckpointError naming the first parameter missing, extra or of the wrong shape vs `expected`."""
  import jax
  path_name = lambda path: "/".join(str(getattr(p, "key", p)) for p in path)
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path, value in got:
    if path not in want:
      raise CheckpointError(f"{path_name(path)}: parameter not in the model {describe}")
    if tuple(value.shape) != tuple(want[path].shape):
      raise CheckpointError(f"{path_name(path)}: shape {tuple(value.shape)} does not match the model's "
                            f"{tuple(want[path].shape)} in {describe}")
  missing = sorted(set(want) - {p for p, _ in got}, key=str)
  if missing:
    raise CheckpointError(f"{path_name(missing[0])}: the model {describe} needs it but the checkpoint lacks it")
