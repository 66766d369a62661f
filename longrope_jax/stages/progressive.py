"""Progressive extension (LongRoPE sec. 3.3): fine-tune at the search length with the searched
factors, search again beyond it, readjust short factors for L0; then the fine-tuned model's
perplexity and passkey retrieval with those factors."""

from __future__ import annotations

import dataclasses

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import plots
from longrope_jax import report as report_lib
from longrope_jax import search as search_lib
from longrope_jax import train as train_lib
from longrope_jax.stages import common
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import MODEL_FIELDS, SEARCH_PERF, Stage


def progressive(run: Run) -> dict:
  """Progressive extension (LongRoPE section 3.3): fine-tune at L1 = search.multiple x L0 with the
  searched factors, search again on the fine-tuned model for L2 = progressive.multiple x L0 on
  top of them, and readjust short factors for L0 with a reduced lambda_max. Every step resumes
  from workdir/progressive."""
  c = run.config.progressive
  first = run.searched()
  L1 = first.target_length
  workdir = run.workdir / 'progressive'
  params = common.finetune(run, first.rope(), workdir)

  # Second search on top of the first stage's factors, on the model fine-tuned at L1.
  settings = search_lib.SearchConfig.from_config(c.search)
  extension = run.extension(c.multiple, base_length=L1)
  windows = data_lib.eval_windows(run.documents(run.config.search.split),
                                  extension.target_length, run.config.search.num_windows,
                                  seed=run.config.seed, field='search.num_windows')
  long = search_lib.search(run.model_config, params, windows, extension=extension,
                           mesh=run.search_mesh,
                           settings=settings, base=first.rope(),
                           workdir=workdir / 'search_long', seed=run.config.seed)

  # Short-context readjustment: factors for L0 itself on the fine-tuned model.
  # Under the long factors' attention scale: transformers' longrope applies one attention factor
  # to short and long factors alike, so this is what an exported model computes at L <= L0.
  short_settings = dataclasses.replace(settings, lambda_max=c.short_lambda_max,
                                       attn_scale=long.attn_scale, search_n_hat=False, n_hat=0)
  short_extension = run.extension(1)
  windows0 = data_lib.eval_windows(run.documents(run.config.search.split),
                                   short_extension.target_length, c.short_num_windows,
                                   seed=run.config.seed, field='progressive.short_num_windows')
  short = search_lib.search(run.model_config, params, windows0, extension=short_extension,
                            mesh=run.search_mesh,
                            settings=short_settings, workdir=workdir / 'search_short',
                            seed=run.config.seed)
  # The readjusted factors must earn their place at L0: the model was fine-tuned with the long
  # factors, which lie outside the short search's lambda <= short_lambda_max and can be better
  # there (the demo: 4.538 against 5.035). Then they serve as the short factors too.
  with run.sequence_mesh():  # ring attention needs its 'seq' mesh
    at_l0 = {name: eval_lib.mean_nll(run.model_config, params, windows0, result.rope())
             for name, result in (('searched', short), ('long', long))}
  chosen = 'searched' if at_l0['searched'] <= at_l0['long'] else 'long'
  print(f"progressive: short factors at L0 = {run.original_length}: searched NLL "
        f"{at_l0['searched']:.4f}, long {at_l0['long']:.4f} on the short fitness windows; "
        f"using the {chosen} factors up to L0.")
  short_record = short.to_json() if chosen == 'searched' else dict(
      long.to_json(), target_length=short_extension.target_length, nll=at_l0['long'])
  summary = dict(finetune_length=L1, finetune_steps=c.finetune.steps,
                 target_length=extension.target_length, long=long.to_json(),
                 short=short_record, short_searched=short.to_json(), short_source=chosen,
                 short_nll_at_l0=at_l0)
  run.save_result('progressive', summary)
  return summary


def progressive_evaluate(run: Run) -> dict:
  """Perplexity of the fine-tuned model with the progressive factors (the short ones at L <= L0)
  next to the base model's methods (results 'perplexity'), on the same held-out windows."""
  factors, depends = run.progressive_factors()
  params = train_lib.load_params(run.model_config, run.workdir / 'progressive')
  # Cells depend on the factors: a progressive record rewritten (its short factors chosen anew)
  # recomputes them instead of reporting the old ones.
  return common.perplexity(run, 'progressive_perplexity', params, (),
                           {'longrope_progressive': factors.select,
                            'longrope_progressive_no_short': factors.long}, depends=depends)


