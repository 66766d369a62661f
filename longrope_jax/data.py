"""Tokenizers, documents as token ids, packed training batches, eval windows, and the passkey and
needle tasks. The corpora themselves (documents and their splits) are corpus.py's.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Iterable, Iterator, Protocol

import numpy as np

from longrope_jax import corpus


# ----------------------------------------------------------------------------- tokenizers
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None  # None: the checkpoint puts nothing before a text (see JsonTokenizer)
  eos_id: int

  def encode(self, text: str | bytes) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; BOS = 256, EOS = 257."""

  vocab_size: int = 258
  bos_id: int = 256
  eos_id: int = 257

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')


class JsonTokenizer:
  """A Hugging Face `tokenizer.json` loaded with the `tokenizers` library (extra `hf`).

  BOS (what goes before every document and prompt) is the checkpoint's own convention when the
  folder was saved by transformers (`checkpoint_bos`: what its tokenizer puts before a text; None
  when nothing); for a bare tokenizer.json, the first of <s>, <|begin_of_text|>, <|endoftext|> in
  the vocabulary. `bos_token` names it explicitly.
  """

  def __init__(self, path: str | pathlib.Path, bos_token: str | None = None,
               eos_token: str | None = None):
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {path} does not exist; pass the path of a "
                              "tokenizer.json (data.tokenizer).")
    try:
      import tokenizers
    except ImportError as e:
      raise ImportError("JsonTokenizer needs the `tokenizers` package: pip install -e .[hf]") from e
    self._tok = read_tokenizer_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    convention = None if bos_token else checkpoint_bos(path, self._tok)
    self.bos_id = (self._find(bos_token, ('<s>', '<|begin_of_text|>', '<|endoftext|>'))
                   if convention is None else convention.bos_id)
    self.eos_id = self._find(eos_token, ('</s>', '<|end_of_text|>', '<|endoftext|>'))

  def _find(self, explicit, candidates) -> int:
    for token in ((explicit,) if explicit else candidates):
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return token_id
    if explicit:
      raise ValueError(f"token {explicit!r} is not in the tokenizer vocabulary.")
    return 0

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


@dataclasses.dataclass(frozen=True)
class BosConvention:
  """What a checkpoint's tokenizer puts before a text: `bos_id` (None: nothing) and the file and
  rule that say so."""

  bos_id: int | None
  source: str


def checkpoint_bos(path: str | pathlib.Path, tok) -> BosConvention | None:
  """The BOS convention of the checkpoint folder holding tokenizer.json `path` (`tok`, loaded):
  what its post-processor puts before a text, which is what transformers' tokenizer puts there
  (transformers 5 follows tokenizer.json and ignores tokenizer_config.json's add_bos_token):
  Llama-2/3's template gives <s> / <|begin_of_text|>; SmolLM2's gives nothing, although its
  config.json says bos_token_id 1 (the <|im_start|> of chat turns). None for a bare tokenizer.json
  (no tokenizer_config.json beside it: no checkpoint convention to follow)."""
  if not (pathlib.Path(path).parent / 'tokenizer_config.json').is_file():
    return None
  text = tok.encode('a', add_special_tokens=False).ids
  full = tok.encode('a', add_special_tokens=True).ids
  prefix = next(full[:i] for i in range(len(full) + 1) if full[i:i + len(text)] == text)
  if len(prefix) > 1:
    raise ValueError(f"the post-processor of {path} puts {len(prefix)} tokens before a text; "
                     "one BOS token is supported.")
  return BosConvention(prefix[0] if prefix else None, f'{path}: post-processor')


