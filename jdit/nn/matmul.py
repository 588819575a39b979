"""Matmuls in the compute dtype with float32 accumulation, fast on every platform.

GPUs and TPUs accumulate a bf16 matmul in float32 by themselves, so there `einsum` is a plain einsum. XLA:CPU
runs bf16 GEMMs natively (AVX512-BF16 through YNNPACK, about twice the float32 rate) only when they return
float32; a dot with a bf16 result is upcast to a float32 GEMM instead. So on CPU a low-precision einsum
returns float32 from the GEMM and is cast after, with a custom VJP whose two backward matmuls also take bf16
operands and return float32 (plain autodiff would contract the float32 cotangent, upcasting them again). The
gradient of a float32 master weight then comes back in float32, unrounded.
"""
import functools

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


def _f32_einsum(equation: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _low_precision_einsum(equation, dtype, out_dtype, a_dtype, b_dtype, a, b):
  return _forward(equation, dtype, out_dtype, a_dtype, b_dtype, a, b)[0]


def _forward(equation, dtype, out_dtype, a_dtype, b_dtype, a, b):
  a, b = a.astype(dtype), b.astype(dtype)
  return _f32_einsum(equation, a, b).astype(out_dtype), (a, b)


def _backward(equation, dtype, out_dtype, a_dtype, b_dtype, residuals, grad):
  a, b = residuals
  grad = grad.astype(dtype)
  eq_a, eq_b = transposed_equations(equation)
  return _f32_einsum(eq_a, grad, b).astype(a_dtype), _f32_einsum(eq_b, a, grad).astype(b_dtype)


_low_precision_einsum.defvjp(_forward, _backward)
