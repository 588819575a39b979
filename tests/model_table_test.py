"""Parameter counts and multiply-adds of every paper variant, against DiT paper Table 4."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import load_tool

from jdit import flops
from jdit.models import PAPER_VARIANTS, create_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
model_table = load_tool("model_table")

# Exact trainable counts at 256x256 (32x32x4 latents), 1000 classes, learned sigma. The official DiT
# prints 675,129,632 for XL/2 including its fixed 256x1152 pos_embed buffer (not trainable, not a param here).
PINNED_PARAMS = {
    "S/2": 32_865_056, "S/4": 32_920_448, "S/8": 33_142_016,
    "B/2": 130_315_808, "B/4": 130_426_496, "B/8": 130_869_248,
    "L/2": 457_840_672, "L/4": 457_988_224, "L/8": 458_578_432,
    "XL/2": 674_834_720, "XL/4": 675_000_704, "XL/8": 675_664_640,
}
APPROX_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}
pytestmark = pytest.mark.xdist_group("model_table")  # one worker counts the table once


@pytest.fixture(scope="module")
def rows():
  return {r["model"]: r for r in flops.table_rows()}


def test_every_variant_is_pinned(rows):
  assert set(PINNED_PARAMS) == set(PAPER_VARIANTS) == {name for name in rows if "lightning" not in name}


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_params_and_gmacs_match_the_paper(rows, variant):
  row = rows[variant]
  assert row["params"] == PINNED_PARAMS[variant]
  assert abs(row["params"] / APPROX_PARAMS[variant.split("/")[0]] - 1) < 0.01
  assert abs(row["gmacs"] / flops.PAPER_GFLOPS[variant] - 1) < 0.02


def test_xl2_count_matches_the_official_printout():
  assert PINNED_PARAMS["XL/2"] + 256 * 1152 == 675_129_632


def test_mac_counter_counts_matmuls_and_convolutions():
  a, b = jax.ShapeDtypeStruct((2, 3, 5), jnp.float32), jax.ShapeDtypeStruct((5, 7), jnp.float32)
  assert flops.count_macs(lambda x, w: x @ w, a, b) == 2 * 3 * 5 * 7
  image, kernel = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((2, 2, 3, 16), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.count_macs(conv, image, kernel) == 4 * 4 * 16 * (2 * 2 * 3)
  scanned = lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=4)[0]
  square = jax.ShapeDtypeStruct((5, 5), jnp.float32)
  assert flops.count_macs(jax.jit(scanned), square, square) == 4 * 125


def test_macs_scale_with_batch_and_include_attention():
  model = create_dit("Tiny/2", input_size=8, num_classes=10)
  one = flops.model_stats(model)["macs"]
  x, t, y = model.dummy_inputs(batch_size=2)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  assert flops.count_macs(model.apply, abstract, x, t, y) == 2 * one
  tokens, d = 16, 64
  attention = 2 * tokens * tokens * d * model.depth
  linear = tokens * 12 * d * d * model.depth
  assert one > attention + linear


def test_macs_count_attention_whatever_the_backend():  # a fused kernel is a custom call without dot_generals
  model = create_dit("Tiny/2", input_size=16, num_classes=10)
  assert flops.model_stats(model.clone(attention_backend="splash"))["macs"] == flops.model_stats(model)["macs"]


def test_model_table_tool_prints_json(rows, capsys):  # in this process: the fixture's counts are reused
  model_table.main(["--json"])
  printed = json.loads(capsys.readouterr().out)
  assert printed == list(rows.values())
  rows = printed
  assert [r["model"] for r in rows] == [*PAPER_VARIANTS, "B/2 lightning", "XL/2 lightning"]
  assert all(set(r) == {"model", "params", "gmacs"} for r in rows)


# guided-diffusion's ImageNet models with 1000 classes and learned sigma (equal to UNetModel's own count, see
# unet_test.py); the DiT paper's Tables 2 and 3 give ADM 1120 Gflops at 256x256 and 1983 at 512x512.
ADM_PARAMS = {"adm64": 295_904_454, "adm128": 421_529_606, "adm256": 553_838_086, "adm512": 558_997_638}


def test_unet_table_gives_the_adm_presets_and_the_papers_gflops(capsys):
  model_table.main(["--family=unet", "--json"])
  rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
  assert {name: r["params"] for name, r in rows.items()} == ADM_PARAMS
  for name in ("adm256", "adm512"):
    assert abs(rows[name]["gmacs"] / flops.PAPER_GFLOPS[name] - 1) < 0.001
