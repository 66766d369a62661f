"""Attention benchmark: model forward against PyTorch + transformers, memory, ring attention.

  python bench/attention.py [--quick] [--out bench/results/attention.json]

1. Speed: one forward of one sequence of the demo model shape (4 layers, 256 wide, 4 heads, 2 kv
   heads, vocab 258) with blockwise attention against transformers' LlamaForCausalLM (sdpa) at
   the same configuration, random weights, torch.no_grad, interleaved so both see the same load.
2. Peak memory of blockwise against dense forward as T grows: each run in its own subprocess
   (peak RSS of the forward, VmHWM), next to XLA's compiled temp-buffer size.
3. Ring attention on 8 simulated CPU devices: (query block, key block) pairs each device
   computes for the contiguous and zigzag layouts, and max |ring - dense|.

Prints figures and writes JSON; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _timed(fn) -> tuple[float, float]:
  """Wall seconds and CPU seconds (all threads) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------- 1. speed
def torch_llama(config, length: int):
  """transformers' LlamaForCausalLM with `config`'s shape and random weights, sdpa attention."""
  import torch
  import transformers
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      max_position_embeddings=length, rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps,
      tie_word_embeddings=config.tie_embeddings, attn_implementation='sdpa')
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(hf_config).eval()


def bench_speed(lengths, reps: int, blocks, dense_max: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib

  threads = len(os.sched_getaffinity(0))  # the cores this process may use
  torch.set_num_threads(threads)
  base = model_lib.get_config('demo')
  params = model_lib.init_params(base, jax.random.key(0))
  rope = rope_lib.none(head_dim=base.head_dim)
  rows = []
  for length in lengths:
    tokens = np.random.default_rng(0).integers(0, base.vocab_size, (1, length))
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    ours = {}
    for block in blocks:
      config = base.replace(attention='blockwise', block_q=block, block_k=block)
      ours[f'blockwise_{block}'] = jax.jit(
          lambda p, t, config=config: model_lib.forward(config, p, t, positions, rope))
    if length <= dense_max:
      ours['dense'] = jax.jit(lambda p, t: model_lib.forward(base, p, t, positions, rope))
    tokens_j = jnp.asarray(tokens, jnp.int32)
    compile_s = {}
    for name, fn in ours.items():
      start = time.perf_counter()
      fn(params, tokens_j).block_until_ready()
      compile_s[name] = time.perf_counter() - start
    model = torch_llama(base, length)
    tokens_t = torch.from_numpy(tokens)
    with torch.no_grad():
      model(tokens_t)  # warm-up
      wall = {name: [] for name in ['torch', *ours]}
      cpu = {name: [] for name in wall}
      for _ in range(reps):  # interleaved: every implementation sees the same machine load
        for name in wall:
          fn = (lambda: model(tokens_t).logits) if name == 'torch' else (
              lambda fn=ours[name]: fn(params, tokens_j).block_until_ready())
          w, c = _timed(fn)
          wall[name].append(w)
          cpu[name].append(c)
    best = {name: min(t) for name, t in wall.items()}
    best_cpu = {name: min(t) for name, t in cpu.items()}
    fastest = min((name for name in ours if name != 'dense'), key=best.get)
    row = dict(length=length, threads=threads, seconds=best, cpu_seconds=best_cpu,
               all_seconds=wall, all_cpu_seconds=cpu, first_call_seconds=compile_s,
               best_ours=fastest, ratio_torch_over_ours=best['torch'] / best[fastest],
               cpu_ratio_torch_over_ours=best_cpu['torch'] / best_cpu[fastest])
    rows.append(row)
    print(f"T={length:6d}  wall (cpu) s: torch {best['torch']:.3f} ({best_cpu['torch']:.2f})  " +
          '  '.join(f'{name} {best[name]:.3f} ({best_cpu[name]:.2f})' for name in ours) +
          f"  ratio torch/ours {row['ratio_torch_over_ours']:.2f} wall, "
          f"{row['cpu_ratio_torch_over_ours']:.2f} cpu ({fastest})", flush=True)
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
    for attention in ('blockwise', 'dense'):
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
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='small lengths, one repetition')
  parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'attention.json'))
  parser.add_argument('--parts', default='speed,memory,ring')
  parser.add_argument('--blocks', default=None, help='comma-separated block sizes to time')
  args = parser.parse_args(argv)
  parts = set(args.parts.split(','))
  if args.quick:
    speed_lengths, reps, blocks, dense_max = [2048], 2, [512], 2048
    memory_lengths, run_max, ring_length = [2048, 4096], dict(blockwise=4096, dense=4096), 2048
  else:
    speed_lengths, reps, blocks, dense_max = [2048, 8192, 16384], 3, [256, 512], 2048
    memory_lengths = [2048, 4096, 8192, 16384, 32768, 65536]
    run_max, ring_length = dict(blockwise=65536, dense=8192), 8192
  if args.blocks:
    blocks = [int(b) for b in args.blocks.split(',')]
  result = dict(quick=args.quick, cpu_count=os.cpu_count(),
                usable_cores=len(os.sched_getaffinity(0)), load_average_start=os.getloadavg())
  if 'speed' in parts:
    print('== forward of one sequence: ours vs PyTorch + transformers (sdpa)')
    result['speed'] = bench_speed(speed_lengths, reps, blocks, dense_max)
  if 'memory' in parts:
    print('== peak memory of a forward (own subprocess per run)')
    result['memory'] = bench_memory(memory_lengths, run_max, 512, timeout=1800)
  if 'ring' in parts:
    print('== ring attention, 8 simulated CPU devices')
    result['ring'] = bench_ring(ring_length, 512 if not args.quick else 64, timeout=1800)
  result['load_average_end'] = os.getloadavg()
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
