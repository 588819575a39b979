"""Device mesh from config, logical-axis rules, and shardings for state and batches.

config.mesh names the mesh axes and their sizes, e.g. {"data": -1, "fsdp": 1, "tensor": 1} (-1: the rest of
the devices). config.axis_rules maps the model's logical axis names to mesh axes, e.g.
    ("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor")
Batches are split over every data-parallel axis (data and fsdp); parameters and optimizer state follow the rules.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
AXIS_RULES = (  # logical axis -> mesh axes: the default of config.axis_rules
    ("act_batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("vocab", None),
    ("kv", None),
    ("layers", None),  # the stacked block axis of scan_blocks models
)


def mesh_shape(axes: dict, num_devices: int) -> dict:
  """Resolves one -1 entry to the remaining devices; raises naming the mesh fields when they do not fit."""
  sizes = dict(axes)
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if any(size == 0 or size < -1 for size in sizes.values()) or num_devices % fixed:
    raise ValueError(f"mesh: {sizes} does not fit the {num_devices} devices")
  if free:
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh: {' x '.join(f'{k}={v}' for k, v in sizes.items())} = {math.prod(sizes.values())} "
                     f"devices, but {num_devices} are available")
  return sizes


def make_mesh(axes: dict, devices=None) -> Mesh:
  """A mesh over all (or the given) devices with the config's axis names and sizes."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(axes, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # no topology information (e.g. fake CPU devices)
    grid = np.asarray(devices).reshape(tuple(sizes.values()))
  return Mesh(grid, tuple(sizes))


def rules(axis_rules=None) -> tuple:
  """config.axis_rules (default AXIS_RULES) as the tuple of (logical axis, mesh axes) pairs flax reads."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in (AXIS_RULES if axis_rules is None else axis_rules))


def logical_shardings(boxed_tree, mesh: Mesh, axis_rules) -> object:
  """NamedShardings for a tree of nn.Partitioned boxes (leaves without names are replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes present in the mesh."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy arrays -> global jax arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
