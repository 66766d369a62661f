"""`python -m experiments.search --config configs/hf.py --config.model.path=DIR` on a tiny local
Hugging Face checkpoint (written by hf.save_params: no torch, nothing downloaded)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from longrope_jax import hf
from longrope_jax import model as model_lib


def test_search_entry_point_on_a_local_hf_checkpoint(tmp_path):
  config = model_lib.get_config('test', tie_embeddings=False)
  params = model_lib.init_params(config, jax.random.key(0))
  ckpt = hf.save_params(params, config, tmp_path / 'ckpt')
  workdir = tmp_path / 'run'
  args = [sys.executable, '-m', 'experiments.search', '--config', 'configs/hf.py',
          f'--config.model.path={ckpt}', '--workdir', str(workdir),
          '--config.data.tokenizer=bytes', '--config.model.dtype=float32',
          '--config.model.attention=dense', '--config.search.multiple=2',
          '--config.search.num_windows=2', '--config.search.settings.population=4',
          '--config.search.settings.parents=2', '--config.search.settings.mutations=1',
          '--config.search.settings.crossovers=1', '--config.search.settings.generations=2',
          '--config.evaluate.num_windows=2']
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((workdir / 'results.json').read_text())['search']
  assert result['original_length'] == config.original_length
  assert result['target_length'] == 2 * config.original_length
  factors = np.asarray(result['factors'])
  assert factors.shape == (config.head_dim // 2,) and np.all(factors >= 1.0)
  assert np.all(np.diff(factors) >= -1e-9)  # monotone by default
  assert (workdir / 'report.md').exists()


def test_export_stage_runs_the_folder_in_transformers(tmp_path):
  """configs/hf.py with the export stage: the searched factors written as a longrope folder and
  run in transformers on the evaluate stage's documents; beyond L0 its NLL equals our searched
  row, within L0 it differs from the original model by the attention factor."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from configs import common
  from configs import hf as hf_config
  from longrope_jax import pipeline
  config = model_lib.get_config('test', tie_embeddings=False)
  params = model_lib.init_params(config, jax.random.key(0))
  ckpt = hf.save_params(params, config, tmp_path / 'ckpt')
  c = hf_config.get_config()
  c.stages = ('search', 'evaluate', 'export', 'report')
  c.model.update(path=str(ckpt), dtype='float32', attention='dense')
  c.data.tokenizer = 'bytes'
  c.search.update(multiple=2, num_windows=1)
  c.search.settings.update(population=4, parents=2, mutations=1, crossovers=1, generations=1)
  c.evaluate.update(multiples=(1, 2), num_windows=2, methods=('none', 'yarn'))
  c.export = common.export_section(multiples=(1, 2), num_windows=2, attention='eager')
  workdir = tmp_path / 'run'
  pipeline.run(c, workdir)
  results = json.loads((workdir / 'results.json').read_text())
  record = results['export']
  assert hf.read_config(workdir / record['folder'])['rope_scaling']['long_factor'] == pytest.approx(
      results['search']['factors'])
  at_l0, beyond = record['checks']
  assert (at_l0['length'], beyond['length']) == (config.original_length,
                                                  2 * config.original_length)
  assert beyond['reference'] == 'longrope' and at_l0['reference'] == 'none'
  assert beyond['max_abs_nll_difference'] < 1e-4, beyond
  # Within L0 transformers applies the attention factor (> 1) to plain RoPE: not the original.
  assert at_l0['max_abs_nll_difference'] > 1e-4, at_l0
  assert '## Export to Hugging Face' in (workdir / 'report.md').read_text()
  # Rerun: the cached transformers cells are reused, the record is the same.
  pipeline.run(c, workdir)
  assert json.loads((workdir / 'results.json').read_text())['export'] == record


def test_export_stage_without_search_results_names_the_stages(tmp_path):
  from configs import common
  from configs import hf as hf_config
  from longrope_jax.stages import export as export_stage
  from longrope_jax.stages.run import Run
  c = hf_config.get_config()
  c.export = common.export_section()
  with pytest.raises(ValueError, match="search and perplexity result.*before 'export'"):
    export_stage.export(Run(c, tmp_path))
