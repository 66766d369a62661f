"""The evaluation stages on the base model: perplexity vs length (truncated, and with sliding
windows) and passkey retrieval, every method beside the searched factors."""

from __future__ import annotations

import math

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import metrics as metrics_lib
from longrope_jax import plots
from longrope_jax import report as report_lib
from longrope_jax import rope as rope_lib
from longrope_jax.stages import common
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import MODEL_FIELDS, Stage


def evaluate(run: Run) -> dict:
  """Perplexity of every method at every length on held-out documents (resumable per cell)."""
  c = run.config.evaluate
  results = common.perplexity(run, 'perplexity', run.params(), c.methods,
                              common.searched_sources(run),
                              cell_depends=common.searched_cell(run))
  plots.perplexity_vs_length(results, run.workdir / 'plots' / 'perplexity.png',
                             title=f'Held-out perplexity vs length ({c.split} split)',
                             caption=plots.measured_caption(
                                 what='Per-token perplexity on the first L tokens',
                                 split=c.split, documents=c.num_windows,
                                 machine=run.results().get('machine')))
  return results


def evaluate_sliding(run: Run) -> dict:
  """The evaluate stage's methods with windows sliding by evaluate.sliding_stride over each
  document's span (LongRoPE's official evaluation offers it), beside the truncated table."""
  return common.perplexity(run, 'perplexity_sliding', run.params(),
                           run.config.evaluate.methods, common.searched_sources(run),
                           stride=run.config.evaluate.sliding_stride,
                           cell_depends=common.searched_cell(run))


def passkey(run: Run) -> dict:
  """Passkey retrieval accuracy per method, length and depth (resumable per cell).

  First the teacher-forced NLL of the answer at the shortest length (at most
  evaluate.PASSKEY_CHECK_LENGTH tokens) without scaling: a model whose total over the key stays
  above passkey.skip_fraction of a guess (5 ln 10 for 5 digits) does not copy, so the sweep (all
  zeros) is skipped and the stage says so."""
  c = run.config.passkey
  mc = run.passkey_model()
  lengths = run.lengths(c.multiples)
  answer_length = min(min(lengths, default=run.original_length), eval_lib.PASSKEY_CHECK_LENGTH)
  answer_nll = []
  if lengths:
    answer_nll = eval_lib.passkey_answer_nll(mc, run.params(), run.tokenizer, answer_length,
                                             rope_lib.none(head_dim=mc.head_dim),
                                             seed=run.config.seed,
                                             batch_tokens=run.passkey_batch_tokens)
  guess = data_lib.PASSKEY_DIGITS * math.log(10)
  answer = dict(length=answer_length, nll=answer_nll, total=float(sum(answer_nll)), guess=guess)
  if c.skip_fraction is not None and answer_nll and answer['total'] > c.skip_fraction * guess:
    print(f"passkey: skipped; the model does not copy the key (teacher-forced NLL of the answer "
          f"{answer['total']:.2f} nats at {answer_length} tokens, a guess is {guess:.2f}; "
          f"passkey.skip_fraction = {c.skip_fraction} skips the sweep above "
          f"{c.skip_fraction * guess:.2f}).",
          flush=True)
    results = dict(skipped=True, lengths=lengths, original_length=run.original_length,
                   depths=list(c.depths), trials=c.trials, methods={}, answer_nll=answer)
    run.save_result('passkey', results)
    return results
  cache_path = run.workdir / 'eval' / 'passkey.jsonl'
  # A per-length row's cell is kept while the search serving its length is unchanged.
  cell = common.searched_cell(run)
  done = {(r['method'], r['length']): r['accuracy']
          for r in ckpt_lib.read_jsonl(cache_path, required=('method', 'length', 'accuracy'))
          if common.same_cell(r, cell)}

  def on_result(method, length, accuracy):
    record = dict(method=method, length=length, accuracy=accuracy)
    if cell(method, length) is not None:
      record['depends'] = cell(method, length)
    ckpt_lib.append_jsonl(cache_path, record)

  results = eval_lib.passkey_accuracy(
      mc, run.params(), run.tokenizer, lengths, methods=c.methods,
      extra=common.searched_sources(run), depths=c.depths, trials=c.trials,
      seed=run.config.seed, done=done, batch_tokens=run.passkey_batch_tokens,
      on_result=on_result)
  results['answer_nll'] = answer
  run.save_result('passkey', results)
  metrics_lib.write_per_length(run.workdir, 'passkey', results, metric='mean', tag='passkey')
  plots.passkey_heatmaps(results, run.workdir / 'plots' / 'passkey.png',
                         caption=plots.measured_caption(
                             what=f'Accuracy over {c.trials} keys per cell, greedy decoding',
                             machine=run.results().get('machine')))
  return results


def _searched(run: Run) -> list[str]:
  """The searched factors' row when it joins the methods (searched, or searched now): 'longrope',
  or with several searched lengths report.PER_LENGTH."""
  if 'search' not in run.results() and 'search' not in run.config.stages:
    return []
  several = 'search' in run.config and len(run.search_multiples()) > 1
  return [report_lib.PER_LENGTH if several else 'longrope']


def _evaluate_header(run: Run) -> dict:
  e = run.config.evaluate
  return {'lengths': run.lengths(e.multiples), 'methods': list(e.methods) + _searched(run),
          'documents': f'{e.num_windows} {e.split} documents per length'}


def _sliding_header(run: Run) -> dict:
  e = run.config.evaluate
  return {'lengths': run.lengths(e.multiples), 'methods': list(e.methods) + _searched(run),
          'documents': f'{e.num_windows} {e.split} documents per length, windows sliding by '
                       f'{e.sliding_stride} tokens'}


def _passkey_header(run: Run) -> dict:
  k = run.config.passkey
  return {'lengths': run.lengths(k.multiples), 'methods': list(k.methods) + _searched(run),
          'keys': f'{k.trials} per depth at depths {", ".join(f"{d:g}" for d in k.depths)}'}


EVALUATE = Stage(
    'evaluate', evaluate, reads=('seed', *MODEL_FIELDS, 'data', 'evaluate'),
    ignore=('evaluate.batch_tokens',), cells=('evaluate.multiples', 'evaluate.methods'),
    upstream=('pretrain', 'search'), outputs=('eval/perplexity.jsonl', 'plots/perplexity.png'),
    results=('perplexity',), method_upstream=(('search', 'longrope'),),
    splits=('evaluate.split',), header=_evaluate_header)
PASSKEY = Stage(
    'passkey', passkey, reads=('seed', *MODEL_FIELDS, 'data.tokenizer', 'passkey'),
    cells=('passkey.multiples', 'passkey.methods', 'passkey.skip_fraction'),
    upstream=('pretrain', 'search'), outputs=('eval/passkey.jsonl', 'plots/passkey.png'),
    results=('passkey',), method_upstream=(('search', 'longrope'),), header=_passkey_header)
EVALUATE_SLIDING = Stage(
    'evaluate_sliding', evaluate_sliding, reads=('seed', *MODEL_FIELDS, 'data', 'evaluate'),
    ignore=('evaluate.batch_tokens', 'evaluate.stride'),
    cells=('evaluate.multiples', 'evaluate.methods'),
    upstream=('pretrain', 'search'), outputs=('eval/perplexity_sliding.jsonl',),
    results=('perplexity_sliding',), method_upstream=(('search', 'longrope'),),
    splits=('evaluate.split',), header=_sliding_header)
