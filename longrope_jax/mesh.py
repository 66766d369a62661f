"""The project's one device mesh, axes ('pop', 'seq'), and sequence sharding over 'seq'.

'pop' spreads the candidates of a search population; 'seq' spreads one long sequence (ring
attention). On one device both sizes are 1 and the same code runs.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

POP_AXIS, SEQ_AXIS = 'pop', 'seq'
AXES = (POP_AXIS, SEQ_AXIS)


def make_mesh(pop: int = 1, seq: int = 1, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A (pop, seq) mesh of Auto axes over the first pop * seq devices (or `devices`)."""
  for name, size in (('pop', pop), ('seq', seq)):
    if not isinstance(size, (int, np.integer)) or size <= 0:
      raise ValueError(f"make_mesh: {name} must be a positive integer, got {size!r}.")
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < pop * seq:
    raise ValueError(f"make_mesh: pop * seq = {pop * seq} devices needed, only {len(devices)} "
                     f"available; shrink the mesh or simulate CPU devices with "
                     f"jax.config.update('jax_num_cpu_devices', n).")
  return jax.make_mesh((pop, seq), AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:pop * seq])


def validate_mesh_axis(mesh, axis: str) -> None:
  """Raises if there is no mesh (none passed and none set) or it lacks `axis`."""
  if mesh is None or mesh.empty:
    raise ValueError(f"No device mesh: pass mesh= or run under `with jax.set_mesh(mesh):` with "
                     f"a mesh that has a {axis!r} axis (mesh.make_mesh).")
  if axis not in mesh.axis_names:
    raise ValueError(f"The mesh has axes {tuple(mesh.axis_names)} but no {axis!r} axis; build "
                     f"it with mesh.make_mesh(pop=..., seq=...).")


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
POP_AXIS = 'pop'


def population_mesh(pop: int | None = None) -> jax.sharding.Mesh:
  """A (pop, 1) mesh spreading search candidates over `pop` devices (default: all devices)."""
  return make_mesh(pop=len(jax.devices()) if pop is None else pop, seq=1)


def population_axis_size(mesh: jax.sharding.Mesh) -> int:
  """Devices along 'pop' (a ValueError if the mesh has no 'pop' axis)."""
  validate_mesh_axis(mesh, POP_AXIS)
  return int(mesh.shape[POP_AXIS])


def population_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a population array [P, ...]: candidates split over 'pop', replicated over the
  other axes."""
  validate_mesh_axis(mesh, POP_AXIS)
  return NamedSharding(mesh, P(POP_AXIS))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (model params, eval windows)."""
  return NamedSharding(mesh, P())


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
