"""The RULER NIAH suite (niah.py) with every tokenizer: bytes, a Llama-2-layout SentencePiece
tokenizer.json and a Llama-3-layout byte-level BPE (tests/hf_fixtures.py). An oracle that reads
the needles and continues with the asked values scores exactly 1.0 on each task; wrong or
partial answers score what they hold; padded generation equals generation of each prompt alone;
cells resume."""

import re

import jax
import numpy as np
import pytest

from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import model as model_lib
from longrope_jax import niah
from longrope_jax import rope as rope_lib

pytest.importorskip('tokenizers')

TOKENIZERS = ('bytes', 'sentencepiece', 'byte_bpe')
TASKS = niah.tasks(distractors=2, values=3, queries=2)
LENGTH = {'short': 300, 'ruler': 1200}


@pytest.fixture(scope='module', params=TOKENIZERS)
def tokenizer(request, hf_assets):
  if request.param == 'bytes':
    return data_lib.ByteTokenizer()
  return data_lib.get_tokenizer(str(hf_assets.tokenizer_file(request.param)))


def _needles(fmt, text):
  """{key: [values]} as an oracle reads the needles of a prompt's text."""
  pattern = re.escape(fmt.needle.strip()).replace(r'\{key\}', r'([a-z]+-[a-z]+)').replace(
      r'\{value\}', r'(\d+)')
  found = {}
  for key, value in re.findall(pattern, text):
    found.setdefault(key, []).append(value)
  return found


def _asked(text):
  """The keys the prompt's question (all after its last full stop) asks about, in order."""
  return list(dict.fromkeys(re.findall(r'[a-z]+-[a-z]+', text[text.rindex('.') + 1:])))


def _oracle(tokenizer, fmt, answer_of):
  """A generate function (prompts of any lengths) that reads each prompt and continues with
  answer_of(values)."""

  def generate(prompts, rope, num_tokens):
    del rope
    rows = []
    for prompt in prompts:
      length = len(prompt)
      text = tokenizer.decode(prompt[1:length])
      needles = _needles(fmt, text)
      values = [v for k in _asked(text) for v in needles[k]]
      full = tokenizer.encode(text + answer_of(fmt, values))
      np.testing.assert_array_equal(full[:length - 1], prompt[1:length])
      out = np.full(num_tokens, tokenizer.eos_id, np.int32)
      rest = full[length - 1:][:num_tokens]
      out[:len(rest)] = rest
      rows.append(out)
    return np.stack(rows)

  return generate


def _answer(fmt, values):
  return fmt.answer_prefix + fmt.joiner.join(values) + '. The'


@pytest.mark.parametrize('fmt_name', sorted(niah.FORMATS))
def test_samples_hold_their_needles_and_question(tokenizer, fmt_name):
  fmt, L = niah.FORMATS[fmt_name], LENGTH[fmt_name]
  rng = np.random.default_rng(0)
  for name, task in TASKS.items():
    for depth in (0.0, 0.5, 1.0):
      prompt, answer, values = niah.sample(rng, L, depth, tokenizer, task, fmt_name, digits=6)
      assert prompt[0] == tokenizer.bos_id and len(prompt) + len(answer) <= L
      assert len(values) == task.answers and len(set(values)) == len(values)
      text = tokenizer.decode(prompt[1:])
      needles = _needles(fmt, text)
      assert len(needles) == task.keys and sum(map(len, needles.values())) == task.needles
      assert all(len(v) == 6 for vs in needles.values() for v in vs)
      # The answer holds the asked keys' values; prompt + answer is one tokenization.
      asked = _asked(text)
      assert len(asked) == task.queries and values[0] in needles[asked[0]]
      assert sorted(v for k in asked for v in needles[k]) == sorted(values)
      np.testing.assert_array_equal(np.concatenate([prompt[1:], answer]),
                                    tokenizer.encode(text + fmt.answer_prefix +
                                                     fmt.joiner.join(values)))
      # The first asked needle sits at `depth` of the haystack, between whole sentences.
      first = text.index(fmt.needle.format(key=asked[0], value=values[0]).strip())
      count = lambda t: sum(t.count(f) for f in data_lib.FILLER)  # noqa: E731
      assert count(text[:first]) == round(depth * count(text)), (name, depth)


def test_oracle_scores_one_on_every_task(tokenizer):
  for fmt_name, fmt in niah.FORMATS.items():
    for name, task in TASKS.items():
      sampler = lambda rng, L, d, task=task, fmt_name=fmt_name: niah.sample(  # noqa: E731
          rng, L, d, tokenizer, task, fmt_name)
      results = eval_lib.retrieval_accuracy(
          model_lib.get_config('test'), None, tokenizer, [LENGTH[fmt_name]], sampler,
          methods=(), extra={'oracle': rope_lib.none(head_dim=16)}, depths=(0.0, 0.5, 1.0),
          trials=2, progress=False, generate=_oracle(tokenizer, fmt, _answer))
      cell = results['methods']['oracle']
      print(f'{type(tokenizer).__name__} {fmt_name} {name}: {cell["mean"]}')
      assert cell['mean'] == [1.0] and cell['scores'] == [[[1.0, 1.0]] * 3]
      # The first value alone: 1 / answers of the credit; a wrong first value: less.
      first = eval_lib.retrieval_accuracy(
          model_lib.get_config('test'), None, tokenizer, [LENGTH[fmt_name]], sampler,
          methods=(), extra={'oracle': rope_lib.none(head_dim=16)}, depths=(0.5,), trials=2,
          progress=False, generate=_oracle(tokenizer, fmt, lambda f, v: _answer(f, v[:1])))
      assert first['methods']['oracle']['mean'] == [pytest.approx(1 / task.answers)]


