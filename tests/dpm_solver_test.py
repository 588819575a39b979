"""DPM-Solver++(2M) and 2M SDE against a float64 reference of the published update rule (Lu et al. 2022,
Algorithm 2, in its lambda = log(alpha / sigma) form), for a Gaussian eps model and a flow velocity model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.diffusion import dpm_solver, flow, gaussian

W, B = 0.7, np.array([0.3, -0.2, 0.5])


def model_jax(x, t):  # a fixed nonlinear "network" of (x, t), (B, 3) -> (B, 3)
  return jnp.tanh(W * x + (t / 1000.0)[:, None] * B)


def model_numpy(x, t):
  return np.tanh(W * x + t / 1000.0 * B)


def reference(x0_of, x, alphas, sigmas, noises, sde, first_order_final=1):
  """The published rule in float64: lambda steps h, r = h_prev / h, D = (1 + 1/(2r)) m_i - 1/(2r) m_{i-1}
  (first order at the first step and the last `first_order_final`), the last step to sigma = 0 giving x = D."""
  with np.errstate(divide="ignore"):
    lam = np.log(alphas) - np.log(sigmas)
  steps, m_prev, h_prev = len(alphas) - 1, None, None
  for i in range(steps):
    m = x0_of(x, i)
    h = lam[i + 1] - lam[i]
    if i == 0 or i >= steps - first_order_final or not np.isfinite(h_prev):
      d = m
    else:
      r = h_prev / h
      d = (1 + 1 / (2 * r)) * m - 1 / (2 * r) * m_prev
    if i == steps - 1:
      x = d
    elif sde:
      x = (sigmas[i + 1] / sigmas[i] * np.exp(-h) * x + alphas[i + 1] * (1 - np.exp(-2 * h)) * d
           + sigmas[i + 1] * np.sqrt(1 - np.exp(-2 * h)) * noises[i])
    else:
      x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * (np.exp(-h) - 1) * d
    m_prev, h_prev = m, h
  return x


def _noises(rng, steps, shape):
  return [np.asarray(jax.random.normal(k, shape), np.float64) for k in jax.random.split(rng, steps)]


@pytest.mark.parametrize("sde", [False, True])
def test_gaussian_steps_equal_the_published_rule(sde):
  s = gaussian.make_schedule("linear", 1000, "ddim6")
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 3)))
  rng = jax.random.key(1)
  ours = jax.jit(lambda x: dpm_solver.gaussian_sample(model_jax, s, x, rng, sde=sde, variance="fixed_small"))(x)
  indices = np.arange(s.num_steps)[::-1]
  abar = np.append(np.asarray(s.alphas_cumprod, np.float64)[indices], 1.0)
  alphas, sigmas = np.sqrt(abar), np.sqrt(1 - abar)

  def x0_of(x, i):  # eps prediction -> x0
    eps = model_numpy(x, float(s.timestep_map[indices[i]]))
    return (x - sigmas[i] * eps) / alphas[i]

  noises = _noises(rng, s.num_steps, x.shape)  # the step into t = 0 is first order as well
  expected = reference(x0_of, x.astype(np.float64), alphas, sigmas, noises, sde, first_order_final=2)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde", [False, True])
def test_flow_steps_equal_the_published_rule(sde):
  times = flow.sampling_times(6, shift=3.0)
  x = np.asarray(jax.random.normal(jax.random.key(2), (4, 3)))
  rng = jax.random.key(3)
  ours = jax.jit(lambda x: dpm_solver.flow_sample(model_jax, x, times, rng, sde=sde))(x)
  times = np.asarray(times, np.float64)
  x0_of = lambda x, i: x - times[i] * model_numpy(x, times[i] * 1000.0)  # v = eps - x0
  expected = reference(x0_of, x.astype(np.float64), 1 - times, times, _noises(rng, len(times) - 1, x.shape), sde)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_second_order_is_used_between_the_first_and_last_steps():
  coefs = dpm_solver.coefficients(np.sqrt([0.1, 0.4, 0.8, 1.0]), np.sqrt([0.9, 0.6, 0.2, 0.0]), sde=False)
  assert coefs[0, 3] == 0 and coefs[-1, 3] == 0 and coefs[1, 3] > 0
  assert coefs[-1, 0] == 0 and coefs[-1, 1] == pytest.approx(1.0)  # the last step lands on x = D


def test_sampler_quality_tool_measures_each_sampler_against_the_baseline(tmp_path, capsys):
  import json

  import scipy.linalg
  from sklearn.datasets import load_digits
  from sklearn.decomposition import PCA
  from train_test import tiny_config

  from jdit import train
  from conftest import load_tool
  sampler_quality = load_tool("sampler_quality")
  workdir = str(tmp_path / "digits")
  train.train_and_evaluate(tiny_config(), workdir)
  capsys.readouterr()
  assert sampler_quality.main([f"--workdir={workdir}", "--samples=40", "--samplers=dpmpp_2m", "--steps=3",
                               "--baseline=ddim:3", "--per_device_batch=1", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert [(r["sampler"], r["steps"]) for r in result["rows"]] == [("real digits", 0), ("ddim", 3), ("dpmpp_2m", 3)]
  assert all(r["fd"] > 0 for r in result["rows"]) and result["rows"][2]["images_per_s"] > 0
  assert result["bound"] == pytest.approx(1.1 * result["rows"][1]["fd"])
  assert ("dpmpp_2m" in result["equal_quality"]) == (result["rows"][2]["fd"] <= result["bound"])
  real = load_digits().data / 16.0  # the floor row, independently: sklearn's PCA and scipy's square root
  pca = PCA(16).fit(real)
  a, b = pca.transform(real[np.random.default_rng(0).choice(len(real), 40)]), pca.transform(real)
  sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
  assert result["rows"][0]["fd"] == pytest.approx(expected, rel=1e-6)
