"""The harness every speed bench uses: machine facts, all cores for both frameworks, load average
before and after (a busy machine's result is refused unless --force, then marked), interleaved
timing with per-repeat torch / ours ratios, and the JSON written under bench/results/ with the
command line. Like the experiments/ entry points, a bench tunes glibc malloc
(longrope_jax/runtime.py; LONGROPE_MALLOC=default keeps glibc's settings), for torch as for ours.

  args = harness.parser(__doc__, out='attention.json').parse_args()
  run = harness.Run(args)                   # checks the load before anything heavy starts
  times = run.interleaved({'torch': f, 'chunked': g}, repeats=args.repeats)
  summary = harness.summarize(times, reference='torch')
  run.write(result)                         # load after, machine facts, date, command line

Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / 'bench' / 'results'
# Environment variables that change XLA:CPU or malloc behaviour, recorded with every result.
ENV_KEYS = ('XLA_FLAGS', 'GLIBC_TUNABLES', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'JAX_PLATFORMS',
            'JAX_NUM_CPU_DEVICES', 'LONGROPE_MALLOC')


def cores() -> int:
  """Cores this process may use (its affinity mask, not the machine's count)."""
  return len(os.sched_getaffinity(0))


def cpu_model() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions() -> dict:
  """Versions of the libraries in the comparison (None when absent)."""
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'numpy'):
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      out[name] = None
  return out


def machine_facts() -> dict:
  facts = dict(cpu=cpu_model(), cpu_count=os.cpu_count(), usable_cores=cores(),
               platform=platform.platform(), versions=versions(),
               env={k: os.environ.get(k) for k in ENV_KEYS})
  if 'torch' in sys.modules:
    facts['torch_threads'] = sys.modules['torch'].get_num_threads()
  if 'jax' in sys.modules:
    jax = sys.modules['jax']
    facts['jax_devices'] = [str(d) for d in jax.devices()]
  return facts


def use_all_cores() -> int:
  """torch on every usable core (JAX's thread pool already spans them); returns the count."""
  n = cores()
  try:
    import torch
    torch.set_num_threads(n)
  except ImportError:
    pass
  return n


def parser(doc: str, *, out: str, repeats: int = 5) -> argparse.ArgumentParser:
  """An argparse parser with the harness's flags: --out, --repeats, --max-load, --force,
  --impls."""
  p = argparse.ArgumentParser(description=doc.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', default=str(RESULTS / out), help='JSON written here')
  p.add_argument('--repeats', type=int, default=repeats, help='interleaved timed rounds')
  p.add_argument('--max-load', type=float, default=0.5,
                 help='1-minute load average above which the machine counts as busy')
  p.add_argument('--force', action='store_true',
                 help='run and write even on a busy machine (the JSON says "busy": true)')
  p.add_argument('--impls', default='blockwise,chunked,flash_cpu',
                 help='attention implementations (names in model.ATTENTION; others skipped)')
  return p


def attention_impls(spec: str) -> list[str]:
  """The names of `spec` (comma-separated) registered in model.ATTENTION, in order; the others
  are reported and skipped (a kernel not built here)."""
  from longrope_jax import model as model_lib
  names = [n for n in spec.split(',') if n]
  missing = [n for n in names if n not in model_lib.ATTENTION]
  if missing:
    print(f'skipping attention implementations not registered: {missing}', flush=True)
  return [n for n in names if n in model_lib.ATTENTION]


class Run:
  """One bench run: load check at start, facts and load at the end, JSON with the command."""

  def __init__(self, args: argparse.Namespace):
    # As the experiments/ entry points: glibc malloc tuned unless LONGROPE_MALLOC=default (the
    # process's setting, so torch runs under it too).
    from longrope_jax import runtime
    self.malloc = 'tuned' if runtime.tune_malloc() else 'default'
    self.args = args
    self.started = time.time()
    self.load_before = os.getloadavg()
    self.busy = self.load_before[0] > args.max_load
    if self.busy and not args.force:
      sys.exit(f'machine busy: 1-minute load {self.load_before[0]:.2f} > --max-load '
               f'{args.max_load}; rerun when quiet, or pass --force (the result is then marked '
               '"busy": true).')
    if self.busy:
      print(f'warning: 1-minute load {self.load_before[0]:.2f} > {args.max_load}; the result '
            'is marked busy', flush=True)
    self.cores = use_all_cores()

  def write(self, result: dict) -> pathlib.Path:
    """Writes `result` with the run's facts to args.out (refused on a busy machine without
    --force, which the constructor already enforced)."""
    load_after = os.getloadavg()
    record = dict(command=[sys.executable, *sys.argv], machine=machine_facts(),
                  date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.started)),
                  load_average_start=self.load_before, load_average_end=load_after,
                  busy=self.busy, max_load=self.args.max_load, malloc=self.malloc,
                  wall_seconds=time.time() - self.started, **result)
    out = pathlib.Path(self.args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=_jsonable) + '\n')
    print(f'load average before {self.load_before[0]:.2f}, after {load_after[0]:.2f}'
          f'{" (busy)" if self.busy else ""}; wrote {out}', flush=True)
    return out


