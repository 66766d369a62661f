"""The pod-scale plan of the paper's 2048K extension: LLaMA2-7B and Mistral-7B fine-tuned at 256K,
searched and evaluated at 2048K (LongRoPE, Ding et al., 2024, sec. 3.3), with ring attention and
full rematerialization on seq x fsdp (x pop for the search) meshes; per-device memory, step time
at a stated peak and MFU, and the smallest mesh that fits each accelerator memory class.

Memory comes from ahead-of-time compiles on simulated CPU devices (plan.plan_step, with
plan.CPU_PLAN_XLA_FLAGS) where they run; elsewhere from a linear model fitted to compiles on a
few devices at short lengths, checked against the direct compiles (`check`):

  peak = arguments + temporaries
  arguments: exact from the shardings (`argument_bytes`): params (and for 'train' the AdamW
    state) over 'fsdp', replicated for 'search'; tokens; the train step's rotary tables
  temporaries = a + b * local tokens (length / seq per sequence on a device)
                + c * state bytes per device ('train': gradients and updates follow the shards)

Activations are linear in the local length with full remat and ring attention (blocks of
`block` keys visit each device); one layer's gathered weights and the NLL's logit chunk are
constants.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import numpy as np

from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import plan as plan_lib
from longrope_jax import train as train_lib

GIB = 2 ** 30
K = 1024


@dataclasses.dataclass(frozen=True)
class Workload:
  """One step of the 2048K recipe: a plan kind at a length, and the meshes compiled for it."""

  name: str
  kind: str  # plan.KINDS
  length: int
  meshes: tuple[dict, ...]
  what: str


WORKLOADS = (
    Workload('search_2048k', 'search', 2048 * K, ({'seq': 64}, {'seq': 128}, {'seq': 256}),
             "the search's fitness: one candidate's NLL of one 2048K document per 'seq' group"),
    Workload('eval_2048k', 'fitness', 2048 * K,
             ({'seq': 64}, {'fsdp': 4, 'seq': 64}, {'fsdp': 2, 'seq': 128}, {'seq': 256}),
             'evaluation: the NLL of one 2048K window per fsdp group'),
    Workload('finetune_256k', 'train', 256 * K,
             ({'fsdp': 4, 'seq': 16}, {'fsdp': 8, 'seq': 16}, {'fsdp': 16, 'seq': 16},
              {'fsdp': 2, 'seq': 32}, {'fsdp': 8, 'seq': 32}, {'fsdp': 4, 'seq': 64}),
             'the 256K fine-tuning step: one 256K sequence per fsdp group, AdamW'),
    Workload('search_128k', 'search', 128 * K, ({'seq': 8}, {'pop': 2, 'seq': 4}),
             "the progressive recipe's 128K search, ring attention in the fitness"),
)
# Compiles on 8 devices the linear model is fitted to, per kind: (mesh, length), 32K-64K tokens
# per device. Below ~32K local tokens fixed buffers weigh more than the line says (the search at
# 8K and 16K local tokens sat 0.4 and 0.2 GiB above the line through 32K-256K), so fitted there
# the model slopes too little: 18% under the compiled 47.5 GiB at 256K local tokens.
FIT_POINTS = {
    'search': (({'seq': 8}, 256 * K), ({'seq': 8}, 512 * K), ({'seq': 4}, 128 * K)),
    'fitness': (({'fsdp': 2, 'seq': 4}, 128 * K), ({'fsdp': 2, 'seq': 4}, 256 * K),
                ({'fsdp': 4, 'seq': 2}, 64 * K)),
    'train': (({'fsdp': 2, 'seq': 4}, 128 * K), ({'fsdp': 2, 'seq': 4}, 256 * K),
              ({'fsdp': 4, 'seq': 2}, 64 * K)),
}


@dataclasses.dataclass(frozen=True)
class MemoryClass:
  """An accelerator's memory per chip and bf16 dense peak."""

  name: str
  hbm_bytes: float
  peak_tflops: float


MEMORY_CLASSES = (
    MemoryClass('GPU 80 GB (H100 SXM)', 80e9, 989.0),
    MemoryClass('TPU v5e 16 GiB', 16 * GIB, 197.0),
    MemoryClass('TPU v4 32 GiB', 32 * GIB, 275.0),
    MemoryClass('TPU v5p 95 GiB', 95 * GIB, 459.0),
)
USABLE = 0.9  # of HBM a plan may take (the runtime, fragmentation and XLA's own buffers)
GRID_DEVICES = tuple(2 ** i for i in range(3, 11))  # 8 .. 1024
# A search generation: the paper's population on its fitness documents (configs/common.py
# paper_model_config: 64 candidates, 5 documents), candidate groups side by side on a pod of at
# least POD_DEVICES.
SEARCH_POPULATION, SEARCH_DOCUMENTS, POD_DEVICES = 64, 5, 256
VERIFY_TRIES = 4  # compiled candidates per recommendation before giving up


