"""Causal attention over explicit positions and segments: dense reference, blockwise, fused.

The contract of every attention implementation (model.ATTENTION: these, the query-chunked,
ring and CPU-kernel modules beside this file, and accelerator kernels to come):

    fn(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, window=None, block_q, block_k,
       q_seg_BT=None, k_seg_BS=None) -> out_BTNH

Masking is by positions and segment ids, never by array index: query t sees key s iff
    k_pos[s] <= q_pos[t],
    q_pos[t] - k_pos[s] < window        (with a sliding window),
    q_seg[t] == k_seg[s]                (with segment ids: both given, or both None).
Rows with no visible key give zeros. The same rule serves a full forward, a KV cache (empty slots
hold a position that is never <= any query), ring layouts (global positions) and packed rows of
several documents (segment ids; positions restart at 0 in each document, so causality is by
position within a segment: position bounds over a block stay safe but skip little across
documents, and a fast path that assumes index-ordered positions does not hold; implementations
bound segment ids too, or fall back to a general path). Without segment ids (None, a static
choice) no segment code is traced or compiled. Implementations equal `dense_attention` within
1e-5, outputs and gradients.

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim.
Blockwise: I query blocks of Q queries, J key blocks of C keys (T = I * Q, S = J * C after padding).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Position stored in empty KV-cache slots: larger than any real position, so always masked.
EMPTY_POSITION = 2**30

# Running max before any visible key: finite, so exp(m_old - m_new) never sees -inf - -inf.
M_INIT = -1e30


def causal_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None = None,
                q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None) -> jax.Array:
  """bool[B, T, S]: key s is visible to query t (the rule at the top of this file)."""
  diff_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  mask = diff_BTS >= 0
  if window is not None:
    mask &= diff_BTS < window
  if q_seg_BT is not None:
    mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
  return mask


def dense_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                    k_pos_BS: jax.Array, *, window: int | None = None,
                    q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                    **unused) -> jax.Array:
  """Reference causal grouped-query attention; materializes the [B, N, T, S] scores in f32.

  The G query heads of a kv head are stacked with the queries (M = G * T rows) so both products
  are plain batched matmuls over (B, K).
  """
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  logits_BKMS = jnp.einsum('BKMH,BSKH->BKMS', q_BKMH, k_BSKH,
                           preferred_element_type=jnp.float32) * (H ** -0.5)
  validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  mask_BTS = causal_mask(q_pos_BT, k_pos_BS, window, q_seg_BT, k_seg_BS)
  mask_B1MS = jnp.broadcast_to(mask_BTS[:, None, None],
                               (B, 1, G, T, S)).reshape(B, 1, G * T, S)
  logits_BKMS = jnp.where(mask_B1MS, logits_BKMS, -jnp.inf)
  probs_BKMS = jax.nn.softmax(logits_BKMS, axis=-1)
  probs_BKMS = jnp.where(mask_B1MS, probs_BKMS, 0.0)  # rows with no visible key give zeros
  out_BKMH = jnp.einsum('BKMS,BSKH->BKMH', probs_BKMS.astype(v_BSKH.dtype), v_BSKH,
                        preferred_element_type=jnp.float32)
  out_BTNH = out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
  return out_BTNH.astype(q_BTNH.dtype)


# ----------------------------------------------------------------------------- block sizes
# Block (blockwise, ring) and query-chunk (chunked) size by query length: per implementation,
# (longest length, size) pairs, the first that covers the length wins; other implementations use
# 'blockwise's. From `bench/attention.py --parts blocks` on the quiet 2-core Sapphire Rapids
# (bench/results/attention_blocks.json: one layer's f32 attention forward, demo and wide shapes,
# sizes 256-2048): blockwise 512 was fastest at 2K and 8K on both shapes (1024 tied on the demo
# at 8K, 7% slower on the wide one); at 16K 1024 won on the demo by 6% and lost on the wide one
# by 6%. Chunked: 512 was best or within 6% of best (256) everywhere up to 16K; longer sequences
# take 1024 so that the unrolled chunk loop stays short.
DEFAULT_BLOCKS: dict[str, tuple[tuple[int, int], ...]] = {
    'blockwise': ((8192, 512), (2**62, 1024)),
    'chunked': ((16384, 512), (2**62, 1024)),
}


def default_block(length: int, impl: str = 'blockwise') -> int:
  """The measured block size for `length` queries (ModelConfig.block_q / block_k left None)."""
  table = DEFAULT_BLOCKS.get(impl, DEFAULT_BLOCKS['blockwise'])
  return next(size for longest, size in table if length <= longest)


# ----------------------------------------------------------------------------- validation
def validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS) -> None:
  """Raises a ValueError naming the argument whose shape does not fit the others."""
  if q_BTNH.ndim != 4 or k_BSKH.ndim != 4:
    raise ValueError(f"q and k must be [B, T, N, H] and [B, S, K, H], got {q_BTNH.shape} and "
                     f"{k_BSKH.shape}.")
  B, T, N, H = q_BTNH.shape
  _, S, K, _ = k_BSKH.shape
  if k_BSKH.shape != (B, S, K, H) or v_BSKH.shape != k_BSKH.shape:
    raise ValueError(f"k and v must both be [B={B}, S, K, H={H}], got {k_BSKH.shape} and "
                     f"{v_BSKH.shape}.")
  if N % K:
    raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K}).")
  if q_pos_BT.shape != (B, T) or k_pos_BS.shape != (B, S):
    raise ValueError(f"positions must be q_pos [B, T] = {(B, T)} and k_pos [B, S] = {(B, S)}, "
                     f"got {q_pos_BT.shape} and {k_pos_BS.shape}.")


def validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS) -> None:
  """Segment ids are both None or both integer arrays shaped as their positions."""
  if (q_seg_BT is None) != (k_seg_BS is None):
    raise ValueError("q_seg_BT and k_seg_BS must be given together (both None: one document); "
                     f"got q_seg_BT {'None' if q_seg_BT is None else 'given'} and k_seg_BS "
                     f"{'None' if k_seg_BS is None else 'given'}.")
  if q_seg_BT is None:
    return
  for name, seg, pos in (('q_seg_BT', q_seg_BT, q_pos_BT), ('k_seg_BS', k_seg_BS, k_pos_BS)):
    if seg.shape != pos.shape or not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers shaped as its positions {pos.shape}, got "
                       f"{seg.dtype}{list(seg.shape)}.")


def validate_blocks(block_q: int, block_k: int, window: int | None = None) -> None:
  """Block sizes must be positive integers; a window, positive or None."""
  for name, value in (('block_q', block_q), ('block_k', block_k)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window must be a positive integer or None, got {window!r}.")


# ----------------------------------------------------------------------------- block schedule
def visible_blocks(q_pos_IBQ: jax.Array, k_pos_JBC: jax.Array, window: int | None,
                   q_seg_IBQ: jax.Array | None = None,
                   k_seg_JBC: jax.Array | None = None) -> jax.Array:
  """bool[I, J]: some query of block i may see some key of block j (from position bounds and,
  with segments, segment-id ranges that must overlap, per sequence: never a false negative)."""
  q_min_IB, q_max_IB = q_pos_IBQ.min(axis=2), q_pos_IBQ.max(axis=2)
  k_min_JB, k_max_JB = k_pos_JBC.min(axis=2), k_pos_JBC.max(axis=2)
  visible_IJB = k_min_JB[None] <= q_max_IB[:, None]
  if window is not None:
    visible_IJB &= q_min_IB[:, None] - k_max_JB[None] < window
  if q_seg_IBQ is not None:
    visible_IJB &= ((k_seg_JBC.min(axis=2)[None] <= q_seg_IBQ.max(axis=2)[:, None]) &
                    (q_seg_IBQ.min(axis=2)[:, None] <= k_seg_JBC.max(axis=2)[None]))
  return visible_IJB.any(axis=2)


def _loop_bounds(visible_IJ: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last visible j per row i (lo = hi when none)."""
  J = visible_IJ.shape[1]
  any_I = visible_IJ.any(axis=1)
  lo_I = jnp.where(any_I, jnp.argmax(visible_IJ, axis=1), 0)
  hi_I = jnp.where(any_I, J - jnp.argmax(visible_IJ[:, ::-1], axis=1), 0)
  return lo_I.astype(jnp.int32), hi_I.astype(jnp.int32)


