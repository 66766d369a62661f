"""Attention benchmark: model forward against PyTorch + transformers, block sizes, memory, ring.

  python bench/attention.py --parts speed [--impls blockwise,chunked,flash_cpu] [--force]
  python bench/attention.py --parts blocks [--sizes 256,512,1024,2048]
  python bench/attention.py --parts memory,ring [--quick]

1. speed: bench/forward.py's comparison (one sequence's forward against transformers'
   LlamaForCausalLM with sdpa and the same weights, all cores, interleaved, model FLOP
   utilization) on the demo shape (model.get_config('demo'): dim 128, 4 layers, 2 heads, 1 kv
   head, head dim 64, vocab 258) and the wide one (dim 256, 4 heads, 4 kv heads).
2. blocks: one layer's attention forward for each implementation and block (chunk) size at each
   length, interleaved; the fastest size per length (attention.DEFAULT_BLOCKS comes from it;
   implementations without an entry there, which take no block sizes, are left out).
3. memory: peak memory of blockwise and chunked against dense forward as T grows: each run in
   its own subprocess (peak RSS of the forward, VmHWM), next to XLA's compiled temp-buffer size.
4. ring: ring attention on 8 simulated CPU devices: (query block, key block) pairs each device
   computes for the contiguous and zigzag layouts, and max |ring - dense|.

Every part runs under bench/harness.py (load checked before, recorded after, machine facts).
Prints figures and writes JSON; never asserts on time.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. blocks
def bench_blocks(shapes: list[str], lengths: list[int], impls: list[str], sizes: list[int],
                 repeats: int) -> list[dict]:
  """One layer's attention forward (q, k, v of the model's head layout, arange positions) for
  every (implementation, block size), interleaved per length; the fastest size per length."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import forward
  from longrope_jax import model as model_lib
  rows = []
  for shape in shapes:
    cfg = forward.model_config(shape, 'dense')
    for length in lengths:
      rng = np.random.default_rng(length)
      q = jnp.asarray(rng.normal(size=(1, length, cfg.num_heads, cfg.head_dim)), jnp.float32)
      k, v = (jnp.asarray(rng.normal(size=(1, length, cfg.num_kv_heads, cfg.head_dim)),
                          jnp.float32) for _ in range(2))
      pos = jnp.arange(length, dtype=jnp.int32)[None]
      fns = {}
      for impl in impls:
        for size in sizes:
          if size > length:
            continue
          f = jax.jit(lambda q, k, v, impl=impl, size=size: model_lib.attend(
              q, k, v, pos, pos, impl=impl, block_q=size, block_k=size))
          fns[f'{impl}_{size}'] = lambda f=f: f(q, k, v).block_until_ready()
      summary = harness.summarize(harness.interleaved(fns, repeats), reference=None)
      med = summary['seconds_median']
      best = {impl: min((n for n in med if n.rsplit('_', 1)[0] == impl), key=med.get)
              for impl in impls}
      rows.append(dict(shape=shape, length=length, best=best, **summary))
      print(f"{shape:5s} T={length:6d}  " + '  '.join(f'{n} {t * 1e3:.1f}ms' for n, t in
                                                       med.items()) +
            '  | best ' + ', '.join(best.values()), flush=True)
  return rows


# ----------------------------------------------------------------------------- 2. memory
MEMORY_CHILD = r'''
import json, pathlib, sys, time
import jax, jax.numpy as jnp
from longrope_jax import model as model_lib, rope as rope_lib
attention, length, block, run = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
run = run == 'run'

def status_mib(field):  # VmRSS / VmHWM of this process (ru_maxrss would include the parent's)
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1]) / 1024

config = model_lib.get_config('demo', attention=attention, block_q=block, block_k=block)
params = model_lib.init_params(config, jax.random.key(0))
rope = rope_lib.none(head_dim=config.head_dim)
tokens = jnp.zeros((1, length), jnp.int32)
positions = jnp.arange(length, dtype=jnp.int32)[None]
fn = jax.jit(lambda p, t: model_lib.forward(config, p, t, positions, rope)).lower(
    params, tokens).compile()
result = dict(xla_temp_mib=fn.memory_analysis().temp_size_in_bytes / 2**20)
if run:
  try:  # reset the peak so that it measures the forward, not the compiler
    pathlib.Path('/proc/self/clear_refs').write_text('5')
    result['peak_reset_before_run'] = True
  except OSError:
    result['peak_reset_before_run'] = False
  result['rss_before_run_mib'] = status_mib('VmRSS')
  start = time.perf_counter()
  fn(params, tokens).block_until_ready()
  result.update(seconds=time.perf_counter() - start, peak_rss_mib=status_mib('VmHWM'))
print(json.dumps(result))
'''


