"""The objective chosen in config: one `loss(params, batch, rng)` for training and the matching sampler.

    cfg = default_config()                     # official DiT Gaussian diffusion; cfg.kind = "flow" for RF
    loss_fn = make_loss_fn(model, cfg)         # (params, batch {"image", conditioning keys}, rng) -> (loss, metrics)
    sample_fn = make_sample_fn(model, cfg)     # (params, x_T, cond, rng) -> samples
`model` is any model family (jdit.models.family); the conditioning is the dict of the conditioning contract
(jdit.models.conditioning), read and nulled by the model, never named here.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdit.diffusion import dpm_solver, flow, gaussian, guidance, samplers, weighting
from jdit.models import family

KINDS = ("gaussian", "flow")
TRAINING_FIELDS = ("mode_scale", "loss_weighting", "min_snr_gamma", "loss", "huber_c")  # weighting.py's fields
SAMPLERS = {"gaussian": ("ddpm", "ddim", *dpm_solver.SAMPLERS), "flow": ("euler", "heun", *dpm_solver.SAMPLERS)}


def default_config() -> ml_collections.ConfigDict:
  """Every diffusion field, with the official DiT settings as defaults."""
  return ml_collections.ConfigDict(dict(
      kind="gaussian",            # gaussian (DiT/ADM) | flow (rectified flow)
      # Gaussian diffusion
      noise_schedule="linear",    # linear (1e-4 .. 0.02) | cosine
      num_steps=1000,             # training steps of the process
      prediction="eps",           # eps | x0 | v
      variance="learned_range",   # learned_range (needs learn_sigma) | fixed_small | fixed_large
      clip_denoised=False,        # clip predicted x0 to [-1, 1] while sampling (off for latents)
      # Training: where the effort goes (jdit.diffusion.weighting)
      timestep_sampling="uniform",  # training-time density: uniform | logit_normal | mode (SD3's)
      logit_mean=0.0,             # logit_normal: mean and std of the logit of t
      logit_std=1.0,              # (SD3: 0 and 1)
      mode_scale=1.29,            # mode: the SD3 paper's s
      loss_weighting="none",      # none | min_snr (gaussian) | sigma_sqrt | cosmap (flow; diffusers' SD3 weights)
      min_snr_gamma=5.0,          # min_snr: the weight is min(SNR, gamma) in x0 space
      loss="mse",                 # mse | huber (pseudo-Huber)
      huber_c=0.1,                # huber: quadratic below c, linear above
      # Rectified flow
      shift=1.0,                  # resolution-dependent timestep shift, at training and sampling
      flow_schedule="uniform",    # sampling times: uniform (evenly spaced) | sd3 (diffusers' FlowMatchEuler) |
                                  # flux (FluxPipeline's: shifted by the image token count)
      time_scale=1000.0,          # the network sees t * time_scale
      # Sampling
      sampler="ddpm",             # ddpm | ddim (gaussian); euler | heun (flow); dpmpp_2m | dpmpp_2m_sde (both)
      sampling_steps=250,         # respaced steps (gaussian) or ODE steps (flow)
      ddim_eta=0.0,               # DDIM noise: 0 deterministic, 1 DDPM-like
      guidance_scale=4.0,         # 1.0 disables classifier-free guidance
      guidance_mode="first3",     # first3 (official) | all | interval | apg (adaptive projected guidance)
      guidance_interval=(0.0, 1000.0),  # model-timestep range guided in "interval" mode
      apg_eta=0.0,                # apg: weight of the update's part parallel to the conditional prediction
      apg_norm_threshold=0.0,     # apg: the update's norm per example is clipped to this (> 0)
      apg_momentum=0.0,           # apg: running average of the update over the sampler's calls (e.g. -0.5)
      slg_layers=(7, 8, 9),       # skip_layer (MM-DiT, flow): the joint blocks skipped (0-based; SD3.5 medium's)
      slg_scale=2.8,              # skip_layer: weight of (cond - cond without those blocks)
      slg_start=0.01,             # skip_layer: guided steps i with start * steps < i < ... (diffusers' rule)
      slg_stop=0.2,               # skip_layer: ... i < stop * steps
  ))


def check_config(cfg, model) -> None:
  """One-line errors naming the diffusion field that is wrong for this model."""
  if cfg.kind not in KINDS:
    raise ValueError(f"diffusion.kind must be one of {KINDS}, got {cfg.kind!r}")
  weighting.check(cfg)
  if cfg.sampler not in SAMPLERS[cfg.kind]:
    raise ValueError(f"diffusion.sampler must be one of {SAMPLERS[cfg.kind]} for kind={cfg.kind!r}, "
                     f"got {cfg.sampler!r}")
  if cfg.kind == "gaussian":
    if cfg.prediction not in gaussian.PREDICTIONS:
      raise ValueError(f"diffusion.prediction must be one of {gaussian.PREDICTIONS}, got {cfg.prediction!r}")
    if cfg.variance not in gaussian.VARIANCES:
      raise ValueError(f"diffusion.variance must be one of {gaussian.VARIANCES}, got {cfg.variance!r}")
    if (cfg.variance == "learned_range") != model.learn_sigma:
      raise ValueError(f"diffusion.variance={cfg.variance!r} needs model learn_sigma="
                       f"{cfg.variance == 'learned_range'}, got {model.learn_sigma}")
  elif model.learn_sigma:
    raise ValueError("diffusion.kind='flow' predicts a velocity: set the model's learn_sigma=False")
  elif cfg.flow_schedule not in flow.SCHEDULES:
    raise ValueError(f"diffusion.flow_schedule must be one of {flow.SCHEDULES}, got {cfg.flow_schedule!r}")
  if cfg.guidance_mode == "skip_layer" and (cfg.kind != "flow" or
                                            not hasattr(family.get(model.FAMILY), "skip_layer_params")):
    raise ValueError("diffusion.guidance_mode='skip_layer' is skip-layer guidance of MM-DiT flow models (SD3.5); "
                     f"model.family={model.FAMILY!r} with kind={cfg.kind!r}")
  if cfg.guidance_scale != 1.0 and model.condition_keys and not model.supports_guidance:
    raise ValueError("diffusion.guidance_scale != 1 needs an unconditional model: set the model's "
                     "class_dropout_prob > 0 (a null class), or guidance_scale=1")


def training_options(cfg) -> dict:
  """The TRAINING_FIELDS of cfg, with their defaults for configs written without them."""
  return {k: cfg.get(k, default_config()[k]) for k in TRAINING_FIELDS}


def make_terms_fn(model, cfg, alignment=None):
  """terms(params, batch, t, noise, *, train=False, rngs=None, adapters=None, weighted=True, implied=False) ->
  per-example loss terms (B,) at the given steps / times t (B,) and noise: what the training loss averages, and
  what the validation loss evaluates at fixed t and noise (weighted=False: without diffusion.loss_weighting). With a
  REPA `alignment` (jdit.repa.Alignment), weighted terms add its per-example "repa" term, times its weight, to loss.
  implied=True adds the clean sample the prediction implies, "x0_hat" (B, ...), and the mean squared errors of it
  and of the implied velocity against the true x0 and v, "x0_error" and "v_error" (B,) (v: Salimans' for
  Gaussian diffusion, dx_t/dt = eps - x0 for flow)."""
  check_config(cfg, model)
  schedule = gaussian.make_schedule(cfg.noise_schedule, cfg.num_steps) if cfg.kind == "gaussian" else None
  options = training_options(cfg)

  def with_implied(terms, x0, x0_hat, v_hat, v):
    return {**terms, "x0_hat": x0_hat, "x0_error": gaussian.mean_flat((x0_hat - x0) ** 2),
            "v_error": gaussian.mean_flat((v_hat - v) ** 2)}

  def diffusion_terms(params, batch, t, noise, train, rngs, adapters, weighted, tokens_at, implied):
    """(per-example diffusion terms, the tokens leaving block tokens_at or None)."""
    x0, cond = batch["image"], model.condition(batch)

    def apply(x, time):  # (prediction, tokens or None)
      out = family.apply(model, params, x, time, cond, train=train, rngs=rngs, adapters=adapters,
                         tokens_at=tokens_at)
      return out if tokens_at else (out, None)

    scheme = options["loss_weighting"] if weighted else "none"
    if cfg.kind == "gaussian":
      x_t = gaussian.q_sample(schedule, x0, t, noise)
      output, tokens = apply(x_t, t.astype(jnp.float32))
      weight = None
      if scheme == "min_snr":
        weight = weighting.min_snr(gaussian.gather(schedule.snr, t, 1), options["min_snr_gamma"], cfg.prediction)
      terms = gaussian.loss_terms(schedule, output, x0, t, noise, prediction=cfg.prediction, variance=cfg.variance,
                                  loss=options["loss"], huber_c=options["huber_c"], weight=weight)
      if implied:
        pred, _ = gaussian.split_output(output, cfg.variance)
        x0_hat, v_hat = gaussian.implied_x0_v(schedule, x_t, t, pred, cfg.prediction)
        terms = with_implied(terms, x0, x0_hat, v_hat, gaussian.v_target(schedule, x0, t, noise))
      return terms, tokens
    x_t = flow.interpolate(x0, noise, t)
    output, tokens = apply(x_t, t * cfg.time_scale)
    per_example = flow.flow_loss(output, x0, noise, options["loss"], options["huber_c"])
    terms = {options["loss"]: per_example, "loss": weighting.flow_weight(t, scheme) * per_example}
    if implied:
      terms = with_implied(terms, x0, flow.implied_x0(x_t, t, output), output, flow.velocity_target(x0, noise))
    return terms, tokens

  def terms(params, batch, t, noise, *, train=False, rngs=None, adapters=None, weighted=True, implied=False):
    aligned = alignment is not None and weighted
    result, tokens = diffusion_terms(params, batch, t, noise, train, rngs, adapters, weighted,
                                     alignment.depth if aligned else 0, implied)
    if aligned:
      result["repa"] = alignment.loss(params, tokens, batch)
      result["loss"] = result["loss"] + alignment.weight * result["repa"]
    return result

  return terms


def make_loss_fn(model, cfg, alignment=None):
  """loss(params, batch, rng, adapters=None) -> (mean loss, per-batch metrics) for batch = {"image": x0,
  conditioning...}; with LoRA `adapters` (traced inside jdit.nn.lora.active), the adapted model's loss; with a
  REPA `alignment`, plus its weighted alignment term (metric "repa")."""
  terms_fn = make_terms_fn(model, cfg, alignment)
  num_steps, mode_scale = cfg.num_steps, training_options(cfg)["mode_scale"]

  def training_times(rng, batch):
    """Gaussian steps (uniform integers, or floor(N u) for a density's times u) or flow times."""
    if cfg.kind == "flow":
      return flow.sample_time(rng, batch, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.shift,
                              mode_scale)
    if cfg.timestep_sampling == "uniform":
      return jax.random.randint(rng, (batch,), 0, num_steps)
    u = weighting.time_density(rng, batch, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, mode_scale)
    return jnp.clip(jnp.floor(u * num_steps).astype(jnp.int32), 0, num_steps - 1)

  def loss(params, batch, rng, adapters=None):
    x0 = batch["image"]
    t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    terms = terms_fn(params, batch, training_times(t_rng, x0.shape[0]), noise, train=True,
                     rngs={"dropout": dropout_rng}, adapters=adapters)
    metrics = {name: value.mean() for name, value in terms.items()}
    return metrics["loss"], metrics

  return loss


def flow_times(cfg, model, x) -> np.ndarray:
  """The flow sampler's times for the latents x (B, H, W, C) (the flux schedule counts their image tokens)."""
  tokens = x[0].size // x.shape[-1] // model.size_multiple ** 2 if cfg.flow_schedule == "flux" else 0
  return flow.sampling_times(cfg.sampling_steps, cfg.shift, cfg.flow_schedule, image_tokens=tokens)


def slg_window(cfg, model, x) -> tuple[float, float]:
  """The model-time interval holding exactly the steps i with slg_start * N < i < slg_stop * N (diffusers' rule),
  bounded halfway to the neighbouring steps; empty when no step qualifies."""
  model_times = (flow_times(cfg, model, x) * cfg.time_scale).astype(np.float64)  # N + 1 times, decreasing
  steps = cfg.sampling_steps
  active = [i for i in range(steps) if cfg.slg_start * steps < i < cfg.slg_stop * steps]
  if not active:
    return (np.inf, -np.inf)
  first, last = active[0], active[-1]
  high = np.inf if first == 0 else (model_times[first] + model_times[first - 1]) / 2
  return (model_times[last] + model_times[last + 1]) / 2, high


def make_sample_fn(model, cfg, progress: bool = False):
  """sample(params, x_T, cond, rng) -> x_0 with the configured sampler and classifier-free guidance; `cond` is
  the model's conditioning dict (model.condition(batch)) for the B samples of x_T."""
  check_config(cfg, model)

  def sample(params, x, cond, rng):
    apply = lambda x, t, cond: family.apply(model, params, x, t, cond)
    if not model.condition_keys or cfg.guidance_scale == 1.0:
      model_fn = lambda x, t: apply(x, t, cond)
    elif cfg.guidance_mode == "skip_layer":
      skipped = family.get(model.FAMILY).skip_layer_params(params, model, tuple(cfg.slg_layers))
      skipped_fn = lambda x, t, cond: family.apply(model, skipped, x, t, cond)
      model_fn = guidance.skip_layer_guidance(apply, skipped_fn, cond, model.null_condition(cond), cfg.guidance_scale,
                                              cfg.slg_scale, slg_window(cfg, model, x))
    elif cfg.guidance_mode == "apg":
      model_fn = guidance.adaptive_projected_guidance(apply, cond, model.null_condition(cond), cfg.guidance_scale,
                                                      **{k: cfg.get(f"apg_{k}", default_config()[f"apg_{k}"])
                                                         for k in ("eta", "norm_threshold", "momentum")})
    else:
      model_fn = guidance.classifier_free_guidance(apply, cond, model.null_condition(cond), cfg.guidance_scale,
                                                   mode=cfg.guidance_mode, interval=tuple(cfg.guidance_interval))
    sde = cfg.sampler == "dpmpp_2m_sde"
    if cfg.kind == "flow":
      times = flow_times(cfg, model, x)
      if cfg.sampler in dpm_solver.SAMPLERS:
        return dpm_solver.flow_sample(model_fn, x, times, rng, sde=sde, time_scale=cfg.time_scale)
      run = samplers.heun_sample if cfg.sampler == "heun" else samplers.euler_sample
      return run(model_fn, x, times, time_scale=cfg.time_scale, progress=progress)
    respacing = f"ddim{cfg.sampling_steps}" if cfg.sampler != "ddpm" else str(cfg.sampling_steps)
    schedule = gaussian.make_schedule(cfg.noise_schedule, cfg.num_steps, respacing)
    options = dict(prediction=cfg.prediction, variance=cfg.variance, clip_denoised=cfg.clip_denoised,
                   progress=progress)
    if cfg.sampler in dpm_solver.SAMPLERS:
      return dpm_solver.gaussian_sample(model_fn, schedule, x, rng, sde=sde, prediction=cfg.prediction,
                                        variance=cfg.variance, clip_denoised=cfg.clip_denoised)
    if cfg.sampler == "ddim":
      return samplers.ddim_sample(model_fn, schedule, x, rng, eta=cfg.ddim_eta, **options)
    return samplers.ddpm_sample(model_fn, schedule, x, rng, **options)

  return sample
