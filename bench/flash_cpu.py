"""One attention layer: the fused CPU kernel (`cpu_attention.flash_cpu_attention`) against torch.

  python bench/flash_cpu.py [--lengths 2048 8192 16384] [--reps 5] [--tiles 256x256 ...]
                            [--backward] [--model] [--out bench/results/flash_cpu.json]

Causal GQA attention of one sequence, f32, on the demo shape (N=2 query heads, K=1 kv head, head
dim 64) and on N=4, K=4, H=64, against `torch.nn.functional.scaled_dot_product_attention(
is_causal=True, enable_gqa=True)`, both on every core this process may use, interleaved in one
process; the median of `reps` calls. With --backward also forward+backward (gradients of q, k, v).
With --model also the whole demo model's forward (`model.get_config('demo')`) with flash_cpu and
with blockwise attention against transformers' LlamaForCausalLM (sdpa), as bench/attention.py.
Prints figures and writes JSON with the CPU model and the load average at start and end (`busy`
when other processes held half the cores at the start); never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {'demo_N2_K1_H64': (2, 1, 64), 'N4_K4_H64': (4, 4, 64)}


def cpu_model() -> str:
  for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
    if line.startswith('model name'):
      return line.split(':', 1)[1].strip()
  return platform.processor()


def bench_model(lengths, reps: int) -> list[dict]:
  """Demo model forward of one sequence: flash_cpu and blockwise against torch + transformers."""
  import importlib.util

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib

  spec = importlib.util.spec_from_file_location('bench_attention', REPO / 'bench/attention.py')
  bench_attention = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_attention)
  base = model_lib.get_config('demo')
  params = model_lib.init_params(base, jax.random.key(0))
  rope = rope_lib.none(head_dim=base.head_dim)
  rows = []
  for T in lengths:
    tokens = np.random.default_rng(0).integers(0, base.vocab_size, (1, T))
    tokens_j, positions = jnp.asarray(tokens, jnp.int32), jnp.arange(T, dtype=jnp.int32)[None]
    fns = {}
    for attention in ('flash_cpu', 'blockwise'):
      config = base.replace(attention=attention)
      fwd = jax.jit(lambda p, t, config=config: model_lib.forward(config, p, t, positions, rope))
      fns[attention] = lambda fwd=fwd: fwd(params, tokens_j).block_until_ready()
    llama, tokens_t = bench_attention.torch_llama(base, T), torch.from_numpy(tokens)

    def torch_forward():
      with torch.no_grad():
        llama(tokens_t)

    fns['torch'] = torch_forward
    for fn in fns.values():
      fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
      for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows.append(dict(length=T, seconds=medians,
                     torch_over_flash_cpu=medians['torch'] / medians['flash_cpu'],
                     torch_over_blockwise=medians['torch'] / medians['blockwise']))
    print(f"demo model T={T}: " + ', '.join(f'{n} {s * 1e3:.1f} ms' for n, s in medians.items())
          + f"; torch/flash_cpu {rows[-1]['torch_over_flash_cpu']:.2f}", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lengths', type=int, nargs='+', default=[2048, 8192, 16384])
  parser.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--tiles', nargs='*', default=[],
                      help='extra QxC tiles to time, e.g. 256x256')
  parser.add_argument('--backward', action='store_true', help='also time forward+backward')
  parser.add_argument('--model', action='store_true', help='also time the demo model forward')
  parser.add_argument('--out', default=str(REPO / 'bench/results/flash_cpu.json'))
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch.nn.functional as F

  from longrope_jax import cpu_attention

  if not cpu_attention.available():
    raise SystemExit(f'flash_cpu is unavailable: {cpu_attention.unavailable_reason()}')
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  load_start = os.getloadavg()
  rows = []
  for shape in args.shapes:
    N, K, H = SHAPES[shape]
    for T in args.lengths:
      rng = np.random.default_rng(0)
      q, k, v, do = (rng.standard_normal((1, T, n, H), np.float32) for n in (N, K, K, N))
      pos = jnp.arange(T, dtype=jnp.int32)[None]
      qj, kj, vj, doj = map(jnp.asarray, (q, k, v, do))
      # torch layout [B, heads, T, H]
      qt, kt, vt, dot = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v, do))
      fns = {}
      tile_options = {'flash_cpu': None}
      for tiles in args.tiles:
        tile_options[f'flash_cpu_{tiles}'] = tuple(int(x) for x in tiles.split('x'))
      for name, tiles in tile_options.items():
        attn = (lambda q, k, v, tiles=tiles:
                cpu_attention.flash_cpu_attention(q, k, v, pos, pos, tiles=tiles))
        fwd = jax.jit(attn)
        fns[name] = lambda fwd=fwd: fwd(qj, kj, vj).block_until_ready()
        if args.backward:
          fb = jax.jit(lambda q, k, v, do, attn=attn: jax.vjp(attn, q, k, v)[1](do))
          fns[f'{name}_fwd_bwd'] = lambda fb=fb: jax.block_until_ready(fb(qj, kj, vj, doj))

      def torch_fwd():
        with torch.no_grad():
          F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

      fns['torch'] = torch_fwd
      if args.backward:
        qg, kg, vg = (x.clone().requires_grad_() for x in (qt, kt, vt))

        def torch_fwd_bwd():
          out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
          torch.autograd.grad(out, (qg, kg, vg), dot)

        fns['torch_fwd_bwd'] = torch_fwd_bwd
      for fn in fns.values():  # compile and warm up
        fn()
      times = {name: [] for name in fns}
      for _ in range(args.reps):
        for name, fn in fns.items():
          start = time.perf_counter()
          fn()
          times[name].append(time.perf_counter() - start)
      medians = {name: statistics.median(ts) for name, ts in times.items()}
      flops = 4 * N * H * T * (T + 1) / 2  # QK^T and PV over the causal triangle
      row = dict(shape=shape, length=T, seconds=medians,
                 torch_over_ours=medians['torch'] / medians['flash_cpu'],
                 forward_gflops={name: flops / s / 1e9 for name, s in medians.items()
                                 if 'fwd_bwd' not in name})
      if args.backward:
        row['torch_over_ours_fwd_bwd'] = (medians['torch_fwd_bwd'] /
                                          medians['flash_cpu_fwd_bwd'])
      rows.append(row)
      print(f"{shape} T={T}: " + ', '.join(f'{n} {s * 1e3:.1f} ms' for n, s in medians.items())
            + f"; torch/ours {row['torch_over_ours']:.2f}"
            + (f", fwd+bwd {row['torch_over_ours_fwd_bwd']:.2f}" if args.backward else ''),
            flush=True)
  model_rows = bench_model(args.lengths, args.reps) if args.model else []
  load_end = os.getloadavg()
  # Busy: other processes held half the cores when the run started (the end includes our own).
  busy = load_start[0] > 0.5 * threads
  result = dict(cpu=cpu_model(), usable_cores=threads, torch=torch.__version__,
                jax=jax.__version__, kernel_threads=cpu_attention.num_threads(), reps=args.reps,
                load_average_start=load_start, load_average_end=load_end, busy=busy, rows=rows,
                model_rows=model_rows)
  print(f"load average start {load_start}, end {load_end}" +
        (' (BUSY machine: indicative only)' if busy else ''))
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  main()
