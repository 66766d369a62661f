"""Accelerator attention on this CPU: the Pallas GPU flash kernels and TPU splash attention in
Pallas interpret mode, the cuDNN wrapper's routing (its is_causal call run by XLA), ring attention
with a fused step kernel on simulated devices, against dense attention (outputs and gradients);
lowering for 'cuda' and 'tpu' at the paper models' shapes; the 'auto' choice."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attention_lib
from longrope_jax import attention_select
from longrope_jax import gpu_attention
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import pallas_attention
from longrope_jax import ring_attention as ring_lib
from longrope_jax import ring_steps
from longrope_jax import tpu_attention

F32_ATOL = 1e-5
# bf16: inputs rounded to bf16, the reference is dense attention in f32 on those same inputs;
# max |error| <= 1% of max(1, the reference's largest magnitude), outputs and gradients (dense
# attention run in bf16 is at the same level: 0.4-0.8% on these shapes).
BF16_RTOL = 1e-2


def _inputs(seed, B, T, S, N, K, H, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype)
             for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  return q, k, v, jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)


def _reference(q, k, v, q_pos, k_pos, window=None, q_seg=None, k_seg=None):
  """Dense attention in f32; with segment ids, the contract's mask written out (a frozen plain
  reference until attention.dense_attention takes segment ids, issue P)."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if q_seg is None:
    return attention_lib.dense_attention(q, k, v, q_pos, k_pos, window=window)
  B, T, N, H = q.shape
  G = N // k.shape[2]
  mask_B1TS = (attention_lib.causal_mask(q_pos, k_pos, window) &
               (q_seg[:, :, None] == k_seg[:, None, :]))[:, None]
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, jnp.repeat(k, G, axis=2)) * H ** -0.5
  probs = jnp.where(mask_B1TS, jax.nn.softmax(jnp.where(mask_B1TS, logits, -jnp.inf), -1), 0.0)
  return jnp.einsum('BNTS,BSNH->BTNH', probs, jnp.repeat(v, G, axis=2))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, q, k, v, dout):
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v).astype(jnp.float32), q, k, v)
  return out, vjp(dout)


def _assert_matches(fn, q, k, v, q_pos, k_pos, dout, window=None, q_seg=None, k_seg=None):
  """fn's output and gradients against the reference: 1e-5 in f32, BF16_RTOL in bf16."""
  out, grads = _value_and_grads(fn, q, k, v, dout)
  ref = lambda q, k, v: _reference(q, k, v, q_pos, k_pos, window, q_seg, k_seg)
  out_r, grads_r = _value_and_grads(ref, *(x.astype(jnp.float32) for x in (q, k, v)), dout)
  for name, got, want in zip(('out', 'dq', 'dk', 'dv'), (out, *grads), (out_r, *grads_r)):
    got = np.asarray(got, np.float32)
    atol = (F32_ATOL if q.dtype == jnp.float32 else
            BF16_RTOL * max(1.0, float(np.abs(want).max())))
    np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=name)
  return out


def _arange(B, T, S, offset=0):
  k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32) + offset, (B, S))
  return k_pos[:, S - T:], k_pos


def _packed(B, T, lengths):
  """Packed documents: segment ids 0, 1, ... and positions restarting at 0 in each."""
  seg = np.repeat(np.arange(len(lengths)), lengths)[:T]
  pos = np.concatenate([np.arange(n) for n in lengths])[:T]
  as_B = lambda x: jnp.asarray(np.broadcast_to(x, (B, T)), jnp.int32)
  return as_B(pos), as_B(seg)


# ----------------------------------------------------------------------------- Pallas GPU kernel
def _pallas(q_pos, k_pos, window=None, q_seg=None, k_seg=None, tiles=(16, 16),
            backward_tiles=(16, 32)):
  return lambda q, k, v: pallas_attention.pallas_attention(
      q, k, v, q_pos, k_pos, window=window, q_seg_BT=q_seg, k_seg_BS=k_seg, tiles=tiles,
      backward_tiles=backward_tiles, interpret=True)


def test_pallas_matches_dense_gqa_after_a_prefix():
  """GQA, queries after a prefix (T < S), ragged tiles, head dim 24 padded to 32."""
  q, k, v, dout = _inputs(0, 1, 40, 72, 4, 2, 24)
  q_pos, k_pos = _arange(1, 40, 72)
  _assert_matches(_pallas(q_pos, k_pos), q, k, v, q_pos, k_pos, dout)


