"""Which attention implementation runs: 'auto' by backend, dtype and length, and the run-time
test that lets index-causal kernels (cuDNN, TPU splash) stand in for masking by positions.

`resolve_attention` is the one place 'auto' becomes a registered name (model.attend calls it
before dispatch, so block sizes follow the chosen implementation). It returns the name and the
reason, for results.json. It imports no implementation module but the CPU kernel's (to know
whether it builds); model.py's 'auto' entry dispatches the choice through its registry.

Shapes: B batch, T queries, S keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUTO = 'auto'
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _cpu_choice(dtype, length: int) -> tuple[str, str]:
  from longrope_jax import cpu_attention  # compiles the kernel on first use (cached)
  if cpu_attention.available():
    return 'flash_cpu', ('CPU: the fused C++ kernel builds; fastest measured at 2K-16K '
                         '(README, bench/forward.py and bench/search.py)')
  return 'chunked', (f'CPU without flash_cpu ({cpu_attention.unavailable_reason()}): chunked '
                     f'was faster than blockwise at 2K, 8K and 16K on the demo and wide shapes '
                     f'(README table); it runs blockwise itself for unordered positions')


def _gpu_choice(dtype, length: int) -> tuple[str, str]:
  if jnp.dtype(dtype) in _HALF:
    return 'cudnn', (f'GPU, {jnp.dtype(dtype).name}: cuDNN flash attention (is_causal, no mask) '
                     f'for contiguous positions; the Pallas kernel for other layouts')
  return 'pallas_gpu', (f'GPU, {jnp.dtype(dtype).name}: cuDNN flash attention takes only '
                        f'f16/bf16, so the Pallas (Triton) flash kernel')


def _tpu_choice(dtype, length: int) -> tuple[str, str]:
  return 'splash', ('TPU: Pallas splash attention for contiguous positions; blockwise for other '
                    'layouts')


# backend (jax.default_backend()) -> (dtype, length) -> (implementation, reason)
_CHOICES = {'cpu': _cpu_choice, 'gpu': _gpu_choice, 'cuda': _gpu_choice, 'rocm': _gpu_choice,
            'tpu': _tpu_choice}


def resolve_attention(requested: str, *, backend: str, dtype, length: int) -> tuple[str, str]:
  """(implementation, reason): `requested` itself unless it is 'auto', which becomes the fastest
  correct implementation for the backend, dtype and query length."""
  if requested != AUTO:
    return requested, 'requested'
  if backend not in _CHOICES:
    return 'blockwise', f'backend {backend!r} has no fused kernel here: blockwise (XLA)'
  return _CHOICES[backend](dtype, length)



# ----------------------------------------------------------------------------- index causality
def index_causal(q_pos_BT: jax.Array, k_pos_BS: jax.Array, q_seg_BT: jax.Array | None = None,
                 k_seg_BS: jax.Array | None = None, *, segments_allowed: bool = True) -> jax.Array:
  """bool[]: masking by positions (and segments) equals index-causal masking (and segment
  equality), so a kernel that knows only `is_causal` (cuDNN) or index masks plus segment ids
  (splash) gives the contract's result. True iff T == S, queries and keys share positions and
  segments, and each token's position is its predecessor's + 1 unless it opens a new segment
  (segment ids that increase: packed documents whose positions restart). Then within a segment
  positions and indices differ by a constant, so k_pos <= q_pos and q_pos - k_pos < window hold
  exactly when they hold for the indices; every query sees itself, so no row is empty.
  `segments_allowed=False` (cuDNN: no segment ids) also needs one segment per sequence.

  False for ring and zigzag shards, queries after a prefix (T < S), KV caches and shuffled
  positions: those take the caller's position-masked fallback."""
  T, S = q_pos_BT.shape[1], k_pos_BS.shape[1]
  if T != S:
    return jnp.zeros((), bool)
  ok = jnp.all(q_pos_BT == k_pos_BS)
  step_B = q_pos_BT[:, 1:] == q_pos_BT[:, :-1] + 1
  if q_seg_BT is not None:
    ok &= jnp.all(q_seg_BT == k_seg_BS)
    if segments_allowed:
      step_B |= q_seg_BT[:, 1:] > q_seg_BT[:, :-1]
    else:
      ok &= jnp.all(q_seg_BT == q_seg_BT[:, :1])
  return ok & jnp.all(step_B)
