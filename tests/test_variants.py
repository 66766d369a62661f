"""The reproduction variants of configs/demo.py (issue 17) end to end on the toy config: each
starts from a copy of one finished base run (pretrain, search, evaluate, passkey) and runs its
whole stage list, as `--config configs/demo.py:test,<variant>` would, then resumes."""

import json
import shutil

import numpy as np
import pytest

from configs import demo as demo_config
from longrope_jax import model as model_lib
from longrope_jax import pipeline
from longrope_jax.stages import baselines
from longrope_jax import validation


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('base')
  pipeline.run(demo_config.get_config('test'), workdir)
  return workdir


def _variant(base_run, tmp_path, variant):
  workdir = tmp_path / variant
  shutil.copytree(base_run, workdir)
  config = demo_config.get_config(f'test,{variant}')
  pipeline.run(config, workdir)
  results = json.loads((workdir / 'results.json').read_text())
  return workdir, results, (workdir / 'report.md').read_text()


def test_variant_stage_lists():
  stages = demo_config.get_config('seeds,finetuned,ablations,sliding,progressive').stages
  assert stages == ('pretrain', 'search', 'evaluate', 'passkey', 'evaluate_sliding', 'seeds',
                    'ablations', 'progressive', 'progressive_evaluate', 'progressive_passkey',
                    'finetuned', 'report')
  assert demo_config.get_config('finetuned').evaluate.multiples[-1] == 32
  assert demo_config.get_config('').stages == ('pretrain', 'search', 'evaluate', 'passkey',
                                               'report')


def test_retrieval_variant_trains_a_copying_base_model_at_l0_256():
  c = demo_config.get_config('retrieval')
  assert c.model.variant == 'retrieval'
  assert model_lib.get_config(c.model.variant).original_length == 256
  assert c.pretrain.passkey_fraction + c.pretrain.copy_fraction == pytest.approx(0.9)
  assert c.passkey.multiples == (1, 2, 4, 8, 16) and c.passkey.skip_fraction is not None
  tuning = c.progressive.finetune
  assert (tuning.passkey_fraction, tuning.copy_fraction) == (0.5, 0.4)
  assert validation.errors(c) == []


def test_seeds_variant(base_run, tmp_path):
  workdir, results, report = _variant(base_run, tmp_path, 'seeds')
  seeds = results['seeds']
  assert seeds['num_seeds'] == 3 and seeds['disjoint']
  assert [(workdir / 'seeds' / f'seed_{k}' / 'best_factors.json').exists()
          for k in range(3)] == [True] * 3
  held = results['seeds_perplexity']
  assert held['lengths'] == [256]
  assert all(len(held['methods'][f'seed_{k}']['nll_per_document'][0]) == 2 for k in range(3))
  assert '## Search seeds' in report and 'Held-out perplexity over seeds: ' in report
  # Resumes: nothing is searched again.
  mtime = (workdir / 'seeds' / 'seed_2' / 'ckpt').stat().st_mtime
  pipeline.run(demo_config.get_config('test,seeds'), workdir, stages=('seeds',))
  assert (workdir / 'seeds' / 'seed_2' / 'ckpt').stat().st_mtime == mtime
  assert json.loads((workdir / 'results.json').read_text())['seeds'] == seeds


def test_ablations_and_sliding_variants(base_run, tmp_path):
  _, results, report = _variant(base_run, tmp_path, 'ablations,sliding')
  ab = results['ablations']
  assert ab['lengths'] == [256]
  rows = ab['methods']
  assert {'PI (uniform)', 'per-dim, n_hat = 0 (searched)',
          'per-dim + n_hat (searched)'} <= set(rows)
  assert any(name.startswith('best seed (') for name in rows)
  # The full search row is the main search's factors on the same documents as the main table.
  assert rows['per-dim + n_hat (searched)']['nll'][0] == pytest.approx(
      results['perplexity']['methods']['longrope']['nll'][-1], rel=1e-6)
  assert '## Ablations (LongRoPE Table 11)' in report
  assert '`per-dim + n_hat (searched)` against each variant:' in report
  sliding = results['perplexity_sliding']
  assert sliding['stride'] == 32 and sliding['lengths'] == results['perplexity']['lengths']
  # At the longest length one window covers the span: truncated and sliding agree.
  np.testing.assert_allclose(sliding['methods']['none']['nll'][-1],
                             results['perplexity']['methods']['none']['nll'][-1], rtol=1e-6)
  assert '## Perplexity vs length, sliding windows' in report


@pytest.mark.slow
def test_finetuned_variant_with_progressive(base_run, tmp_path):
  workdir, results, report = _variant(base_run, tmp_path, 'finetuned,progressive')
  ft = results['finetuned']
  assert ft['lengths'] == [64, 128, 256, 512] and ft['finetune_length'] == 256
  assert set(ft['methods']) == {'linear (ft)', 'yarn (ft)', 'longrope (ft)',
                                'longrope_progressive'}
  assert all(v is not None for m in ft['methods'].values() for v in m['nll'])
  for method in ('linear', 'yarn'):
    assert (workdir / 'finetuned' / method / 'ckpt').exists()
  # LongRoPE's fine-tune is the progressive stage's (shared, not repeated).
  assert not (workdir / 'finetuned' / 'longrope').exists()
  assert '## Fine-tuned baselines' in report
  assert '`longrope (ft)` against the best fine-tuned baseline:' in report


def test_old_cache_lines_are_recomputed_not_misread(base_run, tmp_path):
  workdir = tmp_path / 'old_cache'
  shutil.copytree(base_run, workdir)
  before = json.loads((workdir / 'results.json').read_text())['perplexity']
  # A cache from before per-document values (and before one set of documents per curve).
  cache = workdir / 'eval' / 'perplexity.jsonl'
  cache.write_text(''.join(json.dumps(dict(method=m, length=L, nll=0.5)) + '\n'
                           for m in before['methods'] for L in before['lengths']))
  pipeline.run(demo_config.get_config('test'), workdir, stages=('evaluate',))
  after = json.loads((workdir / 'results.json').read_text())['perplexity']
  assert after['methods']['none']['nll'] == before['methods']['none']['nll']
  assert 0.5 not in after['methods']['none']['nll']
  assert all('protocol' in json.loads(line) for line in cache.read_text().splitlines())


def test_seed_windows_are_disjoint_where_the_split_allows():
  docs = [np.full(n, i, np.int32) for i, n in enumerate((10, 40, 50, 60, 70, 80, 90, 30))]
  sets, disjoint = baselines.seed_windows(docs, 40, 2, 3, seed=0)
  firsts = [tuple(w[:, 0]) for w in sets]  # each window is one document's id
  assert disjoint and len({d for f in firsts for d in f}) == 6
  assert all(w.shape == (2, 40) for w in sets)
  # 6 documents of >= 40 tokens cannot give 4 disjoint pairs: independent draws instead.
  sets, disjoint = baselines.seed_windows(docs, 40, 2, 4, seed=0)
  assert not disjoint and len(sets) == 4
  with pytest.raises(ValueError, match='search.num_windows'):
    baselines.seed_windows(docs, 85, 2, 3, seed=0)
