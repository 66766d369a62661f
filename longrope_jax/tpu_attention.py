"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind the attention
contract, with a position-masked fallback.

Splash masks are static and by index: `CausalMask` (q index >= kv index) or `LocalMask` with
window (window - 1, 0) (kv index in (q index - window, q index]), evaluated per block from numpy
at trace time, plus run-time segment ids (`SegmentIds`: equal ids only). Positions are not an
input. Masking by positions equals that mask when `attention_select.index_causal` holds: one
sequence of consecutive positions per row, or packed documents whose positions restart at 0 with
increasing segment ids (splash applies the segment ids); checked at run time with one `lax.cond`.
Other layouts (ring and zigzag shards, queries after a prefix, KV caches, shuffled positions) run
`fallback` (blockwise, XLA): splash's masks cannot follow run-time positions, and a dense
run-time mask (its dynamic-mask mode) would cost O(T * S) memory, as the 'fused' path does.

Static routing: splash needs T == S in whole blocks of a multiple of 128 (lanes); other shapes
take the fallback. Splash does not scale logits:
q is multiplied by 1 / sqrt(H) first (one rounding in bf16). Off the TPU it runs in Pallas
interpret mode (`interpret=None` chooses it): correct and slow, for tests.

Shapes: B batch, T queries (= S keys), N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from longrope_jax import attention as attention_lib
from longrope_jax import attention_select
from longrope_jax import pallas_attention

# Block (query and key) sizes tried, largest first (multiples of the 128 lanes; 512 as MaxText's
# splash defaults): the first that divides T wins.
BLOCKS = (512, 256, 128)
FALLBACKS = {'blockwise': attention_lib.blockwise_attention,
             'pallas_gpu': pallas_attention.pallas_attention}


def _interpret(interpret: bool | None) -> bool:
  return jax.default_backend() != 'tpu' if interpret is None else interpret


def splash_block(T: int, blocks=BLOCKS) -> int | None:
  """The splash block size for T tokens: the first of `blocks` dividing T, or None."""
  return next((b for b in blocks if T % b == 0), None)


def splash_supports(T: int, S: int) -> bool:
  """Static part of the choice: T == S in whole blocks."""
  return T == S and splash_block(T) is not None


@functools.lru_cache(maxsize=32)
def _kernel(T: int, num_heads: int, window: int | None, block: int, interpret: bool):
  """A splash kernel for index-causal (or local) masks over T tokens; built once per shape (its
  block-sparsity tables are numpy work), as concrete arrays so that the cache outlives a trace."""
  one = (splash.CausalMask((T, T)) if window is None else
         splash.LocalMask((T, T), window_size=(window - 1, 0), offset=0))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(splash.MultiHeadMask([one] * num_heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_call(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, k_seg_BS, *, window, interpret):
  B, T, N, H = q_BTNH.shape
  kernel = _kernel(T, N, window, splash_block(T), interpret)
  q_BNTH = (q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype)).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  if q_seg_BT is None:
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  else:
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks))
    out_BNTH = jax.vmap(one)(q_BNTH, k_BKSH, v_BKSH, q_seg_BT.astype(jnp.int32),
                             k_seg_BS.astype(jnp.int32))
  return out_BNTH.transpose(0, 2, 1, 3).astype(q_BTNH.dtype)


def splash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                     k_pos_BS: jax.Array, *, window: int | None = None,
                     q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                     fallback: str = 'blockwise', interpret: bool | None = None,
                     **kwargs) -> jax.Array:
  """Causal GQA out[B, T, N, H]: splash attention (causal or local mask, segment ids) when the
  positions are index-causal, else `fallback`; equal to `attention.dense_attention` either way."""
  attention_lib.validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  attention_lib.validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window must be a positive integer or None, got {window!r}.")
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {sorted(FALLBACKS)}, got {fallback!r}.")
  general = functools.partial(FALLBACKS[fallback], window=window, q_seg_BT=q_seg_BT,
                              k_seg_BS=k_seg_BS, **kwargs)
  interpret = _interpret(interpret)
  if not splash_supports(q_BTNH.shape[1], k_BSKH.shape[1]):
    return general(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)

  def fast(q, k, v, q_pos, k_pos, *segments):
    return _splash_call(q, k, v, *(segments or (None, None)), window=window, interpret=interpret)

  def slow(q, k, v, q_pos, k_pos, *segments):
    return general(q, k, v, q_pos, k_pos)

  segments = () if q_seg_BT is None else (q_seg_BT, k_seg_BS)
  contiguous = attention_select.index_causal(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  return lax.cond(contiguous, fast, slow, q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *segments)
