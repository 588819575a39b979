"""Text encoders and tokenizers vs transformers (PyTorch CPU): CLIP (quick_gelu / gelu, projection, both pooling
conventions, OpenCLIP and single-file layouts), T5 v1.1 with a padded batch, bf16, sharding, full-size parameter
counts, tokenizer parity on awkward prompts, and the loaders' errors."""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from jdit.convert import CheckpointError
from jdit.text import CLIP_PRESETS, T5_PRESETS, CLIPTextEncoder, T5Encoder, load_text_encoder, load_tokenizer
from text_helpers import PROMPTS, clip_config, clip_ids, perturbed, t5_config, write_clip_vocab, write_spiece

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _assert_close(ours: dict, reference: dict, where=None):
  for key, want in reference.items():
    got = np.asarray(ours[key])
    if where is not None:
      got, want = got[where], want[where]
    assert relative_error(got, want) <= 1e-5, key


@pytest.mark.parametrize("act,eos_token_id,scan", [("quick_gelu", 2, True), ("gelu", 49407, False)])
def test_clip_matches_transformers(tmp_path, act, eos_token_id, scan):
  """CLIPTextModelWithProjection from a transformers directory: every output, with and without a padding mask;
  eos_token_id 2 pools at argmax(ids) (legacy configs), otherwise at the first end-of-text token."""
  reference = perturbed(transformers.CLIPTextModelWithProjection(clip_config(hidden_act=act,
                                                                             eos_token_id=eos_token_id)))
  reference.save_pretrained(tmp_path)
  encoder, params = load_text_encoder(str(tmp_path), scan_layers=scan)
  assert (encoder.hidden_act, encoder.eos_token_id, encoder.projection_dim) == (act, eos_token_id, 24)
  ids = clip_ids(3, 20, np.random.default_rng(0))
  mask = (np.cumsum(ids == 49407, axis=1) <= 1).astype(np.int64)  # tokens up to the first eos
  for attention_mask in (None, mask):
    with torch.no_grad():
      want = reference(torch.tensor(ids), attention_mask=None if attention_mask is None else torch.tensor(mask),
                       output_hidden_states=True)
    got = encoder.apply({"params": params}, jnp.asarray(ids), attention_mask)
    _assert_close(got, {"last_hidden_state": want.last_hidden_state.numpy(), "pooled": want.text_embeds.numpy(),
                        "penultimate_hidden_state": want.hidden_states[-2].numpy()})


def _openclip_state_dict(model, prefix: str) -> dict:
  """A transformers CLIP text tower rewritten in OpenCLIP's layout (fused in_proj, text_projection (D, P))."""
  sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
  out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
         "positional_embedding": sd["embeddings.position_embedding.weight"],
         "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
         "text_projection": sd["text_projection.weight"].T.contiguous()}
  for i in range(model.config.num_hidden_layers):
    src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for kind in ("weight", "bias"):
      out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
      for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                           ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[f"{dst}{ours}.{kind}"] = sd[f"{src}{theirs}.{kind}"]
  return {prefix + k: v for k, v in out.items()}


def test_clip_single_file_layouts(tmp_path):
  """Without config.json the architecture comes from the tensors (heads = width / 64, gelu beyond 768 wide): SD3's
  text_encoders/clip_g.safetensors (transformers keys) and an SDXL checkpoint's OpenCLIP tower match."""
  reference = perturbed(transformers.CLIPTextModelWithProjection(clip_config(
      hidden_size=128, num_attention_heads=2, hidden_act="gelu", num_hidden_layers=2)))
  ids = clip_ids(2, 12, np.random.default_rng(1))
  with torch.no_grad():
    want = reference(torch.tensor(ids), output_hidden_states=True)
  want = {"last_hidden_state": want.last_hidden_state.numpy(), "pooled": want.text_embeds.numpy(),
          "penultimate_hidden_state": want.hidden_states[-2].numpy()}
  (tmp_path / "text_encoders").mkdir()
  files = {"text_encoders/clip_g.safetensors": {k: v.contiguous() for k, v in reference.state_dict().items()},
           "sdxl.safetensors": _openclip_state_dict(reference, "conditioner.embedders.1.model.")}
  for name, state in files.items():
    safetensors_torch.save_file(state, str(tmp_path / name))
    encoder, params = load_text_encoder(str(tmp_path / name))
    assert (encoder.num_heads, encoder.hidden_act, encoder.num_layers) == (2, "gelu", 2), name
    _assert_close(encoder.apply({"params": params}, jnp.asarray(ids)), want)


