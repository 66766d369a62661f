"""Ring attention with a fused per-step kernel: each visiting key / value shard is one kernel call
returning (out, lse), merged into the running result by log-sum-exp; the backward passes the full
softmax's lse and delta to the kernel's backward per step (flash-attention-2), and dK, dV travel
around the ring with their K, V, as in ring_attention.py.

A step kernel (`StepKernel`) is a pair of functions in the attention contract's layout:
  forward(q_BLNH, k_BLKH, v_BLKH, q_pos_BL, k_pos_BL, q_seg_BL, k_seg_BL, window)
      -> (out f32[B, L, N, H], lse f32[B, N, L], -inf where no key of this shard is visible)
  backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse_BNL, delta_BNL, dout_BLNH, window)
      -> f32 (dq, dk, dv) of this shard, given the lse and delta of the whole softmax.
STEP_KERNELS names them; 'xla' (None) keeps ring_attention.py's blockwise XLA step, the CPU path.
'auto' is the backend's fused kernel: the Pallas flash kernel on a GPU; on a TPU splash cannot
mask by the run-time positions of a ring step (tpu_attention.py), so the XLA step stays.

Shapes: B batch, L local length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax.sharding import PartitionSpec

from longrope_jax import pallas_attention


class StepKernel(NamedTuple):
  """A ring step's fused forward (out, lse) and backward (dq, dk, dv); see the module doc.
  `backend`: where the kernel compiles; `interpret`: whether it runs in Pallas interpret mode
  (None: off its backend)."""

  forward: Callable
  backward: Callable
  backend: str
  interpret: bool | None = None

  def interpreted(self) -> bool:
    return jax.default_backend() != self.backend if self.interpret is None else self.interpret


def pallas_step(interpret: bool | None = None) -> StepKernel:
  """The Pallas flash kernels (pallas_attention.py) as a ring step; `interpret=False` forces the
  Triton kernels (to lower for 'cuda' on a machine without a GPU)."""

  def forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window):
    return pallas_attention.flash_forward(q, k, v, q_pos, k_pos, window=window, q_seg_BT=q_seg,
                                          k_seg_BS=k_seg, out_dtype=jnp.float32,
                                          interpret=interpret)

  def backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, delta, do, window):
    return pallas_attention.flash_backward(q, k, v, q_pos, k_pos, lse, delta, do, window=window,
                                           q_seg_BT=q_seg, k_seg_BS=k_seg, interpret=interpret)

  return StepKernel(forward, backward, 'gpu', interpret)


STEP_KERNELS: dict[str, StepKernel | None] = {
    'xla': None,
    'pallas_gpu': pallas_step(),
}
_BACKEND_STEP = {'gpu': 'pallas_gpu'}  # others: 'xla'


def step_kernel(name: str | StepKernel, backend: str | None = None) -> StepKernel | None:
  """The StepKernel registered as `name` ('auto': the backend's; a StepKernel: itself), None for
  the XLA step."""
  if isinstance(name, StepKernel):
    return name
  if name == 'auto':
    name = _BACKEND_STEP.get(backend or jax.default_backend(), 'xla')
  if name not in STEP_KERNELS:
    raise ValueError(f"Unknown ring step kernel {name!r}; choose 'auto' or one of "
                     f"{sorted(STEP_KERNELS)}.")
  return STEP_KERNELS[name]


# ----------------------------------------------------------------------------- merge
def merge(out_a, lse_a, out_b, lse_b):
  """Softmax over the union of two disjoint key sets from each set's normalized out f32[B, L, N,
  H] and lse f32[B, N, L] (-inf: no key): lse = log(e^a + e^b), out = weighted sum."""
  lse = jnp.logaddexp(lse_a, lse_b)
  empty = lse == -jnp.inf

  def weight(lse_x):
    w_BNL = jnp.where(empty, 0.0, jnp.exp(lse_x - jnp.where(empty, 0.0, lse)))
    return w_BNL.transpose(0, 2, 1)[..., None]

  return out_a * weight(lse_a) + out_b * weight(lse_b), lse


def _perm(ring_size: int) -> list[tuple[int, int]]:
  return [(r, (r + 1) % ring_size) for r in range(ring_size)]


def _stats_like(q_BLNH, value: float):
  """f32[B, N, L] of `value`, varying over the manual mesh axes like q (a loop carry)."""
  B, L, N, _ = q_BLNH.shape
  return lax.full_like(q_BLNH, value, jnp.float32, (B, N, L))


# ----------------------------------------------------------------------------- ring
def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, kernel, window, axis, ring_size):
  perm = _perm(ring_size)

  def step(_, carry):
    kv, out, lse = carry
    next_kv = lax.ppermute(kv, axis, perm)  # independent of this step's compute: may overlap
    k, v, k_pos, k_seg = kv
    out_s, lse_s = kernel.forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window)
    out, lse = merge(out, lse, out_s, lse_s)
    return next_kv, out, lse

  init = ((k, v, k_pos, k_seg), lax.full_like(q, 0.0, jnp.float32), _stats_like(q, -jnp.inf))
  _, out, lse = lax.fori_loop(0, ring_size, step, init)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ring(q, k, v, q_pos, k_pos, q_seg, k_seg, kernel, window, axis, ring_size):
  out, _ = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, kernel, window, axis, ring_size)
  return out.astype(q.dtype)


def _ring_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, kernel, window, axis, ring_size):
  out, lse = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, kernel, window, axis, ring_size)
  out = out.astype(q.dtype)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _ring_bwd(kernel, window, axis, ring_size, residuals, do):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
  delta = pallas_attention.delta_of(out, do)
  perm = _perm(ring_size)

  def step(_, carry):
    kv, dkv, dq = carry
    k_s, v_s, k_pos_s, k_seg_s = kv
    dq_s, dk_s, dv_s = kernel.backward(q, k_s, v_s, q_pos, k_pos_s, q_seg, k_seg_s, lse, delta,
                                       do, window)
    dkv = (dkv[0] + dk_s, dkv[1] + dv_s)
    kv, dkv = lax.ppermute((kv, dkv), axis, perm)  # dK, dV travel with their K, V
    return kv, dkv, dq + dq_s

  zeros = lambda x: jnp.zeros_like(x, jnp.float32)  # varies over `axis` like x
  _, (dk, dv), dq = lax.fori_loop(0, ring_size, step,
                                  ((k, v, k_pos, k_seg), (zeros(k), zeros(v)), zeros(q)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def kernel_ring_attention(kernel: StepKernel, q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS,
                          q_seg_BT=None, k_seg_BS=None, *, window: int | None, mesh,
                          axis: str) -> jax.Array:
  """Ring attention over the mesh axis `axis` with one `kernel` call per ring step (inputs
  checked by ring_attention.ring_attention). out[B, T, N, H] in q's dtype.

  Where the kernel runs in Pallas interpret mode (off its backend: the CPU tests), the shard_map
  does not check varying axes: jax's interpreter slices varying blocks at unvarying indices."""
  ring_size = mesh.shape[axis]

  def local(q, k, v, q_pos, k_pos, *segments):
    q_seg, k_seg = segments or (None, None)
    return _ring(q, k, v, q_pos, k_pos, q_seg, k_seg, kernel, window, axis, ring_size)

  seq4, seq2 = PartitionSpec(None, axis, None, None), PartitionSpec(None, axis)
  ints = [x.astype(jnp.int32) for x in (q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS) if x is not None]
  return jax.shard_map(local, mesh=mesh, in_specs=(seq4, seq4, seq4) + (seq2,) * len(ints),
                       out_specs=seq4, axis_names=frozenset({axis}),
                       check_vma=not kernel.interpreted())(
                           q_BTNH, k_BSKH, v_BSKH, *ints)
