"""A compile-time plan: per-device memory and step time of a step, compiled ahead of time from
abstract shapes (jax.ShapeDtypeStruct; no weights are ever allocated) on a named mesh.

XLA's memory analysis gives the per-device arguments, temporaries and outputs of the partitioned
program. XLA's cost analysis counts a loop body once (the layer scan, the attention's block
loops), so the FLOPs used for time are the model's own count (`model_flops`): 2 per weight per
token forward, three times that with the backward, plus causal attention.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib

KINDS = ('train', 'fitness')  # the fine-tuning step; the search fitness (one candidate's NLL)


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


def compile_step(kind: str, config: model_lib.ModelConfig, mesh, batch: int, length: int,
                 optimizer: optax.GradientTransformation | None = None):
  """The compiled `kind` step ('train' or 'fitness') for tokens [batch, length + 1] on `mesh`."""
  if kind not in KINDS:
    raise ValueError(f"Unknown plan kind {kind!r}; choose one of {KINDS}.")
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
              compile_s=compile_s)


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
