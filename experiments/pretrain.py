"""Runs the pretrain stage (then refreshes report.md).

  python -m experiments.pretrain --config configs/demo.py --workdir runs/demo
"""

from absl import app

from experiments import common


def main(argv):
  del argv
  common.setup()
  common.run_stages(('pretrain', 'report'))


if __name__ == '__main__':
  app.run(main)