def progressive_passkey(run: Run) -> dict:
  """Passkey retrieval of the fine-tuned model with the progressive factors, on the passkey
  stage's prompts, at passkey.multiples and the second search's length (resumable per cell;
  cells depend on the factors). Skipped, as the passkey stage, when the base model does not
  copy."""
  base = run.results()['passkey']
  if base.get('skipped'):
    print('progressive_passkey: skipped, as the passkey stage (the base model does not copy).',
          flush=True)
    results = dict(skipped=True)
    run.save_result('progressive_passkey', results)
    return results
  c = run.config.passkey
  mc = run.passkey_model()
  factors, depends = run.progressive_factors()
  params = train_lib.load_params(run.model_config, run.workdir / 'progressive')
  lengths = _passkey_lengths(run)
  cache_path = run.workdir / 'eval' / 'progressive_passkey.jsonl'
  ckpt_lib.truncate_jsonl(cache_path, lambda r: r.get('depends') == depends)
  done = {(r['method'], r['length']): r['accuracy'] for r in ckpt_lib.read_jsonl(cache_path)}
  results = eval_lib.passkey_accuracy(
      mc, params, run.tokenizer, lengths, methods=(),
      extra={'longrope_progressive': factors.select}, depths=c.depths, trials=c.trials,
      seed=run.config.seed, done=done, batch_tokens=run.passkey_batch_tokens,
      on_result=lambda m, L, acc: ckpt_lib.append_jsonl(cache_path, dict(
          method=m, length=L, accuracy=acc, depends=depends)))
  run.save_result('progressive_passkey', results)
  plots.passkey_heatmaps(report_lib.merged_passkey(base, results),
                         run.workdir / 'plots' / 'progressive_passkey.png',
                         title='Passkey retrieval: base model and after progressive extension',
                         caption=plots.measured_caption(
                             what=f'Accuracy over {c.trials} keys per cell, greedy decoding',
                             machine=run.results().get('machine')))
  return results


def _passkey_lengths(run: Run) -> list[int]:
  """passkey.multiples and the second search's length."""
  return run.lengths(tuple(run.config.passkey.multiples) + (run.config.progressive.multiple,))


def _header(run: Run) -> dict:
  c = run.config
  return {'fine-tune': f'{c.progressive.finetune.steps} steps at '
                       f'{run.extension(c.search.multiple).target_length} tokens with the '
                       'searched factors',
          'search': f'again for {run.extension(c.progressive.multiple).target_length} tokens, '
                    'then short factors for L0'}


def _evaluate_header(run: Run) -> dict:
  e = run.config.evaluate
  return {'lengths': run.lengths(e.multiples),
          'methods': ['longrope_progressive', 'longrope_progressive_no_short'],
          'documents': f'{e.num_windows} {e.split} documents per length'}


def _passkey_header(run: Run) -> dict:
  k = run.config.passkey
  return {'lengths': _passkey_lengths(run), 'methods': ['longrope_progressive'],
          'keys': f'{k.trials} per depth at depths {", ".join(f"{d:g}" for d in k.depths)}'}


PROGRESSIVE = Stage(
    'progressive', progressive,
    reads=('seed', *MODEL_FIELDS, 'data', 'search.split', 'search.num_windows', 'progressive'),
    ignore=('progressive.finetune.ckpt_every',
            *(f'progressive.search.{k}' for k in SEARCH_PERF)),
    upstream=('pretrain', 'search'), outputs=('progressive',), results=('progressive',),
    splits=('train', 'search.split'),
    header=_header)
PROGRESSIVE_EVALUATE = Stage(
    'progressive_evaluate', progressive_evaluate,
    reads=('seed', *MODEL_FIELDS, 'data', 'evaluate.split', 'evaluate.num_windows',
           'evaluate.multiples'),
    cells=('evaluate.multiples',), upstream=('progressive',), splits=('evaluate.split',),
    outputs=('eval/progressive_perplexity.jsonl',), results=('progressive_perplexity',),
    header=_evaluate_header)
PROGRESSIVE_PASSKEY = Stage(
    'progressive_passkey', progressive_passkey,
    reads=('seed', *MODEL_FIELDS, 'data.tokenizer', 'passkey', 'progressive.multiple'),
    cells=('passkey.multiples',), upstream=('passkey', 'progressive'),
    outputs=('eval/progressive_passkey.jsonl', 'plots/progressive_passkey.png'),
    results=('progressive_passkey',), header=_passkey_header)
