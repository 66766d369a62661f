"""bench/accelerator.py: its CPU smoke writes the JSON the docs read, with every library module it
imports loadable without ml_collections or evosax (absent on the device machine); its budget,
out-of-memory and peak rules."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / 'bench' / 'accelerator.py'
# Installed first on sys.meta_path of every process that has this folder on PYTHONPATH.
BLOCKER = '''import sys
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('ml_collections', 'evosax'):
      raise ModuleNotFoundError(f'{name} is blocked (absent on the device machine)')
sys.meta_path.insert(0, _Block())
'''


def _bench():
  spec = importlib.util.spec_from_file_location('accelerator_bench', BENCH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def bench():
  return _bench()


def _run_blocked(tmp_path, *flags):
  """Runs the bench in a fresh process (one CPU device) where ml_collections and evosax cannot be
  imported; returns the JSON it wrote."""
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(BLOCKER)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = os.pathsep.join([str(site), str(REPO)])
  blocked = subprocess.run([sys.executable, '-c', 'import ml_collections'], env=env,
                           capture_output=True, text=True)
  assert blocked.returncode != 0 and 'blocked' in blocked.stderr  # the hook is active
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, str(BENCH), '--cpu-smoke', '--out-dir', str(out),
                         *flags], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads((out / 'accelerator_cpu.json').read_text()), proc.stdout


def _row(d, part, length, impl):
  return next(r for r in d['rows'] if (r['part'], r['length'], r['impl']) == (part, length, impl))


def test_cpu_smoke_writes_the_json_without_ml_collections_or_evosax(tmp_path, bench):
  """Forward cells at 64 tokens run; at 4M tokens they are skipped by the budget estimate (cuDNN,
  the CPU kernel) or by dense's memory rule; 'auto' names the cell it shares."""
  d, stdout = _run_blocked(tmp_path, '--parts', 'forward', '--lengths', '64,4194304',
                           '--impls', 'cudnn,dense,auto')
  from longrope_jax import attention_select
  auto, _ = attention_select.resolve_attention('auto', backend='cpu', dtype='bfloat16',
                                               length=64)
  assert d['device_kind'] == 'cpu' and d['cpu_smoke'] and d['peak_tflops'] is None
  assert d['shapes']['tiny']['params'] == bench.model_config('tiny', 'dense').num_params()
  matmul = d['matmul']['jax_tflops']
  for impl in ('cudnn', 'dense', auto):
    r = _row(d, 'forward', 64, impl)
    assert r['status'] == 'ok', r
    assert r['seconds_min'] <= r['seconds_median'] <= r['seconds_max']
    assert r['tokens_per_s'] == pytest.approx(64 / r['seconds_median'], rel=1e-12)
    flops = bench.cell_flops(bench.Cell('forward', 'tiny', 64, impl), 4)
    assert r['model_flops'] == flops
    assert r['mfu_vs_matmul'] == pytest.approx(flops / r['seconds_median'] / (matmul * 1e12))
  assert _row(d, 'forward', 64, 'auto')['status'] == f'same as {auto}'
  assert _row(d, 'forward', 64, 'cudnn')['attention']['ran'] == 'cudnn'
  assert _row(d, 'forward', 4194304, 'dense')['status'] == 'skipped: dense scores do not fit'
  for impl in ('cudnn', auto):
    assert _row(d, 'forward', 4194304, impl)['status'].startswith('skipped: budget')
  assert d['torch'] == {'skipped': 'no torch cells'}
  assert 'JSON:' in stdout and 'same as' in stdout


@pytest.mark.slow
def test_cpu_smoke_default_cells_every_part_and_torch(tmp_path):
  """The default smoke: forward, population fitness and train step, torch's forward and train
  step in their own process (skipped in the JSON if torch is absent)."""
  d, _ = _run_blocked(tmp_path)
  ok = {(r['part'], r['impl']) for r in d['rows'] if r['status'] == 'ok'}
  assert {('forward', 'cudnn'), ('forward', 'pallas_gpu')} <= ok
  assert {part for part, _ in ok} == {'forward', 'fitness', 'train'}
  fitness = next(r for r in d['rows'] if r['part'] == 'fitness' and r['status'] == 'ok')
  assert fitness['tokens_per_s'] == pytest.approx(4 * 64 / fitness['seconds_median'])
  if importlib.util.find_spec('torch') and importlib.util.find_spec('transformers'):
    assert {('forward', 'torch_sdpa'), ('train', 'torch_sdpa')} <= ok
    assert d['torch']['flash_forced'] is False and d['matmul']['torch_tflops'] > 0


