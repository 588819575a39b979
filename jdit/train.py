"""Training: train_and_evaluate(config, workdir) and the pure, module-level train_step.

State is created already sharded (eval_shape -> logical specs -> mesh shardings -> jit(init, out_shardings));
resume order: workdir, then config.resume, then config.init_from (weights only), then scratch.
"""
import contextlib
import functools
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdit import checkpoint, config_check, flops, lora, lora_base, optim, repa, sharding
from jdit import config as jdit_config
from jdit.data import pipeline, sources, transforms
from jdit.diffusion import objective
from jdit.eval import stability
from jdit.models import family
from jdit.validation import Validation


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # what is trained: the model's parameters, or a LoRA run's adapters
  opt_state: Any
  ema_params: Any
  base: Any = None  # LoRA runs: the frozen model parameters (no gradient, no optimizer state, not checkpointed)


# ----------------------------------------------------------------------------------------------
#                          Setup: mesh, model, optimizer, sharded state, step
# ----------------------------------------------------------------------------------------------

def _init_state(model, tx, rng, unbox: bool, adapters=None, base_dtype: str = "float32",
                with_base: bool = True, alignment=None) -> TrainState:
  """A fresh state; with LoRA `adapters`, of the adapters (A random, B zero) and, if `with_base`, a random frozen
  base in base_dtype (for compiling and tests: training loads config.init_from); with a REPA `alignment`, its
  projector beside the model's parameters (trained, not in the EMA)."""
  with lora.active(adapters):
    variables = model.init(rng, *model.dummy_inputs())
  variables = nn.unbox(variables) if unbox else dict(variables)
  params = variables["params"] if adapters is None else variables[lora.COLLECTION]
  base = lora_base.cast(variables["params"], base_dtype) if adapters is not None and with_base else None
  ema = params
  if alignment is not None:
    projector = alignment.init(jax.random.fold_in(rng, 1))
    params = {**params, repa.PROJECTOR: nn.unbox(projector) if unbox else projector}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=_fitting_boxes(tx.init(params)),
                    ema_params=ema, base=base)


def _fitting_boxes(opt_state):
  """The optimizer state with the logical names of its parameter kept only where the shapes still fit: factored
  moments (Adafactor's rows and columns) are smaller than their parameter, and replicated."""
  boxed = lambda x: isinstance(x, nn.Partitioned)
  fits = lambda leaf: leaf.value if boxed(leaf) and leaf.value.ndim != len(leaf.names) else leaf
  return jax.tree.map(fits, opt_state, is_leaf=boxed)


def sharded_init(model, tx, mesh, axis_rules, with_base: bool = True, **options) -> tuple[Any, Any]:
  """(init: rng -> state, placed directly into its shardings; the state shardings) from the logical names;
  `options` (adapters, base_dtype; alignment) make it a LoRA run's state (a REPA run's)."""
  make = functools.partial(_init_state, model, tx, with_base=with_base, **options)
  boxed = jax.eval_shape(functools.partial(make, unbox=False), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, axis_rules)
  return jax.jit(functools.partial(make, unbox=True), out_shardings=shardings), shardings


def abstract_state(state: TrainState) -> TrainState:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn, tx, schedule, ema_decay: float,
               adapters: lora.Spec | None = None, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One optimizer step; rng is folded with the step, so a resumed run draws the same noise. A LoRA run's step
  (`adapters`) differentiates the adapters only: the base gets no gradient and no optimizer state. With
  grad_accum_steps = k, the batch's k micro-batches run in turn and their mean gradient makes the update."""
  rng = jax.random.fold_in(rng, state.step)
  if adapters is None:
    objective_fn = lambda params, micro, key: loss_fn(params, micro, key)
  else:
    objective_fn = lambda trained, micro, key: loss_fn(state.base, micro, key, trained)
  with lora.active(adapters):
    grad_fn = jax.value_and_grad(objective_fn, has_aux=True)
    (loss, metrics), grads = optim.accumulate(grad_fn, state.params, batch, rng, grad_accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params,
                     repa.model_params(params))  # a REPA projector trains outside the EMA
  # Norms of what the update reads anyway (XLA fuses them into it): the norms of `updates` and of the new params
  # read the whole model again each step (0.87 GB, 0.37 ms per DiT-XL block on a v5p; docs/benchmarks.md).
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(state.params),
                 learning_rate=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def sampling_params(state: TrainState, adapters: lora.Spec | None):
  """The weights sampling grids and evaluations use: the EMA parameters, or the base with the EMA adapters."""
  return state.ema_params if adapters is None else lora.merge(state.base, state.ema_params, adapters.scale)


