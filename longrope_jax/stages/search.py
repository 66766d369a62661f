"""The search stage: LongRoPE's evolutionary search for the factors at search.multiple x L0."""

from __future__ import annotations

from longrope_jax import data as data_lib
from longrope_jax import metrics as metrics_lib
from longrope_jax import search as search_lib
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import MODEL_FIELDS, SEARCH_PERF, Stage


def search(run: Run) -> dict:
  """Searches LongRoPE factors at search.multiple x L0 on `search.split` documents (resumable:
  workdir/search/ckpt holds the state of every generation)."""
  c = run.config.search
  extension = run.extension(c.multiple)
  windows = data_lib.eval_windows(run.documents(c.split), extension.target_length,
                                  c.num_windows, seed=run.config.seed)
  with metrics_lib.MetricWriter(run.workdir, 'search') as writer:
    result = search_lib.search(
        run.model_config, run.params(), windows, extension=extension, mesh=run.search_mesh,
        settings=search_lib.SearchConfig.from_config(c.settings), workdir=run.workdir / 'search',
        seed=run.config.seed,
        on_generation=lambda record: metrics_lib.write_search_generation(writer, record))
  summary = dict(result.to_json(), split=c.split, num_windows=c.num_windows)
  run.save_result('search', summary)
  return summary


def _header(run: Run) -> dict:
  c, s = run.config.search, run.config.search.settings
  return {'target': f'{run.extension(c.multiple).target_length} tokens '
                    f'({c.multiple:g}x L0 = {run.original_length})',
          'strategy': f'{s.strategy}, population {s.population}, {s.generations} generations',
          'fitness': f'mean NLL on {c.num_windows} {c.split} documents'}


SEARCH = Stage(
    'search', search, reads=('seed', *MODEL_FIELDS, 'data', 'search'),
    ignore=tuple(f'search.settings.{k}' for k in SEARCH_PERF),
    upstream=('pretrain',), outputs=('search',), results=('search',), header=_header)
