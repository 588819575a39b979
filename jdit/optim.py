"""The optimizer of config.optimizer and its learning-rate schedule (optax).

    tx, schedule = make_optimizer(config.optimizer, total_steps=config.num_train_steps)
    grads, metrics = accumulate(grad_fn, batch, rng, k)   # k micro-batches, one update (config.grad_accum_steps)
Optimizers: AdamW (decoupled weight decay), Lion (Chen et al. 2023: sign of an interpolated momentum; b1, b2 are
its two betas) and Adafactor (factored second moments, relative step sizes off, so learning_rate is the rate).
Schedules: constant, cosine or linear decay from the peak rate to final_learning_rate at total_steps, each after
warmup_steps of linear warmup from 0.
"""
import jax
import jax.numpy as jnp
import optax

NAMES = ("adamw", "lion", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup over warmup_steps, then the schedule's decay from learning_rate to final_learning_rate at
  total_steps (constant: no decay)."""
  peak, warmup = opt_cfg.learning_rate, opt_cfg.warmup_steps
  final, name = opt_cfg.get("final_learning_rate", 0.0), opt_cfg.get("schedule", "constant")
  decay_steps = max(total_steps - warmup, 1)
  if name == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=final / peak if peak else 0.0)
  elif name == "linear":
    after = optax.linear_schedule(peak, final, decay_steps)
  elif name == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {name!r}")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt_cfg, total_steps: int = 0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(the configured optimizer with its schedule and optional global-norm clipping, the schedule)."""
  schedule = learning_rate_schedule(opt_cfg, total_steps)
  name = opt_cfg.get("name", "adamw")
  if name == "adamw":
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
  elif name == "lion":
    tx = optax.lion(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay)
  elif name == "adafactor":
    tx = optax.adafactor(schedule, multiply_by_parameter_scale=False, eps=opt_cfg.eps,
                         weight_decay_rate=opt_cfg.weight_decay or None)
  else:
    raise ValueError(f"optimizer.name must be one of {NAMES}, got {name!r}")
  if opt_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), tx)
  return tx, schedule


def micro_batches(batch: dict, k: int) -> dict:
  """(k, B / k, ...) from (B, ...): micro-batch i holds rows i, i + k, i + 2k, ..., so each device's rows of a
  data-parallel batch split evenly over the micro-batches (no data moves between devices)."""
  return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1), batch)


def accumulate(grad_fn, params, batch: dict, rng: jax.Array, k: int):
  """((loss, metrics), grads) of `grad_fn(params, batch, rng) -> ((loss, metrics), grads)` averaged over k
  micro-batches of `batch`, run in turn (a lax.scan: the activations of one micro-batch live at a time), each
  with its own rng (fold_in(rng, i)); k = 1 is grad_fn itself."""
  if k == 1:
    return grad_fn(params, batch, rng)

  def add(total, inputs):
    index, micro = inputs
    out = grad_fn(params, micro, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, total, out), None

  micro = micro_batches(batch, k)
  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda a: a[0], micro), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(add, zeros, (jnp.arange(k), micro))
  return jax.tree.map(lambda a: a / k, total)