class Setup(NamedTuple):
  """What `setup` builds: run `init` and `step` inside `context()`."""
  mesh: jax.sharding.Mesh
  model: nn.Module
  axis_rules: tuple
  init: Callable  # rng -> TrainState, created directly in its shardings
  state_shardings: Any
  step: Callable  # jitted train_step(state, batch, rng) -> (state, metrics), state donated
  init_trainable: Callable  # rng -> the state without a LoRA run's frozen base (= init for other runs)
  adapters: lora.Spec | None = None  # LoRA runs (config.lora.rank > 0): what is trained
  alignment: repa.Alignment | None = None  # REPA runs (config.repa.encoder): the aligned block and its projector

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical axis rules the model's sharding annotations need."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.axis_rules):
      yield


def check_batch(config, mesh) -> None:
  dp, k = sharding.data_parallel_size(mesh), config.get("grad_accum_steps", 1)
  if config.batch_size % dp:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the data-parallel size {dp} "
                     f"(mesh {dict(mesh.shape)})")
  if config.batch_size % (dp * k):
    raise ValueError(f"grad_accum_steps={k}: batch_size={config.batch_size} must split into {k} micro-batches "
                     f"divisible by the data-parallel size {dp}")


def setup(config, devices=None, model=None) -> Setup:
  """mesh -> model -> optimizer -> axis rules -> sharded state init -> jitted step from config (the model of
  config.model unless `model` is given), over `devices` (default: all); checks the model, mesh, batch and
  diffusion fields first (one-line errors naming the field). Nothing is allocated."""
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  model = family.create(config.model) if model is None else model
  check_batch(config, mesh)
  objective.check_config(config.diffusion, model)
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
  axis_rules = sharding.rules(config.axis_rules)
  adapters = lora_base.spec(config, model)
  options = dict(adapters=adapters, base_dtype=config.lora.base_dtype) if adapters else {}
  alignment = None
  if config.repa.encoder:
    alignment = options["alignment"] = repa.Alignment(config.repa, model, repa.encoder_width(config.repa.encoder))
  init, shardings = sharded_init(model, tx, mesh, axis_rules, **options)
  init_trainable = sharded_init(model, tx, mesh, axis_rules, with_base=False, **options)[0] if adapters else init
  step = functools.partial(train_step, loss_fn=objective.make_loss_fn(model, config.diffusion, alignment), tx=tx,
                           schedule=schedule, ema_decay=config.ema_decay, adapters=adapters,
                           grad_accum_steps=config.get("grad_accum_steps", 1))
  step = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return Setup(mesh, model, axis_rules, init, shardings, step, init_trainable, adapters, alignment)


# ----------------------------------------------------------------------------------------------
#                                  Data checks and restore
# ----------------------------------------------------------------------------------------------

def check_data(config, model, source) -> None:
  """One-line errors naming the field when the data does not fit the model, before anything is written."""
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {jax.process_count()} hosts")
  sources.check(config.data, model, source)
  if config.repa.encoder:
    repa.check(config, sources.get(config.data.source))


def _frozen_base(config, stored, state, run, log) -> tuple[TrainState, dict]:
  """A LoRA run's state with its frozen base (config.init_from, else the path the run's checkpoint `stored`
  records, checked against its hash) and the record its checkpoints will store."""
  path = lora_base.base_path(config, stored)
  base, digest = lora_base.load(path, run.model, run.state_shardings.base)
  lora_base.check(stored, digest, path, config.lora)
  log(f"LoRA: {flops.count_params(state.params):,} adapter parameters (rank {run.adapters.rank}, alpha "
      f"{run.adapters.alpha:g}) on the frozen {config.lora.base_dtype} base {path} ({flops.count_params(base):,} "
      f"parameters, content hash {digest})")
  record = lora_base.record(run.adapters, config.lora.base_dtype, path, digest)
  return state.replace(base=lora_base.cast(base, config.lora.base_dtype)), record


def restore_or_init(config, workdir_ckpt, state, iterator, run, log):
  """(state, iterator, LoRA record or None). Resume order: this workdir, config.resume (another run's workdir),
  config.init_from (weights only). A LoRA run (run.adapters) resumes its adapters so and always takes its frozen
  base from config.init_from or the path its checkpoint records."""
  source, stored, record = None, None, None
  if workdir_ckpt.latest_step() is not None:
    source = workdir_ckpt
  elif config.resume:
    source = checkpoint.TrainCheckpointer(os.path.join(config.resume, "checkpoints"))
    if source.latest_step() is None:
      source.close()
      raise FileNotFoundError(f"config.resume={config.resume}: no checkpoint in {config.resume}/checkpoints")
  if run.adapters is not None:
    stored = checkpoint.lora_record(source.directory) if source is not None else None
    state, record = _frozen_base(config, stored, state, run, log)
  if source is not None:
    try:
      restored, iterator, step = source.restore(abstract_state(state), iterator, run.model, log)
      state = restored.replace(base=state.base)  # the restored tree holds the base's shapes only
    finally:
      if source is not workdir_ckpt:
        source.close()
    where = source.directory if source is workdir_ckpt else f"config.resume={config.resume}"
    log(f"resuming from {where} step {step}")
  elif config.init_from and run.adapters is None:
    from jdit import convert
    shardings = jax.tree.map(lambda a: a.sharding, repa.model_params(state.params))
    params = convert.load_placed(config.init_from, run.model, shardings)
    ema = jax.tree.map(jnp.copy, params)  # own buffers: the train step donates both trees
    log(f"initialized weights from config.init_from={config.init_from}")
    state = state.replace(params={**state.params, **params}, ema_params=ema)  # a REPA projector stays as made
  return state, iterator, record


