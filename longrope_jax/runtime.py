"""Process settings that must be in place before the process starts: glibc malloc tunables.

XLA:CPU takes each call's scratch buffers from malloc; with glibc's defaults buffers above the
mmap threshold (attention scores, activations at long lengths) are mapped and unmapped on every
call, each page faulted in again. With MALLOC_TUNABLES (one arena, no mmap, no trimming) the
heap keeps and reuses them: no page faults after the first call; freed memory stays with the
process. glibc reads GLIBC_TUNABLES at start-up only, so an entry point re-executes itself once
(`reexec_with_malloc_tunables`); LONGROPE_MALLOC=default turns this off. Equivalent by hand:

  export GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
"""

from __future__ import annotations

import os
import platform
import sys

MALLOC_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=68719476736')
SWITCH = 'LONGROPE_MALLOC'  # 'tuned' (default) or 'default' (glibc's own settings)
SWITCH_VALUES = ('tuned', 'default')


def malloc_env(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment to restart with (MALLOC_TUNABLES added to GLIBC_TUNABLES), or None when
  nothing is to change: switched off, already set, or not glibc Linux."""
  switch = environ.get(SWITCH, 'tuned')
  if switch not in SWITCH_VALUES:
    raise ValueError(f"{SWITCH} must be one of {SWITCH_VALUES}, got {switch!r}.")
  current = environ.get('GLIBC_TUNABLES', '')
  if switch == 'default' or 'glibc.malloc.mmap_max' in current:
    return None
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{current}:{MALLOC_TUNABLES}' if current else MALLOC_TUNABLES
  return env


def reexec_with_malloc_tunables() -> None:
  """Restarts this process (same interpreter and command line) with MALLOC_TUNABLES unless
  `malloc_env` says nothing is to change; call first thing in an entry point."""
  env = malloc_env(dict(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
