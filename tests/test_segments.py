"""Segment ids (packed rows of several documents, positions restarting in each) in every attention
implementation against dense, outputs and gradients; the model's packed NLL against each document
run alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attention_lib
from longrope_jax import chunked_attention
from longrope_jax import cpu_attention
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import ring_attention as ring_lib
from longrope_jax import rope as rope_lib


def packed_row(T: int, rng: np.random.Generator, documents: int) -> tuple[np.ndarray, np.ndarray]:
  """(positions, segment ids) i32[T] of `documents` documents of uneven lengths (>= 2 each),
  positions restarting at 0 in each."""
  cuts = np.sort(rng.choice(np.arange(2, T - 1, 2), documents - 1, replace=False))
  lengths = np.diff(np.concatenate([[0], cuts, [T]]))
  segments = np.repeat(np.arange(documents), lengths) + 3  # ids need not start at 0
  positions = np.concatenate([np.arange(n) for n in lengths])
  return positions.astype(np.int32), segments.astype(np.int32)


def packed(B: int, T: int, seed: int) -> tuple[jax.Array, jax.Array]:
  """Positions and segment ids i32[B, T]: row b packs 2 + b % 3 documents."""
  rng = np.random.default_rng(seed)
  rows = [packed_row(T, rng, 2 + b % 3) for b in range(B)]
  return tuple(jnp.asarray(np.stack(x)) for x in zip(*rows))


def _inputs(seed, B, T, S, N, K, H):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)))


def _out_and_grads(impl, q, k, v, pos, seg, dout, **kwargs):
  def loss(q, k, v):
    out = model_lib.attend(q, k, v, pos, pos, impl=impl, q_seg_BT=seg, k_seg_BS=seg, **kwargs)
    return jnp.sum(out * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_close(got, want, atol=1e-5):
  out, grads = got
  out_d, grads_d = want
  np.testing.assert_allclose(out, out_d, atol=atol, rtol=0)
  for name, g, g_d in zip('qkv', grads, grads_d):
    np.testing.assert_allclose(g, g_d, atol=atol, rtol=0, err_msg=f'd{name}')


# (B, T, N, K, H, block): GQA and MQA, lengths that are not multiples of the block.
SHAPES = [(3, 100, 4, 2, 16, 32), (2, 77, 4, 1, 8, 16)]


@functools.lru_cache(maxsize=None)
def _case(shape, window):
  """Inputs and dense's output and gradients for a packed batch."""
  B, T, N, K, H, _ = shape
  q, k, v, dout = _inputs(T + N, B, T, T, N, K, H)
  pos, seg = packed(B, T, seed=T)
  return (q, k, v, pos, seg, dout), _out_and_grads('dense', q, k, v, pos, seg, dout,
                                                   window=window)


def _plain_attention(q_TNH, k_SKH, v_SKH, window):
  """Causal GQA of one document at positions 0.. in float64 numpy: the frozen reference."""
  T, N, H = q_TNH.shape
  G = N // k_SKH.shape[1]
  out = np.zeros((T, N, H))
  for n in range(N):
    logits = q_TNH[:, n] @ k_SKH[:, n // G].T / np.sqrt(H)
    diff = np.arange(T)[:, None] - np.arange(T)[None]
    visible = (diff >= 0) & (diff < (window or T + 1))
    p = np.exp(np.where(visible, logits - logits.max(axis=1, keepdims=True), -np.inf))
    out[:, n] = (p / p.sum(axis=1, keepdims=True)) @ v_SKH[:, n // G]
  return out


@pytest.mark.parametrize('window', [None, 9])
@pytest.mark.parametrize('shape', SHAPES)
def test_dense_equals_each_document_alone(shape, window):
  """The reference itself: a packed row's outputs are each document's attention on its own."""
  (q, k, v, pos, seg, _), (out, _) = _case(shape, window)
  q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, seg))
  for b in range(q.shape[0]):
    for s in np.unique(seg[b]):
      idx = np.flatnonzero(seg[b] == s)
      np.testing.assert_array_equal(pos[b, idx], np.arange(len(idx)))
      alone = _plain_attention(q[b, idx], k[b, idx], v[b, idx], window)
      np.testing.assert_allclose(out[b, idx], alone, atol=1e-6, rtol=0)


