"""End-to-end objectives and samplers on a class-conditional 2-D Gaussian mixture, trained in seconds.

A small MLP denoiser (with the DiT's timestep and label embedders) is trained with `objective.make_loss_fn`
(the official hybrid loss with learned variance, and rectified flow); samples from DDPM, DDIM, Euler, Heun and
DPM-Solver++ (2M: 20 steps, 10 for flow; 2M SDE: 20) must match each class's mean and covariance, and classifier-free guidance
must move samples toward the class.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdit.diffusion import objective
from jdit.nn import layers
from jdit.models.conditioning import ClassConditional

# hundreds of training steps and sampling loops: run fast code; one worker trains the two module models once
pytestmark = [pytest.mark.usefixtures("optimized"), pytest.mark.xdist_group("diffusion_toy")]
CLASSES = 3
MEANS = np.array([[1.5 * np.cos(a), 1.5 * np.sin(a)] for a in 2 * np.pi * np.arange(CLASSES) / CLASSES])
COVS = np.array([[[0.30, 0.10], [0.10, 0.15]], [[0.15, -0.05], [-0.05, 0.25]], [[0.20, 0.0], [0.0, 0.10]]])
CHOLESKY = np.linalg.cholesky(COVS)


class ToyDenoiser(ClassConditional, nn.Module):
  """MLP on (x, t, y) following the class-label conditioning contract, as any model family does."""
  learn_sigma: bool
  num_classes: int = CLASSES
  class_dropout_prob: float = 0.15

  @nn.compact
  def __call__(self, x, t, y, train=False):
    c = layers.TimestepEmbedder(128, name="t_embedder")(t)
    c = c + layers.LabelEmbedder(self.num_classes, 128, self.class_dropout_prob, name="y_embedder")(y, train)
    h = nn.Dense(256)(x) + nn.Dense(256)(nn.silu(c))
    for _ in range(3):
      h = h + nn.Dense(256)(nn.silu(nn.Dense(256)(nn.silu(h))))
    return nn.Dense(x.shape[-1] * (2 if self.learn_sigma else 1))(nn.silu(h))


def mixture(rng: np.random.RandomState, labels: np.ndarray) -> np.ndarray:
  return MEANS[labels] + np.einsum("bij,bj->bi", CHOLESKY[labels], rng.randn(len(labels), 2))


def train(model, cfg, steps=700, batch=512, seed=0):
  loss_fn = objective.make_loss_fn(model, cfg)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  data_rng = np.random.RandomState(seed)
  for i in range(steps):
    labels = data_rng.randint(0, CLASSES, batch)
    data = {"image": jnp.asarray(mixture(data_rng, labels), jnp.float32), "label": jnp.asarray(labels)}
    params, opt_state, loss = step(params, opt_state, data, jax.random.key(i))
  assert np.isfinite(loss)
  return params


def draw(model, cfg, params, labels, seed=1):
  sample = jax.jit(objective.make_sample_fn(model, cfg))
  x_T = jax.random.normal(jax.random.key(seed), (len(labels), 2))
  cond = model.condition({"label": jnp.asarray(labels)})
  return np.asarray(sample(params, x_T, cond, jax.random.key(seed + 1)))


def class_posterior(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """p(label | x) under the true (equal-weight) mixture."""
  logp = []
  for c in range(CLASSES):
    diff = x - MEANS[c]
    inv = np.linalg.inv(COVS[c])
    logp.append(-0.5 * np.einsum("bi,ij,bj->b", diff, inv, diff) - 0.5 * np.log(np.linalg.det(COVS[c])))
  logp = np.stack(logp, axis=1)
  post = np.exp(logp - logp.max(1, keepdims=True))
  post /= post.sum(1, keepdims=True)
  return post[np.arange(len(labels)), labels]


def check_matches_mixture(samples: np.ndarray, labels: np.ndarray, mean_tol=0.1, cov_tol=0.06):
  for c in range(CLASSES):
    xs = samples[labels == c]
    assert np.abs(xs.mean(0) - MEANS[c]).max() < mean_tol, (c, xs.mean(0), MEANS[c])
    assert np.abs(np.cov(xs.T) - COVS[c]).max() < cov_tol, (c, np.cov(xs.T), COVS[c])


@pytest.fixture(scope="module")
def gaussian_model():
  cfg = objective.default_config()  # official: linear schedule, eps + learned range, hybrid loss
  model = ToyDenoiser(learn_sigma=True)
  return model, cfg, train(model, cfg)


@pytest.fixture(scope="module")
def flow_model():
  cfg = objective.default_config()
  cfg.update(dict(kind="flow", sampler="euler", timestep_sampling="logit_normal", variance="fixed_small"))
  model = ToyDenoiser(learn_sigma=False)
  return model, cfg, train(model, cfg)


LABELS = np.repeat(np.arange(CLASSES), 1000)


@pytest.mark.parametrize("fixture,sampler,steps", [("gaussian_model", "ddpm", 250), ("gaussian_model", "ddim", 50),
                                                   ("flow_model", "euler", 100), ("flow_model", "heun", 25),
                                                   ("gaussian_model", "dpmpp_2m", 20), ("flow_model", "dpmpp_2m", 10),
                                                   ("gaussian_model", "dpmpp_2m_sde", 20),
                                                   ("flow_model", "dpmpp_2m_sde", 20)])
def test_samplers_match_each_class(request, fixture, sampler, steps):
  model, cfg, params = request.getfixturevalue(fixture)
  cfg = cfg.copy_and_resolve_references()
  cfg.update(dict(sampler=sampler, sampling_steps=steps, guidance_scale=1.0))
  check_matches_mixture(draw(model, cfg, params, LABELS), LABELS)


@pytest.mark.parametrize("fixture,sampler,steps", [("gaussian_model", "ddim", 50), ("flow_model", "heun", 25)])
def test_guidance_moves_samples_toward_the_requested_class(request, fixture, sampler, steps):
  model, cfg, params = request.getfixturevalue(fixture)
  off_class = []
  for scale in (1.0, 4.0):
    cfg = cfg.copy_and_resolve_references()
    cfg.update(dict(sampler=sampler, sampling_steps=steps, guidance_scale=scale, guidance_mode="all"))
    samples = draw(model, cfg, params, LABELS)
    off_class.append(1.0 - class_posterior(samples, LABELS).mean())  # probability mass of the other classes
  assert off_class[1] < 0.2 * off_class[0], off_class  # guidance pushes samples away from the other classes
