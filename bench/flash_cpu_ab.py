"""The CPU attention kernel against a baseline build of its own source: did a change to
csrc/flash_attention.cc make it slower?

  python bench/flash_cpu_ab.py --baseline main [--lengths 2048 8192] [--shape demo_N2_K1_H64]
                               [--backward] [--segments 4] [--repeats 15] [--force]

`--baseline` is a git revision (its longrope_jax/csrc/flash_attention.cc) or a path to a source
file. Both sources are compiled with cpu_attention.FLAGS, loaded into this one process under
their own FFI target names and timed interleaved (harness.interleaved: each round calls each
once, so both see the same load; half the rounds in reverse order) on one causal sequence in
the kernel's default tiles. The figure is the per-round ratio baseline / current (above 1: the
current source is faster), its median and range. `--segments N` also times the current kernel on the same sequence packed as N
equal documents (its segment path; less work, as other documents' blocks are skipped).
Writes JSON under bench/results/; never asserts on time.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

# This checkout's library (its kernel source is the one measured) and the bench harness.
sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]),
                str(pathlib.Path(__file__).resolve().parent)]
import harness  # noqa: E402

SOURCE_PATH = 'longrope_jax/csrc/flash_attention.cc'
SHAPES = {'demo_N2_K1_H64': (2, 1, 64), 'N4_K4_H64': (4, 4, 64)}


def baseline_source(spec: str, directory: pathlib.Path) -> pathlib.Path:
  """The baseline's source file: `spec` itself when it is a file, else `git show spec:...`."""
  if pathlib.Path(spec).is_file():
    return pathlib.Path(spec)
  text = subprocess.run(['git', 'show', f'{spec}:{SOURCE_PATH}'], cwd=harness.REPO,
                        capture_output=True, text=True, check=True).stdout
  path = directory / 'baseline_flash_attention.cc'
  path.write_text(text)
  return path


def load(source: pathlib.Path, name: str, directory: pathlib.Path) -> None:
  """Compiles `source` and registers its handlers as `{name}_forward` etc."""
  import ctypes

  import jax

  from longrope_jax import cpu_attention
  library = directory / f'{name}.so'
  cpu_attention._compile(cpu_attention._compiler(), str(library), source)
  lib = ctypes.CDLL(str(library))
  for suffix, symbol in (('forward', 'LongropeFlashForward'),
                         ('backward', 'LongropeFlashBackward'),
                         ('forward_segments', 'LongropeFlashForwardSegments')):
    if hasattr(lib, symbol):
      jax.ffi.register_ffi_target(f'{name}_{suffix}', jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')


def main() -> None:
  parser = harness.parser(__doc__, out='flash_cpu_ab.json', repeats=15)
  parser.add_argument('--baseline', default='main', help='git revision or source file')
  parser.add_argument('--lengths', type=int, nargs='+', default=[2048, 8192])
  parser.add_argument('--shape', default='demo_N2_K1_H64', choices=list(SHAPES))
  parser.add_argument('--backward', action='store_true', help='also time the backward kernel')
  parser.add_argument('--segments', type=int, default=0,
                      help='also time the current kernel with this many packed documents')
  args = parser.parse_args()
  run = harness.Run(args)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from longrope_jax import cpu_attention
  if cpu_attention._compiler() is None:
    raise SystemExit('no C++ compiler: set $CXX or install g++')
  directory = pathlib.Path(tempfile.mkdtemp(prefix='flash_cpu_ab-'))
  load(baseline_source(args.baseline, directory), 'baseline', directory)
  load(cpu_attention.SOURCE, 'current', directory)
  N, K, H = SHAPES[args.shape]
  tiles = cpu_attention.default_tiles(N // K)
  backward_tiles = cpu_attention.default_backward_tiles(N // K)
  rows = []
  for T in args.lengths:
    rng = np.random.default_rng(0)
    q, k, v, dout = (jnp.asarray(rng.standard_normal((1, T, n, H), np.float32))
                     for n in (N, K, K, N))
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct((1, N, T), jnp.float32))
    grad_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    fns = {}
    for name in ('baseline', 'current'):
      forward = jax.jit(lambda q, k, v, name=name: jax.ffi.ffi_call(
          f'{name}_forward', out_types)(q, k, v, pos, pos, **cpu_attention._attrs(None, H, tiles)))
      fns[name] = lambda forward=forward: jax.block_until_ready(forward(q, k, v))
      if args.backward:
        out, lse = forward(q, k, v)
        backward = jax.jit(lambda q, k, v, name=name, out=out, lse=lse: jax.ffi.ffi_call(
            f'{name}_backward', grad_types)(q, k, v, pos, pos, out, lse, dout,
                                            **cpu_attention._attrs(None, H, backward_tiles)))
        fns[f'{name}_backward'] = lambda backward=backward: jax.block_until_ready(
            backward(q, k, v))
    if args.segments:
      length = -(-T // args.segments)
      seg = jnp.asarray(np.arange(T) // length, jnp.int32)[None]
      seg_pos = jnp.asarray(np.arange(T) % length, jnp.int32)[None]
      packed = jax.jit(lambda q, k, v: jax.ffi.ffi_call('current_forward_segments', out_types)(
          q, k, v, seg_pos, seg_pos, seg, seg, **cpu_attention._attrs(None, H, tiles)))
      fns['current_segments'] = lambda: jax.block_until_ready(packed(q, k, v))
    # Half the rounds in each order, so neither library always runs right after the other.
    times = harness.interleaved(fns, -(-args.repeats // 2))
    for name, ts in harness.interleaved(dict(reversed(fns.items())), args.repeats // 2,
                                        warmup=0).items():
      times[name] += ts
    summary = harness.summarize({n: t for n, t in times.items() if not n.endswith('backward')},
                                reference='baseline')
    row = dict(length=T, forward=summary)
    line = f'{args.shape} T={T} forward: ' + ', '.join(
        f'{n} {s * 1e3:.1f} ms' for n, s in summary['seconds_median'].items())
    line += '; baseline / ' + harness.format_ratios(summary, reference='baseline')
    if args.backward:
      row['backward'] = harness.summarize(
          {n.removesuffix('_backward'): t for n, t in times.items() if n.endswith('backward')},
          reference='baseline')
      line += '; backward baseline / ' + harness.format_ratios(row['backward'], 'baseline')
    print(line, flush=True)
    rows.append(row)
  run.write(dict(baseline=args.baseline, shape=args.shape, tiles=tiles, rows=rows))


if __name__ == '__main__':
  main()
