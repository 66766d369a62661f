"""LongRoPE2's needle-driven objective (Shang et al., 2025, sec. 3.2, Appendix C): needle documents
for bytes, a Llama-2-layout SentencePiece and a Llama-3-layout byte-level BPE tokenizer
(tests/hf_fixtures.py), whose weights select exactly the answer; an oracle that reads the needle
scores NLL 0 on them; the weighted population fitness equals the masked mean of model.token_nll."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import corpus
from longrope_jax import data as data_lib
from longrope_jax import fitness as fitness_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from test_search import CFG, EXT, TARGET, random_params

pytest.importorskip('tokenizers')

TOKENIZERS = ('bytes', 'sentencepiece', 'byte_bpe')
FORMATS = ('ruler', 'short')
LENGTH = {'bytes': 512, 'sentencepiece': 256, 'byte_bpe': 256}


@pytest.fixture(scope='module', params=TOKENIZERS)
def tokenizer(request, hf_assets):
  if request.param == 'bytes':
    return request.param, data_lib.ByteTokenizer()
  return request.param, data_lib.get_tokenizer(str(hf_assets.tokenizer_file(request.param)))


def token_docs(tokenizer, num=6):
  import hf_fixtures
  docs = [corpus.Document(f'book_{i}', hf_fixtures.english_text(400, 50 + i).encode())
          for i in range(num)]
  return data_lib.encode_documents(docs, tokenizer)


def read_needle(tokenizer, window, fmt):
  """(key, value) as an oracle reads them in the window's decoded opening."""
  pattern = re.escape(fmt.needle).replace(r'\{key\}', r'([a-z]+-[a-z]+)').replace(
      r'\{value\}', r'(\d+)')
  return re.search(pattern, tokenizer.decode(window[1:])).groups()


@pytest.mark.parametrize('fmt_name', FORMATS)
def test_weights_select_exactly_the_answer(tokenizer, fmt_name):
  kind, tok = tokenizer
  fmt, L = data_lib.NEEDLE_FORMATS[fmt_name], LENGTH[kind]
  docs = token_docs(tok)
  windows, weights = data_lib.needle_windows(docs, tok, L, 4, seed=3, fmt=fmt_name)
  assert windows.shape == (4, L) and windows.dtype == np.int32
  assert weights.shape == (4, L - 1) and weights.dtype == np.float32
  assert set(np.unique(weights).tolist()) == {0.0, 1.0}
  # The same documents as the plain-perplexity objective: each window's body is one of them.
  plain = data_lib.eval_windows(docs, L, 4, seed=3)
  for window, w, doc in zip(windows, weights, plain):
    assert window[0] == tok.bos_id
    key, value = read_needle(tok, window, fmt)
    assert len(value) == fmt.digits and value[0] != '0'
    question, answer = data_lib._split_answer(tok, fmt.question.format(key=key),
                                              fmt.answer.format(value=value))
    # The window ends with question + answer tokenized together; the weights are on the
    # predictions of the answer's tokens and nowhere else.
    np.testing.assert_array_equal(window[-len(question) - len(answer):],
                                  np.concatenate([question, answer]))
    np.testing.assert_array_equal(np.nonzero(w)[0], np.arange(L - 1 - len(answer), L - 1))
    targets = window[1:][w > 0]
    assert tok.decode(targets).strip() == value
    # The scored tokens decode exactly to the answer text where the question leaves off (a
    # SentencePiece decoder drops the first leading space of a whole decode only).
    assert tok.decode(np.concatenate([question, targets])) == \
        tok.decode(question) + fmt.answer.format(value=value)
    if fmt_name == 'short':  # the answer starts after '#': exactly the digits
      assert tok.decode(targets) == value
    # Between the needle and the question: the start of the document.
    opening = len(tok.encode(fmt.intro + fmt.needle.format(key=key, value=value))) + 1
    body = window[opening:L - len(question) - len(answer)]
    np.testing.assert_array_equal(body, doc[1:1 + len(body)])
  # Keys and values are random per window; the same seed gives the same windows.
  again = data_lib.needle_windows(docs, tok, L, 4, seed=3, fmt=fmt_name)
  np.testing.assert_array_equal(again[0], windows)
  assert len({read_needle(tok, w, fmt)[1] for w in windows}) == 4


def oracle_nll(tokenizer, windows, fmt, wrong=False):
  """f32[N, L - 1]: an oracle that reads the needle puts all its mass on the answer it implies
  (NLL 0 on a right token, 30 on a wrong one) at the window's end, and guesses uniformly
  elsewhere (ln V)."""
  nll = np.full((windows.shape[0], windows.shape[1] - 1), np.log(512.0), np.float32)
  for n, window in enumerate(windows):
    key, value = read_needle(tokenizer, window, fmt)
    value = str(int(value) + 1) if wrong else value
    _, answer = data_lib._split_answer(tokenizer, fmt.question.format(key=key),
                                       fmt.answer.format(value=value))
    got = window[-len(answer):]
    nll[n, -len(answer):] = np.where(got == answer, 0.0, 30.0)
  return nll


