"""Forward of one sequence against PyTorch + transformers, and model FLOP utilization.

  python bench/forward.py [--shapes demo,wide] [--lengths 2048,8192,16384]
                          [--impls blockwise,chunked,flash_cpu] [--repeats 5] [--force]

For each shape, length and attention implementation: this repo's jitted forward (logits) against
transformers' LlamaForCausalLM (sdpa) with the same weights (loaded from ours through
hf.save_params), torch.inference_mode, all usable cores, calls interleaved round by round.
Reports the median seconds, torch time / ours per round (min, median, max), the max |logits
difference| at the shortest length, and model FLOP utilization: the forward's matmul FLOPs
(causal attention counted at half) / time, against the f32 2048^3 matmul peak of jnp.dot and of
torch.matmul measured in the same run.

Shapes: demo = model.get_config('demo') (dim 128, 4 layers, 2 heads, 1 kv head, head dim 64);
wide = dim 256, 4 layers, 4 heads, 4 kv heads, head dim 64, MLP 768.
Writes bench/results/forward.json; never asserts on time.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {
    'demo': {},
    'wide': dict(dim=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768),
}


def model_config(shape: str, impl: str):
  from longrope_jax import model as model_lib
  return model_lib.get_config('demo', attention=impl, **SHAPES[shape])


def forward_flops(cfg, T: int) -> float:
  """Model FLOPs of one causal forward over T tokens: 2 x matmul params per token (projections,
  MLP, logits) plus QK^T and PV over the causal half (the work an ideal kernel must do)."""
  D, N, K, H, F, V = (cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                      cfg.vocab_size)
  per_token = cfg.num_layers * (2 * D * (2 * N * H + 2 * K * H) + 2 * 3 * D * F) + 2 * D * V
  attention = cfg.num_layers * 2 * 2 * N * H * T * (T + 1) / 2
  return per_token * T + attention


def torch_from_ours(config, params, length: int):
  """LlamaForCausalLM (sdpa, f32) holding `params` (written and read as an HF checkpoint)."""
  import transformers

  from longrope_jax import hf as hf_lib
  with tempfile.TemporaryDirectory() as tmp:
    hf_lib.save_params(params, config, tmp)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation='sdpa',
                                                          dtype='float32')
  return model.eval()


def bench_shape(shape: str, lengths: list[int], impls: list[str], repeats: int,
                peaks: dict) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib

  base = model_config(shape, "dense")
  params = model_lib.init_params(base, jax.random.key(0))
  rope = rope_lib.none(head_dim=base.head_dim)
  torch_model = torch_from_ours(base, params, max(lengths))
  rows = []
  for i, length in enumerate(lengths):
    tokens = np.random.default_rng(length).integers(0, base.vocab_size, (1, length))
    tokens_j, tokens_t = jnp.asarray(tokens, jnp.int32), torch.from_numpy(tokens)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    fns, jitted = {}, {}

    def torch_forward():
      with torch.inference_mode():
        return torch_model(tokens_t).logits

    fns['torch'] = torch_forward
    for impl in impls:
      cfg = base.replace(attention=impl)
      jitted[impl] = jax.jit(lambda p, t, cfg=cfg: model_lib.forward(cfg, p, t, positions, rope))
      fns[impl] = lambda f=jitted[impl]: f(params, tokens_j).block_until_ready()
    compile_s = {impl: harness.time_call(fns[impl]) for impl in impls}
    diff = {}
    if i == 0:  # same computation: logits against torch's
      ref = torch_forward().numpy()
      diff = {impl: float(np.abs(np.asarray(jitted[impl](params, tokens_j)) - ref).max())
              for impl in impls}
    faults = {name: harness.minor_faults(fn) for name, fn in fns.items()}
    times = harness.interleaved(fns, repeats, warmup=0)  # compiled and warmed above
    summary = harness.summarize(times, 'torch')
    flops = forward_flops(base, length)
    med = summary['seconds_median']
    mfu = {name: dict(flops_per_s=flops / t,
                      vs_jax_peak=flops / t / peaks['jax'],
                      vs_torch_peak=flops / t / peaks.get('torch', float('nan')))
           for name, t in med.items()}
    rows.append(dict(shape=shape, length=length, config=_fields(base), model_flops=flops,
                     first_call_seconds=compile_s, max_abs_logits_diff_vs_torch=diff,
                     minor_faults_per_call=faults,
                     mfu=mfu, **summary))
    print(f"{shape:5s} T={length:6d}  median s: " +
          '  '.join(f'{n} {t:.3f}' for n, t in med.items()) +
          f"  | torch/ours {harness.format_ratios(summary)}  | MFU vs torch peak " +
          '  '.join(f"{n} {m['vs_torch_peak']:.0%}" for n, m in mfu.items()) +
          (f"  | max|dlogits| {max(diff.values()):.1e}" if diff else ''), flush=True)
  return rows


def _fields(cfg) -> dict:
  return {k: getattr(cfg, k) for k in ('vocab_size', 'dim', 'num_layers', 'num_heads',
                                       'num_kv_heads', 'head_dim', 'mlp_dim')}


def run_forward(args, run: harness.Run) -> dict:
  """The forward part (also bench/attention.py --parts speed)."""
  impls = harness.attention_impls(args.impls)
  peaks = harness.matmul_peaks()
  print(f"f32 2048^3 matmul peak: jax {peaks['jax'] / 1e9:.0f} GFLOP/s, torch "
        f"{peaks.get('torch', float('nan')) / 1e9:.0f} GFLOP/s; {run.cores} cores", flush=True)
  lengths = [int(x) for x in str(args.lengths).split(',')]
  rows = []
  for shape in args.shapes.split(','):
    rows += bench_shape(shape, lengths, impls, args.repeats, peaks)
  return dict(impls=impls, matmul_peak_flops=peaks, rows=rows)


def add_args(p):
  p.add_argument('--shapes', default='demo,wide', help=f'comma-separated, of {sorted(SHAPES)}')
  p.add_argument('--lengths', default='2048,8192,16384')


def main(argv=None):
  p = harness.parser(__doc__, out='forward.json', repeats=5)
  add_args(p)
  args = p.parse_args(argv)
  run = harness.Run(args)
  run.write(run_forward(args, run))


if __name__ == '__main__':
  main()
