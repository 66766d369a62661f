"""How fast does the demo model learn to copy? This repo's train step against PyTorch +
transformers' LlamaForCausalLM at the same configuration, on the same batches of repeated random
strings (`data.copy_sample`), with the same AdamW, schedule and clipping.

  python -m experiments.copy_curve [--steps 300 --batch 32 --length 64 --units 4,16]

Prints both training-loss curves side by side with two reference levels per batch: 'bag', the
loss of a model that knows which symbols the string uses but not their order (ln 62 on the first
copy, ln unit after), and 'copy', that of one that copies perfectly (ln 62 on the first copy, 0
after). Copying has emerged when the loss falls well below 'bag'. Needs the `compare` extra.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import data as data_lib
from longrope_jax import hf as hf_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib


def period(row: np.ndarray) -> int:
  """Length of the repeated unit of a copy row (BOS first)."""
  body = row[1:]
  return next(p for p in range(1, body.size) if np.array_equal(body[p:], body[:-p]))


def reference_losses(rows_BT: np.ndarray) -> tuple[float, float]:
  """Mean next-token loss of the 'bag' and 'copy' models over the targets rows[:, 1:]."""
  alphabet = math.log(len(data_lib.COPY_ALPHABET))
  bag, copy = [], []
  for row in rows_BT:
    u, n = period(row), row.size - 1
    bag.append((u * alphabet + (n - u) * math.log(u)) / n)
    copy.append(u * alphabet / n)
  return float(np.mean(bag)), float(np.mean(copy))


def torch_trainer(config: model_lib.ModelConfig, optim: train_lib.OptimConfig, seed: int):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(seed)
  model = LlamaForCausalLM(LlamaConfig.from_dict(
      hf_lib.hf_config_for(config), initializer_range=config.dim ** -0.5,
      attn_implementation='sdpa'))
  opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(0.9, optim.b2),
                          weight_decay=optim.weight_decay)
  schedule = jax.jit(train_lib.make_schedule(optim))

  def step(i: int, rows_BT: np.ndarray) -> float:
    for group in opt.param_groups:
      group['lr'] = float(schedule(i))
    x = torch.tensor(rows_BT, dtype=torch.long)
    logits = model(x[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             x[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip)
    opt.step()
    return loss.item()
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='demo')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=64)
  parser.add_argument('--units', default='4,16', help='min,max length of the repeated string')
  parser.add_argument('--lr', type=float, default=4e-3)
  parser.add_argument('--warmup', type=int, default=50)
  parser.add_argument('--every', type=int, default=50)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  min_unit, max_unit = (int(x) for x in args.units.split(','))
  if not 1 <= min_unit <= max_unit < args.length // 2:
    raise ValueError(f"--units must be min,max with 1 <= min <= max < length / 2 = "
                     f"{args.length // 2}, got {args.units!r}.")

  config = model_lib.get_config(args.variant, attention='dense')
  tok = data_lib.ByteTokenizer()
  optim = train_lib.OptimConfig(steps=args.steps, lr=args.lr, warmup=args.warmup)
  optimizer = train_lib.make_optimizer(optim)
  state = train_lib.init_state(config, optimizer, jax.random.key(args.seed))
  jax_step = train_lib.make_train_step(config, optimizer)
  torch_step = torch_trainer(config, optim, args.seed)
  rope = rope_lib.none(head_dim=config.head_dim)

  print(f"{args.variant} model, {args.batch} rows x {args.length} tokens of strings of "
        f"{min_unit}-{max_unit} symbols repeated; mean loss per {args.every} steps (nats)")
  print(f"{'step':>6} {'jax':>7} {'torch':>7} {'bag':>7} {'copy':>7}")
  window = {'jax': [], 'torch': [], 'bag': [], 'copy': []}
  for i in range(args.steps):
    rng = np.random.default_rng([args.seed, i])
    rows_BT = np.stack([data_lib.copy_sample(rng, args.length + 1, tok, min_unit, max_unit)
                        for _ in range(args.batch)])
    state, metrics = jax_step(state, jnp.asarray(rows_BT), rope)
    window['torch'].append(torch_step(i, rows_BT))
    window['jax'].append(metrics['loss'])  # read back once per report, not per step
    bag, copy = reference_losses(rows_BT)
    window['bag'].append(bag)
    window['copy'].append(copy)
    if (i + 1) % args.every == 0 or i + 1 == args.steps:
      means = {k: np.mean(jax.device_get(v)) for k, v in window.items()}
      print(f"{i + 1:6d} {means['jax']:7.3f} {means['torch']:7.3f} {means['bag']:7.3f} "
            f"{means['copy']:7.3f}", flush=True)
      window = {k: [] for k in window}


if __name__ == '__main__':
  main()
