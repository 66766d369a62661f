"""The pretrain stage: the base model trained at its original window L0."""

from __future__ import annotations

import time

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import data as data_lib
from longrope_jax import plots
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import MODEL_FIELDS, Stage


def pretrain(run: Run) -> None:
  """Pretrains the base model at its original window (resumes from workdir/ckpt)."""
  c = run.config.pretrain
  mc = run.model_config
  batches = data_lib.PackedBatches(run.documents('train'), c.batch_size, run.original_length,
                                   seed=run.config.seed, passkey_fraction=c.passkey_fraction,
                                   copy_fraction=c.copy_fraction, tokenizer=run.tokenizer)
  val = data_lib.eval_windows(run.documents('validation'), run.original_length, c.eval_windows,
                              seed=run.config.seed, field='pretrain.eval_windows')
  t0 = time.time()
  train_lib.train(run.training_config(run.model_config.attention),
                  train_lib.OptimConfig.from_config(c), batches,
                  rope_lib.none(head_dim=mc.head_dim), run.workdir, seed=run.config.seed,
                  eval_windows=val, eval_every=c.eval_every, ckpt_every=c.ckpt_every,
                  desc='pretrain', mesh=run.train_mesh)
  records = ckpt_lib.read_jsonl(run.workdir / 'metrics.jsonl')
  plots.training_curve(records, run.workdir / 'plots' / 'pretrain.png',
                       caption=plots.measured_caption(
                           what=f'Validation bits per token at L0 = {run.original_length}',
                           split='validation', documents=c.eval_windows,
                           machine=run.results().get('machine')))
  summary = dict(steps=c.steps, params=mc.num_params(),
                 tokens=c.steps * c.batch_size * run.original_length)
  prior = run.results().get('pretrain', {})
  summary['seconds'] = prior.get('seconds', 0.0) + (time.time() - t0)
  last_val = [r for r in records if 'val_bits_per_token' in r]
  if last_val:
    summary['val_bits_per_token'] = last_val[-1]['val_bits_per_token']
  run.save_result('pretrain', summary)


def _header(run: Run) -> dict:
  c, p = run.config, run.config.pretrain
  return {'model': f'{c.model.variant}, {run.model_config.num_params():,} parameters',
          'steps': f'{p.steps} x {p.batch_size} rows x L0 = {run.original_length} tokens',
          'validation': f'{p.eval_windows} windows every {p.eval_every} steps'}


PRETRAIN = Stage(
    'pretrain', pretrain, reads=('seed', *MODEL_FIELDS, 'data', 'pretrain'),
    ignore=('pretrain.ckpt_every', 'pretrain.eval_every'), extend=('pretrain.steps',),
    outputs=('ckpt', 'metrics.jsonl', 'plots/pretrain.png'), results=('pretrain',),
    splits=('train', 'validation'), header=_header)
