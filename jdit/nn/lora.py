"""Low-rank adapters (LoRA, Hu et al. 2021) inside jdit's linear layers, with no change to model code.

While `active(spec)` holds (at trace time: init and apply), every EinsumDense whose parameter path matches one of
spec.targets adds a low-rank branch to its output,
    y = x W + b + (x A) B * alpha / rank,     A: (in..., rank), B: (rank, out...)
with A and B in the "lora" variable collection beside the frozen "params" (A random, B zero: the adapted model
starts as the base). The kernel is never merged inside the step; `merge` folds adapters into the kernels once.
"""
import contextlib
import contextvars
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

COLLECTION = "lora"
INITS = ("gaussian", "kaiming")  # A ~ N(0, 1/rank^2) (PEFT "gaussian") | Kaiming-uniform, a=sqrt(5) (PEFT default)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Which layers get adapters and how large: targets are regular expressions searched in the "/"-joined
  parameter path of a layer (e.g. "transformer_blocks_0_18/attn/to_q")."""
  rank: int
  alpha: float
  targets: tuple[str, ...]
  init: str = "gaussian"
  dropout: float = 0.0  # on the branch's input while training (when the apply has a "dropout" rng)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def matches(self, path: str) -> bool:
    return any(re.search(pattern, path) for pattern in self.targets)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jdit_lora", default=None)


@contextlib.contextmanager
def active(spec: Spec | None):
  """Layers traced inside carry the adapters of `spec` (None: none)."""
  token = _ACTIVE.set(spec)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def _init_a(rng: jax.Array, shape: tuple, spec: Spec) -> jnp.ndarray:
  """A (in..., rank): PEFT's inits, fans over the flattened input."""
  fan_in = math.prod(shape[:-1])
  if spec.init == "gaussian":
    return jax.random.normal(rng, shape, jnp.float32) / spec.rank
  bound = (1.0 / fan_in) ** 0.5  # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / 6), bound gain * sqrt(3 / fan_in)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def branch(module, x: jnp.ndarray, equation: str, kernel_shape: tuple, kernel_axes: tuple, dtype):
  """The low-rank term (x A) B * scale of the EinsumDense `module` (kernel `kernel_shape` for `equation`), or None
  when no adapter is active for its path. Called from the layer's compact __call__."""
  spec = _ACTIVE.get()
  if spec is None or not spec.matches("/".join(module.scope.path)):
    return None
  inputs, output = equation.split("->")
  x_letters, kernel_letters = inputs.split(",")
  count = sum(letter in x_letters for letter in kernel_letters)  # the kernel's input axes come first
  k_in, k_out = kernel_letters[:count], kernel_letters[count:]
  rank_shape = tuple(kernel_shape[:count]) + (spec.rank,)
  a = module.variable(COLLECTION, "a", nn.with_logical_partitioning(
      lambda: _init_a(module.make_rng("params"), rank_shape, spec), tuple(kernel_axes[:count]) + (None,)))
  b = module.variable(COLLECTION, "b", nn.with_logical_partitioning(
      lambda: jnp.zeros((spec.rank,) + tuple(kernel_shape[count:]), jnp.float32),
      (None,) + tuple(kernel_axes[count:])))
  batch = "".join(letter for letter in x_letters if letter not in k_in)
  if spec.dropout > 0 and module.has_rng("dropout"):  # PEFT's lora_dropout: on the input of A only
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - spec.dropout), 0.0)
  low = jnp.einsum(f"{x_letters},{k_in}z->{batch}z", x.astype(dtype), a.value.astype(dtype))  # (..., rank)
  return jnp.einsum(f"{batch}z,z{k_out}->{output}", low, b.value.astype(dtype)) * spec.scale  # (..., out...)


SCAN_AXES = {"params": 0, COLLECTION: 0, "intermediates": 0}  # nn.scan's variable_axes: adapters stack per block
                                                             # like the kernels, sown block outputs (REPA) too
SCAN_RNGS = {"params": True, "dropout": True}  # nn.scan's split_rngs: each block its own init and dropout draws