# ----------------------------------------------------------------------------------------------
#                                          The loop
# ----------------------------------------------------------------------------------------------

class Preempted(Exception):
  """SIGTERM stopped training after a checkpoint was saved: the run must be restarted to finish."""


class NonFiniteLoss(FloatingPointError):
  """Training stopped on a non-finite loss; the checkpoints written before it are kept."""


class _Preemption:
  """SIGTERM (how TPU VMs are preempted) sets a flag; the loop checkpoints and exits at the next step."""

  def __init__(self):
    self.previous = signal.signal(signal.SIGTERM, self._handle)
    # a SIGTERM whose exception a callback dropped before the loop (main raises it again on a timer): ours now
    self.requested = bool(getattr(self.previous, "requested", False))
    if self.requested:
      signal.setitimer(signal.ITIMER_REAL, 0)

  def _handle(self, *_):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self.previous)


def _progress_line(step, total, metrics, steps_per_sec, batch_size) -> str:
  """One progress line; the rate and ETA (None right after the first step, which compiles) exclude compilation."""
  line = f"step {step}/{total} | loss {metrics['loss']:.4f}"
  if not steps_per_sec:
    return line
  eta = (total - step) / steps_per_sec
  return (f"{line} | {steps_per_sec:.2f} steps/s | {steps_per_sec * batch_size:.1f} img/s | "
          f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def quiet_tensorflow() -> None:
  """TensorFlow, which clu's metric writers import (jdit computes nothing with it), prints a oneDNN notice at
  start-up through absl's C++ logging, and absl a notice about that: not ours. Off unless set otherwise."""
  if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def training_fid(fid, sampler, config, model, params, mesh, decoder) -> float:
  """The FID of the config.eval.fid_num_samples images --mode=fid_samples would write with these weights
  (class-balanced, the same noise at every evaluation)."""
  from jdit import fid_samples
  return fid(fid_samples.evaluation_set(sampler, config, model, params, mesh, config.eval.fid_num_samples, decoder))


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains config.num_train_steps steps into workdir (checkpoints, TensorBoard events, sample grids)."""
  quiet_tensorflow()
  from clu import metric_writers

  from jdit import sample as sample_lib

  config_check.validate(config, "train", workdir)
  log = (lambda msg: print(msg, flush=True)) if jax.process_index() == 0 else (lambda msg: None)
  run = setup(config)
  model, mesh = run.model, run.mesh
  source = sources.open_source(config.data)
  check_data(config, model, source)
  decoder, grid_conditions, captions, fid = None, None, None, None
  if (config.sample_every or config.eval.fid_every) and config.vae.path:  # a VAE unlike the latents fails now
    decoder, _ = sample_lib.make_decoder(config.vae, config.init_from, sources.latent_meta(config.data, source))
  if config.sample_every:  # grids of text sources: their captions; of the rest: one row per class
    grid_conditions, captions = sources.grid_conditions(config.data, config.sample, source)
  if config.eval.fid_every:  # the Inception weights and the reference statistics, once
    from jdit.eval.monitor import TrainingFid
    fid = TrainingFid(config.eval, log)
  with run.context():
    state = run.init_trainable(jax.random.key(config.seed))
  validation = Validation(config, model, mesh, run.adapters) if config.eval.val_every else None
  encoder = repa.Encoder(config.repa.encoder, model, mesh) if run.alignment is not None else None
  iterator = iter(pipeline.dataset_from_config(config.data, config.batch_size, source, jax.process_index(),
                                               jax.process_count(), log))
  checkpoints = os.path.join(workdir, "checkpoints")
  created = [d for d in (workdir, checkpoints) if not os.path.exists(d)]
  ckpt = checkpoint.TrainCheckpointer(checkpoints, config.keep_checkpoints)
  try:
    state, iterator, lora_record = restore_or_init(config, ckpt, state, iterator, run, log)
  except BaseException:  # nothing was trained: leave no empty directories behind
    ckpt.close()
    for directory in reversed(created):
      with contextlib.suppress(OSError):  # not empty: keep it
        os.rmdir(directory)
    raise
  if jax.process_index() == 0:
    jdit_config.save_run(config, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({"model": model.describe(), "batch_size": config.batch_size})
  preemption = _Preemption()
  rng = jax.random.key(config.seed + 1)
  first = step = int(jax.device_get(state.step))
  log(f"training {model.describe()} for {config.num_train_steps} steps from step {first} on "
      f"{jax.device_count()} devices, mesh {dict(mesh.shape)}")
  last_good, tic, tic_step, sampler = first, time.time(), first, None
  shapes = set()  # input shapes seen: the train step is compiled once for each
  try:
    while step < config.num_train_steps:
      batch = sharding.global_batch(transforms.to_model_batch(next(iterator)), mesh)
      height, width = batch["image"].shape[1:3]
      if config.data.buckets and (height, width) not in shapes:
        shapes.add((height, width))
        log(f"step {step + 1}: compiling the train step for bucket {height}x{width} ({len(shapes)} so far)")
      with run.context():
        if encoder is not None:  # REPA: the frozen encoder's features of the clean images
          batch = encoder(batch)
        state, metrics = run.step(state, batch, rng)
      step += 1
      if step == first + 1:  # the first step compiles: rates and ETAs count from its end
        jax.block_until_ready(metrics)
        log(f"compiled and ran the first step in {time.time() - tic:.1f}s")
        tic, tic_step = time.time(), step
      final = step == config.num_train_steps
      if step % config.log_every == 0 or final or preemption.requested or step % config.checkpoint_every == 0:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
          kept = (f"the last good checkpoint (step {ckpt.latest_step()}) is kept in {checkpoints}"
                  if ckpt.latest_step() is not None else "no checkpoint had been written yet")
          raise NonFiniteLoss(f"non-finite loss {metrics['loss']} at step {step}; stopping, {kept}")
        rate = (step - tic_step) / max(time.time() - tic, 1e-9) if step > tic_step else None
        speed = dict(steps_per_sec=rate, images_per_sec=rate * config.batch_size) if rate else {}
        writer.write_scalars(step, dict(metrics, **speed))
        log(_progress_line(step, config.num_train_steps, metrics, rate, config.batch_size))
        tic, tic_step = time.time(), step
      if step % config.checkpoint_every == 0 or final or preemption.requested:
        ckpt.save(state, model, iterator, force=True, lora=lora_record)
        if run.adapters is not None:
          lora_base.write_adapter_file(workdir, model, state.ema_params, run.adapters)
        last_good = step
      if config.sample_every and (step % config.sample_every == 0 or final):
        if sampler is None:
          sampler = sample_lib.make_sampler(config, model)
        grid = sample_lib.write_grid(sampler, config, model, sampling_params(state, run.adapters), mesh, workdir,
                                     step, decoder, grid_conditions, captions)
        writer.write_images(step, {"samples": grid[None]})
      if fid is not None and (step % config.eval.fid_every == 0 or final):
        sampler = sampler or sample_lib.make_sampler(config, model)
        value = training_fid(fid, sampler, config, model, sampling_params(state, run.adapters), mesh, decoder)
        writer.write_scalars(step, {"fid": value})
        log(f"step {step}: FID {value:.4f} of {config.eval.fid_num_samples} EMA samples against "
            f"{config.eval.reference}")
      if validation is not None and (step % config.eval.val_every == 0 or final):
        with run.context():
          numbers = validation(state.params, state.base)
        writer.write_scalars(step, numbers)
        writer.write_images(step, {"val/curves": stability.curve_image(numbers)[None]})
        log(f"step {step}: validation loss {numbers['val/loss']:.6f} ({config.eval.val_num_samples} held-out "
            f"examples x {config.eval.val_timesteps} timesteps); x0_hat variance {numbers['val/x0_variance']:.6g}, "
            f"change {numbers['val/x0_change']:.6g}, error {numbers['val/x0_error']:.6g}")
      if preemption.requested:
        break
  finally:
    preemption.restore()
    ckpt.close()
    writer.flush()
  if preemption.requested:
    raise Preempted(f"SIGTERM: saved a checkpoint at step {step} of {config.num_train_steps} in {checkpoints}; "
                    "run the same command again to resume")
  if config.data.buckets:  # the jit cache's own count: one compilation per bucket shape, none for the rest
    log(f"compiled the train step {run.step._cache_size()} times for {len(shapes)} bucket shapes")
  log(f"done at step {step}; last checkpoint at step {last_good} in {checkpoints}")
  return state