class Blocks(NamedTuple):
  """Attention inputs cut into blocks; q is already multiplied by 1 / sqrt(H). Segment ids are
  None for one document per sequence."""

  q_IBKGQH: jax.Array
  k_JBKCH: jax.Array
  v_JBKCH: jax.Array
  q_pos_IBQ: jax.Array
  k_pos_JBC: jax.Array
  q_seg_IBQ: jax.Array | None = None
  k_seg_JBC: jax.Array | None = None


def _at(x: jax.Array | None, i) -> jax.Array | None:
  """x[i], or None for absent segment ids."""
  return None if x is None else x[i]


def to_blocks(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, block_q: int, block_k: int,
              q_seg_BT=None, k_seg_BS=None) -> Blocks:
  """Pads T and S to whole blocks (padded queries repeat the last position and segment, padded
  keys are EMPTY_POSITION and repeat the last segment) and moves block and head axes first."""
  B, T, N, H = q_BTNH.shape
  _, S, K, _ = k_BSKH.shape
  Q, C = min(block_q, T), min(block_k, S)
  I, J = -(-T // Q), -(-S // C)
  pad_q, pad_k = I * Q - T, J * C - S
  q_BTNH = jnp.pad(q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype),
                   ((0, 0), (0, pad_q), (0, 0), (0, 0)))
  q_pos_BT = jnp.pad(q_pos_BT, ((0, 0), (0, pad_q)), mode='edge')
  k_BSKH = jnp.pad(k_BSKH, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
  v_BSKH = jnp.pad(v_BSKH, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
  k_pos_BS = jnp.pad(k_pos_BS, ((0, 0), (0, pad_k)), constant_values=EMPTY_POSITION)
  q_seg_IBQ = k_seg_JBC = None
  if q_seg_BT is not None:
    q_seg_IBQ = jnp.pad(q_seg_BT.astype(jnp.int32), ((0, 0), (0, pad_q)), mode='edge').reshape(
        B, I, Q).transpose(1, 0, 2)
    k_seg_JBC = jnp.pad(k_seg_BS.astype(jnp.int32), ((0, 0), (0, pad_k)), mode='edge').reshape(
        B, J, C).transpose(1, 0, 2)
  return Blocks(
      q_IBKGQH=q_BTNH.reshape(B, I, Q, K, N // K, H).transpose(1, 0, 3, 4, 2, 5),
      k_JBKCH=k_BSKH.reshape(B, J, C, K, H).transpose(1, 0, 3, 2, 4),
      v_JBKCH=v_BSKH.reshape(B, J, C, K, H).transpose(1, 0, 3, 2, 4),
      q_pos_IBQ=q_pos_BT.reshape(B, I, Q).transpose(1, 0, 2),
      k_pos_JBC=k_pos_BS.reshape(B, J, C).transpose(1, 0, 2),
      q_seg_IBQ=q_seg_IBQ, k_seg_JBC=k_seg_JBC)


def from_blocks(out_IBKGQH: jax.Array, length: int) -> jax.Array:
  """Inverse of the query layout of `to_blocks`: [I, B, K, G, Q, H] -> [B, T, N, H]."""
  I, B, K, G, Q, H = out_IBKGQH.shape
  out_BTNH = out_IBKGQH.transpose(1, 0, 4, 2, 3, 5).reshape(B, I * Q, K * G, H)
  return out_BTNH[:, :length]


# ----------------------------------------------------------------------------- forward
class SoftmaxState(NamedTuple):
  """Online-softmax accumulators per query: running max m, sum l, unnormalized output acc."""

  m_IBKGQ: jax.Array
  l_IBKGQ: jax.Array
  acc_IBKGQH: jax.Array


def _full_like(x: jax.Array, shape, value: float) -> jax.Array:
  """f32 constant of `shape` that, like x, varies over manual mesh axes (inside shard_map a
  loop carry must keep one type)."""
  return lax.full_like(x, value, jnp.float32, shape)


def init_state(q_IBKGQH: jax.Array) -> SoftmaxState:
  shape = q_IBKGQH.shape
  return SoftmaxState(_full_like(q_IBKGQH, shape[:-1], M_INIT),
                      _full_like(q_IBKGQH, shape[:-1], 0.0), _full_like(q_IBKGQH, shape, 0.0))


def finalize(state: SoftmaxState) -> tuple[jax.Array, jax.Array]:
  """Normalized output f32[I, B, K, G, Q, H] and log-sum-exp (+inf where no key was visible)."""
  seen = state.l_IBKGQ > 0
  l_safe = jnp.where(seen, state.l_IBKGQ, 1.0)
  out = state.acc_IBKGQH / l_safe[..., None]
  lse = jnp.where(seen, state.m_IBKGQ + jnp.log(l_safe), jnp.inf)
  return out, lse


def _masked_scores(q_BKGQH, k_BKCH, q_pos_BQ, k_pos_BC, window, q_seg_BQ=None, k_seg_BC=None):
  """Logits f32[B, K, G, Q, C] with invisible keys at -inf, and the mask. (Masking every
  computed block costs no measurable time next to the exp; it keeps one loop body.)"""
  s_BKGQC = jnp.einsum('BKGQH,BKCH->BKGQC', q_BKGQH, k_BKCH, preferred_element_type=jnp.float32)
  mask_B11QC = causal_mask(q_pos_BQ, k_pos_BC, window, q_seg_BQ, k_seg_BC)[:, None, None]
  return jnp.where(mask_B11QC, s_BKGQC, -jnp.inf), mask_B11QC


def forward_blocks(blocks: Blocks, state: SoftmaxState, window: int | None) -> SoftmaxState:
  """Folds every visible key block into the online softmax of every query block.

  Query block i loops over key blocks lo_i..hi_i - 1, its first and last visible ones (a
  triangle, or a band with a window, for ordered positions); invisible blocks in between
  (unordered positions) are skipped by a cond.
  """
  visible_IJ = visible_blocks(blocks.q_pos_IBQ, blocks.k_pos_JBC, window, blocks.q_seg_IBQ,
                              blocks.k_seg_JBC)
  lo_I, hi_I = _loop_bounds(visible_IJ)
  k_JBKCH, v_JBKCH, k_pos_JBC = blocks.k_JBKCH, blocks.v_JBKCH, blocks.k_pos_JBC
  k_seg_JBC = blocks.k_seg_JBC

  def row(_, xs):
    q_BKGQH, q_pos_BQ, q_seg_BQ, visible_J, lo, hi, m_BKGQ, l_BKGQ, acc_BKGQH = xs

    def update(j, carry):
      m_BKGQ, l_BKGQ, acc_BKGQH = carry
      v_BKCH = v_JBKCH[j]
      s_BKGQC, _ = _masked_scores(q_BKGQH, k_JBKCH[j], q_pos_BQ, k_pos_JBC[j], window, q_seg_BQ,
                                  _at(k_seg_JBC, j))
      m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(axis=-1))
      p_BKGQC = jnp.exp(s_BKGQC - m_new[..., None])
      corr_BKGQ = jnp.exp(m_BKGQ - m_new)
      l_new = l_BKGQ * corr_BKGQ + p_BKGQC.sum(axis=-1)
      pv_BKGQH = jnp.einsum('BKGQC,BKCH->BKGQH', p_BKGQC.astype(v_BKCH.dtype), v_BKCH,
                            preferred_element_type=jnp.float32)
      return m_new, l_new, acc_BKGQH * corr_BKGQ[..., None] + pv_BKGQH

    carry = lax.fori_loop(lo, hi, lambda j, carry: lax.cond(visible_J[j], update, _keep, j, carry),
                          (m_BKGQ, l_BKGQ, acc_BKGQH))
    return None, carry

  _, new = lax.scan(row, None, (blocks.q_IBKGQH, blocks.q_pos_IBQ, blocks.q_seg_IBQ, visible_IJ,
                                lo_I, hi_I, *state))
  return SoftmaxState(*new)


def _keep(_, carry):
  return carry


# ----------------------------------------------------------------------------- backward
def backward_blocks(blocks: Blocks, lse_IBKGQ: jax.Array, delta_IBKGQ: jax.Array,
                    do_IBKGQH: jax.Array, window: int | None):
  """Flash-attention-2 backward (Dao, 2023): recomputes p = exp(s - lse) block by block, key
  blocks outside, visible query blocks inside. delta = rowsum(dout * out).

  Returns f32 (dq for the scaled q, dk, dv) in block layout.
  """
  visible_JI = visible_blocks(blocks.q_pos_IBQ, blocks.k_pos_JBC, window, blocks.q_seg_IBQ,
                              blocks.k_seg_JBC).T
  lo_J, hi_J = _loop_bounds(visible_JI)
  q_IBKGQH, q_pos_IBQ, q_seg_IBQ = blocks.q_IBKGQH, blocks.q_pos_IBQ, blocks.q_seg_IBQ

  def column(dq_IBKGQH, xs):
    k_BKCH, v_BKCH, k_pos_BC, k_seg_BC, visible_I, lo, hi = xs

    def update(i, carry):
      dq_IBKGQH, dk_BKCH, dv_BKCH = carry
      q_BKGQH, do_BKGQH = q_IBKGQH[i], do_IBKGQH[i]
      s_BKGQC, mask_B11QC = _masked_scores(q_BKGQH, k_BKCH, q_pos_IBQ[i], k_pos_BC, window,
                                           _at(q_seg_IBQ, i), k_seg_BC)
      p_BKGQC = jnp.where(mask_B11QC, jnp.exp(s_BKGQC - lse_IBKGQ[i][..., None]), 0.0)
      dv_BKCH += jnp.einsum('BKGQC,BKGQH->BKCH', p_BKGQC.astype(do_BKGQH.dtype), do_BKGQH,
                            preferred_element_type=jnp.float32)
      dp_BKGQC = jnp.einsum('BKGQH,BKCH->BKGQC', do_BKGQH, v_BKCH,
                            preferred_element_type=jnp.float32)
      ds_BKGQC = (p_BKGQC * (dp_BKGQC - delta_IBKGQ[i][..., None])).astype(q_BKGQH.dtype)
      dq_BKGQH = jnp.einsum('BKGQC,BKCH->BKGQH', ds_BKGQC, k_BKCH,
                            preferred_element_type=jnp.float32)
      dq_IBKGQH = dq_IBKGQH.at[i].add(dq_BKGQH)
      dk_BKCH += jnp.einsum('BKGQC,BKGQH->BKCH', ds_BKGQC, q_BKGQH,
                            preferred_element_type=jnp.float32)
      return dq_IBKGQH, dk_BKCH, dv_BKCH

    zeros_BKCH = _full_like(q_IBKGQH, k_BKCH.shape, 0.0)
    dq_IBKGQH, dk_BKCH, dv_BKCH = lax.fori_loop(
        lo, hi, lambda i, carry: lax.cond(visible_I[i], update, _keep, i, carry),
        (dq_IBKGQH, zeros_BKCH, zeros_BKCH))
    return dq_IBKGQH, (dk_BKCH, dv_BKCH)

  dq_IBKGQH, (dk_JBKCH, dv_JBKCH) = lax.scan(
      column, _full_like(q_IBKGQH, q_IBKGQH.shape, 0.0),
      (blocks.k_JBKCH, blocks.v_JBKCH, blocks.k_pos_JBC, blocks.k_seg_JBC, visible_JI, lo_J, hi_J))
  return dq_IBKGQH, dk_JBKCH, dv_JBKCH


# ----------------------------------------------------------------------------- blockwise
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _blockwise(blocks: Blocks, window: int | None) -> jax.Array:
  out_IBKGQH, _ = finalize(forward_blocks(blocks, init_state(blocks.q_IBKGQH), window))
  return out_IBKGQH.astype(blocks.q_IBKGQH.dtype)


def _blockwise_fwd(blocks, window):
  out_IBKGQH, lse_IBKGQ = finalize(forward_blocks(blocks, init_state(blocks.q_IBKGQH), window))
  out_IBKGQH = out_IBKGQH.astype(blocks.q_IBKGQH.dtype)
  return out_IBKGQH, (blocks, out_IBKGQH, lse_IBKGQ)


def _blockwise_bwd(window, residuals, do_IBKGQH):
  blocks, out_IBKGQH, lse_IBKGQ = residuals
  delta_IBKGQ = jnp.einsum('IBKGQH,IBKGQH->IBKGQ', do_IBKGQH.astype(jnp.float32),
                           out_IBKGQH.astype(jnp.float32))
  dq, dk, dv = backward_blocks(blocks, lse_IBKGQ, delta_IBKGQ, do_IBKGQH, window)
  return (Blocks(dq.astype(blocks.q_IBKGQH.dtype), dk.astype(blocks.k_JBKCH.dtype),
                 dv.astype(blocks.v_JBKCH.dtype), None, None, None, None),)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                        q_pos_BT: jax.Array, k_pos_BS: jax.Array, *, window: int | None = None,
                        block_q: int = 512, block_k: int = 512,
                        q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                        **unused) -> jax.Array:
  """Memory-efficient causal GQA: online softmax over key blocks (Rabe & Staats, 2021; Dao et
  al., 2022), blocks skipped by position and segment bounds, peak memory O(T * block). Same
  result as dense."""
  validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  validate_blocks(block_q, block_k, window)
  blocks = to_blocks(q_BTNH, k_BSKH, v_BSKH, q_pos_BT.astype(jnp.int32),
                     k_pos_BS.astype(jnp.int32), block_q, block_k, q_seg_BT, k_seg_BS)
  return from_blocks(_blockwise(blocks, window), q_BTNH.shape[1])


# ----------------------------------------------------------------------------- fused
def fused_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                    k_pos_BS: jax.Array, *, window: int | None = None,
                    q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                    **unused) -> jax.Array:
  """`jax.nn.dot_product_attention` with the position (and segment) mask: cuDNN flash attention
  on a GPU for bf16 / f16 inputs, XLA elsewhere. Materializes a bool[B, 1, T, S] mask; rows with
  no visible key (which jax averages every value over) are set to zeros."""
  validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  on_gpu = jax.default_backend() == 'gpu' and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
  mask_BTS = causal_mask(q_pos_BT, k_pos_BS, window, q_seg_BT, k_seg_BS)
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                          implementation='cudnn' if on_gpu else 'xla')
  return jnp.where(mask_BTS.any(axis=-1)[:, :, None, None], out_BTNH, 0).astype(q_BTNH.dtype)
