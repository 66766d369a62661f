"""Peak memory of the demo model: a 64K-token forward (NLL) and a training step at 16K tokens,
before and after the lean model (layer scan, chunked NLL, remat), and planned vs measured.

  python bench/memory.py [--before_repo /tmp/lr-before] [--out bench/results/memory.json]

Each case runs in a fresh process: compile, reset the peak RSS (/proc/self/clear_refs), run the
step once, and report the peak RSS above the RSS before the run. The plan of the same compiled
step (XLA's memory analysis: arguments + temporaries + outputs) is printed beside it. The
'before' cases import longrope_jax from `--before_repo` (a checkout of the commit before the lean
model, e.g. `git worktree add /tmp/lr-before 761cbe9`). Prints figures and writes JSON; never
asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CASES = {  # name -> (kind, batch, length)
    'forward_64k': ('fitness', 1, 65536),
    'train_16k': ('train', 1, 16384),
}


def _rss_kib(field: str) -> int:
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1])
  raise RuntimeError(f'no {field} in /proc/self/status')


def measure(kind: str, batch: int, length: int, remat: str) -> dict:
  """Runs in the child: compile, plan, run once, peak RSS above the pre-run RSS (bytes)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib
  from longrope_jax import train as train_lib
  overrides = dict(attention='blockwise')
  if 'remat' in {f.name for f in __import__('dataclasses').fields(model_lib.ModelConfig)}:
    overrides['remat'] = remat
  config = model_lib.get_config('demo', **overrides)
  rope = rope_lib.none(head_dim=config.head_dim)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, length + 1)), jnp.int32)
  params = model_lib.init_params(config, jax.random.key(0))
  if kind == 'train':
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(steps=1000))
    state = train_lib.init_state(config, optimizer, jax.random.key(0))
    step = train_lib.make_train_step(config, optimizer)
    if hasattr(step, 'rotary_table'):  # the step itself, its rotary table an argument (3d826c8)
      fn, args = step.jitted, (state, tokens, rope, step.rotary_table(tokens.shape[1], rope))
    else:  # a tree from before the rotary table (--before_repo): the step is the jitted function
      fn, args = step, (state, tokens, rope)
  else:
    fn = jax.jit(lambda p, t, r: model_lib.token_nll(config, p, t, r).mean())
    args = (params, tokens, rope)
  compiled = fn.lower(*args).compile()
  memory = compiled.memory_analysis()
  planned = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
             memory.output_size_in_bytes - memory.alias_size_in_bytes)
  jax.block_until_ready(args)
  pathlib.Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM to the current RSS
  before = _rss_kib('VmRSS')
  jax.block_until_ready(compiled(*args))
  peak = _rss_kib('VmHWM')
  return dict(kind=kind, batch=batch, length=length, remat=remat,
              measured_peak_bytes=(peak - before) * 1024, planned_bytes=int(planned),
              planned_temp_bytes=int(memory.temp_size_in_bytes),
              planned_argument_bytes=int(memory.argument_size_in_bytes))


def run_case(repo: pathlib.Path, name: str, remat: str) -> dict:
  kind, batch, length = CASES[name]
  env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS='cpu')
  code = (f'import json, sys; sys.path.insert(0, {str(REPO / "bench")!r}); import memory; '
          f'print(json.dumps(memory.measure({kind!r}, {batch}, {length}, {remat!r})))')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd='/tmp')
  if out.returncode:
    return dict(name=name, error=out.stderr[-2000:])
  return dict(name=name, **json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--before_repo', default=None)
  parser.add_argument('--cases', nargs='+', default=list(CASES))
  parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'memory.json'))
  args = parser.parse_args()
  load_start = os.getloadavg()
  runs = []
  trees = [('after', REPO, 'none'), ('after', REPO, 'full')]
  if args.before_repo:
    trees.insert(0, ('before', pathlib.Path(args.before_repo), 'none'))
  for name in args.cases:
    for label, repo, remat in trees:
      if label == 'after' and remat == 'full' and CASES[name][0] != 'train':
        continue
      r = dict(tree=label, **run_case(repo, name, remat))
      runs.append(r)
      if 'error' in r:
        print(f'{label:6} {name:12} remat {remat:5}: failed\n{r["error"]}', flush=True)
        continue
      print(f'{label:6} {name:12} remat {remat:5}: measured peak {r["measured_peak_bytes"] / 2**20:8.1f} '
            f'MiB, planned {r["planned_bytes"] / 2**20:8.1f} MiB '
            f'(ratio {r["measured_peak_bytes"] / r["planned_bytes"]:.2f})', flush=True)
  result = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                             python=platform.python_version()),
                load_average_start=load_start, load_average_end=os.getloadavg(),
                commit=subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, text=True,
                                      capture_output=True).stdout.strip(),
                runs=runs)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
  print(f'load average {os.getloadavg()}; wrote {args.out}')


if __name__ == '__main__':
  main()
