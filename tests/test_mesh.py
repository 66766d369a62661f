"""MeshConfig: sizes, the 'rest' axis, validation against the device count; make_mesh."""

import jax
import pytest

from longrope_jax import mesh as mesh_lib
from longrope_jax.mesh import MeshConfig


def test_shape_resolves_the_rest():
  assert MeshConfig(data=-1, seq=2).shape(8) == dict(pop=1, data=4, fsdp=1, seq=2)
  assert MeshConfig(fsdp=0).shape(8) == dict(pop=1, data=1, fsdp=8, seq=1)
  assert MeshConfig(data=2, fsdp=2, seq=2).shape(8) == dict(pop=1, data=2, fsdp=2, seq=2)


@pytest.mark.parametrize('sizes, match', [
    (dict(data=-1, fsdp=0), r'mesh.data and mesh.fsdp both ask for the rest'),
    (dict(seq=-2), r'mesh.seq must be a positive integer'),
    (dict(seq=2.0), r'mesh.seq must be a positive integer'),
])
def test_bad_sizes(sizes, match):
  with pytest.raises(ValueError, match=match):
    MeshConfig(**sizes)


def test_does_not_fit():
  with pytest.raises(ValueError, match=r'mesh.fsdp takes the rest.*does not divide the 8'):
    MeshConfig(fsdp=-1, seq=3).shape(8)
  with pytest.raises(ValueError, match=r'16 devices but 8 are available; shrink mesh.seq'):
    MeshConfig(data=2, seq=8).shape(8)


def test_make_mesh():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, seq=2))
  assert mesh.axis_names == ('pop', 'data', 'fsdp', 'seq')
  assert dict(mesh.shape) == dict(pop=1, data=2, fsdp=2, seq=2)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(mesh_lib.make_mesh(seq=4).shape) == dict(pop=1, data=1, fsdp=1, seq=4)
  assert mesh_lib.make_mesh(pop=2, seq=4).devices.size == 8
  assert mesh_lib.population_mesh().shape['pop'] == len(jax.devices())
  with pytest.raises(ValueError, match='available'):
    mesh_lib.make_mesh(pop=4, seq=4)


def test_constrain_activations_splits_batch_and_length_over_the_auto_axes():
  """Under jax.set_mesh: B over ('data', 'fsdp') and T over 'seq' where they divide; values
  unchanged; no mesh, or inside a shard_map manual over every axis: x itself."""
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  x = jnp.arange(4 * 8 * 3, dtype=jnp.float32).reshape(4, 8, 3)
  mesh = mesh_lib.make_mesh(data=2, fsdp=2, seq=2)
  with jax.set_mesh(mesh):
    y = jax.jit(mesh_lib.constrain_activations)(x)
    odd = jax.jit(mesh_lib.constrain_activations)(x[:3, :7])  # neither divides
  assert y.sharding.spec == P(('data', 'fsdp'), 'seq')
  assert (y == x).all() and odd.sharding.is_fully_replicated
  assert mesh_lib.constrain_activations(x) is x
  manual = jax.jit(jax.shard_map(mesh_lib.constrain_activations, mesh=mesh, in_specs=P(),
                                 out_specs=P()))
  assert (manual(x) == x).all()
