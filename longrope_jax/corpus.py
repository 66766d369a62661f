"""Corpora: documents of the standard library's source (the embedded default), the reference
manual's prose (pydoc), text files and TFDS datasets, each split into train / validation / test.

The embedded default corpus is the running interpreter's standard-library source: real code with
long-range structure, present in every Python install, nothing to download. Documents are kept
whole and split by a hash of their path, so the split does not depend on the order files are
listed in; `load_split` names an empty split with how that source splits and what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sysconfig
import warnings

SPLITS = ('train', 'validation', 'test')
SOURCES = ('stdlib', 'pydoc', 'files', 'tfds')  # data.source


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  text: bytes


def split_of(name: str, validation: float = 0.05, test: float = 0.05) -> str:
  """Deterministic split of a document by the md5 of its name."""
  u = int.from_bytes(hashlib.md5(name.encode()).digest()[:8], 'little') / 2.0**64
  if u < test:
    return 'test'
  if u < test + validation:
    return 'validation'
  return 'train'


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_files() -> list[pathlib.Path]:
  """Every `.py` file of the running interpreter's standard library (site-packages excluded)."""
  return sorted(p for p in stdlib_root().rglob('*.py')
                if 'site-packages' not in p.parts and 'dist-packages' not in p.parts)


def stdlib_documents() -> list[Document]:
  """Every `.py` file of the running interpreter's standard library, one document each."""
  root = stdlib_root()
  return [Document(str(p.relative_to(root)), p.read_bytes()) for p in stdlib_files()]


# The 'pydoc' corpus: the Python reference manual's topics as `help()` shows them
# (pydoc_data/topics.py, in every install), in topic-name order, as one text cut at paragraph
# breaks into total // PYDOC_DOCUMENT_CHARS documents of about equal size. With SmolLM2's
# tokenizer (4.1 characters per token) Python 3.11's 79 topics (465K characters, 113K tokens)
# make 6 documents of about 77K characters and 19K tokens: each holds a 16K-token window.
# Document k goes to PYDOC_SPLITS[k % 3]; there is no train split (the corpus is for evaluating
# pretrained models).
PYDOC_DOCUMENT_CHARS = 72_000
PYDOC_SPLITS = ('validation', 'test', 'test')


