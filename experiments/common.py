"""Shared flag handling for the entry points: --config (ml_collections, locked) and --workdir."""

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py), '
                                         'optionally with :variant.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: outputs go here and an '
                              'interrupted run resumes from it.')
flags.mark_flags_as_required(['config', 'workdir'])
