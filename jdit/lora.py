"""LoRA for every family: low-rank adapters on a frozen base, merged once for sampling, saved and loaded in the
diffusers / PEFT layout (kohya / sd-scripts files are read too).

    spec = lora.spec_for(model, rank=16, alpha=16.0)           # the family's default targets (LORA_TARGETS)
    adapters = lora.init(model, params, spec, rng)              # the "lora" collection: {module path: {a, b}}
    out = lora.apply(model, params, adapters, spec, x, t, cond)  # x W + (x A) B * alpha / rank, nothing merged
    merged = lora.merge(params, adapters, spec.scale)           # kernels W + A B * scale, once
    lora.save_lora(model, adapters, "adapter.safetensors", spec)  # transformer.<module>.lora_A.weight / lora_B
    params = lora.load_lora(model, params, "adapter.safetensors", scale=1.0)  # the base with the file merged
The adapters live beside the parameters (jdit/nn/lora.py adds their branch to every targeted linear layer), so
every family, scanned or not, takes them without a change to its code.
"""
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit.models import family
from jdit.nn import lora as lora_nn
from jdit.nn.lora import COLLECTION, Spec, active  # noqa: F401  (the API: lora.Spec, lora.active)
from jdit.state_dict import CheckpointError, read_safetensors

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry: the PEFT config as JSON
PREFIX = "transformer."


