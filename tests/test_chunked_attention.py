"""Query-chunked attention against the dense reference: outputs and gradients, ordered positions
(the chunked path) and any other positions (the blockwise fallback)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attention_lib
from longrope_jax import chunked_attention as chunked_lib
from longrope_jax import model as model_lib


def _inputs(seed, B, T, S, N, K, H):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
             for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  return q, k, v, jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)


def _value_and_grads(impl, q, k, v, q_pos, k_pos, dout, **kwargs):
  def loss(q, k, v):
    out = model_lib.attend(q, k, v, q_pos, k_pos, impl=impl, **kwargs)
    return jnp.sum(out * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_chunked_matches_dense(q, k, v, q_pos, k_pos, dout, window=None, chunk=16):
  out_d, grads_d = _value_and_grads('dense', q, k, v, q_pos, k_pos, dout, window=window)
  out_c, grads_c = _value_and_grads('chunked', q, k, v, q_pos, k_pos, dout, window=window,
                                    block_q=chunk, block_k=chunk)
  np.testing.assert_allclose(out_c, out_d, atol=1e-5, rtol=0)
  for name, g_c, g_d in zip('qkv', grads_c, grads_d):
    np.testing.assert_allclose(g_c, g_d, atol=1e-5, rtol=0, err_msg=f'd{name}')
  return out_c


# (B, T, S, N, K, H, chunk, window, start): ragged last chunk, GQA, MQA, queries the last T of S
# keys, a window smaller than a chunk, positions starting at an offset.
SHAPES = [
    (2, 100, 100, 4, 2, 16, 32, None, 0),
    (1, 90, 90, 4, 1, 8, 16, 9, 0),
    (3, 33, 65, 8, 2, 8, 8, 40, 0),
    (1, 64, 64, 2, 1, 16, 64, None, 5000),
    (1, 50, 80, 2, 2, 8, 16, None, 7),
]


@pytest.mark.parametrize('B,T,S,N,K,H,chunk,window,start', SHAPES)
def test_chunked_matches_dense_for_ordered_positions(B, T, S, N, K, H, chunk, window, start):
  q, k, v, dout = _inputs(T * S + N, B, T, S, N, K, H)
  k_pos = jnp.broadcast_to(start + jnp.arange(S, dtype=jnp.int32), (B, S))
  q_pos = k_pos[:, S - T:]
  assert bool(chunked_lib.ordered_positions(q_pos, k_pos))
  _assert_chunked_matches_dense(q, k, v, q_pos, k_pos, dout, window=window, chunk=chunk)


def test_chunked_matches_dense_for_gapped_positions():
  """Strictly increasing positions with gaps (packed documents' positions need not be arange)."""
  B, T, N, K, H = 2, 48, 4, 2, 8
  q, k, v, dout = _inputs(3, B, T, T, N, K, H)
  pos = jnp.asarray(np.cumsum(np.random.default_rng(3).integers(1, 4, (B, T)), axis=1), jnp.int32)
  assert bool(chunked_lib.ordered_positions(pos, pos))
  _assert_chunked_matches_dense(q, k, v, pos, pos, dout, window=5, chunk=16)


def test_chunked_falls_back_for_unordered_positions():
  """Shuffled and repeated positions, queries that see nothing: the blockwise path, as dense."""
  B, T, N, K, H = 2, 60, 4, 2, 8
  q, k, v, dout = _inputs(1, B, T, T, N, K, H)
  rng = np.random.default_rng(2)
  q_pos = jnp.asarray(np.stack([rng.permutation(T), rng.integers(0, 20, T)]), jnp.int32)
  k_pos = q_pos.at[0].add(12)
  assert not bool(chunked_lib.ordered_positions(q_pos, k_pos))
  out = _assert_chunked_matches_dense(q, k, v, q_pos, k_pos, dout, window=30, chunk=8)
  np.testing.assert_array_equal(out[0][np.asarray(q_pos[0]) < 12], 0.0)


def test_chunked_with_more_queries_than_keys_uses_blockwise():
  B, T, S, N, K, H = 1, 24, 16, 2, 1, 8
  q, k, v, dout = _inputs(4, B, T, S, N, K, H)
  q_pos = jnp.arange(T, dtype=jnp.int32)[None]
  k_pos = jnp.arange(S, dtype=jnp.int32)[None]
  _assert_chunked_matches_dense(q, k, v, q_pos, k_pos, dout, chunk=8)


def test_chunked_under_vmap_over_a_population():
  """The search vmaps the model over candidates with positions shared."""
  B, T, N, K, H = 1, 40, 2, 1, 8
  q, k, v, _ = _inputs(6, B, T, T, N, K, H)
  qs, ks, vs = (jnp.stack([x, 2 * x, -x]) for x in (q, k, v))
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  fn = lambda impl: jax.jit(jax.vmap(lambda q, k, v: model_lib.attend(
      q, k, v, pos, pos, impl=impl, block_q=16, block_k=16)))
  np.testing.assert_allclose(fn('chunked')(qs, ks, vs), fn('dense')(qs, ks, vs), atol=1e-5)


def test_chunk_ranges_cover_each_querys_visible_keys():
  """Causal: chunk [a, b) reads keys [0, S - T + b), masked from S - T + a; with a window it
  starts at the first key the chunk's first query may see."""
  assert chunked_lib.chunk_ranges(10, 10, 4, None) == [(0, 4, 0, 0), (4, 8, 0, 4),
                                                      (8, 10, 0, 8)]
  assert chunked_lib.chunk_ranges(4, 10, 4, None) == [(0, 4, 0, 6)]
  assert chunked_lib.chunk_ranges(10, 10, 4, 3) == [(0, 4, 0, 0), (4, 8, 2, 2), (8, 10, 6, 6)]


def test_default_block_table():
  """Every length has a size; blocks grow with the length; unknown names use blockwise's."""
  for impl, table in attention_lib.DEFAULT_BLOCKS.items():
    sizes = [attention_lib.default_block(n, impl) for n in (1, 2048, 8192, 16384, 2**20)]
    assert all(s > 0 for s in sizes) and sizes == sorted(sizes), impl
  assert attention_lib.default_block(2048) == 512
  assert attention_lib.default_block(8192) == 512
  assert attention_lib.default_block(16384) == 1024
  assert (attention_lib.default_block(8192, 'flash_cpu') ==
          attention_lib.default_block(8192, 'blockwise'))


def test_model_config_blocks_default_to_none():
  """ModelConfig's block sizes default to None (attention.default_block per length)."""
  config = model_lib.get_config('test')
  assert config.block_q is None and config.block_k is None
  with pytest.raises(ValueError, match='ModelConfig.block_q'):
    model_lib.get_config('test', block_q=0)
  assert model_lib.get_config('test', block_k=256).block_k == 256


@pytest.mark.slow
def test_chunked_model_matches_dense():
  """The model's NLL and its gradients with chunked attention are dense's (blocks left None
  for the key side)."""
  config = model_lib.get_config('test')
  params = model_lib.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 41), 0, config.vocab_size)
  from longrope_jax import rope as rope_lib
  rope = rope_lib.get('yarn', head_dim=config.head_dim, scale=4.0, theta=config.rope_theta,
                      original_length=config.original_length)

  def loss(params, attention):
    return model_lib.token_nll(config.replace(attention=attention, block_q=16), params, tokens,
                               rope).mean()

  loss_d, grads_d = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 'dense')
  loss_c, grads_c = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 'chunked')
  np.testing.assert_allclose(loss_c, loss_d, atol=1e-6)
  for g_c, g_d in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(g_c, g_d, atol=1e-5)
