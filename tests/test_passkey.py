"""Passkey retrieval with every tokenizer: bytes, a Llama-2-layout SentencePiece tokenizer.json and
a Llama-3-layout byte-level BPE (tests/hf_fixtures.py). An oracle that continues each prompt with
the right key scores exactly 1.0; a tiny random checkpoint scores near 0."""

import re

import numpy as np
import pytest

from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib

pytest.importorskip('tokenizers')

TOKENIZERS = ('bytes', 'sentencepiece', 'byte_bpe')
LENGTH = 160


@pytest.fixture(scope='module', params=TOKENIZERS)
def tokenizer(request, hf_assets):
  if request.param == 'bytes':
    return data_lib.ByteTokenizer()
  return data_lib.get_tokenizer(str(hf_assets.tokenizer_file(request.param)))


def _prompt_text(tokenizer, prompt: np.ndarray) -> str:
  return tokenizer.decode(prompt[1:])  # without BOS


def _continuation(tokenizer, prompt: np.ndarray, text: str, num_tokens: int) -> np.ndarray:
  """The tokens `prompt` continues with when its text is followed by `text`, cut or padded with
  the end-of-text id to num_tokens."""
  prompt_text = _prompt_text(tokenizer, prompt)
  full = tokenizer.encode(prompt_text + text)
  np.testing.assert_array_equal(full[:len(prompt) - 1], prompt[1:])
  out = np.full(num_tokens, tokenizer.eos_id, np.int32)
  rest = full[len(prompt) - 1:][:num_tokens]
  out[:len(rest)] = rest
  return out


def _oracle(tokenizer, answer_of):
  """A generate function that reads the key in each prompt and continues with `answer_of(key)`."""

  def generate(prompt_BP, rope, num_tokens):
    del rope
    rows = []
    for prompt in prompt_BP:
      key = re.search(r'The pass key is #(\d+)\.', _prompt_text(tokenizer, prompt)).group(1)
      rows.append(_continuation(tokenizer, prompt, answer_of(key), num_tokens))
    return np.stack(rows)

  return generate


def test_answer_is_what_the_prompt_continues_with(tokenizer):
  rng = np.random.default_rng(0)
  for depth in (0.0, 0.5, 1.0):
    prompt, answer = data_lib.passkey_sample(rng, LENGTH, depth, tokenizer)
    assert prompt[0] == tokenizer.bos_id and len(prompt) + len(answer) <= LENGTH
    text = _prompt_text(tokenizer, prompt)
    assert text.endswith(data_lib.QUESTION)
    key = tokenizer.decode(answer)
    assert re.fullmatch(r'\d{5}', key) and f'#{key}.' in text
    # prompt + answer is the tokenization of the whole text: no '▁' before the key.
    np.testing.assert_array_equal(np.concatenate([prompt[1:], answer]),
                                  tokenizer.encode(text + key))


def test_sentencepiece_key_alone_is_not_the_answer(hf_assets):
  """The bug this passkey design avoids: SentencePiece gives the key alone a leading '▁'."""
  tok = data_lib.get_tokenizer(str(hf_assets.tokenizer_file('sentencepiece')))
  _, answer = data_lib.passkey_sample(np.random.default_rng(1), LENGTH, 0.5, tok)
  key = tok.decode(answer)
  alone = tok.encode(key)
  assert len(alone) == len(answer) + 1 and tok.decode(alone[:1]).strip() == ''
  np.testing.assert_array_equal(alone[1:], answer)


def test_oracle_scores_one_and_wrong_keys_score_zero(tokenizer):
  def run(answer_of):
    results = eval_lib.passkey_accuracy(
        model_lib.get_config('test'), None, tokenizer, [LENGTH, 2 * LENGTH], methods=(),
        extra={'oracle': rope_lib.none(head_dim=16)}, depths=(0.0, 0.5, 1.0), trials=3,
        progress=False, generate=_oracle(tokenizer, answer_of))
    return results['methods']['oracle']

  right = run(lambda key: key + '. The')
  print(f'oracle passkey accuracy ({type(tokenizer).__name__}):', right['mean'])
  assert right['mean'] == [1.0, 1.0]
  assert run(lambda key: str(int(key) + 1) + '.')['mean'] == [0.0, 0.0]
  assert run(lambda key: key + '7.')['mean'] == [0.0, 0.0]  # a longer number is wrong
  assert run(lambda key: ' ' + key)['mean'] == [1.0, 1.0]  # as the official parse: first digits


@pytest.mark.parametrize('kind', ['sentencepiece', 'byte_bpe'])
def test_random_checkpoint_scores_near_zero(hf_assets, kind):
  from longrope_jax import hf
  ckpt = hf.load(hf_assets.checkpoint('llama', kind))
  tok = data_lib.get_tokenizer(str(ckpt.path / 'tokenizer.json'))
  res = eval_lib.passkey_accuracy(ckpt.config, ckpt.params, tok, [ckpt.config.original_length],
                                  methods=('none',), depths=(0.5,), trials=4, progress=False)
  acc = res['methods']['none']['mean'][0]
  print(f'random tiny Llama ({kind}) passkey accuracy: {acc}')
  assert acc <= 0.25
  nll = eval_lib.passkey_answer_nll(ckpt.config, ckpt.params, tok, ckpt.config.original_length,
                                    rope_lib.none(head_dim=ckpt.config.head_dim), trials=3)
  # One value per answer token (SentencePiece: one per digit, no '▁'), each above a digit guess.
  assert len(nll) == (5 if kind == 'sentencepiece' else len(nll)) and 2 <= len(nll) <= 5
  assert all(np.isfinite(nll)) and min(nll) > 0.5
