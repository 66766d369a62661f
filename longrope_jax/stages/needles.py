"""Needle evaluations beyond passkey: the RULER NIAH suite (niah.py) on any model and rope
sources, resumable per cell, and the niah stage (the base model, every method beside the
searched factors).

Cells live in eval/<key>_<task>.jsonl, one line per (method, length) with its accuracy per depth
and its score per prompt, and the protocol it was measured under (task, format, depths, trials,
seed, and what the method's factors were built from): a cell of another protocol is dropped and
measured again. A task whose answer the base model does not retrieve at L0 (teacher-forced NLL
above niah.skip_fraction of a guess) is skipped, as the passkey stage skips its sweep.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import niah
from longrope_jax import plots
from longrope_jax import rope as rope_lib
from longrope_jax.stages import common
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import MODEL_FIELDS, Stage


def niah_tasks(run: Run) -> dict[str, niah.NiahTask]:
  """The NIAH tasks niah.tasks names, with the section's counts."""
  c = run.config.niah
  every = niah.tasks(distractors=c.num_distractors, values=c.num_values,
                     queries=c.num_queries)
  return {name: every[name] for name in c.tasks}


def niah_sampler(run: Run, task: niah.NiahTask) -> eval_lib.SampleFn:
  c = run.config.niah
  return lambda rng, length, depth: niah.sample(rng, length, depth, run.tokenizer, task,
                                                c.format, c.digits)


def answer_check(run: Run, sampler: eval_lib.SampleFn, answers: int) -> dict:
  """The teacher-forced NLL of a task's answer on the base model without scaling at L0 (or the
  shortest window L0 x 2^k that holds the prompt), against a guess among digits for its
  `answers` values: {'length', 'nll', 'total', 'guess', 'skip'}."""
  c, mc = run.config.niah, run.passkey_model()
  shortest = fitting(sampler, [run.original_length * 2 ** k for k in range(8)])[:1]
  if not shortest:  # no window up to 128 L0 holds it: nothing to measure
    return dict(length=None, nll=[], total=None, guess=None, skip=True)
  nll = eval_lib.answer_nll(mc, run.params(), shortest[0], rope_lib.none(head_dim=mc.head_dim),
                            sampler, seed=run.config.seed, batch_tokens=run.passkey_batch_tokens,
                            fill=run.tokenizer.eos_id)
  guess = answers * c.digits * math.log(10)
  total = float(sum(nll))
  return dict(length=shortest[0], nll=nll, total=total, guess=guess,
              skip=c.skip_fraction is not None and total > c.skip_fraction * guess)


def fitting(sampler: eval_lib.SampleFn, lengths: list[int]) -> list[int]:
  """The lengths at which the task's prompt fits (a shorter window cannot hold it)."""
  def fits(length):
    try:
      sampler(np.random.default_rng(0), length, 0.0)
    except ValueError:
      return False
    return True
  return [L for L in lengths if fits(L)]


def skip_reason(check: Mapping) -> str:
  """Why a task was skipped, in words, from its `answer_check`."""
  if check['length'] is None:
    return 'no window up to 128 L0 holds its prompt'
  return (f"the base model does not retrieve its answer at {check['length']} tokens "
          f"(teacher-forced NLL {check['total']:.2f} nats, a guess among digits "
          f"{check['guess']:.2f})")