def test_pallas_matches_dense_sliding_window_mqa():
  q, k, v, dout = _inputs(1, 1, 48, 48, 2, 1, 16)
  q_pos, k_pos = _arange(1, 48, 48, offset=5)
  _assert_matches(_pallas(q_pos, k_pos, window=20), q, k, v, q_pos, k_pos, dout, window=20)


def test_pallas_matches_dense_packed_documents():
  """Segment ids with positions restarting per document; a window across them."""
  q, k, v, dout = _inputs(2, 1, 64, 64, 4, 2, 16)
  pos, seg = _packed(1, 64, [23, 9, 32])
  _assert_matches(_pallas(pos, pos, 12, seg, seg), q, k, v, pos, pos, dout, 12, seg, seg)


def test_pallas_matches_dense_for_arbitrary_positions():
  """Shuffled and repeated positions, queries that see no key (zeros, as dense)."""
  q, k, v, dout = _inputs(3, 2, 48, 48, 1, 1, 16)
  rng = np.random.default_rng(4)
  q_pos = jnp.asarray(np.stack([rng.permutation(48), rng.integers(0, 20, 48)]), jnp.int32)
  k_pos = q_pos.at[0].add(10)  # sequence 0: queries at positions 0..9 see nothing
  out = _assert_matches(_pallas(q_pos, k_pos, window=30), q, k, v, q_pos, k_pos, dout, 30)
  np.testing.assert_array_equal(out[0][np.asarray(q_pos[0]) < 10], 0.0)


def test_pallas_bfloat16_close_to_dense():
  q, k, v, dout = _inputs(5, 1, 48, 48, 2, 1, 32, jnp.bfloat16)
  q_pos, k_pos = _arange(1, 48, 48)
  out = _assert_matches(_pallas(q_pos, k_pos), q, k, v, q_pos, k_pos, dout)
  assert pallas_attention.pallas_attention(q, k, v, q_pos, k_pos, tiles=(16, 16)).dtype == \
      jnp.bfloat16 and out.shape == q.shape


def test_pallas_under_vmap_over_a_population():
  """The search vmaps the model over candidates: positions shared, q / k / v batched."""
  qs, ks, vs, douts = (jnp.stack(xs) for xs in zip(*(_inputs(s, 1, 32, 32, 2, 1, 16)
                                                      for s in (16, 17, 18))))
  q_pos, k_pos = _arange(1, 32, 32)
  fn = jax.vmap(_pallas(q_pos, k_pos))
  ref = jax.vmap(lambda q, k, v: _reference(q, k, v, q_pos, k_pos))
  (out, grads), (out_r, grads_r) = (_value_and_grads(f, qs, ks, vs, douts) for f in (fn, ref))
  for got, want in zip((out, *grads), (out_r, *grads_r)):
    np.testing.assert_allclose(got, want, atol=F32_ATOL, rtol=0)


def test_pallas_lse_and_partial_backward_compose():
  """flash_forward's lse over two disjoint key halves merges (ring_steps.merge) into the full
  softmax; an empty row has lse -inf and output 0."""
  q, k, v, _ = _inputs(6, 1, 32, 64, 2, 1, 16)
  q_pos, k_pos = _arange(1, 32, 64)
  q_pos = q_pos.at[0, 0].set(-1)  # sees no key
  fwd = lambda k, v, k_pos: pallas_attention.flash_forward(
      q, k, v, q_pos, k_pos, tiles=(16, 16), out_dtype=jnp.float32, interpret=True)
  out, lse = fwd(k, v, k_pos)
  halves = [fwd(k[:, s], v[:, s], k_pos[:, s]) for s in (slice(0, 32), slice(32, 64))]
  merged, lse_m = ring_steps.merge(*halves[0], *halves[1])
  np.testing.assert_allclose(merged, out, atol=F32_ATOL, rtol=0)
  np.testing.assert_allclose(lse_m, lse, atol=F32_ATOL, rtol=0)
  assert np.all(np.asarray(lse[0, :, 0]) == -np.inf) and np.all(np.asarray(out[0, 0]) == 0)
  np.testing.assert_allclose(out, _reference(q, k, v, q_pos, k_pos), atol=F32_ATOL, rtol=0)


