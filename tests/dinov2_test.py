"""DINOv2 in Flax against transformers' Dinov2Model and Dinov2WithRegistersModel (small random configurations,
perturbed weights, written with save_pretrained): the native size, interpolated position embeddings (bicubic;
antialiased with registers) and the SwiGLU MLP of ViT-g."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import relative_error

from jdit.eval import dinov2
from jdit.state_dict import CheckpointError

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
             layerscale_value=0.5)


def reference(tmp_path, registers: int = 0, swiglu: bool = False):
  """A transformers model with every weight perturbed, saved to tmp_path; (model, directory)."""
  torch.manual_seed(0)
  if registers:
    model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **SMALL, num_register_tokens=registers))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, use_swiglu_ffn=swiglu))
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  model.eval().save_pretrained(tmp_path)
  return model, str(tmp_path)


@pytest.mark.parametrize("registers,swiglu,sizes", [(0, False, [(28, 28), (42, 56)]), (4, False, [(42, 42), (14, 21)]),
                                                    (0, True, [(28, 28)])])
def test_dinov2_matches_transformers(tmp_path, registers, swiglu, sizes):
  model, directory = reference(tmp_path, registers, swiglu)
  ours, params = dinov2.load_dinov2(directory)
  assert (ours.num_register_tokens, ours.use_swiglu_ffn, ours.num_heads) == (registers, swiglu, 4)
  apply = jax.jit(ours.apply)
  for height, width in sizes:  # native, then interpolated (up, and with registers down: the antialiased path)
    pixels = np.random.default_rng(height).standard_normal((2, height, width, 3)).astype(np.float32)
    got = apply({"params": params}, pixels)
    with torch.no_grad():
      expected = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert relative_error(np.asarray(got["last_hidden_state"]), expected.last_hidden_state.numpy()) < 1e-5
    assert relative_error(np.asarray(got["pooled"]), expected.pooler_output.numpy()) < 1e-5


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_resampling_is_pytorchs(antialias):
  grid = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
  for size in [(9, 4), (3, 11)]:
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid), size=size, mode="bicubic",
                                               align_corners=False, antialias=antialias).numpy()
    rows, cols = (dinov2.bicubic_matrix(6, n, antialias) for n in size)
    np.testing.assert_allclose(np.einsum("hi,wj,cij->chw", rows, cols, grid[0]), expected[0], atol=2e-6)


def test_a_file_that_is_not_dinov2_names_itself(tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / "model.safetensors")
  save_file({"vision_model.embeddings.patch_embedding.weight": np.zeros((4, 3, 2, 2), np.float32)}, path)
  with pytest.raises(CheckpointError, match=f"^{path}: no DINOv2 model"):
    dinov2.load_dinov2(path)


def test_evaluate_reports_fd_dinov2_of_transformers_features(tmp_path):
  from conftest import load_tool
  from jdit.eval import metrics
  model, directory = reference(tmp_path / "dinov2")
  rng = np.random.default_rng(0)
  batches = {name: rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8) for name in ("ref", "samples")}
  for name, images in batches.items():
    np.savez(tmp_path / f"{name}.npz", arr_0=images)
  paths = [str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")]
  assert load_tool("evaluate").main([*paths, f"--dinov2={directory}", "--batch_size=5"]) == 0
  reported = json.loads((tmp_path / "samples.eval.json").read_text())
  with torch.no_grad():
    features = {name: model(pixel_values=torch.from_numpy(dinov2.dinov2_preprocess(images)).permute(0, 3, 1, 2))
                .pooler_output.double().numpy() for name, images in batches.items()}
  expected = metrics.frechet_distance(metrics.statistics(features["samples"]), metrics.statistics(features["ref"]))
  assert reported["fd_dinov2"] == pytest.approx(expected, rel=1e-4) and reported["dinov2"] == directory
