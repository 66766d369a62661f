"""Does the model copy yet? Prints, for the workdir's latest checkpoint, the teacher-forced NLL of
the passkey answer's digits and of repeated random strings (`data.copy_sample`), without scaling.

  python -m experiments.copy_probe --config configs/demo.py --workdir runs/demo

A guess among digits is ln 10 = 2.30 nats per answer digit, and ln 62 = 4.13 on the strings'
letters and digits; a model that retrieves drives both toward 0. Safe to run while the
pretraining writes checkpoints.
"""

import math

import jax.numpy as jnp
import numpy as np
from absl import app

from experiments import common
from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import pipeline
from longrope_jax import rope as rope_lib


def main(argv):
  del argv
  common.setup()
  run = pipeline.Run(common.CONFIG.value, common.WORKDIR.value)
  mc, tok = run.model_config, run.tokenizer
  params = run.params()
  rope = rope_lib.none(head_dim=mc.head_dim)
  length = max(mc.original_length, data_lib.PASSKEY_MIN_LENGTH)
  answer = eval_lib.passkey_answer_nll(mc, params, tok, length, rope, seed=run.config.seed)
  print(f'passkey answer NLL per digit at {length} tokens: '
        f"{', '.join(f'{x:.3f}' for x in answer)} (guess: ln 10 = {math.log(10):.3f})")
  rng = np.random.default_rng([run.config.seed, 7])
  rows = np.stack([data_lib.copy_sample(rng, mc.original_length, tok) for _ in range(16)])
  nll = np.asarray(eval_lib.nll_fn(mc)(params, jnp.asarray(rows), rope))
  quarters = np.array_split(nll.mean(axis=0), 4)
  print('repeated-string NLL by quarter of the window: '
        f"{', '.join(f'{q.mean():.3f}' for q in quarters)} "
        f'(guess: ln {len(data_lib.COPY_ALPHABET)} = {math.log(len(data_lib.COPY_ALPHABET)):.3f})')


if __name__ == '__main__':
  app.run(main)
