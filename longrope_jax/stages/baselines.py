"""The reproduction baselines: the search repeated over seeds, fine-tuned baselines (LongRoPE's
comparison), and the ablations of its Table 11."""

from __future__ import annotations

import dataclasses

import numpy as np

from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import plots
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib
from longrope_jax import search_space
from longrope_jax import train as train_lib
from longrope_jax.stages import common
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import MODEL_FIELDS, SEARCH_LENGTHS, SEARCH_PERF, Stage


def seed_windows(token_docs: list, length: int, num: int, count: int,
                 seed: int) -> tuple[list[np.ndarray], bool]:
  """`count` sets of fitness windows i32[num, length] (first `length` tokens of documents),
  disjoint when the split has count x num documents that long (else drawn independently per
  set); and whether they are disjoint."""
  long_enough = [i for i, d in enumerate(token_docs) if len(d) >= length]
  if len(long_enough) < num:
    raise ValueError(f"only {len(long_enough)} search.split documents have {length} tokens but "
                     f"search.num_windows = {num}; lower it.")
  if len(long_enough) >= count * num:
    order = np.random.default_rng(seed).permutation(long_enough)
    chosen = [sorted(order[k * num:(k + 1) * num].tolist()) for k in range(count)]
    return [np.stack([token_docs[i][:length] for i in c]).astype(np.int32) for c in chosen], True
  return [data_lib.eval_windows(token_docs, length, num, seed + k, field='search.num_windows')
          for k in range(count)], False


def seeds(run: Run) -> dict:
  """The search repeated with search.num_seeds seeds, each on its own fitness documents (disjoint
  where the split allows), each resumable in workdir/seeds/seed_k; every seed's factors on the
  held-out documents at the search length, beside the methods (results 'seeds',
  'seeds_perplexity')."""
  c = run.config.search
  if c.num_seeds < 2:
    raise ValueError(f"search.num_seeds = {c.num_seeds}; the seeds stage needs at least 2 (3 or "
                     "more to speak of a spread).")
  extension = run.extension(c.multiple)
  settings = search_lib.SearchConfig.from_config(c.settings)
  windows, disjoint = seed_windows(run.documents(c.split), extension.target_length,
                                   c.num_windows, c.num_seeds, run.config.seed)
  searches = {}
  for k, windows_NL in enumerate(windows):
    result = search_lib.search(run.model_config, run.params(), windows_NL, extension=extension,
                               mesh=run.search_mesh,
                               settings=settings, workdir=run.workdir / 'seeds' / f'seed_{k}',
                               seed=run.config.seed + k)
    searches[f'seed_{k}'] = result.to_json()
  held_out = common.perplexity(run, 'seeds_perplexity', run.params(),
                               run.config.evaluate.methods,
                               {k: search_lib.SearchResult.from_json(r).rope()
                                for k, r in searches.items()}, multiples=(c.multiple,),
                               depends={k: r['factors'] + [r['n_hat']]
                                        for k, r in searches.items()})
  summary = dict(num_seeds=c.num_seeds, disjoint=disjoint, num_windows=c.num_windows,
                 split=c.split, target_length=extension.target_length, searches=searches)
  run.save_result('seeds', summary)
  return held_out


def finetuned(run: Run) -> dict:
  """The paper's comparison: copies of the base model fine-tuned at the search length with each
  of finetuned.methods (same budget and batches, progressive.finetune; 'longrope' = the searched
  factors, sharing workdir/progressive's fine-tune), each evaluated at finetuned.multiples with
  its own scaling: the fine-tuned one up to the fine-tuning length, the method re-derived for
  longer ones (LongRoPE keeps its factors); the progressive row beside them when present."""
  c = run.config.finetuned
  mc = run.model_config
  first = run.searched()
  L1 = first.target_length
  searched = run.results()['search']['factors'] + [first.n_hat]  # what the fine-tunes start from
  methods = {}
  for method in c.methods:
    if method == 'longrope':
      rope, workdir = first.rope(), run.workdir / 'progressive'
      source = lambda length, rope=rope: rope  # noqa: E731
    else:
      rope = eval_lib.method_rope(method, config=mc, length=L1)
      workdir = run.workdir / 'finetuned' / method
      source = lambda length, rope=rope, method=method: (  # noqa: E731
          rope if length <= L1 else eval_lib.method_rope(method, config=mc, length=length))
    params = common.finetune(run, rope, workdir)
    r = common.perplexity(run, f'finetuned_{method}', params, (), {f'{method} (ft)': source},
                          multiples=c.multiples, depends=searched, save=False)
    methods.update(r['methods'])
  if 'progressive' in run.results():
    factors, depends = run.progressive_factors()
    r = common.perplexity(run, 'finetuned_progressive',
                          train_lib.load_params(mc, run.workdir / 'progressive'),
                          (), {'longrope_progressive': factors.select}, multiples=c.multiples,
                          depends=depends, save=False)
    methods.update(r['methods'])
  results = dict(r, methods=methods, finetune_length=L1,
                 finetune_steps=run.config.progressive.finetune.steps)
  run.save_result('finetuned', results)
  plots.perplexity_vs_length(results, run.workdir / 'plots' / 'finetuned.png',
                             title=f'Fine-tuned at {L1} tokens: perplexity vs length')
  return results


