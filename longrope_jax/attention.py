"""Causal attention over explicit positions: dense reference, blockwise and fused kernels.

Masking is by positions, never by array index: query t sees key s when k_pos[s] <= q_pos[t]
(and q_pos[t] - k_pos[s] < window with a sliding window). The same rule serves a full forward,
a KV cache (empty slots hold a position that is never <= any query) and ring layouts (global
positions).

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim.
Blockwise: I query blocks of Q queries, J key blocks of C keys (T = I * Q, S = J * C after padding).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Position stored in empty KV-cache slots: larger than any real position, so always masked.
EMPTY_POSITION = 2**30

# Running max before any visible key: finite, so exp(m_old - m_new) never sees -inf - -inf.
_M_INIT = -1e30


def causal_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None = None) -> jax.Array:
  """bool[B, T, S]: key s is visible to query t."""
  diff_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  mask = diff_BTS >= 0
  if window is not None:
    mask &= diff_BTS < window
  return mask


def dense_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                    k_pos_BS: jax.Array, *, window: int | None = None, **unused) -> jax.Array:
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
  mask_B1MS = jnp.broadcast_to(causal_mask(q_pos_BT, k_pos_BS, window)[:, None, None],
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


def validate_blocks(block_q: int, block_k: int, window: int | None = None) -> None:
  """Block sizes must be positive integers; a window, positive or None."""
  for name, value in (('block_q', block_q), ('block_k', block_k)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window must be a positive integer or None, got {window!r}.")


# ----------------------------------------------------------------------------- block schedule
def visible_blocks(q_pos_IBQ: jax.Array, k_pos_JBC: jax.Array, window: int | None) -> jax.Array:
  """bool[I, J]: some query of block i may see some key of block j (from position bounds over
  the whole batch, so never a false negative)."""
  q_min_I, q_max_I = q_pos_IBQ.min(axis=(1, 2)), q_pos_IBQ.max(axis=(1, 2))
  k_min_J, k_max_J = k_pos_JBC.min(axis=(1, 2)), k_pos_JBC.max(axis=(1, 2))
  visible_IJ = k_min_J[None, :] <= q_max_I[:, None]
  if window is not None:
    visible_IJ &= q_min_I[:, None] - k_max_J[None, :] < window
  return visible_IJ


def _loop_bounds(visible_IJ: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last visible j per row i (lo = hi when none)."""
  J = visible_IJ.shape[1]
  any_I = visible_IJ.any(axis=1)
  lo_I = jnp.where(any_I, jnp.argmax(visible_IJ, axis=1), 0)
  hi_I = jnp.where(any_I, J - jnp.argmax(visible_IJ[:, ::-1], axis=1), 0)
  return lo_I.astype(jnp.int32), hi_I.astype(jnp.int32)


class Blocks(NamedTuple):
  """Attention inputs cut into blocks; q is already multiplied by 1 / sqrt(H)."""

  q_IBKGQH: jax.Array
  k_JBKCH: jax.Array
  v_JBKCH: jax.Array
  q_pos_IBQ: jax.Array
  k_pos_JBC: jax.Array


