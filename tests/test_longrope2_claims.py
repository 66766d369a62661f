"""The LongRoPE2 report (report_longrope2.py): each claim held / not held / not resolved from its
conditions' 95% paired intervals; the config rules of the LongRoPE2 fields; workdirs made before
search.objective existed are not called stale for it."""

import json

import numpy as np
import pytest

from configs import demo as demo_config
from longrope_jax import provenance
from longrope_jax import report_longrope2 as lr2
from longrope_jax import validation

HELD, NOT_HELD, NOT_RESOLVED = lr2.HELD, lr2.NOT_HELD, lr2.NOT_RESOLVED


@pytest.mark.parametrize('low, high, better, want', [
    (-0.3, -0.1, 'lower', HELD), (0.1, 0.3, 'lower', NOT_HELD), (-0.1, 0.1, 'lower', NOT_RESOLVED),
    (0.1, 0.3, 'higher', HELD), (-0.3, -0.1, 'higher', NOT_HELD), (0.0, 0.0, 'higher',
                                                                     NOT_RESOLVED)])
def test_verdict_from_an_interval(low, high, better, want):
  assert lr2.verdict(low, high, better) == want


def test_a_claim_holds_when_every_condition_holds():
  assert lr2.combine([HELD, HELD]) == HELD
  assert lr2.combine([HELD, NOT_RESOLVED]) == NOT_RESOLVED
  assert lr2.combine([NOT_RESOLVED, NOT_HELD, HELD]) == NOT_HELD
  assert lr2.combine([]) == NOT_RESOLVED


def results(nll_at_l0: dict, retrieval_at_target: dict, nll_at_target: dict | None = None):
  """A 'longrope2' results record: per-document NLLs at L0 = 64 and the target 256, per-prompt
  passkey scores (two depths of three prompts) at 256, all 1 at L0."""
  names = list(nll_at_l0)
  nll_at_target = nll_at_target or {n: [3.0, 3.1, 3.2, 3.3] for n in names}
  perplexity = dict(lengths=[64, 256], original_length=64, num_windows=4, split='test',
                    document_length=256, stride=None, methods={
                        n: dict(nll_per_document=[nll_at_l0[n], nll_at_target[n]],
                                nll=[float(np.mean(nll_at_l0[n])), float(np.mean(
                                    nll_at_target[n]))],
                                perplexity=[float(np.exp(np.mean(nll_at_l0[n]))),
                                            float(np.exp(np.mean(nll_at_target[n])))])
                        for n in names})
  ones = [1.0] * 6  # every row retrieves every prompt at L0
  retrieval = dict(lengths=[64, 256], original_length=64, depths=[0.0, 1.0], trials=3, methods={
      n: dict(scores=[[x[:3], x[3:]] for x in (ones, s)],
              accuracy=[[np.mean(x[:3]), np.mean(x[3:])] for x in (ones, s)],
              mean=[1.0, float(np.mean(s))]) for n, s in retrieval_at_target.items()})
  return dict(perplexity=perplexity, retrieval={'passkey': retrieval}, skipped={},
              finetune_length=256, finetune_steps=4, short_rope='original',
              arms={n: dict(label=n, finetune='mixed' if n == 'longrope2' else 'plain',
                            factors=n) for n in names if n != 'base'})


ALL = ('base', 'longrope2', 'longrope2_plain', 'longrope2_ppl', 'longrope2_free')


