"""Ring attention (Liu et al., 2023) over the 'seq' mesh axis: each device keeps its queries and
passes its keys, values and their global positions around the ring with `lax.ppermute`, folding
each visiting chunk into a blockwise online softmax. The backward pass sends dK, dV around the
ring with K, V (they are home after a full turn).

Causal work is balanced with the zigzag layout (as in Llama 3's context parallelism, Dubey et
al., 2024): the sequence is cut into 2R chunks and device r holds chunks r and 2R-1-r.
Positions are explicit inputs, so a layout is only a permutation of tokens and positions
(`to_zigzag`); RoPE and n_hat see the global positions. Segment ids (packed documents) are
permuted the same way and travel around the ring with their keys.

Each step's block work is the XLA blockwise code below (the CPU path), or with `step` a fused
kernel per step merged by log-sum-exp (ring_steps.py; 'auto': the Pallas kernel on a GPU).

Use: `with jax.set_mesh(mesh.make_mesh(seq=R)):` then a model with attention='ring' on
`to_zigzag(tokens)`, `to_zigzag(positions)`; `from_zigzag(logits)` restores the order.

Shapes: as attention.py; R ring size, L local length T / R.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from longrope_jax import attention as attention_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import ring_steps

LAYOUTS = ('contiguous', 'zigzag')


# ----------------------------------------------------------------------------- layouts
def validate_ring(length: int, ring_size: int) -> None:
  """The length must split into 2 * ring_size equal chunks (the zigzag layout's unit)."""
  if length % (2 * ring_size):
    raise ValueError(f"Sequence length {length} is not divisible by 2 * ring size = "
                     f"{2 * ring_size}; pad the sequence or change the 'seq' axis size.")


def layout_order(length: int, ring_size: int, layout: str = 'zigzag') -> np.ndarray:
  """i32[length]: x[order] puts x in `layout` (concatenating the devices' shards in order)."""
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; choose one of {LAYOUTS}.")
  validate_ring(length, ring_size)
  if layout == 'contiguous':
    return np.arange(length, dtype=np.int32)
  chunks = np.arange(length, dtype=np.int32).reshape(2 * ring_size, -1)
  return np.concatenate([np.concatenate([chunks[r], chunks[2 * ring_size - 1 - r]])
                         for r in range(ring_size)])


def to_zigzag(x: jax.Array, ring_size: int, axis: int = 1) -> jax.Array:
  """Permutes the length axis into the zigzag layout (device r: chunks r and 2R-1-r)."""
  return jnp.take(x, layout_order(x.shape[axis], ring_size), axis=axis)


def from_zigzag(x: jax.Array, ring_size: int, axis: int = 1) -> jax.Array:
  """Inverse of `to_zigzag`."""
  return jnp.take(x, np.argsort(layout_order(x.shape[axis], ring_size)), axis=axis)


# ----------------------------------------------------------------------------- local kernel
def _ring_perm(ring_size: int) -> list[tuple[int, int]]:
  return [(r, (r + 1) % ring_size) for r in range(ring_size)]


def _kv_blocks(blocks: attention_lib.Blocks):
  """What travels around the ring: keys, values, their positions and segment ids (or None)."""
  return blocks.k_JBKCH, blocks.v_JBKCH, blocks.k_pos_JBC, blocks.k_seg_JBC


def _with_kv(blocks: attention_lib.Blocks, kv) -> attention_lib.Blocks:
  k, v, k_pos, k_seg = kv
  return blocks._replace(k_JBKCH=k, v_JBKCH=v, k_pos_JBC=k_pos, k_seg_JBC=k_seg)


def _ring_forward(blocks: attention_lib.Blocks, window, axis: str, ring_size: int):
  """Online softmax over the R chunks that visit this device; returns (out, lse) in blocks."""
  perm = _ring_perm(ring_size)

  def step(_, carry):
    kv, state = carry
    next_kv = lax.ppermute(kv, axis, perm)  # independent of this step's compute: may overlap
    state = attention_lib.forward_blocks(_with_kv(blocks, kv), state, window)
    return next_kv, state

  state = attention_lib.init_state(blocks.q_IBKGQH)
  _, state = lax.fori_loop(0, ring_size, step, (_kv_blocks(blocks), state))
  return attention_lib.finalize(state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _ring(blocks: attention_lib.Blocks, window, axis: str, ring_size: int) -> jax.Array:
  out_IBKGQH, _ = _ring_forward(blocks, window, axis, ring_size)
  return out_IBKGQH.astype(blocks.q_IBKGQH.dtype)


def _ring_fwd(blocks, window, axis, ring_size):
  out_IBKGQH, lse_IBKGQ = _ring_forward(blocks, window, axis, ring_size)
  out_IBKGQH = out_IBKGQH.astype(blocks.q_IBKGQH.dtype)
  return out_IBKGQH, (blocks, out_IBKGQH, lse_IBKGQ)


def _ring_bwd(window, axis, ring_size, residuals, do_IBKGQH):
  blocks, out_IBKGQH, lse_IBKGQ = residuals
  delta_IBKGQ = jnp.einsum('IBKGQH,IBKGQH->IBKGQ', do_IBKGQH.astype(jnp.float32),
                           out_IBKGQH.astype(jnp.float32))
  perm = _ring_perm(ring_size)

  def step(_, carry):
    kv, dkv, dq = carry
    dq_step, dk_step, dv_step = attention_lib.backward_blocks(
        _with_kv(blocks, kv), lse_IBKGQ, delta_IBKGQ, do_IBKGQH, window)
    dkv = (dkv[0] + dk_step, dkv[1] + dv_step)
    kv, dkv = lax.ppermute((kv, dkv), axis, perm)  # dK, dV travel with their K, V
    return kv, dkv, dq + dq_step

  zeros = lambda x: jnp.zeros_like(x, jnp.float32)  # varies over `axis` like x
  _, (dk, dv), dq = lax.fori_loop(
      0, ring_size, step,
      (_kv_blocks(blocks), (zeros(blocks.k_JBKCH), zeros(blocks.v_JBKCH)),
       zeros(blocks.q_IBKGQH)))
  return (attention_lib.Blocks(dq.astype(blocks.q_IBKGQH.dtype), dk.astype(blocks.k_JBKCH.dtype),
                               dv.astype(blocks.v_JBKCH.dtype), None, None, None, None),)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _local_blocks(length: int, block: int) -> int:
  """Block size on a device: at most half the local length, so blocks never straddle the two
  zigzag chunks."""
  return min(block, length // 2) if length % 2 == 0 else min(block, length)


# ----------------------------------------------------------------------------- public
def ring_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                   k_pos_BS: jax.Array, *, window: int | None = None, block_q: int = 512,
                   block_k: int = 512, q_seg_BT: jax.Array | None = None,
                   k_seg_BS: jax.Array | None = None, mesh=None, axis: str = mesh_lib.SEQ_AXIS,
                   step: str | ring_steps.StepKernel = 'auto', **unused) -> jax.Array:
  """Causal GQA with T split over the mesh axis `axis` (the mesh set by `jax.set_mesh` unless
  `mesh` is given). Any layout of tokens is correct; zigzag (`to_zigzag`) balances the work.
  Segment ids, when given, are in the same layout as the positions. `step`: the per-step kernel
  (ring_steps.STEP_KERNELS; 'xla' is the blockwise code here)."""
  attention_lib.validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  attention_lib.validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  attention_lib.validate_blocks(block_q, block_k, window)
  mesh = mesh_lib.current_mesh(mesh)
  mesh_lib.validate_mesh_axis(mesh, axis)
  if axis in jax.sharding.get_abstract_mesh().manual_axes:
    raise ValueError(f"ring_attention was called inside a jax.shard_map that is already manual "
                     f"over {axis!r}; leave {axis!r} out of that shard_map's axis_names (e.g. "
                     f"axis_names={{'pop'}}, as fitness.PopulationFitness does) so that the ring "
                     f"splits the sequence over it itself.")
  ring_size = mesh.shape[axis]
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  validate_ring(T, ring_size)
  validate_ring(S, ring_size)
  kernel = ring_steps.step_kernel(step)
  if kernel is not None:  # a fused kernel per ring step
    return ring_steps.kernel_ring_attention(kernel, q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS,
                                            window=window, mesh=mesh, axis=axis,
                                            q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS)
  Q = _local_blocks(T // ring_size, block_q)
  C = _local_blocks(S // ring_size, block_k)

  def local(q_BLNH, k_BLKH, v_BLKH, q_pos_BL, k_pos_BL, *segments):
    blocks = attention_lib.to_blocks(q_BLNH, k_BLKH, v_BLKH, q_pos_BL, k_pos_BL, Q, C, *segments)
    return attention_lib.from_blocks(_ring(blocks, window, axis, ring_size), q_BLNH.shape[1])

  seq4, seq2 = P(None, axis, None, None), P(None, axis)
  ints = [x.astype(jnp.int32) for x in (q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS) if x is not None]
  return jax.shard_map(local, mesh=mesh, in_specs=(seq4, seq4, seq4) + (seq2,) * len(ints),
                       out_specs=seq4, axis_names=frozenset({axis}))(
                           q_BTNH, k_BSKH, v_BSKH, *ints)


def ring_block_counts(positions_T: np.ndarray, ring_size: int, *, block_q: int = 512,
                      block_k: int = 512, window: int | None = None) -> np.ndarray:
  """i64[R, R]: (query block, key block) pairs each device computes at each ring step, for
  token positions already in the layout to count (e.g. positions[layout_order(...)])."""
  positions_T = np.asarray(positions_T, np.int32)
  validate_ring(len(positions_T), ring_size)
  shards = positions_T.reshape(ring_size, 1, -1)
  length = shards.shape[-1]
  Q, C = _local_blocks(length, block_q), _local_blocks(length, block_k)
  counts = np.zeros((ring_size, ring_size), np.int64)
  for r in range(ring_size):
    for step in range(ring_size):
      source = (r - step) % ring_size
      q_pos_IBQ = _pad_blocks(shards[r], Q, edge=True)
      k_pos_JBC = _pad_blocks(shards[source], C, edge=False)
      counts[r, step] = int(np.asarray(
          attention_lib.visible_blocks(q_pos_IBQ, k_pos_JBC, window)).sum())
  return counts


def _pad_blocks(pos_BL: np.ndarray, block: int, edge: bool) -> np.ndarray:
  """Positions [B, L] -> [nblocks, B, block] padded as attention.to_blocks pads them."""
  B, L = pos_BL.shape
  pad = -L % block
  pos_BL = np.pad(pos_BL, ((0, 0), (0, pad)), mode='edge') if edge else np.pad(
      pos_BL, ((0, 0), (0, pad)), constant_values=attention_lib.EMPTY_POSITION)
  return pos_BL.reshape(B, -1, block).transpose(1, 0, 2)
