"""Sharded training on 8 simulated devices: one step on data x fsdp x seq meshes equals the
single-device step; checkpoints restore sharded, onto another mesh shape."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import data as data_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib
from longrope_jax.mesh import MeshConfig

CFG = model_lib.get_config('test', block_q=8, block_k=8)
B, T = 8, 64


def _setup():
  # AdamW's first update is about lr * sign(g): for a gradient near 0 it swings with float noise
  # in g, so the comparison uses eps = 1e-3 (the update then changes smoothly with g).
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, T + 1), 0, CFG.vocab_size))
  rope = rope_lib.yarn(head_dim=CFG.head_dim, scale=2.0, theta=CFG.rope_theta,
                       original_length=CFG.original_length)
  return optimizer, tokens, rope


@pytest.fixture(scope='module')
def reference():
  """The single-device step: (state before, state after, metrics)."""
  optimizer, tokens, rope = _setup()
  state = train_lib.init_state(CFG, optimizer, jax.random.key(0))
  new, metrics = train_lib.make_train_step(CFG, optimizer)(state, jnp.asarray(tokens), rope)
  return state, new, metrics


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol,
                                                       rtol=tol), a, b)


def test_step_with_its_rotary_table_equals_the_plain_gradient_step(reference):
  """make_train_step builds the rotary table in a jitted call of its own (for XLA:CPU's speed);
  the step must equal AdamW on the gradient of token_nll with the table built inside."""
  before, expected, expected_metrics = reference
  optimizer, tokens, rope = _setup()
  loss_fn = lambda p: model_lib.token_nll(CFG, p, jnp.asarray(tokens), rope).mean()
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(before['params'])
  updates, opt_state = optimizer.update(grads, before['opt_state'], before['params'])
  np.testing.assert_allclose(expected_metrics['loss'], loss, rtol=1e-6)
  _close(expected['params'], optax.apply_updates(before['params'], updates))
  _close(expected['opt_state'], opt_state)
  assert float(rope.attn_scale) != 1.0  # the table carries YaRN's temperature


@pytest.mark.parametrize('sizes', [
    dict(fsdp=8),
    pytest.param(dict(data=2, fsdp=2, seq=2), marks=pytest.mark.slow),  # ~40 s each on 2 cores
    pytest.param(dict(seq=8), marks=pytest.mark.slow),
], ids=lambda s: 'x'.join(f'{k}{v}' for k, v in s.items()))
def test_sharded_step_equals_single_device_step(reference, sizes):
  before, expected, expected_metrics = reference
  mesh = mesh_lib.make_mesh(MeshConfig(**sizes))
  config = CFG.replace(attention='ring' if sizes.get('seq', 1) > 1 else CFG.attention)
  optimizer, tokens, rope = _setup()
  state = train_lib.init_sharded_state(config, optimizer, mesh, jax.random.key(0))
  _close(state['params'], before['params'], 0)  # the same random draw, sharded
  if sizes.get('fsdp', 1) > 1:
    q = state['params']['layers']['attn']['q']  # [L, D, N, H]: D = 64 is the largest
    assert q.sharding.spec == P(None, 'fsdp', None, None)
    assert q.addressable_shards[0].data.shape[1] == 64 // sizes['fsdp']
  step = train_lib.make_train_step(config, optimizer, mesh)
  new, metrics = step(state, tokens, rope)
  np.testing.assert_allclose(metrics['loss'], expected_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], expected_metrics['grad_norm'], rtol=1e-5)
  _close(new['params'], expected['params'])
  _close(new['opt_state'], expected['opt_state'])
  assert jax.tree.map(lambda x: x.sharding, new) == train_lib.state_shardings(new, mesh)


def test_fsdp_spec_rules():
  key = jax.tree_util.DictKey
  assert train_lib.fsdp_spec((key('layers'), key('q')), (8, 64, 4, 16), 4) == P(
      None, 'fsdp', None, None)
  assert train_lib.fsdp_spec((key('embed'),), (258, 64), 8) == P(None, 'fsdp')
  assert train_lib.fsdp_spec((key('layers'),), (8, 3), 8) == P()  # layer axis never split
  assert train_lib.fsdp_spec((), (), 8) == P()


def test_mesh_errors_name_the_fix():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, seq=4))
  with pytest.raises(ValueError, match='batch size 3 is not divisible by mesh.data x mesh.fsdp'):
    train_lib.validate_mesh(CFG.replace(attention='ring'), mesh, 3, 64)
  with pytest.raises(ValueError, match='attention=ring'):
    train_lib.validate_mesh(CFG, mesh, 4, 64)
  with pytest.raises(ValueError, match='not divisible by 2 x mesh.seq = 8'):
    train_lib.validate_mesh(CFG.replace(attention='ring'), mesh, 4, 60)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  """A run on fsdp 8 stops after step 2 (its last checkpoint); data 2 x fsdp 2 x seq 2 resumes
  from those shards and ends where the uninterrupted fsdp 8 run ends."""
  rng = np.random.default_rng(0)
  docs = [np.tile(rng.integers(0, 50, size=7), 40).astype(np.int32) for _ in range(20)]
  batches = data_lib.PackedBatches(docs, batch_size=8, length=32, seed=0)
  rope = rope_lib.none(head_dim=CFG.head_dim)
  optim = train_lib.OptimConfig(steps=4, lr=1e-2, warmup=0)
  fsdp8 = mesh_lib.make_mesh(MeshConfig(fsdp=8))
  straight = train_lib.train(CFG, optim, batches, rope, tmp_path, mesh=fsdp8, ckpt_every=2,
                             log_every=1)
  shutil.rmtree(tmp_path / 'ckpt' / '4')  # as if the run had stopped after step 2
  other = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, seq=2))
  ring = CFG.replace(attention='ring')
  template = train_lib.abstract_state(ring, train_lib.make_optimizer(optim), other)
  restored = ckpt_lib.restore(ckpt_lib.manager(tmp_path / 'ckpt'), template)
  assert int(restored['step']) == 2
  assert jax.tree.map(lambda x: x.sharding, restored) == jax.tree.map(lambda x: x.sharding,
                                                                       template)
  resumed = train_lib.train(ring, optim, batches, rope, tmp_path, mesh=other, ckpt_every=2,
                            log_every=1)
  assert int(resumed['step']) == 4
  _close(resumed['params'], straight['params'], 1e-5)
  records = ckpt_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [1, 2, 3, 4]
