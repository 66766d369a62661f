"""Multi-controller JAX: two local CPU processes with 2 devices each form one 4-device mesh.

The test starts this file twice as a script (`python tests/test_multihost.py PORT ID OUT`); each
process joins through `mesh.maybe_initialize_distributed` (gloo collectives on CPU), evaluates the
population fitness sharded over the mesh that spans both processes, runs one training step
sharded over data 2 (across the processes) x fsdp 2 (within each), and writes what it read back.
Both must equal the single-process result.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
TARGET = 128
MESHES = ((4, 1), (2, 2))  # (pop, seq): candidates over all 4 devices; over the 2 processes


def setup():
  """The toy model, deterministic params (numpy, no compile), windows and a population."""
  import jax
  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib
  from longrope_jax import search_space
  config = model_lib.get_config('test', num_layers=1)
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  windows = rng.integers(0, config.vocab_size, (3, TARGET)).astype(np.int32)
  space = search_space.make_space(head_dim=config.head_dim,
                                  extension=rope_lib.Extension(config.original_length, TARGET))
  genomes = space.encode(np.sort(rng.uniform(1, 2.5, (6, config.head_dim // 2)), -1),
                         rng.integers(0, 64, 6))
  return config, params, windows, space.rope(genomes)


def train_step(mesh=None) -> dict:
  """One training step of the toy model (sharded on `mesh`): loss, grad norm, params' norms."""
  import jax
  import optax
  from longrope_jax import mesh as mesh_lib
  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib
  from longrope_jax import train as train_lib
  config = model_lib.get_config('test', num_layers=1)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3))
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (4, 33)).astype(np.int32)
  rope = rope_lib.none(head_dim=config.head_dim)
  if mesh is None:
    state = train_lib.init_state(config, optimizer, jax.random.key(0))
  else:
    state = train_lib.init_sharded_state(config, optimizer, mesh, jax.random.key(0))
  state, metrics = train_lib.make_train_step(config, optimizer, mesh)(state, tokens, rope)
  norms = [float(np.linalg.norm(mesh_lib.to_host(x))) for x in jax.tree.leaves(state['params'])]
  return dict(loss=float(mesh_lib.to_host(metrics['loss'])),
              grad_norm=float(mesh_lib.to_host(metrics['grad_norm'])), param_norms=norms)


def worker(port: str, process_id: int, out: str) -> None:
  import jax
  jax.config.update('jax_num_cpu_devices', LOCAL_DEVICES)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  from longrope_jax import mesh as mesh_lib
  from longrope_jax import fitness as fitness_lib
  assert mesh_lib.maybe_initialize_distributed(f'localhost:{port}', NUM_PROCESSES, process_id)
  assert jax.process_count() == NUM_PROCESSES and len(jax.devices()) == 4
  config, params, windows, population = setup()
  record = dict(process_index=jax.process_index(), local_devices=jax.local_device_count())
  for pop, seq in MESHES:
    mesh = mesh_lib.make_mesh(pop=pop, seq=seq)
    assert {d.process_index for d in mesh.devices.flat} == {0, 1}
    fitness = fitness_lib.PopulationFitness(config, params, windows, length=TARGET,
                                           max_population=8, mesh=mesh)
    record[f'{pop}x{seq}'] = fitness(population).tolist()
  train_mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2))
  assert {d.process_index for d in train_mesh.devices[0, 0].flat} == {0}  # fsdp within a process
  record['train'] = train_step(train_mesh)
  # Workdir files: only process 0 writes them (both processes are given the same paths).
  from longrope_jax import checkpoint as ckpt_lib
  from longrope_jax import plots
  shared = pathlib.Path(out).parent / 'workdir'
  ckpt_lib.write_json(shared / f'results_p{process_id}.json', record)
  ckpt_lib.append_jsonl(shared / f'metrics_p{process_id}.jsonl', dict(step=1))
  plots.training_curve([dict(step=1, loss=1.0, bits_per_token=1.0)],
                       shared / f'plot_p{process_id}.png')
  pathlib.Path(out).write_text(json.dumps(record))


def test_distributed_settings_come_from_arguments_or_environment(monkeypatch):
  from longrope_jax import mesh as mesh_lib
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)
  assert not mesh_lib.maybe_initialize_distributed()  # nothing given: one process
  assert not mesh_lib.maybe_initialize_distributed(num_processes=1)
  with pytest.raises(ValueError, match=r"\['num_processes', 'process_id'\] not given"):
    mesh_lib.maybe_initialize_distributed('localhost:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '2')
  with pytest.raises(ValueError, match=r'process_id must lie in \[0, num_processes\)'):
    mesh_lib.maybe_initialize_distributed('localhost:1234')
  monkeypatch.setenv('JAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match='JAX_PROCESS_ID\) must be an integer'):
    mesh_lib.maybe_initialize_distributed('localhost:1234')
  assert not jax.distributed.is_initialized()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_fitness_and_train_step_on_a_mesh_spanning_two_processes_equal_one_process(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={LOCAL_DEVICES}')
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  port = free_port()
  outs = [tmp_path / f'process{i}.json' for i in range(NUM_PROCESSES)]
  procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i), str(outs[i])], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  # The single-process reference, computed here while the two processes start.
  from longrope_jax import mesh as mesh_lib
  from longrope_jax import fitness as fitness_lib
  config, params, windows, population = setup()
  expected = fitness_lib.PopulationFitness(config, params, windows, length=TARGET,
                                          max_population=8, mesh=mesh_lib.population_mesh(1))
  expected = expected(population)
  expected_train = train_step()
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {i} failed:\n{log[-3000:]}'
  for i, out in enumerate(outs):
    record = json.loads(out.read_text())
    assert record['process_index'] == i and record['local_devices'] == LOCAL_DEVICES
    for pop, seq in MESHES:
      np.testing.assert_allclose(record[f'{pop}x{seq}'], expected, rtol=1e-5, atol=1e-5)
    for name in ('loss', 'grad_norm', 'param_norms'):
      np.testing.assert_allclose(record['train'][name], expected_train[name], rtol=1e-5)
  written = sorted(p.name for p in (tmp_path / 'workdir').iterdir())
  assert written == ['metrics_p0.jsonl', 'plot_p0.png', 'results_p0.json']  # none of process 1


if __name__ == '__main__':
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
