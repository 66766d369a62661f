"""A compile-time plan: per-device memory and step time of a step, compiled ahead of time from
abstract shapes (jax.ShapeDtypeStruct; no weights are ever allocated) on a named mesh.

XLA's memory analysis gives the per-device arguments, temporaries and outputs of the partitioned
program. XLA's cost analysis counts a loop body once (the layer scan, the attention's block
loops), so the FLOPs used for time are the model's own count (`model_flops`): 2 per weight per
token forward, three times that with the backward, plus causal attention.

Kinds: 'train' (the fine-tuning step, params and optimizer state over 'fsdp'), 'fitness' (one
candidate's NLL of a batch of windows, params over 'fsdp': the evaluation forward) and 'search'
(the search's own program, fitness.PopulationFitness: params replicated, one candidate per group
of 'seq' devices, the other axes spreading candidates).

On XLA:CPU, compile with CPU_PLAN_XLA_FLAGS (experiments.plan does): XLA:CPU runs bf16 matmuls
in f32 and, with loop-invariant code motion, converts every stacked layer weight to f32 once
outside the layer loop, a copy no GPU or TPU makes (25 GiB per device for a 7B model: the
fitness at 128K on seq 8 planned 40.3 GiB with it, 15.6 GiB without).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from longrope_jax import fitness as fitness_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib

KINDS = ('train', 'fitness', 'search')  # see the top of this file
CPU_PLAN_XLA_FLAGS = '--xla_disable_hlo_passes=while-loop-invariant-code-motion'


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one compiled step needs per device, and how long it would take."""

  kind: str
  length: int
  batch: int
  mesh: dict
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  xla_flops: float  # cost analysis of the partitioned program (loop bodies counted once)
  model_flops: float  # per device, per step
  compile_s: float
  local_tokens: int = 0  # tokens of one sequence on one device (length / seq)

  @property
  def peak_bytes(self) -> int:
    """Arguments + temporaries + outputs, less the outputs that reuse donated arguments."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  def step_seconds(self, peak_flops: float, mfu: float) -> float:
    """Step time at an accelerator's peak FLOP/s reaching model FLOPs utilization `mfu`."""
    return self.model_flops / (peak_flops * mfu)


def model_flops(config: model_lib.ModelConfig, batch: int, length: int, train: bool) -> float:
  """FLOPs of one step on the whole batch: matmuls 2 per weight per token (x3 with backward),
  causal attention 2 * 2 * N * H * T^2 / 2 per layer per sequence (x3 with backward; a sliding
  window caps the keys per query)."""
  c = config
  per_token = 2 * (c.num_params() - c.vocab_size * c.dim * (0 if c.tie_embeddings else 1))
  keys = length / 2 if c.sliding_window is None else min(length / 2, c.sliding_window)
  attention = c.num_layers * 2 * 2 * c.num_heads * c.head_dim * keys
  return (3 if train else 1) * batch * length * (per_token + attention)


