"""Pretraining and fine-tuning with optax (AdamW, warmup + cosine, clipping), resumable, sharded.

One loop serves pretraining at the original window (rope = `rope.none`) and the fine-tuning stage
of progressive extension (rope = searched factors at the extended length): the scaling is data.

On a mesh (mesh.make_mesh) the step is one jit with shardings, XLA's SPMD partitioner doing the
rest: the batch splits over 'data' and 'fsdp', parameters and optimizer state over 'fsdp' (each
array along its largest dimension that 'fsdp' divides), the sequence over 'seq' (ring attention,
forward and backward).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jax.sharding import NamedSharding, PartitionSpec as P

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import checks
from longrope_jax import metrics as metrics_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax.data import PackedBatches
from longrope_jax.packing import MixedBatches, Rows
from longrope_jax.rope import RopeScaling

LN2 = math.log(2.0)
# The training step unrolls the layer scan of models with at most this many layers: the demo's
# CPU step (4 layers) ran 12% faster unrolled (273 against 309 ms, quiet, interleaved), while a
# forward alone ran 2-7% slower, so inference keeps ModelConfig.scan_unroll.
UNROLL_MAX_LAYERS = 8


# The rules of OptimConfig's fields, shared by the config sections that hold them (pretrain,
# progressive.finetune).
OPTIM_RULES: dict[str, checks.Rule] = {
    'steps': checks.Rule(checks.positive_int, 'optimizer steps'),
    'lr': checks.Rule(checks.positive_float, 'peak AdamW learning rate'),
    'warmup': checks.Rule(checks.non_negative_int,
                          'linear warmup steps before the cosine decay (fewer than steps)'),
    'final_lr_ratio': checks.Rule(checks.fraction,
                                  'final learning rate as a fraction of the peak'),
    'weight_decay': checks.Rule(checks.non_negative_float, 'AdamW weight decay'),
    'clip': checks.Rule(checks.positive_float, 'global gradient-norm clip'),
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and schedule: AdamW with linear warmup then cosine decay to `final_lr_ratio`."""

  steps: int
  lr: float = 3e-3
  warmup: int = 50
  final_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip: float = 1.0
  b2: float = 0.95

  def __post_init__(self):
    checks.check_section(dataclasses.asdict(self), OPTIM_RULES, 'OptimConfig')
    checks.positive_float(self.b2, 'OptimConfig.b2')
    if self.warmup >= self.steps:
      raise checks.ConfigError('OptimConfig.warmup', f"OptimConfig.warmup ({self.warmup}) "
                               f"must be smaller than steps ({self.steps}).")

  @classmethod
  def from_config(cls, section) -> 'OptimConfig':
    """The optimizer fields of a config section (pretrain, progressive.finetune)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in names})


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate by step: linear warmup from 0, then cosine decay to lr * final_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup,
      decay_steps=cfg.steps, end_value=cfg.lr * cfg.final_lr_ratio)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.clip),
                     optax.adamw(make_schedule(cfg), b2=cfg.b2, weight_decay=cfg.weight_decay))


def init_state(config: model_lib.ModelConfig, optimizer: optax.GradientTransformation,
               key: jax.Array | None = None, params: Any = None) -> dict:
  """{'params', 'opt_state', 'step'}: new random params unless `params` is given."""
  if params is None:
    params = model_lib.init_params(config, key)
  return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- shardings
def fsdp_spec(path: tuple, shape: tuple[int, ...], fsdp: int) -> P:
  """PartitionSpec of one param or optimizer-state array: its largest dimension that `fsdp`
  divides goes over 'fsdp' (never the stacked layer axis, which the layer scan slices)."""
  stacked = any(getattr(k, 'key', None) == model_lib.LAYERS for k in path)
  dims = [d for d in range(int(stacked), len(shape)) if shape[d] % fsdp == 0]
  if fsdp == 1 or not dims:
    return P()
  spec = [None] * len(shape)
  spec[max(dims, key=lambda d: shape[d])] = mesh_lib.FSDP_AXIS
  return P(*spec)


def state_shardings(state_shapes: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for a train state (or params) tree of arrays or ShapeDtypeStructs."""
  fsdp = mesh.shape[mesh_lib.FSDP_AXIS] if mesh_lib.FSDP_AXIS in mesh.axis_names else 1
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, fsdp_spec(path, x.shape, fsdp)), state_shapes)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of token batches [B, T]: B over ('data', 'fsdp'); T whole (the model's inputs
  are tokens[:, :-1], re-split over 'seq' inside the step)."""
  return NamedSharding(mesh, P(_batch_axes(mesh)))


def _batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in mesh_lib.BATCH_AXES if a in mesh.axis_names)


def validate_mesh(config: model_lib.ModelConfig, mesh: jax.sharding.Mesh, batch_size: int,
                  length: int) -> None:
  """Raises before tracing if the batch, the length or the attention do not fit the mesh."""
  split = math.prod(mesh.shape[a] for a in _batch_axes(mesh))
  if batch_size % split:
    raise ValueError(f"The batch size {batch_size} is not divisible by mesh.data x mesh.fsdp = "
                     f"{split}; change the batch size or the mesh.")
  seq = mesh.shape.get(mesh_lib.SEQ_AXIS, 1)
  if seq > 1 and config.attention != 'ring':
    raise ValueError(f"mesh.seq = {seq} splits the sequence, which needs ring attention: set "
                     f"--config.model.attention=ring (now {config.attention!r}) or mesh.seq=1.")
  if seq > 1 and length % (2 * seq):
    raise ValueError(f"The training length {length} is not divisible by 2 x mesh.seq = "
                     f"{2 * seq}; change the length or mesh.seq.")


def abstract_state(config: model_lib.ModelConfig, optimizer: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh | None = None) -> Any:
  """The train state's ShapeDtypeStructs (with their shardings on `mesh`); nothing allocated."""
  shapes = jax.eval_shape(lambda: init_state(config, optimizer, jax.random.key(0)))
  if mesh is None:
    return shapes
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      state_shardings(shapes, mesh))


