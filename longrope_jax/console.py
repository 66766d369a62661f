"""What a researcher sees on the console: quiet library logging, one header per stage, the closing
summary of a run, and the facts of the machine, source and command the numbers came from."""

from __future__ import annotations

import logging
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any, Mapping, TextIO

LOG_LEVELS = ('debug', 'info', 'warning', 'error')
# Python loggers of the libraries that log at INFO through the stages (orbax's checkpoint events,
# jax's backend discovery); absl's own logger carries most of them.
_QUIET_LOGGERS = ('absl', 'jax', 'orbax', 'etils', 'tensorflow', 'tensorboardX', 'matplotlib')


def configure_logging(level: str = 'warning') -> None:
  """Sets absl and library logging to `level` (one of LOG_LEVELS); call once, after flags."""
  if level.lower() not in LOG_LEVELS:
    raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {level!r}.")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(level.lower())
  python_level = getattr(logging, level.upper())
  logging.getLogger().setLevel(python_level)
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(python_level)


def _is_writer() -> bool:
  """True on process 0 (only it prints headers and summaries in a multi-process run)."""
  import jax
  return jax.process_index() == 0


def _emit(text: str, file: TextIO | None) -> str:
  if _is_writer():
    print(text, file=file or sys.stdout, flush=True)
  return text


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (list, tuple)):
    return ', '.join(_format_value(v) for v in value)
  return str(value)


def stage_header(name: str, details: Mapping[str, Any] | None = None, *,
                 file: TextIO | None = None) -> str:
  """Prints `== name ==` and, below it, one indented `key: value` line per detail (what the stage
  will do: lengths, methods, candidates); returns the text."""
  lines = [f'== {name} ==']
  for key, value in (details or {}).items():
    lines.append(f'   {key}: {_format_value(value)}')
  return _emit('\n'.join(lines), file)


def format_seconds(seconds: float) -> str:
  """'42.0s', '3m 05s', '1h 02m'."""
  if seconds < 60:
    return f'{seconds:.1f}s'
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f'{minutes}m {secs:02d}s'
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h {minutes:02d}m'


def _headline_index(perplexity: Mapping, search: Mapping | None) -> int:
  """Column of the headline table: the search length when it was evaluated, else the longest."""
  lengths = list(perplexity['lengths'])
  if search and search.get('target_length') in lengths:
    return lengths.index(search['target_length'])
  return len(lengths) - 1


def headline_table(perplexity: Mapping, search: Mapping | None = None) -> list[str]:
  """Lines: every method's held-out perplexity at the headline length, best first; methods with
  equal values share one row ('ntk = dynamic_ntk'), and only a single best is marked."""
  j = _headline_index(perplexity, search)
  L, L0 = perplexity['lengths'][j], perplexity['original_length']
  values = {name: m['perplexity'][j] for name, m in perplexity['methods'].items()
            if m['perplexity'][j] is not None}
  where = f"{perplexity.get('num_windows', '?')} {perplexity.get('split', 'held-out')} documents"
  lines = [f'held-out perplexity at {L} tokens ({L / L0:g}x the training length), {where}:']
  if not values:
    return lines + ['   (no method was evaluated at this length)']
  groups: dict[float, list[str]] = {}  # methods with the very same value share a row
  for name, value in values.items():
    groups.setdefault(value, []).append(name)
  rows = sorted((value, ' = '.join(names)) for value, names in groups.items())
  width = max(len(label) for _, label in rows)
  for i, (value, label) in enumerate(rows):
    mark = '  <- best' if i == 0 and ' = ' not in label else ''
    lines.append(f'   {label:<{width}}  {value:10.3f}{mark}')
  return lines


