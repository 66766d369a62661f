"""Stage provenance: the engine that reads the stages' declarations (`stages.STAGES`: reads,
upstream, outputs, results, cells) to fingerprint each stage's inputs and decide, on a rerun,
what to do with it (keep, rerun, extend, recompute or refuse).

Owns workdir/provenance.json. A stage's fingerprint is a hash of the config fields it reads and of
its upstream stages' fingerprints, so a change anywhere upstream changes every stage after it.
Before a stage runs, `plan` compares the recorded fingerprints with the config's; a stage whose
inputs changed is recomputed (its outputs deleted by `invalidate`) when config.overwrite is set,
else the run refuses with the changed fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from typing import Any, Mapping

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax.checks import lookup
from longrope_jax.stages import STAGES

RECORD_FILE = 'provenance.json'


def downstream(stage: str) -> list[str]:
  """Every stage that reads `stage`'s results, directly or not, in `STAGES` order."""
  found = {stage}
  for name, spec in STAGES.items():
    if any(u in found for u in spec.upstream):
      found.add(name)
  return [s for s in STAGES if s in found and s != stage]


# ----------------------------------------------------------------------------- fingerprints
def _plain(value: Any) -> Any:
  """JSON-able plain data from ConfigDicts, tuples and numpy scalars."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return ckpt_lib.to_json(value)


def flatten(value: Any, prefix: str) -> dict[str, Any]:
  """{'a.b.c': leaf} for a nested section."""
  value = _plain(value)
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(flatten(v, f'{prefix}.{k}'))
    return out
  return {prefix: value}


def fingerprint(config_sections: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
  """A stable hash (16 hex digits) of the JSON of the config fields a stage reads and of its
  upstream stages' fingerprints."""
  blob = json.dumps(dict(config=_plain(config_sections), upstream=dict(upstream)),
                    sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_fields(config: Mapping, stage: str) -> dict[str, Any]:
  """The flattened config fields `stage` reads (absent ones left out), minus its ignored ones."""
  spec, missing = STAGES[stage], object()
  fields = {}
  for name in spec.reads:
    value = lookup(config, name, missing)
    if value is not missing:
      fields.update(flatten(value, name))
  return {k: v for k, v in fields.items()
          if not any(k == i or k.startswith(i + '.') for i in spec.ignore)}


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass
class StageRecord:
  """What a stage ran with: the fields it read, its upstream fingerprints, and whether it
  finished (a killed stage leaves a record with done=False, so its partial outputs are owned)."""

  fields: dict[str, Any]
  upstream: dict[str, str]
  done: bool = False

  @property
  def fingerprint(self) -> str:
    return fingerprint(self.fields, self.upstream)

  def to_json(self) -> dict:
    return dict(fields=self.fields, upstream=self.upstream, done=self.done,
                fingerprint=self.fingerprint)

  @classmethod
  def from_json(cls, record: Mapping) -> 'StageRecord':
    return cls(fields=dict(record['fields']), upstream=dict(record['upstream']),
               done=bool(record.get('done', False)))


def read_records(workdir: str | pathlib.Path) -> dict[str, StageRecord]:
  """workdir/provenance.json as {stage: StageRecord} ({} if absent)."""
  path = pathlib.Path(workdir) / RECORD_FILE
  if not path.exists():
    return {}
  data = ckpt_lib.read_json(path, what='the stage records', fix=(
      f'delete {path} only if you know which config made this workdir; else use a fresh '
      '--workdir'))
  return _without_retired({stage: StageRecord.from_json(r) for stage, r in data.items()})


# Fields stages read once and no longer do; records written then still hold them.
RETIRED_FIELDS = ('model.attention', 'search.settings.attention',
                  'progressive.search.attention')


# Fields added after workdirs were made, with the value that does what those workdirs did: a
# record of a stage that reads the field now but lacks it is read as holding this value.
ADDED_FIELDS = {'search.settings.space': 'longrope', 'search.objective': 'perplexity',
                'search.needle_format': 'ruler'}


def _reads(stage: str, field: str) -> bool:
  spec = STAGES.get(stage)
  under = lambda names: any(field == n or field.startswith(n + '.') for n in names)  # noqa: E731
  return spec is not None and under(spec.reads) and not under(spec.ignore)


def _without_retired(records: Mapping[str, StageRecord]) -> dict[str, StageRecord]:
  """`records` as if written today: retired fields dropped, added fields at their old value
  (`ADDED_FIELDS`), and the upstream fingerprints that named a record before renamed to its
  fingerprint after (so that a workdir made when a stage still read model.attention is not
  called stale for a field it no longer reads, nor for one added since)."""
  renamed: dict[str, str] = {}
  result: dict[str, StageRecord] = {}
  order = [s for s in STAGES if s in records] + [s for s in records if s not in STAGES]
  for stage in order:  # STAGES lists every stage after its upstream ones
    record = records[stage]
    fields = {k: v for k, v in record.fields.items()
              if not any(k == f or k.startswith(f + '.') for f in RETIRED_FIELDS)}
    fields.update({f: v for f, v in ADDED_FIELDS.items()
                   if f not in fields and _reads(stage, f) and fields})
    upstream = {u: renamed.get(fp, fp) for u, fp in record.upstream.items()}
    result[stage] = StageRecord(fields, upstream, record.done)
    renamed[record.fingerprint] = result[stage].fingerprint
  return result


def write_record(workdir: str | pathlib.Path, stage: str, record: StageRecord) -> None:
  """Stores `record` for `stage` in workdir/provenance.json (atomically)."""
  records = read_records(workdir)
  records[stage] = record
  ckpt_lib.write_json(pathlib.Path(workdir) / RECORD_FILE,
                      {s: r.to_json() for s, r in records.items()})


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'field: old -> new' for every field that differs (absent shown as <unset>)."""
  unset = '<unset>'
  lines = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, unset), new.get(k, unset)
    if a != b:
      lines.append(f'{k}: {json.dumps(a) if a is not unset else a} -> '
                   f'{json.dumps(b) if b is not unset else b}')
  return lines


# ----------------------------------------------------------------------------- decisions
KEEP, RERUN, EXTEND, RECOMPUTE = 'keep', 'rerun', 'extend', 'recompute'


@dataclasses.dataclass(frozen=True)
class Decision:
  """What to do with `stage`: keep (unchanged: run, resuming from its outputs), rerun (only
  cell-selecting fields changed: run, caches kept), extend (continue from its outputs, e.g. more
  training steps), or recompute (delete its outputs, then run). `changes` lists 'field: a -> b'."""

  stage: str
  action: str
  record: StageRecord
  changes: tuple[str, ...] = ()

  @property
  def discards(self) -> bool:
    """Whether following it loses results already in the workdir."""
    return self.action in (EXTEND, RECOMPUTE)


class StaleWorkdirError(ValueError):
  """The workdir holds stages made with another config, and overwrite was not asked for."""


def decide(stage: str, config: Mapping, records: Mapping[str, StageRecord],
           upstream: Mapping[str, str]) -> Decision:
  """The decision for one stage given the current config and its upstream fingerprints."""
  spec = STAGES[stage]
  new = StageRecord(stage_fields(config, stage), dict(upstream))
  old = records.get(stage)
  if old is None:
    return Decision(stage, KEEP, new)
  if old.fingerprint == new.fingerprint:
    return Decision(stage, KEEP, dataclasses.replace(new, done=old.done))
  changes = diff(old.fields, new.fields) + [
      f'upstream {u} changed' for u in sorted(set(old.upstream) | set(new.upstream))
      if old.upstream.get(u) != new.upstream.get(u)]
  changed = {c.split(':')[0] for c in diff(old.fields, new.fields)}
  upstream_changed = old.upstream != new.upstream

  def under(field, names):
    return any(field == n or field.startswith(n + '.') for n in names)

  if not upstream_changed and all(under(f, spec.cells) for f in changed):
    return Decision(stage, RERUN, new, tuple(changes))
  if not upstream_changed and changed and all(under(f, spec.extend) for f in changed) and all(
      new.fields[f] >= old.fields[f] for f in changed if f in old.fields and f in new.fields):
    return Decision(stage, EXTEND, new, tuple(changes))
  return Decision(stage, RECOMPUTE, new, tuple(changes))


def records_from_config(config: Mapping, stages: tuple[str, ...]) -> dict[str, StageRecord]:
  """Records for a workdir made before provenance.json existed, from its config.json (`config`)
  and the stages that have results: then a rerun with another config is caught there too."""
  records: dict[str, StageRecord] = {}
  for stage in STAGES:
    if stage in stages:
      upstream = {u: records[u].fingerprint for u in STAGES[stage].upstream if u in records}
      records[stage] = StageRecord(stage_fields(config, stage), upstream, done=True)
  return records


def plan(config: Mapping, stages: tuple[str, ...], workdir: str | pathlib.Path,
         overwrite: bool = False,
         records: Mapping[str, StageRecord] | None = None) -> list[Decision]:
  """Decisions for `stages` (in order) against `records` (default: workdir/provenance.json);
  raises StaleWorkdirError listing every changed field when one would discard results and not
  `overwrite`. Upstream stages not run now count with their recorded fingerprint."""
  records = read_records(workdir) if records is None else dict(records)
  current: dict[str, str] = {s: r.fingerprint for s, r in records.items()}
  decisions = []
  for stage in stages:
    spec = STAGES[stage]
    upstream = {u: current[u] for u in spec.upstream if u in current}
    decision = decide(stage, config, records, upstream)
    current[stage] = decision.record.fingerprint
    decisions.append(decision)
  stale = [d for d in decisions if d.discards]
  if stale and not overwrite:
    lines = []
    for d in stale:
      verb = 'would continue from its outputs' if d.action == EXTEND else 'would be recomputed'
      lines.append(f"  {d.stage} {verb}: " + '; '.join(d.changes))
    raise StaleWorkdirError(
        f"{pathlib.Path(workdir)} holds results made with another config:\n" + '\n'.join(lines) +
        "\nUse a fresh --workdir for a different experiment, or pass --config.overwrite=True to "
        "recompute these stages (and everything after them) in this workdir.")
  return decisions


def invalidate(workdir: str | pathlib.Path, decision: Decision) -> list[pathlib.Path]:
  """Deletes what a recomputed stage owns (an extended stage keeps its outputs): its output
  paths (for a change of `method_upstream` alone, only that method's cached cells) and its
  results.json keys, and records the stage as begun with its new inputs. Returns the paths removed. Call before the
  stage runs; downstream stages are recomputed by their own decisions (their upstream changed)."""
  if decision.action != RECOMPUTE:
    return []
  workdir = pathlib.Path(workdir)
  spec, removed = STAGES[decision.stage], []
  only, method = {u: m for u, m in spec.method_upstream}, None
  if len(decision.changes) == 1 and decision.changes[0].startswith('upstream '):
    method = only.get(decision.changes[0].split()[1])  # only that method's cells are stale
  for path in (p for rel in spec.outputs for p in sorted(workdir.glob(rel))):
    if method is not None and path.suffix == '.jsonl':
      if path.exists():
        ckpt_lib.truncate_jsonl(path, lambda r: r.get('method') != method)
    elif path.is_dir():
      shutil.rmtree(path)
      removed.append(path)
    elif path.exists():
      path.unlink()
      removed.append(path)
  results_path = workdir / 'results.json'
  if spec.results and results_path.exists():
    results = ckpt_lib.read_json(results_path, what='results')
    if any(k in results for k in spec.results):
      ckpt_lib.write_json(results_path, {k: v for k, v in results.items()
                                         if k not in spec.results})
  # What is left (cells still valid) now belongs to the new inputs, finished or not.
  begin(workdir, decision)
  return removed


# results.json keys -> the stage that wrote them (for workdirs older than provenance.json).
RESULT_STAGES = {key: stage for stage, spec in STAGES.items() for key in spec.results}


def prepare(config: Mapping, stages: tuple[str, ...], workdir: str | pathlib.Path,
            overwrite: bool = False) -> list[Decision]:
  """Plans `stages` against the workdir's records (or, for an older workdir, its config.json and
  results.json), refusing as `plan` does, then invalidates what the changed stages own.
  Returns the decisions; wrap each stage in `begin` / `finish`."""
  workdir = pathlib.Path(workdir)
  records = None
  if not (workdir / RECORD_FILE).exists() and (workdir / 'config.json').exists() and \
      (workdir / 'results.json').exists():
    old_config = ckpt_lib.read_json(workdir / 'config.json', what='the config of the run')
    done = tuple(RESULT_STAGES[k] for k in ckpt_lib.read_json(workdir / 'results.json',
                                                              what='results')
                 if k in RESULT_STAGES)
    records = records_from_config(old_config, done)
  decisions = plan(config, stages, workdir, overwrite=overwrite, records=records)
  if records is not None:  # adopt the reconstructed records before invalidating
    for stage, record in records.items():
      write_record(workdir, stage, record)
  for decision in decisions:
    invalidate(workdir, decision)
  return decisions


def begin(workdir: str | pathlib.Path, decision: Decision) -> None:
  """Records the stage as started with its inputs (done=False) before it writes anything."""
  write_record(workdir, decision.stage, dataclasses.replace(decision.record, done=False))


def finish(workdir: str | pathlib.Path, decision: Decision) -> None:
  """Marks the stage as finished with the inputs of `decision`."""
  write_record(workdir, decision.stage, dataclasses.replace(decision.record, done=True))
