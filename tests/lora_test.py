"""LoRA (jdit.lora) against diffusers + PEFT: adapters that diffusers trains on small random SD3 and Flux
transformers (add_adapter, save_lora_weights) merge in jdit to the outputs diffusers gives with them active, at
scales 1 and 0.5; jdit's own files load in diffusers to the same outputs, and kohya-layout files merge to them
too; the unmerged forward equals the merged one for every family, scanned or not; tools/lora.py."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize, relative_error
from flux_test import TINY as FLUX_TINY, _diffusers_output, _inputs
from mmdit_test import LAYOUTS, TINY as SD3_TINY

from jdit import lora
from jdit.convert import CheckpointError, load_checkpoint
from jdit.models import family

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = {"flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "proj_mlp", "proj_out", "ff.net.0.proj", "ff_context.net.2", "norm_out.linear"],
           "mmdit": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.2",
                     "norm1_context.linear", "norm_out.linear"]}  # (adaLN: rows swapped in kohya's layout)


def _reference(name: str, tmp_path):
  """A diffusers transformer with a rank-4 PEFT adapter (alpha 8, B perturbed off zero); its base weights saved
  to tmp_path/base, the adapter as diffusers saves it to tmp_path/adapter."""
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  from text_helpers import perturbed
  if name == "flux":
    net, pipe = perturbed(diffusers.FluxTransformer2DModel(**FLUX_TINY, guidance_embeds=True)), diffusers.FluxPipeline
  else:
    net = perturbed(diffusers.SD3Transformer2DModel(**SD3_TINY, **LAYOUTS["sd3.5"]))
    pipe = diffusers.StableDiffusion3Pipeline
  net.save_pretrained(tmp_path / "base")
  net.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS[name]))
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for key, p in net.named_parameters():
      if "lora_" in key:
        p.add_(torch.randn(p.shape, generator=generator) * 0.1)
  pipe.save_lora_weights(tmp_path / "adapter", transformer_lora_layers=get_peft_model_state_dict(net),
                         transformer_lora_adapter_metadata=net.peft_config["default"].to_dict())  # alpha
  return net


def _diffusers(name, net, x, t, context, pooled, guidance):
  if name == "flux":
    return _diffusers_output(net, x, t, context, pooled, guidance)
  with torch.no_grad():
    return net(torch.tensor(x), torch.tensor(context), torch.tensor(pooled), torch.tensor(t)).sample.numpy()


def _jdit(name, model, params, x, t, context, pooled, guidance):
  args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context), jnp.asarray(pooled))
  if name == "flux":
    args += (jnp.asarray(guidance),)
  return np.asarray(model.apply({"params": params}, *args)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["flux", "mmdit"])
def test_peft_adapters_merge_to_diffusers_outputs_and_jdit_files_load_in_diffusers(name, tmp_path):
  net = _reference(name, tmp_path)
  x, t, context, pooled, guidance = _inputs()
  overrides = {"axes_dims_rope": (4, 6, 6)} if name == "flux" else {}
  model, base = load_checkpoint(str(tmp_path / "base"), name, **overrides)
  adapter = str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
  for scale in (1.0, 0.5):
    net.set_adapters("default", scale)
    want = _diffusers(name, net, x, t, context, pooled, guidance)
    got = _jdit(name, model, lora.load_lora(model, base, adapter, scale), x, t, context, pooled, guidance)
    assert relative_error(got, want) <= 1e-5, scale
  net.set_adapters("default", 1.0)
  want = _diffusers(name, net, x, t, context, pooled, guidance)
  without = _jdit(name, model, base, x, t, context, pooled, guidance)
  assert relative_error(without, want) > 1e-2  # the adapter changes the output

  # jdit's file of the same adapters (read back into jdit's layout) loads in diffusers as its own
  adapters, alpha = lora.read_lora(model, adapter)
  spec = lora.Spec(4, alpha, ("unused",))
  lora.save_lora(model, family.to_layout(jax.tree.map(jnp.asarray, adapters), model),
                 str(tmp_path / "jdit" / "adapter.safetensors"), spec)
  fresh = type(net).from_pretrained(tmp_path / "base")
  fresh.load_lora_adapter(str(tmp_path / "jdit"), weight_name="adapter.safetensors", prefix="transformer")
  assert relative_error(_diffusers(name, fresh, x, t, context, pooled, guidance), want) <= 1e-5


@pytest.mark.parametrize("name", family.FAMILIES)
def test_unmerged_forward_equals_merged_for_every_family(name):
  """The low-rank branch x W + (x A) B s in the step equals the merged kernel W + A B s to fp32 rounding."""
  model = family.create(dict(family.default_config(name), **family.tiny(name)))
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs(2))["params"])
  spec = lora.spec_for(model, rank=2, alpha=3.0)
  adapters = lora.init(model, params, spec, jax.random.key(1))
  adapters = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), adapters)
  batch = model.dummy_batch(2)
  x = jax.random.normal(jax.random.key(3), batch["image"].shape)
  t, cond = jnp.full((2,), 300.0), model.condition(batch)
  unmerged = lora.apply(model, params, adapters, spec, x, t, cond)
  merged = family.apply(model, lora.merge(params, adapters, spec.scale), x, t, cond)
  base = family.apply(model, params, x, t, cond)
  assert relative_error(unmerged, merged) <= 1e-5 and relative_error(unmerged, base) > 1e-3


def test_a_file_for_another_model_is_named(tmp_path):
  from safetensors.numpy import save_file
  model = family.create(dict(family.default_config("flux"), **family.tiny("flux")))
  params = family.abstract_params(model)
  save_file({"transformer.down_blocks.0.attn.to_q.lora_A.weight": np.zeros((4, 32), np.float32),
             "transformer.down_blocks.0.attn.to_q.lora_B.weight": np.zeros((32, 4), np.float32)},
            str(tmp_path / "unet.safetensors"))
  with pytest.raises(CheckpointError, match="transformer.down_blocks.0.attn.to_q.lora_A.weight: no module"):
    lora.load_lora(model, params, str(tmp_path / "unet.safetensors"))


def test_lora_tool_info_merge_and_extract(tmp_path, capsys):
  """tools/lora.py on a tiny DiT (jdit's own module paths): info names the targets and rank; merge writes a
  checkpoint holding load_lora's merged weights; extract recovers a rank-2 difference exactly (SVD)."""
  from conftest import load_tool
  from jdit import checkpoint
  model = family.create(dict(family.default_config("dit"), **family.tiny("dit")))
  base = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  checkpoint.save_pretrained(str(tmp_path / "base"), model, base)
  spec = lora.spec_for(model, rank=2, alpha=4.0)
  adapters = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape),
                          lora.init(model, base, spec, jax.random.key(2)))
  lora.save_lora(model, adapters, str(tmp_path / "adapter.safetensors"), spec)
  tool = load_tool("lora")
  assert tool.main(["info", str(tmp_path / "adapter.safetensors")]) == 0
  info = json.loads(capsys.readouterr().out)
  assert (info["rank"], info["alpha"], info["modules"]) == (2, 4.0, 8)  # 2 blocks x qkv, proj, fc1, fc2
  assert info["targets"] == ["blocks_N/attn/proj", "blocks_N/attn/qkv", "blocks_N/mlp/fc1", "blocks_N/mlp/fc2"]

  assert tool.main(["merge", f"--base={tmp_path / 'base'}", f"--lora={tmp_path / 'adapter.safetensors'}:0.5",
                    f"--out={tmp_path / 'merged'}"]) == 0
  want = lora.load_lora(model, base, str(tmp_path / "adapter.safetensors"), 0.5)
  _, merged = load_checkpoint(str(tmp_path / "merged"))
  jax.tree.map(np.testing.assert_array_equal, merged, want)

  assert tool.main(["extract", f"--base={tmp_path / 'base'}", f"--tuned={tmp_path / 'merged'}", "--rank=2",
                    f"--out={tmp_path / 'extracted.safetensors'}"]) == 0
  again = lora.load_lora(model, base, str(tmp_path / "extracted.safetensors"))
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), again, want))) < 1e-5
  assert tool.main(["merge", f"--base={tmp_path / 'base'}", "--lora=missing.safetensors",
                    f"--out={tmp_path / 'other'}"]) == 2
  assert "missing.safetensors: no such file" in capsys.readouterr().err


