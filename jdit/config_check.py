"""The config schema: every field's type and range in one table, checked before anything is compiled or written.

    validate(config, mode="train", workdir="workdir/digits")   # ValueError: "diffusion.sampling_steps=0: ..."
Errors name the field, the value and what is expected. Fields outside the table are errors too (a config built in
Python can gain fields that the command line would refuse). Checks that need the model, the mesh or the data
(divisibility, the objective against the model, shapes against a dataset) stay next to what they check, and run
before compilation as well.
"""
import math
import os
import tempfile
from typing import Any, Callable, NamedTuple

from jdit import optim
from jdit.data import sources
from jdit.diffusion import flow, gaussian, guidance, objective, weighting
from jdit.models import family, fields
from jdit.nn.attention import ATTENTION_BACKENDS
from jdit.nn.layers import REMAT_POLICIES
from jdit.nn.posemb import POS_EMBEDS
from jdit.models.vae import VAE_CONFIGS

MODES = ("train", "sample", "fid_samples")
DTYPES = ("float32", "bfloat16", "float16")


class Spec(NamedTuple):
  ok: Callable[[Any], bool]
  expected: str


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int | None = None, *also) -> Spec:
  """An int >= low, or one of the special values `also` (e.g. -1 or None: take it from the preset)."""
  text = "an integer" + (f" >= {low}" if low is not None else "") + "".join(f" or {a!r}" for a in also)
  return Spec(lambda v: (v in also and (v is None or _is_int(v))) or (_is_int(v) and (low is None or v >= low)),
              text)


def number(low: float | None = None, high: float | None = None, open_low: bool = False,
           open_high: bool = False) -> Spec:
  lo = "" if low is None else f"{'(' if open_low else '['}{low}"
  hi = "" if high is None else f"{high}{')' if open_high else ']'}"
  text = f"a number in {lo}, {hi}" if low is not None and high is not None else \
      f"a number {'>' if open_low else '>='} {low}" if low is not None else "a number"

  def ok(v):
    if not _is_number(v) or not math.isfinite(v):
      return False
    above = low is None or (v > low if open_low else v >= low)
    below = high is None or (v < high if open_high else v <= high)
    return above and below
  return Spec(ok, text)


def one_of(*choices) -> Spec:
  return Spec(lambda v: any(v == c and type(v) is type(c) for c in choices), f"one of {', '.join(map(repr, choices))}")


def maybe(spec: Spec) -> Spec:
  """None (from the preset) or `spec`."""
  return Spec(lambda v: v is None or spec.ok(v), f"None or {spec.expected}")


def pair(spec: Spec) -> Spec:
  return Spec(lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(spec.ok(x) for x in v),
              f"a pair ({spec.expected}, ...)")


def sequence(spec: Spec) -> Spec:
  return Spec(lambda v: isinstance(v, (tuple, list)) and all(spec.ok(x) for x in v),
              f"a tuple of {spec.expected.replace('an ', '').replace('a ', '')}s")


def either(*specs: Spec) -> Spec:
  return Spec(lambda v: any(s.ok(v) for s in specs), " or ".join(s.expected for s in specs))


BOOL = Spec(lambda v: isinstance(v, bool), "True or False")
TEXT = Spec(lambda v: isinstance(v, str), "a string")
PROBABILITY = number(0.0, 1.0)
SIZE = either(integer(1), pair(integer(1)))
AXES = Spec(lambda v: v is None or isinstance(v, str) or (isinstance(v, (tuple, list))
                                                           and all(isinstance(a, str) for a in v)),
            "None, a mesh axis or a tuple of mesh axes")

