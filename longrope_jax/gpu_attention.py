"""cuDNN flash attention on a GPU through `jax.nn.dot_product_attention`, with no dense mask.

cuDNN knows causality only by index (`is_causal`, top-left aligned) and a left sliding window
(`local_window_size=(window - 1, 0)`: keys s with t - window < s <= t). Masking by positions equals
that when `attention_select.index_causal` holds (one contiguous sequence per row: the common
forward and training step); this is checked at run time with one `lax.cond`. Everything else
(ring or zigzag shards, queries after a prefix, KV caches, packed documents with segment ids,
shuffled positions) runs the position-masked fallback: the Pallas flash kernel on a GPU
(pallas_attention.py), blockwise elsewhere. jax's public API has no per-sequence query / key
offsets or segment ids for cuDNN (its private packed-layout offsets are internal and changed
between releases), hence the fallback rather than offsets.

Static routing (trace time): cuDNN flash attention takes only f16 / bf16 (jax raises
NotImplementedError for f32), a head dim that is a multiple of 8 and at most 128 (256 on Hopper;
128 is kept for every GPU) and, here, T == S; f32 or other shapes go straight to the fallback, so
an f32 model on a GPU runs the Pallas kernel at full f32 precision (no silent downcast).
`implementation='xla'` runs the same `dot_product_attention` call by XLA (what the CPU tests use
to check the is_causal / window mapping).

Shapes: B batch, T queries, S keys, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from longrope_jax import attention as attention_lib
from longrope_jax import attention_select
from longrope_jax import pallas_attention

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128

# Position-masked implementations a cuDNN call falls back to (same contract).
FALLBACKS = {
    'pallas_gpu': pallas_attention.pallas_attention,
    'blockwise': attention_lib.blockwise_attention,
}


def default_fallback(backend: str | None = None) -> str:
  """The Pallas kernel on a GPU, blockwise (XLA) elsewhere."""
  return 'pallas_gpu' if (backend or jax.default_backend()) == 'gpu' else 'blockwise'


def cudnn_supports(dtype, head_dim: int, T: int, S: int, implementation: str = 'cudnn') -> bool:
  """Static part of the choice: can this call go to cuDNN at all (dtype, head dim, T == S)?"""
  if T != S or head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return False
  return implementation != 'cudnn' or jnp.dtype(dtype) in CUDNN_DTYPES


def _index_causal_call(q_BTNH, k_BSKH, v_BSKH, *, window, implementation):
  return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)


def cudnn_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                    k_pos_BS: jax.Array, *, window: int | None = None,
                    q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                    implementation: str | None = None, fallback: str | None = None,
                    **kwargs) -> jax.Array:
  """Causal GQA out[B, T, N, H]: cuDNN flash attention (`is_causal`, sliding window) when the
  positions are index-causal, else `fallback` ('pallas_gpu' on a GPU, 'blockwise' elsewhere),
  equal to `attention.dense_attention` either way. `implementation`: 'cudnn' (default on a GPU)
  or 'xla' (default elsewhere, where cuDNN is absent)."""
  attention_lib.validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  attention_lib.validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window must be a positive integer or None, got {window!r}.")
  on_gpu = jax.default_backend() == 'gpu'
  implementation = implementation or ('cudnn' if on_gpu else 'xla')
  fallback = fallback or default_fallback()
  if implementation not in ('cudnn', 'xla'):
    raise ValueError(f"implementation must be 'cudnn' or 'xla', got {implementation!r}.")
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {sorted(FALLBACKS)}, got {fallback!r}.")
  general = functools.partial(FALLBACKS[fallback], window=window, q_seg_BT=q_seg_BT,
                              k_seg_BS=k_seg_BS, **kwargs)
  B, T, N, H = q_BTNH.shape
  if not cudnn_supports(q_BTNH.dtype, H, T, k_BSKH.shape[1], implementation):
    return general(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  fast = lambda q, k, v, q_pos, k_pos: _index_causal_call(
      q, k, v, window=window, implementation=implementation)
  contiguous = attention_select.index_causal(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS,
                                             segments_allowed=False)
  return lax.cond(contiguous, fast, general, q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
