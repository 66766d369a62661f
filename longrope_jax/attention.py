"""Causal attention over explicit positions: dense reference and implementations by name.

Masking is by positions, never by array index: query t sees key s when k_pos[s] <= q_pos[t]
(and q_pos[t] - k_pos[s] < window with a sliding window). The same rule serves a full forward,
a KV cache (empty slots hold a position that is never <= any query) and ring layouts (global
positions).

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Position stored in empty KV-cache slots: larger than any real position, so always masked.
EMPTY_POSITION = 2**30


def causal_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None = None) -> jax.Array:
  """bool[B, T, S]: key s is visible to query t."""
  diff_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  mask = diff_BTS >= 0
  if window is not None:
    mask &= diff_BTS < window
  return mask


def dense_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                    k_pos_BS: jax.Array, *, window: int | None = None, **unused) -> jax.Array:
  """Reference causal grouped-query attention; materializes the [B, N, T, S] scores in f32."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * (H ** -0.5)
  mask_B11TS = causal_mask(q_pos_BT, k_pos_BS, window)[:, None, None]
  logits_BKGTS = jnp.where(mask_B11TS, logits_BKGTS, -jnp.inf)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  probs_BKGTS = jnp.where(mask_B11TS, probs_BKGTS, 0.0)  # rows with no visible key give zeros
  out_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
  return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


# name -> fn(q, k, v, q_pos, k_pos, *, window, block_q, block_k) -> out[B, T, N, H]
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {'dense': dense_attention}


def attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, impl: str = 'dense',
           window: int | None = None, block_q: int = 512, block_k: int = 512) -> jax.Array:
  """Dispatches to the attention implementation registered as `impl`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention implementation {impl!r}; choose one of "
                     f"{sorted(IMPLEMENTATIONS)}.")
  return IMPLEMENTATIONS[impl](q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window=window,
                               block_q=block_q, block_k=block_k)
