"""Parameters and forward multiply-adds of a model family's named models, computed from the model itself.

    python tools/model_table.py                 # DiT paper variants at 256x256 (32x32x4 latents), vs the paper
    python tools/model_table.py --family=unet   # the ADM ImageNet presets, each at its own resolution in pixels
    python tools/model_table.py --json          # rows {"model", "params", "gmacs"}
Every model is conditioned on 1000 classes and learns sigma. MACs are counted exactly on the traced program
(every matmul and convolution), the way the DiT paper's "Gflops" count multiply-adds.
"""
import argparse
import json

from jdit import flops
from jdit.models import family


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="dit", choices=family.FAMILIES)
  parser.add_argument("--json", action="store_true", help="print the rows as JSON")
  args = parser.parse_args(argv)
  rows = flops.table_rows(args.family)
  if args.json:
    print(json.dumps(rows, indent=1))
    return
  shown = []
  for row in rows:
    model = family.get(args.family).table_model(row["model"])
    shown.append({**row, "params": f"{row['params'] / 1e6:.2f}M",
                  "input": "x".join(map(str, (*model.input_hw, model.in_channels)))})
    if row["model"] in flops.PAPER_GFLOPS:
      shown[-1].update(paper_gflops=flops.PAPER_GFLOPS[row["model"]],
                       deviation=f"{100 * (row['gmacs'] / flops.PAPER_GFLOPS[row['model']] - 1):+.2f}%")
  keys = {key: None for row in shown for key in row}  # rows without a paper figure show "-" there
  print(flops.summarize([{key: row.get(key, "-") for key in keys} for row in shown]))


if __name__ == "__main__":
  main()