def _jsonable(x):
  if hasattr(x, 'tolist'):
    return x.tolist()
  return str(x)


def time_call(fn: Callable[[], object]) -> float:
  """Wall seconds of one call (fn must block until its result is ready)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def minor_faults(fn: Callable[[], object]) -> int:
  """Minor page faults of the process during one call (XLA:CPU's scratch mapped afresh shows
  here unless runtime.tune_malloc is on)."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fn()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                ) -> dict[str, list[float]]:
  """Seconds per call of each function over `repeats` rounds; each round calls every function
  once, in order, so all see the same machine load. `warmup` untimed calls each first (compile)."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(time_call(fn))
  return times


def summarize(times: dict[str, list[float]], reference: str | None = 'torch') -> dict:
  """Median seconds per function and, against `reference`, the per-round ratio
  reference / ours (above 1: ours is faster) with its min, median and max."""
  out = dict(seconds_median={k: statistics.median(v) for k, v in times.items()},
             seconds_min={k: min(v) for k, v in times.items()}, seconds_all=times)
  if reference in times:
    ratios = {}
    for name, ts in times.items():
      if name == reference:
        continue
      per_round = [r / t for r, t in zip(times[reference], ts)]
      ratios[name] = dict(min=min(per_round), median=statistics.median(per_round),
                          max=max(per_round), all=per_round)
    out[f'ratio_{reference}_over_ours'] = ratios
  return out


def format_ratios(summary: dict, reference: str = 'torch') -> str:
  """'name 0.83 [0.80-0.85]' per implementation: median and range of reference / ours."""
  ratios = summary.get(f'ratio_{reference}_over_ours', {})
  return '  '.join(f"{n} {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
                   for n, r in ratios.items())


# ----------------------------------------------------------------------------- shared models
def torch_llama(config, *, max_length: int | None = None):
  """transformers' LlamaForCausalLM of `config`'s shape (sdpa attention, random weights, f32)."""
  import torch
  import transformers

  from longrope_jax import hf as hf_lib
  hf = hf_lib.hf_config_for(config)
  if max_length:
    hf['max_position_embeddings'] = max(max_length, hf['max_position_embeddings'])
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig.from_dict(hf, attn_implementation='sdpa')
  hf_config.dtype = 'float32'
  return transformers.LlamaForCausalLM(hf_config).float()


def matmul_peaks(n: int = 2048, repeats: int = 5) -> dict:
  """Best f32 FLOP/s of an n^3 matmul with jnp.dot and torch.matmul (the practical peaks)."""
  return matmul_rates(n, n, n, repeats)


def matmul_rates(m: int, k: int, n: int, repeats: int = 5) -> dict:
  """Best f32 FLOP/s of an [m, k] @ [k, n] matmul with jnp.dot and torch.matmul, interleaved."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
  fns = {}
  aj, bj = jnp.asarray(a), jnp.asarray(b)
  dot = jax.jit(jnp.dot)
  fns['jax'] = lambda: dot(aj, bj).block_until_ready()
  try:
    import torch
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    fns['torch'] = lambda: torch.matmul(at, bt)
  except ImportError:
    pass
  times = interleaved(fns, repeats)
  return {name: 2 * m * k * n / min(ts) for name, ts in times.items()}
