"""A search killed with SIGKILL (or interrupted) resumes to exactly the uninterrupted result; the
pipeline's search stage writes results and feeds 'longrope' into the evaluate stage."""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import model as model_lib
from longrope_jax import fitness as fitness_lib
from longrope_jax import pipeline
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = model_lib.get_config('test', num_layers=1, dim=32, mlp_dim=64)
TARGET = 4 * CFG.original_length
EXT = rope_lib.Extension(CFG.original_length, TARGET)
SETTINGS = search_lib.SearchConfig(population=8, parents=4, mutations=2, crossovers=2,
                                   generations=8)


def random_params(config, seed=0):
  """Random weights without compiling the initializer (norm scales 1, the rest N(0, 0.1))."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: np.ones(s.shape, s.dtype) if 'norm' in jax.tree_util.keystr(path)
      else (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def small_search(workdir, *, delay: float = 0.0, strategy: str = 'paper_ga',
                 on_generation=None, fitness=None) -> search_lib.SearchResult:
  """The search the tests run, here and in a subprocess (random model, random windows)."""
  params = random_params(CFG)
  windows = np.random.default_rng(0).integers(0, 256, size=(3, TARGET)).astype(np.int32)
  settings = search_lib.SearchConfig(**dict(vars(SETTINGS), strategy=strategy))
  if fitness == 'shared':  # one compiled evaluator for every search of a test
    fitness = _shared_fitness(params, windows)

  def hook(record):
    time.sleep(delay)
    if on_generation is not None:
      on_generation(record)

  return search_lib.search(CFG, params, windows, extension=EXT, settings=settings,
                           workdir=workdir, progress=False, on_generation=hook, fitness=fitness)


_FITNESS = []


def _shared_fitness(params, windows):
  if not _FITNESS:
    _FITNESS.append(fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET,
                                                 max_population=SETTINGS.population))
  return _FITNESS[0]


SCRIPT = """
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax
jax.config.update('jax_num_cpu_devices', 8)
sys.path.insert(0, {tests!r})
import test_search_resume
test_search_resume.small_search({workdir!r}, delay=0.5)
print('finished', flush=True)
"""


def _same(a: search_lib.SearchResult, b: search_lib.SearchResult) -> None:
  np.testing.assert_array_equal(a.genome, b.genome)
  assert a.nll == b.nll and a.evaluations == b.evaluations and a.generations == b.generations
  strip = lambda hs: [{k: v for k, v in h.items() if k != 'seconds'} for h in hs]
  assert strip(a.history) == strip(b.history)
  assert a.seeds == b.seeds


def test_sigkilled_search_resumes_to_the_uninterrupted_result(tmp_path):
  straight = small_search(tmp_path / 'straight')
  workdir = tmp_path / 'killed'
  log = open(tmp_path / 'child.log', 'w')
  child = subprocess.Popen(
      [sys.executable, '-c', SCRIPT.format(tests=str(ROOT / 'tests'), workdir=str(workdir))],
      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while not (workdir / 'ckpt' / '3').is_dir():
    assert child.poll() is None, (tmp_path / 'child.log').read_text()[-3000:]
    assert time.time() < deadline, 'the child search made no progress'
    time.sleep(0.05)
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  log.close()
  assert 'finished' not in (tmp_path / 'child.log').read_text()
  killed_at = ckpt_lib.manager(workdir / 'ckpt').latest_step()
  assert 3 <= killed_at < SETTINGS.generations  # killed mid-search
  history = (workdir / 'history.jsonl').read_text().splitlines()
  assert len(history) in (killed_at, killed_at + 1)  # the kill may fall between the two writes

  seen = []
  resumed = small_search(workdir, on_generation=lambda r: seen.append(r['generation']))
  assert seen == list(range(killed_at + 1, SETTINGS.generations + 1))  # only what was left
  _same(resumed, straight)
  assert (workdir / 'best_factors.json').read_text() == \
      (tmp_path / 'straight' / 'best_factors.json').read_text()
  assert [json.loads(l)['generation'] for l in
          (workdir / 'history.jsonl').read_text().splitlines()] == list(range(9))


class Stop(Exception):
  pass


def _stop_at(generation):
  def hook(record):
    if record['generation'] == generation:
      raise Stop
  return hook


@pytest.mark.parametrize('strategy', ['paper_ga',
                                      pytest.param('Sep_CMA_ES', marks=pytest.mark.slow)])
def test_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path, strategy):
  straight = small_search(tmp_path / 'a', strategy=strategy, fitness='shared')
  for stop in (0, 4):  # right after the initial population, then mid-search
    with pytest.raises(Stop):
      small_search(tmp_path / 'b', strategy=strategy, on_generation=_stop_at(stop),
                   fitness='shared')
  _same(small_search(tmp_path / 'b', strategy=strategy, fitness='shared'), straight)
  assert _FITNESS[0].traces == 1


def _demo_config(variant):
  spec = importlib.util.spec_from_file_location('demo_config', ROOT / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_search_stage_writes_results_and_evaluate_includes_longrope(tmp_path):
  config = _demo_config('test')
  assert config.stages.index('search') < config.stages.index('evaluate')
  assert _demo_config(None).search.multiple == 8
  config.evaluate.multiples = (1, 4)
  config.evaluate.methods = ('none', 'linear')
  config.search.settings.generations = 2
  run = pipeline.Run(config, tmp_path)
  params = random_params(run.model_config)  # stands in for a pretrained model
  ckpt_lib.save(ckpt_lib.manager(tmp_path / 'ckpt'), 1, dict(params=params))
  pipeline.run(config, tmp_path, stages=('search', 'evaluate', 'report'))
  results = json.loads((tmp_path / 'results.json').read_text())
  found = results['search']
  assert found['target_length'] == 4 * 64 and found['split'] == 'validation'
  assert len(found['factors']) == run.model_config.head_dim // 2
  table = results['perplexity']['methods']
  assert table['longrope']['perplexity'][0] is None  # no scaling needed at L0
  assert table['longrope']['perplexity'][1] is not None
  for name in ('best_factors.json', 'best_factors.csv', 'history.jsonl', 'fitness.png',
               'factors.png'):
    assert (tmp_path / 'search' / name).exists()
  assert 'LongRoPE search' in (tmp_path / 'report.md').read_text()


def test_damaged_search_state_names_the_file_and_the_fix(tmp_path):
  """A generation whose JSON record (search/ckpt/<gen>/meta/metadata) is cut: the resume names
  the file and the generation to delete, and doing so resumes to the uninterrupted result."""
  straight = small_search(tmp_path / 'a', fitness='shared')
  with pytest.raises(Stop):
    small_search(tmp_path / 'b', on_generation=_stop_at(4), fitness='shared')
  meta = tmp_path / 'b' / 'ckpt' / '4' / 'meta' / 'metadata'
  meta.write_bytes(meta.read_bytes()[:40])
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    small_search(tmp_path / 'b', fitness='shared')
  assert f'{meta} cannot be read' in str(e.value)
  assert f"delete {tmp_path / 'b' / 'ckpt' / '4'} to resume from step 3" in str(e.value)
  shutil.rmtree(tmp_path / 'b' / 'ckpt' / '4')
  _same(small_search(tmp_path / 'b', fitness='shared'), straight)
