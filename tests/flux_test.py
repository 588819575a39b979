"""Flux vs diffusers' FluxTransformer2DModel (PyTorch CPU): dev (guidance embedding) and schnell layouts,
non-square latents, batch > 1, scanned and unrolled blocks, a sharded transformer directory; Black Forest Labs'
single-file keys load to the same parameters; RoPE ids and the time-shift schedule equal FluxPipeline's; the
released presets' parameter counts; errors naming the key."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from jdit.convert import CheckpointError, load_checkpoint, load_flux_checkpoint, read_weights
from jdit.convert import flux as convert_flux
from jdit.diffusion import flow
from jdit.models import flux as flux_lib
from jdit.nn import posemb
from text_helpers import perturbed

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def _reference(guidance: bool):
  return perturbed(diffusers.FluxTransformer2DModel(**TINY, guidance_embeds=guidance))


def _inputs(batch: int = 2, height: int = 8, width: int = 12):
  rng = np.random.RandomState(0)
  return (rng.randn(batch, 4, height, width).astype(np.float32), np.array([250.0, 731.5][:batch], np.float32),
          rng.randn(batch, 7, 32).astype(np.float32), rng.randn(batch, 16).astype(np.float32),
          np.array([3.5, 1.25][:batch], np.float32))


def _diffusers_output(reference, x, t, context, pooled, guidance) -> np.ndarray:
  """FluxPipeline's call of the transformer: packed latents, ids, t / 1000, the guidance as users write it."""
  pipe = diffusers.FluxPipeline
  batch, channels, height, width = x.shape
  ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
  with torch.no_grad():
    out = reference(pipe._pack_latents(torch.tensor(x), batch, channels, height, width), torch.tensor(context),
                    torch.tensor(pooled), torch.tensor(t) / 1000, ids, torch.zeros(context.shape[1], 3),
                    None if guidance is None else torch.tensor(guidance)).sample
  return pipe._unpack_latents(out, height * 8, width * 8, 8).numpy()


def _jdit(model, params, x, t, context, pooled, guidance) -> np.ndarray:
  out = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                    jnp.asarray(context), jnp.asarray(pooled), None if guidance is None else jnp.asarray(guidance))
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("guidance,scan", [(True, True), (False, False)])
def test_matches_diffusers(tmp_path, guidance, scan):
  """dev from a sharded transformer directory inside a pipeline directory; schnell from a single file."""
  reference = _reference(guidance)
  if guidance:
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="60KB")
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    model, params = load_flux_checkpoint(str(tmp_path), scan_blocks=scan)
  else:
    safetensors_torch.save_file(reference.state_dict(), str(tmp_path / "schnell.safetensors"))
    with pytest.raises(CheckpointError, match="RoPE axis dims are not stored in the tensors .head_dim 16"):
      load_checkpoint(str(tmp_path / "schnell.safetensors"))
    model, params = load_checkpoint(str(tmp_path / "schnell.safetensors"), scan_blocks=scan,
                                    axes_dims_rope=(4, 6, 6))  # the family recognized from the tensors
  assert model.FAMILY == "flux" and model.guidance_embeds == guidance
  assert (model.depth, model.single_depth, model.in_channels, model.axes_dims_rope) == (2, 2, 4, (4, 6, 6))
  x, t, context, pooled, g = _inputs()
  g = g if guidance else None
  want = _diffusers_output(reference, x, t, context, pooled, g)
  assert relative_error(_jdit(model, params, x, t, context, pooled, g), want) <= 1e-5
  cond = {"context": jnp.asarray(context), "pooled": jnp.asarray(pooled)}
  if guidance:  # the conditioning contract: guidance from cond, else embedded_guidance
    got = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                      {**cond, "guidance": jnp.asarray(g)}, method="forward")
    assert relative_error(np.asarray(got).transpose(0, 3, 1, 2), want) <= 1e-5
    default = _diffusers_output(reference, x, t, context, pooled, np.full(2, 3.5, np.float32))
    got = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), cond,
                      method="forward")
    assert relative_error(np.asarray(got).transpose(0, 3, 1, 2), default) <= 1e-5


def _bfl_layout(state: dict) -> dict:
  """diffusers keys -> Black Forest Labs' single-file keys: the inverse of diffusers'
  convert_flux_transformer_checkpoint_to_diffusers (fused qkv and linear1, (shift, scale) final adaLN)."""
  swap = lambda a: torch.cat(a.chunk(2)[::-1])
  out = {}
  simple = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
            "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
            "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
            "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
            "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
            "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
  for theirs, ours in simple.items():
    for leaf in ("weight", "bias"):
      if f"{ours}.{leaf}" in state:
        out[f"{theirs}.{leaf}"] = state[f"{ours}.{leaf}"]
  for leaf in ("weight", "bias"):
    out[f"final_layer.adaLN_modulation.1.{leaf}"] = swap(state[f"norm_out.linear.{leaf}"])
  for i in range(TINY["num_layers"]):
    src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    for leaf in ("weight", "bias"):
      out[f"{dst}img_mod.lin.{leaf}"] = state[f"{src}norm1.linear.{leaf}"]
      out[f"{dst}txt_mod.lin.{leaf}"] = state[f"{src}norm1_context.linear.{leaf}"]
      out[f"{dst}img_attn.qkv.{leaf}"] = torch.cat([state[f"{src}attn.to_{n}.{leaf}"] for n in "qkv"])
      out[f"{dst}txt_attn.qkv.{leaf}"] = torch.cat([state[f"{src}attn.add_{n}_proj.{leaf}"] for n in "qkv"])
      out[f"{dst}img_attn.proj.{leaf}"] = state[f"{src}attn.to_out.0.{leaf}"]
      out[f"{dst}txt_attn.proj.{leaf}"] = state[f"{src}attn.to_add_out.{leaf}"]
      for stream, ff in (("img", "ff"), ("txt", "ff_context")):
        out[f"{dst}{stream}_mlp.0.{leaf}"] = state[f"{src}{ff}.net.0.proj.{leaf}"]
        out[f"{dst}{stream}_mlp.2.{leaf}"] = state[f"{src}{ff}.net.2.{leaf}"]
    for stream, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
      out[f"{dst}{stream}_attn.norm.query_norm.scale"] = state[f"{src}attn.{q}.weight"]
      out[f"{dst}{stream}_attn.norm.key_norm.scale"] = state[f"{src}attn.{k}.weight"]
  for i in range(TINY["num_single_layers"]):
    src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    for leaf in ("weight", "bias"):
      out[f"{dst}modulation.lin.{leaf}"] = state[f"{src}norm.linear.{leaf}"]
      out[f"{dst}linear1.{leaf}"] = torch.cat([state[f"{src}attn.to_{n}.{leaf}"] for n in "qkv"]
                                              + [state[f"{src}proj_mlp.{leaf}"]])
      out[f"{dst}linear2.{leaf}"] = state[f"{src}proj_out.{leaf}"]
    out[f"{dst}norm.query_norm.scale"] = state[f"{src}attn.norm_q.weight"]
    out[f"{dst}norm.key_norm.scale"] = state[f"{src}attn.norm_k.weight"]
  return {k: v.contiguous() for k, v in out.items()}


