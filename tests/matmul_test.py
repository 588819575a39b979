"""Low-precision matmuls: float32 accumulation, exact gradients of the bf16 computation, bf16 GEMM operands in
the backward pass too, and float32 gradients for float32 master weights."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.nn import matmul


def operands():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 16, 24), jnp.bfloat16)  # (B, T, D) activations
  w = jnp.asarray(rng.randn(24, 3, 4, 8) * 0.2, jnp.float32)  # (D, 3, H, Dh) float32 master kernel
  return x, w


EQUATION = "btd,dshk->btshk"


def test_transposed_equations_and_their_error():
  assert matmul.transposed_equations(EQUATION) == ("btshk,dshk->btd", "btd,btshk->dshk")
  assert matmul.transposed_equations("bhqd,bhkd->bhqk") == ("bhqk,bhkd->bhqd", "bhqd,bhqk->bhkd")
  with pytest.raises(ValueError, match="not a matmul-like contraction"):
    matmul.transposed_equations("ab,bc->a")  # b's index c is summed within one operand


def test_bf16_einsum_equals_the_float32_accumulated_product_and_its_gradients():
  x, w = operands()
  out = matmul.einsum(EQUATION, x, w, jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  reference = jnp.einsum(EQUATION, x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(out, reference.astype(jnp.bfloat16))

  cotangent = jnp.asarray(np.random.RandomState(1).randn(*out.shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cotangent)
  dx, dw = jax.grad(loss(lambda x, w: matmul.einsum(EQUATION, x, w, jnp.bfloat16)), argnums=(0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32  # the master weight's gradient stays float32
  # The same gradients in float32 from the bf16-rounded operands and cotangent: only the output rounding differs.
  rx, rw = jax.grad(loss(lambda x, w: jnp.einsum(EQUATION, x, w.astype(jnp.bfloat16).astype(jnp.float32))),
                    argnums=(0, 1))(x.astype(jnp.float32), w)
  np.testing.assert_allclose(np.asarray(dx, np.float32), rx, rtol=1e-2, atol=1e-2 * np.abs(rx).max())
  np.testing.assert_allclose(dw, rw, rtol=1e-2, atol=1e-2 * np.abs(rw).max())


def test_every_matmul_of_the_bf16_gradient_takes_bf16_operands():
  """The point of the custom VJP: XLA:CPU upcasts a GEMM with a float32 operand to a float32 GEMM."""
  x, w = operands()
  loss = lambda x, w: jnp.sum(matmul.einsum(EQUATION, x, w, jnp.bfloat16).astype(jnp.float32))
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  dots = re.findall(r"stablehlo.dot_general .*? : \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)",
                    grad.lower(x, w).as_text())
  assert len(dots) == 3  # forward, input gradient, weight gradient
  for lhs, rhs, out in dots:
    assert lhs.endswith("xbf16>") and rhs.endswith("xbf16>") and out.endswith("xf32>"), (lhs, rhs, out)


def test_float32_is_a_plain_einsum():
  x, w = operands()
  x = x.astype(jnp.float32)
  np.testing.assert_array_equal(matmul.einsum(EQUATION, x, w, jnp.float32), jnp.einsum(EQUATION, x, w))


def test_a_bf16_layer_returns_float32_on_cpu_from_bf16_gemm_operands():
  """matmul.activation_dtype: no bf16 rounding of layer outputs on CPU (XLA computes bf16 elementwise in float32
  there anyway); the GEMM still takes bf16 operands."""
  from jdit.nn import layers
  x, w = operands()
  assert matmul.activation_dtype(jnp.bfloat16) == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  dense = layers.EinsumDense(EQUATION, w.shape, (None,) * 4, None, None, lambda *_: w, jnp.bfloat16)
  params = dense.init(jax.random.key(0), x)
  out = dense.apply(params, x)
  assert out.dtype == matmul.activation_dtype(jnp.bfloat16)
  np.testing.assert_array_equal(out, matmul.einsum(EQUATION, x, w, jnp.bfloat16, jnp.float32).astype(out.dtype))
  dots = re.findall(r"stablehlo.dot_general .*? : \((tensor<[^>]*>), (tensor<[^>]*>)\)",
                    jax.jit(dense.apply).lower(params, x).as_text())
  assert dots and all(lhs.endswith("xbf16>") and rhs.endswith("xbf16>") for lhs, rhs in dots), dots


@pytest.mark.parametrize("equation, a_shape, b_shape", [
    ("btd,dshk->btshk", (2, 3, 6), (6, 3, 4, 5)),  # qkv forward
    ("btshk,dshk->btd", (2, 3, 3, 4, 5), (6, 3, 4, 5)),  # its input gradient: (3, H, Dh) contracted
    ("btd,btshk->dshk", (2, 3, 6), (2, 3, 3, 4, 5)),  # its weight gradient
    ("abi,abo->io", (2, 3, 40), (2, 3, 5)),  # an MLP weight gradient, the activations the larger: swapped
    ("bhqk,bhqd->bhkd", (2, 3, 7, 7), (2, 3, 7, 5)),  # attention's dv
    ("bqhd,bkhd->bhqk", (2, 4, 3, 5), (2, 6, 3, 5)),  # heads between the tokens and the head dim
])
def test_f32_einsum_is_the_einsum_written_as_one_gemm_per_batch(equation, a_shape, b_shape):
  """matmul.f32_einsum on CPU: one (batched) GEMM whose left operand contracts its minor axis, with at most one
  batch axis (YNNPACK's layout), and the same product as the einsum."""
  rng = np.random.RandomState(0)
  a, b = (jnp.asarray(rng.randn(*shape), jnp.float32) for shape in (a_shape, b_shape))
  f = jax.jit(lambda a, b: matmul.f32_einsum(equation, a, b))
  np.testing.assert_allclose(f(a, b), np.einsum(equation, np.float64(a), np.float64(b)), rtol=1e-5, atol=1e-5)
  dots = re.findall(r"stablehlo.dot_general .*?(batching_dims = \[[\d, ]*\] x \[[\d, ]*\], )?"
                    r"contracting_dims = \[(\d+)\] x \[\d+\].*? : \(tensor<([\dx]+)x", f.lower(a, b).as_text())
  assert len(dots) == 1, dots
  batching, lhs_contracted, lhs_shape = dots[0]
  assert int(lhs_contracted) == lhs_shape.count("x")  # the minor axis
  assert batching in ("", "batching_dims = [0] x [0], ")
