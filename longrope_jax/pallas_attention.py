"""Flash attention for GPUs in Pallas (Triton backend), masking by explicit positions.

Same contract as attention.py: query t sees key s iff k_pos[s] <= q_pos[t], q_pos[t] - k_pos[s] <
window (with a sliding window) and q_seg[t] == k_seg[s] (with segment ids); rows with no visible
key give zeros; GQA (the G query heads of a kv head read the same key block). Forward: one
program per (query block, sequence, query head) folds key blocks into an online softmax (Dao et
al., 2022). Backward (Dao, 2023, flash-attention-2): one kernel for dK, dV per (key block,
sequence, kv head), looping over query blocks and the group's G heads; one for dQ per query block.
Each query (key) block loops only over the key (query) blocks between its first and last visible
one, from per-sequence bounds of positions and segment ids computed outside the kernel: exact for
ordered positions, zigzag ring shards and packed documents; unordered positions also compute the
masked blocks in between (correct, slower).

Triton, not Mosaic GPU, for now: a Mosaic GPU kernel (warpgroup MMA, TMA) would be faster on
Hopper, but its public API differs between jax 0.10.2 and 0.11.2 (transform_ref removed,
transpose_ref deprecated) and its interpret mode is private in 0.10.2 (InterpretGPUParams is
public from 0.11), so it could be neither written once for both nor tested here. The Triton
backend has the same public API in both, runs in interpret mode here and lowers for 'cuda' on a
CPU-only jaxlib 0.10.2. jax 0.11 deprecates it (a warning at lowering; it still works): porting
these kernels to Mosaic GPU is the next step once the project moves past 0.10.

Off the GPU the kernels run in Pallas interpret mode (`interpret=None` chooses it): correct and
slow, for tests. `flash_forward` / `flash_backward` expose (out, lse) and the backward given lse
for ring attention's per-step kernel (ring_steps.py).

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim (P: padded
to a power of two), Q / C query / key block, I / J query / key blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longrope_jax import attention as attention_lib

# (block_q, block_k) of the forward and the backward, by the inputs' item size. Triton keeps a
# tile's f32 accumulators in registers and its operands in shared memory, so tiles are far
# smaller than blockwise's (CPU-measured) blocks, which these kernels ignore. 2-byte inputs:
# forward 128 x 64 (as jax's reference Triton kernel for head_dim 128), backward 64 x 64 (two
# accumulators per key tile); 4-byte inputs take half. Not yet tuned on a device.
DEFAULT_TILES = {2: ((128, 64), (64, 64)), 4: ((64, 64), (32, 32))}
_MIN_TILE = 16  # Triton's smallest dot operand dimension
_M_INIT = -1e30  # running max before any visible key, finite as attention.py's


def default_tiles(dtype) -> tuple[tuple[int, int], tuple[int, int]]:
  """(forward, backward) (block_q, block_k) for inputs of `dtype`."""
  return DEFAULT_TILES[min(4, max(2, jnp.dtype(dtype).itemsize))]


def _interpret(interpret: bool | None) -> bool:
  return jax.default_backend() != 'gpu' if interpret is None else interpret


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _tile(length: int, block: int) -> int:
  """A power-of-two tile of at most `block` (at least 16), no longer than needed for `length`."""
  if block < _MIN_TILE or block & (block - 1):
    raise ValueError(f"Pallas attention tiles must be powers of two >= {_MIN_TILE}, got {block}.")
  return min(block, max(_MIN_TILE, _next_pow2(length)))


def _compiler_params(head_dim: int, num_stages: int = 2):
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=num_stages)


def validate_tiles(tiles, name: str) -> tuple[int, int]:
  """(block_q, block_k) as a tuple of two ints, or a ValueError naming `name`."""
  try:
    block_q, block_k = (int(t) for t in tiles)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a pair (block_q, block_k) of ints, got {tiles!r}.") from None
  return block_q, block_k


# ----------------------------------------------------------------------------- layout
def _pad_axis(x, axis: int, size: int, mode: str = 'constant', value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  if mode == 'edge':
    return jnp.pad(x, pad, mode='edge')
  return jnp.pad(x, pad, constant_values=value)


def _bounds(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, Q: int, C: int, window):
  """i32[B, I, 2] first and one-past-last visible key block per query block, and i32[B, J, 2]
  first and one-past-last visible query block per key block (positions already padded)."""
  B = q_pos_BT.shape[0]
  q_BIQ, k_BJC = q_pos_BT.reshape(B, -1, Q), k_pos_BS.reshape(B, -1, C)
  q_min, q_max = q_BIQ.min(axis=2), q_BIQ.max(axis=2)
  k_min, k_max = k_BJC.min(axis=2), k_BJC.max(axis=2)
  visible_BIJ = k_min[:, None, :] <= q_max[:, :, None]
  if window is not None:
    visible_BIJ &= q_min[:, :, None] - k_max[:, None, :] < window
  if q_seg_BT is not None:
    qs_BIQ, ks_BJC = q_seg_BT.reshape(B, -1, Q), k_seg_BS.reshape(B, -1, C)
    visible_BIJ &= ((ks_BJC.min(axis=2)[:, None, :] <= qs_BIQ.max(axis=2)[:, :, None]) &
                    (qs_BIQ.min(axis=2)[:, :, None] <= ks_BJC.max(axis=2)[:, None, :]))

  def first_last(visible_BXY):
    Y = visible_BXY.shape[2]
    any_BX = visible_BXY.any(axis=2)
    lo = jnp.where(any_BX, jnp.argmax(visible_BXY, axis=2), 0)
    hi = jnp.where(any_BX, Y - jnp.argmax(visible_BXY[:, :, ::-1], axis=2), 0)
    return jnp.stack([lo, hi], axis=-1).astype(jnp.int32)

  return first_last(visible_BIJ), first_last(visible_BIJ.transpose(0, 2, 1))


class _Layout:
  """Inputs padded for the kernels: T and S to whole tiles (padded queries repeat the last
  position, padded keys sit at EMPTY_POSITION), H to a power of two (zeros: products unchanged),
  and the block bounds."""

  def __init__(self, q_BTNH, k_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, window, tiles):
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    self.B, self.T, self.S, self.N, self.K, self.G, self.H = B, T, S, N, K, N // K, H
    self.Q, self.C = _tile(T, tiles[0]), _tile(S, tiles[1])
    self.Tp, self.Sp = -(-T // self.Q) * self.Q, -(-S // self.C) * self.C
    self.P = max(_MIN_TILE, _next_pow2(H))
    self.window, self.segments = window, q_seg_BT is not None
    self.q_pos = _pad_axis(q_pos_BT.astype(jnp.int32), 1, self.Tp, 'edge')
    self.k_pos = _pad_axis(k_pos_BS.astype(jnp.int32), 1, self.Sp,
                           value=attention_lib.EMPTY_POSITION)
    self.q_seg = self.k_seg = None
    if self.segments:
      self.q_seg = _pad_axis(q_seg_BT.astype(jnp.int32), 1, self.Tp, 'edge')
      self.k_seg = _pad_axis(k_seg_BS.astype(jnp.int32), 1, self.Sp, 'edge')
    self.q_bounds, self.k_bounds = _bounds(self.q_pos, self.k_pos, self.q_seg, self.k_seg,
                                           self.Q, self.C, window)

  def pad_q(self, x_BTNH):
    return _pad_axis(_pad_axis(x_BTNH, 1, self.Tp), 3, self.P)

  def pad_k(self, x_BSKH):
    return _pad_axis(_pad_axis(x_BSKH, 1, self.Sp), 3, self.P)

  def segment_args(self):
    return (self.q_seg, self.k_seg) if self.segments else ()


def _struct(shape, dtype, like: list) -> jax.ShapeDtypeStruct:
  """An output type that varies over the manual mesh axes (inside shard_map) as the most varying
  of the inputs `like` does (pallas_call needs it when shard_map checks varying axes)."""
  mats = [getattr(jax.typeof(x), 'manual_axis_type', None) for x in like]
  mats = [m for m in mats if m is not None]
  if not mats:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=max(mats, key=lambda m: len(m.varying)))


def _mask(q_pos_Q, k_pos_C, window, q_seg_Q=None, k_seg_C=None):
  """bool[Q, C]: the contract's visibility rule on one tile."""
  diff_QC = q_pos_Q[:, None] - k_pos_C[None, :]
  mask = diff_QC >= 0
  if window is not None:
    mask &= diff_QC < window
  if q_seg_Q is not None:
    mask &= q_seg_Q[:, None] == k_seg_C[None, :]
  return mask


