"""Runs the evaluate stage (then refreshes report.md).

  python -m experiments.evaluate --config configs/demo.py --workdir runs/demo
"""

from absl import app

from experiments import common


def main(argv):
  del argv
  common.setup()
  common.run_stages(('evaluate', 'report'))


if __name__ == '__main__':
  app.run(main)