def abstract_params(config: model_lib.ModelConfig, mesh) -> Any:
  """The params' ShapeDtypeStructs in their FSDP shardings (jax.eval_shape: nothing allocated)."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      train_lib.state_shardings(shapes, mesh))


def _abstract_rope(config: model_lib.ModelConfig, mesh):
  rope = rope_lib.none(head_dim=config.head_dim)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=NamedSharding(mesh, P())), rope)


def search_fitness(config: model_lib.ModelConfig, mesh, length: int,
                   windows: int = 1) -> fitness_lib.PopulationFitness:
  """The search's PopulationFitness from abstract params: one candidate per device group of the
  candidate axes (every axis but 'seq' with ring attention), `windows` documents of `length`."""
  ring = config.attention == 'ring'
  groups = mesh_lib.population_axis_size(mesh, mesh_lib.population_axes(mesh, ring))
  params = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  return fitness_lib.PopulationFitness(config, params, np.zeros((windows, length), np.int32),
                                       max_population=groups, mesh=mesh, chunk=1, doc_batch=1)


def compile_step(kind: str, config: model_lib.ModelConfig, mesh, batch: int, length: int,
                 optimizer: optax.GradientTransformation | None = None):
  """The compiled `kind` step for tokens [batch, length + 1] on `mesh` ('search': one window of
  `length` per candidate, a candidate per device group; `batch` unused)."""
  if kind not in KINDS:
    raise ValueError(f"Unknown plan kind {kind!r}; choose one of {KINDS}.")
  if kind == 'search':
    return search_fitness(config, mesh, length).lower().compile()
  train_lib.validate_mesh(config, mesh, batch, length)
  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32,
                                sharding=train_lib.batch_sharding(mesh))
  rope = _abstract_rope(config, mesh)
  with jax.set_mesh(mesh):
    if kind == 'train':
      optimizer = optimizer or train_lib.make_optimizer(train_lib.OptimConfig(steps=1000))
      step = train_lib.make_train_step(config, optimizer, mesh)
      state = train_lib.abstract_state(config, optimizer, mesh)
      return step.lower(state, tokens, rope).compile()
    fitness = jax.jit(lambda p, t, r: model_lib.token_nll(config, p, t, r).mean(),
                      out_shardings=NamedSharding(mesh, P()))
    return fitness.lower(abstract_params(config, mesh), tokens, rope).compile()


def plan_step(kind: str, config: model_lib.ModelConfig, mesh, batch: int, length: int,
              optimizer: optax.GradientTransformation | None = None) -> Plan:
  """Compiles the step ahead of time and reads XLA's memory and cost analyses."""
  t0 = time.perf_counter()
  compiled = compile_step(kind, config, mesh, batch, length, optimizer)
  compile_s = time.perf_counter() - t0
  sizes = {k: int(v) for k, v in mesh.shape.items()}
  if kind == 'search':
    batch = sizes_product(sizes) // sizes[mesh_lib.SEQ_AXIS]  # one candidate per group
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Plan(kind=kind, length=length, batch=batch, mesh={k: int(v) for k, v in mesh.shape.items()
                                                           if v > 1},
              argument_bytes=int(memory.argument_size_in_bytes),
              temp_bytes=int(memory.temp_size_in_bytes),
              output_bytes=int(memory.output_size_in_bytes),
              alias_bytes=int(memory.alias_size_in_bytes),
              xla_flops=float((cost or {}).get('flops', 0.0)),
              model_flops=model_flops(config, batch, length, kind == 'train') / mesh.devices.size,
              compile_s=compile_s, local_tokens=local_tokens(kind, sizes, batch, length))


def sizes_product(sizes: dict[str, int]) -> int:
  return int(np.prod(list(sizes.values())))


def local_tokens(kind: str, sizes: dict[str, int], batch: int, length: int) -> int:
  """Tokens per device: the batch's share (train, fitness: over 'data' x 'fsdp'; search: one
  candidate's window) of length / seq."""
  seq = sizes.get(mesh_lib.SEQ_AXIS, 1)
  if kind == 'search':
    return length // seq
  split = sizes.get(mesh_lib.DATA_AXIS, 1) * sizes.get(mesh_lib.FSDP_AXIS, 1)
  return max(1, batch // split) * length // seq


def table(plans: list[Plan], peak_flops: float, mfu: float) -> str:
  """A markdown table of plans: GiB per device, TFLOPs per device, step seconds."""
  gib = 2 ** 30
  lines = ['| step | length | batch | mesh | args GiB | temps GiB | outputs GiB | peak GiB | '
           'model TFLOP/dev | XLA TFLOP/dev (loops once) | step s | compile s |',
           '|' + ' --- |' * 12]
  for p in plans:
    mesh = ' x '.join(f'{k} {v}' for k, v in p.mesh.items()) or '1'
    lines.append(
        f'| {p.kind} | {p.length} | {p.batch} | {mesh} | {p.argument_bytes / gib:.2f} | '
        f'{p.temp_bytes / gib:.2f} | {p.output_bytes / gib:.2f} | {p.peak_bytes / gib:.2f} | '
        f'{p.model_flops / 1e12:.1f} | {p.xla_flops / 1e12:.2f} | '
        f'{p.step_seconds(peak_flops, mfu):.2f} | {p.compile_s:.0f} |')
  return '\n'.join(lines)