@pytest.fixture(scope='module')
def kernel():
  if not cpu_attention.available():
    pytest.skip(f'flash_cpu kernel unavailable: {cpu_attention.unavailable_reason()}')


@pytest.mark.parametrize('window', [None, 9])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('impl', ['blockwise', 'chunked', 'fused', 'flash_cpu'])
def test_matches_dense(request, impl, shape, window):
  if impl == 'flash_cpu':
    request.getfixturevalue('kernel')
  (q, k, v, pos, seg, dout), want = _case(shape, window)
  block = shape[-1]
  kwargs = dict(window=window, block_q=block, block_k=block // 2)
  if impl == 'flash_cpu':  # small tiles: blocks straddling documents, skipped blocks, ragged ends
    kwargs.update(tiles=(block, block // 2), backward_tiles=(block // 2, block))
    got = _out_and_grads_kernel(q, k, v, pos, seg, dout, **kwargs)
  else:
    got = _out_and_grads(impl, q, k, v, pos, seg, dout, **kwargs)
  _assert_close(got, want)


def _out_and_grads_kernel(q, k, v, pos, seg, dout, **kwargs):
  def loss(q, k, v):
    out = cpu_attention.flash_cpu_attention(q, k, v, pos, pos, q_seg_BT=seg, k_seg_BS=seg,
                                            **kwargs)
    return jnp.sum(out * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def test_packed_rows_take_the_chunked_path():
  """Documents in order with positions restarting are ordered by (segment, position); out of
  order segments are not (blockwise runs, still equal to dense)."""
  pos, seg = packed(2, 40, seed=1)
  assert bool(chunked_attention.ordered_positions(pos, pos, seg, seg))
  assert not bool(chunked_attention.ordered_positions(pos, pos))
  assert not bool(chunked_attention.ordered_positions(pos, pos, seg[:, ::-1], seg[:, ::-1]))


@pytest.mark.parametrize('impl', ['chunked', 'blockwise'])
def test_matches_dense_for_interleaved_segments(impl):
  """Segments that come back (a b a b ...) and queries that are not the keys: the general
  path, and query rows with no visible key give zeros."""
  B, T, N, K, H = 1, 48, 4, 2, 8
  q, k, v, dout = _inputs(5, B, T, T, N, K, H)
  seg = jnp.asarray(np.arange(T) // 6 % 2, jnp.int32)[None]
  pos = jnp.asarray(np.arange(T), jnp.int32)[None]
  q_seg = seg.at[:, :5].set(7)  # queries 0..4 in a segment no key has
  want = _out_and_grads_general('dense', q, k, v, pos, q_seg, seg, dout, window=20)
  got = _out_and_grads_general(impl, q, k, v, pos, q_seg, seg, dout, window=20, block_q=8,
                               block_k=16)
  _assert_close(got, want)
  np.testing.assert_array_equal(got[0][:, :5], 0.0)


def _out_and_grads_general(impl, q, k, v, pos, q_seg, k_seg, dout, **kwargs):
  def loss(q, k, v):
    out = model_lib.attend(q, k, v, pos, pos, impl=impl, q_seg_BT=q_seg, k_seg_BS=k_seg,
                           **kwargs)
    return jnp.sum(out * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def test_fused_rows_with_no_visible_key_give_zeros():
  B, T, N, K, H = 1, 12, 2, 1, 8
  q, k, v, _ = _inputs(6, B, T, T, N, K, H)
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  seg = jnp.zeros((B, T), jnp.int32)
  q_seg = seg.at[:, :3].set(1)
  out = attention_lib.fused_attention(q, k, v, pos, pos, q_seg_BT=q_seg, k_seg_BS=seg)
  np.testing.assert_array_equal(out[:, :3], 0.0)
  np.testing.assert_allclose(out, attention_lib.dense_attention(
      q, k, v, pos, pos, q_seg_BT=q_seg, k_seg_BS=seg), atol=1e-6)


def test_blocks_of_other_documents_are_skipped():
  """Two documents of 32 tokens, blocks of 8: with segments only each document's causal
  triangle of blocks is visible (20 of 64); by positions alone, restarting at 0, 40 are."""
  pos = jnp.asarray(np.tile(np.arange(32), 2), jnp.int32)
  seg = jnp.asarray(np.repeat([0, 1], 32), jnp.int32)
  blocks = lambda x: x.reshape(1, -1, 8).transpose(1, 0, 2)
  by_segment = attention_lib.visible_blocks(blocks(pos), blocks(pos), None, blocks(seg),
                                            blocks(seg))
  expected = np.kron(np.eye(2, dtype=bool), np.tri(4, dtype=bool))
  np.testing.assert_array_equal(by_segment, expected)
  assert int(attention_lib.visible_blocks(blocks(pos), blocks(pos), None).sum()) == 40


@pytest.mark.parametrize('kwargs,match', [
    (dict(q_seg_BT=jnp.zeros((1, 4), jnp.int32)), 'q_seg_BT and k_seg_BS must be given together'),
    (dict(q_seg_BT=jnp.zeros((1, 3), jnp.int32), k_seg_BS=jnp.zeros((1, 4), jnp.int32)),
     r'q_seg_BT must be integers shaped as its positions \(1, 4\)'),
    (dict(q_seg_BT=jnp.zeros((1, 4)), k_seg_BS=jnp.zeros((1, 4), jnp.int32)),
     'q_seg_BT must be integers'),
])
@pytest.mark.parametrize('impl', ['dense', 'blockwise', 'chunked', 'fused', 'flash_cpu'])
def test_bad_segment_ids_are_a_clear_error(impl, kwargs, match):
  q, k, v, _ = _inputs(0, 1, 4, 4, 2, 1, 4)
  pos = jnp.arange(4, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match=match):
    model_lib.attend(q, k, v, pos, pos, impl=impl, **kwargs)


# ----------------------------------------------------------------------------- ring
@pytest.mark.parametrize('ring,window', [(2, None), (4, None), (4, 9)])
def test_ring_matches_dense(ring, window):
  """Zigzag layout on `ring` simulated devices: tokens, positions and segment ids permuted."""
  B, T, N, K, H = 2, 96, 4, 2, 16
  q, k, v, dout = _inputs(ring, B, T, T, N, K, H)
  pos, seg = packed(B, T, seed=ring)
  q, k, v, dout, pos, seg = (ring_lib.to_zigzag(x, ring) for x in (q, k, v, dout, pos, seg))
  want = _out_and_grads('dense', q, k, v, pos, seg, dout, window=window)
  with jax.set_mesh(mesh_lib.make_mesh(seq=ring)):
    got = _out_and_grads('ring', q, k, v, pos, seg, dout, window=window, block_q=8, block_k=4)
  _assert_close(got, want)


# ----------------------------------------------------------------------------- model
def _random_params(config, scale=0.2):
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


@pytest.fixture(scope='module')
def model_setup():
  config = model_lib.get_config('test', block_q=16, block_k=16)
  params = _random_params(config)
  # n_hat = 4: the first 4 positions of each document keep their angles, so positions must
  # restart per document for the packed row to equal the documents alone.
  rope = rope_lib.longrope(factors=np.linspace(1, 3, config.head_dim // 2), n_hat=4, scale=3.0,
                           original_length=config.original_length)
  return config, params, rope


def test_same_segment_targets():
  seg = jnp.asarray([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(model_lib.same_segment_targets(seg),
                                [[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize('attention', ['dense', 'flash_cpu'])
def test_packed_nll_equals_each_document_alone(model_setup, attention):
  """Per-document NLL of a packed row (targets across documents dropped) equals the NLL of each
  document run alone at positions 0.., within 1e-5; and the rotary table of the restarting
  positions is each document's own."""
  config, params, rope = model_setup
  config = config.replace(attention=attention, sliding_window=None, nll_chunk=16)  # 4 chunks
  T = 61
  pos, seg = packed(2, T, seed=7)
  tokens = np.random.default_rng(7).integers(0, config.vocab_size, (2, T)).astype(np.int32)
  nll = jax.jit(functools.partial(model_lib.token_nll, config))(params, jnp.asarray(tokens), rope,
                                                                pos, segment_ids_BT=seg)
  keep = np.asarray(model_lib.same_segment_targets(seg))
  np.testing.assert_array_equal(np.asarray(nll)[~keep], 0.0)
  # Each document alone: one row of its own, at positions 0.. (token_nll's default), padded after
  # its end (causal: the padding changes none of its predictions).
  documents = [(b, np.flatnonzero(np.asarray(seg[b]) == s))
               for b in range(2) for s in np.unique(np.asarray(seg[b]))]
  alone_tokens = np.zeros((len(documents), T), np.int32)
  for row, (b, idx) in enumerate(documents):
    alone_tokens[row, :len(idx)] = tokens[b, idx]
  alone = jax.jit(functools.partial(model_lib.token_nll,
                                    config.replace(attention='dense', nll_chunk=2048)))(
      params, jnp.asarray(alone_tokens), rope)
  cos, sin = rope_lib.rope_cos_sin(pos, rope, theta=config.rope_theta)
  cos_alone, sin_alone = rope_lib.rope_cos_sin(jnp.arange(T)[None], rope, theta=config.rope_theta)
  for row, (b, idx) in enumerate(documents):
    n = len(idx)
    np.testing.assert_allclose(nll[b, idx[:-1]], alone[row, :n - 1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cos[b, idx], cos_alone[0, :n])
    np.testing.assert_array_equal(sin[b, idx], sin_alone[0, :n])


@pytest.mark.slow
def test_packed_gradients_match_dense(model_setup):
  """The model's loss gradient over packed rows, chunked against dense, with a window."""
  config, params, rope = model_setup
  pos, seg = packed(2, 45, seed=3)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 45)))
  mask = model_lib.same_segment_targets(seg)

  def loss(params, attention):
    cfg = config.replace(attention=attention, sliding_window=7)
    nll = model_lib.token_nll(cfg, params, tokens, rope, pos, segment_ids_BT=seg)
    return nll.sum() / mask.sum()

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  loss_d, grads_d = grad(params, 'dense')
  loss_c, grads_c = grad(params, 'chunked')
  np.testing.assert_allclose(loss_c, loss_d, atol=1e-6)
  for g_c, g_d in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(g_c, g_d, atol=1e-5)


def test_one_compiled_forward_serves_every_packing(model_setup):
  """Segment ids are data: a new packing reuses the compiled forward."""
  config, params, rope = model_setup
  traces = []

  @jax.jit
  def forward(tokens, pos, seg):
    traces.append(None)
    return model_lib.forward(config, params, tokens, pos, rope, segment_ids_BT=seg)

  tokens = jnp.zeros((1, 32), jnp.int32)
  for seed in range(3):
    forward(tokens, *packed(1, 32, seed))
  assert len(traces) == 1


def test_segments_with_a_kv_cache_is_a_clear_error(model_setup):
  config, params, rope = model_setup
  tokens, pos = jnp.zeros((1, 4), jnp.int32), jnp.arange(4, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match='segment_ids_BT cannot be used with a KV cache'):
    model_lib.Decoder(config).apply({'params': params}, tokens, pos, rope,
                                    model_lib.init_cache(config, 1, 8), segment_ids_BT=pos)