def bench_memory(lengths, run_max: dict, block: int, timeout: int) -> list[dict]:
  rows = []
  for length in lengths:
    for attention in run_max:
      run = length <= run_max[attention]  # beyond it: compile only, for XLA's buffer sizes
      row = dict(attention=attention, length=length, ran=run)
      try:
        proc = subprocess.run([sys.executable, '-c', MEMORY_CHILD, attention, str(length),
                               str(block), 'run' if run else 'compile'], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)
        if proc.returncode == 0:
          row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
          row.update(error=proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else
                     f'exit {proc.returncode}')
      except subprocess.TimeoutExpired:
        row.update(error=f'timeout after {timeout}s')
      rows.append(row)
      if 'error' in row:
        shown = row['error']
      else:
        shown = f"XLA temp {row['xla_temp_mib']:9.0f} MiB  " + (
            f"peak RSS {row['peak_rss_mib']:6.0f} MiB (before run {row['rss_before_run_mib']:.0f})"
            f"  {row['seconds']:.2f}s" if run else
            'not run (compiled only)')
      print(f'T={length:6d}  {attention:9s}  {shown}', flush=True)
  return rows


# ----------------------------------------------------------------------------- 3. ring
RING_CHILD = r'''
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', 8)
import jax.numpy as jnp, numpy as np
from longrope_jax import attention as attention_lib, mesh as mesh_lib, ring_attention as ring_lib
length, block, ring = int(sys.argv[1]), int(sys.argv[2]), 8
B, N, K, H = 1, 4, 2, 64
rng = np.random.default_rng(0)
q = jnp.asarray(rng.normal(size=(B, length, N, H)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(B, length, K, H)), jnp.float32) for _ in range(2))
positions = jnp.arange(length, dtype=jnp.int32)[None]
dense = attention_lib.dense_attention(q, k, v, positions, positions)
mesh = mesh_lib.make_mesh(seq=ring)
out = {}
for layout in ring_lib.LAYOUTS:
  order = ring_lib.layout_order(length, ring, layout)
  counts = ring_lib.ring_block_counts(order, ring, block_q=block, block_k=block)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, p: ring_lib.ring_attention(q, k, v, p, p, block_q=block,
                                                            block_k=block))
    ring_out = fn(q[:, order], k[:, order], v[:, order], positions[:, order])
  diff = float(jnp.abs(ring_out[:, np.argsort(order)] - dense).max())
  out[layout] = dict(blocks_per_device=counts.sum(1).tolist(),
                     blocks_per_device_per_step=counts.tolist(),
                     busiest_device_blocks=int(counts.sum(1).max()),
                     steps_critical_path_blocks=int(counts.max(0).sum()),
                     max_abs_diff_vs_dense=diff)
print(json.dumps(out))
'''


def bench_ring(length: int, block: int, timeout: int) -> dict:
  proc = subprocess.run([sys.executable, '-c', RING_CHILD, str(length), str(block)],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-2000:])
  result = dict(length=length, ring_size=8, block=block,
                **json.loads(proc.stdout.strip().splitlines()[-1]))
  for layout in ('contiguous', 'zigzag'):
    r = result[layout]
    print(f"ring T={length} {layout:10s} blocks per device {r['blocks_per_device']}  "
          f"critical path {r['steps_critical_path_blocks']}  max|ring - dense| "
          f"{r['max_abs_diff_vs_dense']:.2e}", flush=True)
  return result


# ----------------------------------------------------------------------------- main
def main(argv=None):
  import forward
  parser = harness.parser(__doc__, out='attention.json', repeats=5)
  forward.add_args(parser)
  parser.add_argument('--quick', action='store_true', help='small lengths, few repetitions')
  parser.add_argument('--parts', default='speed,memory,ring')
  parser.add_argument('--sizes', default='256,512,1024,2048', help='block sizes (blocks part)')
  args = parser.parse_args(argv)
  parts = set(args.parts.split(','))
  if args.quick:
    args.lengths, args.repeats = '2048', min(args.repeats, 2)
    memory_lengths, run_max, ring_length = [2048, 4096], dict(blockwise=4096, chunked=4096,
                                                              dense=4096), 2048
  else:
    memory_lengths = [2048, 4096, 8192, 16384, 32768, 65536]
    run_max, ring_length = dict(blockwise=65536, chunked=32768, dense=8192), 8192
  run = harness.Run(args)
  result = dict(quick=args.quick, parts=sorted(parts))
  if 'speed' in parts:
    print('== forward of one sequence: ours vs PyTorch + transformers (sdpa)')
    result['speed'] = forward.run_forward(args, run)
  if 'blocks' in parts:
    print('== block (chunk) size per length, one layer\'s attention forward')
    from longrope_jax import attention as attention_lib
    sized = [i for i in harness.attention_impls(args.impls) if i in attention_lib.DEFAULT_BLOCKS]
    result['blocks'] = bench_blocks(args.shapes.split(','),
                                    [int(x) for x in args.lengths.split(',')], sized,
                                    [int(x) for x in args.sizes.split(',')], args.repeats)
  if 'memory' in parts:
    print('== peak memory of a forward (own subprocess per run)')
    result['memory'] = bench_memory(memory_lengths, run_max, 512, timeout=1800)
  if 'ring' in parts:
    print('== ring attention, 8 simulated CPU devices')
    result['ring'] = bench_ring(ring_length, 512 if not args.quick else 64, timeout=1800)
  run.write(result)


if __name__ == '__main__':
  main()