def to_blocks(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, block_q: int, block_k: int) -> Blocks:
  """Pads T and S to whole blocks (padded queries repeat the last position, padded keys are
  EMPTY_POSITION) and moves block and head axes first."""
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
  return Blocks(
      q_IBKGQH=q_BTNH.reshape(B, I, Q, K, N // K, H).transpose(1, 0, 3, 4, 2, 5),
      k_JBKCH=k_BSKH.reshape(B, J, C, K, H).transpose(1, 0, 3, 2, 4),
      v_JBKCH=v_BSKH.reshape(B, J, C, K, H).transpose(1, 0, 3, 2, 4),
      q_pos_IBQ=q_pos_BT.reshape(B, I, Q).transpose(1, 0, 2),
      k_pos_JBC=k_pos_BS.reshape(B, J, C).transpose(1, 0, 2))


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
  return SoftmaxState(_full_like(q_IBKGQH, shape[:-1], _M_INIT),
                      _full_like(q_IBKGQH, shape[:-1], 0.0), _full_like(q_IBKGQH, shape, 0.0))


def finalize(state: SoftmaxState) -> tuple[jax.Array, jax.Array]:
  """Normalized output f32[I, B, K, G, Q, H] and log-sum-exp (+inf where no key was visible)."""
  seen = state.l_IBKGQ > 0
  l_safe = jnp.where(seen, state.l_IBKGQ, 1.0)
  out = state.acc_IBKGQH / l_safe[..., None]
  lse = jnp.where(seen, state.m_IBKGQ + jnp.log(l_safe), jnp.inf)
  return out, lse


def _masked_scores(q_BKGQH, k_BKCH, q_pos_BQ, k_pos_BC, window):
  """Logits f32[B, K, G, Q, C] with invisible keys at -inf, and the mask. (Masking every
  computed block costs no measurable time next to the exp; it keeps one loop body.)"""
  s_BKGQC = jnp.einsum('BKGQH,BKCH->BKGQC', q_BKGQH, k_BKCH, preferred_element_type=jnp.float32)
  mask_B11QC = causal_mask(q_pos_BQ, k_pos_BC, window)[:, None, None]
  return jnp.where(mask_B11QC, s_BKGQC, -jnp.inf), mask_B11QC


def forward_blocks(blocks: Blocks, state: SoftmaxState, window: int | None) -> SoftmaxState:
  """Folds every visible key block into the online softmax of every query block.

  Query block i loops over key blocks lo_i..hi_i - 1, its first and last visible ones (a
  triangle, or a band with a window, for ordered positions); invisible blocks in between
  (unordered positions) are skipped by a cond.
  """
  visible_IJ = visible_blocks(blocks.q_pos_IBQ, blocks.k_pos_JBC, window)
  lo_I, hi_I = _loop_bounds(visible_IJ)
  k_JBKCH, v_JBKCH, k_pos_JBC = blocks.k_JBKCH, blocks.v_JBKCH, blocks.k_pos_JBC

  def row(_, xs):
    q_BKGQH, q_pos_BQ, visible_J, lo, hi, m_BKGQ, l_BKGQ, acc_BKGQH = xs

    def update(j, carry):
      m_BKGQ, l_BKGQ, acc_BKGQH = carry
      v_BKCH = v_JBKCH[j]
      s_BKGQC, _ = _masked_scores(q_BKGQH, k_JBKCH[j], q_pos_BQ, k_pos_JBC[j], window)
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

  _, new = lax.scan(row, None, (blocks.q_IBKGQH, blocks.q_pos_IBQ, visible_IJ, lo_I, hi_I, *state))
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
  visible_JI = visible_blocks(blocks.q_pos_IBQ, blocks.k_pos_JBC, window).T
  lo_J, hi_J = _loop_bounds(visible_JI)
  q_IBKGQH, q_pos_IBQ = blocks.q_IBKGQH, blocks.q_pos_IBQ

  def column(dq_IBKGQH, xs):
    k_BKCH, v_BKCH, k_pos_BC, visible_I, lo, hi = xs

    def update(i, carry):
      dq_IBKGQH, dk_BKCH, dv_BKCH = carry
      q_BKGQH, do_BKGQH = q_IBKGQH[i], do_IBKGQH[i]
      s_BKGQC, mask_B11QC = _masked_scores(q_BKGQH, k_BKCH, q_pos_IBQ[i], k_pos_BC, window)
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
      (blocks.k_JBKCH, blocks.v_JBKCH, blocks.k_pos_JBC, visible_JI, lo_J, hi_J))
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
                 dv.astype(blocks.v_JBKCH.dtype), None, None),)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                        q_pos_BT: jax.Array, k_pos_BS: jax.Array, *, window: int | None = None,
                        block_q: int = 512, block_k: int = 512, **unused) -> jax.Array:
  """Memory-efficient causal GQA: online softmax over key blocks (Rabe & Staats, 2021; Dao et
  al., 2022), invisible blocks skipped, peak memory O(T * block). Same result as dense."""
  validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  validate_blocks(block_q, block_k, window)
  blocks = to_blocks(q_BTNH, k_BSKH, v_BSKH, q_pos_BT.astype(jnp.int32),
                     k_pos_BS.astype(jnp.int32), block_q, block_k)
  return from_blocks(_blockwise(blocks, window), q_BTNH.shape[1])


