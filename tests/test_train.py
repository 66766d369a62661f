"""Training: the loss falls, and an interrupted run resumes to exactly the uninterrupted result."""

import json

import jax
import numpy as np
import pytest

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import data as data_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib

CFG = model_lib.get_config('test', num_layers=1, dim=32, mlp_dim=64)


@pytest.fixture(scope='module')
def batches():
  rng = np.random.default_rng(0)
  # A learnable stream: repeated short patterns.
  docs = [np.tile(rng.integers(0, 50, size=7), 40).astype(np.int32) for _ in range(20)]
  return data_lib.PackedBatches(docs, batch_size=4, length=32, seed=0)


def _train(workdir, batches, steps=20, **kw):
  optim = train_lib.OptimConfig(steps=steps, lr=1e-2, warmup=2)
  return train_lib.train(CFG, optim, batches, rope_lib.none(head_dim=CFG.head_dim), workdir,
                         ckpt_every=5, log_every=5, **kw)


def test_loss_decreases_and_metrics_are_logged(tmp_path, batches):
  _train(tmp_path, batches, steps=30)
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [5, 10, 15, 20, 25, 30]
  assert records[-1]['loss'] < 0.6 * records[0]['loss']


def test_resume_after_interruption_matches_uninterrupted(tmp_path, batches):
  straight = _train(tmp_path / 'a', batches)

  class Interrupted(Exception):
    pass

  class Flaky:  # raises at step 13, after the checkpoint of step 10
    def __init__(self, inner):
      self.inner, self.batch_size, self.length = inner, inner.batch_size, inner.length

    def batch(self, step):
      if step == 13:
        raise Interrupted
      return self.inner.batch(step)

  with pytest.raises(Interrupted):
    _train(tmp_path / 'b', Flaky(batches))
  resumed = _train(tmp_path / 'b', batches)
  assert int(resumed['step']) == 20
  for a, b in zip(jax.tree.leaves(straight['params']), jax.tree.leaves(resumed['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  steps = [json.loads(l)['step'] for l in (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [5, 10, 15, 20]  # nothing logged twice
  params = train_lib.load_params(CFG, tmp_path / 'b')
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed['params'])):
    np.testing.assert_array_equal(a, b)


def test_load_params_errors(tmp_path, batches):
  with pytest.raises(FileNotFoundError, match='pretrain'):
    train_lib.load_params(CFG, tmp_path)
  _train(tmp_path, batches, steps=5)
  with pytest.raises(ValueError, match=r'holds a model with .* does not match the model config'):
    train_lib.load_params(CFG.replace(dim=48), tmp_path)


def test_optim_config_errors():
  with pytest.raises(ValueError, match='warmup'):
    train_lib.OptimConfig(steps=10, warmup=20)
  with pytest.raises(ValueError, match='steps'):
    train_lib.OptimConfig(steps=0)


def test_kill_before_the_first_checkpoint_logs_no_step_twice(tmp_path, batches):
  class Interrupted(Exception):
    pass

  class Flaky:  # raises at step 7, before the first checkpoint (step 10)
    def __init__(self, inner):
      self.inner, self.batch_size, self.length = inner, inner.batch_size, inner.length

    def batch(self, step):
      if step == 7:
        raise Interrupted
      return self.inner.batch(step)

  optim = train_lib.OptimConfig(steps=12, lr=1e-2, warmup=2)
  run = lambda b: train_lib.train(CFG, optim, b, rope_lib.none(head_dim=CFG.head_dim), tmp_path,
                                  ckpt_every=10, log_every=2)  # noqa: E731
  with pytest.raises(Interrupted):
    run(Flaky(batches))
  assert [r['step'] for r in ckpt_lib.read_jsonl(tmp_path / 'metrics.jsonl')] == [2, 4, 6]
  run(batches)
  assert [r['step'] for r in ckpt_lib.read_jsonl(tmp_path / 'metrics.jsonl')] == [2, 4, 6, 8,
                                                                                   10, 12]


def test_restore_of_another_variant_names_both_shapes(tmp_path, batches):
  _train(tmp_path, batches, steps=5)
  other = CFG.replace(dim=48)
  optim = train_lib.OptimConfig(steps=10, lr=1e-2, warmup=2)
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    train_lib.train(other, optim, batches, rope_lib.none(head_dim=other.head_dim), tmp_path)
  message = str(e.value)
  assert message.startswith(f"{tmp_path / 'ckpt'} holds a model with")
  assert 'embed/embedding: (258, 32) vs (258, 48)' in message and 'fresh workdir' in message
  assert len(message) < 600  # not a tree diff


def test_remat_saves_memory_in_the_training_step():
  """The step unrolls small models' layers (train.UNROLL_MAX_LAYERS); with remat it must not,
  or XLA merges the recomputation with the forward and keeps every activation (963 against
  304 MiB of temporaries for the demo at 16K tokens when it did)."""
  import jax.numpy as jnp
  temps = {}
  for remat in ('none', 'full'):
    config = model_lib.get_config('demo', attention='blockwise', remat=remat)
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(steps=100))
    state = jax.eval_shape(lambda: train_lib.init_state(config, optimizer, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((1, 4097), jnp.int32)
    step = train_lib.make_train_step(config, optimizer)
    memory = step.lower(state, tokens, rope_lib.none(head_dim=config.head_dim)).compile()
    temps[remat] = memory.memory_analysis().temp_size_in_bytes
  assert temps['full'] < 0.5 * temps['none'], temps
