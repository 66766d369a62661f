"""The passkey stage's time and peak memory on a real model: its skip check (the teacher-forced
NLL of the answer on `--check-trials` prompts, evaluate.passkey_answer_nll) and its sweep (greedy
decoding of `--depths` x `--trials` prompts per method, evaluate.passkey_accuracy), before and
after they were bounded by evaluate.batch_tokens and bucketed.

  python bench/passkey.py --model gguf:smollm2 --length 2048 [--before_repo /tmp/lr-before]

Each part runs in a fresh process: load the checkpoint, then run the part once, timed (compiles
included, as a stage pays them) with the process's peak RSS (VmHWM, as /usr/bin/time -v's
"Maximum resident set size") and the RSS after loading beside it. `--before_repo` is a checkout
of the commit before the change (`git archive <commit> | tar -x -C /tmp/lr-before`); its parts
run with its longrope_jax. Prints figures and writes JSON through bench/harness.py; never
asserts.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

PARTS = ('check', 'sweep')


def _rss_kib(field: str) -> int:
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1])
  raise RuntimeError(f'no {field} in /proc/self/status')


def measure(part: str, folder: str, length: int, args: dict) -> dict:
  """Runs in the child: one part, timed, with the peak RSS (bytes)."""
  from longrope_jax import runtime
  runtime.tune_malloc()
  if not pathlib.Path(runtime.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()):
    raise RuntimeError(f'imported {runtime.__file__}, not the tree in {pathlib.Path.cwd()}')
  from longrope_jax import data as data_lib
  from longrope_jax import evaluate as eval_lib
  from longrope_jax import hf
  from longrope_jax import rope as rope_lib
  ckpt = hf.load(folder, attention=args['attention'], dtype='float32')
  tok = data_lib.get_tokenizer(str(pathlib.Path(folder) / 'tokenizer.json'))
  config, params = ckpt.config, ckpt.params
  loaded = _rss_kib('VmRSS')
  bounded = {'batch_tokens': args['batch_tokens']}
  t0 = time.perf_counter()
  if part == 'check':
    fn = eval_lib.passkey_answer_nll
    kwargs = bounded if 'batch_tokens' in inspect.signature(fn).parameters else {}
    out = fn(config, params, tok, length, rope_lib.none(head_dim=config.head_dim),
             trials=args['check_trials'], seed=0, **kwargs)
    result = dict(answer_nll=out)
  else:
    fn = eval_lib.passkey_accuracy
    kwargs = bounded if 'batch_tokens' in inspect.signature(fn).parameters else {}
    out = fn(config, params, tok, [length], methods=tuple(args['methods']),
             depths=tuple(args['depths']), trials=args['trials'], progress=False, **kwargs)
    result = dict(accuracy={m: r['accuracy'] for m, r in out['methods'].items()})
  seconds = time.perf_counter() - t0
  return dict(result, seconds=seconds, peak_rss_bytes=_rss_kib('VmHWM') * 1024,
              rss_after_load_bytes=loaded * 1024,
              batch_tokens_supported=bool(kwargs))


def run_part(repo: pathlib.Path, part: str, folder: str, length: int, args: dict) -> dict:
  code = (f'import json, sys; sys.path[:0] = [{str(repo)!r}, {str(REPO / "bench")!r}]; '
          f'import passkey; print("RESULT", json.dumps(passkey.measure({part!r}, {folder!r}, '
          f'{length}, {args!r})))')
  env = dict(os.environ, PYTHONPATH=str(repo))
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        cwd=repo)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{part} in {repo} failed:\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def main() -> None:
  # This checkout's longrope_jax and harness (not in the children: they import their tree's).
  sys.path[:0] = [str(REPO), str(REPO / 'bench')]
  import harness
  p = harness.parser(__doc__, out='passkey.json')
  p.add_argument('--model', default='gguf:smollm2',
                 help="HF folder or GGUF spec (converted once, gguf_import.resolve_model_path)")
  p.add_argument('--length', type=int, default=2048)
  p.add_argument('--parts', default=','.join(PARTS))
  p.add_argument('--check-trials', type=int, default=16, help="the skip check's prompts")
  p.add_argument('--methods', default='none')
  p.add_argument('--depths', default='0.0,0.5')
  p.add_argument('--trials', type=int, default=2, help='sweep prompts per depth')
  p.add_argument('--batch-tokens', type=int, default=16384)
  p.add_argument('--attention', default='flash_cpu')
  p.add_argument('--before_repo', default=None)
  args = p.parse_args()
  run = harness.Run(args)
  from longrope_jax.hf import gguf as gguf_import
  folder = gguf_import.resolve_model_path(args.model)
  part_args = dict(check_trials=args.check_trials, methods=args.methods.split(','),
                   depths=[float(d) for d in args.depths.split(',')], trials=args.trials,
                   batch_tokens=args.batch_tokens, attention=args.attention)
  trees = {'after': REPO}
  if args.before_repo:
    trees = {'before': pathlib.Path(args.before_repo).resolve(), **trees}
  rows = []
  for part in args.parts.split(','):
    for tree, path in trees.items():
      r = run_part(path, part, folder, args.length, part_args)
      rows.append(dict(part=part, tree=tree, length=args.length, **r))
      print(f"{part:5s} {tree:6s} L={args.length}: {r['seconds']:7.1f} s, peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:5.2f} GiB (after loading "
            f"{r['rss_after_load_bytes'] / 2**30:4.2f} GiB)", flush=True)
  run.write(dict(model=args.model, folder=folder, args=part_args, length=args.length, rows=rows))


if __name__ == '__main__':
  main()
