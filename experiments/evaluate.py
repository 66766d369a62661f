"""Runs the evaluate stage (then refreshes report.md).

  python -m experiments.evaluate --config configs/demo.py --workdir runs/demo
"""

from absl import app

from experiments import common
from longrope_jax import runtime


def main(argv):
  del argv
  common.setup()
  common.run_stages(('evaluate', 'report'))


if __name__ == '__main__':
  runtime.tune_malloc()  # XLA:CPU scratch buffers reused, not faulted in again
  app.run(main)