def test_bfl_single_file_loads_to_the_diffusers_parameters(tmp_path):
  """A flux1-dev-style single file (plain, and under model.diffusion_model. beside a VAE tensor) gives parameters
  identical to the diffusers directory's; a missing tensor and a non-Flux file are named."""
  reference = _reference(True)
  reference.save_pretrained(tmp_path / "diffusers")
  model, params = convert_flux.from_weights(*read_weights(str(tmp_path / "diffusers")))
  state = _bfl_layout(reference.state_dict())
  safetensors_torch.save_file(state, str(tmp_path / "flux1-tiny.safetensors"))
  prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()}
  prefixed["vae.decoder.conv_in.weight"] = torch.zeros(2, 2)
  safetensors_torch.save_file(prefixed, str(tmp_path / "all_in_one.safetensors"))
  for name in ("flux1-tiny.safetensors", "all_in_one.safetensors"):
    single, single_params = load_flux_checkpoint(str(tmp_path / name), axes_dims_rope=(4, 6, 6))
    assert single == model
    jax.tree.map(np.testing.assert_array_equal, single_params, params)

  del state["single_blocks.1.norm.key_norm.scale"]
  safetensors_torch.save_file(state, str(tmp_path / "broken.safetensors"))
  with pytest.raises(CheckpointError, match="single_blocks.1.norm.key_norm.scale: missing"):
    load_flux_checkpoint(str(tmp_path / "broken.safetensors"), axes_dims_rope=(4, 6, 6))
  safetensors_torch.save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))
  with pytest.raises(CheckpointError, match=r"vae.safetensors: x_embedder.weight: missing"):
    load_flux_checkpoint(str(tmp_path / "vae.safetensors"))


@pytest.mark.parametrize("grid", [(2, 3), (8, 8), (5, 16)])
def test_rope_ids_and_time_shift_match_flux_pipeline(grid):
  """Image ids and the 3-axis RoPE table equal diffusers' (FluxPipeline ids, FluxPosEmbed), and the sampling
  times FlowMatchEulerDiscreteScheduler's with FluxPipeline's mu, for three latent grids."""
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift
  grid_h, grid_w = grid
  ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, grid_h, grid_w, "cpu", torch.float32).numpy()
  ours = flux_lib.position_ids(7, grid_h, grid_w)
  np.testing.assert_array_equal(ours[7:], ids)
  np.testing.assert_array_equal(ours[:7], 0)
  cos, sin = FluxPosEmbed(10000, [16, 56, 56])(torch.tensor(ours))
  got_cos, got_sin = posemb.rope_axes((16, 56, 56), ours)
  np.testing.assert_allclose(np.repeat(got_cos, 2, axis=1), cos.numpy(), atol=1e-6)  # theirs: each pair twice
  np.testing.assert_allclose(np.repeat(got_sin, 2, axis=1), sin.numpy(), atol=1e-6)

  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
  tokens, steps = grid_h * grid_w * 64, 28  # the grid at 8x the side
  mu = calculate_shift(tokens)
  assert flow.flux_mu(tokens) == pytest.approx(mu, rel=1e-12)
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
  np.testing.assert_allclose(flow.sampling_times(steps, schedule="flux", image_tokens=tokens),
                             scheduler.sigmas.numpy(), atol=1e-6)


def test_released_presets_match_diffusers_parameter_counts():
  """flux-dev and flux-schnell against diffusers' models built on the meta device (no memory)."""
  for name, guidance in (("flux-dev", True), ("flux-schnell", False)):
    with torch.device("meta"):
      reference = diffusers.FluxTransformer2DModel(guidance_embeds=guidance)
    model = flux_lib.create_flux(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == \
        sum(p.numel() for p in reference.parameters()), name


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="axes_dims_rope must be 3 even dims summing to head_dim=16"):
    flux_lib.create_flux("tiny", axes_dims_rope=(4, 4, 4))
  model = flux_lib.create_flux("tiny")
  x, t, context, pooled, _, _ = model.dummy_inputs()
  with pytest.raises(ValueError, match="guidance .B,. must be given exactly when guidance_embeds=True"):
    jax.eval_shape(model.init, jax.random.key(0), x, t, context, pooled, None)