SCHEMA = {
    "seed": integer(0),
    "batch_size": integer(1),
    "grad_accum_steps": integer(1),
    "num_train_steps": integer(1),
    "ema_decay": PROBABILITY,
    "log_every": integer(1),
    "checkpoint_every": integer(1),
    "keep_checkpoints": integer(1),
    "sample_every": integer(0),
    "resume": TEXT,
    "init_from": TEXT,
    "axis_rules": Spec(lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) and AXES.ok(r[1]) for r in v),
        "a tuple of (logical axis, mesh axes) pairs"),
    "mesh.data": integer(1, -1), "mesh.fsdp": integer(1), "mesh.tensor": integer(1),
    "data.source": Spec(lambda v: isinstance(v, str) and sources.known(v),
                        f"one of {', '.join(map(repr, sources.SOURCES))} or the import path of a source module"),
    "data.name": TEXT, "data.data_dir": TEXT, "data.split": TEXT, "data.text_dir": TEXT, "data.images_dir": TEXT,
    "data.image_size": integer(1),
    "data.channels": one_of(1, 3),
    "data.random_flip": BOOL,
    "data.seed": integer(0),
    "data.num_workers": integer(0),
    "data.read_threads": integer(0),
    "data.latent_sampling": one_of("sample", "mean"),
    "data.caption_dropout_prob": PROBABILITY,
    "data.buckets": TEXT,
    "data.bucket_max_crop": number(0.0, 1.0, open_high=True),
    "data.bucket_repeat": integer(1),
    "data.rotate": one_of(0, 90, 180, 270),
    "vae.path": TEXT,
    "vae.name": one_of(*VAE_CONFIGS),
    "vae.decode_tile": integer(0),
    "optimizer.name": one_of(*optim.NAMES),
    "optimizer.learning_rate": number(0.0),
    "optimizer.warmup_steps": integer(0),
    "optimizer.schedule": one_of(*optim.SCHEDULES),
    "optimizer.final_learning_rate": number(0.0),
    "optimizer.weight_decay": number(0.0),
    "optimizer.b1": number(0.0, 1.0, open_high=True), "optimizer.b2": number(0.0, 1.0, open_high=True),
    "optimizer.eps": number(0.0, open_low=True),
    "optimizer.grad_clip": number(0.0),
    "diffusion.kind": one_of(*objective.KINDS),
    "diffusion.noise_schedule": one_of(*gaussian.NOISE_SCHEDULES),
    "diffusion.num_steps": integer(1),
    "diffusion.prediction": one_of(*gaussian.PREDICTIONS),
    "diffusion.variance": one_of(*gaussian.VARIANCES),
    "diffusion.clip_denoised": BOOL,
    "diffusion.timestep_sampling": one_of(*weighting.DENSITIES),
    "diffusion.logit_mean": number(), "diffusion.logit_std": number(0.0, open_low=True),
    "diffusion.mode_scale": number(),
    "diffusion.loss_weighting": one_of(*weighting.WEIGHTINGS),
    "diffusion.min_snr_gamma": number(0.0, open_low=True),
    "diffusion.loss": one_of(*weighting.LOSSES),
    "diffusion.huber_c": number(0.0, open_low=True),
    "diffusion.shift": number(0.0, open_low=True),
    "diffusion.flow_schedule": one_of(*flow.SCHEDULES),
    "diffusion.time_scale": number(0.0, open_low=True),
    "diffusion.sampler": one_of(*(s for kind in objective.KINDS for s in objective.SAMPLERS[kind])),
    "diffusion.sampling_steps": integer(1),
    "diffusion.ddim_eta": number(0.0),
    "diffusion.guidance_scale": number(0.0),
    "diffusion.guidance_mode": one_of(*guidance.GUIDANCE_MODES),
    "diffusion.apg_eta": number(), "diffusion.apg_norm_threshold": number(0.0), "diffusion.apg_momentum": number(),
    "diffusion.slg_layers": sequence(integer(0)), "diffusion.slg_scale": number(),
    "diffusion.slg_start": number(0.0, 1.0), "diffusion.slg_stop": number(0.0, 1.0),
    "diffusion.guidance_interval": Spec(lambda v: pair(number()).ok(v) and v[0] <= v[1],
                                        "a pair (low, high) of model timesteps with low <= high"),
    "lora.rank": integer(0), "lora.alpha": number(0.0),
    "lora.targets": sequence(TEXT),
    "lora.init": one_of("kaiming", "gaussian"),
    "lora.dropout": number(0.0, 1.0, open_high=True),
    "lora.base_dtype": one_of("float32", "bfloat16"),
    "sample.num_samples": integer(1),
    "sample.classes": sequence(integer(0)),
    "sample.per_device_batch": integer(1),
    "sample.seed": integer(0),
    "sample.fid": BOOL,
    "sample.resolution": Spec(lambda v: v in ((), []) or pair(integer(1)).ok(v), "() or (height, width) in pixels"),
    "sample.aspect_ratio": TEXT,
    "sample.fid_samples": integer(1), "sample.fid_shard_size": integer(1),
    "sample.prompts": either(TEXT, sequence(TEXT)),
    "sample.t5": BOOL,
    "sample.loras": TEXT,
    "eval.reference": TEXT, "eval.inception": TEXT,
    "eval.fid_every": integer(0), "eval.fid_num_samples": integer(2), "eval.batch_size": integer(1),
    "repa.encoder": TEXT, "repa.depth": integer(1), "repa.projector_dim": integer(1),
    "repa.weight": number(0.0),
    "eval.val_every": integer(0), "eval.val_split": TEXT, "eval.val_data_dir": TEXT, "eval.val_num_samples": integer(1),
    "eval.val_timesteps": integer(1), "eval.val_seed": integer(0),
}

