"""Matmuls in the compute dtype with float32 accumulation, fast on every platform.

GPUs and TPUs accumulate a bf16 matmul in float32 by themselves, so there `einsum` is a plain einsum. XLA:CPU
runs bf16 GEMMs natively (AVX512-BF16 through YNNPACK, about twice the float32 rate) only when they return
float32; a dot with a bf16 result is upcast to a float32 GEMM instead. So on CPU a low-precision einsum
returns float32 from the GEMM and is cast after, with a custom VJP whose two backward matmuls also take bf16
operands and return float32 (plain autodiff would contract the float32 cotangent, upcasting them again). The
gradient of a float32 master weight then comes back in float32, unrounded.
"""
import functools
import math

import jax
import jax.numpy as jnp

from jdit.nn import platform


def einsum(equation: str, a: jnp.ndarray, b: jnp.ndarray, dtype, out_dtype=None) -> jnp.ndarray:
  """jnp.einsum(equation, a, b) with both operands cast to `dtype`, accumulated in float32, returned in
  `out_dtype` (default `dtype`). `equation` has two operands and an explicit output, "ab,bc->ac" style."""
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype == jnp.float32 or platform.target() != "cpu":
    return jnp.einsum(equation, a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _low_precision_einsum(equation, dtype, out_dtype, a.dtype, b.dtype, a, b)


def activation_dtype(dtype) -> jnp.dtype:
  """The dtype a layer returns its matmul outputs in: `dtype`, but float32 on CPU.

  XLA:CPU computes every bf16 elementwise op in float32 and, under remat, converts each saved bf16 activation
  stack back to float32 before the backward loop, so rounding the outputs to bf16 there only adds converts
  (the bf16 S/2 train step is ~10% faster without them, README). GEMM operands stay in `dtype`: consumers that
  take their compute dtype from an input (attention) cast to it first."""
  return jnp.dtype(jnp.float32 if platform.target() == "cpu" else dtype)


def transposed_equations(equation: str) -> tuple[str, str]:
  """The einsums of the two input gradients of "A,B->C": (C,B->A, A,C->B).

  Valid when each index of one operand appears in the other operand or in the output (no index is summed
  within one operand), which holds for every matmul-like contraction."""
  inputs, out = equation.replace(" ", "").split("->")
  a, b = inputs.split(",")
  for operand, others in ((a, b + out), (b, a + out)):
    if len(set(operand)) != len(operand) or not set(operand) <= set(others):
      raise ValueError(f"einsum equation {equation!r} is not a matmul-like contraction of two operands")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


def _index_groups(lhs: str, rhs: str, out: str) -> dict:
  """The GEMM roles of the indices, each list in its operand's order: batch "b", lhs-free "m", contracted "k"
  and rhs-free "n"."""
  return {"b": [i for i in lhs if i in rhs and i in out], "m": [i for i in lhs if i in out and i not in rhs],
          "k": [i for i in lhs if i not in out], "n": [i for i in rhs if i in out and i not in lhs]}


def _gemm(lhs: str, rhs: str, out: str, a: jnp.ndarray, b: jnp.ndarray):
  """The contraction lhs,rhs->out of a and b as one (batched) GEMM in the layout YNNPACK takes: `a` as
  (batch, M, K) with K minor, `b` as (batch, K, N) or (batch, N, K), each group of indices merged into one
  axis. Barriers keep XLA from folding the transposes back into the dot. Returns (elements the transposes copy,
  a function computing the product)."""
  sizes = dict(zip(lhs + rhs, a.shape + b.shape))
  groups = _index_groups(lhs, rhs, out)
  spec = lambda letters: "".join(c for c in letters if groups[c])  # noqa: E731  (no empty axes)
  flat = lambda letters: "".join("".join(groups[c]) for c in letters)  # noqa: E731
  rhs_spec = next((s for s in ("bkn", "bnk") if flat(s) == rhs), "bkn")
  copied = sum(x.size for x, term, s in ((a, lhs, "bmk"), (b, rhs, rhs_spec)) if flat(s) != term)
  copied += math.prod(sizes[i] for i in out) if flat("bmn") != out else 0

  def matrix(x, term, letters):  # transposed to the groups' order, one axis per group
    if flat(letters) != term:
      x = jax.lax.optimization_barrier(jnp.transpose(x, [term.index(i) for i in flat(letters)]))
    return x.reshape([math.prod(sizes[i] for i in groups[c]) for c in spec(letters)])

  def compute():
    product = jnp.einsum(f"{spec('bmk')},{spec(rhs_spec)}->{spec('bmn')}", matrix(a, lhs, "bmk"),
                         matrix(b, rhs, rhs_spec), preferred_element_type=jnp.float32)
    product = product.reshape([sizes[i] for i in flat("bmn")])
    if flat("bmn") == out:
      return product
    # Folded into the dot's output layout, this transpose would make YNNPACK reject the dot.
    return jnp.transpose(jax.lax.optimization_barrier(product), [flat("bmn").index(i) for i in out])

  return copied, compute


def _merged_contraction(lhs: str, rhs: str, out: str, a: jnp.ndarray, b: jnp.ndarray):
  """(equation, a, b) with a contraction over several axes, minor in `a` and adjacent in `b`, as one axis."""
  contracted = "".join(i for i in lhs if i not in out)
  if len(contracted) < 2 or contracted not in rhs:
    return f"{lhs},{rhs}->{out}", a, b
  start, size = rhs.index(contracted), math.prod(a.shape[len(lhs) - len(contracted):])
  a = a.reshape(*a.shape[:len(lhs) - len(contracted)], size)
  b = b.reshape(*b.shape[:start], size, *b.shape[start + len(contracted):])
  return f"{lhs[:-len(contracted)]}{contracted[0]},{rhs.replace(contracted, contracted[0])}->{out}", a, b


def f32_einsum(equation: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """jnp.einsum(equation, a, b) accumulated and returned in float32, "ab,bc->ac" style, laid out for XLA:CPU.

  YNNPACK, XLA:CPU's GEMM, takes its left operand with the contracted axes minor. Where `a` is not laid out so,
  XLA falls back to a float32 Eigen GEMM (attention's dv and dk) or, for several contracted axes, copies the
  operand into that layout with whatever computes it fused into the strided copy (the MLP's recomputed GELU:
  the bf16 S/2 step's slowest op). There the product is written as one GEMM (_gemm) with whichever operand on
  the left copies fewer elements. Where `a` is laid out so, XLA's own lowering is kept (YNNPACK fuses it with
  the softmax around it, and runs attention's forward 3x slower on merged batch axes), but a multi-axis
  contraction becomes one axis (XLA reordered the qkv input gradient's (3, H, Dh) to (H, Dh, 3): a copy whose
  minor axis is 3)."""
  equation = equation.replace(" ", "")
  if platform.target() != "cpu":
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)
  inputs, out = equation.split("->")
  lhs, rhs = inputs.split(",")
  groups = _index_groups(lhs, rhs, out)
  if lhs == "".join(groups["b"] + groups["m"] + groups["k"]):
    return jnp.einsum(*_merged_contraction(lhs, rhs, out, a, b), preferred_element_type=jnp.float32)
  _, compute = min(_gemm(lhs, rhs, out, a, b), _gemm(rhs, lhs, out, b, a), key=lambda gemm: gemm[0])
  with jax.named_scope(equation):  # the profile's name for the GEMM, whose own einsum reads "mk,kn->mn"
    return compute()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _low_precision_einsum(equation, dtype, out_dtype, a_dtype, b_dtype, a, b):
  return _forward(equation, dtype, out_dtype, a_dtype, b_dtype, a, b)[0]


def _forward(equation, dtype, out_dtype, a_dtype, b_dtype, a, b):
  a, b = a.astype(dtype), b.astype(dtype)
  return f32_einsum(equation, a, b).astype(out_dtype), (a, b)


def _backward(equation, dtype, out_dtype, a_dtype, b_dtype, residuals, grad):
  a, b = residuals
  grad = grad.astype(dtype)
  eq_a, eq_b = transposed_equations(equation)
  return f32_einsum(eq_a, grad, b).astype(a_dtype), f32_einsum(eq_b, a, grad).astype(b_dtype)


_low_precision_einsum.defvjp(_forward, _backward)
