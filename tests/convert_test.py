"""Weight import: parity with diffusers' DiTTransformer2DModel (PyTorch CPU), both key layouts, safety, errors."""
import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from jdit.convert import CheckpointError, load_dit_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def make_diffusers_dit(official_convention: bool, seed: int = 0, **overrides):
  """A diffusers DiT with random non-zero weights whose blocks share one condition embedder (as a DiT does)."""
  torch.manual_seed(seed)
  config = {**TINY, **overrides}
  if official_convention:
    config["norm_eps"] = 1e-6
  model = diffusers.DiTTransformer2DModel(**config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.copy_(0.1 * torch.randn_like(param))
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(shared)
  if official_convention:
    for block in model.transformer_blocks:
      block.norm1.emb.time_proj.downscale_freq_shift = 0
  return model


def inputs(batch=4, channels=4, size=8):
  rng = np.random.RandomState(1)
  x = rng.randn(batch, channels, size, size).astype(np.float32)
  t = np.linspace(0, 999, batch).round().astype(np.int64)
  y = np.array([0, 3, 10, 9][:batch])  # 10 is the null class
  return x, t, y


def torch_forward(model, x, t, y):
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample.numpy()


def jax_forward(model, params, x, t, y):
  return np.asarray(model.apply({"params": params}, x.transpose(0, 2, 3, 1), t, y)).transpose(0, 3, 1, 2)


def to_official(state: dict) -> dict:
  """diffusers -> official facebookresearch/DiT key layout, written independently of jdit's converter."""
  official = {"x_embedder.proj.weight": state["pos_embed.proj.weight"],
              "x_embedder.proj.bias": state["pos_embed.proj.bias"],
              "pos_embed": torch.zeros(1, 16, 64)}
  emb = "transformer_blocks.0.norm1.emb."
  for kind in ("weight", "bias"):
    official[f"t_embedder.mlp.0.{kind}"] = state[f"{emb}timestep_embedder.linear_1.{kind}"]
    official[f"t_embedder.mlp.2.{kind}"] = state[f"{emb}timestep_embedder.linear_2.{kind}"]
    official[f"final_layer.adaLN_modulation.1.{kind}"] = state[f"proj_out_1.{kind}"]
    official[f"final_layer.linear.{kind}"] = state[f"proj_out_2.{kind}"]
    for i in range(TINY["num_layers"]):
      src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
      official[f"{dst}attn.qkv.{kind}"] = torch.cat([state[f"{src}attn1.to_{c}.{kind}"] for c in "qkv"])
      official[f"{dst}attn.proj.{kind}"] = state[f"{src}attn1.to_out.0.{kind}"]
      official[f"{dst}adaLN_modulation.1.{kind}"] = state[f"{src}norm1.linear.{kind}"]
      official[f"{dst}mlp.fc1.{kind}"] = state[f"{src}ff.net.0.proj.{kind}"]
      official[f"{dst}mlp.fc2.{kind}"] = state[f"{src}ff.net.2.{kind}"]
  official["y_embedder.embedding_table.weight"] = state[f"{emb}class_embedder.embedding_table.weight"]
  return {k: v.clone() for k, v in official.items()}


@pytest.fixture(scope="module")
def official_torch_model():
  return make_diffusers_dit(official_convention=True)


@pytest.fixture(scope="module")
def diffusers_dir(official_torch_model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("diffusers_dit"))
  official_torch_model.save_pretrained(path)
  return path


def test_parity_with_diffusers_under_the_official_timestep_convention(official_torch_model, diffusers_dir):
  model, params = load_dit_checkpoint(diffusers_dir)
  assert (model.num_heads, model.depth, model.hidden_size, model.learn_sigma) == (4, 2, 64, True)
  assert model.timestep_freq_shift == 0.0 and model.num_classes == 10
  x, t, y = inputs()
  ref = torch_forward(official_torch_model, x, t, y)
  out = jax_forward(model, params, x, t, y)
  assert out.shape == ref.shape == (4, 8, 8, 8)
  assert relative_error(out, ref) <= 1e-5


def test_parity_with_diffusers_own_convention(tmp_path):
  torch_model = make_diffusers_dit(official_convention=False, seed=3)  # freq shift 1, MLP-norm eps 1e-5
  torch_model.save_pretrained(str(tmp_path))
  x, t, y = inputs()
  ref = torch_forward(torch_model, x, t, y)
  model, params = load_dit_checkpoint(str(tmp_path), timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
  assert relative_error(jax_forward(model, params, x, t, y), ref) <= 1e-5
  # The official convention (jdit's default for every source) really differs on the same weights.
  default, _ = load_dit_checkpoint(str(tmp_path))
  assert relative_error(jax_forward(default, params, x, t, y), ref) > 1e-3


def test_official_layout_maps_to_the_same_parameters(official_torch_model, diffusers_dir, tmp_path):
  _, from_diffusers = load_dit_checkpoint(diffusers_dir)
  official = to_official(official_torch_model.state_dict())
  torch.save(official, tmp_path / "DiT-Tiny-2-16x16.pt")
  model, from_official = load_dit_checkpoint(str(tmp_path / "DiT-Tiny-2-16x16.pt"))
  assert model.input_size == 8  # from the pos_embed buffer: 16 tokens of patch 2
  for a, b in zip(jax.tree.leaves(from_official), jax.tree.leaves(from_diffusers)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(from_official) == jax.tree.structure(from_diffusers)
  assert model.scan_blocks and "blocks" in from_official  # the default layout: blocks stacked for nn.scan
  unrolled, per_block = load_dit_checkpoint(str(tmp_path / "DiT-Tiny-2-16x16.pt"), scan_blocks=False)
  assert "blocks_1" in per_block
  x, t, y = inputs()
  np.testing.assert_allclose(jax_forward(unrolled, per_block, x, t, y), jax_forward(model, from_official, x, t, y),
                             rtol=1e-5, atol=1e-6)


def test_official_training_checkpoint_uses_ema_or_model(official_torch_model, tmp_path):
  ema = to_official(official_torch_model.state_dict())
  raw = {k: v + 1.0 for k, v in ema.items()}
  path = str(tmp_path / "0400000.pt")
  torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
              "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, path)
  _, ema_params = load_dit_checkpoint(path)
  _, raw_params = load_dit_checkpoint(path, which="model")
  np.testing.assert_allclose(raw_params["final_layer"]["linear"]["bias"],
                             ema_params["final_layer"]["linear"]["bias"] + 1.0, rtol=1e-6)


def test_single_files_without_config_json(official_torch_model, tmp_path):
  state = {k: v.contiguous() for k, v in official_torch_model.state_dict().items()}
  save_file(state, str(tmp_path / "dit.safetensors"))
  torch.save(state, str(tmp_path / "dit.bin"))
  x, t, y = inputs()
  ref = torch_forward(official_torch_model, x, t, y)
  for name in ("dit.safetensors", "dit.bin"):
    model, params = load_dit_checkpoint(str(tmp_path / name))  # heads from the variant table ("Tiny")
    assert relative_error(jax_forward(model, params, x, t, y), ref) <= 1e-5


def test_heads_must_be_given_when_no_variant_matches(tmp_path):
  torch_model = make_diffusers_dit(True, num_attention_heads=2, attention_head_dim=24)  # hidden 48: no variant
  save_file(dict(torch_model.state_dict()), str(tmp_path / "w.safetensors"))
  with pytest.raises(CheckpointError, match="cannot infer num_heads.*pass num_heads"):
    load_dit_checkpoint(str(tmp_path / "w.safetensors"))
  model, params = load_dit_checkpoint(str(tmp_path / "w.safetensors"), num_heads=2)
  x, t, y = inputs()
  assert relative_error(jax_forward(model, params, x, t, y), torch_forward(torch_model, x, t, y)) <= 1e-5


def test_pickled_code_is_never_executed(tmp_path):
  marker = tmp_path / "executed"

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  torch.save({"weight": torch.zeros(2), "payload": Payload()}, str(tmp_path / "evil.pt"))
  with pytest.raises(CheckpointError, match="weights_only=True"):
    load_dit_checkpoint(str(tmp_path / "evil.pt"))
  assert not marker.exists()


@pytest.mark.parametrize("overrides,match", [
    (dict(learn_sigma=False), "final_layer/linear/(kernel|bias): shape"),
    (dict(hidden_size=96, num_heads=4), "blocks.0.attn.qkv.weight: shape .* does not fit DiT\\(hidden_size=96"),
    (dict(num_heads=3), "num_heads=3 must divide hidden_size=64"),
    (dict(not_a_field=1), "unknown DiT config field"),
])
def test_overrides_that_contradict_the_weights(diffusers_dir, overrides, match):
  with pytest.raises(CheckpointError, match=match):
    load_dit_checkpoint(diffusers_dir, **overrides)


def test_files_that_are_not_dit_checkpoints(official_torch_model, tmp_path):
  save_file({"encoder.conv_in.weight": torch.zeros(3, 3)}, str(tmp_path / "vae.safetensors"))
  with pytest.raises(CheckpointError, match="missing key 'x_embedder.proj.weight'"):
    load_dit_checkpoint(str(tmp_path / "vae.safetensors"))
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(CheckpointError, match="unknown weight format"):
    load_dit_checkpoint(str(tmp_path / "notes.txt"))
  state = dict(official_torch_model.state_dict())
  state["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] = torch.ones(64)
  save_file(state, str(tmp_path / "untied.safetensors"))
  with pytest.raises(CheckpointError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"):
    load_dit_checkpoint(str(tmp_path / "untied.safetensors"))


def run_tool(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
                        capture_output=True, text=True)


def test_convert_tool_writes_a_restorable_jdit_checkpoint(official_torch_model, diffusers_dir, tmp_path):
  out = str(tmp_path / "converted")
  result = run_tool(f"--src={diffusers_dir}", f"--out={out}")
  assert result.returncode == 0, result.stderr
  model, params = load_dit_checkpoint(out)
  x, t, y = inputs()
  assert relative_error(jax_forward(model, params, x, t, y), torch_forward(official_torch_model, x, t, y)) <= 1e-5
  again = run_tool(f"--src={diffusers_dir}", f"--out={out}")
  assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_convert_tool_fails_cleanly_on_bad_input(tmp_path):
  out = tmp_path / "never"
  result = run_tool(f"--src={tmp_path / 'missing.pt'}", f"--out={out}")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
  assert not out.exists()
