"""Benchmarks behind the tools: common (peak FLOP/s, timing, rows), model (tools/bench.py), reference (its PyTorch
side, --torch), attention (tools/bench_attention.py), vae (tools/bench_vae.py), text (tools/bench_text.py)."""
