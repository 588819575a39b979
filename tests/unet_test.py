"""The ADM U-Net family: parity with openai/guided-diffusion's UNetModel (PyTorch CPU, package guided_diffusion)
over its options, the official checkpoints' structure inferred from the tensors, the ImageNet presets, errors."""
import math
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import relative_error

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
  warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp decorators in guided_diffusion.nn
  gd_unet = pytest.importorskip("guided_diffusion.unet")
  gd_script = pytest.importorskip("guided_diffusion.script_util")

from jdit import flops  # noqa: E402
from jdit.convert import CheckpointError, load_checkpoint, load_unet_checkpoint  # noqa: E402
from jdit.convert import unet as unet_convert  # noqa: E402
from jdit.models import family, unet  # noqa: E402

# UNetModel options, each combination exercised once: AdaGN on/off, residual up/downsampling or Downsample /
# Upsample (learned or not), legacy / new attention order, heads by count or width, class-conditional or not,
# learned sigma or not, fractional channel_mult (as ADM-512), attention at several levels, a non-square input.
PARITY = {
    "adagn-updown-new_order-classes-sigma": (
        dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_classes=10,
             num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
             learn_sigma=True), (16, 16)),
    "plain-conv_resample-legacy-unconditional": (
        dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1, 2), num_heads=2,
             num_heads_upsample=1, learn_sigma=False), (16, 24)),
    "adagn-avgpool-legacy-classes-fractional": (
        dict(model_channels=64, channel_mult=(0.5, 1, 1), num_res_blocks=1, attention_resolutions=(4,), num_heads=4,
             use_scale_shift_norm=True, conv_resample=False, num_classes=5, learn_sigma=True), (16, 16)),
}
# guided-diffusion's README flags of the released ImageNet models (class_cond, learn_sigma, resblock_updown and
# use_scale_shift_norm True for all).
OFFICIAL_FLAGS = {
    "adm64": dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
                  num_head_channels=64, dropout=0.1, use_new_attention_order=True),
    "adm128": dict(image_size=128, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8", num_heads=4),
    "adm256": dict(image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
                   num_head_channels=64),
    "adm512": dict(image_size=512, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
                   num_head_channels=64),
}


def official_model(fields: dict):
  """guided-diffusion's UNetModel with jdit's field names; num_classes=0 means unconditional."""
  fields = dict(fields)
  learn_sigma, num_classes = fields.pop("learn_sigma"), fields.pop("num_classes", 0)
  return gd_unet.UNetModel(image_size=16, in_channels=3, out_channels=6 if learn_sigma else 3,
                           num_classes=num_classes or None, **fields)


