"""Benchmarks a text encoder's forward pass: prompts/s, compile time, memory, MFU, and optionally transformers'
PyTorch model of the same architecture side by side (same run, same machine).

    python tools/bench_text.py --encoder=t5-xxl --batch=64 --length=256 --dtype=bfloat16     # on a GPU / TPU
    python tools/bench_text.py --encoder=clip-l --batch=16 --torch                            # vs transformers
--layers=N keeps the preset's width with fewer layers (quick CPU runs of the large encoders). Random weights:
throughput does not depend on them. MFU = 2 x the traced multiply-adds x prompts/s / device peak (bench.py).
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import _timed, device_peak_flops, print_row
from jdit import flops
from jdit.text import CLIP_PRESETS, T5_PRESETS, create_text_encoder


def make_encoder(args):
  overrides = {"dtype": args.dtype, **({"num_layers": args.layers} if args.layers else {})}
  return create_text_encoder(args.encoder, **overrides)


def bench_jdit(args) -> dict:
  encoder = make_encoder(args)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (args.batch, args.length)), jnp.int32)
  params = jax.jit(encoder.init)(jax.random.PRNGKey(0), ids)["params"]
  forward = jax.jit(lambda p, x: encoder.apply({"params": p}, x)["last_hidden_state"])
  start = time.perf_counter()
  compiled = forward.lower(params, ids).compile()
  compile_s = time.perf_counter() - start
  seconds = _timed(compiled, params, ids, repeats=args.repeats)
  macs = flops.count_macs(lambda p, x: encoder.apply({"params": p}, x), params, ids)
  peak, peak_source = device_peak_flops(args.dtype)
  memory = compiled.memory_analysis()
  return {"encoder": args.encoder, "layers": encoder.num_layers, "parameters": flops.count_params(params),
          "device": jax.devices()[0].device_kind, "dtype": args.dtype, "batch": args.batch, "length": args.length,
          "compile_s": round(compile_s, 2), "prompts_per_s": round(args.batch / seconds, 2),
          "gmacs_per_prompt": round(macs / args.batch / 1e9, 3),
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


def bench_torch(args) -> dict:
  import torch
  model = torch_reference(make_encoder(args))
  ids = torch.tensor(np.random.default_rng(0).integers(0, 1000, (args.batch, args.length)))
  with torch.inference_mode():
    seconds = _timed(model, ids, repeats=args.repeats, wait=lambda _: None)
  return {"torch_prompts_per_s": round(args.batch / seconds, 2), "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--encoder", default="clip-l", choices=(*CLIP_PRESETS, *T5_PRESETS))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=0, help="tokens per prompt (0: 77 for CLIP, 256 for T5)")
  parser.add_argument("--layers", type=int, default=0, help="fewer layers than the preset (0: the preset's)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch", action="store_true", help="also time transformers' model on this machine (fp32)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  args.length = args.length or (77 if args.encoder in CLIP_PRESETS else 256)
  if args.encoder in CLIP_PRESETS and args.length > 77:
    print(f"error: --length={args.length}: CLIP encoders take at most 77 tokens", file=sys.stderr)
    return 2
  row = bench_jdit(args)
  if args.torch:
    row.update(bench_torch(args))
    row["jdit_vs_torch"] = round(row["prompts_per_s"] / row["torch_prompts_per_s"], 3)
  print_row(row, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
