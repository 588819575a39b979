"""REPA: the alignment loss against REPA's proj_loss formula on given tensors, and a tiny digits run with a random
DINOv2 whose projector trains beside the model and stays out of the EMA and the sampling checkpoint."""
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import randomize
from train_test import tiny_config

from jdit import checkpoint, repa, sharding, train
from jdit.data import transforms
from jdit.models import family


def test_alignment_loss_is_repas_proj_loss():
  rng = np.random.default_rng(0)
  projected, features = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
  zs_tilde, zs = torch.from_numpy(projected), torch.from_numpy(features)
  proj_loss = 0.0  # REPA's loss.py, for one encoder
  for z_j, z_tilde_j in zip(zs, zs_tilde):
    proj_loss += (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(dim=-1)).mean()
  proj_loss /= len(zs)
  assert float(repa.alignment_loss(projected, features).mean()) == pytest.approx(float(proj_loss), rel=1e-6)


def test_a_tiny_repa_run_trains_its_projector_outside_the_ema(tmp_path):
  torch.manual_seed(0)
  encoder_dir = str(tmp_path / "dinov2")
  transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     image_size=28, patch_size=7)).save_pretrained(encoder_dir)
  config = tiny_config(**{"repa.encoder": encoder_dir, "repa.depth": 1, "repa.projector_dim": 24})
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  run = train.setup(config)
  with run.context():
    fresh = run.init(jax.random.key(config.seed))
  projector, initial = state.params[repa.PROJECTOR], fresh.params[repa.PROJECTOR]
  assert projector["fc3"]["kernel"].shape == (24, 16)  # to the encoder's width
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(projector), jax.tree.leaves(initial)))
  assert repa.PROJECTOR not in state.ema_params
  model, params = checkpoint.load_pretrained(os.path.join(tmp_path, "run", "checkpoints"))
  assert repa.PROJECTOR not in params and set(params) == set(state.ema_params)
  encoder = repa.Encoder(encoder_dir, run.model, run.mesh)
  with run.context():  # the loss carries the alignment term, a mean negative cosine
    batch = sharding.global_batch({"image": np.zeros((16, 8, 8, 1), np.float32),
                                   "label": np.arange(16, dtype=np.int32) % 10}, run.mesh)
    batch = encoder(batch)
    from jdit.diffusion import objective
    loss, metrics = jax.jit(objective.make_loss_fn(run.model, config.diffusion, run.alignment))(
        state.params, batch, jax.random.key(0))
  assert batch[repa.FEATURES].shape == (16, 16, 16) and -1.0 <= float(metrics["repa"]) <= 1.0
  pixels = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1)).astype(np.int32)
  with run.context():  # a latent batch's source images (0..255) read as the same pixels in [-1, 1] would be
    from_source = encoder(sharding.global_batch({"image": np.zeros((16, 8, 8, 1), np.float32),
                                                 transforms.SOURCE_IMAGE: pixels}, run.mesh))
    from_image = encoder(sharding.global_batch({"image": (pixels / 127.5 - 1).astype(np.float32)}, run.mesh))
  assert transforms.SOURCE_IMAGE not in from_source
  np.testing.assert_allclose(np.asarray(from_source[repa.FEATURES]), np.asarray(from_image[repa.FEATURES]),
                             rtol=1e-4, atol=1e-5)
  assert float(loss) == pytest.approx(float(metrics["mse"] + metrics["vb"] + 0.5 * metrics["repa"]), rel=1e-5)


def test_repa_settings_that_cannot_run_are_one_line(tmp_path):
  with pytest.raises(ValueError, match="repa.encoder=/nowhere: no such file or directory"):
    train.setup(tiny_config(**{"repa.encoder": "/nowhere"}))


@pytest.mark.parametrize("name", ["dit", "mmdit"])  # flux: the same JointBlock and block_tokens
def test_block_tokens_are_the_same_block_in_scanned_and_unrolled_layouts(name):
  cfg = dict(family.default_config(name), **family.tiny(name))
  scanned, unrolled = (family.create(dict(cfg, scan_blocks=flag)) for flag in (True, False))
  inputs = scanned.dummy_inputs(batch_size=2)
  params = randomize(jax.jit(scanned.init)(jax.random.key(0), *inputs)["params"])
  sown = [jax.jit(lambda p, m=m: m.apply({"params": p}, *inputs, mutable=["intermediates"])[1]["intermediates"])(p)
          for m, p in ((scanned, params), (unrolled, family.to_layout(params, unrolled)))]
  tokens = (np.prod([s // scanned.patch_size for s in scanned.input_hw]), scanned.hidden_size)
  for k in range(1, scanned.depth + 1):
    got = [family.get(name).block_tokens(intermediates, k) for intermediates in sown]
    assert got[0].shape == (2, *tokens)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(got[1]), rtol=1e-5, atol=1e-6)
  if scanned.depth > 1:  # and they are different blocks
    assert not np.allclose(family.get(name).block_tokens(sown[0], 1), family.get(name).block_tokens(sown[0], 2))
