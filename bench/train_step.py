"""Training-step throughput of the demo model against PyTorch + transformers, and why the model's
projections are 2-D matmuls.

  python bench/train_step.py [--repeats 10] [--out bench/results/train_step.json]

1. One AdamW step (forward, backward, update) of the demo model at the pretraining shape
   (16 x 256 bytes): this repo's jitted step against transformers' LlamaForCausalLM (sdpa) at the
   same configuration with torch.optim.AdamW, interleaved so both see the same load.
2. The gradient of one SwiGLU block at that shape written with 3-D einsums (BTD,DF->BTF) against
   the same block over M = B * T rows as 2-D matmuls, as model.py has it.

Prints figures and writes JSON; never asserts on time. Needs the `compare` extra (torch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import hf as hf_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def jax_step_fn(config: model_lib.ModelConfig, tokens: np.ndarray):
  optimizer = train_lib.make_optimizer(train_lib.OptimConfig(steps=1000, lr=1e-3, warmup=0))
  state = train_lib.init_state(config, optimizer, jax.random.key(0))
  step = train_lib.make_train_step(config, optimizer)
  rope = rope_lib.none(head_dim=config.head_dim)
  x = jnp.asarray(tokens)
  holder = {'state': state}

  def run():
    holder['state'], metrics = step(holder['state'], x, rope)
    jax.block_until_ready(metrics['loss'])
  return run


def torch_step_fn(config: model_lib.ModelConfig, tokens: np.ndarray):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  hf = LlamaConfig.from_dict(hf_lib.hf_config_for(config), attn_implementation='sdpa')
  model = LlamaForCausalLM(hf)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  x = torch.tensor(tokens, dtype=torch.long)

  def run():
    logits = model(x[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             x[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return run, torch.get_num_threads()


def mlp_grad_fns(B: int, T: int, D: int, F: int):
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


def interleaved(fns: dict, repeats: int) -> dict:
  """Median seconds per call of each function, calls interleaved round-robin after a warm-up."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'train_step.json'))
  args = parser.parse_args()

  config = model_lib.get_config('demo', attention='dense')
  B, T = args.batch, config.original_length
  tokens = np.random.default_rng(0).integers(0, 256, (B, T + 1)).astype(np.int32)
  torch_run, torch_threads = torch_step_fn(config, tokens)
  step = interleaved({'jax': jax_step_fn(config, tokens), 'torch': torch_run}, args.repeats)
  mlp = interleaved(mlp_grad_fns(B, T, config.dim, config.mlp_dim), args.repeats * 2)

  result = dict(
      machine=dict(platform=platform.platform(), jax=jax.__version__,
                   devices=str(jax.devices()), torch_threads=torch_threads),
      shape=dict(batch=B, length=T, variant='demo', params=config.num_params()),
      train_step_seconds=step,
      train_step_tokens_per_sec={k: B * T / v for k, v in step.items()},
      jax_over_torch_time=step['jax'] / step['torch'],
      mlp_grad_seconds=mlp,
      mlp_einsum_3d_over_matmul_2d=mlp['einsum_3d'] / mlp['matmul_2d'])
  print(f"train step, demo model, {B} x {T} tokens (median of {args.repeats}, interleaved):")
  for name, seconds in step.items():
    print(f"  {name:6s} {seconds * 1e3:8.1f} ms   {B * T / seconds:8.0f} tokens/s")
  print(f"  jax / torch time: {result['jax_over_torch_time']:.2f}")
  print(f"SwiGLU block gradient at [{B}, {T}, {config.dim}] -> {config.mlp_dim}:")
  for name, seconds in mlp.items():
    print(f"  {name:10s} {seconds * 1e3:8.2f} ms")
  print(f"  3-D einsum / 2-D matmul time: {result['mlp_einsum_3d_over_matmul_2d']:.2f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
