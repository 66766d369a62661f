"""The console: quiet library logging, stage headers, the closing summary, machine facts."""

import io
import logging
import os
import platform

import jax
import pytest
from absl import logging as absl_logging

from longrope_jax import console


def made_up_results() -> dict:
  """A results.json-shaped dict (the keys the pipeline writes) with numbers chosen by hand."""
  return {
      'pretrain': dict(steps=20, params=12345, tokens=40960, seconds=7.5, val_bits_per_token=5.8),
      'search': dict(perplexity=40.1, target_length=256, original_length=64, scale=4.0,
                     split='validation', num_windows=2, strategy='paper_ga', generations=3,
                     evaluations=20, n_hat=4, attn_scale=1.1,
                     seeds={'linear': dict(nll=3.9, perplexity=49.4),
                            'ntk': dict(nll=3.8, perplexity=44.7),
                            'yarn': dict(nll=3.75, perplexity=42.5),
                            'dynamic_ntk': dict(nll=3.8, perplexity=44.7)}),
      'perplexity': dict(lengths=[64, 128, 256], original_length=64, num_windows=4,
                         split='test', methods={
                             'none': dict(perplexity=[58.8, 70.2, 120.5]),
                             'linear': dict(perplexity=[58.8, 48.6, 43.4]),
                             'ntk': dict(perplexity=[58.8, 48.5, 43.8]),
                             'dynamic_ntk': dict(perplexity=[58.8, 48.5, 43.8]),
                             'longrope': dict(perplexity=[None, 47.0, 41.2])}),
  }


@pytest.fixture
def restore_logging():
  verbosity = absl_logging.get_verbosity()
  levels = {n: logging.getLogger(n).level for n in ('', 'absl', 'jax', 'orbax')}
  yield
  absl_logging.set_verbosity(verbosity)
  for name, level in levels.items():
    logging.getLogger(name).setLevel(level)


def test_configure_logging_quiets_info_and_brings_it_back(restore_logging):
  absl_logging.set_verbosity('info')  # what absl.app leaves behind
  console.configure_logging('warning')
  assert absl_logging.get_verbosity() == absl_logging.WARNING
  for name in ('absl', 'jax', 'orbax'):
    assert not logging.getLogger(name).isEnabledFor(logging.INFO)
    assert logging.getLogger(name).isEnabledFor(logging.WARNING)
  console.configure_logging('info')
  assert absl_logging.get_verbosity() == absl_logging.INFO
  assert logging.getLogger('orbax').isEnabledFor(logging.INFO)
  with pytest.raises(ValueError, match='log_level'):
    console.configure_logging('loud')


def test_stage_header_lists_details():
  out = io.StringIO()
  text = console.stage_header('evaluate', {'lengths': [64, 128], 'methods': ('none', 'ntk'),
                                           'scale': 4.0}, file=out)
  assert out.getvalue() == text + '\n'
  assert text.splitlines() == ['== evaluate ==', '   lengths: 64, 128', '   methods: none, ntk',
                               '   scale: 4']
  assert console.stage_header('report', file=io.StringIO()) == '== report =='


def test_format_seconds():
  assert console.format_seconds(4.25) == '4.2s'
  assert console.format_seconds(185) == '3m 05s'
  assert console.format_seconds(3720) == '1h 02m'


