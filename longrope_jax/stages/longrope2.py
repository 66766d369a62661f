"""LongRoPE2 (Shang et al., 2025) against LongRoPE, YaRN, YaRN-rcd and NTK-rcd under one
fine-tuning budget, and its ablations: three stages.

  longrope2_search    the LongRoPE2 searches the arms need (`SEARCHES`: space and objective)
  longrope2_finetune  a copy of the base model fine-tuned at the search length per arm (`ARMS`),
                      mixed context window (packing.MixedBatches) or plain (data.PackedBatches)
  longrope2_evaluate  each arm's perplexity, passkey and NIAH suite at longrope2.multiples (the
                      base model beside them at L0), resumable per cell

Every arm is evaluated the same way: at L <= L0 the short RoPE (longrope2.short_rope), beyond L0
its long factors (the fine-tuned ones up to the fine-tuning length; beyond it, searched factors
are kept and methods re-derived for the length, as the finetuned stage does), so the short/long
switch of inference applies to all. The claims table reads these results (claims.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import packing
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib
from longrope_jax import train as train_lib
from longrope_jax.stages import common, needles
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import MODEL_FIELDS, SEARCH_PERF, Stage

# name -> (search space, objective) of a LongRoPE2 search (search.SPACES, data.OBJECTIVES).
SEARCHES = {
    'longrope2': ('longrope2', 'needle'),
    'longrope2_ppl': ('longrope2', 'perplexity'),      # the plain-perplexity objective
    'longrope2_free': ('longrope2_free', 'needle'),    # without the rcd constraint
}
RCD_SOURCE = 'longrope2'  # the search whose d_rcd YaRN-rcd and NTK-rcd are re-based on


@dataclasses.dataclass(frozen=True)
class Arm:
  """One compared model: its long factors (`factors`: a SEARCHES name, 'longrope' for the
  search stage's LongRoPE factors, or a registered rope method) and how it is fine-tuned
  ('mixed': mixed context window, 'plain': every row at the fine-tuning length)."""

  factors: str
  finetune: str
  label: str


ARMS = {
    'longrope2': Arm('longrope2', 'mixed', 'LongRoPE2'),
    'longrope2_plain': Arm('longrope2', 'plain', 'LongRoPE2, plain fine-tuning'),
    'longrope2_ppl': Arm('longrope2_ppl', 'plain', 'LongRoPE2 searched by perplexity'),
    'longrope2_free': Arm('longrope2_free', 'plain', 'LongRoPE2 searched without rcd'),
    'longrope': Arm('longrope', 'plain', 'LongRoPE'),
    'yarn': Arm('yarn', 'plain', 'YaRN'),
    'yarn_rcd': Arm('yarn_rcd', 'plain', 'YaRN-rcd'),
    'ntk_rcd': Arm('ntk_rcd', 'plain', 'NTK-rcd'),
}
FINETUNE_MODES = ('mixed', 'plain')
# longrope2.short_rope -> the RoPE at L <= L0 from the arm's long one.
SHORT_ROPES: dict[str, Callable[[rope_lib.RopeScaling], rope_lib.RopeScaling]] = {
    # The pretraining RoPE itself (the paper's "original RoPE"; factors 1, no attention scale).
    'original': lambda long: rope_lib.make(np.ones(long.num_freqs), 0, 1.0),
    # Factors 1 under the long factors' attention scale: what transformers' longrope computes
    # at L <= L0 (it applies one attention_factor to short and long factors alike).
    'attention_factor': lambda long: rope_lib.make(np.ones(long.num_freqs), 0,
                                                   float(long.attn_scale)),
}
BASE = 'base'  # the base model's row (no scaling, L0 only)


def searches_needed(arms) -> list[str]:
  """The LongRoPE2 searches the arms read (the rcd source for the -rcd baselines)."""
  needed = {ARMS[a].factors for a in arms if ARMS[a].factors in SEARCHES}
  if any(ARMS[a].factors in ('yarn_rcd', 'ntk_rcd') for a in arms):
    needed.add(RCD_SOURCE)
  return [s for s in SEARCHES if s in needed]


# ----------------------------------------------------------------------------- search
def longrope2_search(run: Run) -> dict:
  """The LongRoPE2 searches of `searches_needed(longrope2.arms)` at search.multiple x L0 with
  search.settings (the LongRoPE search's budget) in their space, each on its objective's
  fitness documents (needles in longrope2.needle_format); each resumable in
  workdir/longrope2/search_<name>. Results 'longrope2_search': the searches and the critical
  dimensions d_tcd and d10_tcd they range between."""
  c, mc = run.config, run.model_config
  extension = run.extension(c.search.multiple)
  base = search_lib.SearchConfig.from_config(c.search.settings)
  records = {}
  for name in searches_needed(c.longrope2.arms):
    space, objective = SEARCHES[name]
    windows, weights = data_lib.fitness_windows(
        objective, run.documents(c.search.split), run.tokenizer, extension.target_length,
        c.search.num_windows, seed=run.config.seed, needle_format=c.longrope2.needle_format)
    result = search_lib.search(mc, run.params(), windows, extension=extension,
                               settings=dataclasses.replace(base, space=space),
                               mesh=run.search_mesh, weights_NL=weights,
                               workdir=run.workdir / 'longrope2' / f'search_{name}',
                               seed=run.config.seed)
    records[name] = dict(result.to_json(), objective=objective)
  critical = {f'd{p}_tcd' if p > 1 else 'd_tcd': rope_lib.critical_dimension(
      mc.head_dim, mc.rope_theta, run.original_length, periods=p) for p in (1, 10)}
  summary = dict(searches=records, target_length=extension.target_length,
                 needle_format=c.longrope2.needle_format, **critical)
  run.save_result('longrope2_search', summary)
  return summary


# ----------------------------------------------------------------------------- the arms
def _searched(run: Run, name: str) -> search_lib.SearchResult:
  if name == 'longrope':
    return run.searched()
  return search_lib.SearchResult.from_json(run.results()['longrope2_search']['searches'][name])


def long_rope(run: Run, arm: str, length: int) -> rope_lib.RopeScaling:
  """The arm's long factors at `length`: searched ones as found, methods for `length` (the
  -rcd ones re-based on the d_rcd of RCD_SOURCE)."""
  factors = ARMS[arm].factors
  if factors in SEARCHES or factors == 'longrope':
    return _searched(run, factors).rope()
  kwargs = {}
  if factors in ('yarn_rcd', 'ntk_rcd'):
    kwargs['rcd'] = int(_searched(run, RCD_SOURCE).rcd)
  return eval_lib.method_rope(factors, config=run.model_config, length=length, **kwargs)


def arm_source(run: Run, arm: str) -> Callable[[int], rope_lib.RopeScaling]:
  """The arm's RoPE at every length: short up to L0, the fine-tuned long factors up to the
  fine-tuning length, beyond it searched factors kept and methods re-derived."""
  L0, L1 = run.original_length, run.extension(run.config.search.multiple).target_length
  tuned = long_rope(run, arm, L1)
  short = SHORT_ROPES[run.config.longrope2.short_rope](tuned)
  return lambda L: short if L <= L0 else tuned if L <= L1 else long_rope(run, arm, L)


def arm_depends(run: Run, arm: str) -> list:
  """JSON of what the arm's factors are built from (its cells' `depends`)."""
  L1 = run.extension(run.config.search.multiple).target_length
  rope = long_rope(run, arm, L1)
  return [np.asarray(rope.factors, np.float64).round(6).tolist(), int(rope.n_hat),
          round(float(rope.attn_scale), 6), run.config.longrope2.short_rope]


def _params(run: Run, arm: str) -> Any:
  return train_lib.load_params(run.model_config, run.workdir / 'longrope2' / f'finetune_{arm}')


def longrope2_finetune(run: Run) -> dict:
  """Each of longrope2.arms fine-tuned from the base model at the search length with the budget
  of longrope2.finetune (the same steps, rows and tokens for every arm): 'mixed' arms on
  packing.MixedBatches under the short/long switch, 'plain' ones on data.PackedBatches under
  their long factors; each resumable in workdir/longrope2/finetune_<arm>."""
  c = run.config.longrope2
  t = c.finetune
  L0, L1 = run.original_length, run.extension(run.config.search.multiple).target_length
  records = dict(run.results().get('longrope2_finetune', {}))
  for arm in c.arms:
    long, mode = long_rope(run, arm, L1), ARMS[arm].finetune
    t0 = time.time()
    if mode == 'mixed':
      batches = packing.MixedBatches(
          run.documents('train'), t.batch_size, L1, original_length=L0,
          short_fraction=t.short_fraction, short_documents=t.short_documents,
          seed=run.config.seed + 1, passkey_fraction=t.passkey_fraction,
          copy_fraction=t.copy_fraction, tokenizer=run.tokenizer)
      rope = rope_lib.LongRopeFactors(SHORT_ROPES[c.short_rope](long), long, L0)
    else:
      batches, rope = None, long
    common.finetune(run, rope, run.workdir / 'longrope2' / f'finetune_{arm}', tuning=t,
                    batches=batches)
    short_steps = sum(packing.is_short_step(s, t.short_fraction) for s in range(t.steps)) \
        if mode == 'mixed' else 0
    prior = records.get(arm, {}).get('seconds', 0.0)
    records[arm] = dict(finetune=mode, steps=t.steps, short_steps=short_steps,
                        length=L1, original_length=L0,
                        factors=np.asarray(long.factors, np.float64).round(6).tolist(),
                        attn_scale=float(long.attn_scale),
                        seconds=prior + time.time() - t0)
  records = {arm: records[arm] for arm in c.arms}
  run.save_result('longrope2_finetune', records)
  return records


# ----------------------------------------------------------------------------- evaluation
def _passkey_sampler(run: Run) -> eval_lib.SampleFn:
  return eval_lib.passkey_task(run.tokenizer)


def longrope2_evaluate(run: Run) -> dict:
  """Each arm's fine-tuned model with its RoPE at longrope2.multiples, and the base model at
  L0: perplexity on evaluate's documents (paired document by document), passkey and the NIAH
  suite (niah section; tasks the base model does not retrieve at L0 are skipped, as in the niah
  stage) on the same prompts for every row. Results 'longrope2' (resumable per cell)."""
  c = run.config.longrope2
  lengths = run.lengths(c.multiples)
  L0 = run.original_length
  base_source = {BASE: lambda L: rope_lib.none(head_dim=run.model_config.head_dim)
                 if L <= L0 else None}
  rows = [(BASE, run.params(), base_source, None)] + [
      (arm, _params(run, arm), {arm: arm_source(run, arm)}, arm_depends(run, arm))
      for arm in c.arms]
  perplexity = {}
  for name, params, source, depends in rows:
    r = common.perplexity(run, f'longrope2_{name}', params, (), source, multiples=c.multiples,
                          depends=depends, save=False)
    perplexity.update(r['methods'])
  perplexity = dict(r, methods=perplexity)

  samplers = {'passkey': (_passkey_sampler(run), None)}
  for task, spec in needles.niah_tasks(run).items():
    samplers[task] = (needles.niah_sampler(run, spec), spec.answers)
  retrieval, skipped = {}, {}
  for k, (task, (sampler, answers)) in enumerate(samplers.items()):
    if answers is not None:
      check = needles.answer_check(run, sampler, answers)
      if check['skip']:
        skipped[task] = needles.skip_reason(check)
        print(f'longrope2_evaluate: {task} skipped; {skipped[task]}.', flush=True)
        continue
    protocol = (dict(task='passkey') if answers is None else needles.niah_protocol(run, task))
    merged: dict = {}
    for name, params, source, depends in rows:
      r = needles.cells(run, f'longrope2_{task}', params, source, lengths, sampler,
                        protocol=protocol, depends={name: depends}, seed=(100 + k,))
      merged.update(r['methods'])
    retrieval[task] = dict(r, methods=merged)
  results = dict(perplexity=perplexity, retrieval=retrieval, skipped=skipped,
                 arms={arm: dict(label=ARMS[arm].label, finetune=ARMS[arm].finetune,
                                 factors=ARMS[arm].factors) for arm in c.arms},
                 finetune_length=run.extension(run.config.search.multiple).target_length,
                 finetune_steps=c.finetune.steps, short_rope=c.short_rope)
  run.save_result('longrope2', results)
  needles.heatmaps(run, retrieval, 'longrope2', 'Retrieval after fine-tuning')
  return results


# ----------------------------------------------------------------------------- declarations
def _search_header(run: Run) -> dict:
  c = run.config
  names = searches_needed(c.longrope2.arms)
  return {'searches': ', '.join(f'{n} ({SEARCHES[n][0]} space, {SEARCHES[n][1]} objective)'
                                for n in names),
          'target': f'{run.extension(c.search.multiple).target_length} tokens',
          'budget': f'population {c.search.settings.population}, '
                    f'{c.search.settings.generations} generations each'}


def _finetune_header(run: Run) -> dict:
  c = run.config.longrope2
  return {'arms': ', '.join(f'{a} ({ARMS[a].finetune})' for a in c.arms),
          'budget': f'{c.finetune.steps} steps x {c.finetune.batch_size} rows x '
                    f'{run.extension(run.config.search.multiple).target_length} tokens each; '
                    f'mixed: {c.finetune.short_fraction:g} of the steps short rows'}


def _evaluate_header(run: Run) -> dict:
  c = run.config.longrope2
  return {'rows': [BASE] + list(c.arms), 'lengths': run.lengths(c.multiples),
          'tasks': ['perplexity', 'passkey', *run.config.niah.tasks]}


_SEARCH_READS = ('search.multiple', 'search.split', 'search.num_windows', 'search.settings')
LONGROPE2_SEARCH = Stage(
    'longrope2_search', longrope2_search,
    reads=('seed', *MODEL_FIELDS, 'data', *_SEARCH_READS, 'longrope2.arms',
           'longrope2.needle_format'),
    ignore=tuple(f'search.settings.{k}' for k in SEARCH_PERF), cells=('longrope2.arms',),
    upstream=('pretrain',), outputs=('longrope2/search_*',), results=('longrope2_search',),
    header=_search_header)
LONGROPE2_FINETUNE = Stage(
    'longrope2_finetune', longrope2_finetune,
    reads=('seed', *MODEL_FIELDS, 'data', 'search.multiple', 'longrope2.arms',
           'longrope2.short_rope', 'longrope2.finetune'),
    ignore=('longrope2.finetune.ckpt_every',), cells=('longrope2.arms',),
    upstream=('pretrain', 'search', 'longrope2_search'), outputs=('longrope2/finetune_*',),
    results=('longrope2_finetune',), header=_finetune_header)
LONGROPE2_EVALUATE = Stage(
    'longrope2_evaluate', longrope2_evaluate,
    reads=('seed', *MODEL_FIELDS, 'data', 'evaluate', 'search.multiple', 'longrope2', 'niah'),
    ignore=('evaluate.batch_tokens', 'longrope2.finetune.ckpt_every', 'niah.methods',
            'niah.multiples'),
    cells=('longrope2.arms', 'longrope2.multiples', 'niah.tasks', 'niah.skip_fraction',
           'evaluate.multiples'),
    upstream=('longrope2_finetune',),
    outputs=('eval/longrope2_*.jsonl', 'plots/longrope2_*.png'), results=('longrope2',),
    header=_evaluate_header)