def mesh_name(sizes: dict) -> str:
  return ' x '.join(f'{k} {v}' for k, v in sizes.items() if v > 1) or '1'


def devices(sizes: dict) -> int:
  return math.prod(sizes.values())


def batch_for(kind: str, sizes: dict) -> int:
  """Sequences per step: one per 'data' x 'fsdp' group (search: one per candidate group)."""
  if kind == 'search':
    return devices(sizes) // sizes.get('seq', 1)
  return sizes.get('data', 1) * sizes.get('fsdp', 1)


# ----------------------------------------------------------------------------- arguments
@functools.lru_cache(maxsize=None)  # a recommendation asks for hundreds of meshes
def state_bytes(kind: str, config: model_lib.ModelConfig, fsdp: int) -> int:
  """Bytes per device of the params (and for 'train' the AdamW state), as train.fsdp_spec
  shards them ('search': replicated)."""
  optimizer = train_lib.make_optimizer(train_lib.OptimConfig(steps=1000))
  if kind == 'train':
    tree = jax.eval_shape(lambda: train_lib.init_state(config, optimizer, jax.random.key(0)))
  else:
    tree = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  split = 1 if kind == 'search' else fsdp
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sharded = train_lib.fsdp_spec(path, x.shape, split) != jax.sharding.PartitionSpec()
    total += x.size * x.dtype.itemsize // (split if sharded else 1)
  return total


