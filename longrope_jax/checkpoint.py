"""Orbax helpers: absolute paths, and synchronous saves where a crash must not lose a step."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np
import orbax.checkpoint as ocp


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
  return ocp.CheckpointManager(abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict | None = None) -> None:
  """Saves a pytree `state` (and JSON-able `meta`) at `step` and waits for it."""
  items = dict(state=ocp.args.StandardSave(state))
  if meta is not None:
    items['meta'] = ocp.args.JsonSave(to_json(meta))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, template: Any, step: int | None = None,
            with_meta: bool = False):
  """Restores the state saved at `step` (default: latest) into the structure of `template`."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}.")
  items = dict(state=ocp.args.StandardRestore(template))
  if with_meta:
    items['meta'] = ocp.args.JsonRestore()
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return (restored['state'], restored['meta']) if with_meta else restored['state']


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
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=path.parent, delete=False, suffix='.tmp') as f:
    json.dump(to_json(value), f, indent=2)
    tmp = f.name
  os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=path.parent, delete=False, suffix='.tmp') as f:
    f.write(text)
    tmp = f.name
  os.replace(tmp, path)


class WorkdirError(ValueError):
  """A damaged or foreign file in a workdir: the message names the path and what to do."""


def read_json(path: str | os.PathLike, *, what: str = 'JSON', fix: str | None = None) -> Any:
  """Parses a JSON file; a damaged one raises WorkdirError naming the path and `fix`."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    fix = fix or f'delete {path} and rerun the stage that writes it'
    raise WorkdirError(f"{path} ({what}) is damaged and cannot be parsed ({e}); {fix}.") from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(to_json(record)) + '\n')


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by a crash
      break
  return records


def truncate_jsonl(path: str | os.PathLike, keep: callable) -> None:
  """Keeps only the records for which keep(record) holds (used when resuming before a step)."""
  path = pathlib.Path(path)
  if path.exists():
    records = [r for r in read_jsonl(path) if keep(r)]
    write_text(path, ''.join(json.dumps(r) + '\n' for r in records))


def tree_to_numpy(tree: Any) -> Any:
  import jax
  return jax.tree.map(np.asarray, tree)