def test_t5_matches_transformers(tmp_path):
  """T5EncoderModel (v1.1 gated-GELU) from pytorch_model.bin (weights_only) and an original ReLU T5 from
  safetensors on a padded batch with a mask (padded positions excluded); bf16 compute stays within 3% of fp32."""
  for name, config in (("v1_1", t5_config()), ("relu", t5_config(feed_forward_proj="relu", num_layers=2))):
    reference = perturbed(transformers.T5EncoderModel(config))
    directory = tmp_path / name
    reference.save_pretrained(directory)
    if name == "v1_1":  # the .bin layout
      os.remove(directory / "model.safetensors")
      torch.save(reference.state_dict(), directory / "pytorch_model.bin")
    ids = np.random.default_rng(2).integers(0, 160, (2, 40))
    mask = np.ones((2, 40), np.int64)
    mask[1, 25:] = 0
    with torch.no_grad():
      want = reference(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    encoder, params = load_text_encoder(str(directory))
    got = encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    _assert_close(got, {"last_hidden_state": want.last_hidden_state.numpy(),
                        "penultimate_hidden_state": want.hidden_states[-2].numpy()}, mask.astype(bool))
  low = encoder.clone(dtype="bfloat16").apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  low = low["last_hidden_state"]
  assert relative_error(np.asarray(low)[mask.astype(bool)], np.asarray(got["last_hidden_state"])[mask.astype(bool)]) \
      < 3e-2


def test_t5_position_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention

  from jdit.text.t5 import relative_position_buckets
  relative = torch.arange(512)[None, :] - torch.arange(512)[:, None]
  want = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(relative_position_buckets(512, 32, 128), want.numpy())


def test_full_size_parameter_counts():
  """transformers' counts: CLIP-L and bigG text towers with projection, T5-XXL encoder (shared embedding once)."""
  expected = {"clip-l": 123_650_304, "clip-g": 694_659_840, "t5-xxl": 4_762_310_656}
  encoders = {"clip-l": CLIPTextEncoder(**CLIP_PRESETS["clip-l"]), "clip-g": CLIPTextEncoder(**CLIP_PRESETS["clip-g"]),
              "t5-xxl": T5Encoder(**T5_PRESETS["t5-xxl"])}
  for name, encoder in encoders.items():
    shapes = jax.eval_shape(lambda e=encoder: e.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected[name], name
    out = jax.eval_shape(lambda v, e=encoder: e.apply(v, jnp.zeros((2, 77), jnp.int32)), shapes)
    assert out["last_hidden_state"].shape == out["penultimate_hidden_state"].shape == (2, 77, encoder.width)


def test_t5_sharded_over_fsdp_matches_unsharded():
  """Parameters split over an 8-way fsdp axis by their logical names give the same outputs."""
  from jdit import sharding
  from jdit.text.encode import make_apply, shard_params
  encoder = T5Encoder(**{**T5_PRESETS["t5-base"], "num_layers": 2, "d_model": 64, "d_ff": 128, "num_heads": 4,
                         "d_kv": 16, "vocab_size": 64})
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, (8, 16)))
  params = nn.unbox(jax.jit(encoder.init)(jax.random.PRNGKey(0), ids)["params"])
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  sharded = shard_params(encoder, params, mesh)
  kernel = sharded["layers"]["layer"]["wi_0"]["kernel"]  # (layers, embed, mlp): embed split 8 ways
  assert kernel.sharding.shard_shape(kernel.shape) == (2, 8, 128)
  want = encoder.apply({"params": params}, ids)["last_hidden_state"]
  got = make_apply(encoder, mesh)(sharded, ids, None)["last_hidden_state"]
  assert relative_error(got, want) <= 1e-5


