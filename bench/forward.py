"""Forward throughput of the demo model at 2K and 8K tokens, and model FLOP utilization against
this machine's f32 matmul peak measured in the same run.

  python bench/forward.py [--variant demo] [--lengths 2048 8192] [--attention blockwise]

Prints a table and writes bench/results/forward.json. Never asserts on time.
"""

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib


def best_time(fn, repeats: int) -> float:
  fn()  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """f32 FLOP/s of an n^3 matmul (the machine's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  return 2 * n**3 / best_time(lambda: f(a, b).block_until_ready(), repeats)


def forward_flops(cfg: model_lib.ModelConfig, T: int) -> float:
  """Model FLOPs of one causal forward over T tokens: 2 x matmul params per token, plus
  QK^T and PV over the causal half (the work a perfect kernel must do)."""
  D, N, K, H, F, V = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  per_token = cfg.num_layers * (2 * D * (2 * N * H + 2 * K * H) + 2 * 3 * D * F) + 2 * D * V
  attention = cfg.num_layers * 2 * 2 * N * H * T * (T + 1) / 2
  return per_token * T + attention


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--variant', default='demo')
  parser.add_argument('--attention', default=None, help='dense | blockwise (default: the '
                      'variant\'s, blockwise when registered)')
  parser.add_argument('--lengths', type=int, nargs='+', default=[2048, 8192])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'results' / 'forward.json'))
  args = parser.parse_args()

  impl = args.attention or 'blockwise'
  cfg = model_lib.get_config(args.variant, attention=impl)
  params = model_lib.init_params(cfg, jax.random.key(0))
  rope = rope_lib.yarn(head_dim=cfg.head_dim, scale=8.0, theta=cfg.rope_theta,
                       original_length=cfg.original_length)
  fwd = jax.jit(lambda p, t, pos, r: model_lib.forward(cfg, p, t, pos, r))
  peak = matmul_peak()
  rows = []
  for T in args.lengths:
    tokens = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    seconds = best_time(lambda: fwd(params, tokens, positions, rope).block_until_ready(),
                        args.repeats)
    flops = forward_flops(cfg, T)
    rows.append(dict(length=T, seconds=seconds, tokens_per_sec=T / seconds,
                     model_flops=flops, flops_per_sec=flops / seconds,
                     mfu=flops / seconds / peak))
  result = dict(variant=args.variant, attention=impl, params=cfg.num_params(),
                matmul_peak_flops=peak, devices=str(jax.devices()), cpu_count=__import__('os').cpu_count(),
                machine=platform.machine(), jax=jax.__version__, rows=rows)
  print(f"{args.variant} ({cfg.num_params():,} params, attention={impl}); "
        f"f32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  print(f"{'T':>6} {'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6}")
  for r in rows:
    print(f"{r['length']:>6} {r['seconds']:>8.3f} {r['tokens_per_sec']:>9.0f} "
          f"{r['flops_per_sec'] / 1e9:>8.1f} {r['mfu']:>6.1%}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
