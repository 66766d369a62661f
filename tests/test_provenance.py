"""Stage fingerprints and rerun decisions: a changed config recomputes what depends on it or
refuses, naming the changed fields. Every case starts from configs/demo.py:test."""

import json

import pytest

from longrope_jax import provenance as prov
from toy_config import toy_config

STAGES = ('pretrain', 'search', 'evaluate', 'passkey', 'report')  # configs/demo.py:test's


def test_the_stages_are_the_toy_configs():
  assert toy_config().stages == STAGES


def _finish_all(config, workdir):
  for d in prov.plan(config, STAGES, workdir):
    prov.begin(workdir, d)
    prov.finish(workdir, d)


def test_fingerprint_is_stable_and_sensitive():
  a = prov.fingerprint({'pretrain': {'steps': 20, 'lr': 1e-3}}, {'x': 'ab'})
  assert a == prov.fingerprint({'pretrain': {'lr': 1e-3, 'steps': 20}}, {'x': 'ab'})  # key order
  assert len(a) == 16
  assert a != prov.fingerprint({'pretrain': {'steps': 40, 'lr': 1e-3}}, {'x': 'ab'})
  assert a != prov.fingerprint({'pretrain': {'steps': 20, 'lr': 1e-3}}, {'x': 'ac'})
  assert prov.fingerprint({'m': (1, 2)}, {}) == prov.fingerprint({'m': [1, 2]}, {})


def test_unchanged_rerun_keeps_every_stage(tmp_path):
  _finish_all(toy_config(), tmp_path)
  decisions = prov.plan(toy_config(), STAGES, tmp_path)
  assert [d.action for d in decisions] == [prov.KEEP] * len(STAGES)
  # Ignored fields (checkpoint cadence, memory) do not count as changes.
  decisions = prov.plan(toy_config(**{'pretrain.ckpt_every': 5, 'search.settings.memory_gb': 8.0,
                                   'evaluate.batch_tokens': 4096}), STAGES, tmp_path)
  assert [d.action for d in decisions] == [prov.KEEP] * len(STAGES)


@pytest.mark.parametrize('field,value,actions', [
    # Training to more steps continues, and every later stage is recomputed.
    ('pretrain.steps', 40, ['extend', 'recompute', 'recompute', 'recompute', 'keep']),
    ('pretrain.steps', 10, ['recompute', 'recompute', 'recompute', 'recompute', 'keep']),
    ('seed', 1, ['recompute', 'recompute', 'recompute', 'recompute', 'keep']),
    ('data.source', 'files', ['recompute', 'recompute', 'recompute', 'recompute', 'keep']),
    ('evaluate.num_windows', 3, ['keep', 'keep', 'recompute', 'keep', 'keep']),
    ('search.num_windows', 3, ['keep', 'recompute', 'recompute', 'recompute', 'keep']),
    ('search.settings.population', 12, ['keep', 'recompute', 'recompute', 'recompute', 'keep']),
    # Which cells are asked for: the cached cells stay valid.
    ('evaluate.multiples', (1, 2, 4, 8), ['keep', 'keep', 'rerun', 'keep', 'keep']),
])
def test_changed_config_decisions(tmp_path, field, value, actions):
  _finish_all(toy_config(), tmp_path)
  decisions = prov.plan(toy_config(**{field: value}), STAGES, tmp_path, overwrite=True)
  assert [d.action for d in decisions] == actions
  first = next(d for d in decisions if d.action != prov.KEEP)
  assert any(c.startswith(field) for c in first.changes), first.changes


def test_refusal_lists_changed_fields_and_the_way_out(tmp_path):
  _finish_all(toy_config(), tmp_path)
  with pytest.raises(prov.StaleWorkdirError) as e:
    prov.plan(toy_config(**{'pretrain.steps': 40}), STAGES, tmp_path)
  message = str(e.value)
  assert 'pretrain.steps: 20 -> 40' in message
  assert 'upstream pretrain changed' in message
  assert '--workdir' in message and '--config.overwrite=True' in message
  # Cell-only changes never refuse.
  prov.plan(toy_config(**{'evaluate.methods': ('none', 'linear', 'ntk')}), STAGES, tmp_path)


def test_upstream_not_run_counts_with_its_record(tmp_path):
  _finish_all(toy_config(), tmp_path)
  # Only evaluate runs, with a changed pretrain config: the checkpoint is still the recorded one,
  # so evaluate's inputs did not change.
  decisions = prov.plan(toy_config(**{'pretrain.steps': 40}), ('evaluate',), tmp_path)
  assert [d.action for d in decisions] == [prov.KEEP]


def test_invalidate_removes_the_stage_outputs_results_and_record(tmp_path):
  _finish_all(toy_config(), tmp_path)
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'perplexity.jsonl').write_text('{"method": "none"}\n')
  (tmp_path / 'eval' / 'passkey.jsonl').write_text('{"method": "none"}\n')
  (tmp_path / 'search').mkdir()
  (tmp_path / 'search' / 'history.jsonl').write_text('{}\n')
  (tmp_path / 'results.json').write_text(json.dumps({'search': 1, 'perplexity': 2, 'passkey': 3}))
  decisions = prov.plan(toy_config(**{'search.num_windows': 3}), STAGES, tmp_path, overwrite=True)
  for d in decisions:
    prov.invalidate(tmp_path, d)
  assert not (tmp_path / 'search').exists()
  # Only the search changed under evaluate and passkey: their non-longrope cells stay.
  assert (tmp_path / 'eval' / 'perplexity.jsonl').read_text() == '{"method": "none"}\n'
  assert json.loads((tmp_path / 'results.json').read_text()) == {}
  for d in prov.plan(toy_config(seed=3), STAGES, tmp_path, overwrite=True):
    prov.invalidate(tmp_path, d)
  assert not (tmp_path / 'eval' / 'perplexity.jsonl').exists()
  assert not (tmp_path / 'eval' / 'passkey.jsonl').exists()
  assert not prov.read_records(tmp_path)['evaluate'].done
  assert prov.read_records(tmp_path)['pretrain'].fields['seed'] == 3