def spec_for(model, rank: int, alpha: float | None = None, targets: tuple = (), init: str = "gaussian",
             dropout: float = 0.0) -> Spec:
  """A Spec for `model`: its family's LORA_TARGETS unless `targets` are given; alpha defaults to the rank."""
  targets = tuple(targets) or tuple(getattr(family.get(model.FAMILY), "LORA_TARGETS", ()))
  if not targets:
    raise ValueError(f"lora.targets: the {model.FAMILY!r} family names no default targets; give patterns")
  if rank <= 0:
    raise ValueError(f"lora.rank must be a positive integer, got {rank}")
  if init not in lora_nn.INITS:
    raise ValueError(f"lora.init must be one of {lora_nn.INITS}, got {init!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"lora.dropout must be in [0, 1), got {dropout}")
  return Spec(rank, float(rank if alpha is None else alpha), targets, init, float(dropout))


def _inputs(model, inputs: tuple) -> tuple:
  return inputs or model.dummy_inputs()


def init(model, params, spec: Spec, rng: jax.Array, *inputs) -> dict:
  """New adapters for the layers `spec` targets (A random, B zero): one forward pass creates them."""
  with active(spec):
    _, variables = model.apply({"params": params}, *_inputs(model, inputs), mutable=[COLLECTION],
                               rngs={"params": rng})
  adapters = nn.unbox(variables.get(COLLECTION, {}))
  if not adapters:
    raise ValueError(f"lora.targets={spec.targets}: no layer of {model.describe()} matches")
  return adapters


def apply(model, params, adapters: dict, spec: Spec, x, t, cond: dict, train: bool = False, rngs=None):
  """The adapted model's prediction (family.apply with the adapters' low-rank branches)."""
  with active(spec):
    return model.apply({"params": params, COLLECTION: adapters}, x, t, cond, train=train, rngs=rngs,
                       method="forward")


def delta(a: jnp.ndarray, b: jnp.ndarray, kernel_shape: tuple) -> jnp.ndarray:
  """A B in the kernel's shape: a (L?, in..., r), b (L?, r, out...) with L the scanned blocks when stacked."""
  stacked = len(kernel_shape) == a.ndim + b.ndim - 3
  lead = (a.shape[0],) if stacked else ()
  flat_a = a.reshape(*lead, -1, a.shape[-1])  # (L?, in, r)
  flat_b = b.reshape(*lead, b.shape[len(lead)], -1)  # (L?, r, out)
  return jnp.matmul(flat_a, flat_b).reshape(kernel_shape)


def merge(params: dict, adapters: dict, scale: float) -> dict:
  """The parameters with every adapter folded into its kernel: W + A B * scale."""
  def walk(node, adapter):
    if "a" in adapter and "b" in adapter:
      kernel = node["kernel"]
      return {**node, "kernel": kernel + (delta(adapter["a"], adapter["b"], kernel.shape) * scale).astype(kernel.dtype)}
    missing = [k for k in adapter if k not in node]
    if missing:
      raise ValueError(f"adapter module {missing[0]!r} is not in the parameters")
    return {**node, **{k: walk(node[k], v) for k, v in adapter.items()}}
  return walk(nn.unbox(params), nn.unbox(adapters))


# ----------------------------------------------------------------------------------------------
#                              Files: the diffusers / PEFT layout
# ----------------------------------------------------------------------------------------------

def _converter(model):
  from jdit import convert
  try:
    return convert.converter(model.FAMILY)
  except CheckpointError:
    return None


def module_name(path: tuple, renames: tuple) -> str:
  """A jdit module path -> the diffusers module name ("transformer_blocks_3/attn/to_out_0" ->
  "transformer_blocks.3.attn.to_out.0"), the family converter's renames undone."""
  dotted, kept = ".".join(path) + ".", {}
  for i, (theirs, ours) in enumerate(renames):
    if ours in dotted:
      dotted, kept[f"\0{i}\0"] = dotted.replace(ours, f"\0{i}\0"), theirs
  dotted = re.sub(r"_(\d+)(?=[.\0])", r".\1", dotted)
  for token, theirs in kept.items():
    dotted = dotted.replace(token, theirs)
  name = dotted.rstrip(".")
  if _module_path(name, renames) != list(path):
    raise ValueError(f"{'/'.join(path)}: no diffusers module name maps back to it")
  return name


def _unscanned(model):
  """The model with its blocks one by one: the per-block layout the files use."""
  return model.clone(scan_blocks=False) if hasattr(model, "scan_blocks") else model


def _per_block(model, tree: dict) -> dict:
  """A (possibly scanned) tree in the per-block layout the files use."""
  return family.to_layout(tree, _unscanned(model))


def _at(tree: dict, path) -> dict | None:
  """The node at `path` of a nested dict, None when a part is missing."""
  for part in path:
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def _put(tree: dict, path, value: dict) -> None:
  """tree[path] = value, creating the dicts on the way."""
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _modules(tree: dict, path: tuple = ()):
  """(module path, {"a", "b"}) of every adapter in a tree."""
  if "a" in tree and "b" in tree:
    yield path, tree
    return
  for key, value in tree.items():
    yield from _modules(value, path + (key,))


def save_lora(model, adapters: dict, path: str, spec: Spec | None = None) -> None:
  """Adapters as safetensors: diffusers / PEFT keys (transformer.<module>.lora_A.weight (r, in), lora_B.weight
  (out, r), the PEFT config with rank and alpha (spec's; without it, the arrays' rank and alpha = rank) in the
  metadata) for families with a diffusers counterpart whose module names jdit shares (MM-DiT, Flux); jdit's own
  module paths otherwise. Written whole or not at all."""
  from safetensors.numpy import save_file
  converter = _converter(model)
  renames = getattr(converter, "RENAMES", None)
  tensors, names = {}, []
  for module, node in _modules(_per_block(model, jax.device_get(adapters))):
    a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
    name = module_name(module, renames) if renames is not None else "/".join(module)
    names.append(name)
    tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
  rank = spec.rank if spec else int(next(iter(tensors.values())).shape[0])
  config = {"r": rank, "lora_alpha": spec.alpha if spec else float(rank), "target_modules": sorted(set(names))}
  metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()})}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path + ".tmp", metadata=metadata)
  os.replace(path + ".tmp", path)