# ----------------------------------------------------------------------------- rules
def test_peaks_by_device_kind(bench):
  assert bench.peak_for('NVIDIA H200')[0] == 989.0
  assert bench.peak_for('NVIDIA H100 PCIe')[0] == 756.0
  assert bench.peak_for('NVIDIA H100 80GB HBM3')[0] == 989.0
  assert bench.peak_for('NVIDIA A100-SXM4-80GB')[0] == 312.0
  assert bench.peak_for('TPU v5 lite')[0] == 197.0
  assert bench.peak_for('TPU v5p')[0] == 459.0
  assert bench.peak_for('TPU v4')[0] == 275.0
  assert bench.peak_for('TPU v6 lite')[0] == 918.0
  peak, why = bench.peak_for('cpu')
  assert peak is None and '--peak_tflops' in why
  assert bench.device_slug('NVIDIA H200') == 'h200'
  assert bench.device_slug('TPU v5 lite') == 'tpu_v5_lite'


def test_budget_skips_past_the_deadline_and_longer_lengths_after_oom(bench):
  cell = bench.Cell('train', '1b', 8192, 'cudnn')
  budget = bench.Budget(deadline=100.0)
  assert budget.skip_reason(cell, estimate=50.0, now=40.0) is None
  assert budget.skip_reason(cell, estimate=50.0, now=60.0).startswith('skipped: budget')
  budget.record(bench.Cell('train', '1b', 32768, 'cudnn'), 'oom')
  longer = bench.Cell('train', '1b', 131072, 'cudnn')
  assert 'out of memory' in budget.skip_reason(longer, estimate=1.0, now=0.0)
  assert budget.skip_reason(cell, estimate=1.0, now=0.0) is None  # shorter: still runs
  other = bench.Cell('train', '1b', 131072, 'pallas_gpu')
  assert budget.skip_reason(other, estimate=1.0, now=0.0) is None


def test_a_failing_cell_is_recorded_and_the_run_goes_on(bench):
  """An XLA out-of-memory error in one cell: status 'oom', the longer cell skipped, the next cell
  timed."""
  import argparse
  args = argparse.Namespace(repeats=3, target_s=0.0, candidates=4, cpu_smoke=True)
  cells = [bench.Cell('forward', 'tiny', 64, 'dense'), bench.Cell('forward', 'tiny', 128, 'dense'),
           bench.Cell('forward', 'tiny', 64, 'blockwise')]
  calls = []

  def make(cell):
    if cell.impl == 'dense':
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB')
    return (lambda: calls.append(cell)), dict(note='ok')

  seen = []
  rows = bench.run_cells(cells, make, lambda: None, args, rate=1e12,
                         budget=bench.Budget(deadline=float('inf')), on_row=seen.append)
  assert [r['status'] for r in rows] == [
      'oom', 'skipped: out of memory at this or a shorter length', 'ok']
  assert 'RESOURCE_EXHAUSTED' in rows[0]['error'] and seen == rows
  assert len(calls) == 2 + 3 and rows[2]['note'] == 'ok'  # first call, warm call, 3 repeats
  assert bench.classify(RuntimeError('CUDA out of memory. Tried to allocate')) == 'oom'
  assert bench.classify(ValueError('shapes do not match')) == 'error'


def test_schedule_resolves_auto_and_keeps_dense_where_it_fits(bench):
  cells = [bench.Cell('forward', '1b', 8192, impl) for impl in ('cudnn', 'auto', 'dense')]
  cells += [bench.Cell('train', '1b', 131072, 'dense'), bench.Cell('train', '1b', 8192, 'torch_sdpa')]
  torch_cells, jax_cells, rows = bench.schedule(cells, 'gpu', 139 * 2 ** 30)
  assert torch_cells == [cells[-1]]
  assert jax_cells == [cells[0], cells[2]]  # 'auto' is cuDNN's cell on a GPU in bf16
  assert rows[0]['status'] == 'same as cudnn'
  assert rows[1]['status'] == 'skipped: dense scores do not fit'


def test_default_cells_fit_the_budget_by_their_estimates(bench, capsys):
  """The default cells' estimates on an H200 end within --budget_s, torch's within its share,
  and the most telling cells (1B forward, train step and fitness at 8K) are not cut."""
  args = bench.parse_args(['--dry-run'])
  bench.dry_run(bench.select_cells(args), args)
  out = capsys.readouterr().out
  end = float(out.strip().splitlines()[-1].rsplit('estimated end', 1)[1].split()[0])
  assert end <= args.budget_s
  for name in ('forward 1b 8192 cudnn', 'train 1b 8192 cudnn', 'fitness 1b 8192 cudnn',
               'forward 1b 8192 torch_sdpa', 'train 1b 8192 torch_sdpa'):
    line = next(l for l in out.splitlines() if l.startswith(name + ' '))
    assert 'skipped' not in line, line