def cells(run: Run, key: str, params: Any, sources: Mapping[str, eval_lib.RopeSource],
          lengths: list[int], sampler: eval_lib.SampleFn, *, protocol: dict,
          depends: Mapping[str, Any] | None = None, depths=None, trials: int | None = None,
          seed: tuple = ()) -> dict:
  """`retrieval_accuracy` of `sampler` for `sources` on `params` at the `lengths` that hold its
  prompt (`fitting`), cached per (method, length) in eval/<key>.jsonl under `protocol` (plus
  each method's `depends`: JSON of what its factors were built from); prompts padded to a few
  bucket lengths (evaluate.greedy_generate_padded)."""
  c = run.config.niah
  depths = tuple(c.depths if depths is None else depths)
  trials = c.trials if trials is None else trials
  base = json.loads(json.dumps(dict(protocol, depths=depths, trials=trials,
                                    seed=[run.config.seed, *seed])))
  protocols = {m: dict(base, depends=json.loads(json.dumps((depends or {}).get(m))))
               for m in sources}
  path = run.workdir / 'eval' / f'{key}.jsonl'
  ckpt_lib.truncate_jsonl(path, lambda r: protocols.get(r.get('method')) == r.get('protocol'))
  done = {(r['method'], r['length']): r['cell'] for r in ckpt_lib.read_jsonl(path)}
  return eval_lib.retrieval_accuracy(
      run.passkey_model(), params, run.tokenizer, fitting(sampler, lengths), sampler, methods=(),
      extra=sources,
      depths=depths, trials=trials, seed=(run.config.seed, *seed), done=done,
      batch_tokens=run.passkey_batch_tokens, desc=key, on_result=lambda m, L, cell: ckpt_lib.append_jsonl(
          path, dict(method=m, length=L, cell=cell, protocol=protocols[m])))


def niah_protocol(run: Run, task: str) -> dict:
  c = run.config.niah
  return dict(task=task, format=c.format, digits=c.digits,
              counts=[c.num_distractors, c.num_values, c.num_queries])


def heatmaps(run: Run, results: Mapping[str, Mapping], name: str, title: str) -> None:
  """plots/<name>_<task>.png: one length x depth heat map per method and task."""
  c = run.config.niah
  for task, r in results.items():
    if r.get('skipped'):
      continue
    plots.passkey_heatmaps(r, run.workdir / 'plots' / f'{name}_{task}.png',
                           title=f'{title}: {task}', caption=plots.measured_caption(
                               what=f'Share of the values retrieved over {c.trials} prompts '
                                    'per cell, greedy decoding',
                               machine=run.results().get('machine')))


def evaluate_niah(run: Run) -> dict:
  """The NIAH suite (niah.tasks) on the base model: niah.methods and the searched factors at
  niah.multiples, per task accuracy per length and depth, a heat map per task (results 'niah';
  resumable per cell)."""
  c = run.config.niah
  lengths = run.lengths(c.multiples)
  sources = {m: (lambda L, m=m: eval_lib.method_rope(m, config=run.model_config, length=L))
             for m in c.methods}
  sources.update(common.searched_sources(run))
  depends = ({'longrope': run.results()['search']['factors'] + [run.results()['search']['n_hat']]}
             if 'longrope' in sources else {})
  results = {}
  for k, (task, spec) in enumerate(niah_tasks(run).items()):
    sampler = niah_sampler(run, spec)
    check = answer_check(run, sampler, spec.answers)
    if check['skip']:
      print(f'niah: {task} skipped; {skip_reason(check)}.', flush=True)
      results[task] = dict(skipped=True, answer_nll=check, lengths=lengths)
      continue
    r = cells(run, f'niah_{task}', run.params(), sources, lengths, sampler,
              protocol=niah_protocol(run, task), depends=depends, seed=(k,))
    results[task] = dict(r, answer_nll=check)
  run.save_result('niah', results)
  heatmaps(run, results, 'niah', 'NIAH accuracy, base model')
  return results


def _header(run: Run) -> dict:
  c = run.config.niah
  methods = list(c.methods) + (['longrope'] if 'search' in run.results() or
                               'search' in run.config.stages else [])
  return {'tasks': f"{', '.join(c.tasks)} ({c.format} format)",
          'lengths': run.lengths(c.multiples), 'methods': methods,
          'prompts': f'{c.trials} per depth at depths {", ".join(f"{d:g}" for d in c.depths)}'}


NIAH = Stage(
    'niah', evaluate_niah, reads=('seed', *MODEL_FIELDS, 'data.tokenizer', 'niah'),
    cells=('niah.multiples', 'niah.methods', 'niah.tasks', 'niah.skip_fraction'),
    upstream=('pretrain', 'search'), outputs=('eval/niah_*.jsonl', 'plots/niah_*.png'),
    results=('niah',), method_upstream=(('search', 'longrope'),), header=_header)
