"""The 2048K plan (pod_plan.py): exact argument bytes, the linear memory model and its fit, the
mesh recommendation, and on a tiny model the model's prediction against real compiles."""


import jax
import numpy as np
import pytest

from longrope_jax import fitness as fitness_lib
from longrope_jax import model as model_lib
from longrope_jax import plan as plan_lib
from longrope_jax import pod_plan

LLAMA = model_lib.get_config('llama2_7b', attention='ring', remat='full')


def _plan(kind, mesh, length, temp_bytes, batch=1):
  return plan_lib.Plan(kind=kind, length=length, batch=batch, mesh=mesh, argument_bytes=0,
                       temp_bytes=temp_bytes, output_bytes=0, alias_bytes=0, xla_flops=0.0,
                       model_flops=0.0, compile_s=0.0,
                       local_tokens=plan_lib.local_tokens(kind, mesh, batch, length))


def test_state_bytes_are_the_fsdp_shards():
  """bf16 params (2 bytes) replicated for the search; params + AdamW mu and nu over fsdp 8 for
  the train step (every 7B array has a dimension 8 divides), plus the step counters."""
  n = LLAMA.num_params()
  assert pod_plan.state_bytes('search', LLAMA, fsdp=8) == 2 * n
  assert pod_plan.state_bytes('fitness', LLAMA, fsdp=8) == 2 * n // 8
  train = pod_plan.state_bytes('train', LLAMA, fsdp=8)
  assert 3 * 2 * n // 8 < train <= 3 * 2 * n // 8 + 64


def test_argument_bytes_add_tokens_and_rotary_tables():
  L = 262144
  sizes = {'fsdp': 4, 'seq': 16}
  state = pod_plan.state_bytes('train', LLAMA, 4)
  rope = 4 * (LLAMA.head_dim // 2 + 2)
  tokens = 4 * (L + 1)  # one sequence per fsdp device group
  rotary = 2 * 4 * (L + 1) * LLAMA.head_dim
  assert pod_plan.argument_bytes('train', LLAMA, sizes, L) == state + rope + tokens + rotary
  assert pod_plan.argument_bytes('search', LLAMA, {'seq': 64}, L) == (
      2 * LLAMA.num_params() + rope + 4 * L + 4 + 1)


def test_local_tokens_per_kind():
  assert plan_lib.local_tokens('train', {'fsdp': 4, 'seq': 16}, 4, 262144) == 16384
  assert plan_lib.local_tokens('train', {'fsdp': 4, 'seq': 16}, 8, 262144) == 32768
  assert plan_lib.local_tokens('search', {'pop': 2, 'seq': 4}, 2, 131072) == 32768


def test_fit_recovers_a_linear_model_and_predicts_a_bigger_mesh():
  """Temporaries made of a + b * local + c * state bytes: three points give a, b, c back, and the
  prediction of a mesh outside them is exact."""
  a, b, c = 3e9, 1.5e5, 0.7

  def temps(kind, mesh, length):
    local = plan_lib.local_tokens(kind, mesh, pod_plan.batch_for(kind, mesh), length)
    return int(a + b * local + c * pod_plan.state_bytes(kind, LLAMA, mesh.get('fsdp', 1)))

  points = pod_plan.FIT_POINTS['train']
  plans = [_plan('train', m, L, temps('train', m, L), batch=pod_plan.batch_for('train', m))
           for m, L in points]
  fit = pod_plan.fit_memory('train', LLAMA, plans)
  assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, c), rel=1e-6)
  big = {'fsdp': 16, 'seq': 16}
  want = pod_plan.argument_bytes('train', LLAMA, big, 262144) + temps('train', big, 262144)
  assert fit.peak('train', LLAMA, big, 262144) == pytest.approx(want, rel=1e-9)
  # The search's state never varies (replicated): c stays 0, a and b are fitted.
  plans = [_plan('search', m, L, int(a + b * L // m['seq'])) for m, L in
           pod_plan.FIT_POINTS['search']]
  fit = pod_plan.fit_memory('search', LLAMA, plans)
  assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, 0.0), rel=1e-6)
  assert pod_plan.error_pct(110.0, 100.0) == pytest.approx(10.0)