def pydoc_documents(document_chars: int = PYDOC_DOCUMENT_CHARS) -> list[Document]:
  """The 'pydoc' corpus's documents, every split (`pydoc_split` says which is which): English
  prose of the reference manual, with its code examples."""
  from pydoc_data import topics
  text = '\n\n'.join(topics.topics[name].strip() for name in sorted(topics.topics))
  count = max(1, len(text) // document_chars)
  cuts = [0]
  for k in range(1, count):
    cut = text.find('\n\n', max(k * len(text) // count, cuts[-1] + 1))
    cuts.append(len(text) if cut < 0 else cut + 2)
  cuts.append(len(text))
  return [Document(f'pydoc/{k:02d}', text[a:b].encode())
          for k, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


def pydoc_split(index: int) -> str:
  """The split of the 'pydoc' corpus's document `index`."""
  return PYDOC_SPLITS[index % len(PYDOC_SPLITS)]


def corpus_files(path: str | pathlib.Path, pattern: str = '*') -> list[tuple[str, pathlib.Path]]:
  """(document name, file) of a text file or of every file matching `pattern` in a folder."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"corpus path {path} does not exist (data.path); point it at a text "
                            "file or a folder of text files.")
  if path.is_file():
    return [(path.name, path)]
  return [(str(p.relative_to(path)), p) for p in sorted(path.rglob(pattern)) if p.is_file()]


def file_documents(path: str | pathlib.Path, pattern: str = '*') -> list[Document]:
  """Documents from a text file (one document) or every file matching `pattern` in a folder."""
  return [Document(name, p.read_bytes()) for name, p in corpus_files(path, pattern)]


# How the 'files' source splits its documents (data.path's rule, its errors, the README).
FILES_SPLIT_RULE = (
    "each file is one document; in a folder with train/, validation/ and test/ subfolders each "
    "file belongs to its subfolder's split, otherwise to the split the md5 hash of its path "
    "relative to data.path falls in (about 90% train, 5% validation, 5% test: corpus.split_of)")


def by_split_folders(path: str | pathlib.Path) -> bool:
  """Whether a 'files' corpus is laid out by split: a folder with train/, validation/ and test/
  subfolders."""
  path = pathlib.Path(path).expanduser()
  return path.is_dir() and all((path / split).is_dir() for split in SPLITS)


def file_splits(path: str | pathlib.Path) -> dict[str, str]:
  """The split of each file of a 'files' corpus, by name alone (FILES_SPLIT_RULE): {document
  name: split}. Nothing is read."""
  files = corpus_files(path)
  if not by_split_folders(path):
    return {name: split_of(name) for name, _ in files}
  splits = {}
  for name, file in files:
    top = pathlib.PurePath(name).parts[0]
    if top not in SPLITS:
      raise ValueError(f"{file} lies outside the train/, validation/ and test/ subfolders of "
                       f"data.path = {path}, where each subfolder is its split; move it into "
                       "one of them.")
    splits[name] = top
  return splits


def split_sizes(source: str, *, path: str | None = None) -> dict[str, int] | None:
  """How many non-empty documents each split holds, from file names and sizes alone, for the
  sources that split by name ('stdlib', 'files'); None for another source (its splits are known
  once loaded)."""
  if source == 'stdlib':
    return dict(_stdlib_split_sizes())
  if source == 'files' and path:
    sizes = {name: file.stat().st_size for name, file in corpus_files(path)}
    splits = [split for name, split in file_splits(path).items() if sizes[name]]
  else:
    return None
  return {split: splits.count(split) for split in SPLITS}


@functools.cache
def _stdlib_split_sizes() -> dict[str, int]:
  root = stdlib_root()
  splits = [split_of(str(p.relative_to(root))) for p in stdlib_files() if p.stat().st_size]
  return {split: splits.count(split) for split in SPLITS}


def empty_split_message(source: str, split: str, *, path: str | None = None,
                        sizes: dict[str, int] | None = None) -> str:
  """Why a split is empty and what to do, naming the corpus (data.source, data.path)."""
  where = f"data.source = {source!r}" + (f", data.path = {path}" if path else '')
  message = f"the {split!r} split of the corpus ({where}) is empty: no non-empty document"
  if source == 'files':
    counts = '' if sizes is None else ' (' + ', '.join(f'{k} {v}' for k, v in sizes.items()) + ')'
    message += (f"{counts}. In the 'files' source {FILES_SPLIT_RULE}. Put the files in train/, "
                "validation/ and test/ subfolders of data.path, or add files")
  return message + '.'


BINARY_SHARE = 0.05  # above this share of NUL or non-UTF-8 bytes a corpus is not text
_warned: set[str] = set()


def binary_share(text: bytes) -> float:
  """The share of `text`'s bytes that are NUL or not valid UTF-8 (about 0 for text, about 0.5
  and more for random or compressed data)."""
  if not text:
    return 0.0
  invalid = text.decode('utf-8', errors='replace').count('\ufffd') - text.count('\ufffd'.encode())
  return (text.count(b'\0') + invalid) / len(text)


def check_text(docs: list[Document], where: str, threshold: float = BINARY_SHARE) -> float:
  """Warns (once per `where`) when more than `threshold` of the corpus bytes are NUL or not UTF-8:
  the byte tokenizer would train on binary data without a word. Returns the share."""
  total = sum(len(d.text) for d in docs)
  if not total:
    return 0.0
  shares = [binary_share(d.text) for d in docs]
  share = sum(s * len(d.text) for s, d in zip(shares, docs)) / total
  if share > threshold and where not in _warned:
    _warned.add(where)
    binary = [d.name for s, d in zip(shares, docs) if s > threshold]
    warnings.warn(
        f"corpus {where}: {share:.0%} of its {total:,} bytes are NUL or not UTF-8, in "
        f"{len(binary)} of {len(docs)} documents (e.g. {', '.join(binary[:3])}); it looks like "
        "binary data, not text: point data.path at text files.", stacklevel=2)
  return share


def tfds_documents(name: str, split: str, data_dir: str | None = None,
                   text_key: str = 'text') -> list[Document]:
  """Documents of a TFDS dataset prepared as array_record, read with `tfds.data_source`
  (no TensorFlow needed; extra `tfds`)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS corpora need the `tfds` extra: pip install -e .[tfds]") from e
  if data_dir is not None and not pathlib.Path(data_dir).expanduser().is_dir():
    raise FileNotFoundError(f"TFDS data_dir {data_dir} does not exist (data.data_dir); point it "
                            "at the folder the dataset was prepared into.")
  data_dir = None if data_dir is None else str(pathlib.Path(data_dir).expanduser())
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir {data_dir or '~/tensorflow_datasets'} "
        "(data.tfds_name, data.data_dir); prepare a folder of text files with "
        "longrope_jax.tfds_text.prepare_local_text and pass the name it returns.") from e
  docs, named = [], False
  for i in range(len(source)):
    example = source[i]
    if text_key not in example:
      raise ValueError(f"TFDS dataset {name!r} has no feature {text_key!r} "
                       f"(features: {sorted(example)}); set data.text_key.")
    text, named = example[text_key], 'name' in example
    doc_name = example['name'] if named else f'{name}/{split}/{i}'
    docs.append(Document(doc_name.decode() if isinstance(doc_name, bytes) else str(doc_name),
                         text if isinstance(text, bytes) else str(text).encode()))
  if named:  # a corpus with a 'name' feature comes back in name order, as the 'files' source does
    docs.sort(key=lambda d: d.name)
  return docs


def load_split(source: str, split: str, *, path: str | None = None, tfds_name: str | None = None,
               data_dir: str | None = None, text_key: str = 'text') -> list[Document]:
  """Documents of one split of a corpus: source 'stdlib' (the standard library's code),
  'pydoc' (its reference manual's prose), 'files' or 'tfds'."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  if source == 'stdlib':
    docs = [d for d in stdlib_documents() if split_of(d.name) == split]
  elif source == 'pydoc':
    docs = [d for k, d in enumerate(pydoc_documents()) if pydoc_split(k) == split]
    if not docs:
      raise ValueError(f"the 'pydoc' corpus has no {split!r} split: its documents are "
                       f"{', '.join(sorted(set(PYDOC_SPLITS)))} (it is for evaluating pretrained "
                       "models); choose one of those splits or another data.source.")
  elif source == 'files':
    if not path:
      raise ValueError("data.source='files' needs data.path (a text file or a folder).")
    splits = file_splits(path)
    docs = file_documents(path)
    check_text(docs, str(path))
    docs = [d for d in docs if splits[d.name] == split]
  elif source == 'tfds':
    if not tfds_name:
      raise ValueError("data.source='tfds' needs data.tfds_name (a prepared dataset name).")
    docs = tfds_documents(tfds_name, split, data_dir, text_key)
    check_text(docs, f'{tfds_name}/{split}')
  else:
    raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}.")
  docs = [d for d in docs if d.text]
  if not docs:
    raise ValueError(empty_split_message(source, split, path=path,
                                         sizes=split_sizes(source, path=path)))
  return docs