# ----------------------------------------------------------------------------- fused
def fused_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                    k_pos_BS: jax.Array, *, window: int | None = None, **unused) -> jax.Array:
  """`jax.nn.dot_product_attention` with the position mask: cuDNN flash attention on a GPU for
  bf16 / f16 inputs, XLA elsewhere. Materializes a bool[B, 1, T, S] mask."""
  on_gpu = jax.default_backend() == 'gpu' and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
  mask_B1TS = causal_mask(q_pos_BT, k_pos_BS, window)[:, None]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS,
                                      implementation='cudnn' if on_gpu else 'xla')


# ----------------------------------------------------------------------------- query-chunked
def ordered_positions(q_pos_BT: jax.Array, k_pos_BS: jax.Array) -> jax.Array:
  """bool[]: keys strictly increase and the queries are the last T keys (a forward over a
  contiguous, sorted sequence): then key s is visible to query t only if s <= S - T + t, and with
  a window only if s > S - T + t - window."""
  T, S = q_pos_BT.shape[1], k_pos_BS.shape[1]
  return (jnp.all(k_pos_BS[:, 1:] > k_pos_BS[:, :-1]) &
          jnp.all(q_pos_BT == k_pos_BS[:, S - T:]))


def chunk_ranges(T: int, S: int, chunk: int, window: int | None) -> list[tuple[int, int, int, int]]:
  """Static schedule for ordered positions: (a, b, lo, mid) per query chunk [a, b), with
  keys [lo, mid) fully visible (no mask; empty with a window) and keys [mid, S - T + b) masked."""
  offset, ranges = S - T, []
  for a in range(0, T, chunk):
    b = min(a + chunk, T)
    lo = 0 if window is None else max(0, offset + a - window + 1)
    mid = offset + a if window is None else lo
    ranges.append((a, b, lo, mid))
  return ranges


def _chunk_scores(q_BKMH, k_BKSH, q_pos_BC, k_pos_BS, G, lo, mid, end, window):
  """Logits of one query chunk (M = G * C rows, q already scaled): unmasked [lo, mid) and
  masked [mid, end), both f32, and the mask of the second part bool[B, 1, M, end - mid]."""
  s_full = jnp.einsum('BKMH,BKSH->BKMS', q_BKMH, k_BKSH[:, :, lo:mid],
                      preferred_element_type=jnp.float32)
  s_diag = jnp.einsum('BKMH,BKSH->BKMS', q_BKMH, k_BKSH[:, :, mid:end],
                      preferred_element_type=jnp.float32)
  B, C = q_pos_BC.shape
  mask_BCS = causal_mask(q_pos_BC, k_pos_BS[:, mid:end], window)
  mask_B1MS = jnp.broadcast_to(mask_BCS[:, None, None], (B, 1, G, C, end - mid)).reshape(
      B, 1, G * C, end - mid)
  return s_full, jnp.where(mask_B1MS, s_diag, -jnp.inf), mask_B1MS


