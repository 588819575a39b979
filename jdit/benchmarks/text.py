"""The text-encoder benchmark (tools/bench_text.py): a frozen encoder's forward pass (prompts/s, compile time,
memory, MFU) and transformers' model of the same architecture in the same run. `options`: encoder, layers, batch,
length, dtype, repeats."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdit import flops
from jdit.benchmarks.common import device_peak_flops, timed
from jdit.text import create_text_encoder


def make_encoder(options):
  overrides = {"dtype": options.dtype, **({"num_layers": options.layers} if options.layers else {})}
  return create_text_encoder(options.encoder, **overrides)


def bench_text_encoder(options) -> dict:
  encoder = make_encoder(options)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (options.batch, options.length)), jnp.int32)
  params = jax.jit(encoder.init)(jax.random.PRNGKey(0), ids)["params"]
  forward = jax.jit(lambda p, x: encoder.apply({"params": p}, x)["last_hidden_state"])
  start = time.perf_counter()
  compiled = forward.lower(params, ids).compile()
  compile_s = time.perf_counter() - start
  seconds = timed(compiled, params, ids, repeats=options.repeats)
  macs = flops.count_macs(lambda p, x: encoder.apply({"params": p}, x), params, ids)
  peak, peak_source = device_peak_flops(options.dtype)
  memory = compiled.memory_analysis()
  return {"encoder": options.encoder, "layers": encoder.num_layers, "parameters": flops.count_params(params),
          "device": jax.devices()[0].device_kind, "dtype": options.dtype, "batch": options.batch, "length": options.length,
          "compile_s": round(compile_s, 2), "prompts_per_s": round(options.batch / seconds, 2),
          "gmacs_per_prompt": round(macs / options.batch / 1e9, 3),
          "mfu": round(2 * macs / seconds / peak, 4), "peak_source": peak_source,
          "temporaries_gib": round(memory.temp_size_in_bytes / 2 ** 30, 3)}


def torch_reference(encoder):
  """transformers' model with the encoder's architecture (random weights)."""
  import transformers
  if encoder.KIND == "clip":
    config = transformers.CLIPTextConfig(
        vocab_size=encoder.vocab_size, hidden_size=encoder.hidden_size, intermediate_size=encoder.intermediate_size,
        num_hidden_layers=encoder.num_layers, num_attention_heads=encoder.num_heads,
        max_position_embeddings=encoder.max_positions, hidden_act=encoder.hidden_act,
        projection_dim=encoder.projection_dim or encoder.hidden_size)
    return transformers.CLIPTextModelWithProjection(config).eval()
  config = transformers.T5Config(
      vocab_size=encoder.vocab_size, d_model=encoder.d_model, d_kv=encoder.d_kv, d_ff=encoder.d_ff,
      num_layers=encoder.num_layers, num_heads=encoder.num_heads, feed_forward_proj=encoder.feed_forward_proj)
  return transformers.T5EncoderModel(config).eval()


def bench_text_torch(options) -> dict:
  import torch
  model = torch_reference(make_encoder(options))
  ids = torch.tensor(np.random.default_rng(0).integers(0, 1000, (options.batch, options.length)))
  with torch.inference_mode():
    seconds = timed(model, ids, repeats=options.repeats, wait=lambda _: None)
  return {"torch_prompts_per_s": round(options.batch / seconds, 2), "torch_threads": torch.get_num_threads()}
