"""The malloc tunables an entry point restarts with."""

import os
import subprocess
import sys

import pytest

from longrope_jax import runtime


def test_malloc_env_adds_tunables_once_and_keeps_others():
  env = runtime.malloc_env({'GLIBC_TUNABLES': 'glibc.pthread.rseq=0', 'X': '1',
                            'LONGROPE_MALLOC': 'tuned'})
  assert env['GLIBC_TUNABLES'] == 'glibc.pthread.rseq=0:' + runtime.MALLOC_TUNABLES
  assert env['X'] == '1'
  assert runtime.malloc_env(env) is None  # already set: no second restart
  assert runtime.malloc_env({'LONGROPE_MALLOC': 'default'}) is None
  assert runtime.malloc_env({}) is None  # opt-in


def test_malloc_env_rejects_unknown_switch():
  with pytest.raises(ValueError, match='LONGROPE_MALLOC must be one of'):
    runtime.malloc_env({'LONGROPE_MALLOC': 'fast'})


def test_reexec_restarts_with_tunables():
  code = ('import os; from longrope_jax import runtime; runtime.reexec_with_malloc_tunables(); '
          'print(os.environ.get("GLIBC_TUNABLES"))')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LONGROPE_MALLOC')}
  env['LONGROPE_MALLOC'] = 'tuned'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == runtime.MALLOC_TUNABLES
  env['LONGROPE_MALLOC'] = 'default'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == 'None'
