"""Query-chunked causal attention: exact softmax per chunk of queries against only the keys the
chunk may see, for a forward over a sorted sequence; any other input runs blockwise attention.

Same contract as attention.py (positions, window, segment ids; equal to dense). Shapes as there;
M = G * C rows of a chunk of C queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from longrope_jax import attention as attention_lib


def ordered_positions(q_pos_BT: jax.Array, k_pos_BS: jax.Array, q_seg_BT: jax.Array | None = None,
                      k_seg_BS: jax.Array | None = None) -> jax.Array:
  """bool[]: keys strictly increase and the queries are the last T keys (a forward over a
  contiguous, sorted sequence): then key s is visible to query t only if s <= S - T + t, and with
  a window only if s > S - T + t - window. With segment ids, keys strictly increase by (segment,
  position) (packed documents in order, positions increasing within each), which keeps both
  bounds; the segment mask then applies to every key a chunk reads."""
  T, S = q_pos_BT.shape[1], k_pos_BS.shape[1]
  if q_seg_BT is None:
    return (jnp.all(k_pos_BS[:, 1:] > k_pos_BS[:, :-1]) &
            jnp.all(q_pos_BT == k_pos_BS[:, S - T:]))
  seg_up = k_seg_BS[:, 1:] > k_seg_BS[:, :-1]
  pos_up = (k_seg_BS[:, 1:] == k_seg_BS[:, :-1]) & (k_pos_BS[:, 1:] > k_pos_BS[:, :-1])
  return (jnp.all(seg_up | pos_up) & jnp.all(q_pos_BT == k_pos_BS[:, S - T:]) &
          jnp.all(q_seg_BT == k_seg_BS[:, S - T:]))


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


def _rows_mask(mask_BCS: jax.Array, G: int) -> jax.Array:
  """bool[B, C, S] -> bool[B, 1, M, S], the mask of each of the G heads' rows."""
  B, C, S = mask_BCS.shape
  return jnp.broadcast_to(mask_BCS[:, None, None], (B, 1, G, C, S)).reshape(B, 1, G * C, S)


def _chunk_scores(q_BKMH, k_BKSH, q_pos_BC, k_pos_BS, G, lo, mid, end, window, q_seg_BC=None,
                  k_seg_BS=None):
  """Logits of one query chunk (M = G * C rows, q already scaled): keys [lo, mid), all visible
  by position (masked by segment only, with segment ids), and keys [mid, end), masked; both f32
  with invisible keys at -inf, and their masks bool[B, 1, M, keys] (the first None without
  segment ids)."""
  s_full = jnp.einsum('BKMH,BKSH->BKMS', q_BKMH, k_BKSH[:, :, lo:mid],
                      preferred_element_type=jnp.float32)
  s_diag = jnp.einsum('BKMH,BKSH->BKMS', q_BKMH, k_BKSH[:, :, mid:end],
                      preferred_element_type=jnp.float32)
  mask_full = None
  if q_seg_BC is not None:
    mask_full = _rows_mask(q_seg_BC[:, :, None] == k_seg_BS[:, None, lo:mid], G)
    s_full = jnp.where(mask_full, s_full, -jnp.inf)
    k_seg_BS = k_seg_BS[:, mid:end]
  mask_diag = _rows_mask(attention_lib.causal_mask(q_pos_BC, k_pos_BS[:, mid:end], window,
                                                   q_seg_BC, k_seg_BS), G)
  return s_full, jnp.where(mask_diag, s_diag, -jnp.inf), mask_full, mask_diag


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


def _seg(seg_BT: jax.Array | None, a: int, b: int) -> jax.Array | None:
  return None if seg_BT is None else seg_BT[:, a:b]


def _chunked_forward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, window,
                     chunk):
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
    s_full, s_diag, _, _ = _chunk_scores(q_BKMH, k_BKSH, q_pos_BT[:, a:b], k_pos_BS, G, lo, mid,
                                         end, window, _seg(q_seg_BT, a, b), k_seg_BS)
    m_BKM = jnp.maximum(s_full.max(axis=-1, initial=attention_lib.M_INIT),
                        s_diag.max(axis=-1))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _chunked(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, window, chunk):
  out_BKGTH, _ = _chunked_forward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS,
                                  window, chunk)
  return _to_BTNH(out_BKGTH).astype(q_BTNH.dtype)


def _chunked_fwd(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, window, chunk):
  out_BKGTH, lse_BKGT = _chunked_forward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT,
                                         k_seg_BS, window, chunk)
  out_BTNH = _to_BTNH(out_BKGTH).astype(q_BTNH.dtype)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, out_BTNH,
                    lse_BKGT)


def _chunked_bwd(window, chunk, residuals, do_BTNH):
  """Flash-attention-2 backward per query chunk: p = exp(s - lse) recomputed, dq of the chunk
  written once, dk and dv accumulated over the chunk's key range."""
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, out_BTNH, lse_BKGT = residuals
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
    s_full, s_diag, mask_full, mask_diag = _chunk_scores(
        q_BKMH, k_BKSH, q_pos_BT[:, a:b], k_pos_BS, G, lo, mid, end, window, _seg(q_seg_BT, a, b),
        k_seg_BS)
    dq_BKMH = jnp.zeros(q_BKMH.shape, jnp.float32)
    for s_BKMS, start, stop, mask in ((s_full, lo, mid, mask_full), (s_diag, mid, end, mask_diag)):
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
          dv_BSKH.astype(v_BSKH.dtype), None, None, None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                      q_pos_BT: jax.Array, k_pos_BS: jax.Array, *, window: int | None = None,
                      block_q: int = 512, block_k: int = 512,
                      q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                      **unused) -> jax.Array:
  """Query-chunked causal GQA: a static loop over chunks of `block_q` queries, each one batched
  dot over all heads and GQA groups (M = G * block_q rows) against only the keys it may see,
  the mask applied on the diagonal part only. Exact softmax per chunk, peak memory
  O(block_q * S). Taken when positions are ordered (`ordered_positions`, checked at run time:
  packed documents in order with positions restarting are ordered by segment); other positions
  (ring layouts, shuffled, a KV cache) run `blockwise_attention` instead, so the result is
  dense's for any positions."""
  attention_lib.validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  attention_lib.validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  attention_lib.validate_blocks(block_q, block_k, window)
  q_pos_BT, k_pos_BS = q_pos_BT.astype(jnp.int32), k_pos_BS.astype(jnp.int32)
  if q_seg_BT is not None:
    q_seg_BT, k_seg_BS = q_seg_BT.astype(jnp.int32), k_seg_BS.astype(jnp.int32)

  def general(q, k, v, q_pos, k_pos, q_seg, k_seg):
    return attention_lib.blockwise_attention(q, k, v, q_pos, k_pos, window=window,
                                             block_q=block_q, block_k=block_k, q_seg_BT=q_seg,
                                             k_seg_BS=k_seg)

  args = (q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  if q_BTNH.shape[1] > k_BSKH.shape[1]:
    return general(*args)
  ordered = lambda *args: _chunked(*args, window, block_q)
  return lax.cond(ordered_positions(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS), ordered, general,
                  *args)
