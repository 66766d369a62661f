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


@pytest.mark.slow
def test_longrope2_variant(base_run, tmp_path):
  """:test,longrope2 from the base run: LongRoPE2's searches, one fine-tune per arm (mixed or
  plain, one budget), every arm evaluated with the short/long switch, the claims table; a rerun
  reuses every search, fine-tune and cell."""
  from longrope_jax import rope as rope_lib
  from longrope_jax.stages import longrope2 as longrope2_stages
  workdir, results, report = _variant(base_run, tmp_path, 'longrope2')
  config = demo_config.get_config('test,longrope2')
  arms = config.longrope2.arms
  search = results['longrope2_search']
  assert (search['d_tcd'], search['d10_tcd']) == (3, 1)  # head_dim 16, theta 1e4, L0 = 64
  assert set(search['searches']) == set(longrope2_stages.searches_needed(arms))
  rcd = search['searches']['longrope2']['rcd']
  assert search['searches']['longrope2']['objective'] == 'needle' and 1 <= rcd <= 3
  tuned = results['longrope2_finetune']
  assert list(tuned) == list(arms)
  assert tuned['longrope2']['finetune'] == 'mixed' and tuned['longrope2']['short_steps'] == 2
  assert tuned['longrope2_plain']['short_steps'] == 0
  assert tuned['longrope2']['factors'] == tuned['longrope2_plain']['factors'] == \
      search['searches']['longrope2']['factors']
  # YaRN-rcd re-based on the d_rcd LongRoPE2 found.
  want = rope_lib.yarn_rcd(head_dim=16, scale=4.0, theta=10000.0, original_length=64, rcd=rcd)
  np.testing.assert_allclose(tuned['yarn_rcd']['factors'], np.asarray(want.factors), rtol=1e-5)
  r = results['longrope2']
  p = r['perplexity']
  assert p['lengths'] == [64, 128, 256] and list(p['methods']) == ['base', *arms]
  assert p['methods']['base']['nll'][1:] == [None, None]
  assert all(v is not None for arm in arms for v in p['methods'][arm]['nll'])
  # At L0 every arm runs the original RoPE: the base model's row and LongRoPE2's differ only by
  # fine-tuning; the mixed and the plain fine-tune differ.
  assert p['methods']['longrope2']['nll'][0] != p['methods']['longrope2_plain']['nll'][0]
  assert set(r['retrieval']) | set(r['skipped']) == {'passkey', *config.niah.tasks}
  assert '## LongRoPE2' in report and '### Claims of the paper at demo scale' in report
  assert '| (3) mixed-window training retains L0 quality' in report
  # A rerun trains, searches and measures nothing again: checkpoints untouched, cells kept.
  ckpts = [p for p in (workdir / 'longrope2').rglob('*') if p.is_file() and 'ckpt' in p.parts]
  stamps = {path: path.stat().st_mtime for path in ckpts}
  cells = {path: path.read_text() for path in (workdir / 'eval').glob('longrope2_*.jsonl')}
  assert len(cells) == 5 and len(stamps) > 10
  pipeline.run(config, workdir)
  assert {path: path.stat().st_mtime for path in stamps} == stamps
  assert {path: path.read_text() for path in cells} == cells
  assert json.loads((workdir / 'results.json').read_text())['longrope2'] == r


def test_needle_objective_search(base_run, tmp_path):
  """search.objective='needle': the search's fitness is the NLL of the needle answers only
  (data.needle_windows, model.token_nll weighted), recorded as such."""
  import jax.numpy as jnp
  from longrope_jax import data as data_lib
  from longrope_jax import search as search_lib
  from longrope_jax.stages.run import Run
  workdir = tmp_path / 'needle'
  shutil.copytree(base_run, workdir)
  config = demo_config.get_config('test')
  config.search.update(objective='needle', needle_format='short')
  config.overwrite = True
  pipeline.run(config, workdir, stages=('search',))
  record = json.loads((workdir / 'results.json').read_text())['search']
  assert record['objective'] == 'needle' and 'needle answers' in record['fitness']
  run = Run(config, workdir)
  windows, weights = data_lib.needle_windows(run.documents('validation'), run.tokenizer, 256,
                                             config.search.num_windows, fmt='short')
  nll = np.asarray(model_lib.token_nll(run.model_config, run.params(), jnp.asarray(windows),
                                       search_lib.SearchResult.from_json(record).rope()))
  np.testing.assert_allclose(record['nll'], (nll * weights).sum() / weights.sum(), rtol=1e-4)
  seeds = demo_config.get_config('test,seeds')
  seeds.search.objective = 'needle'
  with pytest.raises(validation.ConfigError, match="'needle' is not supported by the seeds"):
    validation.validate_config(seeds)