def test_pallas_rejects_bad_arguments():
  q, k, v, _ = _inputs(0, 1, 16, 16, 2, 1, 8)
  pos = _arange(1, 16, 16)[0]
  with pytest.raises(ValueError, match='powers of two >= 16'):
    pallas_attention.pallas_attention(q, k, v, pos, pos, tiles=(24, 16))
  with pytest.raises(ValueError, match='given together'):
    pallas_attention.pallas_attention(q, k, v, pos, pos, q_seg_BT=pos)
  with pytest.raises(ValueError, match='backward_tiles must be a pair'):
    pallas_attention.pallas_attention(q, k, v, pos, pos, backward_tiles=16)


# ----------------------------------------------------------------------------- index causality
def test_index_causal_accepts_only_layouts_where_index_masks_equal_position_masks():
  T = 12
  arange = jnp.arange(T, dtype=jnp.int32)[None]
  pos, seg = _packed(1, T, [5, 7])
  check = lambda *a, **kw: bool(attention_select.index_causal(*a, **kw))
  assert check(arange + 7, arange + 7)  # an offset: differences are the indices'
  assert not check(arange[:, ::-1], arange[:, ::-1])  # reversed
  assert not check(arange[:, 4:], arange)  # T < S: cuDNN's causal mask is top-left aligned
  assert not check(arange, arange + 1)  # queries and keys at different positions
  assert not check(pos, pos)  # restarting positions without segment ids
  assert check(pos, pos, seg, seg)  # packed documents: splash applies the segment ids
  assert not check(pos, pos, seg, seg, segments_allowed=False)  # cuDNN has no segment ids
  assert check(arange, arange, 0 * arange, 0 * arange, segments_allowed=False)
  reused = jnp.asarray([[0] * 5 + [1] * 4 + [0] * 3], jnp.int32)  # id 0 again after id 1
  pos3 = jnp.asarray([list(range(5)) + list(range(4)) + list(range(3))], jnp.int32)
  assert not check(pos3, pos3, reused, reused)


# ----------------------------------------------------------------------------- cuDNN wrapper
def test_cudnn_path_matches_dense_on_contiguous_positions():
  """The is_causal + local_window_size call (run by XLA here: same call, same semantics) for
  contiguous positions with an offset and a sliding window."""
  q, k, v, dout = _inputs(7, 2, 48, 48, 4, 2, 16)
  q_pos, k_pos = _arange(2, 48, 48, offset=3)
  fn = lambda q, k, v: gpu_attention.cudnn_attention(q, k, v, q_pos, k_pos, window=9,
                                                     implementation='xla')
  _assert_matches(fn, q, k, v, q_pos, k_pos, dout, window=9)
  jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
  assert 'cond' in jaxpr  # chosen at run time between is_causal and the fallback


@pytest.mark.parametrize('layout', [pytest.param('prefix', marks=pytest.mark.slow), 'zigzag',
                                    'packed'])
def test_cudnn_falls_back_for_other_layouts(layout):
  """T < S, a zigzag shard's positions, packed documents: the position-masked fallback."""
  B, T, N, K, H = 1, 32, 4, 2, 16
  S = 48 if layout == 'prefix' else T
  q, k, v, dout = _inputs(8, B, T, S, N, K, H)
  q_seg = k_seg = None
  if layout == 'prefix':
    q_pos, k_pos = _arange(B, T, S)
  elif layout == 'zigzag':
    q_pos = k_pos = jnp.asarray(ring_lib.layout_order(T, 2), jnp.int32)[None]
  else:
    q_pos, q_seg = _packed(B, T, [20, 12])
    k_pos, k_seg = q_pos, q_seg
  fallback = 'pallas_gpu' if q_seg is not None else 'blockwise'
  fn = lambda q, k, v: gpu_attention.cudnn_attention(
      q, k, v, q_pos, k_pos, q_seg_BT=q_seg, k_seg_BS=k_seg, implementation='xla',
      fallback=fallback, block_q=16, block_k=16, tiles=(16, 16), backward_tiles=(16, 16))
  _assert_matches(fn, q, k, v, q_pos, k_pos, dout, None, q_seg, k_seg)


