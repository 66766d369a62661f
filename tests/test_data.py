"""Data: tokenizers, the stdlib corpus split, packing, eval windows and their errors."""

import warnings

import numpy as np
import pytest

from longrope_jax import corpus
from longrope_jax import data as data_lib


def test_byte_tokenizer_round_trip():
  tok = data_lib.ByteTokenizer()
  ids = tok.encode('def f(x):\n  return "é"')
  assert ids.dtype == np.int32 and ids.max() < 256
  assert tok.decode(ids) == 'def f(x):\n  return "é"'
  assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == 'def f(x):\n  return "é"'


def test_split_is_deterministic_and_disjoint():
  docs = corpus.stdlib_documents()
  assert len(docs) > 500
  splits = {s: {d.name for d in corpus.load_split('stdlib', s)} for s in corpus.SPLITS}
  assert not splits['train'] & splits['test'] and not splits['train'] & splits['validation']
  assert not splits['validation'] & splits['test']
  assert sum(map(len, splits.values())) == sum(1 for d in docs if d.text)
  assert len(splits['test']) > 40 and len(splits['validation']) > 40
  assert corpus.split_of('json/decoder.py') == corpus.split_of('json/decoder.py')


def test_packed_batches_are_a_function_of_seed_and_step():
  docs = [np.arange(100, dtype=np.int32), np.arange(50, dtype=np.int32) + 1000]
  b = data_lib.PackedBatches(docs, batch_size=3, length=8, seed=1)
  x = b.batch(5)
  assert x.shape == (3, 9)
  np.testing.assert_array_equal(x, data_lib.PackedBatches(docs, 3, 8, seed=1).batch(5))
  assert not np.array_equal(x, b.batch(6))
  # Every row is a contiguous slice of the packed stream.
  stream = np.concatenate(docs)
  for row in x:
    start = np.nonzero(stream == row[0])[0]
    assert any(np.array_equal(stream[s:s + 9], row) for s in start)


def test_eval_windows_are_document_prefixes_and_reproducible():
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (10, 40, 80, 200, 300)]
  w = data_lib.eval_windows(docs, 64, 3, seed=2)
  assert w.shape == (3, 64)
  prefixes = [d[:64] for d in docs if len(d) >= 64]
  for row in w:
    assert any(np.array_equal(row, p) for p in prefixes)
  np.testing.assert_array_equal(w, data_lib.eval_windows(docs, 64, 3, seed=2))


def test_errors_are_clear(tmp_path):
  docs = [np.zeros(n, np.int32) for n in (10, 40, 80)]
  with pytest.raises(ValueError, match=r'only 1 documents have at least 64 tokens.*32: 2, 64: 1'):
    data_lib.eval_windows(docs, 64, 2)
  with pytest.raises(FileNotFoundError, match='data.path'):
    corpus.load_split('files', 'train', path=str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='empty'):
    corpus.load_split('files', 'train', path=str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match='data.source'):
    corpus.load_split('hub', 'train')
  with pytest.raises(ValueError, match='fewer than one'):
    data_lib.PackedBatches([np.zeros(5, np.int32)], 2, 16)


