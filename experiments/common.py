"""Shared flag handling for the entry points: --config (ml_collections, locked), --workdir, the
console's --log_level, and the distributed setting of a multi-process (multi-host) run."""

import sys

from absl import flags
from ml_collections import config_flags

from longrope_jax import console
from longrope_jax import mesh as mesh_lib

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py), '
                                         'optionally with :variant.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: outputs go here and an '
                              'interrupted run resumes from it.')
flags.mark_flags_as_required(['config', 'workdir'])
LOG_LEVEL = flags.DEFINE_enum('log_level', 'warning', list(console.LOG_LEVELS),
                              'Logging level of the library and its dependencies (absl, orbax, '
                              'jax); info brings back their progress lines.')

COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 in a multi-process run (default: '
    '$JAX_COORDINATOR_ADDRESS); "auto" detects a TPU pod, SLURM or Open MPI cluster.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run '
                                     '(default: $JAX_NUM_PROCESSES; unset: one process).')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 '
                                  '(default: $JAX_PROCESS_ID).')


def initialize_distributed() -> bool:
  """Joins the multi-process runtime if the flags or environment ask for it (call first)."""
  return mesh_lib.maybe_initialize_distributed(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value,
                                               PROCESS_ID.value)


def setup() -> bool:
  """Sets library logging to --log_level (unless absl's own --verbosity was given), then joins
  the multi-process runtime if asked (call first in every entry point's main)."""
  if not flags.FLAGS['verbosity'].present:
    console.configure_logging(LOG_LEVEL.value)
  return initialize_distributed()


def run_stages(stages: tuple[str, ...] | None) -> None:
  """pipeline.run on the flags' config and workdir; a problem the user can fix (a bad config
  value, a workdir made with another config, a damaged file) ends the run with its message and
  exit status 2 instead of a traceback."""
  from longrope_jax import checkpoint as ckpt_lib
  from longrope_jax import pipeline
  from longrope_jax import provenance
  from longrope_jax import validation
  try:
    pipeline.run(CONFIG.value, WORKDIR.value, stages=stages)
  except (validation.ConfigError, provenance.StaleWorkdirError, ckpt_lib.WorkdirError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
