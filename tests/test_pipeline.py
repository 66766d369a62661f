"""The one-command pipeline on the toy config: every stage runs, writes its outputs, resumes."""

import json
import subprocess
import sys

import pytest

from configs import demo as demo_config
from longrope_jax import pipeline


def test_demo_test_config_runs_end_to_end_and_resumes(tmp_path):
  config = demo_config.get_config('test')
  run = pipeline.run(config, tmp_path)
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'report.md', 'plots/pretrain.png',
               'plots/perplexity.png', 'plots/passkey.png'):
    assert (tmp_path / name).exists(), name
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results) >= {'pretrain', 'search', 'perplexity', 'passkey'}
  ppl = results['perplexity']
  assert ppl['lengths'] == [64, 128, 256]
  assert 'longrope' in ppl['methods'] and ppl['methods']['longrope']['nll'][0] is None
  report = (tmp_path / 'report.md').read_text()
  assert '| method | 64 (1x) | 128 (2x) | 256 (4x) |' in report
  assert '## Passkey retrieval' in report
  # Everything is done: a second run recomputes nothing and gives the same results.
  mtime = (tmp_path / 'ckpt').stat().st_mtime
  pipeline.run(config, tmp_path)
  assert json.loads((tmp_path / 'results.json').read_text())['perplexity'] == ppl
  assert (tmp_path / 'ckpt').stat().st_mtime == mtime
  assert run.results()['pretrain']['steps'] == 20


def test_unknown_stage_and_locked_config(tmp_path):
  config = demo_config.get_config('test')
  with pytest.raises(ValueError, match='unknown stages'):
    pipeline.run(config, tmp_path, stages=('pretrain', 'finetune_everything'))
  with pytest.raises(ValueError, match='unknown config variant'):
    demo_config.get_config('huge')
  # The entry point locks the config: a misspelled field fails loudly.
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config', 'configs/demo.py:test',
       '--workdir', str(tmp_path / 'x'), '--config.pretrain.stepz=3'],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'stepz' in proc.stderr
  assert not (tmp_path / 'x').exists()
