"""MM-DiT vs diffusers' SD3Transformer2DModel (PyTorch CPU): the SD3 and SD3.5 layouts (RMS qk-norm, dual
attention), non-square latents, batch > 1, scanned and unrolled blocks; Stability's single-file keys load to the
same parameters; the released presets' parameter counts; errors naming the key."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from jdit.convert import CheckpointError, load_mmdit_checkpoint, read_weights
from jdit.convert import mmdit as convert_mmdit
from jdit.nn import posemb
from jdit.models.mmdit import PRESETS, create_mmdit
from text_helpers import perturbed

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=16)
LAYOUTS = {"sd3": {}, "sd3.5": dict(dual_attention_layers=(0, 1), qk_norm="rms_norm")}


def _inputs(batch: int = 2, height: int = 8, width: int = 12):
  rng = np.random.RandomState(0)
  return (rng.randn(batch, 4, height, width).astype(np.float32), np.array([250.0, 731.5][:batch], np.float32),
          rng.randn(batch, 7, 32).astype(np.float32), rng.randn(batch, 16).astype(np.float32))


def _jdit(model, params, x, t, context, pooled) -> np.ndarray:
  out = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
                    jnp.asarray(pooled))
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("layout,scan", [("sd3", True), ("sd3.5", False)])
def test_matches_diffusers(tmp_path, layout, scan):
  """sd3 from a transformer directory; sd3.5 from a pipeline directory through load_mmdit_checkpoint; bfloat16
  within its rounding."""
  reference = perturbed(diffusers.SD3Transformer2DModel(**TINY, **LAYOUTS[layout]))
  if layout == "sd3":
    reference.save_pretrained(tmp_path)
    model, params = convert_mmdit.from_weights(*read_weights(str(tmp_path)), scan_blocks=scan)
  else:
    reference.save_pretrained(tmp_path / "transformer")
    model, params = load_mmdit_checkpoint(str(tmp_path), scan_blocks=scan)
  assert (model.qk_norm, model.dual_attention_layers) == ((False, ()) if layout == "sd3" else (True, (0, 1)))
  x, t, context, pooled = _inputs()
  with torch.no_grad():
    want = reference(torch.tensor(x), torch.tensor(context), torch.tensor(pooled), torch.tensor(t)).sample.numpy()
  assert relative_error(_jdit(model, params, x, t, context, pooled), want) <= 1e-5
  bf16 = _jdit(model.clone(dtype="bfloat16"), params, x, t, context, pooled)  # the scanned streams stay one dtype
  assert relative_error(bf16, want) <= 0.03, relative_error(bf16, want)


def _original_layout(state: dict, depth: int) -> dict:
  """diffusers keys -> Stability's single-file keys (fused qkv; the final and last context adaLN as (shift,
  scale)), under model.diffusion_model."""
  swap = lambda a: torch.cat(a.chunk(2)[::-1])
  out = {"pos_embed": state["pos_embed.pos_embed"]}
  for theirs, ours in (("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
                       ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                       ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                       ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                       ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                       ("final_layer.linear", "proj_out")):
    for leaf in ("weight", "bias"):
      out[f"{theirs}.{leaf}"] = state[f"{ours}.{leaf}"]
  for leaf in ("weight", "bias"):
    out[f"final_layer.adaLN_modulation.1.{leaf}"] = swap(state[f"norm_out.linear.{leaf}"])
  for i in range(depth):
    src, dst, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == depth - 1
    streams = [("x_block.attn", "attn", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k")),
               ("context_block.attn", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                ("norm_added_q", "norm_added_k"))]
    if f"{src}attn2.to_q.weight" in state:
      streams.append(("x_block.attn2", "attn2", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k")))
    for theirs, module, qkv, proj, norms in streams:
      for leaf in ("weight", "bias"):
        out[f"{dst}{theirs}.qkv.{leaf}"] = torch.cat([state[f"{src}{module}.{n}.{leaf}"] for n in qkv])
        if f"{src}{module}.{proj}.{leaf}" in state:
          out[f"{dst}{theirs}.proj.{leaf}"] = state[f"{src}{module}.{proj}.{leaf}"]
      for name, ln in zip(norms, ("ln_q", "ln_k")):
        if f"{src}{module}.{name}.weight" in state:
          out[f"{dst}{theirs}.{ln}.weight"] = state[f"{src}{module}.{name}.weight"]
    for leaf in ("weight", "bias"):
      out[f"{dst}x_block.adaLN_modulation.1.{leaf}"] = state[f"{src}norm1.linear.{leaf}"]
      context = state[f"{src}norm1_context.linear.{leaf}"]
      out[f"{dst}context_block.adaLN_modulation.1.{leaf}"] = swap(context) if last else context
      for stream, ff in (("x_block", "ff"), ("context_block", "ff_context")):
        if f"{src}{ff}.net.0.proj.{leaf}" in state:
          out[f"{dst}{stream}.mlp.fc1.{leaf}"] = state[f"{src}{ff}.net.0.proj.{leaf}"]
          out[f"{dst}{stream}.mlp.fc2.{leaf}"] = state[f"{src}{ff}.net.2.{leaf}"]
  return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def test_original_single_file_loads_to_the_diffusers_parameters(tmp_path):
  """SD3.5 layout in Stability's single-file keys (with an unrelated VAE tensor beside them, as in the released
  all-in-one files) gives the same parameters and output; a missing tensor and a wrong sample size are named."""
  reference = perturbed(diffusers.SD3Transformer2DModel(**TINY, **LAYOUTS["sd3.5"]))
  reference.save_pretrained(tmp_path / "diffusers")
  model, params = convert_mmdit.from_weights(*read_weights(str(tmp_path / "diffusers")))
  state = _original_layout(reference.state_dict(), TINY["num_layers"])
  state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
  safetensors_torch.save_file(state, str(tmp_path / "sd3.5_tiny.safetensors"))
  single, single_params = convert_mmdit.from_weights(*read_weights(str(tmp_path / "sd3.5_tiny.safetensors")),
                                                     input_size=8)
  assert single == model
  jax.tree.map(np.testing.assert_array_equal, single_params, params)

  with pytest.raises(CheckpointError, match="pos_embed.pos_embed: the stored sin-cos table differs"):
    convert_mmdit.from_weights(*read_weights(str(tmp_path / "sd3.5_tiny.safetensors")))  # default 128
  del state["model.diffusion_model.joint_blocks.1.x_block.attn2.ln_k.weight"]
  safetensors_torch.save_file(state, str(tmp_path / "broken.safetensors"))
  with pytest.raises(CheckpointError, match="transformer_blocks_1/attn2/norm_k/scale"):
    convert_mmdit.from_weights(*read_weights(str(tmp_path / "broken.safetensors")), input_size=8)


def test_cropped_table_equals_diffusers_patch_embed():
  """The SD3 table: positions index / (max / base), centre crop, on a non-square grid."""
  from diffusers.models.embeddings import PatchEmbed
  embed = PatchEmbed(height=128, width=128, patch_size=2, in_channels=4, embed_dim=64, pos_embed_max_size=96)
  want = embed.cropped_pos_embed(40 * 2, 70 * 2)[0].numpy()
  np.testing.assert_allclose(posemb.cropped_sincos_2d(64, 40, 70, 96, 64), want, atol=1e-6)


def test_released_presets_match_diffusers_parameter_counts():
  """sd3-medium, sd3.5-medium and sd3.5-large against diffusers' models built on the meta device (no memory),
  less diffusers' stored sin-cos buffer, which jdit computes."""
  configs = {"sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                pos_embed_max_size=192),
             "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                  pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
             "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                 pos_embed_max_size=192, qk_norm="rms_norm")}
  for name, fields in configs.items():
    with torch.device("meta"):
      reference = diffusers.SD3Transformer2DModel(sample_size=128, **fields)
    want = sum(p.numel() for p in reference.parameters())
    model = create_mmdit(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == want, name
  assert set(PRESETS) >= set(configs)


def test_sd3_schedule_and_one_guided_step_match_diffusers(tmp_path):
  """flow_schedule="sd3" gives FlowMatchEulerDiscreteScheduler's sigmas (shift 3, 28 steps), and one guided Euler
  step of the jdit sampler equals the SD3 pipeline's: transformer on [negative; positive], guidance
  uncond + g (text - uncond), then scheduler.step, on the same weights and inputs."""
  from diffusers import FlowMatchEulerDiscreteScheduler

  from jdit.diffusion import flow, guidance, samplers
  from jdit.models import family
  scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
  scheduler.set_timesteps(28)
  times = flow.sampling_times(28, 3.0, "sd3")
  np.testing.assert_allclose(times, scheduler.sigmas.numpy(), atol=1e-6)

  reference = perturbed(diffusers.SD3Transformer2DModel(**TINY))
  reference.save_pretrained(tmp_path)
  model, params = convert_mmdit.from_weights(*read_weights(str(tmp_path)))
  x, _, context, pooled = _inputs(batch=1)
  rng = np.random.RandomState(5)
  negative, negative_pooled = rng.randn(*context.shape).astype(np.float32), rng.randn(*pooled.shape).astype(np.float32)
  step, scale = 10, 7.0
  scheduler.set_begin_index(step)
  t = scheduler.timesteps[step]
  with torch.no_grad():
    out = reference(torch.tensor(x).repeat(2, 1, 1, 1), torch.tensor(np.concatenate([negative, context])),
                    torch.tensor(np.concatenate([negative_pooled, pooled])), t.expand(2)).sample
    uncond, text = out.chunk(2)
    want = scheduler.step(uncond + scale * (text - uncond), t, torch.tensor(x)).prev_sample.numpy()
  cond = {"context": context, "pooled": pooled, "null_context": negative, "null_pooled": negative_pooled}
  apply = lambda x, t, c: family.apply(model, params, x, t, c)
  guided = guidance.classifier_free_guidance(apply, cond, model.null_condition(cond), scale, mode="all")
  got = samplers.euler_sample(guided, jnp.asarray(x.transpose(0, 2, 3, 1)), times[step:step + 2])
  assert relative_error(np.asarray(got).transpose(0, 3, 1, 2), want) <= 1e-5
