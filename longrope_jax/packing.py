"""Mixed context window batches (LongRoPE2, Shang et al., 2025, sec. 3.3): each fine-tuning step is
all short rows or all long rows.

- Short rows: documents of at most L0 tokens packed into rows of the target length, each document
  with its own segment id (it attends only to itself) and its positions restarting at 0, so the
  step runs under the original RoPE.
- Long rows: crops of the stream of the documents longer than L0 at the target length, one
  attention span each, under the searched factors.

Why a step and not a row: the model takes one `RopeScaling` per call, so a step's rows share one.
Which one follows from the step's positions by the inference rule (`rope.LongRopeFactors.select`
of max(position) + 1; `train.train` applies it), so training and evaluation switch alike.
`MixedBatches.batch(step)` is a pure function of (seed, step): a resumed fine-tune sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from longrope_jax.data import PackedBatches, Tokenizer

# Where short documents come from (the `short_documents` argument of MixedBatches).
SHORT_DOCUMENTS = {
    'documents': 'the corpus documents of at most L0 tokens, whole (the paper\'s)',
    'crops': 'L0-token pieces as pretraining saw them: crops of the packed stream, with passkey '
             'and copy samples at the fine-tuning fractions',
}
FRACTION_SCALE = 10**6  # short_fraction resolution of the step schedule


@dataclasses.dataclass(frozen=True)
class Rows:
  """One step's batch: tokens i32[B, T + 1] (inputs [:, :-1], targets [:, 1:]); for packed rows
  segment_ids i32[B, T + 1] (one id per document, from 1) and positions i32[B, T + 1] (restarting
  at 0 in each document); None: one document per row at positions 0..T."""

  tokens: np.ndarray
  segment_ids: np.ndarray | None = None
  positions: np.ndarray | None = None

  @property
  def span(self) -> int:
    """max(position) + 1 over the inputs: the sequence length the short/long switch reads."""
    if self.positions is None:
      return self.tokens.shape[1] - 1
    return int(self.positions[:, :-1].max()) + 1


def pack(units: Iterable[np.ndarray], batch_size: int, length: int) -> Rows:
  """Rows i32[batch_size, length] filled with `units` in order (each a document of token ids):
  a unit that does not fit in what is left of a row is cut there (the next row starts with the
  next unit). Segment ids count the units of a row from 1; positions restart at 0 in each."""
  tokens = np.zeros((batch_size, length), np.int32)
  segments = np.zeros((batch_size, length), np.int32)
  positions = np.zeros((batch_size, length), np.int32)
  units = iter(units)
  for b in range(batch_size):
    filled, segment = 0, 0
    while filled < length:
      unit = np.asarray(next(units), np.int32)[:length - filled]
      if unit.size == 0:
        raise ValueError("pack: a unit to pack is empty.")
      segment += 1
      end = filled + unit.size
      tokens[b, filled:end], segments[b, filled:end] = unit, segment
      positions[b, filled:end] = np.arange(unit.size)
      filled = end
  return Rows(tokens, segments, positions)


def is_short_step(step: int, short_fraction: float) -> bool:
  """Whether `step` is a short one: short steps are spread evenly, so the first n steps hold
  floor(n * short_fraction) of them (up to FRACTION_SCALE's resolution) for every n."""
  k = round(short_fraction * FRACTION_SCALE)
  return (step + 1) * k // FRACTION_SCALE > step * k // FRACTION_SCALE


class MixedBatches:
  """LongRoPE2's mixed context window batches at `length` + 1 tokens per row (see the module).

  `short_fraction` of the steps (`is_short_step`) are short rows of documents of at most
  `original_length` tokens (`short_documents`: a key of SHORT_DOCUMENTS), the others long rows
  cropped from the documents longer than `original_length`, with passkey and copy rows at
  `passkey_fraction` and `copy_fraction` (as data.PackedBatches). Both kinds hold
  batch_size x (length + 1) tokens, so the fraction of steps is the fraction of tokens.
  """

  def __init__(self, token_docs: list[np.ndarray], batch_size: int, length: int, *,
               original_length: int, short_fraction: float, short_documents: str = 'crops',
               seed: int = 0, passkey_fraction: float = 0.0, copy_fraction: float = 0.0,
               tokenizer: Tokenizer | None = None):
    if not 0.0 <= short_fraction <= 1.0:
      raise ValueError(f"short_fraction must be in [0, 1], got {short_fraction}.")
    if short_documents not in SHORT_DOCUMENTS:
      raise ValueError(f"short_documents must be one of {list(SHORT_DOCUMENTS)}, got "
                       f"{short_documents!r}.")
    if length <= original_length:
      raise ValueError(f"mixed context window rows must be longer than the original window "
                       f"({original_length}); got length {length}.")
    self.batch_size, self.length, self.seed = batch_size, length, seed
    self.original_length, self.short_fraction = original_length, short_fraction
    self.short_documents = short_documents
    long_docs = [d for d in token_docs if len(d) > original_length]
    short_docs = [d for d in token_docs if len(d) <= original_length]
    if not long_docs:
      raise ValueError(f"no training document is longer than L0 = {original_length} tokens: "
                       "there is nothing to cut long rows from.")
    self.long = PackedBatches(long_docs, batch_size, length, seed=seed,
                              passkey_fraction=passkey_fraction, copy_fraction=copy_fraction,
                              tokenizer=tokenizer)
    self.units_per_row = -(-(length + 1) // original_length)
    if short_documents == 'documents':
      if short_fraction > 0 and not short_docs:
        raise ValueError(f"short_documents='documents' but no training document has at most "
                         f"L0 = {original_length} tokens; use short_documents='crops'.")
      self.short_docs = short_docs
    else:  # a unit is a row of pretraining's batches at L0: L0 tokens
      self.crops = PackedBatches(token_docs, batch_size * self.units_per_row,
                                 original_length - 1, seed=seed + 1,
                                 passkey_fraction=passkey_fraction, copy_fraction=copy_fraction,
                                 tokenizer=tokenizer)

  def is_short(self, step: int) -> bool:
    return is_short_step(step, self.short_fraction)

  def _short_units(self, step: int):
    if self.short_documents == 'crops':
      yield from self.crops.batch(step)
      return
    rng = np.random.default_rng([self.seed, step, 2])
    while True:
      yield self.short_docs[int(rng.integers(len(self.short_docs)))]

  def batch(self, step: int) -> Rows:
    """Rows of `length` + 1 tokens: packed short documents on a short step, else long crops."""
    if self.is_short(step):
      return pack(self._short_units(step), self.batch_size, self.length + 1)
    return Rows(self.long.batch(step))

  def __iter__(self):
    step = 0
    while True:
      yield self.batch(step)
      step += 1
