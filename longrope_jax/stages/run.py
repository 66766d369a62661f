"""`Run`: a config and a workdir, with the data and the model built once and shared by the
stages, and what the run's results say (the searched factors at every length).

Workdir layout: config.json, metrics.jsonl, ckpt/, eval/, search/, results.json, report.md,
plots/*.png (each stage declares what it owns: `stages.stage.Stage`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import pathlib
from typing import Any, Callable, Iterable

import jax
import ml_collections

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import corpus
from longrope_jax import data as data_lib
from longrope_jax.hf import gguf as gguf_import
from longrope_jax import hf
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib
from longrope_jax import train as train_lib


PER_LENGTH_KEY = 'search_per_length'  # results.json: {target length: search record}


def search_multiples(search: Any) -> tuple[float, ...]:
  """A search section's searched multiples, ascending: `multiples`, or `(multiple,)` unset."""
  multiples = search.get('multiples')
  return tuple(sorted(multiples)) if multiples else (search['multiple'],)


def search_for_length(targets: Iterable[int], length: int) -> int:
  """The searched target length whose factors serve evaluation `length`: the shortest at or
  above it (its factors interpolate at least as far as needed), else the longest (as one
  search's factors serve every length beyond its own)."""
  targets = sorted(targets)
  return next((t for t in targets if t >= length), targets[-1])