def search_gain(search: Mapping) -> str | None:
  """'searched factors 40.100 vs the best seed (yarn) 42.420: -5.5%' on the search's own
  (validation) windows, or None without seeds."""
  seeds = {name: s['perplexity'] for name, s in search.get('seeds', {}).items()
           if s.get('perplexity') is not None and math.isfinite(s['perplexity'])}
  if not seeds:
    return None
  best = min(seeds.values())
  name = ' = '.join(n for n, v in seeds.items() if v == best)
  ours = search['perplexity']
  return (f"searched factors {ours:.3f} vs the best seed ({name}) {best:.3f} at "
          f"{search['target_length']} tokens ({search.get('split', 'validation')} windows): "
          f"{100 * (ours / best - 1):+.1f}%")


def summary_text(results: Mapping, stage_seconds: Mapping[str, float], *,
                 report_path: str | os.PathLike | None = None,
                 tensorboard_dir: str | os.PathLike | None = None) -> str:
  """The closing block of a run from results.json's dict and each stage's wall time (seconds):
  where the report (and TensorBoard logs) are, the headline table, the searched factors' gain,
  stage times and total."""
  lines = ['== summary ==']
  if report_path is not None:
    lines.append(f'report: {report_path}')
  if tensorboard_dir is not None:
    lines.append(f'metrics: tensorboard --logdir {tensorboard_dir}')
  if 'machine' in results:
    lines.append(f"machine: {describe_machine(results['machine'])}")
  pre = results.get('pretrain')
  if pre and pre.get('val_bits_per_token') is not None:
    lines.append(f"pretraining: {pre.get('steps', '?')} steps, validation "
                 f"{pre['val_bits_per_token']:.3f} bits per token")
  search = results.get('search')
  if 'perplexity' in results:
    lines += headline_table(results['perplexity'], search)
  if search:
    gain = search_gain(search)
    if gain:
      lines.append(gain)
  if stage_seconds:
    lines.append('stage times: ' + ', '.join(f'{name} {format_seconds(s)}'
                                             for name, s in stage_seconds.items()))
    lines.append(f'total: {format_seconds(sum(stage_seconds.values()))}')
  return '\n'.join(lines)


def summary(results: Mapping, stage_seconds: Mapping[str, float], *,
            report_path: str | os.PathLike | None = None,
            tensorboard_dir: str | os.PathLike | None = None, file: TextIO | None = None) -> str:
  """Prints `summary_text(...)` (process 0 only) and returns it."""
  return _emit(summary_text(results, stage_seconds, report_path=report_path,
                            tensorboard_dir=tensorboard_dir), file)


# ----------------------------------------------------------------------------- machine facts
def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor() or 'unknown'."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith(('model name', 'hardware', 'cpu model')):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown'


def machine_info() -> dict:
  """Facts that change measured numbers (no hostname): CPU model, cores this process may use,
  accelerator, jax/jaxlib/flax/python versions."""
  import flax
  import jax
  import jaxlib
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 0
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return dict(cpu=cpu_model(), cores=cores, platform=devices[0].platform,
              accelerator=None if devices[0].platform == 'cpu' else ', '.join(kinds),
              devices=len(devices), processes=jax.process_count(),
              jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              python=platform.python_version(), system=f'{platform.system()} {platform.machine()}')


def source_commit() -> str | None:
  """The git commit of the library's source tree ('<sha>-dirty' when tracked files have
  uncommitted changes); None outside a git checkout or without git."""
  where = str(pathlib.Path(__file__).resolve().parent)

  def git(*args: str) -> str:
    return subprocess.run(['git', '-C', where, *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()

  try:
    commit = git('rev-parse', 'HEAD')
    dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty else '')


def command_line() -> str:
  """The command that started this process, as typed (`python -m experiments.run --config ...`),
  quoted for a shell."""
  return shlex.join(getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv])


def describe_machine(info: Mapping) -> str:
  """One line for reports and figure captions: 'AMD EPYC 7B13, 2 cores, jax 0.10.2 (cpu)'."""
  device = (f"{info['devices']} x {info['accelerator']}" if info.get('accelerator')
            else f"{info.get('platform', 'cpu')}")
  return (f"{info.get('cpu', 'unknown CPU')}, {info.get('cores', '?')} cores, {device}, "
          f"jax {info.get('jax', '?')}")