def test_candidate_meshes_split_the_length_into_ring_chunks():
  for kind, length in (('search', 2048 * 1024), ('train', 262144)):
    meshes = pod_plan.candidate_meshes(kind, length)
    assert meshes
    for m in meshes:
      assert pod_plan.devices(m) in pod_plan.GRID_DEVICES
      assert m['seq'] >= 2 and length % (2 * m['seq']) == 0
      assert kind != 'search' or set(m) == {'seq'}
  assert {'fsdp': 4, 'seq': 16} in pod_plan.candidate_meshes('train', 262144)


def test_recommend_takes_the_fewest_devices_that_fit_then_the_lowest_peak():
  gpu = pod_plan.MEMORY_CLASSES[0]
  limit = pod_plan.USABLE * gpu.hbm_bytes
  # Fits from 64 devices on; among the 64-device meshes seq 64 (fsdp 1) has the lowest peak.
  peak_of = lambda m: (limit * (1.5 if pod_plan.devices(m) < 64 else 0.9 + 0.001 * m.get('fsdp', 1)))
  mesh, peak = pod_plan.recommend('train', 262144, gpu, peak_of)
  assert pod_plan.devices(mesh) == 64 and mesh == {'seq': 64}
  assert peak == pytest.approx(limit * 0.901)
  none, lowest = pod_plan.recommend('train', 262144, gpu, lambda m: 2 * limit + pod_plan.devices(m))
  assert none is None and lowest == pytest.approx(2 * limit + 8)


def test_step_seconds_at_peak_and_mfu():
  sizes = {'fsdp': 4, 'seq': 16}
  flops = plan_lib.model_flops(LLAMA, 4, 262144, train=True)
  assert pod_plan.step_seconds('train', LLAMA, sizes, 262144, 989.0, 0.4) == pytest.approx(
      flops / 64 / (989e12 * 0.4))


def test_an_abstract_population_fitness_lowers_but_cannot_be_called():
  config = model_lib.get_config('test')
  params = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  fitness = fitness_lib.PopulationFitness(config, params, np.zeros((1, 64), np.int32),
                                         max_population=1)
  assert fitness.abstract
  with pytest.raises(ValueError, match='abstract params'):
    fitness(None)


@pytest.mark.slow
def test_tiny_model_prediction_against_compiles():
  """The whole study on the test model at 8 devices: the model fitted on fsdp x seq = 2 x 2 / 4 x
  2 and seq 2 / 4 predicts fsdp 2 x seq 4 and seq 8 at 4-8x the length within 5%; arguments to
  within 64 bytes; every recommended mesh fits when compiled."""
  workloads = (pod_plan.Workload('ft', 'train', 2048, ({'fsdp': 2, 'seq': 4}, {'seq': 8}), 'x'),
               pod_plan.Workload('se', 'search', 2048, ({'seq': 8},), 'y'))
  fit_points = {'train': (({'fsdp': 2, 'seq': 2}, 256), ({'fsdp': 2, 'seq': 2}, 512),
                          ({'fsdp': 4, 'seq': 2}, 256)),
                'search': (({'seq': 2}, 256), ({'seq': 2}, 512), ({'seq': 4}, 256))}
  result = pod_plan.study(['test'], block=16, max_devices=8, workloads=workloads,
                          fit_points=fit_points, log=lambda line: None)
  checks = [c for c in result['checks'] if c['workload'] != 'fit point']
  assert len(checks) == 3
  for c in result['checks']:
    assert abs(c['error_pct']) < 5, c
    assert abs(c['predicted_argument_bytes'] - c['compiled_argument_bytes']) <= 64, c
  for r in result['recommendations']:
    limit = pod_plan.USABLE * r['hbm_gib']
    assert r['mesh'] is not None and r['compiled_peak_gib'] <= limit, r
  assert '### Check: the linear model against the compiles' in pod_plan.markdown(result)
