"""Ring attention on 8 simulated CPU devices against dense attention; layouts and checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import ring_attention as ring_lib
from longrope_jax import rope as rope_lib

RING = 8


@pytest.fixture(scope='module')
def seq_mesh():
  return mesh_lib.make_mesh(seq=RING)


def _inputs(seed, B, T, N, K, H):
  rng = np.random.default_rng(seed)
  q, k, v, dout = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                   for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)))
  return q, k, v, dout


def _random_params(config, scale=0.2):
  """Random parameters of the right shapes, without running Flax's eager init (slow to compile
  op by op)."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def _value_and_grads(impl, q, k, v, pos, dout, **kwargs):
  def loss(q, k, v):
    out = model_lib.attend(q, k, v, pos, pos, impl=impl, **kwargs)
    return jnp.sum(out * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize('layout,window,pop', [
    ('zigzag', None, 1),
    ('zigzag', 24, 2),  # sliding window, on a (pop=2, seq=4) mesh
    pytest.param('contiguous', None, 1, marks=pytest.mark.slow),
])
def test_ring_matches_dense(layout, window, pop):
  B, T, N, K, H = 2, 128, 4, 2, 16
  q, k, v, dout = _inputs(0, B, T, N, K, H)
  order = ring_lib.layout_order(T, RING // pop, layout)
  q, k, v, dout = (x[:, order] for x in (q, k, v, dout))
  pos = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (B, T))
  out_d, grads_d = _value_and_grads('dense', q, k, v, pos, dout, window=window)
  with jax.set_mesh(mesh_lib.make_mesh(pop=pop, seq=RING // pop)):
    out_r, grads_r = _value_and_grads('ring', q, k, v, pos, dout, window=window, block_q=4,
                                      block_k=8)
  np.testing.assert_allclose(out_r, out_d, atol=1e-5, rtol=0)
  for name, g_r, g_d in zip('qkv', grads_r, grads_d):
    np.testing.assert_allclose(g_r, g_d, atol=1e-5, rtol=0, err_msg=f'd{name}')


def test_model_with_ring_attention_matches_dense(seq_mesh):
  """Whole model, zigzag layout on 8 devices: logits and loss gradient equal the dense model's."""
  config = model_lib.get_config('test', num_layers=1, block_q=8, block_k=8)
  params = _random_params(config)
  B, T = 2, 128
  tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, config.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  rope = rope_lib.get('longrope', factors=np.linspace(1.0, 4.0, config.head_dim // 2), n_hat=4,
                      scale=4.0, original_length=config.original_length)

  def loss(params, config, inputs, targets, positions):
    logits = model_lib.forward(config, params, inputs, positions, rope)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return nll.mean(), logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (loss_d, logits_d), grads_d = grad_fn(params, config, inputs, targets, positions)
  zig = lambda x: mesh_lib.shard_sequence(ring_lib.to_zigzag(x, RING), seq_mesh)
  with jax.set_mesh(seq_mesh):
    (loss_r, logits_r), grads_r = grad_fn(params, config.replace(attention='ring'), zig(inputs),
                                          zig(targets), zig(positions))
  np.testing.assert_allclose(ring_lib.from_zigzag(logits_r, RING), logits_d, atol=1e-4, rtol=0)
  np.testing.assert_allclose(loss_r, loss_d, atol=1e-5)
  for g_r, g_d in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(g_r, g_d, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- layouts, work
def test_zigzag_layout():
  np.testing.assert_array_equal(ring_lib.layout_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  x = jnp.arange(2 * 48).reshape(2, 48)
  np.testing.assert_array_equal(ring_lib.from_zigzag(ring_lib.to_zigzag(x, 4), 4), x)
  np.testing.assert_array_equal(ring_lib.layout_order(8, 2, 'contiguous'), np.arange(8))


def test_zigzag_balances_causal_work():
  """4 local blocks per device, 8 devices: contiguous device r computes 16 r + 10 blocks,
  zigzag every device 66: the 32 * 33 / 2 = 528 causal block pairs split evenly."""
  T = 8 * 32
  kwargs = dict(block_q=8, block_k=8)
  contiguous = ring_lib.ring_block_counts(np.arange(T), RING, **kwargs).sum(axis=1)
  np.testing.assert_array_equal(contiguous, 16 * np.arange(RING) + 10)
  zigzag = ring_lib.ring_block_counts(ring_lib.layout_order(T, RING), RING, **kwargs).sum(axis=1)
  np.testing.assert_array_equal(zigzag, np.full(RING, 66))
  assert zigzag.sum() == contiguous.sum() == 32 * 33 // 2


# ----------------------------------------------------------------------------- checks
def test_ring_rejects_length_not_divisible_by_twice_the_ring(seq_mesh):
  q, k, v, _ = _inputs(0, 1, 24, 2, 1, 4)
  pos = jnp.arange(24)[None]
  with pytest.raises(ValueError, match=r'length 24 is not divisible by 2 \* ring size = 16'):
    ring_lib.ring_attention(q, k, v, pos, pos, mesh=seq_mesh)


def test_ring_rejects_missing_mesh_axis():
  q, k, v, _ = _inputs(0, 1, 32, 2, 1, 4)
  pos = jnp.arange(32)[None]
  data_mesh = jax.make_mesh((RING,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="no 'seq' axis"):
    ring_lib.ring_attention(q, k, v, pos, pos, mesh=data_mesh)
  with pytest.raises(ValueError, match='No device mesh'):
    model_lib.attend(q, k, v, pos, pos, impl='ring')


def test_ring_rejects_a_shard_map_already_manual_over_its_axis(seq_mesh):
  """Inside a shard_map manual over 'seq' every device would hold what the ring takes for the
  whole sequence (the search's fitness keeps 'seq' Auto instead): a clear error, not a wrong
  result or an XLA verifier error."""
  q, k, v, _ = _inputs(0, 1, 32, 2, 1, 4)
  pos = jnp.arange(32)[None]
  inside = jax.shard_map(lambda q, k, v, pos: ring_lib.ring_attention(q, k, v, pos, pos),
                         mesh=seq_mesh, in_specs=P(), out_specs=P())
  with pytest.raises(ValueError, match="already manual over 'seq'.*axis_names"):
    jax.jit(inside)(q, k, v, pos)