def test_loader_errors(tmp_path):
  reference = transformers.T5EncoderModel(t5_config(num_layers=1))
  state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
  del state["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"]
  safetensors_torch.save_file(state, str(tmp_path / "t5.safetensors"))
  with pytest.raises(CheckpointError, match="encoder.block.0.layer.1.DenseReluDense.wi_1.weight: missing"):
    load_text_encoder(str(tmp_path / "t5.safetensors"))
  (tmp_path / "pipe" / "text_encoder_2").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="pass one of its text encoders: .*text_encoder_2"):
    load_text_encoder(str(tmp_path / "pipe"))
  safetensors_torch.save_file({"unet.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
  with pytest.raises(CheckpointError, match="neither a CLIP text tower"):
    load_text_encoder(str(tmp_path / "other.safetensors"))
  (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors file"):
    load_text_encoder(str(tmp_path / "bad.safetensors"))
  state["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"] = torch.zeros(96, 64)
  safetensors_torch.save_file(state, str(tmp_path / "ok.safetensors"))
  with pytest.raises(ValueError, match="unknown T5Encoder field"):
    load_text_encoder(str(tmp_path / "ok.safetensors"), hidden_size=3)
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="has vocab.json but lacks merges.txt"):
    load_tokenizer(str(tmp_path / "tok"))


@pytest.fixture(scope="module")
def clip_vocab_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("clip_vocab"))
  write_clip_vocab(directory)
  return directory


def _reference_ids(tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  out = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
  return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("pad", ["default", "config", "special_tokens_map", "tokenizer.json"])
def test_clip_tokenizer_matches_transformers(tmp_path, clip_vocab_dir, pad):
  """The real CLIP vocabulary on awkward prompts; CLIP-L pads with <|endoftext|>, SD3's CLIP-G with "!" (id 0),
  given by tokenizer_config.json or special_tokens_map.json; tokenizer.json alone works too."""
  import shutil
  directory = str(tmp_path / "tok")
  shutil.copytree(clip_vocab_dir, directory)
  if pad in ("config", "special_tokens_map"):
    name = "tokenizer_config.json" if pad == "config" else "special_tokens_map.json"
    with open(os.path.join(directory, name), "w") as f:
      json.dump({"pad_token": "!"}, f)
  reference = transformers.CLIPTokenizer.from_pretrained(directory)
  if pad == "tokenizer.json":
    directory = str(tmp_path / "json")
    reference.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
      if os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
  ids, mask = load_tokenizer(directory)(PROMPTS, max_length=77, return_attention_mask=True)
  want_ids, want_mask = _reference_ids(reference, 77)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert ids.dtype == np.int32 and ids[0, 2] == (0 if pad in ("config", "special_tokens_map") else 49407)


def test_t5_tokenizer_matches_transformers(tmp_path):
  """A trained SentencePiece unigram model, from spiece.model and from the tokenizer.json transformers writes."""
  write_spiece(str(tmp_path / "spm"))
  reference = transformers.T5Tokenizer.from_pretrained(str(tmp_path / "spm"))
  reference.save_pretrained(str(tmp_path / "json"))
  if os.path.exists(tmp_path / "json" / "spiece.model"):
    os.remove(tmp_path / "json" / "spiece.model")
  want_ids, want_mask = _reference_ids(reference, 32)
  for name in ("spm", "json"):
    ids, mask = load_tokenizer(str(tmp_path / name))(PROMPTS, max_length=32, return_attention_mask=True)
    np.testing.assert_array_equal(ids, want_ids, err_msg=name)
    np.testing.assert_array_equal(mask, want_mask, err_msg=name)