def test_score_reads_numbers_in_any_order():
  assert niah.score(' 123, #456.', ['456', '123']) == 1.0
  assert niah.score('#123 is it', ['123']) == 1.0
  assert niah.score('1234', ['123']) == 0.0  # a longer number is wrong
  assert niah.score('99, 123', ['123', '456']) == 0.5
  assert niah.score('123 123', ['123', '456']) == 0.5
  assert niah.score('nothing', ['1']) == 0.0 and niah.score('1', []) == 0.0


def test_bad_niah_input_raises():
  tok = data_lib.ByteTokenizer()
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r'needs at least \d+ tokens.*short'):
    niah.sample(rng, 100, 0.5, tok, TASKS['multikey'], 'ruler')
  with pytest.raises(ValueError, match="unknown NIAH format 'passkey'"):
    niah.sample(rng, 400, 0.5, tok, TASKS['single'], 'passkey')
  with pytest.raises(ValueError, match='depth must be in'):
    niah.sample(rng, 400, 1.5, tok, TASKS['single'])
  with pytest.raises(ValueError, match='asks about 3 keys but holds 2'):
    niah.NiahTask(keys=2, queries=3)
  with pytest.raises(ValueError, match='NiahTask.values must be a positive integer'):
    niah.NiahTask(values=0)


@pytest.fixture(scope='module')
def small_model():
  config = model_lib.get_config('test')
  return config, model_lib.init_params(config, jax.random.key(3))


def test_padded_generation_equals_each_prompt_alone(small_model):
  config, params = small_model
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 256, size=n).astype(np.int32) for n in (37, 50, 64, 21)]
  rope = rope_lib.yarn(head_dim=16, scale=2.0, theta=config.rope_theta,
                       original_length=config.original_length)
  out = eval_lib.greedy_generate_padded(config, params, prompts, rope, 6)
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(out[i], eval_lib.greedy_generate(config, params, p[None],
                                                                   rope, 6)[0])


def test_answer_nll_of_padded_samples_equals_each_alone(small_model):
  config, params = small_model
  tok = data_lib.ByteTokenizer()
  sampler = lambda rng, L, d: niah.sample(rng, L, d, tok, TASKS['multiquery'])  # noqa: E731
  got = eval_lib.answer_nll(config, params, 200, rope_lib.none(head_dim=16), sampler, trials=3,
                            seed=5)
  rng = np.random.default_rng([5, 200, 99])
  per_sample = []
  for _ in range(3):
    prompt, answer, _ = sampler(rng, 200, float(rng.random()))
    nll = np.asarray(eval_lib.nll_fn(config)(params, np.concatenate([prompt, answer])[None],
                                             rope_lib.none(head_dim=16)))[0]
    per_sample.append(nll[len(prompt) - 1:len(prompt) - 1 + len(answer)])
  np.testing.assert_allclose(got, np.mean(per_sample, axis=0), rtol=1e-5)


def test_done_cells_are_not_generated_again(tokenizer):
  fmt = niah.FORMATS['short']
  sampler = lambda rng, L, d: niah.sample(rng, L, d, tokenizer, TASKS['single'])  # noqa: E731
  calls, written = [], []

  def counting(prompts, rope, num_tokens):
    calls.append(len(prompts))
    return _oracle(tokenizer, fmt, _answer)(prompts, rope, num_tokens)

  # Two different scalings (one with the same values as another would share its sweep).
  kwargs = dict(methods=(), extra={'a': rope_lib.none(head_dim=16), 'b': rope_lib.linear(
      head_dim=16, scale=2.0)}, depths=(0.0, 1.0), trials=2, progress=False,
      generate=counting)
  first = eval_lib.retrieval_accuracy(model_lib.get_config('test'), None, tokenizer, [300, 400],
                                      sampler, on_result=lambda m, L, c: written.append((m, L, c)),
                                      **kwargs)
  assert calls == [4] * 4 and len(written) == 4  # one call per cell: every depth and trial
  calls.clear()
  done = {(m, L): c for m, L, c in written if (m, L) != ('b', 400)}
  again = eval_lib.retrieval_accuracy(model_lib.get_config('test'), None, tokenizer, [300, 400],
                                      sampler, done=done, **kwargs)
  assert calls == [4] and again['methods'] == first['methods']