def test_extend_keeps_outputs_and_a_killed_stage_is_owned(tmp_path):
  _finish_all(toy_config(), tmp_path)
  (tmp_path / 'ckpt').mkdir()
  decisions = prov.plan(toy_config(**{'pretrain.steps': 40}), ('pretrain',), tmp_path,
                        overwrite=True)
  assert prov.invalidate(tmp_path, decisions[0]) == [] and (tmp_path / 'ckpt').exists()
  prov.begin(tmp_path, decisions[0])
  assert prov.read_records(tmp_path)['pretrain'].done is False
  assert prov.read_records(tmp_path)['pretrain'].fields['pretrain.steps'] == 40


def test_records_from_an_old_config_json_catch_a_legacy_workdir(tmp_path):
  records = prov.records_from_config(toy_config(), ('pretrain', 'search'))
  with pytest.raises(prov.StaleWorkdirError, match='seed: 0 -> 1'):
    prov.plan(toy_config(seed=1), STAGES, tmp_path, records=records)


def test_damaged_record_file_names_its_path(tmp_path):
  (tmp_path / prov.RECORD_FILE).write_text('{"pretrain": {"fi')
  with pytest.raises(ValueError, match='provenance.json'):
    prov.read_records(tmp_path)


def test_downstream_of_pretrain_is_every_stage():
  assert prov.downstream('pretrain') == ['search', 'evaluate', 'passkey', 'niah', 'progressive',
                                         'progressive_evaluate', 'progressive_passkey',
                                         'evaluate_sliding', 'seeds', 'finetuned', 'ablations',
                                         'longrope2_search', 'longrope2_finetune',
                                         'longrope2_evaluate', 'export']
  assert prov.downstream('evaluate') == ['export']
  assert prov.downstream('longrope2_search') == ['longrope2_finetune', 'longrope2_evaluate']
  assert prov.downstream('progressive') == ['progressive_evaluate', 'progressive_passkey']
  assert prov.downstream('passkey') == ['progressive_passkey']


def test_a_new_search_drops_only_the_longrope_cells(tmp_path):
  _finish_all(toy_config(), tmp_path)
  (tmp_path / 'eval').mkdir()
  cache = tmp_path / 'eval' / 'perplexity.jsonl'
  cache.write_text('{"method": "none", "length": 64, "nll": 1.0}\n'
                   '{"method": "longrope", "length": 256, "nll": 2.0}\n')
  decisions = prov.plan(toy_config(**{'search.settings.generations': 5}), STAGES, tmp_path,
                        overwrite=True)
  evaluate = next(d for d in decisions if d.stage == 'evaluate')
  assert evaluate.action == prov.RECOMPUTE and evaluate.changes == ('upstream search changed',)
  prov.invalidate(tmp_path, evaluate)
  assert [json.loads(l)['method'] for l in cache.read_text().splitlines()] == ['none']


def test_prepare_adopts_an_older_workdir_from_its_config_json(tmp_path):
  (tmp_path / 'config.json').write_text(toy_config().to_json())
  (tmp_path / 'results.json').write_text(json.dumps({'pretrain': {}, 'search': {},
                                                     'perplexity': {}}))
  (tmp_path / 'search').mkdir()
  with pytest.raises(prov.StaleWorkdirError, match=r'search.num_windows: 2 -> 3'):
    prov.prepare(toy_config(**{'search.num_windows': 3}), STAGES, tmp_path)
  assert (tmp_path / 'search').exists()  # a refusal changes nothing
  decisions = prov.prepare(toy_config(**{'search.num_windows': 3}), STAGES, tmp_path,
                           overwrite=True)
  assert [d.action for d in decisions] == ['keep', 'recompute', 'recompute', 'keep', 'keep']
  assert not (tmp_path / 'search').exists()
  assert json.loads((tmp_path / 'results.json').read_text()) == {'pretrain': {}}


def test_attention_implementation_is_a_performance_knob_even_for_old_workdirs(tmp_path):
  _finish_all(toy_config(), tmp_path)
  # Switching to another implementation (all equal dense within 1e-5) keeps every stage.
  decisions = prov.plan(toy_config(**{'model.attention': 'blockwise'}), STAGES, tmp_path)
  assert [d.action for d in decisions] == [prov.KEEP] * len(STAGES)
  # A workdir written when stages still read model.attention: its records hold the field and
  # fingerprints over it, downstream too; it is read as current and kept.
  path = tmp_path / prov.RECORD_FILE
  records = json.loads(path.read_text())
  renamed = {}
  for stage in STAGES:
    record = prov.StageRecord.from_json(records[stage])
    if stage != 'pretrain':
      record.fields['model.attention'] = 'dense'
    record.upstream = {u: renamed[fp] for u, fp in record.upstream.items()}
    renamed[records[stage]['fingerprint']] = record.fingerprint
    records[stage] = record.to_json()
  path.write_text(json.dumps(records))
  decisions = prov.plan(toy_config(**{'model.attention': 'blockwise'}), STAGES, tmp_path)
  assert [d.action for d in decisions] == [prov.KEEP] * len(STAGES)
  # Without the clean-up the old records would read as changed: the test is not vacuous.
  raw = {s: prov.StageRecord.from_json(r) for s, r in records.items()}
  assert raw['search'].fingerprint != prov.read_records(tmp_path)['search'].fingerprint
