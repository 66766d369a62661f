"""Orbax helpers and workdir files: synchronous saves where a crash must not lose a step, atomic
JSON, JSONL caches that survive a torn last line, and damaged or foreign files reported by path
with what to do (WorkdirError)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import warnings
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from longrope_jax import mesh as mesh_lib


class WorkdirError(ValueError):
  """A damaged or foreign file in a workdir: the message names the path and what to do."""


def abspath(path: str | os.PathLike) -> pathlib.Path:
  """Orbax wants absolute paths."""
  return pathlib.Path(path).expanduser().resolve()


def manager(directory: str | os.PathLike, *, max_to_keep: int = 2,
            save_interval_steps: int = 1) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` keeping the newest `max_to_keep` steps.

  Saves are synchronous (`enable_async_checkpointing=False`): a run killed right after a save
  finds a complete step, and errors surface at the call that caused them.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
      enable_async_checkpointing=False)
  # Named handlers let a fresh manager read a step's metadata (shapes) before restoring it.
  return ocp.CheckpointManager(abspath(directory), options=options, item_handlers=dict(
      state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict | None = None) -> None:
  """Saves a pytree `state` (and JSON-able `meta`) at `step` and waits for it."""
  items = dict(state=ocp.args.StandardSave(state))
  if meta is not None:
    items['meta'] = ocp.args.JsonSave(to_json(meta))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)
  mngr.wait_until_finished()


def step_dir(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """The folder of checkpoint `step`."""
  return pathlib.Path(str(mngr.directory)) / str(step)


def _what_to_do(mngr: ocp.CheckpointManager, step: int) -> str:
  earlier = [s for s in mngr.all_steps() if s < step]
  if earlier:
    return f"delete {step_dir(mngr, step)} to resume from step {max(earlier)}"
  return f"delete {pathlib.Path(str(mngr.directory))} to restart this stage from scratch"


def verify_step(mngr: ocp.CheckpointManager, step: int) -> None:
  """Raises WorkdirError if checkpoint `step`'s folder is empty or its metadata is damaged."""
  folder = step_dir(mngr, step)
  if folder.is_dir() and not any(folder.iterdir()):
    raise WorkdirError(f"checkpoint folder {folder} is empty (an interrupted or foreign write); "
                       f"{_what_to_do(mngr, step)}.")
  try:
    mngr.item_metadata(step)
  except Exception as e:  # orbax raises JSON, OS and tensorstore errors alike
    raise WorkdirError(f"checkpoint {folder} is damaged ({_first_line(e)}); "
                       f"{_what_to_do(mngr, step)}.") from e


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def saved_shapes(mngr: ocp.CheckpointManager, step: int, item: str = 'state') -> Any:
  """The tree of shapes saved in checkpoint `step` (from its metadata; nothing is read)."""
  metadata = mngr.item_metadata(step)[item]
  if metadata is None:
    raise WorkdirError(f"checkpoint {step_dir(mngr, step)} has no readable {item!r} metadata; "
                       f"{_what_to_do(mngr, step)}.")
  tree = getattr(metadata, 'tree', metadata)
  import jax
  return jax.tree.map(lambda x: tuple(x.shape), tree, is_leaf=lambda x: hasattr(x, 'shape'))


def shape_mismatch(found: Any, expected: Any) -> str | None:
  """None if the trees of arrays (or shapes) `found` and `expected` match; else a short account:
  parameter counts and the first differing leaves (path: found vs expected)."""
  import jax
  shape = lambda x: tuple(x) if isinstance(x, tuple) else tuple(np.shape(x))  # noqa: E731
  is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
  flatten = lambda tree: {  # noqa: E731  paths as 'a/b/0' whatever the container type
      '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path):
      shape(v) for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}
  flat_found, flat_expected = flatten(found), flatten(expected)
  if flat_found == flat_expected:
    return None
  count = lambda flat: sum(int(np.prod(s)) for s in flat.values())  # noqa: E731
  diffs = [f"{k}: {flat_found.get(k, 'absent')} vs {flat_expected.get(k, 'absent')}"
           for k in sorted(set(flat_found) | set(flat_expected))
           if flat_found.get(k) != flat_expected.get(k)]
  more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ''
  return (f"{len(flat_found)} arrays, {count(flat_found):,} values; the config asks "
          f"{len(flat_expected)} arrays, {count(flat_expected):,} values ({'; '.join(diffs[:3])}"
          f"{more})")


