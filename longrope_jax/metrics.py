"""TensorBoard event files (workdir/tb/<stage>/) written with tensorboardX, so no TensorFlow is
needed: `tensorboard --logdir WORKDIR/tb` shows every stage's scalars live. Only process 0 writes;
the other processes' writers do nothing."""

from __future__ import annotations

import math
import pathlib
import time
from typing import Mapping

import jax

TB_DIR = 'tb'


class MetricWriter:
  """Scalars of one stage as TensorBoard events in workdir/tb/subdir (process 0 only).

  A resumed stage passes `purge_step` (its first new step): TensorBoard then drops the points
  at and after it that an interrupted run had written, so a curve is never drawn twice.
  """

  def __init__(self, workdir: str | pathlib.Path, subdir: str, *, purge_step: int | None = None):
    self.logdir = pathlib.Path(workdir) / TB_DIR / subdir
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self.logdir.mkdir(parents=True, exist_ok=True)
      # Event files are named by the second and host; the suffix keeps a writer started in the
      # same second (a quick resume) from writing over the last one's file, in time order.
      self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=30, purge_step=purge_step,
                                   filename_suffix=f'.{time.time_ns()}')

  def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
    """One point per tag at `step` (floats, numpy or jax scalars); None is skipped."""
    if self._writer is None:
      return
    for tag, value in scalars.items():
      if value is not None and not isinstance(value, (str, bool)):
        self._writer.add_scalar(tag, float(value), global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_search_generation(writer: MetricWriter, record: Mapping) -> None:
  """A search history record (search.search's on_generation) as scalars at its generation."""
  writer.write_scalars(record['generation'], {
      'search/best_perplexity': record['best_perplexity'],
      'search/mean_perplexity': record.get('mean_perplexity'),
      'search/best_nll': record['best_nll'],
      'search/evaluations': record.get('evaluations')})
  writer.flush()


def write_per_length(workdir: str | pathlib.Path, subdir: str, results: Mapping, *,
                     metric: str = 'perplexity', tag: str | None = None) -> None:
  """An evaluation table ({'lengths', 'methods': {name: {metric: [...]}}}) as scalars
  `tag/method` against the length in tokens (TensorBoard's step axis), in workdir/tb/subdir.
  A rerun replaces the earlier points (purge from the shortest length) rather than adding."""
  tag = tag or metric
  lengths = list(results['lengths'])
  with MetricWriter(workdir, subdir, purge_step=min(lengths, default=0)) as writer:
    for name, values in results['methods'].items():
      for length, value in zip(lengths, values[metric]):
        if value is not None and math.isfinite(value):
          writer.write_scalars(length, {f'{tag}/{name}': value})


def read_scalars(logdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the event files in `logdir` (needs the `tensorboard` package,
  not TensorFlow)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}
