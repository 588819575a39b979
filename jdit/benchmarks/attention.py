"""The attention benchmark (tools/bench_attention.py): one attention layer's forward and backward pass per backend
and token count, with its memory. `options`: tokens, backends, batch, heads, head_dim, dtype, steps,
max_memory_gib."""
import jax
import jax.numpy as jnp

from jdit.benchmarks.common import timed
from jdit.nn.attention import dot_product_attention


def bench_attention(options):
  """Yields one row per (tokens, backend): seconds and memory of the value-and-grad of an attention layer."""
  for tokens in options.tokens:
    shape = (options.batch, tokens, options.heads, options.head_dim)
    q, k, v, w = (jax.random.normal(jax.random.key(i), shape, options.dtype) for i in range(4))
    for backend in options.backends:
      def loss(q, k, v, w, backend=backend):
        return jnp.vdot(dot_product_attention(q, k, v, backend).astype(jnp.float32), w.astype(jnp.float32))
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      memory = step.lower(q, k, v, w).compile().memory_analysis()
      estimate = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes) / 2 ** 30
      row = {"tokens": tokens, "backend": backend, "memory_estimate_gib": round(estimate, 3)}
      if estimate <= options.max_memory_gib:
        row["forward_backward_s"] = round(timed(step, q, k, v, w, repeats=options.steps), 4)
        row["forward_s"] = round(timed(jax.jit(loss), q, k, v, w, repeats=options.steps), 4)
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        if peak:
          row["device_peak_gib"] = round(peak / 2 ** 30, 3)
      else:
        row["skipped"] = f"over --max_memory_gib={options.max_memory_gib}"
      yield row
