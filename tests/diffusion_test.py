"""Gaussian diffusion math against closed forms; respacing; guidance; compile-once samplers; config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.diffusion import flow, gaussian, guidance, objective, samplers
from jdit.models import create_dit

BETAS = np.linspace(1e-4, 0.02, 1000)  # the official linear schedule, written out
ABAR = np.cumprod(1 - BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])
POST_VAR = BETAS * (1 - ABAR_PREV) / (1 - ABAR)


def _data(t, seed=0, shape=(4, 3)):
  rng = np.random.RandomState(seed)
  x0 = rng.uniform(-0.9, 0.9, (len(t), *shape)).astype(np.float32)
  noise = rng.randn(len(t), *shape).astype(np.float32)
  return jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)


def test_respacing_matches_the_official_timestep_map_and_betas():
  assert gaussian.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  assert gaussian.space_timesteps(10, "3,2") == [0, 2, 4, 5, 9]  # sections [0..4] and [5..9]
  s = gaussian.make_schedule("linear", 1000, "250")
  assert s.num_steps == 250 and s.timestep_map[0] == 0 and s.timestep_map[-1] == 999
  # Respaced betas keep abar at the kept steps: 1 - abar_{S_i} / abar_{S_{i-1}}.
  np.testing.assert_allclose(s.alphas_cumprod, ABAR[s.timestep_map], rtol=1e-12)
  with pytest.raises(ValueError, match="no integer stride gives 999"):
    gaussian.space_timesteps(1000, "ddim999")


def test_cosine_schedule_follows_its_alpha_bar():
  s = gaussian.make_schedule("cosine", 1000)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  np.testing.assert_allclose(s.alphas_cumprod[:900], [f((i + 1) / 1000) / f(0) for i in range(900)], rtol=1e-9)


def test_q_sample_and_posterior_closed_forms():
  s = gaussian.make_schedule()
  t = np.array([0, 10, 500, 999])
  x0, noise, tj = _data(t)
  x_t = gaussian.q_sample(s, x0, tj, noise)
  a = ABAR[t][:, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
  mean, var, log_var = gaussian.q_posterior(s, x0, x_t, tj)
  c0 = (BETAS * np.sqrt(ABAR_PREV) / (1 - ABAR))[t][:, None, None]
  ct = ((1 - ABAR_PREV) * np.sqrt(1 - BETAS) / (1 - ABAR))[t][:, None, None]
  np.testing.assert_allclose(mean, c0 * x0 + ct * np.asarray(x_t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var[:, 0, 0], POST_VAR[t], rtol=1e-6)
  np.testing.assert_allclose(log_var[:, 0, 0], np.log(np.where(t == 0, POST_VAR[1], POST_VAR[t])), rtol=1e-6)


@pytest.mark.parametrize("v,expected_log_var", [
    (-1.0, lambda t: np.log(POST_VAR[t])), (1.0, lambda t: np.log(BETAS[t])),
    (0.0, lambda t: 0.5 * (np.log(BETAS[t]) + np.log(POST_VAR[t])))])
def test_learned_range_posterior_closed_form(v, expected_log_var):
  s = gaussian.make_schedule()
  t = np.array([5, 250, 999])
  x0, noise, tj = _data(t)
  x_t = gaussian.q_sample(s, x0, tj, noise)
  output = jnp.concatenate([noise, jnp.full_like(noise, v)], axis=-1)  # exact eps, constant variance channel
  mean, log_var, pred_x0 = gaussian.p_mean_variance(s, output, x_t, tj)
  np.testing.assert_allclose(pred_x0, x0, atol=2e-4)
  np.testing.assert_allclose(mean, gaussian.q_posterior(s, x0, x_t, tj)[0], atol=2e-5)
  np.testing.assert_allclose(log_var[:, 0, 0], expected_log_var(t), rtol=1e-5)


def test_hybrid_loss_closed_form():
  s = gaussian.make_schedule()
  t = np.array([3, 300, 999])
  x0, noise, tj = _data(t)
  delta = 0.1
  output = jnp.concatenate([noise + delta, jnp.ones_like(noise)], axis=-1)  # eps off by delta, variance = beta
  terms = gaussian.loss_terms(s, output, x0, tj, noise)
  np.testing.assert_allclose(terms["mse"], delta ** 2, rtol=1e-4)
  # KL(N(m, p) || N(m + d, b)) with p the posterior variance, b = beta, d the mean error from the eps error:
  # d = coef_x0 * sqrt(1/abar - 1) * delta.
  b, p = BETAS[t], POST_VAR[t]
  d = b * np.sqrt(ABAR_PREV[t]) / (1 - ABAR[t]) * np.sqrt(1 / ABAR[t] - 1) * delta
  kl = 0.5 * (-1 + np.log(b) - np.log(p) + p / b + d ** 2 / b) / math.log(2)
  np.testing.assert_allclose(terms["vb"], kl, rtol=1e-4)  # float32 cancellation in a KL of ~1e-4 bits
  np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)


def test_decoder_nll_at_t0_and_vb_trains_only_the_variance():
  s = gaussian.make_schedule()
  t = np.array([0, 0])
  x0, noise, tj = _data(t)
  output = jnp.concatenate([noise, jnp.zeros_like(noise)], axis=-1)
  mean, log_var, _ = gaussian.p_mean_variance(s, output, gaussian.q_sample(s, x0, tj, noise), tj)
  std = np.exp(0.5 * np.asarray(log_var))
  phi = lambda z: 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
  prob = phi((np.asarray(x0) + 1 / 255 - mean) / std) - phi((np.asarray(x0) - 1 / 255 - mean) / std)
  expected = -np.log(prob).reshape(2, -1).mean(1) / math.log(2)
  vb = gaussian.loss_terms(s, output, x0, tj, noise)["vb"]
  np.testing.assert_allclose(vb, expected, rtol=5e-3)  # ADM's tanh approximation of Phi

  grads = jax.grad(lambda o: gaussian.loss_terms(s, o, x0, tj, noise)["vb"].sum())(output)
  assert not np.any(grads[..., :3]) and np.any(grads[..., 3:])


def test_v_and_x0_predictions_invert():
  s = gaussian.make_schedule()
  t = np.array([1, 400, 998])
  x0, noise, tj = _data(t)
  x_t = gaussian.q_sample(s, x0, tj, noise)
  v = gaussian.v_target(s, x0, tj, noise)
  np.testing.assert_allclose(gaussian.predict_x0(s, x_t, tj, v, "v"), x0, atol=1e-5)
  np.testing.assert_allclose(gaussian.eps_from_x0(s, x_t, tj, x0), noise, atol=2e-3)
  assert gaussian.loss_terms(s, v, x0, tj, noise, prediction="v", variance="fixed_small")["loss"].max() < 1e-10


def test_flow_interpolation_shift_and_time_sampling():
  x0, noise = jnp.ones((2, 3)), jnp.zeros((2, 3))
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.array([0.25, 1.0])), [[0.75] * 3, [0.0] * 3])
  assert flow.shift_time(0.5, 3.0) == pytest.approx(0.75)
  times = flow.sampling_times(4, shift=3.0)
  assert times[0] == 1.0 and times[-1] == 0.0 and np.all(np.diff(times) < 0)
  t = flow.sample_time(jax.random.key(0), 20000, "logit_normal", loc=0.5, scale=0.8)
  logit = np.log(np.asarray(t) / (1 - np.asarray(t)))
  assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03


@pytest.mark.parametrize("mode", ["first3", "all", "interval"])
def test_guidance_modes(mode):
  def model_fn(x, t, cond):  # conditional half: 1 + y + the pooled vector, unconditional (null = 9): 0
    y = cond["y"] + cond["pooled"].sum(-1)
    return jnp.broadcast_to(jnp.where(cond["y"] == 9, 0.0, 1.0 + y)[:, None, None], x.shape[:-1] + (8,))
  x = jnp.zeros((2, 2, 4))
  cond = {"y": jnp.array([1, 2]), "pooled": jnp.zeros((2, 5))}  # any keys: guidance passes the dict through
  null = {"y": jnp.full((2,), 9), "pooled": jnp.ones((2, 5))}
  fn = guidance.classifier_free_guidance(model_fn, cond, null, 3.0, mode=mode, interval=(100.0, 500.0))
  inside, outside = fn(x, jnp.full((2,), 200.0)), fn(x, jnp.full((2,), 800.0))
  cond = np.broadcast_to(np.array([2.0, 3.0])[:, None, None], (2, 2, 8))  # learned-sigma model: 2 x 4 channels
  n = 3 if mode == "first3" else 4  # guided channels; the variance channels 4..7 always come from cond
  np.testing.assert_allclose(inside[..., :n], 3.0 * cond[..., :n])
  np.testing.assert_allclose(inside[..., n:], cond[..., n:])
  np.testing.assert_allclose(outside, cond if mode == "interval" else inside)


def test_guidance_interval_skips_the_unconditional_half_outside_it():
  rows = []  # the batch of each model call that runs (a callback fires only in the branch taken)

  def model_fn(x, t, cond):
    jax.debug.callback(lambda n: rows.append(int(n)), x.shape[0])
    return x + cond["y"][:, None]

  cond, null = {"y": jnp.array([1.0, 2.0])}, {"y": jnp.zeros(2)}
  fn = jax.jit(guidance.classifier_free_guidance(model_fn, cond, null, 3.0, mode="interval", interval=(100.0, 500.)))
  x = jnp.zeros((2, 4))
  inside, outside = fn(x, jnp.full((2,), 200.0)), fn(x, jnp.full((2,), 800.0))
  jax.effects_barrier()
  assert rows == [4, 2]  # 2B rows inside the interval, B outside
  np.testing.assert_allclose(inside, 3.0 * np.array([[1.0] * 4, [2.0] * 4]))
  np.testing.assert_allclose(outside, np.array([[1.0] * 4, [2.0] * 4]))


def test_sampler_loops_compile_once():
  traces = []

  def model_fn(x, t):
    traces.append(1)
    return jnp.concatenate([0.1 * x, jnp.zeros_like(x)], axis=-1)

  s = gaussian.make_schedule("linear", 1000, "50")
  run = jax.jit(lambda x, rng: samplers.ddpm_sample(model_fn, s, x, rng))
  for seed in range(3):
    run(jnp.full((2, 4, 4, 3), float(seed)), jax.random.key(seed)).block_until_ready()
  assert run._cache_size() == 1
  assert len(traces) == 1  # the 50-step loop is one traced body, not 50 unrolled calls

  traces.clear()
  heun = jax.jit(lambda x: samplers.heun_sample(lambda x, t: (traces.append(1), -x)[1], x, flow.sampling_times(30)))
  heun(jnp.ones((2, 3))).block_until_ready()
  assert len(traces) == 2  # two model calls per Heun step, traced once


def test_progress_is_reported_on_the_host(capfd):
  s = gaussian.make_schedule("linear", 1000, "20")
  out = samplers.ddim_sample(lambda x, t: x, s, jnp.ones((1, 2)), jax.random.key(0), variance="fixed_small",
                             progress=True)
  jax.block_until_ready(out)
  jax.effects_barrier()
  printed = capfd.readouterr().out
  assert "ddim: step 2/20" in printed and "ddim: step 20/20" in printed


@pytest.mark.parametrize("changes,match", [
    (dict(kind="diffusion"), "diffusion.kind must be one of"),
    (dict(sampler="euler"), "diffusion.sampler must be one of \\('ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde'\\)"),
    (dict(variance="fixed_small"), "needs model learn_sigma=False"),
    (dict(prediction="score"), "diffusion.prediction must be one of"),
    (dict(kind="flow", sampler="euler"), "set the model's learn_sigma=False"),
])
def test_config_errors_name_the_field(changes, match):
  cfg = objective.default_config()
  cfg.update(changes)
  model = create_dit("Tiny/2", input_size=8, num_classes=10)
  with pytest.raises(ValueError, match=match):
    objective.make_loss_fn(model, cfg)
