"""Exact parameter and multiply-add counts, read off the model itself (never typed in).

MACs are counted on the traced jaxpr: every `dot_general` (linear layers, attention matmuls) and
`conv_general_dilated` (patch embedding, U-Net convolutions), inside nested jaxprs too (jit, remat, scan x length).
Elementwise work (norms, activations, softmax) is not counted, as in the DiT paper's "Gflops"
(fvcore counts one flop per multiply-add of matmuls and convs).
"""
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax

from jdit.models import family


def count_params(params: Any) -> int:
  """Number of scalars in a (possibly boxed or abstract) parameter tree."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(params))))


def _sub_jaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[i] for i in lhs_contract)
    return math.prod(eqn.outvars[0].aval.shape) * contracted
  if name == "conv_general_dilated":
    rhs_shape = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs_shape) // rhs_shape[out_feature_dim]
    return math.prod(eqn.outvars[0].aval.shape) * per_output
  return 0


def jaxpr_macs(jaxpr) -> int:
  """Multiply-adds of matmuls and convolutions in a jaxpr, recursing into sub-jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in _sub_jaxprs(eqn.params):
      total += repeat * jaxpr_macs(sub)
  return total


def count_macs(fn: Callable, *args, **kwargs) -> int:
  """Multiply-adds of one call fn(*args, **kwargs); args may be abstract (jax.ShapeDtypeStruct)."""
  return jaxpr_macs(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def model_stats(model) -> dict:
  """Trainable parameters and forward multiply-adds per image of a model of any family at its native input size.

  Attention is counted on the einsum backend: the fused kernels (cuDNN, Pallas splash) are custom calls whose
  matmuls the jaxpr does not show, which made a GPU run (`auto` = cuDNN) count XL/2 at 114.4 GMACs, not 118.6."""
  if hasattr(model, "attention_backend"):
    model = model.clone(attention_backend="einsum")
  inputs = model.dummy_inputs(batch_size=1)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return {
      "params": count_params(abstract["params"]),
      "macs": count_macs(model.apply, abstract, *inputs),
  }


def summarize(rows: list[dict]) -> str:
  """Plain-text table of dicts sharing the same keys."""
  keys = list(rows[0])
  cells = [[str(r[k]) for k in keys] for r in rows]
  widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
  lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths)) for cell in cells]
  return "\n".join(lines)



# DiT paper (Peebles & Xie 2023), Table 4 "Gflops" (multiply-adds, fvcore), for comparison only.
PAPER_GFLOPS = {
    "S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
    "L/8": 5.01, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
    "adm256": 1120.0, "adm512": 1983.0,  # the ADM baselines of the DiT paper's Tables 2 and 3
}


def table_rows(model_family: str = "dit", names=None) -> list[dict]:
  """{"model", "params", "gmacs"} of each named model of a family's table (its TABLE, or `names`), counted once
  per process: tracing the big models is slow."""
  return [dict(row) for row in _table_rows(model_family, tuple(names) if names else None)]


@functools.lru_cache(maxsize=None)
def _table_rows(model_family: str, names: tuple | None) -> tuple[dict, ...]:
  module = family.get(model_family)
  rows = []
  for name in names or module.TABLE:
    stats = model_stats(module.table_model(name))
    rows.append({"model": name, "params": stats["params"], "gmacs": round(stats["macs"] / 1e9, 3)})
  return tuple(rows)