def _chunk_layout(q_BTNH, k_BSKH, v_BSKH):
  """q scaled by 1 / sqrt(H) as [B, K, G, T, H]; k and v as [B, K, S, H]."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BKGTH = (q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype)).reshape(B, T, K, N // K, H)
  return (q_BKGTH.transpose(0, 2, 3, 1, 4), k_BSKH.transpose(0, 2, 1, 3),
          v_BSKH.transpose(0, 2, 1, 3))


def _rows(x_BKGCH):
  B, K, G, C, H = x_BKGCH.shape
  return x_BKGCH.reshape(B, K, G * C, H)


def _after(x: jax.Array, previous: list) -> jax.Array:
  """x, made to depend on the last of `previous` (x + 0 * one element of it), so chunks run one
  after another and XLA frees each chunk's scores before the next. Without it XLA:CPU kept every
  chunk's scores live at once (demo shape, 16K: 1.2 GiB of temp instead of 0.18 GiB), and
  `lax.optimization_barrier` did not order them. A non-finite `previous` spreads to x."""
  if not previous:
    return x
  return x + jnp.zeros((), x.dtype) * previous[-1].ravel()[0].astype(x.dtype)


def _chunked_forward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window, chunk):
  """out f32[B, K, G, T, H] and lse f32[B, K, G, T] of ordered positions, one query chunk at a
  time against only the keys it may see."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  q_BKGTH, k_BKSH, v_BKSH = _chunk_layout(q_BTNH, k_BSKH, v_BSKH)
  outs, lses = [], []
  for a, b, lo, mid in chunk_ranges(T, S, chunk, window):
    end = S - T + b
    q_BKMH = _after(_rows(q_BKGTH[:, :, :, a:b]), outs)
    s_full, s_diag, _ = _chunk_scores(q_BKMH, k_BKSH, q_pos_BT[:, a:b], k_pos_BS, G, lo, mid, end,
                                      window)
    m_BKM = jnp.maximum(s_full.max(axis=-1, initial=_M_INIT), s_diag.max(axis=-1))
    p_full = jnp.exp(s_full - m_BKM[..., None])
    p_diag = jnp.exp(s_diag - m_BKM[..., None])
    l_BKM = p_full.sum(axis=-1) + p_diag.sum(axis=-1)
    dt = v_BSKH.dtype
    out_BKMH = (jnp.einsum('BKMS,BKSH->BKMH', p_full.astype(dt), v_BKSH[:, :, lo:mid],
                           preferred_element_type=jnp.float32) +
                jnp.einsum('BKMS,BKSH->BKMH', p_diag.astype(dt), v_BKSH[:, :, mid:end],
                           preferred_element_type=jnp.float32))
    outs.append((out_BKMH / l_BKM[..., None]).reshape(B, K, G, b - a, H))
    lses.append((m_BKM + jnp.log(l_BKM)).reshape(B, K, G, b - a))
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def _to_BTNH(x_BKGTH):
  B, K, G, T, H = x_BKGTH.shape
  return x_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window, chunk):
  out_BKGTH, _ = _chunked_forward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window, chunk)
  return _to_BTNH(out_BKGTH).astype(q_BTNH.dtype)


def _chunked_fwd(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window, chunk):
  out_BKGTH, lse_BKGT = _chunked_forward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window,
                                         chunk)
  out_BTNH = _to_BTNH(out_BKGTH).astype(q_BTNH.dtype)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, out_BTNH, lse_BKGT)