def with_bos(tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray:
  """i32 ids with the tokenizer's BOS first (unchanged when its checkpoint uses none)."""
  prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return np.concatenate([prefix, ids]).astype(np.int32)


def read_tokenizer_file(path: str | pathlib.Path):
  """A `tokenizers.Tokenizer` from a tokenizer.json; a malformed file raises a ValueError naming
  it (the library's own error names no file)."""
  import tokenizers
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception for a parse error
    raise ValueError(f"{path} is not a valid tokenizer.json ({e}); point data.tokenizer at the "
                     "tokenizer.json saved with the model (or 'bytes'), or fetch it again.") from e


def get_tokenizer(spec: str | None) -> Tokenizer:
  """'bytes' (or None) for the byte tokenizer, else the path of a tokenizer.json."""
  if spec in (None, '', 'bytes'):
    return ByteTokenizer()
  return JsonTokenizer(spec)


def encode_documents(docs: list[corpus.Document], tokenizer: Tokenizer) -> list[np.ndarray]:
  """Token ids of each document, BOS first (if the tokenizer has one) and EOS last."""
  return [with_bos(tokenizer, np.concatenate([tokenizer.encode(d.text), [tokenizer.eos_id]]))
          for d in docs]


# ----------------------------------------------------------------------------- passkey task
FILLER = ('The grass is green.', 'The sky is blue.', 'The sun is yellow.', 'Here we go.',
          'There and back again.')
# The key is written '#12345': in bytes, the paper's "is 12345" would start after ' ', which
# follows 'is' in every filler sentence too; the '#' plays the part of the distinct token a
# word-level tokenizer gives a number, so the question's last token names where the key starts.
KEY_MARK = '#'
QUESTION = f' What is the pass key? The pass key is {KEY_MARK}'
PASSKEY_MIN_LENGTH = 112  # a byte-level prompt and answer need 107 tokens
PASSKEY_DIGITS = 5  # digits of a passkey


def passkey_line(key: str) -> str:
  return f' The pass key is {KEY_MARK}{key}. Remember it. {KEY_MARK}{key} is the pass key.'


def passkey_sample(rng: np.random.Generator, length: int, depth: float, tokenizer: Tokenizer,
                   digits: int = PASSKEY_DIGITS) -> tuple[np.ndarray, np.ndarray]:
  """The passkey task (Mohtashami & Jaggi, 2023; LongRoPE section 4.3) at about `length` tokens.

  A random `digits`-digit key is stated once at relative `depth` in repeated filler sentences,
  then asked for at the end. Returns (prompt ids with BOS if the tokenizer has one, answer ids),
  the prompt plus answer within `length` tokens, whole filler sentences. The answer ids are the
  tokens the prompt continues with when prompt and key are tokenized together: a SentencePiece
  tokenizer would give the key encoded alone a leading '▁' that the prompt's '#12345' never has.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"passkey depth must be in [0, 1], got {depth}.")
  key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
  fixed = len(tokenizer.encode(passkey_line(key) + QUESTION + key)) + 1
  if fixed > length:
    raise ValueError(f"a passkey prompt needs at least {fixed} tokens; got length {length}.")
  sentences, size = [], 0
  while True:
    sentence = ' ' + FILLER[len(sentences) % len(FILLER)]
    if fixed + size + len(tokenizer.encode(sentence)) > length:
      break
    sentences.append(sentence)
    size += len(tokenizer.encode(sentence))
  while True:  # pieces tokenized apart may count differently from the whole text
    cut = int(round(depth * len(sentences)))
    text = ''.join(sentences[:cut]) + passkey_line(key) + ''.join(sentences[cut:]) + QUESTION
    prompt, answer = _split_answer(tokenizer, text, key)
    if prompt.size + answer.size + 1 <= length or not sentences:
      break
    sentences.pop()
  return with_bos(tokenizer, prompt), answer


def _split_answer(tokenizer: Tokenizer, prompt_text: str, answer_text: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(prompt ids, answer ids) of prompt_text + answer_text tokenized together."""
  prompt = tokenizer.encode(prompt_text).astype(np.int32)
  full = tokenizer.encode(prompt_text + answer_text).astype(np.int32)
  if full.size <= prompt.size or not np.array_equal(full[:prompt.size], prompt):
    raise ValueError(f"the tokenizer merges the answer {answer_text!r} into the prompt's last "
                     f"token ({prompt_text[-12:]!r}), so no token sequence is the answer alone; "
                     f"end the prompt with a mark of its own (as passkey's {KEY_MARK!r}) or use "
                     "a tokenizer that splits digits from punctuation.")
  return prompt, full[prompt.size:]


def parse_passkey(continuation: str) -> str | None:
  """The key a model answered: the first run of digits in its decoded continuation, as the
  official evaluations do (landmark attention's and LongRoPE's `re.search(r'\\d+', response)`);
  None without digits."""
  found = re.search(r'\d+', continuation)
  return found.group() if found else None


COPY_ALPHABET = np.frombuffer(b'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ',
                              np.uint8)


def copy_sample(rng: np.random.Generator, length: int, tokenizer: Tokenizer,
                min_unit: int = 4, max_unit: int = 16) -> np.ndarray:
  """Induction data: a random string of `min_unit`..`max_unit` letters and digits repeated to
  fill `length` tokens, BOS first (if any). From the second copy on every symbol is predictable
  only by finding its previous occurrence and copying what followed. Returns i32[length].
  """
  unit = bytes(rng.choice(COPY_ALPHABET, int(rng.integers(min_unit, max_unit + 1)))).decode()
  room = length - (tokenizer.bos_id is not None)
  return with_bos(tokenizer, tokenizer.encode(unit * (length // len(unit) + 1))[:room])


# ----------------------------------------------------------------------------- needle documents
@dataclasses.dataclass(frozen=True)
class NeedleFormat:
  """How a needle document reads: `intro` + `needle` open it, a document follows, `question`
  ends it and `answer` is what is scored; {key} is a random word pair, {value} a random number of
  `digits` digits. Separators (spaces, newlines) are part of the strings. With one needle the
  key may be left out of needle and question both (the passkey wording)."""

  intro: str
  needle: str
  question: str
  answer: str
  digits: int = 7

  def __post_init__(self):
    keyed = ('key',) if '{key}' in self.needle + self.question else ()
    for field, names in (('needle', keyed + ('value',)), ('question', keyed),
                         ('answer', ('value',))):
      text, wanted = getattr(self, field), ['{' + name + '}' for name in names]
      if any(w not in text for w in wanted):
        raise ValueError(f"NeedleFormat.{field} must contain {' and '.join(wanted)}, got "
                         f"{text!r}.")
    if '{value}' in self.question or not isinstance(self.digits, int) or self.digits < 1:
      raise ValueError("NeedleFormat.question must not state {value}, and digits must be >= 1.")


NEEDLE_FORMATS = {
    # LongRoPE2's search data (Shang et al., 2025, Appendix C), RULER's single needle (Hsieh et
    # al., 2024): about 75 tokens of a word-level tokenizer, 330 bytes.
    'ruler': NeedleFormat(
        intro='A special magic number is hidden within the following text. Make sure to memorize '
              'it. I will quiz you about the number afterwards.\n',
        needle='One of the special magic numbers for {key} is: {value}.\n',
        question='\nWhat is the special magic number for {key} mentioned in the provided text? '
                 'The special magic number for {key} mentioned in the provided text is',
        answer=' {value}'),
    # For byte-level models with a short window (L0 = 256 bytes): 80 bytes, and the answer starts
    # after '#' (passkey's KEY_MARK), not after ' ', which follows 'is' everywhere in bytes.
    'short': NeedleFormat(intro='', needle='The magic number for {key} is #{value}.\n',
                          question='\nThe magic number for {key} is #', answer='{value}'),
    # The passkey task's own wording (passkey_line, QUESTION; 107 bytes): for a model that
    # retrieves in no other (configs/demo.py:retrieval was pretrained on passkey prompts only).
    'passkey': NeedleFormat(intro='', needle=passkey_line('{value}'), question=QUESTION,
                            answer='{value}', digits=PASSKEY_DIGITS),
}
NEEDLE_WORDS = (
    ('amber', 'bold', 'calm', 'dusty', 'eager', 'fancy', 'gentle', 'hollow', 'icy', 'jolly',
     'keen', 'lucky', 'mellow', 'noisy', 'odd', 'proud'),
    ('anchor', 'badger', 'canyon', 'dragon', 'ember', 'falcon', 'garden', 'harbor', 'island',
     'jacket', 'kite', 'lantern', 'meadow', 'nugget', 'otter', 'pepper'))


def needle_windows(token_docs: list[np.ndarray], tokenizer: Tokenizer, length: int, num: int, *,
                   seed: int = 0, fmt: NeedleFormat | str = 'ruler', field: str = 'num'
                   ) -> tuple[np.ndarray, np.ndarray]:
  """LongRoPE2's needle-driven documents (Shang et al., 2025, sec. 3.2, Appendix C): windows
  i32[num, length] and answer weights f32[num, length - 1].

  Each window is BOS, fmt.intro and fmt.needle (a random key and value), the first tokens of a
  document, then fmt.question and fmt.answer: exactly `length` tokens. The documents are those
  `eval_windows(token_docs, length, num, seed)` picks (so the plain-perplexity objective scores
  the same ones). Question and answer are tokenized together (`_split_answer`, as passkey does),
  so the answer's tokens are what the question continues with; weights[n, t] = 1 where token
  t + 1 is one of them, else 0: model.token_nll weighted by it is the answer's NLL.
  """
  if isinstance(fmt, str):
    if fmt not in NEEDLE_FORMATS:
      raise ValueError(f"unknown needle format {fmt!r}; choose one of {sorted(NEEDLE_FORMATS)} or "
                       "pass a NeedleFormat.")
    fmt = NEEDLE_FORMATS[fmt]
  docs_NL = eval_windows(token_docs, length, num, seed, field=field)  # BOS, then the document
  rng = np.random.default_rng([seed, 1])
  windows_NL = np.empty((num, length), np.int32)
  weights_NL = np.zeros((num, length - 1), np.float32)
  for n in range(num):
    key = '-'.join(str(rng.choice(words)) for words in NEEDLE_WORDS)
    value = str(int(rng.integers(10 ** (fmt.digits - 1), 10 ** fmt.digits)))
    opening = tokenizer.encode(fmt.intro + fmt.needle.format(key=key, value=value))
    question, answer = _split_answer(tokenizer, fmt.question.format(key=key),
                                     fmt.answer.format(value=value))
    body = length - 1 - len(opening) - len(question) - len(answer)
    if body < 1:
      raise ValueError(f"a needle document needs more than {length - body} tokens, the window is "
                       f"{length}; lengthen it or use a shorter format (NEEDLE_FORMATS['short']).")
    windows_NL[n] = np.concatenate([[tokenizer.bos_id], opening, docs_NL[n, 1:1 + body], question,
                                    answer])
    weights_NL[n, length - 1 - len(answer):] = 1.0
  return windows_NL, weights_NL


def fitness_windows(objective: str, token_docs: list[np.ndarray], tokenizer: Tokenizer,
                    length: int, num: int, *, seed: int = 0, needle_format: str = 'ruler',
                    field: str = 'num') -> tuple[np.ndarray, np.ndarray | None]:
  """The search's fitness data for `objective` (`OBJECTIVES`): windows i32[num, length] and answer
  weights f32[num, length - 1] ('needle': `needle_windows` in `needle_format`) or None
  ('perplexity': every token, `eval_windows`). Both pick the same documents."""
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown search objective {objective!r}; choose one of {list(OBJECTIVES)} "
                     "(search.objective).")
  if objective == 'needle':
    return needle_windows(token_docs, tokenizer, length, num, seed=seed, fmt=needle_format,
                          field=field)
  return eval_windows(token_docs, length, num, seed, field=field), None


# search.objective -> what the fitness scores.
OBJECTIVES = {
    'perplexity': 'mean NLL of every token of the documents (LongRoPE)',
    'needle': "NLL of the answer to a needle question (LongRoPE2's needle-driven perplexity)",
}


# ----------------------------------------------------------------------------- training batches
class PackedBatches:
  """Random crops of length T + 1 from all documents packed into one stream.

  With `passkey_fraction` > 0, that fraction of rows starts with a passkey sample (prompt and
  answer, within the window) and is filled up with packed text, so the base model learns the
  task inside its own window; with `copy_fraction` > 0, that fraction of rows is a repeated
  random string (`copy_sample`): dense induction data, without which a model this small does
  not learn to copy within a short pretraining. `batch(step)` is a pure function of (seed, step), so a resumed
  run sees exactly the batches an uninterrupted one would.
  """

  def __init__(self, token_docs: list[np.ndarray], batch_size: int, length: int, seed: int = 0,
               passkey_fraction: float = 0.0, tokenizer: Tokenizer | None = None,
               copy_fraction: float = 0.0):
    self.stream = np.concatenate(token_docs).astype(np.int32)
    if self.stream.size < length + 2:
      raise ValueError(f"the training corpus has {self.stream.size} tokens, fewer than one "
                       f"sequence of length {length} + 1; use a larger corpus or shorter length.")
    if not 0.0 <= passkey_fraction <= 1.0:
      raise ValueError(f"passkey_fraction must be in [0, 1], got {passkey_fraction}.")
    if not 0.0 <= copy_fraction <= 1.0 - passkey_fraction:
      raise ValueError(f"copy_fraction must be in [0, 1 - passkey_fraction = "
                       f"{1.0 - passkey_fraction:g}], got {copy_fraction}.")
    if (passkey_fraction > 0 or copy_fraction > 0) and tokenizer is None:
      raise ValueError("passkey_fraction or copy_fraction > 0 needs the tokenizer.")
    if passkey_fraction > 0 and length < PASSKEY_MIN_LENGTH:
      raise ValueError(f"passkey samples need a window of at least {PASSKEY_MIN_LENGTH} tokens, "
                       f"the training length is {length}; set pretrain.passkey_fraction = 0.")
    self.batch_size, self.length, self.seed = batch_size, length, seed
    self.passkey_fraction, self.tokenizer = passkey_fraction, tokenizer
    self.copy_fraction = copy_fraction

  def batch(self, step: int) -> np.ndarray:
    """tokens i32[batch_size, length + 1] (inputs are [:, :-1], targets [:, 1:])."""
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, self.stream.size - self.length - 1, size=self.batch_size)
    rows = self.stream[starts[:, None] + np.arange(self.length + 1)[None]]
    kind_B = rng.random(self.batch_size)
    for i in np.nonzero(kind_B >= 1.0 - self.copy_fraction)[0]:
      rows[i] = copy_sample(rng, self.length + 1, self.tokenizer)
    for i in np.nonzero(kind_B < self.passkey_fraction)[0]:
      size = int(rng.integers(max(self.length // 3, PASSKEY_MIN_LENGTH), self.length + 2))
      prompt, answer = passkey_sample(rng, size - 1, float(rng.random()), self.tokenizer)
      sample = np.concatenate([prompt, answer, [self.tokenizer.eos_id]])
      rows[i, :sample.size] = sample
      rows[i, sample.size:] = self.stream[starts[i]:starts[i] + self.length + 1 - sample.size]
    return rows

  def __iter__(self) -> Iterator[np.ndarray]:
    step = 0
    while True:
      yield self.batch(step)
      step += 1


# ----------------------------------------------------------------------------- eval windows
def length_report(token_docs: list[np.ndarray], lengths: Iterable[int]) -> str:
  counts = [f"{L}: {sum(len(d) >= L for d in token_docs)}" for L in sorted(set(lengths))]
  return 'documents at least that long -> ' + ', '.join(counts)


def eval_windows(token_docs: list[np.ndarray], length: int, num: int, seed: int = 0, *,
                 field: str = 'num') -> np.ndarray:
  """The first `length` tokens of `num` documents at least `length` long: i32[num, length].

  The paper's truncated setting. Documents are chosen by `seed` among those long enough, so the
  same windows come back for the same corpus, length, count and seed. `field` names `num` in
  errors: the config field that sets it when a stage calls (e.g. 'search.num_windows').
  """
  if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
    raise ValueError(f"{field} must be a positive number of eval windows (documents), got "
                     f"{num!r}; set it to 1 or more.")
  long_enough = [i for i, d in enumerate(token_docs) if len(d) >= length]
  if len(long_enough) < num:
    raise ValueError(
        f"only {len(long_enough)} documents have at least {length} tokens but {field} = {num} "
        f"eval windows were asked for; lower {field} or the length "
        f"({length_report(token_docs, [length // 4, length // 2, length, 2 * length])}).")
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.choice(long_enough, size=num, replace=False).tolist())
  return np.stack([token_docs[i][:length] for i in chosen]).astype(np.int32)
