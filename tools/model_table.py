"""Parameters and forward multiply-adds of a model family's named models, computed from the model itself.

    python tools/model_table.py                 # DiT paper variants at 256x256 (32x32x4 latents), vs the paper
    python tools/model_table.py --family=unet   # the ADM ImageNet presets, each at its own resolution in pixels
    python tools/model_table.py --json          # rows {"model", "params", "gmacs"}
Every model is conditioned on 1000 classes and learns sigma. MACs are counted exactly on the traced program
(every matmul and convolution), the way the DiT paper's "Gflops" count multiply-adds.
"""
import argparse
import functools
import json

from jdit import flops
from jdit.models import family

# DiT paper (Peebles & Xie 2023), Table 4 "Gflops" (multiply-adds, fvcore), for comparison only.
PAPER_GFLOPS = {
    "S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
    "L/8": 5.01, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
    "adm256": 1120.0, "adm512": 1983.0,  # the ADM baselines of the DiT paper's Tables 2 and 3
}


def table_rows(model_family: str = "dit", names=None) -> list[dict]:
  """{"model", "params", "gmacs"} of each preset (counted once per process: tracing the big models is slow)."""
  return [dict(row) for row in _rows(model_family, tuple(names) if names else None)]


@functools.lru_cache(maxsize=None)
def _rows(model_family: str, names: tuple | None) -> tuple[dict, ...]:
  module = family.get(model_family)
  rows = []
  for name in names or module.TABLE:
    stats = flops.model_stats(module.table_model(name))
    rows.append({"model": name, "params": stats["params"], "gmacs": round(stats["macs"] / 1e9, 3)})
  return tuple(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", default="dit", choices=family.FAMILIES)
  parser.add_argument("--json", action="store_true", help="print the rows as JSON")
  args = parser.parse_args(argv)
  rows = table_rows(args.family)
  if args.json:
    print(json.dumps(rows, indent=1))
    return
  shown = []
  for row in rows:
    model = family.get(args.family).table_model(row["model"])
    shown.append({**row, "params": f"{row['params'] / 1e6:.2f}M",
                  "input": "x".join(map(str, (*model.input_hw, model.in_channels)))})
    if row["model"] in PAPER_GFLOPS:
      shown[-1].update(paper_gflops=PAPER_GFLOPS[row["model"]],
                       deviation=f"{100 * (row['gmacs'] / PAPER_GFLOPS[row['model']] - 1):+.2f}%")
  print(flops.summarize(shown))


if __name__ == "__main__":
  main()