def test_an_oracle_that_reads_the_needle_scores_zero_on_the_weights(tokenizer, monkeypatch):
  kind, tok = tokenizer
  fmt, L = data_lib.NEEDLE_FORMATS['short'], LENGTH[kind]
  windows, weights = data_lib.needle_windows(token_docs(tok), tok, L, 3, fmt='short')
  right, wrong = oracle_nll(tok, windows, fmt), oracle_nll(tok, windows, fmt, wrong=True)
  # The population fitness with the oracle as its model (looked up by window).
  table = {}

  def token_nll(config, params, tokens_BT, rope, *args, **kwargs):
    match_BN = jnp.all(tokens_BT[:, None, :] == jnp.asarray(windows)[None], axis=-1)
    return jnp.asarray(table['nll'])[jnp.argmax(match_BN, axis=-1)]

  monkeypatch.setattr(model_lib, 'token_nll', token_nll)
  rope = rope_lib.stack([rope_lib.none(head_dim=CFG.head_dim)] * 2)
  for nll, weighted_mean in ((right, 0.0), (wrong, None)):
    table['nll'] = nll
    weighted = fitness_lib.PopulationFitness(CFG, None, windows, max_population=2, doc_batch=2,
                                             weights_NL=weights)(rope)
    plain = fitness_lib.PopulationFitness(CFG, None, windows, max_population=2)(rope)
    np.testing.assert_allclose(plain, nll.mean(), rtol=1e-6)
    ones = fitness_lib.PopulationFitness(CFG, None, windows, max_population=2,
                                         weights_NL=np.ones_like(weights))(rope)
    np.testing.assert_allclose(ones, plain, rtol=1e-6)  # all-ones weights: every token
    if weighted_mean == 0.0:
      np.testing.assert_array_equal(weighted, [0.0, 0.0])  # NLL 0 on the answer, exactly
      assert plain.min() > 1.0
    else:  # an oracle reading a wrong value pays on the first digit at least
      assert weighted.min() >= 30.0 / weights.sum(axis=1).max() - 1e-6


@pytest.fixture(scope='module')
def params():
  return random_params(CFG)


def test_weighted_fitness_is_the_masked_mean_of_token_nll(params):
  tok = data_lib.ByteTokenizer()
  docs = data_lib.encode_documents(corpus.load_split('stdlib', 'validation')[:60], tok)
  windows, weights = data_lib.needle_windows(docs, tok, TARGET, 3, fmt='short')
  kwargs = rope_lib.method_kwargs(head_dim=CFG.head_dim, theta=CFG.rope_theta,
                                  original_length=EXT.original_length, length=TARGET)
  ropes = rope_lib.stack([rope_lib.get(m, **kwargs)
                          for m in ('none', 'linear', 'ntk_rcd', 'yarn_rcd', 'ntk')])
  nll_PNT = np.asarray(jax.jit(jax.vmap(
      lambda r: model_lib.token_nll(CFG, params, jnp.asarray(windows), r)))(ropes), np.float64)
  want = (nll_PNT * weights).sum(axis=(1, 2)) / weights.sum()  # by hand: the masked mean
  assert not np.allclose(want, nll_PNT.mean(axis=(1, 2)), rtol=1e-3)  # the weights matter
  for mesh, doc_batch, chunk in ((mesh_lib.population_mesh(1), 2, None),
                                 (mesh_lib.population_mesh(8), 1, 1)):
    weighted = fitness_lib.PopulationFitness(CFG, params, windows, max_population=8, mesh=mesh,
                                             doc_batch=doc_batch, chunk=chunk, weights_NL=weights)
    np.testing.assert_allclose(weighted(ropes), want, rtol=1e-5)
    assert weighted.num_tokens == weights.sum() and weighted.traces == 1


def test_bad_needle_input_raises(params):
  tok = data_lib.ByteTokenizer()
  docs = data_lib.encode_documents(corpus.load_split('stdlib', 'validation')[:60], tok)
  with pytest.raises(ValueError, match=r"needs more than \d+ tokens, the window is 200.*short"):
    data_lib.needle_windows(docs, tok, 200, 2, fmt='ruler')
  with pytest.raises(ValueError, match="unknown needle format 'niah'"):
    data_lib.needle_windows(docs, tok, 512, 2, fmt='niah')
  with pytest.raises(ValueError, match='only 0 documents have at least'):
    data_lib.needle_windows(docs, tok, 10 ** 7, 2)
  with pytest.raises(ValueError, match=r'NeedleFormat.answer must contain \{value\}'):
    data_lib.NeedleFormat(intro='', needle='{key} {value}', question='{key}', answer='42')
  windows, weights = data_lib.needle_windows(docs, tok, TARGET, 2, fmt='short')
  for bad, match in ((weights[:1], 'weights_NL must be f32'),
                     (-weights, 'non-negative'),
                     (np.zeros_like(weights), 'select at least one token')):
    with pytest.raises(ValueError, match=match):
      fitness_lib.PopulationFitness(CFG, params, windows, max_population=2, weights_NL=bad)
  # Windows cut to a shorter L' lose the answer at their end.
  with pytest.raises(ValueError, match='select at least one token'):
    fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET // 2, max_population=2,
                                  weights_NL=weights)
