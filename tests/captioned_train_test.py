"""Text-to-image training data end to end: a captioned folder -> records -> SD3-style latents (a tiny 16-channel
VAE without quant convs) with their dataset index -> CLIP + T5 text caches -> data.source="captioned" joins them
by index (SD3's combination rule, caption dropout) -> a tiny MM-DiT trains and samples a grid of training
captions; mismatched widths and uncaptioned data get one-line errors."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jdit import config as config_lib
from jdit import train
from jdit.convert.vae import load_vae
from jdit.data import sources, writers
from jdit.data.folder import open_folder
from jdit.models import family
from jdit.data import text_cache as cache
from jdit.data import captioned as captioned_lib
from jdit.text.encode import TextEncoderSpec
from text_helpers import clip_config, perturbed, t5_config, write_clip_vocab, write_spiece

pytestmark = pytest.mark.xdist_group("captioned_train")  # one worker trains the shared workdir once

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
  """Records, latent cache and text cache of 12 captioned 16x16 images (one unreadable file is skipped, so
  latent and text shards do not line up by position: the join must go by index)."""
  root = tmp_path_factory.mktemp("captioned")
  (root / "images").mkdir()
  with open(root / "images" / "metadata.jsonl", "w") as f:
    for i in range(12):
      color = list(COLORS)[i % 4]
      Image.fromarray(np.tile(np.array(COLORS[color], np.uint8), (16, 16, 1))).save(root / "images" / f"{i}.png")
      f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {color} square number {i}"}) + "\n")
  writers.convert_folder(str(root / "images"), str(root / "records"), num_shards=2, log=lambda _: None)
  records = open_folder(str(root / "records"), "train")

  vae = diffusers.AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=16,
                                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                                shift_factor=0.0609)
  vae.save_pretrained(root / "vae")
  flax_vae, vae_params = load_vae(str(root / "vae"), "sd3")
  encode = jax.jit(lambda x: flax_vae.apply({"params": vae_params}, x, method=flax_vae.encode))
  skip = records[5]["caption"]  # this record's image is made unreadable, as a corrupt file would be
  source = [dict(r, image=b"not an image") if r["caption"] == skip else r for r in (records[i] for i in
                                                                                   range(len(records)))]
  writers.extract_latents(source, encode, str(root / "latents"), image_size=16, scaling_factor=1.5305,
                          shift_factor=0.0609, num_shards=3, batch_size=4, log=lambda _: None)

  perturbed(transformers.CLIPTextModelWithProjection(clip_config(hidden_size=32, intermediate_size=48,
                                                                 num_hidden_layers=1, num_attention_heads=2,
                                                                 projection_dim=16))).save_pretrained(root / "clip")
  write_clip_vocab(str(root / "clip"))
  perturbed(transformers.T5EncoderModel(t5_config(d_model=32, d_kv=8, d_ff=48, num_layers=1)),
            seed=1).save_pretrained(root / "t5")
  write_spiece(str(root / "t5"))
  specs = [TextEncoderSpec.load("clip_l", str(root / "clip"), str(root / "clip")),
           TextEncoderSpec.load("t5", str(root / "t5"), str(root / "t5"), max_length=16)]
  cache.encode_captions(records, specs, str(root / "text"), num_shards=2, batch_size=8, dtype="float32",
                        log=lambda _: None)
  return root, records, specs


def _config(root, **model):
  c = config_lib.base("mmdit")
  c.model.update({**dict(variant="tiny", input_size=8, in_channels=16, out_channels=16, joint_attention_dim=32,
                        pooled_projection_dim=16, text_length=93), **model})
  c.data.update(dict(source="captioned", data_dir=str(root / "latents"), text_dir=str(root / "text"),
                     image_size=16, channels=3, caption_dropout_prob=0.25))
  c.vae.update(dict(path=str(root / "vae"), name="sd3"))
  c.diffusion.update(dict(sampling_steps=3))
  c.update(dict(batch_size=8, num_train_steps=4, log_every=2, checkpoint_every=4, sample_every=4))
  c.sample.update(dict(per_device_batch=1))
  return c


def test_captioned_source_joins_latents_and_text_by_index(caches):
  root, records, specs = caches
  config = _config(root)
  source = sources.open_source(config.data)
  assert len(source) == 11  # the unreadable image is skipped; the text cache still holds all 12 captions
  assert captioned_lib.text_shape(source.meta["text"]["encoders"]) == (77 + 16, 32, 16)
  by_caption = {records[i]["caption"]: i for i in range(len(records))}
  for i in range(len(source)):
    element = source[i]
    caption = records[element["index"]]["caption"]
    want = {f"{s.name}.{k}": v[0] for s in specs for k, v in s.encode([caption]).items()}
    assert by_caption[caption] == element["index"]
    for key, value in want.items():  # the cache was encoded in batches: equal to rounding (another caption: O(1))
      np.testing.assert_allclose(element[key], value, rtol=1e-5, atol=1e-5)
  context, pooled = captioned_lib.combine(source[0], source.meta["text"]["encoders"])
  assert context.shape == (93, 32) and pooled.shape == (16,)
  np.testing.assert_array_equal(context[:77, :32], source[0]["clip_l.sequence"])  # CLIP tokens first
  np.testing.assert_array_equal(context[77:], source[0]["t5.sequence"])  # then T5's (32 wide: no padding)
  np.testing.assert_array_equal(pooled, source[0]["clip_l.pooled"])

  transform = sources.transform(config.data, source)
  dropped = [np.array_equal(transform(source[0], np.random.default_rng(s))["context"], transform.empty[0])
             for s in range(200)]
  assert 0.15 < np.mean(dropped) < 0.35  # caption_dropout_prob 0.25


@pytest.fixture(scope="module")
def trained(caches, tmp_path_factory):
  """A workdir where the tiny MM-DiT trained 4 steps on the captioned caches (once per module)."""
  root, _, _ = caches
  workdir = tmp_path_factory.mktemp("trained")
  state = train.train_and_evaluate(_config(root), str(workdir))
  return workdir, int(jax.device_get(state.step))


def test_tiny_mmdit_trains_on_captions_and_samples_a_caption_grid(trained):
  tmp_path, step = trained
  assert step == 4 and os.path.exists(tmp_path / "checkpoints" / "4")
  grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000004.png"))
  # 4 training captions x 10 samples of 16x16 images upscaled to 64, 2-pixel gaps, the captions on the left
  assert grid.shape[0] == 4 * (64 + 2) + 2 and grid.shape[1] > 10 * (64 + 2) + 2 + 50


def test_text_data_errors(caches):
  root, _, _ = caches
  with pytest.raises(ValueError, match="model.joint_attention_dim=48, model.pooled_projection_dim=16 must match"):
    config = _config(root, joint_attention_dim=48)
    train.check_data(config, family.create(config.model), sources.open_source(config.data))
  config = _config(root)
  config.data.update(dict(source="folder", data_dir=str(root / "records")))
  with pytest.raises(ValueError, match="trains on data.source='captioned'"):
    train.check_data(config, family.create(config.model), sources.open_source(config.data))
  config = _config(root)
  config.data.text_dir = ""
  with pytest.raises(ValueError, match="data.text_dir must name the text-embedding cache"):
    sources.open_source(config.data)


def test_prompts_sample_from_the_trained_checkpoint(caches, trained):
  """--mode=sample for a text model: one image per prompt of a prompts file, in order, deterministic for a seed,
  with the prompts in samples.npz; a missing prompt file and an empty list are one-line errors."""
  from jdit import sample
  root, _, _ = caches
  config = _config(root)
  tmp_path, _ = trained
  (tmp_path / "prompts.txt").write_text("a red square number 1\n\n  a blue circle  \na white square\n")
  config.sample.prompts = str(tmp_path / "prompts.txt")
  data = np.load(sample.sample_and_save(config, str(tmp_path)))
  assert data["images"].shape == (3, 16, 16, 3) and data["images"].dtype == np.uint8
  assert data["prompts"].tolist() == ["a red square number 1", "a blue circle", "a white square"]
  first = data["images"]
  config.sample.prompts = ("a white square", "a red square number 1")
  again = np.load(sample.sample_and_save(config, str(tmp_path)))["images"]
  assert again.shape == (2, 16, 16, 3)
  assert os.path.exists(tmp_path / "samples.png")
  config.sample.prompts = ("a red square number 1", "a blue circle", "a white square")
  np.testing.assert_array_equal(np.load(sample.sample_and_save(config, str(tmp_path)))["images"], first)
  for prompts, message in ((str(tmp_path / "missing.txt"), "missing.txt'?: no such file"), ((), "holds no prompts")):
    config.sample.prompts = prompts
    with pytest.raises(ValueError, match=message):
      sample.sample_and_save(config, str(tmp_path))


def test_flux_fine_tunes_from_a_pipeline_on_its_encoders_cache(caches, tmp_path):
  """A Flux pipeline's encoders fill a text cache (CLIP-L pooled only, T5's 512 tokens: Flux's context); the
  tiny Flux fine-tunes from the pipeline's transformer (init_from) on the captioned latents, and samples a
  non-square shape (RoPE over any grid)."""
  from jdit import pipelines, sample
  from jdit.convert import load_into
  from text_helpers import write_flux_pipeline
  root, records, _ = caches
  pipeline = write_flux_pipeline(tmp_path / "flux")
  specs = [TextEncoderSpec.from_description(name, d) for name, d in pipelines.encoder_descriptions(pipeline).items()]
  meta = cache.encode_captions(records, specs, str(tmp_path / "text"), num_shards=1, batch_size=12,
                               dtype="float32", log=lambda _: None)
  assert captioned_lib.text_shape(meta["encoders"]) == (512, 64, 32)  # T5 alone; CLIP-L's pooled vector
  c = config_lib.base("flux")
  c.model.update(dict(variant="tiny", depth=1, input_size=8, in_channels=16, out_channels=16, joint_attention_dim=64,
                      pooled_projection_dim=32, text_length=512))
  c.data.update(dict(source="captioned", data_dir=str(root / "latents"), text_dir=str(tmp_path / "text"),
                     image_size=16, channels=3))
  c.vae.update(dict(path=str(root / "vae"), name="sd3"))
  c.diffusion.update(dict(sampling_steps=2))
  c.update(dict(batch_size=8, num_train_steps=2, log_every=1, checkpoint_every=2, sample_every=0,
                init_from=pipeline))
  c.sample.update(dict(per_device_batch=1, prompts=("a red square number 1",), resolution=(16, 24)))
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(c, workdir)
  assert int(jax.device_get(state.step)) == 2
  imported = load_into(pipeline, family.create(c.model))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state.params, imported)
  assert 0 < max(jax.tree.leaves(moved)) < 0.1  # started from the pipeline's weights, then trained
  images = np.load(sample.sample_and_save(c, workdir))["images"]
  assert images.shape == (1, 16, 24, 3) and images.std() > 0