def _read(path: str) -> tuple[dict, dict]:
  """(tensors, metadata) of an adapter file; CheckpointError naming the file when it cannot be read."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such adapter file")
  return read_safetensors(path)


def read_lora(model, path: str) -> tuple[dict, float]:
  """(adapters in the per-block layout: {module path: {a, b}}, alpha) of a diffusers / PEFT file (with or
  without the transformer. prefix; alpha from the metadata, else the rank); CheckpointError naming the first
  key that does not fit the model."""
  tensors, metadata = _read(path)
  config = json.loads(metadata.get(METADATA_KEY, "{}"))
  converter = _converter(model)
  renames = getattr(converter, "RENAMES", ())
  per_block = family.abstract_params(_unscanned(model))
  adapters, rank = {}, None
  for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
    name = key[:-len(".lora_A.weight")]
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    up = key[:-len("lora_A.weight")] + "lora_B.weight"
    if up not in tensors:
      raise CheckpointError(f"{path}: {up}: missing (every lora_A needs its lora_B)")
    module = name.split("/") if "/" in name else _module_path(name, renames)  # jdit's own path, or diffusers
    node = _at(per_block, module)
    if node is None or "kernel" not in node:
      raise CheckpointError(f"{path}: {key}: no module {name!r} in {model.describe()}")
    kernel = node["kernel"].shape
    a, b = np.asarray(tensors[key], np.float32).T, np.asarray(tensors[up], np.float32).T  # (in, r), (r, out)
    if a.shape[0] * b.shape[1] != math.prod(kernel) or a.shape[1] != b.shape[0]:
      raise CheckpointError(f"{path}: {key}: shapes {a.shape[::-1]}, {b.shape[::-1]} do not fit the kernel "
                            f"{tuple(kernel)} of {'/'.join(module)}")
    _put(adapters, module, {"a": a, "b": b})
    rank = rank or a.shape[1]
  if not adapters:
    raise CheckpointError(f"{path}: no lora_A / lora_B tensors (first key: {next(iter(tensors), 'none')})")
  return adapters, float(config.get("transformer.lora_alpha", config.get("lora_alpha", rank)))


def _module_path(name: str, renames: tuple) -> list[str]:
  """A diffusers module name -> jdit's module path (the family converter's renames, numbered parts merged)."""
  from jdit.state_dict import merged_path
  renamed = name + ".weight"
  for theirs, ours in renames:
    renamed = renamed.replace(theirs, ours)
  return merged_path(renamed)[0]


def kohya_deltas(model, tensors: dict, path: str) -> dict:
  """{jdit module path: kernel delta (in, out)} of a kohya / sd-scripts file (lora_unet_<module>.lora_down,
  lora_up, alpha): up down * alpha / rank per module, fused modules split by rows (the family converter's
  kohya_modules: Flux, MM-DiT)."""
  converter = _converter(model)
  table = converter.kohya_modules(model) if hasattr(converter, "kohya_modules") else {}
  deltas = {}
  for key in sorted(k for k in tensors if k.endswith(".lora_down.weight")):
    module = key[:-len(".lora_down.weight")]
    if module not in table:
      raise CheckpointError(f"{path}: {key}: no module {module!r} in {model.describe()}")
    down = np.asarray(tensors[key], np.float64)  # (r, in)
    up = np.asarray(tensors[f"{module}.lora_up.weight"], np.float64)  # (out, r)
    alpha = float(np.asarray(tensors.get(f"{module}.alpha", down.shape[0])))
    full = (up @ down) * alpha / down.shape[0]  # (out, in)
    sizes = [entry[1] for entry in table[module]]
    if full.shape[0] != sum(sizes):
      raise CheckpointError(f"{path}: {key}: {full.shape[0]} output rows do not fit {module} of {model.describe()}")
    for (name, _, *swap), part in zip(table[module], np.split(full, np.cumsum(sizes)[:-1])):
      part = np.concatenate(np.split(part, 2)[::-1]) if swap else part  # (shift, scale) -> (scale, shift)
      deltas[tuple(_module_path(name, converter.RENAMES))] = part.T
  return deltas


def load_lora(model, params: dict, path: str, scale: float = 1.0) -> dict:
  """The base `params` with the adapter file merged at `scale` (times its alpha / rank): diffusers / PEFT or
  jdit files, and kohya / sd-scripts files (lora_unet_...) for families whose converter maps them (Flux, MM-DiT)."""
  tensors, _ = _read(path)
  if any(k.endswith(".lora_down.weight") for k in tensors):
    merged = jax.tree.map(lambda a: a, _per_block(model, nn.unbox(params)))  # fresh containers: updated below
    for module, part in kohya_deltas(model, tensors, path).items():
      leaf = _at(merged, module)
      if leaf is None or "kernel" not in leaf:
        raise CheckpointError(f"{path}: no module {'/'.join(module)} in {model.describe()} for its kohya adapter")
      _put(merged, module, {**leaf, "kernel": leaf["kernel"] + jnp.asarray(part * scale, leaf["kernel"].dtype)})
    return family.to_layout(merged, model)
  adapters, alpha = read_lora(model, path)
  rank = next(_modules(adapters))[1]["a"].shape[-1]
  merged = merge(_per_block(model, params), jax.tree.map(jnp.asarray, adapters), scale * alpha / rank)
  return family.to_layout(merged, model)


def parse_loras(value: str) -> list[tuple[str, float]]:
  """config.sample.loras "PATH:SCALE,PATH:SCALE" (a scale may be left out: 1.0) -> [(path, scale)]; ValueError
  naming the field for a malformed entry or a missing file."""
  out = []
  for entry in filter(None, (e.strip() for e in value.split(","))):
    path, _, scale = entry.rpartition(":") if ":" in entry else (entry, "", "1.0")
    try:
      out.append((path, float(scale)))
    except ValueError:
      raise ValueError(f"sample.loras={value!r}: {entry!r} is not PATH:SCALE (SCALE a number)") from None
    if not os.path.isfile(path):
      raise ValueError(f"sample.loras={value!r}: {path}: no such file")
  return out


def stack(model, params: dict, loras: list[tuple[str, float]], log=print) -> dict:
  """The base with each (adapter file, scale) merged in turn, once (not per sampling step)."""
  for path, scale in loras:
    params = load_lora(model, params, path, scale)
    log(f"merged LoRA {path} at scale {scale:g}")
  return params


def describe_file(path: str) -> dict:
  """What an adapter file holds, without a model: its modules, rank(s), alpha, layout and size."""
  tensors, metadata = _read(path)
  config = json.loads(metadata.get(METADATA_KEY, "{}"))
  downs = {k[:-len(".lora_A.weight")]: v for k, v in tensors.items() if k.endswith(".lora_A.weight")}
  if not downs:
    raise CheckpointError(f"{path}: no lora_A / lora_B tensors (first key: {next(iter(tensors), 'none')})")
  ranks = sorted({int(v.shape[0]) for v in downs.values()})
  return {"modules": len(downs), "rank": ranks[0] if len(ranks) == 1 else ranks,
          "alpha": config.get("transformer.lora_alpha", config.get("lora_alpha")),
          "parameters": int(sum(v.size for v in tensors.values())),
          "megabytes": round(sum(v.nbytes for v in tensors.values()) / 2 ** 20, 3),
          "targets": sorted({re.sub(r"([._])\d+(?=[./])", r"\1N", name.removeprefix(PREFIX)) for name in downs})}


def extract(model, base: dict, tuned: dict, rank: int, targets: tuple = ()) -> tuple[dict, Spec]:
  """A rank-`rank` adapter (alpha = rank) approximating tuned - base on the targeted kernels: each difference's
  truncated SVD, A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T (the best rank-r approximation)."""
  spec = spec_for(model, rank, float(rank), targets)
  flat = _unscanned(model)
  shapes = jax.eval_shape(lambda p: init(flat, p, spec, jax.random.key(0)), family.abstract_params(flat))
  base, tuned = _per_block(model, base), _per_block(model, tuned)
  adapters = {}
  for module, node in _modules(shapes):
    difference = np.asarray(_at(tuned, module)["kernel"], np.float64) - np.asarray(_at(base, module)["kernel"],
                                                                                    np.float64)
    u, sigma, vt = np.linalg.svd(difference.reshape(math.prod(node["a"].shape[:-1]), -1), full_matrices=False)
    root = np.sqrt(sigma[:rank])
    _put(adapters, module, {"a": jnp.asarray((u[:, :rank] * root).reshape(node["a"].shape), jnp.float32),
                            "b": jnp.asarray((root[:, None] * vt[:rank]).reshape(node["b"].shape), jnp.float32)})
  return family.to_layout(adapters, model), spec