def test_cudnn_routes_float32_to_the_fallback_at_trace_time():
  """cuDNN takes only f16 / bf16: f32 never reaches it (cuDNN is absent here, so tracing the
  cuDNN call would raise)."""
  q, k, v, dout = _inputs(9, 1, 32, 32, 2, 1, 16)
  q_pos, k_pos = _arange(1, 32, 32)
  fn = lambda q, k, v: gpu_attention.cudnn_attention(q, k, v, q_pos, k_pos, implementation='cudnn',
                                                     fallback='blockwise', block_q=16, block_k=16)
  _assert_matches(fn, q, k, v, q_pos, k_pos, dout)
  if jax.default_backend() != 'gpu':  # bf16 does reach the cuDNN call, which needs the library
    with pytest.raises(RuntimeError, match='cuDNN'):
      fn(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert not gpu_attention.cudnn_supports(jnp.float32, 128, 4096, 4096)
  assert gpu_attention.cudnn_supports(jnp.bfloat16, 128, 4096, 4096)
  assert not gpu_attention.cudnn_supports(jnp.bfloat16, 256, 4096, 4096)


# ----------------------------------------------------------------------------- TPU splash
def _splash(q_pos, k_pos, window=None, q_seg=None, k_seg=None):
  return lambda q, k, v: tpu_attention.splash_attention(
      q, k, v, q_pos, k_pos, window=window, q_seg_BT=q_seg, k_seg_BS=k_seg, interpret=True,
      block_q=64, block_k=64)


def test_splash_matches_dense_causal_gqa():
  """Three 128-blocks per side (T = 384), GQA."""
  q, k, v, dout = _inputs(10, 1, 384, 384, 4, 2, 32)
  q_pos, k_pos = _arange(1, 384, 384, offset=11)
  assert tpu_attention.splash_block(384) == 128
  _assert_matches(_splash(q_pos, k_pos), q, k, v, q_pos, k_pos, dout)


def test_splash_matches_dense_packed_documents_with_window():
  q, k, v, dout = _inputs(11, 2, 256, 256, 2, 1, 32)
  pos, seg = _packed(2, 256, [100, 60, 96])
  _assert_matches(_splash(pos, pos, 40, seg, seg), q, k, v, pos, pos, dout, 40, seg, seg)


def test_splash_falls_back_for_non_contiguous_positions():
  q, k, v, dout = _inputs(12, 1, 256, 256, 2, 2, 32)
  pos = jnp.asarray(ring_lib.layout_order(256, 2), jnp.int32)[None]
  _assert_matches(_splash(pos, pos, 50), q, k, v, pos, pos, dout, 50)


# ----------------------------------------------------------------------------- ring
RING = 4


@pytest.mark.parametrize('window,segments', [(None, False), (24, True)])
def test_ring_with_pallas_step_kernel_matches_dense(window, segments):
  """Zigzag layout on 4 simulated devices, one interpreted Pallas call per ring step."""
  B, T, N, K, H = 2, 128, 4, 2, 16
  q, k, v, dout = _inputs(13, B, T, T, N, K, H)
  order = ring_lib.layout_order(T, RING)
  q, k, v, dout = (x[:, order] for x in (q, k, v, dout))
  pos = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (B, T))
  seg = None
  if segments:  # packed documents in zigzag order: positions restart per document
    doc_pos, doc_seg = _packed(B, T, [50, 78])
    pos, seg = doc_pos[:, order], doc_seg[:, order]
  mesh = mesh_lib.make_mesh(seq=RING)
  kernel = ring_steps.step_kernel('pallas_gpu')
  fn = lambda q, k, v: ring_steps.kernel_ring_attention(kernel, q, k, v, pos, pos, seg, seg,
                                                         window=window, mesh=mesh, axis='seq')
  _assert_matches(fn, q, k, v, pos, pos, dout, window, seg, seg)


