"""Process settings that must be in place before the process starts: glibc malloc tunables.

XLA:CPU takes each call's scratch buffers from malloc; with glibc's defaults buffers above the
mmap threshold (attention scores, activations at long lengths) are mapped and unmapped on every
call, each page faulted in again. With MALLOC_TUNABLES (one arena, no mmap, no trimming) the
heap keeps and reuses them (the CPU-speed study: no page faults after the first call); freed
memory stays with the process. glibc reads GLIBC_TUNABLES at start-up only, so with
LONGROPE_MALLOC=tuned an entry point re-executes itself once (`reexec_with_malloc_tunables`);
unset or 'default' keeps glibc's settings (opt-in until a quiet benchmark shows the gain: on the
loaded 2-core machine the page faults of a demo forward at 8K fell for blockwise attention
(12.5K -> 8.3K per call) but not reliably for dense or chunked). Equivalent by hand:

  export GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:\
glibc.malloc.trim_threshold=68719476736
"""

from __future__ import annotations

import os
import platform
import sys

MALLOC_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=68719476736')
SWITCH = 'LONGROPE_MALLOC'  # 'tuned' or 'default' (unset: glibc's own settings)
SWITCH_VALUES = ('tuned', 'default')


def malloc_env(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment to restart with (MALLOC_TUNABLES added to GLIBC_TUNABLES), or None when
  nothing is to change: not switched on (LONGROPE_MALLOC=tuned), already set, or not glibc
  Linux."""
  switch = environ.get(SWITCH, 'default')
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
