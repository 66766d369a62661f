"""TensorBoard event files (tensorboardX, no TensorFlow) for training, search and evaluation."""

import sys

import numpy as np
import pytest

from longrope_jax import data as data_lib
from longrope_jax import metrics as metrics_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib

CFG = model_lib.get_config('test', num_layers=1, dim=32, mlp_dim=64)


def test_writer_round_trip_needs_no_tensorflow(tmp_path):
  with metrics_lib.MetricWriter(tmp_path, 'stage') as writer:
    writer.write_scalars(1, {'loss': 2.5, 'lr': np.float32(0.1), 'skipped': None, 'note': 'x'})
    writer.write_scalars(2, {'loss': 2.0})
  assert writer.logdir == tmp_path / 'tb' / 'stage'
  scalars = metrics_lib.read_scalars(writer.logdir)
  assert set(scalars) == {'loss', 'lr'}
  assert scalars['loss'] == [(1, 2.5), (2, 2.0)]
  assert scalars['lr'][0][1] == pytest.approx(0.1)
  assert 'tensorflow' not in sys.modules


def test_purge_step_drops_the_points_of_an_interrupted_run(tmp_path):
  first = metrics_lib.MetricWriter(tmp_path, 'stage')
  for step in (1, 2, 3):
    first.write_scalars(step, {'loss': float(step)})
  first.close()
  with metrics_lib.MetricWriter(tmp_path, 'stage', purge_step=2) as resumed:
    for step in (2, 3):
      resumed.write_scalars(step, {'loss': 10.0 * step})
  assert metrics_lib.read_scalars(tmp_path / 'tb' / 'stage')['loss'] == [(1, 1.0), (2, 20.0),
                                                                         (3, 30.0)]


def test_search_and_perplexity_scalars(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path, 'search')
  for g, (best, mean) in enumerate([(50.0, 80.0), (45.0, 60.0)]):
    metrics_lib.write_search_generation(writer, dict(
        generation=g, best_nll=np.log(best), best_perplexity=best, mean_nll=np.log(mean),
        mean_perplexity=mean, evaluations=8 * (g + 1)))
  writer.close()
  scalars = metrics_lib.read_scalars(tmp_path / 'tb' / 'search')
  assert scalars['search/best_perplexity'] == [(0, 50.0), (1, 45.0)]
  assert scalars['search/mean_perplexity'] == [(0, 80.0), (1, 60.0)]

  results = dict(lengths=[64, 128], methods={'none': dict(perplexity=[40.0, 90.0]),
                                             'longrope': dict(perplexity=[None, 41.0])})
  metrics_lib.write_per_length(tmp_path, 'evaluate', results)
  results['methods']['longrope']['perplexity'][1] = 39.0  # a rerun replaces, never adds
  metrics_lib.write_per_length(tmp_path, 'evaluate', results)
  scalars = metrics_lib.read_scalars(tmp_path / 'tb' / 'evaluate')
  assert scalars == {'perplexity/none': [(64, 40.0), (128, 90.0)],
                     'perplexity/longrope': [(128, 39.0)]}
  passkey = dict(lengths=[128], methods={'none': dict(mean=[0.25])})
  metrics_lib.write_per_length(tmp_path, 'passkey', passkey, metric='mean', tag='passkey')
  assert metrics_lib.read_scalars(tmp_path / 'tb' / 'passkey') == {'passkey/none': [(128, 0.25)]}


@pytest.fixture(scope='module')
def batches():
  rng = np.random.default_rng(0)
  docs = [np.tile(rng.integers(0, 50, size=7), 40).astype(np.int32) for _ in range(20)]
  return data_lib.PackedBatches(docs, batch_size=4, length=32, seed=0)


def _train(workdir, batches, steps=20, eval_windows=None, **kw):
  optim = train_lib.OptimConfig(steps=steps, lr=1e-2, warmup=2)
  return train_lib.train(CFG, optim, batches, rope_lib.none(head_dim=CFG.head_dim), workdir,
                         ckpt_every=10, log_every=5, eval_every=10, eval_windows=eval_windows,
                         desc='pretrain', **kw)


def test_pretraining_writes_its_scalars(tmp_path, batches):
  run = tmp_path / 'run'  # tb_workdir: a fine-tuning's own workdir keeps its events in the run's
  windows = data_lib.eval_windows([np.arange(100, dtype=np.int32) % 50] * 2, 32, 2)
  _train(run, batches, steps=10, eval_windows=windows, tb_workdir=tmp_path)
  assert not (run / 'tb').exists()
  scalars = metrics_lib.read_scalars(tmp_path / 'tb' / 'pretrain')
  assert set(scalars) == {'loss', 'bits_per_token', 'lr', 'grad_norm', 'tokens_per_sec',
                          'val_loss', 'val_bits_per_token'}
  assert [s for s, _ in scalars['loss']] == [5, 10]
  assert [s for s, _ in scalars['val_bits_per_token']] == [10]
  records = {r['step']: r for r in train_lib.ckpt_lib.read_jsonl(run / 'metrics.jsonl')}
  for tag in ('loss', 'lr', 'grad_norm', 'val_bits_per_token'):  # as in metrics.jsonl
    for step, value in scalars[tag]:
      assert value == pytest.approx(records[step][tag], rel=1e-6)


@pytest.mark.slow
def test_a_resumed_pretraining_draws_no_point_twice(tmp_path, batches):
  class Interrupted(Exception):
    pass

  class Flaky:  # raises at step 17: step 15 was logged after the checkpoint of step 10
    def __init__(self, inner):
      self.inner, self.batch_size, self.length = inner, inner.batch_size, inner.length

    def batch(self, step):
      if step == 17:
        raise Interrupted
      return self.inner.batch(step)

  with pytest.raises(Interrupted):
    _train(tmp_path, Flaky(batches))
  _train(tmp_path, batches)
  scalars = metrics_lib.read_scalars(tmp_path / 'tb' / 'pretrain')
  records = {r['step']: r for r in train_lib.ckpt_lib.read_jsonl(tmp_path / 'metrics.jsonl')}
  assert [s for s, _ in scalars['loss']] == [5, 10, 15, 20] == sorted(records)
  for step, value in scalars['loss']:  # the resumed run's step 15, as in metrics.jsonl
    assert value == pytest.approx(records[step]['loss'], rel=1e-6)
