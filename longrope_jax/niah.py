"""The RULER needle-in-a-haystack family (Hsieh et al., 2024, "RULER", sec. 3.1) for any tokenizer:
single needle, multi-key (distractor needles), multi-value and multi-query.

A sample is a haystack of filler sentences (passkey's, RULER's 'noise' haystack) holding needles
"{key} -> {value}", then a question about one or several keys; the answer is their values. As for
passkey, prompt and answer are tokenized together (`data._split_answer`), so the answer's tokens
are what the prompt continues with, and a continuation is scored on the numbers it decodes to
(`score`): every tokenizer is scored alike. `evaluate.retrieval_accuracy` runs the samples.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

from longrope_jax import data as data_lib


@dataclasses.dataclass(frozen=True)
class NiahTask:
  """`keys` distinct keys in the haystack, `values` needles (values) per key; the first `queries`
  keys are asked about (the others are distractors) and every value of theirs is the answer."""

  keys: int = 1
  queries: int = 1
  values: int = 1

  def __post_init__(self):
    for name in ('keys', 'queries', 'values'):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"NiahTask.{name} must be a positive integer, got {value!r}.")
    if self.queries > self.keys:
      raise ValueError(f"NiahTask asks about {self.queries} keys but holds {self.keys}.")

  @property
  def needles(self) -> int:
    return self.keys * self.values

  @property
  def answers(self) -> int:
    return self.queries * self.values


def tasks(*, distractors: int = 2, values: int = 2, queries: int = 2) -> dict[str, NiahTask]:
  """RULER's four NIAH tasks: 'single' (one needle), 'multikey' (one asked among `distractors`
  + 1 keys), 'multivalue' (one key with `values` values, all asked) and 'multiquery' (`queries`
  keys, all asked)."""
  return {'single': NiahTask(),
          'multikey': NiahTask(keys=1 + distractors),
          'multivalue': NiahTask(values=values),
          'multiquery': NiahTask(keys=queries, queries=queries)}


TASKS = tuple(tasks())


@dataclasses.dataclass(frozen=True)
class NiahFormat:
  """The wording: `intro` opens the prompt; each needle is `needle` ({key}, {value}); the question
  is `question` ({key}) for one value of one key, else `question_many` ({keys}: the asked keys
  joined by `key_joiner`); the answer is `answer_prefix` and the values joined by `joiner`.
  Separators (spaces, newlines) are part of the strings."""

  intro: str
  needle: str
  question: str
  question_many: str
  answer_prefix: str = ''
  joiner: str = ', '
  key_joiner: str = ' and '


FORMATS = {
    # RULER's wording (its niah template, noise haystack): about 120 tokens of a word-level
    # tokenizer around the haystack, 560 bytes.
    'ruler': NiahFormat(
        intro='Some special magic numbers are hidden within the following text. Make sure to '
              'memorize them. I will quiz you about the numbers afterwards.\n',
        needle=' One of the special magic numbers for {key} is: {value}.',
        question='\nWhat is the special magic number for {key} mentioned in the provided text? '
                 'The special magic number for {key} mentioned in the provided text is',
        question_many='\nWhat are all the special magic numbers for {keys} mentioned in the '
                      'provided text? The special magic numbers for {keys} mentioned in the '
                      'provided text are',
        answer_prefix=' '),
    # For byte-level models with a short window (L0 = 256 bytes): a needle is about 42 bytes, a
    # question 33 to 60, and the answer starts after '#' (passkey's KEY_MARK), so the multi-key
    # task (three needles) leaves a third of a 256-byte window to the haystack.
    'short': NiahFormat(
        intro='', needle=' The magic number for {key} is #{value}.',
        question=' The magic number for {key} is #',
        question_many=' The magic numbers for {keys} are #', joiner=', #'),
}


def _keys(rng: np.random.Generator, count: int) -> list[str]:
  """`count` distinct 'adjective-noun' keys (data.NEEDLE_WORDS)."""
  pairs = list(itertools.product(*data_lib.NEEDLE_WORDS))
  if count > len(pairs):
    raise ValueError(f"a NIAH sample can hold at most {len(pairs)} distinct keys, got {count}.")
  return ['-'.join(pairs[i]) for i in rng.choice(len(pairs), size=count, replace=False)]


def _values(rng: np.random.Generator, count: int, digits: int) -> list[str]:
  """`count` distinct numbers of `digits` digits (no leading zero)."""
  if 9 * 10 ** (digits - 1) < count:
    raise ValueError(f"{count} distinct values of {digits} digits do not exist.")
  drawn: list[str] = []
  while len(drawn) < count:
    value = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    if value not in drawn:
      drawn.append(value)
  return drawn


def sample(rng: np.random.Generator, length: int, depth: float, tokenizer: data_lib.Tokenizer,
           task: NiahTask, fmt: NiahFormat | str = 'short',
           digits: int = data_lib.PASSKEY_DIGITS) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """One NIAH sample of about `length` tokens: (prompt ids with BOS, answer ids, the values
  asked, in answer order). The first asked needle sits at relative `depth` of the haystack, the
  others at depths drawn by `rng`; prompt + answer fit in `length` tokens, whole sentences."""
  if isinstance(fmt, str):
    if fmt not in FORMATS:
      raise ValueError(f"unknown NIAH format {fmt!r}; choose one of {sorted(FORMATS)}.")
    fmt = FORMATS[fmt]
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"NIAH depth must be in [0, 1], got {depth}.")
  keys = _keys(rng, task.keys)
  values = _values(rng, task.needles, digits)
  needles = [(k, values[k * task.values + v]) for k in range(task.keys)
             for v in range(task.values)]
  order = [0] + list(1 + rng.permutation(len(needles) - 1))  # the first asked needle first
  needles = [needles[i] for i in order]
  asked = [value for k, value in needles if k < task.queries]
  if task.answers == 1:
    question = fmt.question.format(key=keys[0])
  else:
    question = fmt.question_many.format(keys=fmt.key_joiner.join(keys[:task.queries]))
  answer = fmt.answer_prefix + fmt.joiner.join(asked)
  lines = [fmt.needle.format(key=keys[k], value=value) for k, value in needles]
  fixed = len(tokenizer.encode(fmt.intro + ''.join(lines) + question + answer)) + 1
  if fixed > length:
    raise ValueError(f"a NIAH prompt of this task needs at least {fixed} tokens ({task}); got "
                     f"length {length}: lengthen it or use a shorter format (FORMATS['short']).")
  sentences, size = [], 0
  while True:
    sentence = ' ' + data_lib.FILLER[len(sentences) % len(data_lib.FILLER)]
    if fixed + size + len(tokenizer.encode(sentence)) > length:
      break
    sentences.append(sentence)
    size += len(tokenizer.encode(sentence))
  spots = [rng.random() for _ in lines[1:]]  # the other needles' depths
  while True:  # pieces tokenized apart may count differently from the whole text
    n = len(sentences)
    cuts = [int(round(depth * n))] + [int(round(s * n)) for s in spots]
    pieces = list(sentences)
    for cut, line in sorted(zip(cuts, range(len(lines))), key=lambda c: (-c[0], -c[1])):
      pieces.insert(cut, lines[line])
    text = fmt.intro + ''.join(pieces) + question
    prompt, answer_ids = data_lib._split_answer(tokenizer, text, answer)
    if prompt.size + answer_ids.size + 1 <= length or not sentences:
      break
    sentences.pop()
  return np.concatenate([[tokenizer.bos_id], prompt]).astype(np.int32), answer_ids, asked


def score(continuation: str, expected: list[str]) -> float:
  """The share of the `expected` values among the first len(expected) runs of digits of a
  decoded continuation, in any order (RULER's string_match_all, read as numbers; for one value,
  passkey's rule: the first number is the value; no value: 0)."""
  if not expected:
    return 0.0
  found = re.findall(r'\d+', continuation)[:len(expected)]
  return sum(value in found for value in expected) / len(expected)