MODEL_NAMED = {  # config.model fields whose name fixes their values, in any family
    "variant": TEXT,  # the family checks it names a preset
    "dtype": one_of(*DTYPES),
    "attention_backend": one_of(*ATTENTION_BACKENDS),
    "remat": one_of(*REMAT_POLICIES),
    "pos_embed": one_of(*POS_EMBEDS),
    "class_dropout_prob": PROBABILITY,
    "dropout": PROBABILITY,
}


def field_spec(field) -> Spec:
  """The spec of a family's dataclass field from its type and default: ints >= 0 (or the default's negative
  special value, e.g. -1: unused), numbers, True/False, strings, tuples of numbers; a side or an (H, W) pair."""
  kind = fields.config_type(field.type)
  if field.name in MODEL_NAMED:
    return MODEL_NAMED[field.name]
  if kind is int:
    return integer(0, *([field.default] if _is_int(field.default) and field.default < 0 else []))
  if kind is float:
    return number()
  if kind is bool:
    return BOOL
  if kind is str:
    return TEXT
  if kind is tuple:
    return sequence(number())
  return SIZE


def model_schema(name: str) -> dict:
  """config.model's schema for family `name`, derived from its declared fields: None (from the preset) is
  accepted where a preset sets the field."""
  if not family.known(name):
    raise ValueError(f"model.family={name!r}: expected one of {', '.join(map(repr, family.FAMILIES))} or the import "
                     "path of a family module")
  module = family.get(name)
  from_preset = fields.preset_fields(module.PRESETS)
  schema = {"family": Spec(family.known, "a model family"), "variant": TEXT}
  for field in fields.declared(module.MODEL):
    spec = field_spec(field)
    schema[field.name] = maybe(spec) if field.name in from_preset else spec
  return schema


def leaves(config, prefix: str = ""):
  """(dotted path, value) of every field of a (nested) ConfigDict."""
  for key in config.keys():
    value = config[key]
    if hasattr(value, "keys") and not isinstance(value, dict):  # a nested ConfigDict
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def _schema_for(config) -> dict:
  name = config.model.get("family", "dit") if "model" in config else "dit"
  return {**SCHEMA, **{f"model.{k}": v for k, v in model_schema(name).items()}}


def check_fields(config) -> None:
  """Each field against the schema: unknown fields, wrong types and values out of range are one-line errors."""
  schema = _schema_for(config)
  for name, value in leaves(config):
    if name not in schema:
      section = name.rsplit(".", 1)[0] + "." if "." in name else ""
      known = sorted(k[len(section):] for k in schema if k.startswith(section) and "." not in k[len(section):])
      raise ValueError(f"{name}: unknown config field (known{' in ' + section[:-1] if section else ''}: "
                       f"{', '.join(known)})")
    if not schema[name].ok(value):
      raise ValueError(f"{name}={value!r}: expected {schema[name].expected}")


def _local_path(value: str) -> bool:
  return "://" not in value


