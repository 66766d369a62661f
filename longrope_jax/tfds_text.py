"""A TFDS builder for a local folder of text files (e.g. a local copy of PG19), as array_record.

The splits follow `corpus.split_of` on each file's path relative to the folder, so a prepared
dataset holds the same train / validation / test documents as `data.source='files'` on that
folder. Preparing and reading need no TensorFlow:

  name = prepare_local_text('~/pg19', '~/tensorflow_datasets', name='pg19')  # 'local_text/pg19'
  corpus.load_split('tfds', 'test', tfds_name=name, data_dir='~/tensorflow_datasets')
"""

from __future__ import annotations

import dataclasses
import pathlib

try:
  import tensorflow_datasets as tfds
except ImportError as e:
  raise ImportError("the local text TFDS builder needs the `tfds` extra: "
                    "pip install -e .[tfds]") from e

from longrope_jax import corpus


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """`name` names the prepared corpus; `source` is a text file or a folder of text files."""

  source: str = ''
  pattern: str = '*'


class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents {'name': path in the folder, 'text': file contents} of a local text corpus.

  Not registered: a prepared corpus is read back from its folder's metadata, so reading needs
  neither this module nor the source folder, and a config name such as 'pg19' cannot collide
  with the TFDS catalog's own datasets.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Whole files as documents, split by corpus.split_of.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Text files of a local folder, one document per file.',
        features=tfds.features.FeaturesDict({'name': tfds.features.Text(),
                                             'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = corpus.corpus_files(self.builder_config.source, self.builder_config.pattern)
    by_split = {s: [(n, p) for n, p in files if corpus.split_of(n) == s] for s in corpus.SPLITS}
    # TFDS cannot write a split without examples; such a split is left out.
    return {s: self._generate_examples(f) for s, f in by_split.items() if f}

  def _generate_examples(self, files):
    for name, path in files:
      yield name, {'name': name, 'text': path.read_bytes()}


def prepare_local_text(source_dir: str | pathlib.Path, data_dir: str | pathlib.Path,
                       name: str = 'default', pattern: str = '*', overwrite: bool = False) -> str:
  """Prepares the text files under `source_dir` into `data_dir` as array_record.

  Returns the dataset name to set as data.tfds_name ('local_text/<name>'). An already prepared
  corpus of that name is reused unless `overwrite`.
  """
  source = pathlib.Path(source_dir).expanduser()
  if not source.exists():
    raise FileNotFoundError(f"text corpus {source} does not exist; point source_dir at a text "
                            "file or a folder of text files.")
  if not name or '/' in name or ':' in name:
    raise ValueError(f"name must be a non-empty corpus name without '/' or ':', got {name!r}.")
  config = LocalTextConfig(name=name, source=str(source), pattern=pattern,
                           description=f'Text files of {source} matching {pattern!r}.')
  builder = LocalText(config=config, data_dir=str(pathlib.Path(data_dir).expanduser()),
                      file_format='array_record')
  mode = (tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS if not overwrite else
          tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return f'{builder.name}/{name}'
