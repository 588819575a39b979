"""The SD VAE port: parity with diffusers' AutoencoderKL (PyTorch CPU) on real photos, and both key layouts."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
skimage_data = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jdit.convert import CheckpointError  # noqa: E402
from jdit.convert.vae import load_vae  # noqa: E402
from jdit.models import vae as vae_lib  # noqa: E402

SD = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=256)


def photos(size=256) -> np.ndarray:
  """Real photos from skimage.data, center-cropped and resized to size x size, in [-1, 1] (NHWC)."""
  out = []
  for image in (skimage_data.astronaut(), skimage_data.coffee()):
    h, w, _ = image.shape
    s = min(h, w)
    crop = Image.fromarray(image[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2])
    out.append(np.asarray(crop.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1.0)
  return np.stack(out)


def make_torch_vae(seed=0, **overrides):
  """diffusers AutoencoderKL with the SD config and random non-zero weights (norm scales and biases too)."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**{**SD, **overrides}).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.copy_(0.05 * torch.randn_like(param))
      elif param.ndim == 1:  # GroupNorm scale
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
  return model


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
  model = make_torch_vae()
  path = str(tmp_path_factory.mktemp("sd_vae"))
  model.save_pretrained(path)
  return model, path


def test_encoder_and_decoder_match_diffusers_on_real_photos(sd_vae):
  """jdit in fp32 against diffusers evaluated in float64: PyTorch's own fp32 convolutions (oneDNN) drift
  ~6e-5 from float64 through the 30-odd random-weight layers, jdit's stay within ~3e-6."""
  torch_vae, path = sd_vae
  vae, params = load_vae(path)
  assert vae.block_out_channels == (128, 256, 512, 512) and vae.scaling_factor == 0.18215
  images = photos(128)
  reference = copy.deepcopy(torch_vae).double()
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).latent_dist
    ref_mean, ref_logvar = posterior.mean.numpy(), posterior.logvar.numpy()
    ref_decoded = reference.decode(posterior.mean[:1]).sample.numpy()  # the decoder is the costly half: one photo
  mean, logvar = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode))(jnp.asarray(images))
  assert relative_error(np.asarray(mean).transpose(0, 3, 1, 2), ref_mean) <= 1e-5
  assert relative_error(np.asarray(logvar).transpose(0, 3, 1, 2), ref_logvar) <= 1e-5
  decoded = jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode))(
      jnp.asarray(ref_mean[:1].transpose(0, 2, 3, 1), jnp.float32))
  assert relative_error(np.asarray(decoded).transpose(0, 3, 1, 2), ref_decoded) <= 1e-5


def to_ldm(state: dict, num_blocks=4) -> dict:
  """diffusers -> original latent-diffusion keys (first_stage_model.*), written independently of jdit."""
  out = {}
  for key, value in state.items():
    new = key
    for a, b in (("encoder.down_blocks.", "encoder.down."), (".resnets.", ".block."), (".downsamplers.0.conv.",
                 ".downsample.conv."), (".upsamplers.0.conv.", ".upsample.conv."), (".conv_shortcut.", ".nin_shortcut."),
                 ("conv_norm_out.", "norm_out."), ("mid_block.block.0.", "mid.block_1."),
                 ("mid_block.block.1.", "mid.block_2."), ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
                 ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
                 ("mid_block.attentions.0.to_", "mid.attn_1.")):
      new = new.replace(a, b)
    if new.startswith("decoder.up_blocks."):
      index, rest = new[len("decoder.up_blocks."):].split(".", 1)
      new = f"decoder.up.{num_blocks - 1 - int(index)}.{rest}"
    if ".attn_1." in new and new.endswith("weight") and value.ndim == 2 and "norm" not in new:
      value = value[:, :, None, None]  # 1x1 convs in the original
    out["first_stage_model." + new] = value.clone()
  out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4)  # the rest of an SD checkpoint
  return out


def test_original_layout_imports_to_identical_parameters(sd_vae, tmp_path):
  torch_vae, path = sd_vae
  _, reference = load_vae(path)
  ldm = to_ldm(torch_vae.state_dict())
  torch.save({"state_dict": ldm, "global_step": 1}, str(tmp_path / "sd.ckpt"))
  save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "sd.safetensors"))
  for name in ("sd.ckpt", "sd.safetensors"):
    vae, params = load_vae(str(tmp_path / name))
    assert vae.latent_channels == 4
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
      np.testing.assert_array_equal(a, b)


def test_bad_vae_files_name_the_key(tmp_path):
  save_file({"x_embedder.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "dit.safetensors"))
  with pytest.raises(CheckpointError, match="missing key 'encoder.conv_in.weight'"):
    load_vae(str(tmp_path / "dit.safetensors"))
  small = make_torch_vae(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
  state = dict(small.state_dict())
  state["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
  with pytest.raises(CheckpointError, match="decoder/conv_out/kernel: shape"):
    load_vae(str(tmp_path / "bad.safetensors"), norm_num_groups=8)


def test_sdxl_config_and_posterior_sampling():
  assert vae_lib.create_vae("sdxl").scaling_factor == 0.13025
  mean, logvar = jnp.zeros((2, 4, 4, 4)), jnp.full((2, 4, 4, 4), np.log(0.25))
  draws = vae_lib.sample_posterior(mean, logvar, jax.random.key(0))
  assert abs(float(draws.std()) - 0.5) < 0.1


def test_sd3_vae_has_16_channels_no_quant_convs_and_its_own_scaling(tmp_path):
  """An SD3-style VAE (16 latent channels, use_quant_conv=False) matches diffusers; the scaling and shift come
  from its config.json (1.5305, 0.0609), the one source of truth for (z - shift) * scale."""
  small = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=16,
               use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
  torch_vae = make_torch_vae(**small)
  torch_vae.save_pretrained(tmp_path)
  vae, params = load_vae(str(tmp_path), "sd3")
  assert (vae.latent_channels, vae.use_quant_conv, vae.scaling_factor, vae.shift_factor) == (16, False, 1.5305, 0.0609)
  assert "quant_conv" not in params and "post_quant_conv" not in params
  images = photos(32)
  with torch.no_grad():  # float64 reference, as above
    posterior = torch_vae.double().encode(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).latent_dist
    decoded = torch_vae.decode(posterior.mean).sample.numpy()
  mean, _ = vae.apply({"params": params}, jnp.asarray(images), method=vae.encode)
  assert relative_error(np.asarray(mean).transpose(0, 3, 1, 2), posterior.mean.numpy()) <= 1e-5
  latents = jnp.asarray(posterior.mean.numpy().transpose(0, 2, 3, 1), jnp.float32)
  ours = vae.apply({"params": params}, latents, method=vae.decode)
  assert relative_error(np.asarray(ours).transpose(0, 3, 1, 2), decoded) <= 1e-5
  z = np.asarray(mean)
  np.testing.assert_allclose(vae.scale_latents(z), (z - 0.0609) * 1.5305, rtol=1e-6)
  assert vae_lib.create_vae("flux").shift_factor == 0.1159