def test_ring_attention_step_argument_selects_the_kernel():
  """ring_attention(step=...) goes through the fused ring; 'auto' is the XLA step on a CPU."""
  B, T, N, K, H = 1, 64, 2, 1, 16
  q, k, v, dout = _inputs(14, B, T, T, N, K, H)
  order = ring_lib.layout_order(T, RING)
  q, k, v, dout = (x[:, order] for x in (q, k, v, dout))
  pos = jnp.asarray(order, jnp.int32)[None]
  assert ring_steps.step_kernel('auto', backend='cpu') is None
  assert ring_steps.step_kernel('auto', backend='gpu') is ring_steps.STEP_KERNELS['pallas_gpu']
  with jax.set_mesh(mesh_lib.make_mesh(seq=RING)):
    fn = lambda q, k, v: ring_lib.ring_attention(q, k, v, pos, pos, step='pallas_gpu')
    _assert_matches(fn, q, k, v, pos, pos, dout)
  with pytest.raises(ValueError, match="Unknown ring step kernel 'triton'"):
    ring_steps.step_kernel('triton')


def test_merge_of_empty_sets_stays_empty():
  out = jnp.zeros((1, 2, 1, 3))
  lse = jnp.full((1, 1, 2), -jnp.inf)
  merged, lse_m = ring_steps.merge(out, lse, out, lse)
  assert np.all(np.asarray(merged) == 0) and np.all(np.asarray(lse_m) == -np.inf)


# ----------------------------------------------------------------------------- auto
def test_resolve_attention_by_backend_and_dtype():
  resolve = attention_select.resolve_attention
  assert resolve('blockwise', backend='gpu', dtype=jnp.bfloat16, length=4096) == (
      'blockwise', 'requested')
  assert resolve('auto', backend='gpu', dtype=jnp.bfloat16, length=4096)[0] == 'cudnn'
  assert resolve('auto', backend='gpu', dtype=jnp.float16, length=4096)[0] == 'cudnn'
  impl, reason = resolve('auto', backend='gpu', dtype=jnp.float32, length=4096)
  assert impl == 'pallas_gpu' and 'f16/bf16' in reason
  assert resolve('auto', backend='tpu', dtype=jnp.bfloat16, length=32768)[0] == 'splash'
  impl, _ = resolve('auto', backend='cpu', dtype=jnp.float32, length=2048)
  from longrope_jax import cpu_attention
  assert impl == ('flash_cpu' if cpu_attention.available() else 'chunked')
  assert resolve('auto', backend='metal', dtype=jnp.float32, length=2048)[0] == 'blockwise'
  for backend in ('cpu', 'gpu', 'tpu'):
    assert resolve('auto', backend=backend, dtype=jnp.bfloat16, length=8)[0] in model_lib.ATTENTION


def test_auto_is_a_model_choice_and_equals_dense():
  config = model_lib.get_config('test', attention='auto')
  assert config.attention == 'auto'
  q, k, v, dout = _inputs(15, 1, 32, 32, 4, 2, 16)
  q_pos, k_pos = _arange(1, 32, 32)
  fn = lambda q, k, v: model_lib.attend(q, k, v, q_pos, k_pos, impl='auto')
  _assert_matches(fn, q, k, v, q_pos, k_pos, dout)