def init_sharded_state(config: model_lib.ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, key: jax.Array | None = None,
                       params: Any = None) -> dict:
  """`init_state` built directly in its shardings (random params drawn on the mesh, or `params`
  placed there)."""
  shardings = state_shardings(abstract_state(config, optimizer), mesh)
  if params is not None:
    params = place(params, shardings['params'])
  return jax.jit(lambda k, p: init_state(config, optimizer, k, p),
                 out_shardings=shardings)(key, params)


def place(tree: Any, shardings: Any) -> Any:
  """Puts a tree whose whole value every process holds onto `shardings` (works across
  processes: each takes its own shards)."""
  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(mesh_lib.to_host(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


# ----------------------------------------------------------------------------- steps
def make_train_step(config: model_lib.ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """(state, tokens i32[B, T+1], rope, segment_ids_BT=None, positions_BT=None) -> (state,
  metrics); jitted (on a mesh: state donated); `.lower(state, tokens, rope)` lowers it ahead of
  time; `.jitted(state, batch, rope, table)` is the step itself, with batch {'tokens', and for
  packed rows 'segment_ids', 'positions'} and the table from `.rotary_table(T + 1, rope)` (or
  `.positions_table(positions, rope)`).

  Packed rows (segment ids, positions restarting per document, as packing.Rows) average the loss
  over the targets predicted within their own document (`model.same_segment_targets`).

  With `mesh`, the state must be in `state_shardings` (init_sharded_state) and the tokens are
  placed in `batch_sharding`; the same step then runs data / FSDP / sequence parallel. Models
  of at most UNROLL_MAX_LAYERS layers without remat train with the layer scan unrolled (same
  numbers).
  """
  # Not with remat: unrolled, XLA merges the recomputation with the forward (remat's
  # prevent_cse=False is safe only inside the scan) and keeps every activation (the demo at 16K:
  # 963 MiB of temporaries with remat 'full' unrolled, 304 MiB with the loop).
  if config.num_layers <= UNROLL_MAX_LAYERS and config.remat == 'none':
    config = config.replace(scan_unroll=config.num_layers)
  rotary_table = jax.jit(functools.partial(_rotary_table, theta=config.rope_theta),
                         static_argnums=0)
  positions_table = jax.jit(functools.partial(rope_lib.rope_cos_sin, theta=config.rope_theta))

  def loss_fn(params, batch, rope, rotary):
    segments_BT = batch.get('segment_ids')
    nll_BT = model_lib.token_nll(config, params, batch['tokens'], rope,
                                 positions_BT=batch.get('positions'), rotary=rotary,
                                 segment_ids_BT=segments_BT)
    if segments_BT is None:
      return nll_BT.mean()
    return nll_BT.sum() / jnp.maximum(model_lib.same_segment_targets(segments_BT).sum(), 1)

  def step(state, batch, rope, rotary):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], batch, rope, rotary)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads))
    return dict(params=params, opt_state=opt_state, step=state['step'] + 1), metrics

  # The rotary table (sin and cos of every position) comes from its own jitted call: inside the
  # step XLA:CPU fuses sin and cos into each layer's query and key rotation and their gradients,
  # computing them 16 times per step on the demo model (about a sixth of its time).
  if mesh is None:
    jitted = jax.jit(step)
  else:
    shardings = state_shardings(abstract_state(config, optimizer), mesh)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh), replicated, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=0)

  def run_step(state, tokens_BT, rope, segment_ids_BT=None, positions_BT=None):
    if (segment_ids_BT is None) != (positions_BT is None):
      raise ValueError("packed rows need both segment_ids_BT and positions_BT (positions "
                       "restart in each document), or neither.")
    batch = dict(tokens=tokens_BT)
    if segment_ids_BT is not None:
      batch.update(segment_ids=jnp.asarray(segment_ids_BT), positions=jnp.asarray(positions_BT))
      rotary = positions_table(batch['positions'], rope)
    else:
      rotary = rotary_table(tokens_BT.shape[1], rope)
    if mesh is None:
      return jitted(state, batch, rope, rotary)
    validate_mesh(config, mesh, tokens_BT.shape[0], tokens_BT.shape[1] - 1)
    with jax.set_mesh(mesh):  # ring attention finds its 'seq' axis here
      return jitted(state, place(batch, {k: batch_sharding(mesh) for k in batch}), rope,
                    rotary)

  def lower(state, tokens_BT, rope):
    """The step lowered for these (possibly abstract) arguments, for AOT compilation."""
    rotary = jax.eval_shape(rotary_table, tokens_BT.shape[1], rope)
    return jitted.lower(state, dict(tokens=tokens_BT), rope, rotary)

  run_step.lower = lower
  run_step.jitted, run_step.rotary_table = jitted, rotary_table  # (length, rope) -> table
  run_step.positions_table = positions_table  # (positions i32[B, T], rope) -> table
  return run_step


