"""Population fitness: the mean next-token NLL of every candidate of a stacked `RopeScaling` on
the same windows, in one compiled call (vmap over candidates, candidates sharded over the 'pop'
mesh axis, chunked to fit memory, documents micro-batched; with ring attention each sequence is
split over the 'seq' axis too); optionally a weighted mean over chosen tokens (LongRoPE2's
needle-driven objective: the answer tokens of `data.needle_windows`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from longrope_jax import attention as attention_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import ring_attention as ring_lib
from longrope_jax import rope as rope_lib
from longrope_jax.rope import RopeScaling


def auto_chunk(config: model_lib.ModelConfig, length: int, doc_batch: int,
               memory_bytes: float, seq: int = 1) -> int:
  """Candidates per device per step so one step's activations fit `memory_bytes` (rough f32
  estimate: one layer's attention scores, MLP and residual activations, and the logits), each
  sequence split over `seq` devices (ring attention: length / seq rows, blocks of at most half
  of them)."""
  rows = length // seq
  block_k = config.block_k or attention_lib.default_block(length, config.attention)
  attn_keys = length if config.attention == 'dense' else min(rows, block_k)
  if seq > 1:
    attn_keys = min(attn_keys, rows // 2)
  per_candidate = 4 * doc_batch * rows * (config.num_heads * attn_keys + 6 * config.dim +
                                          3 * config.mlp_dim + 2 * config.vocab_size)
  return max(1, int(memory_bytes // per_candidate))


class PopulationFitness:
  """Mean next-token NLL of every candidate of a stacked `RopeScaling` on windows[N, L'].

  With `weights_NL` f32[N, L' - 1] (weights[n, t] on the prediction of token t + 1 of window n),
  the weighted mean sum(w * nll) / sum(w) instead: LongRoPE2's needle-driven perplexity (Shang et
  al., 2025, sec. 3.2) weighs the answer tokens only (`data.needle_windows`). Without it every
  token counts, as before.

  One jitted call per population: candidates are placed round-robin over the 'pop' mesh axis
  (`jax.shard_map`; over every other axis too, but 'seq' when ring attention splits each
  sequence over it: `pop_axes`, `pop_devices`, `seq_devices`); on each device `lax.map` walks
  chunks of `chunk` candidates, `jax.vmap` evaluates a chunk, `lax.scan` walks the documents
  `doc_batch` at a time, and a chunk holding no candidate is skipped (`lax.cond`; with ring
  attention only where no device holds one). Shapes are fixed by `max_population`, so a whole
  search compiles once; `traces` counts compilations.
  """

  def __init__(self, config: model_lib.ModelConfig, params: Any, windows_NL: np.ndarray, *,
               length: int | None = None, max_population: int,
               mesh: jax.sharding.Mesh | None = None,
               chunk: int | None = None, doc_batch: int = 1, memory_bytes: float = 2e9,
               weights_NL: np.ndarray | None = None):
    windows_NL = np.asarray(windows_NL)
    if windows_NL.ndim != 2 or windows_NL.shape[0] < 1:
      raise ValueError(f"eval windows must be i32[N, L] with N >= 1, got shape "
                       f"{windows_NL.shape}.")
    length = windows_NL.shape[1] if length is None else int(length)
    if windows_NL.shape[1] < length:
      raise ValueError(f"eval windows have {windows_NL.shape[1]} tokens, shorter than the target "
                       f"length L' = {length}; use documents of at least L' tokens "
                       "(data.eval_windows(docs, L', N)).")
    if max_population < 1 or doc_batch < 1 or (chunk is not None and chunk < 1):
      raise ValueError(f"max_population, doc_batch and chunk (None: from memory) must be >= 1, "
                       f"got {max_population}, {doc_batch}, {chunk}.")
    self.config, self.length = config, length
    self.mesh = mesh_lib.population_mesh() if mesh is None else mesh
    ring = config.attention == 'ring'
    self.pop_axes = mesh_lib.population_axes(self.mesh, ring)
    self.pop_devices = mesh_lib.population_axis_size(self.mesh, self.pop_axes)
    self.seq_devices = int(self.mesh.shape.get(mesh_lib.SEQ_AXIS, 1)) if ring else 1
    if ring:
      ring_lib.validate_ring(length, self.seq_devices)
    local = -(-max_population // self.pop_devices)
    chunk = min(chunk or auto_chunk(config, length, doc_batch, memory_bytes, self.seq_devices),
                local)
    # As few chunks as the limit allows, of equal size: 16 candidates under a limit of 13 run as
    # 2 x 8, not 2 x 13 with 10 padded ones computed for nothing (bench/search.py at 8K).
    num_chunks = -(-local // chunk)
    self.chunk = -(-local // num_chunks)
    self.local = num_chunks * self.chunk
    self.capacity = self.local * self.pop_devices
    windows_NL = windows_NL[:, :length].astype(np.int32)
    N = windows_NL.shape[0]
    doc_batch = min(doc_batch, N)
    num_batches = -(-N // doc_batch)
    pad = num_batches * doc_batch - N
    windows_NL = np.concatenate([windows_NL, np.repeat(windows_NL[-1:], pad, axis=0)])
    weights_N = np.concatenate([np.ones(N, np.float32), np.zeros(pad, np.float32)])
    self.num_tokens = N * (length - 1)  # with token weights: their sum
    if weights_NL is not None:
      weights_N = _token_weights(weights_NL, N, length)
      self.num_tokens = float(weights_N.sum())
      weights_N = np.concatenate([weights_N, np.zeros((pad, length - 1), np.float32)])
    replicated = mesh_lib.replicated_sharding(self.mesh)
    # Abstract params (ShapeDtypeStructs, as plan.py passes): nothing is placed, `lower` only.
    leaves = jax.tree.leaves(params)
    self.abstract = bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    put = _abstract_put if self.abstract else jax.device_put
    self._params = put(params, replicated)
    self._windows_bBL = put(windows_NL.reshape(num_batches, doc_batch, length), replicated)
    # Per document f32[b, B], or per token f32[b, B, L' - 1].
    self._weights_bB = put(weights_N.reshape(num_batches, doc_batch, *weights_N.shape[1:]),
                           replicated)
    self.traces = 0
    # Manual over the candidate axes only: with ring attention 'seq' stays Auto, and the ring's
    # own shard_map splits each sequence over it (a ring inside a shard_map already manual over
    # 'seq' would see whole sequences as shards).
    pop = PartitionSpec(self.pop_axes)
    self._fn = jax.jit(jax.shard_map(
        self._local, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(),
                                               pop, pop),
        out_specs=pop, axis_names=frozenset(self.pop_axes)))

  def _local(self, params, windows_bBL, weights_bB, rope: RopeScaling, active_P):
    """Summed NLL / token count per local candidate f32[P_local]; inactive slots get inf."""
    self.traces += 1
    num_chunks, C = self.local // self.chunk, self.chunk
    config, num_tokens = self.config, self.num_tokens

    def candidate_nll(one: RopeScaling):
      def body(total, batch):
        windows_BL, weights_B = batch
        nll_BT = model_lib.token_nll(config, params, windows_BL, one)
        if weights_B.ndim == 2:  # token weights
          return total + jnp.sum(nll_BT * weights_B), None
        return total + jnp.sum(nll_BT.sum(axis=-1) * weights_B), None

      zero = jnp.zeros_like(one.attn_scale)  # varies over 'pop', like the sum it starts
      total, _ = jax.lax.scan(body, zero, (windows_bBL, weights_bB))
      return total / num_tokens

    def chunk_nll(inputs):
      rope_C, active_C = inputs
      run = jnp.any(active_C)
      if config.attention == 'ring':  # its collectives need every device on the same branch
        run = jax.lax.psum(run.astype(jnp.int32), self.pop_axes) > 0
      return jax.lax.cond(run, jax.vmap(candidate_nll),
                          lambda r: jnp.full_like(r.attn_scale, jnp.inf), rope_C)

    rope_cC = jax.tree.map(lambda x: x.reshape(num_chunks, C, *x.shape[1:]), rope)
    nll_cC = jax.lax.map(chunk_nll, (rope_cC, active_P.reshape(num_chunks, C)))
    return jnp.where(active_P, nll_cC.reshape(-1), jnp.inf)

  def slots(self, num: int) -> np.ndarray:
    """Buffer slot of each of `num` candidates: round-robin over devices, front of each block."""
    j = np.arange(num)
    return (j % self.pop_devices) * self.local + j // self.pop_devices

  def lower(self) -> jax.stages.Lowered:
    """The population call for `capacity` candidates lowered from shapes alone (ahead-of-time
    compilation: plan.py plans the search with abstract params)."""
    sharding = mesh_lib.population_sharding(self.mesh, self.pop_axes)
    one = rope_lib.none(head_dim=self.config.head_dim)
    rope = jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.capacity, *np.shape(x)),
                                                       np.asarray(x).dtype, sharding=sharding),
                        one)
    active = jax.ShapeDtypeStruct((self.capacity,), np.bool_, sharding=sharding)
    return self._fn.lower(self._params, self._windows_bBL, self._weights_bB, rope, active)

  def __call__(self, rope: RopeScaling) -> np.ndarray:
    """Mean NLL f32[P] of a stacked RopeScaling with P <= capacity candidates."""
    if self.abstract:
      raise ValueError("this PopulationFitness was built from abstract params (ShapeDtypeStructs) "
                       "for planning: it can be lowered (.lower()), not called; pass arrays.")
    P = rope.factors.shape[0]
    if not 1 <= P <= self.capacity:
      raise ValueError(f"this fitness evaluates 1 to {self.capacity} candidates per call "
                       f"(max_population), got {P}.")
    slots = self.slots(P)
    fill = np.zeros(self.capacity, np.int64)  # unused slots repeat candidate 0 (always valid)
    fill[slots] = np.arange(P)
    active = np.zeros(self.capacity, bool)
    active[slots] = True
    buffer = jax.tree.map(lambda x: np.asarray(x)[fill], rope)
    sharding = mesh_lib.population_sharding(self.mesh, self.pop_axes)
    buffer, active = jax.device_put((buffer, active), sharding)
    nll = self._fn(self._params, self._windows_bBL, self._weights_bB, buffer, active)
    return mesh_lib.to_host(nll)[slots]


def _abstract_put(tree: Any, sharding) -> Any:
  """The ShapeDtypeStructs of `tree` (arrays or structs) placed on `sharding`, nothing moved."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                      tree)


def _token_weights(weights_NL, num: int, length: int) -> np.ndarray:
  """Token weights f32[N, L' - 1] (of windows cut to L'), or a ValueError naming the fix."""
  weights_NL = np.asarray(weights_NL, np.float32)
  if weights_NL.ndim != 2 or weights_NL.shape[0] != num or weights_NL.shape[1] < length - 1:
    raise ValueError(f"weights_NL must be f32[N = {num}, L' - 1 = {length - 1}] (one weight per "
                     f"predicted token of each window), got shape {weights_NL.shape}.")
  weights_NL = weights_NL[:, :length - 1]
  if not np.all(np.isfinite(weights_NL)) or weights_NL.min() < 0 or weights_NL.sum() <= 0:
    raise ValueError("weights_NL must be finite, non-negative and select at least one token of "
                     f"the first L' = {length} of each window (data.needle_windows gives them).")
  return weights_NL