def _chunked_bwd(window, chunk, residuals, do_BTNH):
  """Flash-attention-2 backward per query chunk: p = exp(s - lse) recomputed, dq of the chunk
  written once, dk and dv accumulated over the chunk's key range."""
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, out_BTNH, lse_BKGT = residuals
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  q_BKGTH, k_BKSH, v_BKSH = _chunk_layout(q_BTNH, k_BSKH, v_BSKH)
  do_BKGTH = do_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
  delta_BKGT = jnp.einsum('BTNH,BTNH->BTN', do_BTNH.astype(jnp.float32),
                          out_BTNH.astype(jnp.float32)).reshape(B, T, K, G).transpose(0, 2, 3, 1)
  dk_BKSH = jnp.zeros((B, K, S, H), jnp.float32)
  dv_BKSH = jnp.zeros((B, K, S, H), jnp.float32)
  dqs = []
  for a, b, lo, mid in chunk_ranges(T, S, chunk, window):
    end = S - T + b
    q_BKMH, do_BKMH = _rows(q_BKGTH[:, :, :, a:b]), _rows(do_BKGTH[:, :, :, a:b])
    q_BKMH = _after(q_BKMH, dqs)
    lse_BKM = lse_BKGT[:, :, :, a:b].reshape(B, K, -1, 1)
    delta_BKM = delta_BKGT[:, :, :, a:b].reshape(B, K, -1, 1)
    s_full, s_diag, mask_B1MS = _chunk_scores(q_BKMH, k_BKSH, q_pos_BT[:, a:b], k_pos_BS, G,
                                              lo, mid, end, window)
    dq_BKMH = jnp.zeros(q_BKMH.shape, jnp.float32)
    for s_BKMS, start, stop, mask in ((s_full, lo, mid, None), (s_diag, mid, end, mask_B1MS)):
      if stop == start:
        continue
      p_BKMS = jnp.exp(s_BKMS - lse_BKM)
      if mask is not None:
        p_BKMS = jnp.where(mask, p_BKMS, 0.0)
      k_part, v_part = k_BKSH[:, :, start:stop], v_BKSH[:, :, start:stop]
      dv_BKSH = dv_BKSH.at[:, :, start:stop].add(jnp.einsum(
          'BKMS,BKMH->BKSH', p_BKMS.astype(do_BKMH.dtype), do_BKMH,
          preferred_element_type=jnp.float32))
      dp_BKMS = jnp.einsum('BKMH,BKSH->BKMS', do_BKMH, v_part, preferred_element_type=jnp.float32)
      ds_BKMS = (p_BKMS * (dp_BKMS - delta_BKM)).astype(q_BKMH.dtype)
      dq_BKMH += jnp.einsum('BKMS,BKSH->BKMH', ds_BKMS, k_part, preferred_element_type=jnp.float32)
      dk_BKSH = dk_BKSH.at[:, :, start:stop].add(jnp.einsum(
          'BKMS,BKMH->BKSH', ds_BKMS, q_BKMH, preferred_element_type=jnp.float32))
    dqs.append(dq_BKMH.reshape(B, K, G, b - a, H))
  dq_BTNH = _to_BTNH(jnp.concatenate(dqs, axis=3)) * (H ** -0.5)
  dk_BSKH, dv_BSKH = dk_BKSH.transpose(0, 2, 1, 3), dv_BKSH.transpose(0, 2, 1, 3)
  return (dq_BTNH.astype(q_BTNH.dtype), dk_BSKH.astype(k_BSKH.dtype),
          dv_BSKH.astype(v_BSKH.dtype), None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                      q_pos_BT: jax.Array, k_pos_BS: jax.Array, *, window: int | None = None,
                      block_q: int = 512, block_k: int = 512, **unused) -> jax.Array:
  """Query-chunked causal GQA: a static loop over chunks of `block_q` queries, each one batched
  dot over all heads and GQA groups (M = G * block_q rows) against only the keys it may see,
  the mask applied on the diagonal part only. Exact softmax per chunk, peak memory
  O(block_q * S). Taken when positions are ordered (`ordered_positions`, checked at run time);
  other positions (ring layouts, shuffled, a KV cache) run `blockwise_attention` instead, so the
  result is dense's for any positions."""
  validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  validate_blocks(block_q, block_k, window)
  q_pos_BT, k_pos_BS = q_pos_BT.astype(jnp.int32), k_pos_BS.astype(jnp.int32)
  general = functools.partial(blockwise_attention, window=window, block_q=block_q,
                              block_k=block_k)
  if q_BTNH.shape[1] > k_BSKH.shape[1]:
    return general(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  ordered = lambda q, k, v, q_pos, k_pos: _chunked(q, k, v, q_pos, k_pos, window, block_q)
  return lax.cond(ordered_positions(q_pos_BT, k_pos_BS), ordered, general,
                  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
