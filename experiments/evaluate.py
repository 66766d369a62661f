"""Runs the evaluate stage (then refreshes report.md).

  python -m experiments.evaluate --config configs/demo.py --workdir runs/demo
"""

from absl import app

from experiments import common
from longrope_jax import pipeline


def main(argv):
  del argv
  common.setup()
  pipeline.run(common.CONFIG.value, common.WORKDIR.value, stages=('evaluate', 'report'))


if __name__ == '__main__':
  app.run(main)
