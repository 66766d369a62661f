"""glibc malloc tuned by mallopt: big buffers freed and allocated again are not faulted in again."""

import os
import subprocess
import sys

import pytest

from longrope_jax import runtime

# Allocates, touches and frees a 64 MB buffer (above glibc's largest mmap threshold, 32 MB) 5
# times after tune_malloc; prints the minor page faults of the last 4 rounds.
PROBE = """
import resource, sys
import numpy as np
from longrope_jax import runtime
print(runtime.tune_malloc(), file=sys.stderr)
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(5):
  if i == 1:
    start = faults()
  buf = np.ones(16 * 2 ** 20, np.float32)
  del buf
print(faults() - start)
"""


def _faults(switch: str) -> tuple[int, str]:
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', runtime.SWITCH)}
  env[runtime.SWITCH] = switch
  env['NUMPY_MADVISE_HUGEPAGE'] = '0'  # 4 KB pages, as XLA's buffers get
  done = subprocess.run([sys.executable, '-c', PROBE], env=env, capture_output=True, text=True,
                        check=True)
  return int(done.stdout.strip()), done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc malloc')
def test_tuned_malloc_reuses_freed_buffers_and_default_does_not():
  tuned, applied = _faults('tuned')
  default, not_applied = _faults('default')
  assert (applied, not_applied) == ('True', 'False')
  pages = 4 * 64 * 2 ** 20 // 4096  # four rounds of 64 MB, every page faulted again
  assert default > 0.9 * pages
  assert tuned < 0.05 * pages


def test_switch_is_validated_and_on_by_default():
  assert runtime.malloc_switch({}) == 'tuned'
  assert runtime.malloc_switch({runtime.SWITCH: 'default'}) == 'default'
  with pytest.raises(ValueError, match="LONGROPE_MALLOC must be one of"):
    runtime.malloc_switch({runtime.SWITCH: 'fast'})
  assert runtime.tune_malloc({runtime.SWITCH: 'default'}) is False