def randomize_torch(module, seed: int):
  """Non-zero weights everywhere (the zero-initialized output convolutions included), fan-in scaled."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for param in module.parameters():
      fan_in = param[0].numel() if param.ndim > 1 else 1
      param.copy_((0.5 if param.ndim > 1 else 0.2) * torch.randn_like(param) / math.sqrt(fan_in))
  return module.eval()


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_guided_diffusion_unet_model(name, tmp_path):
  fields, (height, width) = PARITY[name]
  reference = randomize_torch(official_model(fields), seed=len(name))
  torch.save(reference.state_dict(), tmp_path / "unet.pt")
  heads = {k: fields[k] for k in ("num_heads", "num_head_channels", "num_heads_upsample") if k in fields}
  model, params = load_unet_checkpoint(str(tmp_path / "unet.pt"), use_new_attention_order=fields.get(
      "use_new_attention_order", False), **heads)
  for key in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "learn_sigma",
              "use_scale_shift_norm", "resblock_updown"):  # inferred from the tensors
    assert getattr(model, key) == fields.get(key, getattr(unet.UNet, key)), key
  assert model.num_classes == fields.get("num_classes", 0)

  rng = np.random.RandomState(0)
  x = rng.randn(3, 3, height, width).astype(np.float32)
  t = np.array([0.0, 417.0, 999.0], np.float32)
  y = np.array([0, 3, 4]) if model.num_classes else None
  with torch.no_grad():
    ref = reference(torch.from_numpy(x), torch.from_numpy(t), None if y is None else torch.from_numpy(y)).numpy()
  out = np.asarray(model.apply({"params": params}, x.transpose(0, 2, 3, 1), t, y)).transpose(0, 3, 1, 2)
  assert out.shape == ref.shape == (3, model.out_channels, height, width)
  assert np.abs(ref).max() > 0.1
  assert relative_error(out, ref) <= 1e-5


def shape_only(module) -> dict:
  """A state dict of zero-memory stand-ins with the module's tensor shapes (the module lives on the meta device)."""
  zero = np.zeros((), np.float32)
  return {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("preset", list(OFFICIAL_FLAGS))
def test_released_checkpoint_structure_is_inferred_and_matches_the_preset(preset):
  """The released models' state dicts (built by guided_diffusion.script_util from its README flags, on the meta
  device) load without overrides into the preset, with the official parameter count."""
  flags = dict(class_cond=True, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True,
               **OFFICIAL_FLAGS[preset])
  with torch.device("meta"):
    reference = gd_script.create_model(**flags)
  model, params = unet_convert.from_weights(shape_only(reference), {})
  assert family.model_config(model) == family.model_config(unet.create_unet(preset))
  count = sum(p.numel() for p in reference.parameters())
  assert flops.count_params(family.abstract_params(model)) == count


def test_official_layout_is_recognized_and_heads_are_required_off_preset(tmp_path):
  fields, _ = PARITY["plain-conv_resample-legacy-unconditional"]
  torch.save(randomize_torch(official_model(fields), 0).state_dict(), tmp_path / "unet.pt")
  with pytest.raises(CheckpointError, match="attention heads is not stored .* pass num_heads=... or "
                                            "num_head_channels=..."):
    load_unet_checkpoint(str(tmp_path / "unet.pt"))
  model, _ = load_checkpoint(str(tmp_path / "unet.pt"), num_heads=2)  # the family is recognized
  assert model.FAMILY == "unet" and model.num_res_blocks == 2
  with pytest.raises(CheckpointError, match="num_heads=3, .* must split 32 channels into heads"):
    load_unet_checkpoint(str(tmp_path / "unet.pt"), num_heads=3)
  with pytest.raises(CheckpointError, match="out_2/(kernel|bias): shape .* does not match"):
    load_unet_checkpoint(str(tmp_path / "unet.pt"), num_heads=2, learn_sigma=True)


def test_a_file_that_is_not_a_unet_gets_a_one_line_error_naming_the_key(tmp_path):
  torch.save({"x_embedder.proj.weight": torch.zeros(4, 4, 2, 2)}, tmp_path / "dit.pt")
  with pytest.raises(CheckpointError, match="missing key 'time_embed.0.weight': not a guided-diffusion UNetModel") \
      as info:
    load_unet_checkpoint(str(tmp_path / "dit.pt"))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="adm1024"), "unknown UNet variant 'adm1024'"),
    (dict(variant="tiny", model_channels=48), "must give multiples of 32 channels"),
    (dict(variant="tiny", num_head_channels=24), "must split 32 channels into heads"),
    (dict(variant="adm64", input_size=60), "input_size=60 must be a multiple of 8"),
    (dict(variant="tiny", remat="some"), "remat must be one of"),
])
def test_bad_configuration_gets_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    unet.create_unet(kwargs.pop("variant"), **kwargs)


def test_config_json_round_trip_and_bad_inputs():
  model = unet.create_unet("adm128")
  assert family.from_config(family.model_config(model)) == model
  tiny = unet.create_unet("tiny", num_classes=10, class_dropout_prob=0.1)
  params = nn.unbox(tiny.init(jax.random.key(0), *tiny.dummy_inputs())["params"])
  assert params["label_emb"]["embedding_table"]["embedding"].shape == (11, 128)  # + the null class
  x, t, y = tiny.dummy_inputs(2)
  with pytest.raises(ValueError, match="y \\(class labels\\) is required"):
    tiny.apply({"params": params}, x, t)
  with pytest.raises(ValueError, match="multiples of 2"):
    tiny.apply({"params": params}, np.zeros((2, 6, 5, 1)), t, y)