def restore(mngr: ocp.CheckpointManager, template: Any, step: int | None = None) -> Any:
  """Restores the state saved at `step` (default: latest) into the structure of `template`.

  A damaged or empty step raises WorkdirError naming its folder and what to delete; a checkpoint
  of other shapes (another model variant) one naming both shapes.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}.")
  verify_step(mngr, step)
  if template is not None:  # a train state is compared by its params (optax states save as None)
    saved = saved_shapes(mngr, step)
    is_model = isinstance(template, dict) and 'params' in template and 'params' in saved
    mismatch = (shape_mismatch(saved['params'], template['params']) if is_model else
                shape_mismatch(saved, template))
    if mismatch:
      raise WorkdirError(f"{mngr.directory} holds a {'model' if is_model else 'state'} with "
                         f"{mismatch}; use a fresh workdir (or the config it was made with).")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template)))
  except Exception as e:  # a cut data file surfaces as a tensorstore or JSON error
    raise WorkdirError(f"checkpoint {step_dir(mngr, step)} is damaged ({_first_line(e)}); "
                       f"{_what_to_do(mngr, step)}.") from e
  return restored['state']


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict:
  """The JSON `meta` item saved at `step` (default: latest), damage reported as in `restore`."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}.")
  verify_step(mngr, step)
  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:
    files = sorted(p for p in (step_dir(mngr, step) / 'meta').glob('*')
                   if p.name != 'commit_success.txt')
    where = ', '.join(map(str, files)) or str(step_dir(mngr, step) / 'meta')
    raise WorkdirError(f"checkpoint {step_dir(mngr, step)} is damaged: its JSON record {where} "
                       f"cannot be read ({_first_line(e)}); {_what_to_do(mngr, step)}.") from e


def to_json(value: Any) -> Any:
  """Converts numpy and JAX scalars and arrays to plain Python (orbax's JsonSave rejects them)."""
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if hasattr(value, 'tolist') and not isinstance(value, (str, bytes)):
    return value.tolist()
  return value


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes JSON atomically (temp file + rename): a reader never sees half a file."""
  write_text(path, json.dumps(to_json(value), indent=2))


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text atomically (process 0 only, in a multi-process run)."""
  if not mesh_lib.is_main_process():  # one writer in a multi-process run
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=path.parent, delete=False, suffix='.tmp') as f:
    f.write(text)
    tmp = f.name
  os.replace(tmp, path)


def read_json(path: str | os.PathLike, *, what: str = 'JSON', fix: str | None = None) -> Any:
  """Parses a JSON file; a damaged one raises WorkdirError naming the path and `fix`."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    fix = fix or f'delete {path} and rerun the stage that writes it'
    raise WorkdirError(f"{path} ({what}) is damaged and cannot be parsed ({e}); {fix}.") from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
  """Appends one JSON line (after dropping a torn last line a crash may have left)."""
  if not mesh_lib.is_main_process():  # one writer in a multi-process run
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _drop_torn_tail(path)
  with open(path, 'a') as f:
    f.write(json.dumps(to_json(record)) + '\n')


def _drop_torn_tail(path: pathlib.Path) -> None:
  """Cuts a last line without its newline (a write cut by a crash), warning with the path."""
  if not path.exists() or path.stat().st_size == 0:
    return
  data = path.read_bytes()
  if data.endswith(b'\n'):
    return
  keep = data[:data.rfind(b'\n') + 1]
  warnings.warn(f"{path}: dropped a torn last line ({len(data) - len(keep)} bytes, a write cut "
                "by a crash); its record will be recomputed.", stacklevel=3)
  with tempfile.NamedTemporaryFile('wb', dir=path.parent, delete=False, suffix='.tmp') as f:
    f.write(keep)
    tmp = f.name
  os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
  """The records of a JSONL file ([] if absent). A torn last line (no newline: a crash mid-write)
  is dropped from the file with a warning; any other line that is not a JSON object holding the
  `required` keys raises WorkdirError naming the file and line."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  _drop_torn_tail(path)
  records = []
  for number, line in enumerate(path.read_text(errors='replace').splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if not isinstance(record, dict) or any(k not in record for k in required):
      what = f"record with {', '.join(required)}" if required else 'JSON object'
      raise WorkdirError(f"{path} line {number} is not a {what} ({line[:80]!r}); delete that line "
                         "(or the file: its records are recomputed).")
    records.append(record)
  return records


def truncate_jsonl(path: str | os.PathLike, keep: callable) -> None:
  """Keeps only the records for which keep(record) holds (used when resuming before a step)."""
  if not mesh_lib.is_main_process():  # one writer in a multi-process run
    return
  path = pathlib.Path(path)
  if path.exists():
    records = [r for r in read_jsonl(path) if keep(r)]
    write_text(path, ''.join(json.dumps(r) + '\n' for r in records))


def tree_to_numpy(tree: Any) -> Any:
  import jax
  return jax.tree.map(np.asarray, tree)
