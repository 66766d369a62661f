"""The run says what it ran: which attention implementation computes (the kernel, or blockwise
after a fallback, with the reason), from which commit and command."""

import re
import subprocess
import sys

import pytest

from longrope_jax import console
from longrope_jax import cpu_attention
from longrope_jax import model as model_lib
from longrope_jax import report as report_lib


def test_an_implementation_without_fallback_runs_as_requested():
  for name in ('dense', 'blockwise', 'chunked', 'ring', 'fused'):
    assert model_lib.attention_that_runs(name) == dict(requested=name, ran=name, reason=None)
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    model_lib.attention_that_runs('flash')


def test_flash_cpu_that_cannot_be_built_runs_blockwise_and_says_why(monkeypatch):
  reason = 'no C++ compiler found (set $CXX or install g++)'
  monkeypatch.setattr(cpu_attention, '_state', {'error': reason})  # what a failed build leaves
  assert not cpu_attention.available()
  assert model_lib.attention_that_runs('flash_cpu') == dict(
      requested='flash_cpu', ran='blockwise', reason=reason)
  monkeypatch.setattr(cpu_attention, '_state', {'lib': object()})  # a built kernel
  assert model_lib.attention_that_runs('flash_cpu') == dict(
      requested='flash_cpu', ran='flash_cpu', reason=None)


def test_the_report_line_groups_parts_and_names_a_fallback():
  kernel = dict(requested='flash_cpu', ran='flash_cpu', reason=None)
  fallback = dict(requested='flash_cpu', ran='blockwise', reason='no C++ compiler found')
  dense = dict(requested='dense', ran='dense', reason=None)
  assert report_lib.attention_line(dict(model=kernel, search=kernel)) == (
      'Attention: flash_cpu (model, search).')
  assert report_lib.attention_line(dict(model=fallback, search=fallback,
                                        progressive_search=dense)) == (
      'Attention: flash_cpu requested, blockwise ran (no C++ compiler found) (model, search); '
      'dense (progressive search).')
  text = report_lib.render({'attention': dict(model=fallback)}, model='Model: x.')
  assert 'Attention: flash_cpu requested, blockwise ran (no C++ compiler found) (model).' in text


def test_source_commit_is_the_checkouts_head():
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                        cwd=console.__file__.rsplit('/', 2)[0])
  commit = console.source_commit()
  if head.returncode:  # not a git checkout
    assert commit is None
  else:
    assert re.fullmatch(r'[0-9a-f]{40}(-dirty)?', commit) and commit.startswith(
        head.stdout.strip())


def test_command_line_is_the_command_as_typed():
  out = subprocess.run([sys.executable, '-c', 'from longrope_jax import console; '
                        'print(console.command_line())', '--flag=a b'],
                       capture_output=True, text=True, check=True).stdout.strip()
  assert out == f"{sys.executable} -c 'from longrope_jax import console; " \
                f"print(console.command_line())' '--flag=a b'"