class Run:
  """A config and a workdir, with the data and model built once and shared by the stages.

  Lengths come from here only: `extension(multiple)` is L0 -> multiple x L0 (`rope.Extension`),
  `lengths(multiples)` the evaluation lengths.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    self.config = config
    self.workdir = ckpt_lib.abspath(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.results_path = self.workdir / 'results.json'

  # -------------------------------------------------------------------------- shared pieces
  @functools.cached_property
  def tokenizer(self) -> data_lib.Tokenizer:
    spec = self.config.data.tokenizer
    if spec == 'auto':
      if not self.hf_path:
        raise ValueError("data.tokenizer='auto' takes the tokenizer.json of model.path; set "
                         "model.path or data.tokenizer (bytes or a tokenizer.json path).")
      spec = str(pathlib.Path(self.hf_path) / 'tokenizer.json')
    return data_lib.get_tokenizer(spec)

  @functools.cached_property
  def hf_path(self) -> str | None:
    """The Hugging Face checkpoint folder (config.model.path; a GGUF spec such as 'gguf:smollm2'
    is converted once into a cached folder, gguf_import.resolve_model_path), or None for a
    workdir model."""
    return gguf_import.resolve_model_path(self.config.model.path)

  @property
  def passkey_batch_tokens(self) -> int:
    """Tokens per batch of the passkey stages' forwards: the evaluation's memory bound
    (evaluate.batch_tokens), so the skip check and the sweep hold what a perplexity batch does."""
    section = self.config.get('evaluate')
    return int(section.batch_tokens) if section is not None else 16384

  @functools.cached_property
  def hf_checkpoint(self) -> hf.Checkpoint:
    return hf.load(self.hf_path, param_dtype=self.config.model.param_dtype,
                   dtype=self.config.model.dtype,
                   sliding_window=hf.parse_sliding_window(self.config.model.sliding_window))

  @functools.cached_property
  def model_config(self) -> model_lib.ModelConfig:
    c = self.config.model
    base = self.hf_checkpoint.config if self.hf_path else model_lib.get_config(c.variant)
    overrides = dict(attention=c.attention, dtype=c.dtype, remat=c.remat)
    window = hf.parse_sliding_window(c.sliding_window)
    if not self.hf_path and window != hf.KEEP:
      overrides['sliding_window'] = window
    if c.original_length is not None:  # the pretraining window, where config.json's differs
      overrides['original_length'] = c.original_length
    if base.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"model.variant {c.variant!r} has vocab_size {base.vocab_size} but the "
                       f"tokenizer has {self.tokenizer.vocab_size} ids; choose a matching variant.")
    return base.replace(**overrides)

  @functools.lru_cache(maxsize=None)
  def documents(self, split: str) -> list:
    d = self.config.data
    docs = corpus.load_split(d.source, split, path=d.path, tfds_name=d.tfds_name,
                               data_dir=d.data_dir, text_key=d.text_key)
    return data_lib.encode_documents(docs, self.tokenizer)

  @property
  def original_length(self) -> int:
    return self.model_config.original_length

  def _mesh_config(self) -> mesh_lib.MeshConfig:
    return mesh_lib.MeshConfig(**{k: int(v) for k, v in self.config.mesh.items()})

  @functools.cached_property
  def train_mesh(self) -> jax.sharding.Mesh | None:
    """The (data, fsdp, seq) mesh of pretraining and fine-tuning; None on a single device."""
    m = self._mesh_config().replace(pop=1)
    return mesh_lib.make_mesh(m) if math.prod(m.shape(len(jax.devices())).values()) > 1 else None

  @functools.cached_property
  def search_mesh(self) -> jax.sharding.Mesh:
    """The search's mesh: candidates over 'pop' (the rest of the devices by default), one
    sequence over 'seq' with ring attention."""
    m = self._mesh_config()
    return mesh_lib.make_mesh(mesh_lib.MeshConfig(pop=m.pop, seq=m.seq))

  def sequence_mesh(self):
    """A context setting the 'seq' mesh for ring attention in evaluation (a no-op without)."""
    seq = self._mesh_config().seq
    if self.model_config.attention != 'ring' or seq == 1:
      return contextlib.nullcontext()
    return jax.set_mesh(mesh_lib.make_mesh(mesh_lib.MeshConfig(seq=seq, pop=1)))

  def training_config(self, attention: str) -> model_lib.ModelConfig:
    """The model as trained: ring attention when the training mesh splits sequences over 'seq',
    else `attention` (the model's own)."""
    ring = self.train_mesh is not None and self.train_mesh.shape[mesh_lib.SEQ_AXIS] > 1
    return self.model_config.replace(attention='ring' if ring else attention)

  def extension(self, multiple: float, **kwargs) -> rope_lib.Extension:
    """L0 -> multiple x L0."""
    return rope_lib.Extension.by_multiple(self.original_length, multiple, **kwargs)

  def lengths(self, multiples) -> list[int]:
    return [self.extension(m).target_length for m in multiples]

  def params(self) -> Any:
    """The workdir's latest checkpoint; else, with config.model.path, the HF checkpoint."""
    if self.hf_path and not (self.workdir / 'ckpt').exists():
      return self.hf_checkpoint.params
    return train_lib.load_params(self.model_config, self.workdir)

  def results(self) -> dict:
    if not self.results_path.exists():
      return {}
    return ckpt_lib.read_json(self.results_path, what='results',
                              fix=f'delete {self.results_path}: each stage rewrites its entry '
                              'from its caches')

  def save_result(self, key: str, value: Any) -> None:
    results = self.results()
    results[key] = value
    ckpt_lib.write_json(self.results_path, results)

  def drop_result(self, key: str) -> None:
    """Removes results.json[key] (a result the config no longer describes), if present."""
    results = self.results()
    if key in results:
      del results[key]
      ckpt_lib.write_json(self.results_path, results)

  def searched(self, key: str = 'search') -> search_lib.SearchResult:
    """A finished search's result (results.json[key])."""
    return search_lib.SearchResult.from_json(self.results()[key])

  def write_config(self) -> None:
    ckpt_lib.write_json(self.workdir / 'config.json', json.loads(self.config.to_json_best_effort()))

  def search_multiples(self) -> tuple[float, ...]:
    """The multiples LongRoPE is searched at, ascending: search.multiples, or
    (search.multiple,) when it is unset."""
    return search_multiples(self.config.search)

  # -------------------------------------------------------------------------- what ran
  def longrope_source(self) -> Callable[[int], rope_lib.RopeScaling | None]:
    """The searched factors at every length beyond L0 (None at L <= L0, where no scaling is
    needed)."""
    rope = self.searched().rope()
    return lambda length: rope if length > self.original_length else None

  def per_length(self) -> dict[int, search_lib.SearchResult]:
    """Each searched length's result by target length (results.json 'search_per_length',
    written when search.multiples holds several); {} for a single search."""
    records = self.results().get(PER_LENGTH_KEY, {})
    return {int(L): search_lib.SearchResult.from_json(r) for L, r in sorted(
        records.items(), key=lambda item: int(item[0]))}

  def per_length_source(self) -> Callable[[int], rope_lib.RopeScaling | None]:
    """The per-length searches as one row: at each length beyond L0 the factors of the search
    `search_for_length` picks (None at L <= L0, where no scaling is needed)."""
    searches = self.per_length()
    L0 = self.original_length
    return lambda length: (searches[search_for_length(searches, length)].rope()
                           if length > L0 else None)

  def progressive_factors(self) -> tuple[rope_lib.LongRopeFactors, dict]:
    """The progressive stage's factors (short up to L0, long beyond) and what they were built
    from (JSON, for the cells' `depends`)."""
    record = self.results()['progressive']
    factors = rope_lib.LongRopeFactors(
        search_lib.SearchResult.from_json(record['short']).rope(),
        search_lib.SearchResult.from_json(record['long']).rope(), self.original_length)
    return factors, dict(long=record['long']['factors'], short=record['short']['factors'])

  def passkey_model(self) -> model_lib.ModelConfig:
    """The model as passkey prompts run it: ring attention becomes blockwise (prompts of any
    length, one per device; decoding is dense)."""
    mc = self.model_config
    return mc.replace(attention='blockwise') if mc.attention == 'ring' else mc

  def attention(self) -> dict:
    """The attention implementation requested and the one that runs here
    (`model.attention_that_runs`) for the model, the search and, when the run holds the
    progressive stage, its search (search settings' attention None: the model's)."""
    c = self.config
    model = c.model.attention
    runs = lambda impl, length: model_lib.attention_that_runs(  # noqa: E731
        impl, dtype=c.model.dtype, length=length)
    used = {'model': runs(model, self.original_length)}
    if 'search' in c:
      used['search'] = runs(c.search.settings.attention or model,
                            self.extension(c.search.multiple).target_length)
    if 'progressive' in c and 'progressive' in c.stages:
      used['progressive_search'] = runs(c.progressive.search.attention or model,
                                        self.extension(c.progressive.multiple).target_length)
    return used
