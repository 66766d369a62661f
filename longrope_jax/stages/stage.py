"""The declaration of a pipeline stage: what it runs, reads, writes and owns, and its header.

`provenance.py` reads these declarations to fingerprint a stage's inputs and to decide, on a
rerun, whether it is reused, extended, rerun with its caches, recomputed or refused; `pipeline.py`
runs the functions and prints the headers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from longrope_jax.stages.run import Run

# The model fields every stage that runs the model reads. model.attention is not among them:
# every registered implementation equals dense attention within 1e-5 (tests/test_attention.py,
# test_cpu_attention.py), so switching to a faster one, like the search's chunk sizes, changes
# how a stage computes, not what.
MODEL_FIELDS = ('model.variant', 'model.path', 'model.original_length', 'model.sliding_window',
                'model.dtype', 'model.param_dtype')
# Search settings that change how, not what, a search computes (up to float summation order).
SEARCH_PERF = ('chunk', 'memory_gb', 'doc_batch', 'attention')
# The searched lengths, ignored by every stage that reads the search section: each length's
# search is a resumable folder of its own, the search at search.multiple (the one the other
# stages read) does not depend on the others, and every cell evaluated with per-length factors
# records the factors it used (stages.common.searched_cell). Adding or removing a length so
# reruns exactly the searches and cells that use it.
SEARCH_LENGTHS = 'search.multiples'


def _no_header(run: Run) -> dict:
  del run
  return {}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage, declared once.

  name: its name in config.stages.
  function: runs it on a `Run`, resuming from the workdir.
  reads: dotted config fields or sections its results depend on.
  upstream: stages whose results it reads.
  outputs: workdir paths (or glob patterns) it owns (deleted when it recomputes).
  results: results.json keys it owns.
  ignore: fields under `reads` that do not change its results (checkpoint cadence, memory).
  cells: fields that only select which cached cells are computed (a change reruns it with its
    caches kept: a (method, length) cell does not depend on which other cells exist).
  extend: fields whose increase continues it from its outputs (training to more steps).
  method_upstream: (upstream stage, method) pairs: that method's cached cells are the only ones
    reading that upstream stage (evaluate's 'longrope' cells read the search), so a change there
    alone drops those cells instead of the whole cache.
  splits: the corpus splits it reads, each a split name ('train') or the config field holding
    one ('search.split'); the run checks before the first stage that none is empty.
  header: what it will do, for its console header: Run -> {label: value}.
  """

  name: str
  function: Callable[[Run], Any]
  reads: tuple[str, ...]
  upstream: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()
  results: tuple[str, ...] = ()
  ignore: tuple[str, ...] = ()
  cells: tuple[str, ...] = ()
  extend: tuple[str, ...] = ()
  method_upstream: tuple[tuple[str, str], ...] = ()
  splits: tuple[str, ...] = ()
  header: Callable[[Run], dict] = _no_header

  @property
  def sections(self) -> tuple[str, ...]:
    """Top-level config sections the stage needs."""
    return tuple(dict.fromkeys(f.split('.')[0] for f in self.reads))