def test_pydoc_corpus_is_the_reference_manual_cut_into_long_documents():
  """The 'pydoc' source: every topic of pydoc_data/topics.py, in name order, once, cut at
  paragraph breaks into documents of at least PYDOC_DOCUMENT_CHARS characters; document k is
  in PYDOC_SPLITS[k % 3]; no train split."""
  from pydoc_data import topics
  docs = corpus.pydoc_documents()
  text = '\n\n'.join(topics.topics[name].strip() for name in sorted(topics.topics))
  assert b''.join(d.text for d in docs) == text.encode()
  assert len(docs) == len(text) // corpus.PYDOC_DOCUMENT_CHARS >= 3
  assert all(len(d.text) >= corpus.PYDOC_DOCUMENT_CHARS for d in docs)
  assert all(d.text.endswith(b'\n\n') for d in docs[:-1])  # cut at a paragraph break
  small = corpus.pydoc_documents(document_chars=len(text) // 10)
  assert len(small) == 10 and b''.join(d.text for d in small) == text.encode()
  for split in ('validation', 'test'):
    names = [d.name for d in corpus.load_split('pydoc', split)]
    assert names == [d.name for k, d in enumerate(docs) if corpus.PYDOC_SPLITS[k % 3] == split]
  assert len(corpus.load_split('pydoc', 'test')) == 2 * len(corpus.load_split('pydoc',
                                                                                  'validation'))
  with pytest.raises(ValueError, match=r"'pydoc' corpus has no 'train' split.*test, validation"):
    corpus.load_split('pydoc', 'train')


@pytest.mark.parametrize('num', [0, -1, 2.0, None, True])
def test_eval_windows_name_num_or_the_config_field_behind_it(num):
  docs = [np.zeros(n, np.int32) for n in (80, 90)]
  with pytest.raises(ValueError, match=rf'^num must be a positive number of eval windows .*got '
                                       rf'{num!r}; set it to 1 or more'):
    data_lib.eval_windows(docs, 64, num)
  with pytest.raises(ValueError, match=r'^search.num_windows must be a positive number'):
    data_lib.eval_windows(docs, 64, num, field='search.num_windows')
  with pytest.raises(ValueError, match=r'search.num_windows = 3 eval windows were asked for; '
                                       r'lower search.num_windows or the length'):
    data_lib.eval_windows(docs, 64, 3, field='search.num_windows')


def _names_in(split: str, count: int) -> list[str]:
  """`count` file names the md5 rule puts in `split`."""
  names = (f'book{i}.txt' for i in range(10_000))
  return [n for n in names if corpus.split_of(n) == split][:count]


def test_files_source_says_how_it_splits_and_takes_split_folders(tmp_path):
  """Five long files that all hash to train: the empty validation split says why and what to
  do; train/, validation/ and test/ subfolders then decide the splits."""
  for name in _names_in('train', 5):
    (tmp_path / name).write_text('a long book\n' * 100)
  assert corpus.split_sizes('files', path=str(tmp_path)) == dict(train=5, validation=0, test=0)
  with pytest.raises(ValueError) as e:
    corpus.load_split('files', 'validation', path=str(tmp_path))
  message = str(e.value)
  assert message.startswith(f"the 'validation' split of the corpus (data.source = 'files', "
                            f"data.path = {tmp_path}) is empty: no non-empty document (train 5, "
                            "validation 0, test 0).")
  assert 'md5 hash of its path relative to data.path' in message
  assert 'Put the files in train/, validation/ and test/ subfolders of data.path' in message
  for split, names in (('train', _names_in('train', 3)), ('validation', ['v.txt']),
                       ('test', ['t1.txt', 't2.txt'])):
    (tmp_path / split).mkdir()
    for name in names:
      (tmp_path / split / name).write_text(f'{split} {name}\n')
  with pytest.raises(ValueError, match=r'book.*\.txt lies outside the train/, validation/ and '
                                       r'test/ subfolders of data.path'):
    corpus.load_split('files', 'train', path=str(tmp_path))
  for file in tmp_path.glob('*.txt'):
    file.unlink()
  assert corpus.split_sizes('files', path=str(tmp_path)) == dict(train=3, validation=1, test=2)
  docs = corpus.load_split('files', 'test', path=str(tmp_path))
  assert [(d.name, d.text) for d in docs] == [('test/t1.txt', b'test t1.txt\n'),
                                              ('test/t2.txt', b'test t2.txt\n')]


def test_text_files_corpus(tmp_path):
  for i in range(40):
    (tmp_path / f'doc{i}.txt').write_text(f'document {i}\n' * (i + 1))
  docs = sum((corpus.load_split('files', s, path=str(tmp_path)) for s in corpus.SPLITS), [])
  assert len(docs) == 40
  single = corpus.file_documents(tmp_path / 'doc3.txt')
  assert single[0].text == b'document 3\n' * 4


def test_copy_rows_repeat_a_random_unit_and_mix_with_passkey_rows():
  tok = data_lib.ByteTokenizer()
  row = data_lib.copy_sample(np.random.default_rng(0), 100, tok)
  assert row.shape == (100,) and row[0] == tok.bos_id
  text = tok.decode(row[1:])
  period = next(p for p in range(4, 17) if text[p:] == text[:-p])
  assert len(set(text[:period])) > 1 and text[:period].isalnum()
  docs = [np.arange(3000, dtype=np.int32) % 200]
  b = data_lib.PackedBatches(docs, batch_size=64, length=256, seed=0, passkey_fraction=0.25,
                             copy_fraction=0.25, tokenizer=tok)
  rows = b.batch(3)
  is_copy = np.array([r[0] == tok.bos_id and tok.decode(r[1:20]).isalnum() for r in rows])
  is_passkey = np.array([r[0] == tok.bos_id and not c for r, c in zip(rows, is_copy)])
  assert 4 <= is_copy.sum() <= 28 and 4 <= is_passkey.sum() <= 28
  np.testing.assert_array_equal(rows, b.batch(3))
  # Without copy rows the batches are those of a run configured before they existed.
  plain = data_lib.PackedBatches(docs, 64, 256, seed=0, passkey_fraction=0.25, tokenizer=tok)
  np.testing.assert_array_equal(plain.batch(3)[~is_copy & ~is_passkey],
                                rows[~is_copy & ~is_passkey])
  with pytest.raises(ValueError, match='copy_fraction'):
    data_lib.PackedBatches(docs, 4, 256, passkey_fraction=0.5, copy_fraction=0.6, tokenizer=tok)


def test_binary_corpus_warns_with_the_share_and_path(tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / 'blobs'
  folder.mkdir()
  for i in range(40):
    (folder / f'blob{i}.bin').write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.warns(UserWarning, match=rf'corpus {folder}: \d+% of its 163,840 bytes are NUL or '
                                       r'not UTF-8, in 40 of 40 documents') as record:
    corpus.load_split('files', 'train', path=str(folder))
  share = int(str(record[0].message).split(': ')[1].split('%')[0])
  assert 40 <= share <= 100
  assert corpus.binary_share('héllo wörld\n'.encode()) == 0.0
  assert corpus.binary_share(b'\0\0ab') == 0.5


def test_text_corpus_does_not_warn(tmp_path):
  for i in range(30):
    (tmp_path / f'doc{i}.txt').write_text(f'document {i}: naïve café, ünïcode text.\n' * 20)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    docs = corpus.load_split('files', 'train', path=str(tmp_path))
  assert docs and not caught
