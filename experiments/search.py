"""Runs the LongRoPE search stage (then refreshes report.md).

  python -m experiments.search --config configs/demo.py --workdir runs/demo
  python -m experiments.search --config configs/demo.py --workdir runs/demo \
      --config.search.settings.strategy=CMA_ES --config.search.settings.generations=20

A killed search resumes from workdir/search/ckpt when run again with the same config.
"""

from absl import app

from experiments import common
from longrope_jax import runtime


def main(argv):
  del argv
  common.setup()
  common.run_stages(('search', 'report'))


if __name__ == '__main__':
  runtime.tune_malloc()  # XLA:CPU scratch buffers reused, not faulted in again
  app.run(main)