def argument_bytes(kind: str, config: model_lib.ModelConfig, sizes: dict, length: int) -> int:
  """The step's argument bytes per device: the state, tokens (over the batch axes), rope, and
  for 'train' the rotary tables (cos, sin) f32[1, T + 1, H], for 'search' the window (to within
  the 40 bytes of scalars XLA counts otherwise in a train step)."""
  fsdp = sizes.get('fsdp', 1)
  out = state_bytes(kind, config, fsdp) + 4 * (config.head_dim // 2 + 2)
  if kind == 'search':
    return out + 4 * length + 4 + 1  # the window, its weight, the candidate's 'active' flag
  split = sizes.get('data', 1) * fsdp
  out += 4 * batch_for(kind, sizes) // split * (length + 1)
  if kind == 'train':
    out += 2 * 4 * (length + 1) * config.head_dim
  return out


# ----------------------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True)
class MemoryFit:
  """temporaries = a + b * local_tokens + c * state bytes per device, least squares."""

  kind: str
  a: float
  b: float
  c: float
  points: tuple[dict, ...]

  def temps(self, local_tokens: float, state: float) -> float:
    return self.a + self.b * local_tokens + self.c * state

  def peak(self, kind: str, config: model_lib.ModelConfig, sizes: dict, length: int) -> float:
    """Predicted peak bytes per device (exact arguments + modelled temporaries)."""
    local = plan_lib.local_tokens(kind, sizes, batch_for(kind, sizes), length)
    state = state_bytes(kind, config, sizes.get('fsdp', 1))
    return argument_bytes(kind, config, sizes, length) + self.temps(local, state)


def fit_memory(kind: str, config: model_lib.ModelConfig, plans: list[plan_lib.Plan]
               ) -> MemoryFit:
  """The temporaries model of `kind` fitted to compiled plans (c only where the state bytes per
  device differ between them)."""
  local = np.array([p.local_tokens for p in plans], float)
  state = np.array([state_bytes(kind, config, p.mesh.get('fsdp', 1)) for p in plans], float)
  temps = np.array([p.temp_bytes for p in plans], float)
  use_state = kind == 'train' and np.ptp(state) > 0
  features = np.stack([np.ones_like(local), local] + ([state] if use_state else []), axis=1)
  coef, *_ = np.linalg.lstsq(features, temps, rcond=None)
  a, b, c = (*coef, 0.0) if not use_state else coef
  points = tuple(dict(mesh=p.mesh, length=p.length, local_tokens=p.local_tokens,
                      temp_bytes=p.temp_bytes) for p in plans)
  return MemoryFit(kind, float(a), float(b), float(c), points)


def error_pct(predicted: float, compiled: float) -> float:
  return 100.0 * (predicted - compiled) / compiled


# ----------------------------------------------------------------------------- recommendations
def candidate_meshes(kind: str, length: int) -> list[dict]:
  """Meshes of 8 to 1024 devices the recommendation considers: 'search' one candidate group of
  `seq` devices; otherwise fsdp x seq (seq >= 2: ring), the length splitting into 2 x seq."""
  out = []
  for n in GRID_DEVICES:
    for seq in (2 ** i for i in range(1, int(math.log2(n)) + 1)):
      if length % (2 * seq):
        continue
      if kind == 'search':
        if seq == n:
          out.append({'seq': seq})
      else:
        out.append({'fsdp': n // seq, 'seq': seq} if n > seq else {'seq': seq})
  return out


def recommend(kind: str, length: int, cls: MemoryClass,
              peak_of: Callable[[dict], float]) -> tuple[dict | None, float]:
  """(the smallest mesh whose peak fits USABLE x HBM, ties to the lowest peak; its peak), or
  (None, the lowest peak of any candidate) when none fits up to 1024 devices."""
  ranked = ranked_meshes(kind, length, cls, peak_of)
  if ranked:
    return ranked[0]
  return None, min(peak_of(m) for m in candidate_meshes(kind, length))


def ranked_meshes(kind: str, length: int, cls: MemoryClass,
                  peak_of: Callable[[dict], float]) -> list[tuple[dict, float]]:
  """The candidate meshes whose peak fits USABLE x HBM, fewest devices first, then lowest peak."""
  options = [(m, peak_of(m)) for m in candidate_meshes(kind, length)]
  fitting = [o for o in options if o[1] <= USABLE * cls.hbm_bytes]
  return sorted(fitting, key=lambda o: (devices(o[0]), o[1]))


def step_seconds(kind: str, config: model_lib.ModelConfig, sizes: dict, length: int,
                 peak_tflops: float, mfu: float) -> float:
  """Seconds of one step (search: one candidate's document) at peak x MFU per device."""
  flops = plan_lib.model_flops(config, batch_for(kind, sizes), length, kind == 'train')
  return flops / devices(sizes) / (peak_tflops * 1e12 * mfu)


def plan_record(variant: str, workload: str, p: plan_lib.Plan, peak_tflops: float,
                mfu: float) -> dict:
  rec = dict(variant=variant, workload=workload, **dataclasses.asdict(p), peak_bytes=p.peak_bytes,
             devices=devices(p.mesh) if p.mesh else 1,
             step_s=p.step_seconds(peak_tflops * 1e12, mfu))
  return rec



# ----------------------------------------------------------------------------- the study
def study(variants: list[str], *, remat: str = 'full', block: int = 2048,
          max_devices: int = 1024, peak_tflops: float = 989.0, mfu: float = 0.4,
          workloads: tuple[Workload, ...] = WORKLOADS, fit_points: dict | None = None,
          log: Callable[[str], None] = print, **overrides) -> dict:
  """Compiles the fit points and every workload mesh (up to `max_devices` simulated devices),
  checks the linear model against the compiles, and recommends a mesh per memory class (compiled
  too where it has at most `max_devices` devices). `overrides`: ModelConfig fields (tests shrink
  the model). Returns the JSON-ready result."""
  fit_points = FIT_POINTS if fit_points is None else fit_points
  plans, checks, fits, recs = [], [], {}, []

  def compile_plan(config, kind, sizes, length):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**sizes))
    p = plan_lib.plan_step(kind, config, mesh, batch_for(kind, sizes), length)
    log(f'{variant} {kind} {length} {mesh_name(sizes)}: peak {p.peak_bytes / GIB:.2f} GiB, '
        f'compiled in {p.compile_s:.0f} s')
    return p

  for variant in variants:
    config = model_lib.get_config(variant, attention='ring', remat=remat, block_q=block,
                                  block_k=block, **overrides)
    for kind in sorted({w.kind for w in workloads}):
      small = [compile_plan(config, kind, s, L) for s, L in fit_points[kind]]
      fits[f'{variant}/{kind}'] = fit = fit_memory(kind, config, small)
      for s, L in fit_points[kind]:
        checks.append(_check(variant, 'fit point', kind, config, s, L, fit,
                             next(p for p in small if p.length == L and p.mesh == _trim(s))))
    compiled = {}
    for w in workloads:
      fit = fits[f'{variant}/{w.kind}']
      for sizes in w.meshes:
        if devices(sizes) > max_devices:
          continue
        p = compile_plan(config, w.kind, sizes, w.length)
        compiled[(w.name, mesh_name(sizes))] = p
        plans.append(plan_record(variant, w.name, p, peak_tflops, mfu))
        checks.append(_check(variant, w.name, w.kind, config, sizes, w.length, fit, p))
      for cls in MEMORY_CLASSES:
        if w.name == 'search_128k':
          continue
        peak_of = lambda m: fit.peak(w.kind, config, m, w.length)
        ranked = ranked_meshes(w.kind, w.length, cls, peak_of)
        rec = dict(variant=variant, workload=w.name, memory_class=cls.name,
                   hbm_gib=cls.hbm_bytes / GIB, peak_tflops=cls.peak_tflops, usable=USABLE,
                   mesh=None, compiled_peak_gib=None, rejected=[],
                   predicted_peak_gib=min(peak_of(m) for m in
                                          candidate_meshes(w.kind, w.length)) / GIB)
        # The model's choice, checked by a compile: one that does not fit when compiled gives
        # way to the next (at most VERIFY_TRIES).
        for mesh, predicted in ranked[:VERIFY_TRIES]:
          rec.update(mesh=mesh, devices=devices(mesh), predicted_peak_gib=predicted / GIB,
                     step_s=step_seconds(w.kind, config, mesh, w.length, cls.peak_tflops, mfu))
          if devices(mesh) > max_devices:
            break
          key = (w.name, mesh_name(mesh))
          if key not in compiled:
            compiled[key] = compile_plan(config, w.kind, mesh, w.length)
            plans.append(plan_record(variant, w.name, compiled[key], peak_tflops, mfu))
            checks.append(_check(variant, w.name, w.kind, config, mesh, w.length, fit,
                                 compiled[key]))
          rec['compiled_peak_gib'] = compiled[key].peak_bytes / GIB
          if compiled[key].peak_bytes <= USABLE * cls.hbm_bytes:
            break
          rec['rejected'].append(dict(mesh=mesh, compiled_peak_gib=rec['compiled_peak_gib']))
          rec.update(mesh=None, compiled_peak_gib=None)
          rec.pop('devices')
          rec.pop('step_s')
        recs.append(rec)
  return summarize(dict(
      format='pod_plan', variants=variants, remat=remat, block=block, peak_tflops=peak_tflops,
      mfu=mfu, usable=USABLE, max_devices=max_devices, xla_flags=plan_lib.CPU_PLAN_XLA_FLAGS,
      workloads=[dataclasses.asdict(w) for w in workloads],
      memory_classes=[dataclasses.asdict(c) for c in MEMORY_CLASSES],
      fits={k: dataclasses.asdict(f) for k, f in fits.items()},
      plans=plans, checks=checks, recommendations=recs))


def summarize(result: dict) -> dict:
  """Adds what follows from the compiles: the model's error on the meshes it was not fitted to,
  by local tokens at or above / below the fit points' fewest ('check_summary'), and for each
  recommended search mesh the hours of one generation on a pod ('generation_hours')."""
  fit_local = {k: {p['local_tokens'] for p in f['points']} for k, f in result['fits'].items()}
  floor = min(min(v) for v in fit_local.values())
  checks = [c for c in result['checks'] if c['workload'] != 'fit point']
  novel = [c for c in checks if c['local_tokens'] not in fit_local[f"{c['variant']}/{c['kind']}"]]

  def span(rows):
    errors = [c['error_pct'] for c in rows]
    return dict(count=len(rows), min_error_pct=min(errors, default=None),
                max_error_pct=max(errors, default=None))

  result['check_summary'] = dict(
      fit_local_tokens_min=floor, compiled=len(checks),
      at_fit_local_tokens=span([c for c in checks if c not in novel]),
      above=span([c for c in novel if c['local_tokens'] >= floor]),
      below=span([c for c in novel if c['local_tokens'] < floor]))
  result['check_summary']['text'] = _summary_text(result['check_summary'])
  for r in result['recommendations']:
    if r['workload'].startswith('search') and r.get('mesh'):
      pod = max(POD_DEVICES, r['devices'])
      rounds = math.ceil(SEARCH_POPULATION / (pod // r['devices']))
      r.update(pod_devices=pod, generation_hours=rounds * SEARCH_DOCUMENTS * r['step_s'] / 3600)
  return result


def _trim(sizes: dict) -> dict:
  return {k: v for k, v in sizes.items() if v > 1}


def _check(variant, workload, kind, config, sizes, length, fit: MemoryFit, p) -> dict:
  """The model's peak against a compile's (error in % of the compiled)."""
  predicted = fit.peak(kind, config, sizes, length)
  args = argument_bytes(kind, config, sizes, length)
  return dict(variant=variant, workload=workload, kind=kind, mesh=_trim(sizes), length=length,
              local_tokens=p.local_tokens, compiled_peak_bytes=p.peak_bytes,
              predicted_peak_bytes=predicted, error_pct=error_pct(predicted, p.peak_bytes),
              compiled_argument_bytes=p.argument_bytes, predicted_argument_bytes=args,
              argument_error_pct=error_pct(args, p.argument_bytes))


# ----------------------------------------------------------------------------- markdown
def _summary_text(summary: dict) -> str:
  fmt = lambda s: (f"{s['count']} compiles, error {s['min_error_pct']:+.1f}% to "
                   f"{s['max_error_pct']:+.1f}%") if s['count'] else 'none'
  floor = summary['fit_local_tokens_min']
  return (f"The model, fitted on 8 devices at {floor:,}+ tokens per device, against the "
          f"{summary['compiled']} pod-scale compiles: at the fit points' tokens per device "
          f"{fmt(summary['at_fit_local_tokens'])}; other lengths at {floor:,}+ tokens per device "
          f"{fmt(summary['above'])}; below {floor:,} tokens per device {fmt(summary['below'])} "
          '(fixed buffers weigh more there; every recommended mesh is checked by a compile).')


def markdown(result: dict) -> str:
  """The study's tables: compiled plans per workload, the check of the linear model, and the
  recommended meshes per memory class."""
  gib = lambda b: f'{b / GIB:.1f}'
  out = []
  for variant in result['variants']:
    out += [f'### {variant}', '']
    for w in result['workloads']:
      rows = [p for p in result['plans'] if p['variant'] == variant and p['workload'] == w['name']]
      if not rows:
        continue
      out += [f"**{w['name']}** ({w['kind']}, {w['length']:,} tokens): {w['what']}.", '',
              '| mesh | devices | local tokens | args GiB | temps GiB | peak GiB | model TFLOP/dev '
              '| step s | compile s |', '|' + ' --- |' * 9]
      out += [f"| {mesh_name(p['mesh'])} | {p['devices']} | {p['local_tokens']:,} | "
              f"{gib(p['argument_bytes'])} | {gib(p['temp_bytes'])} | {gib(p['peak_bytes'])} | "
              f"{p['model_flops'] / 1e12:.0f} | {p['step_s']:.2f} | {p['compile_s']:.0f} |"
              for p in rows]
      out.append('')
  out += ['### Check: the linear model against the compiles', '',
          '| model | workload | mesh | length | compiled GiB | predicted GiB | error % |',
          '|' + ' --- |' * 7]
  out += [f"| {c['variant']} | {c['workload']} | {mesh_name(c['mesh'])} | {c['length']:,} | "
          f"{gib(c['compiled_peak_bytes'])} | {gib(c['predicted_peak_bytes'])} | "
          f"{c['error_pct']:+.1f} |" for c in result['checks']]
  summary = result.get('check_summary')
  if summary:
    out += ['', _summary_text(summary)]
  out += ['', '### Recommended meshes (smallest that fits '
          f"{100 * result['usable']:.0f}% of HBM)", '',
          f'Search: `devices` is one candidate group; a generation ({SEARCH_POPULATION} '
          f'candidates x {SEARCH_DOCUMENTS} documents) runs groups side by side on a pod of '
          f'{POD_DEVICES} devices (or the group, if larger).', '',
          '| model | workload | memory | mesh | devices | peak GiB model (compiled) | step s | '
          'generation h |', '|' + ' --- |' * 8]
  for r in result['recommendations']:
    if r['mesh'] is None:
      cells = ['does not fit up to 1024 devices', '-',
               f"lowest {r['predicted_peak_gib']:.1f} (model)", '-', '-']
    else:
      compiled = ('' if r['compiled_peak_gib'] is None else
                  f" ({r['compiled_peak_gib']:.1f})")
      cells = [mesh_name(r['mesh']), str(r['devices']),
               f"{r['predicted_peak_gib']:.1f}{compiled}", f"{r['step_s']:.2f}",
               f"{r['generation_hours']:.1f}" if 'generation_hours' in r else '-']
    if r.get('rejected'):
      cells[0] += ' (compiled over the limit: ' + ', '.join(
          f"{mesh_name(x['mesh'])} {x['compiled_peak_gib']:.1f} GiB" for x in r['rejected']) + ')'

    out.append(f"| {r['variant']} | {r['workload']} | {r['memory_class']} | " +
               ' | '.join(cells) + ' |')
  return '\n'.join(out) + '\n'
