"""The search stage: LongRoPE's evolutionary search for the factors at search.multiple x L0 (or
LongRoPE2's, with search.settings.space and search.objective), and, with search.multiples, at
each of those lengths on the same base model (LongRoPE Table 1)."""

from __future__ import annotations

from longrope_jax import metrics as metrics_lib
from longrope_jax import search as search_lib
from longrope_jax.stages import common
from longrope_jax.stages.run import PER_LENGTH_KEY, Run
from longrope_jax.stages.stage import MODEL_FIELDS, SEARCH_LENGTHS, SEARCH_PERF, Stage


def _search_at(run: Run, multiple: float, subdir: str) -> tuple[dict, float]:
  """One search at multiple x L0 on `search.split` documents by search.objective, resumable in
  workdir/subdir (its generations' checkpoints in subdir/ckpt; TensorBoard scalars in
  tb/subdir): its record and the seconds its generations took (compilation included; as first
  run, when resumed)."""
  c = run.config.search
  extension = run.extension(multiple)
  windows, weights = common.fitness_windows(run, extension.target_length)
  with metrics_lib.MetricWriter(run.workdir, subdir.replace('/', '_')) as writer:
    result = search_lib.search(
        run.model_config, run.params(), windows, extension=extension, mesh=run.search_mesh,
        settings=search_lib.SearchConfig.from_config(c.settings), workdir=run.workdir / subdir,
        seed=run.config.seed, weights_NL=weights,
        on_generation=lambda record: metrics_lib.write_search_generation(writer, record))
  return (dict(result.to_json(), split=c.split, num_windows=c.num_windows,
               **common.objective_record(run)),
          float(sum(h['seconds'] for h in result.history)))


def search(run: Run) -> dict:
  """Searches LongRoPE factors at search.multiple x L0 (results 'search'; workdir/search), then
  at every other length of search.multiples, each on its own fitness windows and resumable in
  workdir/search/length_<L'> (results 'search_per_length': every searched length's record, by
  target length, with its search time). One compiled population fitness per length."""
  c = run.config.search
  summary, seconds = _search_at(run, c.multiple, 'search')
  run.save_result('search', summary)
  multiples = run.search_multiples()
  if len(multiples) == 1:
    run.drop_result(PER_LENGTH_KEY)  # a run that searched several lengths before
    return summary
  per_length = {}
  for multiple in multiples:
    L = run.extension(multiple).target_length
    record, took = ((summary, seconds) if multiple == c.multiple else
                    _search_at(run, multiple, f'search/length_{L}'))
    per_length[str(L)] = dict(record, seconds=round(took, 1))
  run.save_result(PER_LENGTH_KEY, per_length)
  return summary


def _header(run: Run) -> dict:
  c, s = run.config.search, run.config.search.settings
  header = {'target': f'{run.extension(c.multiple).target_length} tokens '
                      f'({c.multiple:g}x L0 = {run.original_length})'}
  multiples = run.search_multiples()
  if len(multiples) > 1:
    header['per length'] = ', '.join(f'{L} ({m:g}x)' for m, L in
                                     zip(multiples, run.lengths(multiples)))
  header.update({
      'strategy': f'{s.strategy}, population {s.population}, {s.generations} generations',
      'fitness': f'mean NLL on {c.num_windows} {c.split} documents' + (
          f' (the answers to needles, {c.needle_format} format)'
          if c.objective == 'needle' else '')})
  return header


SEARCH = Stage(
    'search', search, reads=('seed', *MODEL_FIELDS, 'data', 'search'),
    ignore=(SEARCH_LENGTHS, *(f'search.settings.{k}' for k in SEARCH_PERF)),
    upstream=('pretrain',), outputs=('search',),
    results=('search', PER_LENGTH_KEY), splits=('search.split',), header=_header)