def ablations(run: Run) -> dict:
  """LongRoPE's Table 11 on the base model at the search length: uniform PI (with and without
  LongRoPE's attention scale), per-dimension factors with n_hat fixed at 0 (a search of its own,
  workdir/ablations/search_n_hat_0), per-dimension factors plus searched n_hat (the search), and
  the search's best initial seed; held-out perplexity at the evaluate.multiples >= the search's
  (results 'ablations')."""
  c = run.config.search
  mc = run.model_config
  first = run.searched()
  extension = run.extension(c.multiple)
  settings = search_lib.SearchConfig.from_config(c.settings)
  windows, weights = common.fitness_windows(run, extension.target_length)  # the search's own
  fixed = search_lib.search(mc, run.params(), windows, extension=extension,
                            mesh=run.search_mesh, weights_NL=weights,
                            settings=dataclasses.replace(settings, search_n_hat=False, n_hat=0),
                            workdir=run.workdir / 'ablations' / 'search_n_hat_0',
                            seed=run.config.seed)
  # The search's space, to decode its best seed genome as the search saw it.
  space = search_lib.make_search_space(settings, head_dim=mc.head_dim, theta=mc.rope_theta,
                                       extension=extension)
  genomes = search_space.seed_genomes(space, head_dim=mc.head_dim, theta=mc.rope_theta,
                                      extension=extension)
  best_seed = min(first.seeds, key=lambda m: first.seeds[m]['nll'])
  s = extension.scale
  rows = {
      'PI (uniform)': rope_lib.linear(head_dim=mc.head_dim, scale=s),
      'PI (uniform) + attention scale': rope_lib.make(np.full(mc.head_dim // 2, s), 0,
                                                      space.attn_scale),
      'per-dim, n_hat = 0 (searched)': fixed.rope(),
      'per-dim + n_hat (searched)': first.rope(),
      f'best seed ({best_seed})': rope_lib.unstack(space.rope(genomes[best_seed][None]))[0],
  }
  multiples = [m for m in run.config.evaluate.multiples if m >= c.multiple]
  results = common.perplexity(run, 'ablations', run.params(), (), rows, multiples=multiples,
                              depends=[np.asarray(r.factors).round(6).tolist() + [int(r.n_hat)]
                                       for r in rows.values()], save=False)
  results['validation_perplexity'] = {
      'per-dim, n_hat = 0 (searched)': fixed.perplexity,
      'per-dim + n_hat (searched)': first.perplexity,
      f'best seed ({best_seed})': first.seeds[best_seed]['perplexity']}
  run.save_result('ablations', results)
  return results


def _seeds_header(run: Run) -> dict:
  c = run.config.search
  return {'searches': f'{c.num_seeds} seeds at {run.extension(c.multiple).target_length} '
                      f'tokens, {c.num_windows} {c.split} documents each (disjoint where the '
                      'split allows)',
          'held-out': f'{run.config.evaluate.num_windows} {run.config.evaluate.split} documents'}


def _finetuned_header(run: Run) -> dict:
  c, tuning = run.config.finetuned, run.config.progressive.finetune
  return {'fine-tune': f'{", ".join(c.methods)}: {tuning.steps} steps each at '
                       f'{run.extension(run.config.search.multiple).target_length} tokens',
          'lengths': run.lengths(c.multiples)}


def _ablations_header(run: Run) -> dict:
  c = run.config.search
  multiples = [m for m in run.config.evaluate.multiples if m >= c.multiple]
  return {'rows': 'PI, PI + attention scale, per-dim with n_hat = 0 (a search), per-dim + n_hat,'
                  ' best seed',
          'lengths': run.lengths(multiples)}


SEEDS = Stage(
    'seeds', seeds, reads=('seed', *MODEL_FIELDS, 'data', 'search', 'evaluate'),
    ignore=('evaluate.batch_tokens', SEARCH_LENGTHS,
            *(f'search.settings.{k}' for k in SEARCH_PERF)),
    upstream=('pretrain',), outputs=('seeds', 'eval/seeds_perplexity.jsonl'),
    results=('seeds',), splits=('search.split', 'evaluate.split'), header=_seeds_header)
FINETUNED = Stage(
    'finetuned', finetuned,
    reads=('seed', *MODEL_FIELDS, 'data', 'evaluate', 'progressive.finetune', 'finetuned'),
    ignore=('evaluate.batch_tokens', 'progressive.finetune.ckpt_every'),
    upstream=('pretrain', 'search'), splits=('train', 'evaluate.split'),
    outputs=('finetuned', 'eval/finetuned_*.jsonl', 'plots/finetuned.png'),
    results=('finetuned',), header=_finetuned_header)
ABLATIONS = Stage(
    'ablations', ablations, reads=('seed', *MODEL_FIELDS, 'data', 'search', 'evaluate'),
    ignore=('evaluate.batch_tokens', SEARCH_LENGTHS,
            *(f'search.settings.{k}' for k in SEARCH_PERF)),
    upstream=('pretrain', 'search'), outputs=('ablations', 'eval/ablations.jsonl'),
    results=('ablations',), splits=('search.split', 'evaluate.split'),
    header=_ablations_header)