def _check_context(config, mode: str) -> None:
  """Fields that depend on one another, on the mode, or on the filesystem."""
  for field in ("resume", "init_from"):
    value = config[field]
    if value and _local_path(value) and not os.path.exists(value):
      raise ValueError(f"{field}={value!r}: no such file or directory")
  if config.resume and _local_path(config.resume) and not os.path.isdir(config.resume):
    raise ValueError(f"resume={config.resume!r}: expected another run's workdir (a directory)")
  if config.data.buckets:
    from jdit.data.buckets import parse_buckets
    parse_buckets(config.data.buckets)
    if config.data.get("rotate") in (90, 270):
      raise ValueError(f"data.rotate={config.data.rotate} turns (H, W) images into (W, H): not with data.buckets; "
                       "use 0 or 180")
  if config.sample.get("loras"):
    from jdit.lora import parse_loras
    parse_loras(config.sample.loras)
  if config.sample.aspect_ratio:
    from jdit.data.buckets import parse_aspect_ratio
    parse_aspect_ratio(config.sample.aspect_ratio)
  if mode == "sample" and isinstance(config.sample.prompts, str):  # a prompts file: it must exist and hold some
    from jdit.prompts import read_prompts
    read_prompts(config.sample.prompts)
  if mode == "fid_samples":
    from jdit.models.conditioning import text_conditioned
    if text_conditioned(family.create(config.model)):
      raise ValueError(f"--mode=fid_samples for model.family={config.model.family!r}: FID sets are "
                       "class-balanced; sample prompts with --mode=sample --config.sample.prompts=FILE")
  _check_evaluation(config, mode)


def _check_evaluation(config, mode: str) -> None:
  """config.eval: the reference batch and the Inception weights exist when an evaluation will run."""
  evaluation = config.get("eval")
  if evaluation is None or not ((mode == "fid_samples" and evaluation.reference)
                                or (mode == "train" and evaluation.fid_every)):
    return
  if mode == "train":
    from jdit.models.conditioning import text_conditioned
    if text_conditioned(family.create(config.model)):
      raise ValueError(f"eval.fid_every={config.eval.fid_every}: the training FID is for class-conditional and "
                       f"unconditional models, not model.family={config.model.family!r} (text)")
    if not config.eval.reference:
      raise ValueError(f"eval.fid_every={config.eval.fid_every}: needs eval.reference (an ADM reference batch, "
                       "e.g. from tools/evaluate.py --write_ref) and eval.inception")
  for field, what in (("reference", "an ADM reference batch (.npz)"),
                      ("inception", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")):
    value = evaluation[field]
    if not value:
      raise ValueError(f"eval.{field}: expected the path of {what}")
    if not os.path.isfile(value):
      raise ValueError(f"eval.{field}={value!r}: no such file (expected {what})")


def _filesystem(path: str) -> str:
  """The type of the filesystem mounted at or above `path` (from /proc/mounts), or ''."""
  try:
    with open("/proc/mounts") as f:
      mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
  except OSError:
    return ""
  inside = [(point, kind) for point, kind in mounts if path == point or path.startswith(point.rstrip("/") + "/")]
  return max(inside, key=lambda m: len(m[0]))[1] if inside else ""


def check_workdir(workdir: str) -> None:
  """ValueError naming the path and the reason when the workdir cannot be created or written: a regular file on
  the way, no write permission, a read-only or special filesystem. Nothing is left behind by the check."""
  if not workdir:
    raise ValueError("--workdir is empty: expected a directory for checkpoints and samples")
  if not _local_path(workdir):
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is" if existing == path else f"is under {existing}, which is"
    raise ValueError(f"--workdir={workdir} {what} a file, not a directory")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".jdit-write-check-", dir=existing))
  except OSError as e:
    kind = _filesystem(existing)
    where = "write in it" if existing == path else f"create directories in {existing}"
    raise ValueError(f"--workdir={workdir}: cannot {where} ({e.strerror}"
                     f"{f'; a {kind} filesystem' if kind else ''})") from None


def validate(config, mode: str = "train", workdir: str | None = None) -> None:
  """The whole config (and the workdir, when given) for `mode`, before anything is compiled or written."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
  check_fields(config)
  _check_context(config, mode)
  if workdir is not None:
    check_workdir(workdir)
