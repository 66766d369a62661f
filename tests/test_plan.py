"""The compile-time plan: abstract shapes only, per-device memory that follows the mesh."""

import jax
import pytest

from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import plan as plan_lib
from longrope_jax import train as train_lib

CFG = model_lib.get_config('test', block_q=16, block_k=16)


def test_fitness_plan_arguments_are_the_fsdp_shards():
  """The params (f32) split 8 ways over 'fsdp' are the program's arguments, to within tokens."""
  mesh = mesh_lib.make_mesh(fsdp=8)
  p = plan_lib.plan_step('fitness', CFG.replace(attention='blockwise'), mesh, batch=8, length=64)
  shapes = jax.eval_shape(lambda: model_lib.init_params(CFG, jax.random.key(0)))
  shards = sum(x.size * 4 // (8 if train_lib.fsdp_spec((), x.shape, 8) != () else 1)
               for x in jax.tree.leaves(shapes))
  tokens = 8 * 65 * 4 // 8
  assert shards <= p.argument_bytes <= shards + tokens + 1024
  assert p.temp_bytes > 0 and p.peak_bytes >= p.argument_bytes
  assert p.mesh == {'fsdp': 8}
  assert p.step_seconds(1e12, 0.5) == pytest.approx(p.model_flops / 5e11)


def test_model_flops_is_six_n_t_plus_attention():
  c = model_lib.get_config('llama2_7b')
  n = c.num_params() - c.vocab_size * c.dim  # the input embedding is a lookup
  attention = c.num_layers * 4 * c.num_heads * c.head_dim * 4096 / 2
  assert plan_lib.model_flops(c, 1, 4096, train=True) == pytest.approx(
      3 * 4096 * (2 * n + attention))
  assert plan_lib.model_flops(c, 2, 4096, train=False) == pytest.approx(
      2 * 4096 * (2 * n + attention))


def test_unknown_kind():
  with pytest.raises(ValueError, match='Unknown plan kind'):
    plan_lib.compile_step('eval', CFG, mesh_lib.make_mesh(), 1, 64)


def test_search_plan_is_the_population_fitness_with_replicated_params():
  """'search': PopulationFitness lowered from abstract params, one candidate per 'seq' group (2
  groups of 4), params replicated: arguments = all params + the window + one candidate."""
  from longrope_jax import pod_plan
  mesh = mesh_lib.make_mesh(pop=2, seq=4)
  config = CFG.replace(attention='ring')
  p = plan_lib.plan_step('search', config, mesh, batch=0, length=128)
  assert p.batch == 2 and p.local_tokens == 32 and p.mesh == {'pop': 2, 'seq': 4}
  assert p.argument_bytes == pod_plan.argument_bytes('search', config, {'pop': 2, 'seq': 4}, 128)
  assert p.model_flops == pytest.approx(plan_lib.model_flops(config, 2, 128, False) / 8)
