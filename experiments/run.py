"""Runs every stage in config.stages (pretrain, search, evaluate, report, ...).

  python -m experiments.run --config configs/demo.py --workdir runs/demo
"""

from absl import app

from experiments import common
from longrope_jax import runtime


def main(argv):
  del argv
  common.setup()
  common.run_stages(None)


if __name__ == '__main__':
  runtime.tune_malloc()  # XLA:CPU scratch buffers reused, not faulted in again
  app.run(main)