def test_claims_from_paired_intervals():
  nll = {'base': [2.0, 2.1, 2.2, 2.3], 'longrope2': [2.01, 2.12, 2.2, 2.32],
         'longrope2_plain': [2.5, 2.7, 2.6, 2.9], 'longrope2_ppl': [2.5, 2.7, 2.6, 2.9],
         'longrope2_free': [2.5, 2.7, 2.6, 2.9]}
  scores = {'longrope2': [1, 1, 1, 1, 1, 1], 'longrope2_plain': [1, 1, 1, 1, 1, 1],
            'longrope2_ppl': [0, 0, 0, 0, 0, 0], 'longrope2_free': [1, 0, 1, 1, 1, 1],
            'base': [0] * 6}
  r = results(nll, scores)
  table, verdicts = lr2.claims_table(r)
  # (1) plain-fine-tuned LongRoPE2 retrieves every prompt the ppl search misses: held.
  # (2) one prompt of six apart: the interval reaches 0, not resolved.
  # (3) the plain fine-tune loses L0 quality and the mixed one keeps it: held.
  assert verdicts == [HELD, NOT_RESOLVED, HELD]
  c = lr2.compare(r, lr2.CLAIMS[0].conditions[0])
  assert (c['a'], c['b'], c['length'], c['n']) == ('longrope2_plain', 'longrope2_ppl', 256, 6)
  assert (c['diff'], c['low'], c['high']) == (1.0, 1.0, 1.0)
  assert '| (3) mixed-window training retains L0 quality' in table and 'missing' not in table
  # Mixed fine-tuning worse than plain at L0: claim 3 fails.
  worse = dict(nll, longrope2=[3.0, 3.1, 3.2, 3.3])
  assert lr2.claims_table(results(worse, scores))[1][2] == NOT_HELD
  # Without the plain-fine-tuned arm, LongRoPE2 itself stands for ours in claims 1 and 2, and
  # claim 3 cannot be decided.
  partial = {k: v for k, v in nll.items() if k != 'longrope2_plain'}
  r = results(partial, {k: v for k, v in scores.items() if k != 'longrope2_plain'})
  table, verdicts = lr2.claims_table(r)
  assert verdicts == [HELD, NOT_RESOLVED, NOT_RESOLVED]
  assert lr2.compare(r, lr2.CLAIMS[0].conditions[0])['a'] == 'longrope2' and 'missing' in table


def test_render_reports_the_critical_dimensions_and_retention():
  nll = {n: [2.0 + i / 10, 2.1, 2.2, 2.3] for i, n in enumerate(ALL)}
  scores = {n: [1, 0, 1, 0, 1, 0] for n in ALL}
  text = lr2.render({'longrope2': results(nll, scores), 'longrope2_search': dict(
      searches={'longrope2': {'rcd': 5}, 'longrope2_ppl': {'rcd': 6}}, d_tcd=7, d10_tcd=3)})
  assert 'd_rcd found longrope2 5, longrope2_ppl 6, against the theoretical d_tcd = 7' in text
  assert '### Short-context retention at L0' in text and '### Retrieval: passkey' in text
  assert lr2.render({}) == ''


def test_longrope2_config_rules():
  config = demo_config.get_config('retrieval,longrope2')
  assert validation.errors(config) == []
  assert config.longrope2.needle_format == 'passkey' and config.niah.format == 'short'
  for field, value in (('longrope2.arms', ('longrope2', 'pi')), ('longrope2.short_rope', 'hf'),
                       ('longrope2.finetune.short_fraction', 1.5),
                       ('longrope2.finetune.short_documents', 'books'),
                       ('niah.tasks', ('single', 'vt')), ('niah.num_values', 1),
                       ('search.objective', 'ruler'), ('search.needle_format', 'niah')):
    bad = demo_config.get_config('retrieval,longrope2')
    section, _, name = field.rpartition('.')
    node = bad
    for part in section.split('.'):
      node = node[part]
    node[name] = value
    found = [e.field for e in validation.errors(bad)]
    assert any(f.startswith(field) for f in found), (field, found)
  bad = demo_config.get_config('retrieval,longrope2')
  bad.longrope2.finetune.copy_fraction = 0.6
  assert [e.field for e in validation.errors(bad)] == ['longrope2.finetune.copy_fraction']
  bad = demo_config.get_config('test,longrope2')
  bad.longrope2.finetune.passkey_fraction = 0.1
  assert [e.field for e in validation.errors(bad)] == ['longrope2.finetune.passkey_fraction']


def test_records_without_the_objective_fields_are_not_stale(tmp_path):
  """A search record written before search.objective / needle_format existed reads as the
  perplexity objective: kept, not recomputed."""
  config = demo_config.get_config('test')
  decisions = provenance.plan(config, ('pretrain', 'search'), tmp_path)
  for d in decisions:
    provenance.finish(tmp_path, d)
  path = tmp_path / provenance.RECORD_FILE
  records = json.loads(path.read_text())
  for field in ('search.objective', 'search.needle_format'):
    del records['search']['fields'][field]
  path.write_text(json.dumps(records))
  assert [d.action for d in provenance.plan(config, ('pretrain', 'search'), tmp_path)] == \
      [provenance.KEEP, provenance.KEEP]
  config.search.objective = 'needle'
  assert [d.action for d in provenance.plan(config, ('pretrain', 'search'), tmp_path,
                                            overwrite=True)] == [provenance.KEEP,
                                                                  provenance.RECOMPUTE]
