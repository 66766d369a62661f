"""What several stages share: perplexity tables cached per cell, the searched factors as an
extra method (one search, or one per length), and fine-tuning a copy of the base model at the
search length."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import numpy as np

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import metrics as metrics_lib
from longrope_jax import packing
from longrope_jax import report as report_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib
from longrope_jax.stages.run import PER_LENGTH_KEY, Run, search_for_length


def fitness_windows(run: Run, length: int, num: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
  """The search's fitness data at `length` by search.objective: windows i32[N, length] of
  search.split documents (search.num_windows unless `num`) and answer weights f32[N, length - 1]
  for the needle objective, else None (`data.fitness_windows`)."""
  c = run.config.search
  return data_lib.fitness_windows(c.objective, run.documents(c.split), run.tokenizer, length,
                                  c.num_windows if num is None else num, seed=run.config.seed,
                                  needle_format=c.needle_format, field='search.num_windows')


def objective_record(run: Run) -> dict:
  """What a search's fitness scored, for its results.json record (nothing for the default
  perplexity objective, whose record says so already)."""
  c = run.config.search
  if c.objective == 'perplexity':
    return {}
  return dict(objective=c.objective, needle_format=c.needle_format,
              fitness='validation mean NLL of the needle answers (nats / answer token)')


def searched_sources(run: Run) -> dict:
  """The searched factors as an extra row once the search has a result, else {}: {'longrope':
  the one search's factors beyond L0}, or with several searched lengths {PER_LENGTH: each
  length's own factors (`Run.per_length_source`)}."""
  results = run.results()
  if 'search' not in results:
    return {}
  if PER_LENGTH_KEY in results:
    return {report_lib.PER_LENGTH: run.per_length_source()}
  return {'longrope': run.longrope_source()}


def searched_cell(run: Run) -> Callable[[str, int], Any]:
  """(method, length) -> what that cell's rope was built from (JSON), or None: the per-length
  row's cells depend on the search serving their length, so a cell is recomputed exactly when
  that search changed (`perplexity`'s cell_depends)."""
  searches, L0 = run.per_length(), run.original_length

  def depends(method: str, length: int) -> Any:
    if method != report_lib.PER_LENGTH or not searches or length <= L0:
      return None
    found = searches[search_for_length(searches, length)]
    return dict(target_length=found.target_length, factors=found.to_json()['factors'],
                n_hat=found.n_hat, attn_scale=found.attn_scale)
  return depends


def perplexity(run: Run, key: str, params: Any, methods, extra: dict, *,
               multiples=None, stride: int | None = None, depends: Any = None,
               cell_depends: Callable[[str, int], Any] | None = None,
               save: bool = True) -> dict:
  """Perplexity vs length of `methods` and `extra` sources at `multiples` (default
  evaluate.multiples) on one set of documents as long as the longest of these and
  evaluate.multiples (so tables of one run pair document by document), truncated, or sliding by
  `stride` (default evaluate.stride). Cached per cell in eval/<key>.jsonl (cells of another
  protocol or other `depends` (JSON: what the sources were built from), or whose own
  `cell_depends(method, length)` (JSON or None) changed, or without per-document values, are
  dropped and recomputed); saved as results.json[key] if `save`."""
  c = run.config.evaluate
  multiples = tuple(c.multiples if multiples is None else multiples)
  lengths = run.lengths(multiples)
  protocol = dict(split=c.split, num_windows=c.num_windows, seed=run.config.seed,
                  document_length=max(run.lengths(tuple(c.multiples) + multiples)),
                  stride=c.stride if stride is None else stride)
  if depends is not None:
    protocol['depends'] = json.loads(json.dumps(depends))
  cell = _cell_json(cell_depends)
  cache_path = run.workdir / 'eval' / f'{key}.jsonl'
  current = lambda r: (r.get('protocol') == protocol and 'nll_per_document' in r  # noqa: E731
                       and same_cell(r, cell))
  ckpt_lib.truncate_jsonl(cache_path, current)
  done = {(r['method'], r['length']): r['nll_per_document']
          for r in ckpt_lib.read_jsonl(cache_path)}

  def on_result(method, length, docs_nll):
    nll = None if docs_nll is None else float(np.mean(docs_nll))
    record = dict(method=method, length=length, nll=nll, nll_per_document=docs_nll,
                  protocol=protocol)
    if cell(method, length) is not None:
      record['depends'] = cell(method, length)
    ckpt_lib.append_jsonl(cache_path, record)

  with run.sequence_mesh():
    results = eval_lib.perplexity_vs_length(
        run.model_config, params, run.documents(c.split), lengths, methods=methods, extra=extra,
        num_windows=c.num_windows, seed=run.config.seed, batch_tokens=c.batch_tokens,
        document_length=protocol['document_length'], stride=protocol['stride'], done=done,
        on_result=on_result)
  results['split'] = c.split
  if save:
    run.save_result(key, results)
    metrics_lib.write_per_length(run.workdir, key, results)
  return results


def same_cell(record: dict, cell: Callable[[str, int], Any]) -> bool:
  """Whether a cached cell still holds: it was built from what `cell` says its (method,
  length) is built from now; a cell `cell` says nothing of (None: another method, or per-length
  factors not in use now) is kept as it is."""
  now = cell(record.get('method'), record.get('length'))
  return now is None or record.get('depends') == now


def _cell_json(cell_depends: Callable[[str, int], Any] | None) -> Callable[[str, int], Any]:
  """cell_depends as JSON (as a cached record holds it; None without one)."""
  if cell_depends is None:
    return lambda method, length: None
  return lambda method, length: json.loads(json.dumps(cell_depends(method, length)))


def finetune(run: Run, rope: rope_lib.RopeScaling | rope_lib.LongRopeFactors,
             workdir: pathlib.Path, *, tuning: Any = None,
             batches: data_lib.PackedBatches | packing.MixedBatches | None = None) -> Any:
  """Fine-tunes a copy of the base model at the search length with `rope` and the budget of
  `tuning` (default progressive.finetune) on `batches` (default: the packed training stream
  with tuning's passkey and copy fractions, the same batches for every method); resumes from
  workdir/ckpt and returns the fine-tuned params."""
  c = run.config.progressive.finetune if tuning is None else tuning
  L1 = run.extension(run.config.search.multiple).target_length
  if batches is None:
    batches = data_lib.PackedBatches(run.documents('train'), c.batch_size, L1,
                                     seed=run.config.seed + 1,
                                     passkey_fraction=c.passkey_fraction,
                                     copy_fraction=c.copy_fraction, tokenizer=run.tokenizer)
  train_lib.train(run.training_config(run.model_config.attention),
                  train_lib.OptimConfig.from_config(c), batches, rope,
                  workdir, seed=run.config.seed, init_params=run.params(),
                  ckpt_every=c.ckpt_every, log_every=10, desc=f'finetune_{workdir.name}@{L1}',
                  tb_workdir=run.workdir, mesh=run.train_mesh)
  return train_lib.load_params(run.model_config, workdir)
