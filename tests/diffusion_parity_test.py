"""Parity with diffusers' schedulers (PyTorch CPU) on identical inputs, at fp32 rounding level."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

from jdit.diffusion import dpm_solver, flow, gaussian, samplers  # noqa: E402

SHAPE = (3, 4, 8, 8)  # NCHW for torch; jdit works channels-last


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def float64(scheduler):
  """The scheduler's own schedule formulas evaluated in float64 (diffusers builds them in float32, which loses
  ~1e-4 relative precision at small t, where 1 - abar_t ~ 3e-4; the official ADM code uses float64)."""
  scheduler.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  scheduler.alphas = 1.0 - scheduler.betas
  scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
  return scheduler


def test_linear_schedule_alphas_cumprod_match_ddpm_scheduler():
  ref = schedulers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.numpy()
  s = gaussian.make_schedule("linear", 1000)
  np.testing.assert_allclose(s.alphas_cumprod, ref, rtol=2e-5)
  np.testing.assert_allclose(s.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("t", [999, 500, 37, 1])
def test_ddpm_step_matches_ddpm_scheduler(variance, t):
  scheduler = float64(schedulers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                               variance_type=variance, prediction_type="epsilon"))
  rng = np.random.RandomState(t)
  x = rng.randn(*SHAPE).astype(np.float32)
  channels = SHAPE[1] * (2 if variance == "learned_range" else 1)
  output = rng.randn(SHAPE[0], channels, *SHAPE[2:]).astype(np.float32)
  if variance == "learned_range":
    output[:, 4:] = np.tanh(output[:, 4:])  # variance channels in [-1, 1]
  generator = torch.Generator().manual_seed(t)
  ref = scheduler.step(torch.from_numpy(output).double(), t, torch.from_numpy(x).double(),
                       generator=generator).prev_sample.numpy()
  noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64).numpy()
  s = gaussian.make_schedule("linear", 1000)
  got = samplers.ddpm_step(s, nhwc(output), nhwc(x), jnp.full((SHAPE[0],), t), nhwc(noise), variance=variance)
  assert relative_error(nchw(got), ref) < 1e-5


@pytest.mark.parametrize("prediction,torch_prediction", [("eps", "epsilon"), ("v", "v_prediction")])
def test_ddim_sampling_matches_ddim_scheduler(prediction, torch_prediction):
  scheduler = float64(schedulers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                               set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                                               prediction_type=torch_prediction))
  scheduler.set_timesteps(50)
  s = gaussian.make_schedule("linear", 1000, "ddim50")
  np.testing.assert_array_equal(s.timestep_map[::-1], scheduler.timesteps.numpy())

  x_T = np.random.RandomState(0).randn(*SHAPE)
  ref = torch.from_numpy(x_T)
  for t in scheduler.timesteps:  # a smooth stand-in network, the same in both frameworks
    ref = scheduler.step(torch.tanh(0.5 * ref + t / 1000.0), t, ref, eta=0.0).prev_sample
  stand_in = lambda x, t: jnp.tanh(0.5 * x + t.reshape(-1, 1, 1, 1) / 1000.0)
  got = samplers.ddim_sample(stand_in, s, nhwc(x_T.astype(np.float32)), jax.random.key(0),
                             prediction=prediction, variance="fixed_small")
  assert relative_error(nchw(got), ref.numpy()) < 1e-5


def test_dpm_solver_matches_dpm_solver_multistep_scheduler():
  """dpmsolver++ 2M (midpoint), 10 steps, to 0, with diffusers' rule (second order into t = 0: first_order_final=1;
  jdit's default takes that step first order)."""
  scheduler = float64(schedulers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
      solver_type="midpoint", timestep_spacing="leading", steps_offset=0, lower_order_final=True,
      final_sigmas_type="zero", prediction_type="epsilon"))
  s = gaussian.make_schedule("linear", 1000, "ddim10")
  scheduler.set_timesteps(timesteps=[int(t) for t in s.timestep_map[::-1]])  # its "leading" grid is 1000 // 11
  np.testing.assert_array_equal(s.timestep_map[::-1], scheduler.timesteps.numpy())
  x_T = np.random.RandomState(2).randn(*SHAPE)
  ref = torch.from_numpy(x_T)
  for t in scheduler.timesteps:
    ref = scheduler.step(torch.tanh(0.5 * ref + t / 1000.0), t, ref).prev_sample
  stand_in = lambda x, t: jnp.tanh(0.5 * x + t.reshape(-1, 1, 1, 1) / 1000.0)
  got = dpm_solver.gaussian_sample(stand_in, s, nhwc(x_T.astype(np.float32)), jax.random.key(0),
                                   variance="fixed_small", first_order_final=1)
  assert relative_error(nchw(got), ref.numpy()) < 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_flow_matches_flow_match_euler_scheduler(shift):
  steps = 20
  scheduler = schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 0.0, steps + 1)[:-1]))
  times = flow.sampling_times(steps, shift)
  np.testing.assert_allclose(scheduler.sigmas.numpy(), times, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(scheduler.timesteps.numpy(), times[:-1] * 1000, rtol=1e-5)

  x1 = np.random.RandomState(1).randn(*SHAPE).astype(np.float32)
  ref = torch.from_numpy(x1)
  for t in scheduler.timesteps:
    velocity = torch.sin(ref) - t / 1000.0 * ref
    ref = scheduler.step(velocity, t, ref).prev_sample
  velocity_fn = lambda x, t: jnp.sin(x) - t.reshape(-1, 1, 1, 1) / 1000.0 * x
  got = samplers.euler_sample(velocity_fn, nhwc(x1), times, time_scale=1000.0)
  assert relative_error(nchw(got), ref.numpy()) < 1e-5
