"""Test setup: 8 simulated CPU devices, so sharded code runs as it would on a pod slice.

Compilation dominates the tests' time (the models are tiny), and many tests, notebook kernels and
subprocesses compile the same programs. A persistent compilation cache shared by the session's
xdist workers and their subprocesses (through the environment) compiles each program once. It
is new for every session, so a run's time is a fresh machine's.
"""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='longrope-jax-xla-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def hf_assets(tmp_path_factory):
  """Tiny local HF checkpoints, tokenizers and PG19-like books (tests/hf_fixtures.py), built on
  first use and shared by the session's tests."""
  import hf_fixtures
  return hf_fixtures.Assets(tmp_path_factory.mktemp('hf_assets'))
