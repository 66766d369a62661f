"""The project's one device mesh, axes ('pop', 'data', 'fsdp', 'seq'), and shardings over it.

'pop' spreads the candidates of a search population; 'data' splits the batch; 'fsdp' splits the
batch too and also the parameters and optimizer state (fully sharded data parallel); 'seq' splits
one long sequence (ring attention). On one device every size is 1 and the same code runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

POP_AXIS, DATA_AXIS, FSDP_AXIS, SEQ_AXIS = 'pop', 'data', 'fsdp', 'seq'
# Outermost first: 'seq' (a ppermute per layer) and 'fsdp' (an all-gather per layer) innermost.
AXES = (POP_AXIS, DATA_AXIS, FSDP_AXIS, SEQ_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension splits over both
REST = (0, -1)  # a size meaning "the devices left over by the other axes"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; one of them may be 0 or -1 (the rest of the devices)."""

  data: int = 1
  fsdp: int = 1
  seq: int = 1
  pop: int = 1

  def __post_init__(self):
    for name in AXES:
      size = getattr(self, name)
      if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < -1:
        raise ValueError(f"mesh.{name} must be a positive integer, or 0 / -1 for the rest of the "
                         f"devices; got {size!r}.")
    rest = [name for name in AXES if getattr(self, name) in REST]
    if len(rest) > 1:
      raise ValueError(f"mesh.{rest[0]} and mesh.{rest[1]} both ask for the rest of the devices "
                       f"(0 or -1); give all but one of them a size.")

  def shape(self, num_devices: int) -> dict[str, int]:
    """{axis: size} with the 'rest' axis resolved against `num_devices`; raises if it won't fit."""
    fixed = {name: getattr(self, name) for name in AXES if getattr(self, name) not in REST}
    used = math.prod(fixed.values())
    rest = [name for name in AXES if name not in fixed]
    if rest:
      if num_devices % used:
        raise ValueError(
            f"mesh.{rest[0]} takes the rest of the devices, but the other axes' product {used} "
            f"does not divide the {num_devices} devices; set mesh.{rest[0]} explicitly or make "
            f"{' x '.join(f'mesh.{n}={v}' for n, v in fixed.items())} divide {num_devices}.")
      fixed[rest[0]] = num_devices // used
    elif used > num_devices:
      big = max(fixed, key=fixed.get)
      raise ValueError(
          f"The mesh needs {' x '.join(f'{n}={v}' for n, v in fixed.items())} = {used} devices "
          f"but {num_devices} are available; shrink mesh.{big} (or set one axis to -1), or "
          f"simulate CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count={used}.")
    return {name: int(fixed[name]) for name in AXES}

  def replace(self, **changes) -> 'MeshConfig':
    return dataclasses.replace(self, **changes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None,
              **sizes: int) -> jax.sharding.Mesh:
  """A (pop, data, fsdp, seq) mesh of Auto axes over the first devices needed (or `devices`).

  `make_mesh(MeshConfig(fsdp=4, seq=2))`, or the sizes as keywords: `make_mesh(seq=8)`.
  """
  if config is None:
    config = MeshConfig(**sizes)
  elif sizes:
    config = config.replace(**sizes)
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  # jax.make_mesh defaults to Explicit axes in jax 0.10; this project's code relies on Auto
  # (sharding propagation by XLA, shard_map for the collectives written by hand).
  return jax.make_mesh(tuple(shape.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices[:math.prod(shape.values())])


def validate_mesh_axis(mesh, axis: str) -> None:
  """Raises if there is no mesh (none passed and none set) or it lacks `axis`."""
  if mesh is None or mesh.empty:
    raise ValueError(f"No device mesh: pass mesh= or run under `with jax.set_mesh(mesh):` with "
                     f"a mesh that has a {axis!r} axis (mesh.make_mesh).")
  if axis not in mesh.axis_names:
    raise ValueError(f"The mesh has axes {tuple(mesh.axis_names)} but no {axis!r} axis; build "
                     f"it with mesh.make_mesh(MeshConfig(...)).")


def current_mesh(mesh=None):
  """`mesh` if given, else the mesh set by `jax.set_mesh` (possibly empty)."""
  return jax.sharding.get_abstract_mesh() if mesh is None else mesh


def sequence_sharding(mesh: jax.sharding.Mesh, ndim: int = 2, axis: str = SEQ_AXIS
                      ) -> NamedSharding:
  """Sharding of an array [B, T, ...] of rank `ndim` with T split over `axis`."""
  validate_mesh_axis(mesh, axis)
  return NamedSharding(mesh, P(None, axis, *([None] * (ndim - 2))))


def shard_sequence(x: jax.Array, mesh: jax.sharding.Mesh, axis: str = SEQ_AXIS) -> jax.Array:
  """Places x[B, T, ...] with its length split over the mesh axis `axis`."""
  size = mesh.shape[axis] if axis in mesh.axis_names else None
  if size is not None and x.shape[1] % size:
    raise ValueError(f"Length {x.shape[1]} is not divisible by the {axis!r} axis size {size}.")
  return jax.device_put(x, sequence_sharding(mesh, x.ndim, axis))


# ----------------------------------------------------------------------------- population ('pop')
def population_mesh(pop: int | None = None) -> jax.sharding.Mesh:
  """A mesh spreading search candidates over `pop` devices (default: all devices)."""
  return make_mesh(MeshConfig(pop=-1 if pop is None else pop))


def population_axes(mesh: jax.sharding.Mesh, ring: bool = False) -> tuple[str, ...]:
  """The axes search candidates spread over: every axis of the mesh (devices along any other
  would repeat the same work), but 'seq' when ring attention splits each sequence over it."""
  validate_mesh_axis(mesh, POP_AXIS)
  return tuple(a for a in mesh.axis_names if not (ring and a == SEQ_AXIS))


def population_axis_size(mesh: jax.sharding.Mesh, axes: Sequence[str] = (POP_AXIS,)) -> int:
  """Devices along the candidate axes `axes` (a ValueError if the mesh has no 'pop' axis)."""
  validate_mesh_axis(mesh, POP_AXIS)
  return math.prod(int(mesh.shape[a]) for a in axes)


def population_sharding(mesh: jax.sharding.Mesh, axes: Sequence[str] = (POP_AXIS,)
                        ) -> NamedSharding:
  """Sharding of a population array [P, ...]: candidates split over `axes`, replicated over the
  other axes."""
  validate_mesh_axis(mesh, POP_AXIS)
  return NamedSharding(mesh, P(tuple(axes)))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (model params, eval windows)."""
  return NamedSharding(mesh, P())


def constrain_activations(x_BT: jax.Array) -> jax.Array:
  """x[B, T, ...] held with B split over ('data', 'fsdp') and T over 'seq' of the current mesh
  (`jax.set_mesh`): the Auto axes of size > 1 whose product divides the dimension; x itself with
  no mesh, and for the axes a `jax.shard_map` made manual (the search's candidate axes).

  Without it XLA's sharding propagation meets FSDP weights (split over 'fsdp' along the model
  dimension) and activations (batch over 'fsdp') in each projection and may gather the
  activations instead of the weights: the 7B fine-tuning step at 256K on fsdp 4 x seq 16 planned
  292 GiB per device, 29 GiB with the layers' activations held so (experiments.plan).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x_BT
  auto = set(mesh.auto_axes)
  sizes = dict(mesh.shape)

  def axes(names, dim):
    names = tuple(a for a in names if a in auto and sizes[a] > 1)
    return names if names and dim % math.prod(sizes[a] for a in names) == 0 else None

  spec = P(axes(BATCH_AXES, x_BT.shape[0]), axes((SEQ_AXIS,), x_BT.shape[1]))
  if spec == P(None, None):
    return x_BT
  return jax.lax.with_sharding_constraint(x_BT, spec)


# ----------------------------------------------------------------------------- several processes
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Joins JAX's multi-controller runtime when a distributed setting is given; True if it did.

  Each argument falls back to its environment variable (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID). Nothing given, or one process: a no-op (False).
  coordinator_address='auto' lets `jax.distributed.initialize` detect the cluster (TPU pod,
  SLURM, Open MPI). Call it before anything touches a device; afterwards `jax.devices()` lists
  every process's devices and one mesh spans them all (CPU collectives go through gloo).
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = _int_setting('num_processes', num_processes, ENV_NUM_PROCESSES)
  process_id = _int_setting('process_id', process_id, ENV_PROCESS_ID)
  if jax.distributed.is_initialized():
    return True
  if coordinator_address == 'auto':
    jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
    return True
  if coordinator_address is None and num_processes is None and process_id is None:
    return False
  if num_processes == 1 and process_id in (None, 0):
    return False
  missing = [name for name, value in (('coordinator_address', coordinator_address),
                                      ('num_processes', num_processes),
                                      ('process_id', process_id)) if value is None]
  if missing:
    raise ValueError(f"A distributed run needs coordinator_address, num_processes and "
                     f"process_id; {missing} not given. Pass --{' --'.join(missing)} (or set "
                     f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or "
                     f"--coordinator_address=auto on a TPU pod or SLURM cluster.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must lie in [0, num_processes): got process_id={process_id}, "
                     f"num_processes={num_processes}.")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes shared files in a multi-process run."""
  return jax.process_index() == 0


def _int_setting(name: str, value, env_name: str) -> int | None:
  if value is None or value == '':
    value = os.environ.get(env_name) or None
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} (or {env_name}) must be an integer, got {value!r}.") from None


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of `x` as numpy on every process, gathering the shards other processes
  hold (an array sharded over a mesh that spans processes cannot be read with np.asarray)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
