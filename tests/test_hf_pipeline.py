"""`python -m experiments.search --config configs/hf.py --config.model.path=DIR` on a tiny local
Hugging Face checkpoint (written by hf.save_params: no torch, nothing downloaded)."""

import json
import subprocess
import sys

import jax
import numpy as np

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
