"""Workdir integrity: every damaged or foreign file is reported by its path with what to do, and
JSONL caches survive a torn last line."""

import json
import shutil
import warnings

import numpy as np
import pytest

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import data as data_lib


def _state():
  return dict(a=np.arange(4.0), b=dict(c=np.ones((2, 3), np.float32)),
              step=np.asarray(5, np.int32))


def _two_steps(directory):
  """A checkpoint folder with steps 5 and 10 (state and JSON meta, as the search saves)."""
  mngr = ckpt_lib.manager(directory)
  ckpt_lib.save(mngr, 5, _state(), meta=dict(history=[1, 2]))
  ckpt_lib.save(mngr, 10, _state(), meta=dict(history=[1, 2, 3]))
  return directory


def _cut(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _data_files(step_dir):
  return [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']


@pytest.mark.parametrize('damage', [
    lambda step: _cut(step / 'state' / '_METADATA'),
    lambda step: [_cut(p) for p in _data_files(step)],
    lambda step: _cut(step / 'state' / 'manifest.ocdbt'),
    lambda step: _cut(step / 'meta' / 'metadata'),  # the search's JSON state
], ids=['state_METADATA', 'data_files', 'ocdbt_manifest', 'meta_json'])
def test_damaged_checkpoint_step_names_its_folder_and_the_fallback(tmp_path, damage):
  directory = _two_steps(tmp_path / 'ckpt')
  damage(directory / '10')
  mngr = ckpt_lib.manager(directory)
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    ckpt_lib.restore(mngr, _state())
    ckpt_lib.restore_meta(mngr)
  message = str(e.value)
  assert str(directory / '10') in message
  assert 'resume from step 5' in message
  shutil.rmtree(directory / '10')  # doing what it says works
  mngr = ckpt_lib.manager(directory)
  state, meta = ckpt_lib.restore(mngr, _state()), ckpt_lib.restore_meta(mngr)
  assert meta == dict(history=[1, 2])
  np.testing.assert_array_equal(state['a'], np.arange(4.0))


def test_cut_search_meta_names_its_folder(tmp_path):
  directory = _two_steps(tmp_path / 'ckpt')
  _cut(directory / '10' / 'meta' / 'metadata')
  with pytest.raises(ckpt_lib.WorkdirError, match=r'ckpt/10 is damaged.*resume from step 5'):
    ckpt_lib.restore_meta(ckpt_lib.manager(directory))


def test_empty_step_folder_is_named_and_a_lone_damaged_step_restarts(tmp_path):
  directory = _two_steps(tmp_path / 'ckpt')
  (directory / '15').mkdir()
  with pytest.raises(ckpt_lib.WorkdirError, match=r'ckpt/15 is empty.*resume from step 10'):
    ckpt_lib.restore(ckpt_lib.manager(directory), _state())
  (directory / '15').rmdir()
  mngr = ckpt_lib.manager(tmp_path / 'only')
  ckpt_lib.save(mngr, 1, _state())
  _cut(tmp_path / 'only' / '1' / 'state' / '_METADATA')
  with pytest.raises(ckpt_lib.WorkdirError, match=r'delete .*only to restart this stage'):
    ckpt_lib.restore(ckpt_lib.manager(tmp_path / 'only'), _state())


def test_foreign_state_names_both_shapes(tmp_path):
  directory = _two_steps(tmp_path / 'ckpt')
  other = dict(_state(), a=np.arange(6.0))
  with pytest.raises(ckpt_lib.WorkdirError, match=r'a: \(4,\) vs \(6,\).*fresh workdir'):
    ckpt_lib.restore(ckpt_lib.manager(directory), other)


def test_truncated_json_names_its_path(tmp_path):
  path = tmp_path / 'results.json'
  ckpt_lib.write_json(path, dict(search=dict(factors=[1.0, 2.0])))
  _cut(path)
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    ckpt_lib.read_json(path, what='results')
  assert str(path) in str(e.value) and 'delete' in str(e.value)


def test_torn_last_jsonl_line_is_dropped_with_a_warning(tmp_path):
  path = tmp_path / 'eval' / 'perplexity.jsonl'
  for length in (64, 128):
    ckpt_lib.append_jsonl(path, dict(method='none', length=length, nll=1.0))
  with open(path, 'a') as f:
    f.write('{"method": "none", "len')  # killed mid-write
  with pytest.warns(UserWarning, match='perplexity.jsonl: dropped a torn last line'):
    records = ckpt_lib.read_jsonl(path, required=('method', 'length', 'nll'))
  assert [r['length'] for r in records] == [64, 128]
  ckpt_lib.append_jsonl(path, dict(method='none', length=256, nll=1.0))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert [r['length'] for r in ckpt_lib.read_jsonl(path)] == [64, 128, 256]


def test_append_after_a_torn_line_does_not_glue_records(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n{"step": 2, "lo')
  with pytest.warns(UserWarning, match='metrics.jsonl'):
    ckpt_lib.append_jsonl(path, dict(step=2))
  assert ckpt_lib.read_jsonl(path) == [dict(step=1), dict(step=2)]


@pytest.mark.parametrize('stray', ['garbage', '42', '{"method": "none"}'])
def test_stray_jsonl_line_names_the_file_and_line(tmp_path, stray):
  path = tmp_path / 'eval' / 'passkey.jsonl'
  path.parent.mkdir()
  path.write_text('{"method": "none", "length": 64, "accuracy": 1.0}\n' + stray + '\n'
                  '{"method": "none", "length": 128, "accuracy": 0.5}\n')
  with pytest.raises(ckpt_lib.WorkdirError, match=r'passkey.jsonl line 2 .*delete that line'):
    ckpt_lib.read_jsonl(path, required=('method', 'length', 'accuracy'))


def test_malformed_tokenizer_json_names_its_path(tmp_path):
  pytest.importorskip('tokenizers')
  path = tmp_path / 'tokenizer.json'
  path.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}')
  with pytest.raises(ValueError, match=r'tokenizer.json is not a valid tokenizer.json'):
    data_lib.get_tokenizer(str(path))
  path.write_text(json.dumps({'not': 'a tokenizer'}))
  with pytest.raises(ValueError, match=str(path)):
    data_lib.get_tokenizer(str(path))
