"""The local text TFDS builder: prepared as array_record, read back without TensorFlow."""

import pytest

pytest.importorskip('tensorflow_datasets')
pytest.importorskip('array_record')

from longrope_jax import corpus as corpus_lib  # noqa: E402
from longrope_jax import tfds_text  # noqa: E402


def _names():
  """30 file names, some in sub-folders, with at least 3 in each of validation and test."""
  wanted = {'train': 24, 'validation': 3, 'test': 3}
  names = []
  for i in range(10_000):
    name = f'part{i % 3}/book_{i:04d}.txt' if i % 2 else f'book_{i:04d}.txt'
    split = corpus_lib.split_of(name)
    if wanted[split]:
      wanted[split] -= 1
      names.append(name)
    if not any(wanted.values()):
      return names
  raise AssertionError('not enough names per split')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  source = tmp_path_factory.mktemp('books')
  for i, name in enumerate(_names()):
    path = source / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = '' if i == 0 else f'Chapter {i}. Ça va, {name}?\n' * (i + 1)
    path.write_text(text, encoding='utf-8')
  data_dir = tmp_path_factory.mktemp('tfds')
  name = tfds_text.prepare_local_text(source, data_dir, name='books')
  return source, data_dir, name


def test_every_split_reads_back_as_the_files_source(corpus):
  source, data_dir, name = corpus
  assert name == 'local_text/books'
  seen = 0
  for split in corpus_lib.SPLITS:
    from_tfds = corpus_lib.load_split('tfds', split, tfds_name=name, data_dir=str(data_dir))
    from_files = corpus_lib.load_split('files', split, path=str(source))
    assert from_tfds == from_files, split
    seen += len(from_tfds)
  assert seen == 29  # the empty file is dropped by both


def test_prepare_reuses_an_existing_corpus(corpus):
  source, data_dir, name = corpus
  assert tfds_text.prepare_local_text(source, data_dir, name='books') == name


def test_unknown_dataset_and_missing_data_dir_are_clear_errors(corpus, tmp_path):
  _, data_dir, name = corpus
  with pytest.raises(FileNotFoundError, match='not prepared.*prepare_local_text'):
    corpus_lib.load_split('tfds', 'test', tfds_name='local_text/nope', data_dir=str(data_dir))
  with pytest.raises(FileNotFoundError, match='not prepared'):
    corpus_lib.load_split('tfds', 'test', tfds_name='no_such_dataset', data_dir=str(data_dir))
  with pytest.raises(FileNotFoundError, match=r'data_dir .* does not exist \(data.data_dir\)'):
    corpus_lib.load_split('tfds', 'test', tfds_name=name, data_dir=str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='needs data.tfds_name'):
    corpus_lib.load_split('tfds', 'test', data_dir=str(data_dir))


def test_prepare_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tfds_text.prepare_local_text(tmp_path / 'missing', tmp_path / 'tfds')
  with pytest.raises(ValueError, match='without'):
    tfds_text.prepare_local_text(tmp_path, tmp_path / 'tfds', name='a/b')
