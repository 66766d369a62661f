"""Process settings: glibc malloc keeps XLA:CPU's scratch buffers instead of unmapping them; the
project's cache directory (compiled kernels, converted checkpoints).

XLA:CPU takes each call's scratch buffers from malloc. With glibc's defaults a buffer above the
mmap threshold (activations, attention scores, gradients) is mapped and unmapped on every call,
and each of its pages is faulted in and zeroed again: the demo's training step faulted about 65K
pages (260 MB) per step. `tune_malloc` sets glibc's mallopt once (no mmap, no trimming, one
arena), so the heap keeps and reuses those buffers: 8x fewer page faults and a faster step
(bench/train_step.py). Freed memory then stays with the process: it holds its peak, not more.

The entry points (experiments/, bench/) call it first thing; it is on unless LONGROPE_MALLOC is
'default'. In a notebook, call `runtime.tune_malloc()` before the first JAX computation. Outside
glibc Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import platform
import sys

SWITCH = 'LONGROPE_MALLOC'  # 'tuned' (the default) or 'default' (glibc's own settings)
SWITCH_VALUES = ('tuned', 'default')
# mallopt parameters (glibc malloc.h) and their values: no mmap'd chunks, never trim the heap's
# top, one arena for all threads.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOPT = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1), (M_ARENA_MAX, 1))


def malloc_switch(environ: dict[str, str]) -> str:
  """LONGROPE_MALLOC's value ('tuned' when unset); a clear error for anything else."""
  switch = environ.get(SWITCH, 'tuned')
  if switch not in SWITCH_VALUES:
    raise ValueError(f"{SWITCH} must be one of {SWITCH_VALUES} ('default' keeps glibc's own "
                     f"malloc settings), got {switch!r}.")
  return switch


def tune_malloc(environ: dict[str, str] | None = None) -> bool:
  """Applies MALLOPT unless LONGROPE_MALLOC=default or the C library is not glibc; True when
  applied. Safe to call more than once."""
  if malloc_switch(dict(os.environ) if environ is None else environ) == 'default':
    return False
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(param, value) == 1 for param, value in MALLOPT)


def cache_dir() -> pathlib.Path:
  """Where the project caches what it builds once (compiled kernels, checkpoints converted from
  GGUF): $LONGROPE_JAX_CACHE, else $XDG_CACHE_HOME/longrope_jax or ~/.cache/longrope_jax."""
  if 'LONGROPE_JAX_CACHE' in os.environ:
    return pathlib.Path(os.environ['LONGROPE_JAX_CACHE'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'longrope_jax'