def _dot(a, b, contract):
  """f32 a @ b with the given contracting dims ((1, 1): a @ b.T; (0, 0): a.T @ b). HIGHEST:
  f32 inputs multiply in IEEE f32 (Triton's default is TF32, about 1e-3 off on an H200);
  bf16 inputs are unaffected."""
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                         precision=(lax.Precision.HIGHEST, lax.Precision.HIGHEST),
                         preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- forward
def _forward_kernel(bounds_ref, q_ref, k_ref, v_ref, q_pos_ref, k_pos_ref, *refs, scale, window,
                    block_k, segments):
  """One query tile of one head: online softmax over its visible key tiles."""
  if segments:
    q_seg_ref, k_seg_ref, out_ref, lse_ref = refs
    q_seg = q_seg_ref[...]
  else:
    (out_ref, lse_ref), q_seg = refs, None
  q_QP, q_pos = q_ref[...], q_pos_ref[...]
  Q, P = q_QP.shape

  def body(j, carry):
    m_Q, l_Q, acc_QP = carry
    ks = pl.ds(j * block_k, block_k)
    s_QC = _dot(q_QP, k_ref[ks, :], (1, 1)) * scale
    mask = _mask(q_pos, k_pos_ref[ks], window, q_seg, k_seg_ref[ks] if segments else None)
    s_QC = jnp.where(mask, s_QC, -jnp.inf)
    m_new = jnp.maximum(m_Q, s_QC.max(axis=1))
    p_QC = jnp.exp(s_QC - m_new[:, None])
    corr_Q = jnp.exp(m_Q - m_new)
    v_CP = v_ref[ks, :]
    acc_QP = acc_QP * corr_Q[:, None] + _dot(p_QC.astype(v_CP.dtype), v_CP, (1, 0))
    return m_new, l_Q * corr_Q + p_QC.sum(axis=1), acc_QP

  init = (jnp.full((Q,), _M_INIT, jnp.float32), jnp.zeros((Q,), jnp.float32),
          jnp.zeros((Q, P), jnp.float32))
  m_Q, l_Q, acc_QP = lax.fori_loop(bounds_ref[0], bounds_ref[1], body, init)
  seen = l_Q > 0
  l_safe = jnp.where(seen, l_Q, 1.0)
  out_ref[...] = (acc_QP / l_safe[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(seen, m_Q + jnp.log(l_safe), -jnp.inf)


def _forward(q_BTNH, k_BSKH, v_BSKH, L: _Layout, out_dtype, interpret: bool):
  """out[B, T, N, H] (out_dtype) and lse f32[B, N, T] (-inf where no key is visible)."""
  B, N, G, Q, C, P = L.B, L.N, L.G, L.Q, L.C, L.P
  seg_specs = [pl.BlockSpec((None, Q), lambda i, b, n: (b, i)),
               pl.BlockSpec((None, L.Sp), lambda i, b, n: (b, 0))] if L.segments else []
  kv_spec = pl.BlockSpec((None, L.Sp, None, P), lambda i, b, n: (b, 0, n // G, 0))
  args = (L.q_bounds, L.pad_q(q_BTNH), L.pad_k(k_BSKH), L.pad_k(v_BSKH), L.q_pos, L.k_pos,
          *L.segment_args())
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, scale=L.H ** -0.5, window=L.window, block_k=C,
                        segments=L.segments),
      grid=(L.Tp // Q, B, N),
      in_specs=[pl.BlockSpec((None, None, 2), lambda i, b, n: (b, i, 0)),
                pl.BlockSpec((None, Q, None, P), lambda i, b, n: (b, i, n, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((None, Q), lambda i, b, n: (b, i)),
                pl.BlockSpec((None, L.Sp), lambda i, b, n: (b, 0)), *seg_specs],
      out_specs=[pl.BlockSpec((None, Q, None, P), lambda i, b, n: (b, i, n, 0)),
                 pl.BlockSpec((None, None, Q), lambda i, b, n: (b, n, i))],
      out_shape=[_struct((B, L.Tp, N, P), out_dtype, args),
                 _struct((B, N, L.Tp), jnp.float32, args)],
      compiler_params=_compiler_params(P), interpret=interpret, name='longrope_flash_forward',
  )(*args)
  return out[:, :L.T, :, :L.H], lse[:, :, :L.T]


# ----------------------------------------------------------------------------- backward
def _dq_kernel(bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref,
               *refs, scale, window, block_k, segments):
  """dQ of one query tile of one head, over its visible key tiles."""
  if segments:
    q_seg_ref, k_seg_ref, dq_ref = refs
    q_seg = q_seg_ref[...]
  else:
    (dq_ref,), q_seg = refs, None
  q_QP, do_QP, q_pos = q_ref[...], do_ref[...], q_pos_ref[...]
  lse_Q, delta_Q = lse_ref[...], delta_ref[...]

  def body(j, dq_QP):
    ks = pl.ds(j * block_k, block_k)
    k_CP = k_ref[ks, :]
    s_QC = _dot(q_QP, k_CP, (1, 1)) * scale
    mask = _mask(q_pos, k_pos_ref[ks], window, q_seg, k_seg_ref[ks] if segments else None)
    p_QC = jnp.where(mask, jnp.exp(s_QC - lse_Q[:, None]), 0.0)
    dp_QC = _dot(do_QP, v_ref[ks, :], (1, 1))
    ds_QC = (p_QC * (dp_QC - delta_Q[:, None])).astype(k_CP.dtype)
    return dq_QP + _dot(ds_QC, k_CP, (1, 0))

  dq_QP = lax.fori_loop(bounds_ref[0], bounds_ref[1], body, jnp.zeros(q_QP.shape, jnp.float32))
  dq_ref[...] = dq_QP * scale


def _dkv_kernel(bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref,
                *refs, scale, window, block_q, groups, segments):
  """dK, dV of one key tile of one kv head, over its visible query tiles and the G query heads
  that share it."""
  if segments:
    q_seg_ref, k_seg_ref, dk_ref, dv_ref = refs
    k_seg = k_seg_ref[...]
  else:
    (dk_ref, dv_ref), k_seg = refs, None
  k_CP, v_CP, k_pos = k_ref[...], v_ref[...], k_pos_ref[...]

  def body(i, carry):
    dk_CP, dv_CP = carry
    qs = pl.ds(i * block_q, block_q)
    mask = _mask(q_pos_ref[qs], k_pos, window, q_seg_ref[qs] if segments else None, k_seg)
    for g in range(groups):
      q_QP, do_QP = q_ref[qs, g, :], do_ref[qs, g, :]
      s_QC = _dot(q_QP, k_CP, (1, 1)) * scale
      p_QC = jnp.where(mask, jnp.exp(s_QC - lse_ref[g, qs][:, None]), 0.0)
      dv_CP += _dot(p_QC.astype(do_QP.dtype), do_QP, (0, 0))
      dp_QC = _dot(do_QP, v_CP, (1, 1))
      ds_QC = (p_QC * (dp_QC - delta_ref[g, qs][:, None])).astype(q_QP.dtype)
      dk_CP += _dot(ds_QC, q_QP, (0, 0))
    return dk_CP, dv_CP

  zeros = jnp.zeros(k_CP.shape, jnp.float32)
  dk_CP, dv_CP = lax.fori_loop(bounds_ref[0], bounds_ref[1], body, (zeros, zeros))
  dk_ref[...] = dk_CP * scale
  dv_ref[...] = dv_CP


def _backward(q_BTNH, k_BSKH, v_BSKH, lse_BNT, delta_BNT, do_BTNH, L: _Layout, interpret: bool):
  """f32 (dq, dk, dv) given the full softmax's lse and delta = rowsum(dout * out)."""
  B, N, K, G, Q, C, P = L.B, L.N, L.K, L.G, L.Q, L.C, L.P
  Tp, Sp = L.Tp, L.Sp
  q, do = L.pad_q(q_BTNH), L.pad_q(do_BTNH)  # padded queries: dout 0, delta 0, lse +inf: p = 0
  k, v = L.pad_k(k_BSKH), L.pad_k(v_BSKH)
  lse = _pad_axis(lse_BNT, 2, Tp, value=jnp.inf)
  delta = _pad_axis(delta_BNT, 2, Tp)
  scale = L.H ** -0.5

  seg_specs = [pl.BlockSpec((None, Q), lambda i, b, n: (b, i)),
               pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0))] if L.segments else []
  row_spec = pl.BlockSpec((None, Q, None, P), lambda i, b, n: (b, i, n, 0))
  kv_spec = pl.BlockSpec((None, Sp, None, P), lambda i, b, n: (b, 0, n // G, 0))
  stat_spec = pl.BlockSpec((None, None, Q), lambda i, b, n: (b, n, i))
  args = (L.q_bounds, q, k, v, do, lse, delta, L.q_pos, L.k_pos, *L.segment_args())
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, window=L.window, block_k=C,
                        segments=L.segments),
      grid=(Tp // Q, B, N),
      in_specs=[pl.BlockSpec((None, None, 2), lambda i, b, n: (b, i, 0)), row_spec, kv_spec,
                kv_spec, row_spec, stat_spec, stat_spec,
                pl.BlockSpec((None, Q), lambda i, b, n: (b, i)),
                pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0)), *seg_specs],
      out_specs=row_spec,
      out_shape=_struct((B, Tp, N, P), jnp.float32, args),
      compiler_params=_compiler_params(P), interpret=interpret, name='longrope_flash_dq',
  )(*args)

  # dK, dV: the G heads of kv head n are q[:, :, n * G:(n + 1) * G] (N = K * G, kv-major).
  seg_specs = [pl.BlockSpec((None, Tp), lambda j, b, n: (b, 0)),
               pl.BlockSpec((None, C), lambda j, b, n: (b, j))] if L.segments else []
  group_spec = pl.BlockSpec((None, Tp, None, G, P), lambda j, b, n: (b, 0, n, 0, 0))
  key_spec = pl.BlockSpec((None, C, None, P), lambda j, b, n: (b, j, n, 0))
  group_stat_spec = pl.BlockSpec((None, None, G, Tp), lambda j, b, n: (b, n, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, window=L.window, block_q=Q, groups=G,
                        segments=L.segments),
      grid=(Sp // C, B, K),
      in_specs=[pl.BlockSpec((None, None, 2), lambda j, b, n: (b, j, 0)), group_spec, key_spec,
                key_spec, group_spec, group_stat_spec, group_stat_spec,
                pl.BlockSpec((None, Tp), lambda j, b, n: (b, 0)),
                pl.BlockSpec((None, C), lambda j, b, n: (b, j)), *seg_specs],
      out_specs=[key_spec, key_spec],
      out_shape=[_struct((B, Sp, K, P), jnp.float32, args)] * 2,
      compiler_params=_compiler_params(P), interpret=interpret, name='longrope_flash_dkv',
  )(L.k_bounds, q.reshape(B, Tp, K, G, P), k, v, do.reshape(B, Tp, K, G, P),
    lse.reshape(B, K, G, Tp), delta.reshape(B, K, G, Tp), L.q_pos, L.k_pos,
    *L.segment_args())
  return dq[:, :L.T, :, :L.H], dk[:, :L.S, :, :L.H], dv[:, :L.S, :, :L.H]


# ----------------------------------------------------------------------------- per-step API
def flash_forward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, window: int | None = None,
                  q_seg_BT=None, k_seg_BS=None, tiles: tuple[int, int] | None = None,
                  out_dtype=None, interpret: bool | None = None):
  """(out[B, T, N, H], lse f32[B, N, T]) of one attention call; lse is -inf for rows with no
  visible key (their out is 0). out_dtype defaults to q's; tiles to `default_tiles`."""
  tiles = default_tiles(q_BTNH.dtype)[0] if tiles is None else tiles
  out_dtype = q_BTNH.dtype if out_dtype is None else out_dtype
  L = _Layout(q_BTNH, k_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, window, tiles)
  return _forward(q_BTNH, k_BSKH, v_BSKH, L, out_dtype, _interpret(interpret))


def flash_backward(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, lse_BNT, delta_BNT, do_BTNH, *,
                   window: int | None = None, q_seg_BT=None, k_seg_BS=None,
                   tiles: tuple[int, int] | None = None, interpret: bool | None = None):
  """f32 (dq, dk, dv) of the keys given, for the softmax whose log-sum-exp over ALL keys is
  lse f32[B, N, T] and delta = rowsum(dout * out) f32[B, N, T] (flash-attention-2: a partial
  key set, e.g. one ring step, gives that set's share of dq and its dk, dv)."""
  tiles = default_tiles(q_BTNH.dtype)[1] if tiles is None else tiles
  L = _Layout(q_BTNH, k_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, window, tiles)
  return _backward(q_BTNH, k_BSKH, v_BSKH, lse_BNT, delta_BNT, do_BTNH.astype(q_BTNH.dtype), L,
                   _interpret(interpret))


def delta_of(out_BTNH, do_BTNH):
  """rowsum(dout * out) f32[B, N, T] (flash-attention-2's D)."""
  return jnp.einsum('BTNH,BTNH->BNT', do_BTNH.astype(jnp.float32), out_BTNH.astype(jnp.float32))


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window, tiles, backward_tiles, interpret):
  return flash_forward(q, k, v, q_pos, k_pos, window=window, q_seg_BT=q_seg, k_seg_BS=k_seg,
                       tiles=tiles, interpret=interpret)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, tiles, backward_tiles, interpret):
  out, lse = flash_forward(q, k, v, q_pos, k_pos, window=window, q_seg_BT=q_seg, k_seg_BS=k_seg,
                           tiles=tiles, interpret=interpret)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(window, tiles, backward_tiles, interpret, residuals, do):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
  dq, dk, dv = flash_backward(q, k, v, q_pos, k_pos, lse, delta_of(out, do), do, window=window,
                              q_seg_BT=q_seg, k_seg_BS=k_seg, tiles=backward_tiles,
                              interpret=interpret)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     q_pos_BT: jax.Array, k_pos_BS: jax.Array, *, window: int | None = None,
                     q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                     tiles: tuple[int, int] | None = None,
                     backward_tiles: tuple[int, int] | None = None,
                     interpret: bool | None = None, **unused) -> jax.Array:
  """Causal GQA out[B, T, N, H] by the Pallas flash kernels (Triton on a GPU, interpret mode
  elsewhere), equal to `attention.dense_attention`. block_q / block_k (blockwise's CPU block
  sizes) are ignored: `tiles` and `backward_tiles` = (Q, C), powers of two >= 16, override
  `default_tiles(q.dtype)`."""
  attention_lib.validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  attention_lib.validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window must be a positive integer or None, got {window!r}.")
  forward_default, backward_default = default_tiles(q_BTNH.dtype)
  tiles = validate_tiles(forward_default if tiles is None else tiles, 'tiles')
  backward_tiles = validate_tiles(backward_default if backward_tiles is None else backward_tiles,
                                  'backward_tiles')
  return _flash(q_BTNH, k_BSKH, v_BSKH, q_pos_BT.astype(jnp.int32), k_pos_BS.astype(jnp.int32),
                q_seg_BT, k_seg_BS, window, tiles, backward_tiles, _interpret(interpret))

