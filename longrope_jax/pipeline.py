"""The run loop: validate the config, decide per stage (provenance), run the stages in order with
a header each, and close with a summary. Each stage resumes from the workdir.

The entry points in `experiments/` only parse flags and call `run`. The stages are declared in
`stages/` (`stages.STAGES`). `Run`, the config and workdir the stages share, is defined in
stages/run.py, below the stages that take it, and exported here as `pipeline.Run`.
"""

from __future__ import annotations

import datetime
import pathlib
import time

import jax
import ml_collections

from longrope_jax import console
from longrope_jax import corpus
from longrope_jax import hf
from longrope_jax import metrics as metrics_lib
from longrope_jax import provenance
from longrope_jax import validation
from longrope_jax.checks import lookup
from longrope_jax.stages import STAGES
from longrope_jax.stages.run import Run

__all__ = ['Run', 'run']

_ACTION_WORDS = {provenance.KEEP: 'inputs unchanged (reused, resumed where unfinished)',
                 provenance.RERUN: 'rerun, cached cells kept', provenance.EXTEND: 'extended',
                 provenance.RECOMPUTE: 'recomputed'}


def used_splits(config: ml_collections.ConfigDict,
                stages: tuple[str, ...]) -> dict[str, list[str]]:
  """{split: the stages (and fields) reading it} for the corpus splits `stages` read
  (`Stage.splits`)."""
  used: dict[str, list[str]] = {}
  for stage in stages:
    for entry in STAGES[stage].splits:
      split = entry if entry in corpus.SPLITS else lookup(config, entry, None)
      if split is not None:
        used.setdefault(split, []).append(stage if entry == split else f'{stage} ({entry})')
  return used


def preflight(r: Run, stages: tuple[str, ...]) -> None:
  """Before the first stage, what the config names on disk: a Hugging Face checkpoint
  (model.path) is one of the supported architectures (its config.json alone is read), and every
  corpus split the stages read holds a document. Sources that split by name are checked from
  file names and sizes alone; others by loading the split, which `Run.documents` keeps for the
  stages."""
  if r.hf_path:
    try:
      hf.architecture(hf.read_config(r.hf_path))
    except ValueError as e:
      raise ValueError(f"model.path = {r.hf_path}: {e}") from None
  d = r.config.get('data')
  if d is None:
    return
  sizes = corpus.split_sizes(d.source, path=d.path)
  for split, readers in used_splits(r.config, stages).items():
    if sizes is None:
      r.documents(split)  # raises on an empty split; cached for the stages
    elif not sizes.get(split):
      raise ValueError(corpus.empty_split_message(d.source, split, path=d.path, sizes=sizes) +
                       f" Read by: {', '.join(readers)}.")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        stages: tuple[str, ...] | None = None) -> Run:
  """Runs `stages` (default: config.stages) in order after validating the whole config. A stage
  whose inputs (config fields, upstream results) are unchanged is reused; one whose inputs
  changed is recomputed with everything downstream of it, or, without config.overwrite, the run
  refuses naming the changed fields. Every stage resumes from the workdir. results.json records
  the machine, the attention implementations that ran and the run itself (date, commit,
  command, seconds per stage)."""
  stages = tuple(stages or config.stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown} in config.stages; choose from {list(STAGES)}.")
  validation.validate_config(config)
  r = Run(config, workdir)
  preflight(r, stages)
  earlier = provenance.read_records(r.workdir)
  decisions = provenance.prepare(config, stages, r.workdir,
                                 overwrite=config.get('overwrite', False))
  r.write_config()
  writer = jax.process_index() == 0
  record = r.results().get('run', {})
  stage_seconds = dict(record.get('stage_seconds', {}))
  if writer:
    r.save_result('machine', console.machine_info())
    r.save_result('attention', r.attention())
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  commit=console.source_commit(), command=console.command_line(),
                  stage_seconds=stage_seconds)
    r.save_result('run', record)
  seconds = {}
  for d in decisions:
    state = 'new' if d.stage not in earlier else _ACTION_WORDS[d.action]
    stage = STAGES[d.stage]
    details = dict(stage.header(r),
                   workdir=state + (f": {'; '.join(d.changes)}" if d.changes else ''))
    console.stage_header(d.stage, details)
    t0 = time.time()
    provenance.begin(r.workdir, d)
    stage.function(r)
    provenance.finish(r.workdir, d)
    seconds[d.stage] = time.time() - t0
    if writer:  # the time of the results the workdir holds: a recomputed stage starts over
      prior = 0.0 if d.action == provenance.RECOMPUTE else stage_seconds.get(d.stage, 0.0)
      stage_seconds[d.stage] = prior + seconds[d.stage]
      r.save_result('run', dict(record, stage_seconds=stage_seconds))
  console.summary(r.results(), seconds,
                  report_path=r.workdir / 'report.md' if 'report' in stages else None,
                  tensorboard_dir=r.workdir / metrics_lib.TB_DIR)
  return r
