"""Parameters and forward multiply-adds of every DiT paper variant, computed from the model.

Setting of DiT paper Table 4: 256x256 images = 32x32x4 latents, 1000 classes, learned sigma.
    python tools/model_table.py          # table, with the paper's Gflops and the deviation
    python tools/model_table.py --json   # rows {"variant", "params", "gmacs"}
"""
import argparse
import json

from jdit import flops
from jdit.models import PAPER_VARIANTS, create_dit

# DiT paper (Peebles & Xie 2023), Table 4 "Gflops" (multiply-adds, fvcore), for comparison only.
PAPER_GFLOPS = {
    "S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
    "L/8": 5.01, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
}


def table_rows(variants=PAPER_VARIANTS) -> list[dict]:
  rows = []
  for name in variants:
    model = create_dit(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    stats = flops.dit_stats(model)
    rows.append({"variant": name, "params": stats["params"], "gmacs": round(stats["macs"] / 1e9, 3)})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print the rows as JSON")
  args = parser.parse_args()
  rows = table_rows()
  if args.json:
    print(json.dumps(rows, indent=1))
    return
  shown = [{**r, "params": f"{r['params'] / 1e6:.2f}M", "paper_gflops": PAPER_GFLOPS[r["variant"]],
            "deviation": f"{100 * (r['gmacs'] / PAPER_GFLOPS[r['variant']] - 1):+.2f}%"}
           for r in rows]
  print(flops.summarize(shown))


if __name__ == "__main__":
  main()