# ----------------------------------------------------------------------------- lowering
def _lowered_text(fn, args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _paper_shapes(variant, T):
  c = model_lib.get_config(variant)
  dt = c.compute_dtype
  q = jax.ShapeDtypeStruct((1, T, c.num_heads, c.head_dim), dt)
  kv = jax.ShapeDtypeStruct((1, T, c.num_kv_heads, c.head_dim), dt)
  pos = jax.ShapeDtypeStruct((1, T), jnp.int32)
  return (q, kv, kv, pos), c.sliding_window


def _grad_of(impl_fn):
  def loss(q, k, v, pos):
    return impl_fn(q, k, v, pos).astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize('variant,T', [('llama2_7b', 4096), ('llama2_7b', 32768),
                                       ('mistral_7b', 32768)])
def test_pallas_lowers_for_cuda(variant, T):
  """Forward and backward lower to three Triton kernels (forward, dQ, dK/dV); nothing else
  holds a [T, T] array."""
  args, window = _paper_shapes(variant, T)
  fn = _grad_of(lambda q, k, v, pos: pallas_attention.pallas_attention(
      q, k, v, pos, pos, window=window, interpret=False))
  text = _lowered_text(fn, args, 'cuda')
  assert text.count('@__gpu$xla.gpu.triton') == 3
  assert f'{T}x{T}' not in text


def test_ring_with_pallas_step_lowers_for_cuda():
  """llama2_7b at 32K over seq = 8 (simulated devices): the shard_map checks varying axes with
  the compiled kernels; one forward and two backward kernels in the ring loops."""
  args, _ = _paper_shapes('llama2_7b', 32768)
  kernel = ring_steps.pallas_step(interpret=False)
  with jax.set_mesh(mesh_lib.make_mesh(seq=8)):
    fn = _grad_of(lambda q, k, v, pos: ring_lib.ring_attention(q, k, v, pos, pos, step=kernel))
    text = _lowered_text(fn, args, 'cuda')
  assert text.count('@__gpu$xla.gpu.triton') == 3
  assert 'collective_permute' in text


def test_cudnn_lowers_for_cuda_or_says_why():
  """cuDNN's call checks the cuDNN library at trace time: without the CUDA plugin it raises, so
  this lowering runs only where cuDNN is installed (bench/gpu_check.py runs it on a GPU)."""
  args, _ = _paper_shapes('llama2_7b', 4096)
  fn = _grad_of(lambda q, k, v, pos: gpu_attention.cudnn_attention(
      q, k, v, pos, pos, implementation='cudnn', fallback='pallas_gpu', interpret=False))
  f32_args = [jax.ShapeDtypeStruct(a.shape, jnp.float32) if a.dtype == jnp.bfloat16 else a
              for a in args]
  assert _lowered_text(fn, f32_args, 'cuda').count('@__gpu$xla.gpu.triton') == 3  # f32: Pallas
  try:
    text = _lowered_text(fn, args, 'cuda')
  except RuntimeError as e:
    if 'cuDNN is not detected' not in str(e):
      raise
    pytest.skip(f'cuDNN lowering needs the cuDNN library (jax-cuda plugin): {e}')
  assert 'cudnn' in text.lower() and text.count('@__gpu$xla.gpu.triton') == 3


@pytest.mark.parametrize('variant,T', [
    ('llama2_7b', 4096),
    pytest.param('llama2_7b', 32768, marks=pytest.mark.slow),  # splash's mask tables: ~11 s
    ('mistral_7b', 8192)])
def test_splash_lowers_for_tpu(variant, T):
  """Splash forward, dQ and dK/dV kernels (Mosaic custom calls), and the blockwise fallback."""
  args, window = _paper_shapes(variant, T)
  fn = _grad_of(lambda q, k, v, pos: tpu_attention.splash_attention(
      q, k, v, pos, pos, window=window, interpret=False))
  text = _lowered_text(fn, args, 'tpu')
  assert len(re.findall(r'custom_call @tpu_custom_call', text)) == 3


# ----------------------------------------------------------------------------- bench/gpu_check.py
def test_gpu_check_starts_and_passes_its_cpu_smoke(tmp_path):
  """The prepared GPU script, on this CPU (interpret mode, the cuDNN call by XLA): every smoke
  check passes and the JSON holds the rows."""
  import importlib.util
  import json
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / 'bench' / 'gpu_check.py'
  spec = importlib.util.spec_from_file_location('gpu_check', path)
  gpu_check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpu_check)
  out = tmp_path / 'smoke.json'
  assert gpu_check.main(['--cpu-smoke', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['passed'] and result['backend'] == 'cpu' and len(result['rows']) == 5
  assert {r['impl'] for r in result['rows']} == {'pallas_gpu', 'cudnn', 'ring_pallas'}
  assert all(r['err_dv'] <= r['tol_dv'] for r in result['rows'])
  assert gpu_check.main(['--out', str(out)]) == 2  # without --cpu-smoke it wants a GPU


def test_gpu_check_disarms_its_watchdog_on_every_return(tmp_path):
  """gpu_check.main arms faulthandler's watchdog with exit=True; a return (here the early one:
  no GPU) must disarm it, or the process that imported main (a test worker) is ended later."""
  import pathlib
  import subprocess
  import sys
  bench = pathlib.Path(__file__).resolve().parents[1] / 'bench'
  # Its imports done first, so the 3 s watchdog can only fire after main has returned.
  script = (f"import sys, time; sys.path.insert(0, {str(bench)!r}); import gpu_check; "
            "import jax; from longrope_jax import attention_select; "
            f"rc = gpu_check.main(['--out', {str(tmp_path / 'x.json')!r}, '--timeout', '3']); "
            "time.sleep(5); print('alive', rc)")
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and 'alive 2' in proc.stdout, proc.stdout + proc.stderr[-2000:]