def test_summary_has_report_headline_gain_and_times():
  results = made_up_results()
  out = io.StringIO()
  text = console.summary(results, {'pretrain': 7.5, 'search': 62.0, 'report': 0.5},
                         report_path='/tmp/run/report.md', tensorboard_dir='/tmp/run/tb',
                         file=out)
  lines = text.splitlines()
  assert lines[:3] == ['== summary ==', 'report: /tmp/run/report.md',
                       'metrics: tensorboard --logdir /tmp/run/tb']
  # the headline is at the search length (256 = 4x), best first, the best alone marked
  head = lines.index('held-out perplexity at 256 tokens (4x the training length), 4 test '
                     'documents:')
  table = lines[head + 1:head + 5]
  assert [row.rsplit(maxsplit=1)[0].strip() if 'best' not in row else row.split()[0]
          for row in table] == ['longrope', 'linear', 'ntk = dynamic_ntk', 'none']
  assert table[0].endswith('<- best') and sum('best' in row for row in table) == 1
  assert table[2].split()[-1] == '43.800' and lines[head + 5].startswith('searched')
  # searched 40.1 vs the best seed, yarn 42.5: -5.6 %
  assert ('searched factors 40.100 vs the best seed (yarn) 42.500 at 256 tokens (validation '
          'windows): -5.6%') in lines
  assert 'stage times: pretrain 7.5s, search 1m 02s, report 0.5s' in lines
  results['search']['seeds']['ntk']['perplexity'] = 42.5  # a tie of seeds is named as one
  assert 'the best seed (ntk = yarn) 42.500' in console.summary_text(results, {})
  assert lines[-1] == 'total: 1m 10s'
  assert out.getvalue() == text + '\n'


def test_summary_marks_no_best_on_a_tie_and_survives_missing_stages():
  results = made_up_results()
  del results['search']
  results['perplexity']['methods']['longrope']['perplexity'][2] = 43.4  # ties linear
  text = console.summary_text(results, {})
  assert 'at 256 tokens' in text  # no search: the longest length
  assert 'best' not in text.replace('the best seed', '')
  assert 'searched factors' not in text and 'total' not in text
  assert console.summary_text({}, {'report': 1.0}).splitlines() == [
      '== summary ==', 'stage times: report 1.0s', 'total: 1.0s']


def test_machine_info_has_no_hostname():
  info = console.machine_info()
  assert info['cores'] == len(os.sched_getaffinity(0)) >= 1
  assert info['cpu'] and info['cpu'] != 'unknown'
  assert info['platform'] == jax.devices()[0].platform
  assert info['accelerator'] is None if info['platform'] == 'cpu' else info['accelerator']
  assert info['jax'] == jax.__version__ and info['python'] == platform.python_version()
  assert set(info) >= {'jaxlib', 'flax', 'devices', 'processes', 'system'}
  assert platform.node() not in str(info.values())
  line = console.describe_machine(info)
  assert line.startswith(info['cpu']) and f"{info['cores']} cores" in line
  assert f"machine: {line}" in console.summary_text({'machine': info}, {})


def test_cpu_model_without_proc_cpuinfo(monkeypatch):
  import builtins
  real_open = builtins.open

  def no_proc(path, *args, **kwargs):
    if str(path) == '/proc/cpuinfo':
      raise FileNotFoundError(path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', no_proc)
  monkeypatch.setattr(platform, 'processor', lambda: 'arm')
  assert console.cpu_model() == 'arm'
  monkeypatch.setattr(platform, 'processor', lambda: '')
  assert console.cpu_model() == platform.machine()


def test_describe_machine_with_an_accelerator():
  info = dict(cpu='Xeon', cores=16, platform='gpu', accelerator='NVIDIA H200', devices=8,
              jax='0.10.2')
  assert console.describe_machine(info) == 'Xeon, 16 cores, 8 x NVIDIA H200, jax 0.10.2'


@pytest.mark.parametrize('flag, shown', [(None, ['WARN']), ('--log_level=info', ['INFO', 'WARN']),
                                         ('--verbosity=0', ['INFO', 'WARN'])])
def test_entry_point_flags(flag, shown):
  """experiments.common.setup: WARNING by default; --log_level or absl's --verbosity bring INFO."""
  import subprocess
  import sys
  script = ('import sys\nfrom absl import app, logging\nfrom experiments import common\n'
            'def main(argv):\n  common.setup()\n  logging.info("INFO-LINE")\n'
            '  logging.warning("WARN-LINE")\n'
            'app.run(main, argv=[sys.argv[0], "--config", "configs/demo.py:test", '
            '"--workdir", "unused"] + sys.argv[1:])\n')
  proc = subprocess.run([sys.executable, '-c', script] + ([flag] if flag else []),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [k for k in ('INFO', 'WARN') if f'{k}-LINE' in proc.stderr] == shown
