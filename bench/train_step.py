"""Training-step throughput of the demo model against PyTorch + transformers, and why the model's
projections are 2-D matmuls.

  python bench/train_step.py [--impls dense,chunked] [--devices 2] [--repeats 10] [--force]

1. One AdamW step (forward, backward, clip, update) of the demo model at the demo pretraining
   shape (configs/demo.py: 16 x 256 bytes, lr 4e-3, b2 0.95, weight decay 0.1, clip 1.0): this
   repo's jitted step, per attention implementation, against transformers' LlamaForCausalLM (sdpa)
   at the same configuration with torch.optim.AdamW and clip_grad_norm_, interleaved, all cores.
   `--devices N` runs ours data-parallel over N simulated CPU devices (mesh data = N).
2. The gradient of one SwiGLU block at that shape written with 3-D einsums (BTD,DF->BTF) against
   the same block over M = B * T rows as 2-D matmuls, as model.py has it.
3. The step's matmul shapes alone (M = B * T rows; forward and the two backward products of the
   MLP's up projection), jnp.dot against torch.matmul: what XLA:CPU's f32 GEMM leaves on the
   table, since about 60% of the step is these products.

Writes bench/results/train_step.json under bench/harness.py; never asserts on time. Needs the
`compare` extra (torch).
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

# configs/demo.py's pretraining (configs/common.py pretrain_section).
DEMO_PRETRAIN = dict(batch_size=16, lr=4e-3, warmup=50, steps=800, weight_decay=0.1, clip=1.0,
                     b2=0.95)


def jax_step_fn(config, tokens: np.ndarray, devices: int):
  import jax
  import jax.numpy as jnp

  from longrope_jax import mesh as mesh_lib
  from longrope_jax import rope as rope_lib
  from longrope_jax import train as train_lib
  c = DEMO_PRETRAIN
  optimizer = train_lib.make_optimizer(train_lib.OptimConfig(
      steps=c['steps'], lr=c['lr'], warmup=c['warmup'], weight_decay=c['weight_decay'],
      clip=c['clip'], b2=c['b2']))
  rope = rope_lib.none(head_dim=config.head_dim)
  if devices > 1:
    mesh = mesh_lib.make_mesh(data=devices)
    state = train_lib.init_sharded_state(config, optimizer, mesh, jax.random.key(0))
    step = train_lib.make_train_step(config, optimizer, mesh)
  else:
    state = train_lib.init_state(config, optimizer, jax.random.key(0))
    step = train_lib.make_train_step(config, optimizer)
  x = jnp.asarray(tokens)
  holder = {'state': state}

  def run():
    holder['state'], metrics = step(holder['state'], x, rope)
    jax.block_until_ready(metrics['loss'])
  return run


def torch_step_fn(config, tokens: np.ndarray):
  import torch
  c = DEMO_PRETRAIN
  model = harness.torch_llama(config)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=c['lr'], betas=(0.9, c['b2']),
                          weight_decay=c['weight_decay'])
  x = torch.tensor(tokens, dtype=torch.long)

  def run():
    logits = model(x[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             x[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c['clip'])
    opt.step()
  return run


def mlp_grad_fns(B: int, T: int, D: int, F: int):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (B, T, D))
  w_gate, w_up = (jax.random.normal(k, (D, F)) * D ** -0.5 for k in keys[1:3])
  w_down = jax.random.normal(keys[3], (F, D)) * F ** -0.5

  def einsum_3d(x_BTD, g, u, d):
    h_BTF = jax.nn.silu(jnp.einsum('BTD,DF->BTF', x_BTD, g)) * jnp.einsum('BTD,DF->BTF', x_BTD, u)
    return jnp.einsum('BTF,FD->BTD', h_BTF, d).sum()

  def matmul_2d(x_BTD, g, u, d):
    x_MD = x_BTD.reshape(B * T, D)
    return ((jax.nn.silu(x_MD @ g) * (x_MD @ u)) @ d).sum()

  fns = {}
  for name, fn in (('einsum_3d', einsum_3d), ('matmul_2d', matmul_2d)):
    grad = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))
    fns[name] = lambda grad=grad: jax.block_until_ready(grad(x, w_gate, w_up, w_down))
  return fns


def main(argv=None):
  p = harness.parser(__doc__, out='train_step.json', repeats=10)
  p.set_defaults(impls='dense,chunked,flash_cpu')
  p.add_argument('--batch', type=int, default=DEMO_PRETRAIN['batch_size'])
  p.add_argument('--devices', type=int, default=1, help='simulated CPU devices (data parallel)')
  args = p.parse_args(argv)
  run = harness.Run(args)
  import jax
  if args.devices > 1:
    jax.config.update('jax_num_cpu_devices', args.devices)
  from longrope_jax import model as model_lib

  impls = harness.attention_impls(args.impls)
  base = model_lib.get_config('demo')
  B, T = args.batch, base.original_length
  tokens = np.random.default_rng(0).integers(0, 256, (B, T + 1)).astype(np.int32)
  fns = {'torch': torch_step_fn(base, tokens)}
  for impl in impls:
    fns[impl] = jax_step_fn(base.replace(attention=impl), tokens, args.devices)
  step = harness.summarize(harness.interleaved(fns, args.repeats), 'torch')
  mlp = harness.summarize(harness.interleaved(mlp_grad_fns(B, T, base.dim, base.mlp_dim),
                                              args.repeats * 2), None)
  D, F, M = base.dim, base.mlp_dim, B * T
  matmuls = {f'{m}x{k}x{n}': harness.matmul_rates(m, k, n, args.repeats * 2)
             for m, k, n in ((M, D, F), (M, F, D), (D, M, F))}  # x @ W, dy @ W.T, x.T @ dy
  med = step['seconds_median']
  print(f"train step, demo model, {B} x {T} tokens, {args.devices} JAX device(s) (median of "
        f"{args.repeats}, interleaved, {run.cores} cores):")
  for name, seconds in med.items():
    print(f"  {name:10s} {seconds * 1e3:8.1f} ms   {B * T / seconds:8.0f} tokens/s")
  print(f"  torch time / ours: {harness.format_ratios(step)}")
  mlp_med = mlp['seconds_median']
  print(f"SwiGLU block gradient at [{B}, {T}, {base.dim}] -> {base.mlp_dim}: " +
        '  '.join(f'{n} {s * 1e3:.2f} ms' for n, s in mlp_med.items()) +
        f"  (3-D / 2-D {mlp_med['einsum_3d'] / mlp_med['matmul_2d']:.2f})")
  print("the step's matmul shapes, best GFLOP/s: " + '  '.join(
      f"{shape} jax {r['jax'] / 1e9:.0f} torch {r.get('torch', float('nan')) / 1e9:.0f}"
      for shape, r in matmuls.items()))
  run.write(dict(shape=dict(batch=B, length=T, variant='demo', params=base.num_params()),
                 pretrain=DEMO_PRETRAIN, devices=args.devices, impls=impls, train_step=step,
                 tokens_per_sec={k: B * T / v for k, v in med.items()},
                 mlp_grad=mlp,
                 mlp_einsum_3d_over_matmul_2d=mlp_med['einsum_3d'] / mlp_med['matmul_2d'],
                 matmul_flops_per_sec=matmuls))


if __name__ == '__main__':
  main()