def _kohya_layout(model, name: str, peft_tensors: dict) -> dict:
  """PEFT tensors -> kohya / sd-scripts' layout (the inverse of diffusers' kohya converter): lora_unet_ + the
  original module names, fused q/k/v (and Flux's linear1) with block-diagonal up weights, an alpha per module."""
  from jdit import convert
  kohya = {}
  for module, parts in convert.converter(name).kohya_modules(model).items():
    pairs = [(peft_tensors.get(f"transformer.{entry[0]}.lora_A.weight"), entry[1], entry[0]) for entry in parts]
    swap = len(parts[0]) == 3  # (scale, shift) rows -> Stability's and BFL's (shift, scale)
    if all(a is None for a, _, _ in pairs):
      continue
    down = np.concatenate([a if a is not None else np.zeros((4, model.hidden_size), np.float32) for a, _, _ in pairs])
    up = np.zeros((sum(rows for _, rows, _ in pairs), down.shape[0]), np.float32)
    row = 0
    for i, (a, rows, part) in enumerate(pairs):
      if a is not None:
        b = peft_tensors[f"transformer.{part}.lora_B.weight"]
        up[row:row + rows, 4 * i:4 * i + 4] = np.concatenate(np.split(b, 2)[::-1]) if swap else b
      row += rows
    kohya.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                  f"{module}.alpha": np.array(down.shape[0] * 2.0, np.float32)})  # PEFT's alpha / rank = 2
  return kohya


@pytest.mark.parametrize("name", ["flux", "mmdit"])
def test_a_kohya_file_merges_to_the_same_outputs(name, tmp_path):
  """The PEFT adapter in kohya / sd-scripts' layout merges to diffusers' outputs with the PEFT adapter active."""
  from safetensors import safe_open
  from safetensors.numpy import save_file
  net = _reference(name, tmp_path)
  x, t, context, pooled, guidance = _inputs()
  model, base = load_checkpoint(str(tmp_path / "base"), name, **({"axes_dims_rope": (4, 6, 6)} if name == "flux"
                                                                  else {}))
  with safe_open(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"), "np") as f:
    kohya = _kohya_layout(model, name, {k: f.get_tensor(k) for k in f.keys()})
  save_file(kohya, str(tmp_path / "kohya.safetensors"))
  got = _jdit(name, model, lora.load_lora(model, base, str(tmp_path / "kohya.safetensors")), x, t, context, pooled,
              guidance)
  assert relative_error(got, _diffusers(name, net, x, t, context, pooled, guidance)) <= 1e-5
  save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": np.zeros((4, 32), np.float32),
             "lora_unet_down_blocks_0_attn.lora_up.weight": np.zeros((32, 4), np.float32)},
            str(tmp_path / "sdxl.safetensors"))
  with pytest.raises(CheckpointError, match="lora_unet_down_blocks_0_attn.lora_down.weight: no module"):
    lora.load_lora(model, base, str(tmp_path / "sdxl.safetensors"))