def _rotary_table(length: int, rope: RopeScaling, *, theta: float):
  """(cos, sin) f32[1, length, H] of positions 0..length-1 (token_nll's default positions)."""
  positions_1T = jnp.arange(length, dtype=jnp.int32)[None]
  return rope_lib.rope_cos_sin(positions_1T, rope, theta=theta)


def make_eval_nll(config: model_lib.ModelConfig, mesh: jax.sharding.Mesh | None = None
                  ) -> Callable:
  """(params, windows i32[N, L], rope) -> mean NLL per token (nats), jitted (on `mesh`: params
  in their FSDP shardings, windows replicated, sequence over 'seq')."""

  def eval_nll(params, windows_NL, rope):
    return model_lib.token_nll(config, params, windows_NL, rope).mean()

  if mesh is None:
    return jax.jit(eval_nll)
  jitted = jax.jit(eval_nll)

  def sharded(params, windows_NL, rope):
    with jax.set_mesh(mesh):
      return jitted(params, windows_NL, rope)

  return sharded


def train(config: model_lib.ModelConfig, optim: OptimConfig,
          batches: PackedBatches | MixedBatches, rope: RopeScaling | rope_lib.LongRopeFactors,
          workdir: str | pathlib.Path, *, seed: int = 0, init_params: Any = None,
          eval_windows: np.ndarray | None = None, eval_every: int = 100,
          ckpt_every: int = 100, log_every: int = 10, desc: str = 'train',
          metrics_name: str = 'metrics.jsonl', ckpt_name: str = 'ckpt',
          tb_workdir: str | pathlib.Path | None = None,
          mesh: jax.sharding.Mesh | None = None) -> dict:
  """Trains until `optim.steps`, resuming from `workdir/ckpt_name` if a checkpoint is there.

  Appends {step, loss, bits_per_token, lr, ...} to workdir/metrics_name, and writes the same
  scalars as TensorBoard events to (tb_workdir or workdir)/tb/desc; returns the state.
  `batches.batch(step)` gives tokens i32[B, T + 1] or `packing.Rows` (packed documents); with
  `rope` a LongRopeFactors, each step runs under rope.select(max position + 1) (the short/long
  switch of inference: LongRoPE2's mixed context window training with `packing.MixedBatches`).
  `init_params` (fine-tuning) is used only when no checkpoint exists yet. With `mesh` the state
  lives sharded (FSDP) and a checkpoint restores straight into this mesh's shardings, whatever
  mesh wrote it.
  """
  workdir = ckpt_lib.abspath(workdir)
  optimizer = make_optimizer(optim)
  if mesh is not None:
    validate_mesh(config, mesh, batches.batch_size, batches.length)
  mngr = ckpt_lib.manager(workdir / ckpt_name)
  metrics_path = workdir / metrics_name
  start = 0
  if mngr.latest_step() is not None:
    template = (init_state(config, optimizer, jax.random.key(seed)) if mesh is None
                else abstract_state(config, optimizer, mesh))  # restored into these shardings
    state = ckpt_lib.restore(mngr, template)
    start = int(state['step'])
  elif mesh is None:
    state = init_state(config, optimizer, jax.random.key(seed), init_params)
  else:
    state = init_sharded_state(config, optimizer, mesh, jax.random.key(seed), init_params)
  # Records past the resumed step (or all of them, killed before the first checkpoint) are redone.
  ckpt_lib.truncate_jsonl(metrics_path, lambda r: r.get('step', 0) <= start)
  if start >= optim.steps:
    return state

  step_fn = make_train_step(config, optimizer, mesh)
  eval_nll = make_eval_nll(config, mesh) if eval_windows is not None else None
  schedule = make_schedule(optim)
  bar = tqdm(total=optim.steps, initial=start, desc=desc, dynamic_ncols=True)
  writer = metrics_lib.MetricWriter(tb_workdir or workdir, desc,
                                    purge_step=start + 1 if start else None)
  tokens_per_step = batches.batch_size * batches.length
  t0, window_losses = time.time(), []
  for step in range(start, optim.steps):
    rows = batches.batch(step)
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    step_rope = rope.select(rows.span) if isinstance(rope, rope_lib.LongRopeFactors) else rope
    state, metrics = step_fn(state, jnp.asarray(rows.tokens), step_rope, rows.segment_ids,
                             rows.positions)
    window_losses.append(metrics['loss'])
    done = step + 1
    if done % log_every == 0 or done == optim.steps:
      loss = float(np.mean(jax.device_get(window_losses)))
      dt = time.time() - t0
      record = dict(step=done, loss=loss, bits_per_token=loss / LN2, lr=float(schedule(step)),
                    grad_norm=float(metrics['grad_norm']),
                    tokens_per_sec=len(window_losses) * tokens_per_step / dt)
      if eval_nll is not None and (done % eval_every == 0 or done == optim.steps):
        val_rope = (rope.select(eval_windows.shape[1])
                    if isinstance(rope, rope_lib.LongRopeFactors) else rope)
        val = float(eval_nll(state['params'], jnp.asarray(eval_windows), val_rope))
        record.update(val_loss=val, val_bits_per_token=val / LN2)
      ckpt_lib.append_jsonl(metrics_path, record)
      writer.write_scalars(done, {k: v for k, v in record.items() if k != 'step'})
      bar.set_postfix(loss=f'{loss:.3f}', bpt=f'{loss / LN2:.3f}',
                      **({'val_bpt': f"{record['val_bits_per_token']:.3f}"}
                         if 'val_bits_per_token' in record else {}))
      t0, window_losses = time.time(), []
    bar.update(1)
    if done % ckpt_every == 0 or done == optim.steps:
      ckpt_lib.save(mngr, done, state)
      writer.flush()
  bar.close()
  writer.close()
  return state


def load_params(config: model_lib.ModelConfig, workdir: str | pathlib.Path,
                ckpt_name: str = 'ckpt') -> Any:
  """Parameters of the latest checkpoint in workdir/ckpt_name."""
  mngr = ckpt_lib.manager(ckpt_lib.abspath(workdir) / ckpt_name)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt_lib.abspath(workdir) / ckpt_name}; "
                            "run the pretrain stage first.")
  expected = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  ckpt_lib.verify_step(mngr, mngr.latest_step())
  mismatch = ckpt_lib.shape_mismatch(ckpt_lib.saved_shapes(mngr, mngr.latest_step())['params'],
                                     expected)
  if mismatch:
    raise ckpt_lib.WorkdirError(
        f"{mngr.directory} holds a model with {mismatch}: it does not match the model config "
        "(another variant or sizes); use a fresh workdir, or the config it was trained with.")
  params = ckpt_lib.restore(mngr, None)['params']
  return jax.tree.map(jnp.asarray, params)
