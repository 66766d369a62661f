"""Blockwise attention against the dense reference: outputs, gradients, skipping, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attention_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib


def _inputs(seed, B, T, S, N, K, H, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype)
             for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  dout = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  return q, k, v, dout


def _random_params(config, scale=0.2):
  """Random parameters of the right shapes, without running Flax's eager init (slow to compile
  op by op)."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def _arange_positions(B, T, S):
  """Queries are the last T of S keys (a prefill continuing a prefix)."""
  k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  return k_pos[:, S - T:], k_pos


def _value_and_grads(impl, q, k, v, q_pos, k_pos, dout, **kwargs):
  def loss(q, k, v):
    out = model_lib.attend(q, k, v, q_pos, k_pos, impl=impl, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_matches_dense(q, k, v, q_pos, k_pos, dout, atol=1e-5, **kwargs):
  out_d, grads_d = _value_and_grads('dense', q, k, v, q_pos, k_pos, dout, window=kwargs.get(
      'window'))
  out_b, grads_b = _value_and_grads('blockwise', q, k, v, q_pos, k_pos, dout, **kwargs)
  np.testing.assert_allclose(out_b, out_d, atol=atol, rtol=0)
  for name, g_b, g_d in zip('qkv', grads_b, grads_d):
    np.testing.assert_allclose(g_b, g_d, atol=atol, rtol=0, err_msg=f'd{name}')
  return out_b


# (B, T, S, N, K, H, block_q, block_k, window): ragged last blocks, GQA, MQA, T < S.
SHAPES = [
    (2, 100, 100, 4, 2, 16, 32, 16, None),
    (1, 90, 90, 4, 1, 8, 8, 24, 9),  # window smaller than a block, blocks of unequal size
    (3, 33, 65, 8, 2, 8, 16, 8, 40),
]


@pytest.mark.parametrize('B,T,S,N,K,H,block_q,block_k,window', SHAPES)
def test_blockwise_matches_dense(B, T, S, N, K, H, block_q, block_k, window):
  q, k, v, dout = _inputs(T * S + N, B, T, S, N, K, H)
  q_pos, k_pos = _arange_positions(B, T, S)
  _assert_matches_dense(q, k, v, q_pos, k_pos, dout, window=window, block_q=block_q,
                        block_k=block_k)


def test_blockwise_matches_dense_for_arbitrary_positions():
  """Shuffled, repeated and per-sequence positions, queries that see no key at all: skipping
  must stay conservative and empty rows give zeros, as in dense."""
  B, T, N, K, H = 2, 60, 4, 2, 8
  q, k, v, dout = _inputs(1, B, T, T, N, K, H)
  rng = np.random.default_rng(2)
  q_pos = jnp.asarray(np.stack([rng.permutation(T), rng.integers(0, 20, T)]), jnp.int32)
  k_pos = q_pos.at[0].add(12)  # in sequence 0 the queries at positions 0..11 see nothing
  out = _assert_matches_dense(q, k, v, q_pos, k_pos, dout, window=30, block_q=8, block_k=16)
  np.testing.assert_array_equal(out[0][np.asarray(q_pos[0]) < 12], 0.0)


def _assert_forward_matches_dense(q, k, v, q_pos, k_pos, atol=1e-5, **kwargs):
  fn = jax.jit(lambda q, k, v: attention_lib.blockwise_attention(q, k, v, q_pos, k_pos, **kwargs))
  dense = jax.jit(lambda q, k, v: attention_lib.dense_attention(q, k, v, q_pos, k_pos,
                                                                 window=kwargs.get('window')))
  out = fn(q, k, v)
  np.testing.assert_allclose(out.astype(np.float32), dense(q, k, v).astype(np.float32),
                             atol=atol, rtol=0)
  return out


def test_kv_cache_positions_are_masked():
  """EMPTY_POSITION slots (an unfilled KV cache) never contribute; a block may exceed S."""
  B, T, S, N, K, H = 1, 8, 48, 4, 2, 8
  q, k, v, _ = _inputs(4, B, T, S, N, K, H)
  k_pos = jnp.where(jnp.arange(S) < 20, jnp.arange(S), attention_lib.EMPTY_POSITION)[None]
  q_pos = jnp.arange(12, 20, dtype=jnp.int32)[None]
  _assert_forward_matches_dense(q, k, v, q_pos, k_pos.astype(jnp.int32), block_q=4, block_k=64)


def test_bfloat16_close_to_dense():
  B, T, N, K, H = 1, 64, 4, 2, 16
  q, k, v, _ = _inputs(5, B, T, T, N, K, H, jnp.bfloat16)
  q_pos, k_pos = _arange_positions(B, T, T)
  out = _assert_forward_matches_dense(q, k, v, q_pos, k_pos, atol=2e-2, block_q=16, block_k=16)
  assert out.dtype == jnp.bfloat16


def test_blockwise_under_vmap_over_a_population():
  """The search vmaps the model over candidates: positions shared, q / k / v batched."""
  B, T, N, K, H = 1, 32, 2, 1, 8
  q, k, v, _ = _inputs(6, B, T, T, N, K, H)
  qs, ks, vs = (jnp.stack([x, 2 * x, -x]) for x in (q, k, v))
  q_pos, k_pos = _arange_positions(B, T, T)
  fn = lambda impl: jax.vmap(lambda q, k, v: model_lib.attend(
      q, k, v, q_pos, k_pos, impl=impl, block_q=8, block_k=8))
  np.testing.assert_allclose(jax.jit(fn('blockwise'))(qs, ks, vs), fn('dense')(qs, ks, vs),
                             atol=1e-5)


# ----------------------------------------------------------------------------- block schedule
def _visible(T, block, window=None):
  pos_IBQ = jnp.arange(T, dtype=jnp.int32).reshape(-1, 1, block)
  return np.asarray(attention_lib.visible_blocks(pos_IBQ, pos_IBQ, window))


def test_visible_blocks_causal_triangle():
  np.testing.assert_array_equal(_visible(64, 8), np.tri(8, dtype=bool))


def test_visible_blocks_sliding_window_band():
  """Window 16 over blocks of 8: query block i sees key blocks i - 2 (partly), i - 1 and i."""
  expected = np.tri(8, dtype=bool) & ~np.tri(8, k=-3, dtype=bool)
  np.testing.assert_array_equal(_visible(64, 8, window=16), expected)


def test_fused_attention_matches_dense():
  """jax.nn.dot_product_attention with the position mask (XLA here, cuDNN on a GPU)."""
  q, k, v, _ = _inputs(7, 2, 24, 24, 4, 2, 8)
  q_pos, k_pos = _arange_positions(2, 24, 24)
  for window in (None, 5):
    fn = jax.jit(lambda q, k, v, impl: model_lib.attend(q, k, v, q_pos, k_pos, impl=impl,
                                                            window=window), static_argnums=3)
    np.testing.assert_allclose(fn(q, k, v, 'fused'), fn(q, k, v, 'dense'), atol=1e-5)


# ----------------------------------------------------------------------------- errors, registry
def test_attend_unknown_implementation():
  q, k, v, _ = _inputs(0, 1, 4, 4, 2, 1, 4)
  pos = jnp.arange(4)[None]
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    model_lib.attend(q, k, v, pos, pos, impl='flash')


@pytest.mark.parametrize('kwargs,match', [
    (dict(block_q=0), 'block_q must be a positive integer'),
    (dict(block_k=2.5), 'block_k must be a positive integer'),
    (dict(window=0), 'window must be a positive integer or None'),
])
def test_blockwise_rejects_bad_settings(kwargs, match):
  q, k, v, _ = _inputs(0, 1, 4, 4, 2, 1, 4)
  pos = jnp.arange(4)[None]
  with pytest.raises(ValueError, match=match):
    attention_lib.blockwise_attention(q, k, v, pos, pos, **kwargs)


def test_blockwise_rejects_mismatched_shapes():
  q, k, v, _ = _inputs(0, 1, 4, 4, 3, 2, 4)
  pos = jnp.arange(4)[None]
  with pytest.raises(ValueError, match='multiple of kv heads'):
    attention_lib.blockwise_attention(q, k, v, pos, pos)
  q, k, v, _ = _inputs(0, 1, 4, 4, 2, 1, 4)
  with pytest.raises(ValueError, match='positions must be'):
    attention_lib.blockwise_attention(q, k, v, pos[:, :3], pos)


def test_registry_lists_every_model_choice():
  assert model_lib.ATTENTION_IMPLS == tuple(model_lib.ATTENTION)
  assert set(model_lib.ATTENTION_IMPLS) == {'dense', 'blockwise', 'chunked', 'ring', 'fused',
                                            'flash_cpu', 'cudnn', 'pallas_gpu', 'splash', 'auto'}


def test_no_import_cycle():
  """attention.py is the bottom layer: it imports neither ring_attention nor model."""
  import pathlib
  source = pathlib.Path(attention_lib.__file__).read_text()
  assert 'ring_attention' not in source and 'import model' not in source


# ----------------------------------------------------------------------------- model, memory
@pytest.mark.slow
def test_model_with_blockwise_attention_matches_dense():
  config = model_lib.get_config('test', block_q=16, block_k=32)
  params = _random_params(config)
  tokens = jax.random.randint(jax.random.key(1), (2, 97), 0, config.vocab_size)
  rope = rope_lib.get('yarn', head_dim=config.head_dim, scale=4.0, theta=config.rope_theta,
                      original_length=config.original_length)

  def loss(params, attention):
    return model_lib.token_nll(config.replace(attention=attention), params, tokens, rope).mean()

  loss_d, grads_d = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 'dense')
  loss_b, grads_b = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 'blockwise')
  np.testing.assert_allclose(loss_b, loss_d, atol=1e-5)
  for g_b, g_d in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(g_b, g_d, atol=1e-4)


def _temp_bytes(attention, T, block=512):
  config = model_lib.get_config('demo', num_layers=1, attention=attention, block_q=block,
                                block_k=block)
  params = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rope = rope_lib.none(head_dim=config.head_dim)
  tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
  fn = jax.jit(lambda p, t: model_lib.forward(config, p, t, jnp.arange(T)[None], rope))
  return fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_forward_memory_is_linear_in_length():
  """XLA's own buffer assignment: blockwise temp memory grows ~linearly, dense quadratically."""
  small, large = _temp_bytes('blockwise', 4096), _temp_bytes('blockwise', 16384)
  assert large < 4 * small * 1.25
  assert large < 0.05 * _temp_bytes('dense', 16384)
