"""Benchmarks a model of any family: train-step and sampling throughput, compile time, memory, model-FLOPs
utilization, and optionally the PyTorch reference model side by side.

    python tools/bench.py --variant=XL/2 --resolution=256 --batch=32 --dtype=bfloat16        # on a GPU / TPU
    python tools/bench.py --variant=S/2 --resolution=256 --batch=8 --torch                   # vs PyTorch, same run
    python tools/bench.py --family=unet --variant=adm64 --resolution=64 --batch=8 --torch    # ADM U-Net, pixels
    python tools/bench.py --family=mmdit --variant=sd3.5-medium --resolution=1024 --batch=4 --dtype=bfloat16
    python tools/bench.py --variant=S/2 --profile --samplers=equal_quality   # + op categories, images/s per sampler
DiT variants see resolution/8 latents (the SD VAE), MM-DiT presets resolution/8 16-channel latents and SD3's 333
text tokens, U-Net presets pixels. MFU = achieved model FLOPs / device peak, with training FLOPs = 3 x forward
FLOPs and forward FLOPs = 2 x the multiply-adds of the model table; the peak comes from a table (TPU
v4/v5e/v5p/v6e, A100, H100, H200, bf16 dense) or, on CPU, from a measured matmul probe in the compute dtype.
Attention backends and VAE decoding have their own tools (bench_attention.py, bench_vae.py). Every row records
the CPU model, core count and load average; a busy machine (load above half a core per core) gets a warning.
Prints a table; --json prints the same as JSON.
"""
import argparse
import sys

from jdit.benchmarks.common import busy_warning, machine, print_row
from jdit.benchmarks.model import bench_model
from jdit.models import family
from jdit.nn.attention import ATTENTION_BACKENDS


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="dit", choices=family.FAMILIES)
  parser.add_argument("--variant", default="S/2", help="a variant of the family's model table (S/2, adm64, ...)")
  parser.add_argument("--resolution", type=int, default=256,
                      help="image size (DiT: the model sees resolution/8 latents; U-Net: pixels)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed train steps")
  parser.add_argument("--sample_steps", type=int, default=10, help="DDIM steps with guidance for the sampling figure")
  parser.add_argument("--profile", action="store_true", help="also time the train step's ops by category "
                      "(jdit.profile: matmul, attention, norm/reduce, elementwise, copy/transpose, scan, optimizer); "
                      "with --torch on CPU, PyTorch's step too (torch.profiler)")
  parser.add_argument("--samplers", default="", help="also time these samplers with guidance: SAMPLER:STEPS,... or "
                      "equal_quality (each sampler at the steps that match DDPM-250 on digits; README table)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention_backend", default="auto", choices=ATTENTION_BACKENDS)
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--scan_blocks", action=argparse.BooleanOptionalAction, default=True,
                      help="nn.scan over the blocks (--no-scan_blocks: unrolled)")
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference model on this machine")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  host = machine()  # before the run: its own threads would count as load
  if (warning := busy_warning(host)) is not None:
    print(warning, file=sys.stderr, flush=True)
  try:
    row = bench_model(args)
  except ValueError as e:  # an unknown variant, a resolution the model cannot take, ...
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.torch:
    from jdit.benchmarks.reference import bench_torch
    row.update(bench_torch(args))
    for name in ("train", "forward", "sample"):
      row[f"jdit_vs_torch_{name}"] = round(row[f"{name}_images_per_s"] / row[f"torch_{name}_images_per_s"], 3)
  print_row({**row, **host}, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
