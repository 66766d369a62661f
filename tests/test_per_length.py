"""LongRoPE searched per target length (search.multiples): each length searched on the same base
model, each evaluation length scored with its own length's factors, lengths added or removed
without losing the searches and cells that did not change."""

import json

import numpy as np
import pytest

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import pipeline
from longrope_jax import provenance as prov
from longrope_jax import report as report_lib
from longrope_jax import search as search_lib
from longrope_jax import validation
from longrope_jax.stages.run import search_for_length, search_multiples
from test_search_resume import random_params
from toy_config import toy_config

ROW = report_lib.PER_LENGTH
STAGES = ('search', 'evaluate', 'passkey', 'report')


def test_each_length_takes_the_shortest_search_at_or_above_it():
  targets = [1024, 128, 256]
  assert [search_for_length(targets, L) for L in (65, 128, 129, 256, 300, 1024, 4096)] == \
      [128, 128, 256, 256, 1024, 1024, 1024]
  assert search_multiples({'multiple': 8, 'multiples': None}) == (8,)
  assert search_multiples({'multiple': 8, 'multiples': (16, 2, 8)}) == (2, 8, 16)
  assert search_multiples({'multiple': 8}) == (8,)  # a config from before the field


@pytest.mark.parametrize('multiples,message', [
    ((2, 8), r'search.multiples = \(2, 8\) does not hold search.multiple = 4: .*add 4 to '
             r'search.multiples'),
    ((2, 4, 2), r'search.multiples = \(2, 4, 2\) repeats a length'),
    ((0.5, 4), r'search.multiples\[0\] must be a finite number >= 1'),
    ((), r'search.multiples must be a non-empty tuple.*None leaves it unset'),
])
def test_bad_search_multiples_name_the_field_and_the_fix(multiples, message):
  with pytest.raises(validation.ConfigError, match=message) as e:
    validation.validate_config(toy_config(**{'search.multiples': multiples}))
  assert e.value.field.startswith('search.multiples')


def test_no_stage_fingerprints_the_searched_lengths():
  """Each length's search is its own folder and each per-length cell records its factors, so
  search.multiples changes no stage's inputs (the stages reading one search keep theirs)."""
  config = toy_config(**{'search.multiples': (2, 4)})
  for stage in ('search', 'seeds', 'ablations', 'progressive', 'evaluate', 'passkey'):
    fields = prov.stage_fields(config, stage)
    assert 'search.multiple' in fields or stage in ('evaluate', 'passkey', 'progressive')
    assert not any(k.startswith('search.multiples') for k in fields), stage
  assert prov.stage_fields(config, 'search') == prov.stage_fields(toy_config(), 'search')


def test_the_demo_variant_searches_every_evaluated_length_beyond_l0():
  from configs import demo
  c = demo.get_config('perlength')
  assert c.search.multiples == (2, 4, 8, 16) and c.search.multiple == 8
  assert set(c.search.multiples) == {m for m in c.evaluate.multiples if m > 1}
  assert validation.errors(c) == [] and demo.get_config('').search.multiples is None
  assert demo.get_config('test,perlength').search.multiples == (2, 4)


def _config(multiples):
  config = toy_config(**{'search.multiples': multiples, 'search.settings.generations': 1,
                         'evaluate.methods': ('none',), 'evaluate.multiples': (1, 2, 4, 8),
                         'passkey.methods': ('none',)})
  config.stages = STAGES
  return config


def _cells(workdir):
  return {(r['method'], r['length']): r for r in
          ckpt_lib.read_jsonl(workdir / 'eval' / 'perplexity.jsonl')}


def test_per_length_search_evaluates_each_length_with_its_own_factors(tmp_path):
  """toy: L0 = 64, search.multiple 4. One search first, then 2x added: the 4x search and every
  cell it serves are kept, the 2x cell is recomputed with the 2x factors; 8x (beyond the longest
  search) takes the longest's."""
  run = pipeline.Run(_config(None), tmp_path)
  ckpt_lib.save(ckpt_lib.manager(tmp_path / 'ckpt'), 1,
                dict(params=random_params(run.model_config)))  # stands in for pretraining
  pipeline.run(_config(None), tmp_path)
  one = json.loads((tmp_path / 'results.json').read_text())
  assert 'longrope' in one['perplexity']['methods'] and 'search_per_length' not in one
  searched_4x = (tmp_path / 'search' / 'best_factors.json').read_text()

  # Adding a length changes no stage's inputs: nothing is refused or recomputed ...
  decisions = prov.plan(_config((2, 4)), STAGES, tmp_path)
  assert [d.action for d in decisions] == [prov.KEEP] * len(STAGES)
  pipeline.run(_config((2, 4)), tmp_path)
  two = json.loads((tmp_path / 'results.json').read_text())
  # ... the 4x search is the same one, the 2x search has its own folder and record.
  assert (tmp_path / 'search' / 'best_factors.json').read_text() == searched_4x
  assert two['search'] == one['search']
  per_length = two['search_per_length']
  assert list(per_length) == ['128', '256']
  assert {k: v for k, v in per_length['256'].items() if k != 'seconds'} == one['search']
  assert per_length['128']['target_length'] == 128 and per_length['128']['scale'] == 2
  assert per_length['128']['seconds'] > 0
  assert (tmp_path / 'search' / 'length_128' / 'best_factors.json').exists()

  table = two['perplexity']['methods']
  assert 'longrope' not in table and table[ROW]['nll'][0] is None  # no scaling at L0
  # 4x and 8x use the 4x factors: the one-search row's very numbers.
  assert table[ROW]['nll_per_document'][2:] == one['perplexity']['methods']['longrope'][
      'nll_per_document'][2:]
  # 2x uses the 2x search's factors: recomputed here against the library.
  cells = _cells(tmp_path)
  assert [cells[(ROW, L)].get('depends', {}).get('target_length') for L in (64, 128, 256, 512)] \
      == [None, 128, 256, 256]
  windows = eval_lib.eval_documents(run.documents('test'), 512, 2)[0][:, :128]
  rope = search_lib.SearchResult.from_json(per_length['128']).rope()
  expected = eval_lib.document_nll(run.model_config, run.params(), windows, rope)
  np.testing.assert_allclose(table[ROW]['nll_per_document'][1], expected, rtol=1e-6)

  # Passkey at 2x (the toy config's) with the 2x factors, its cell marked with them.
  assert list(two['passkey']['methods']) == ['none', ROW]
  keys = {(r['method'], r['length']): r for r in
          ckpt_lib.read_jsonl(tmp_path / 'eval' / 'passkey.jsonl')}
  assert keys[(ROW, 128)]['depends'] == cells[(ROW, 128)]['depends']

  report = (tmp_path / 'report.md').read_text()
  assert f'| {ROW} | - |' in report and report_lib.per_length_note(per_length) in report
  assert '| 128 (2x) | longrope (searched per length) |' in report  # its paired comparison
  assert '| 128 (2x) | ' in report.split('Searched at each length')[1]

  # A rerun computes nothing; dropping back to one search drops the per-length record and
  # brings back the 'longrope' row from its cached cells.
  before = (tmp_path / 'eval' / 'perplexity.jsonl').read_text()
  pipeline.run(_config((2, 4)), tmp_path)
  assert (tmp_path / 'eval' / 'perplexity.jsonl').read_text() == before
  pipeline.run(_config(None), tmp_path)
  again = json.loads((tmp_path / 'results.json').read_text())
  assert 'search_per_length' not in again and again['perplexity'] == one['perplexity']
  assert (tmp_path / 'eval' / 'perplexity.jsonl').read_text() == before
