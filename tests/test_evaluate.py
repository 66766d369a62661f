"""Evaluation: NLL batching is exact, one compile serves every method, passkey decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import report as report_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib

CFG = model_lib.get_config('test')
_forward = jax.jit(model_lib.forward, static_argnums=0)


@pytest.fixture(scope='module')
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope='module')
def docs():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, size=n).astype(np.int32) for n in (40, 130, 300, 300, 520, 700)]


def test_mean_nll_micro_batching_is_exact(params, docs):
  windows = data_lib.eval_windows(docs, 128, 5)
  rope = rope_lib.linear(head_dim=CFG.head_dim, scale=2.0)
  direct = float(model_lib.token_nll(CFG, params, jnp.asarray(windows), rope).mean())
  # 5 windows in micro-batches of 2 (the last one padded) must give the same mean.
  batched = eval_lib.mean_nll(CFG, params, windows, rope, batch_tokens=2 * 128)
  assert batched == pytest.approx(direct, rel=1e-6)


def test_perplexity_vs_length_table_and_resume(params, docs):
  calls = []
  results = eval_lib.perplexity_vs_length(
      CFG, params, docs, [64, 128, 256], methods=('none', 'linear', 'yarn'),
      extra={'longrope': lambda L: None if L < 128 else rope_lib.longrope(
          factors=np.full(CFG.head_dim // 2, L / 64), n_hat=4, scale=L / 64,
          original_length=64)},
      num_windows=3, progress=False, on_result=lambda *a: calls.append(a))
  m = results['methods']
  assert results['lengths'] == [64, 128, 256]
  assert len(calls) == 12
  # At the original length every method is vanilla RoPE (s = 1), so all agree.
  assert m['linear']['nll'][0] == pytest.approx(m['none']['nll'][0], rel=1e-6)
  assert m['yarn']['nll'][0] == pytest.approx(m['none']['nll'][0], rel=1e-6)
  assert m['longrope']['nll'][0] is None
  for name in m:
    for nll, ppl in zip(m[name]['nll'], m[name]['perplexity']):
      assert nll is None or ppl == pytest.approx(math.exp(nll))
  table = report_lib.markdown_table(results)
  assert table.splitlines()[0] == '| method | 64 (1x) | 128 (2x) | 256 (4x) |'
  assert '| longrope | - |' in table
  # A resumed evaluation reuses every cell it is given and computes nothing.
  done = {(name, L): nll for name, L, nll in calls}
  again = eval_lib.perplexity_vs_length(
      CFG, params, docs, [64, 128, 256], methods=('none', 'linear', 'yarn'),
      extra={'longrope': lambda L: pytest.fail('recomputed')}, num_windows=3, progress=False,
      done=done, on_result=lambda *a: pytest.fail('recomputed'))
  assert again['methods'] == results['methods']


def test_one_compile_for_every_method(params, docs):
  eval_lib.nll_sum_fn.cache_clear()
  eval_lib.perplexity_vs_length(CFG, params, docs, [128], methods=eval_lib.DEFAULT_METHODS,
                                num_windows=2, progress=False)
  assert eval_lib.nll_sum_fn(CFG)._cache_size() == 1


def test_passkey_prompt_layout():
  tok = data_lib.ByteTokenizer()
  rng = np.random.default_rng(3)
  prompt, answer = data_lib.passkey_sample(rng, 300, 0.5, tok)
  text = tok.decode(prompt)
  key = tok.decode(answer)
  assert len(prompt) + len(answer) <= 300 and len(prompt) + len(answer) > 280
  assert len(key) == 5 and key.isdigit()
  assert text.count(key) == 2 and text.endswith(data_lib.QUESTION)
  assert abs(text.index(key) / len(text) - 0.5) < 0.15
  with pytest.raises(ValueError, match='depth'):
    data_lib.passkey_sample(rng, 300, 1.5, tok)
  with pytest.raises(ValueError, match='at least'):
    data_lib.passkey_sample(rng, 50, 0.5, tok)


def _reference_greedy(params, prompt, rope_for, num_tokens):
  """Greedy decoding by full forwards, no cache: token n comes from the logits at n - 1 of a
  forward with `rope_for(n)`. The model is causal, so one padded length (one compile) serves
  every step: what follows position n - 1 cannot change its logits.
  """
  B, P = prompt.shape
  seq = np.zeros((B, P + num_tokens), np.int32)
  seq[:, :P] = prompt
  positions = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape)
  for n in range(P, P + num_tokens):
    logits = _forward(CFG, params, jnp.asarray(seq), positions, rope_for(n))
    seq[:, n] = np.asarray(jnp.argmax(logits[:, n - 1], -1))
  return seq[:, P:]


def test_greedy_generate_matches_argmax_of_full_forwards(params):
  prompt = np.random.default_rng(1).integers(0, 256, size=(2, 12)).astype(np.int32)
  rope = rope_lib.yarn(head_dim=CFG.head_dim, scale=4.0, theta=CFG.rope_theta,
                       original_length=CFG.original_length)
  out = eval_lib.greedy_generate(CFG, params, prompt, rope, 4)
  np.testing.assert_array_equal(out, _reference_greedy(params, prompt, lambda n: rope, 4))


def test_passkey_accuracy_shapes_and_a_model_that_cannot_read(params):
  tok = data_lib.ByteTokenizer()
  res = eval_lib.passkey_accuracy(CFG, params, tok, [128, 256], methods=('none', 'linear'),
                                  depths=(0.0, 1.0), trials=2, progress=False)
  for name in ('none', 'linear'):
    acc = np.asarray(res['methods'][name]['accuracy'])
    assert acc.shape == (2, 2)
    # An untrained model cannot produce a 5-digit key it has never been trained to copy.
    assert np.all(acc == 0.0)




def test_short_long_switch_at_the_original_length(params):
  F = CFG.head_dim // 2
  short = rope_lib.longrope(factors=np.linspace(1.0, 1.2, F), attn_scale=1.0)
  long = rope_lib.longrope(factors=np.linspace(1.0, 8.0, F), n_hat=4, scale=4.0,
                           original_length=CFG.original_length)
  factors = rope_lib.LongRopeFactors(short, long, CFG.original_length)
  L0 = CFG.original_length
  assert factors.select(L0) is short and factors.select(L0 + 1) is long
  # The prompt is 3 tokens short of L0: the 4th generated token is the first under `long`,
  # after a re-prefill of the whole sequence.
  prompt = np.random.default_rng(5).integers(0, 256, size=(2, L0 - 3)).astype(np.int32)
  out = eval_lib.generate_switching(CFG, params, prompt, factors, 6)
  # Full forwards, each with the factors the current sequence length selects.
  np.testing.assert_array_equal(out, _reference_greedy(params, prompt, factors.select, 6))
  with pytest.raises(ValueError, match='differ in length'):
    rope_lib.LongRopeFactors(short, rope_lib.none(head_dim=2 * F + 2), L0)


def test_passkey_answer_nll_scores_exactly_the_answer_digits(params):
  tok = data_lib.ByteTokenizer()
  rope = rope_lib.none(head_dim=CFG.head_dim)
  nll = eval_lib.passkey_answer_nll(CFG, params, tok, 128, rope, trials=3, seed=4)
  assert len(nll) == 5
  # The same prompts, scored one by one: the NLL of answer digit i is that of the token at P + i
  # given everything before it.
  rng = np.random.default_rng([4, 128, 99])
  rows = []
  for _ in range(3):
    prompt, answer = data_lib.passkey_sample(rng, 128, float(rng.random()), tok)
    seq = np.concatenate([prompt, answer])[None]
    logits = _forward(CFG, params, jnp.asarray(seq), jnp.arange(seq.shape[1])[None], rope)
    logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1], -1)
    rows.append(-np.asarray(logp[np.arange(5), answer]))
  np.testing.assert_allclose(nll, np.mean(rows, 0), rtol=1e-4)


def test_batches_group_by_bucket_within_batch_tokens():
  rows = [np.zeros(n) for n in (100, 120, 130, 60, 128)]
  assert eval_lib.batches(rows, 0, 1024, multiple=64) == [
      (64, 1, [3]), (128, 3, [0, 1, 4]), (192, 1, [2])]
  # 2 rows of the 128 bucket fit in 300 tokens: batches of 2, the last one padded to 2.
  assert eval_lib.batches(rows, 0, 300, multiple=64)[1:3] == [(128, 2, [0, 1]), (128, 2, [4])]
  # `extra` (generated tokens) counts against the budget: 128 + 30 > 300 / 2.
  assert eval_lib.batches(rows, 30, 300, multiple=64)[1] == (128, 1, [0])
  assert eval_lib.bucket_length(1) == eval_lib.bucket_length(64) == 64


@pytest.mark.parametrize('attention', ['blockwise', 'flash_cpu'])
def test_padded_generation_equals_each_prompt_alone(params, attention):
  """Prompts of different lengths, left-padded into buckets of 64 (two buckets here) and batched
  within batch_tokens, continue exactly as each prompt alone by full forwards; the prefill runs
  the model's attention (blockwise or the CPU kernel) over the cache."""
  config = CFG.replace(attention=attention, block_q=16, block_k=16)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 256, size=n).astype(np.int32) for n in (37, 50, 64, 70, 61)]
  rope = rope_lib.yarn(head_dim=CFG.head_dim, scale=4.0, theta=CFG.rope_theta,
                       original_length=CFG.original_length)
  out = eval_lib.greedy_generate_padded(config, params, prompts, rope, 4, batch_tokens=140,
                                        fill=257)
  for prompt, row in zip(prompts, out):
    np.testing.assert_array_equal(row, _reference_greedy(params, prompt[None], lambda n: rope,
                                                         4)[0])


def test_passkey_check_and_sweep_are_bounded_and_share_compiles(params, monkeypatch):
  """The skip check's 16 prompts run 2 at a time under batch_tokens = 2 x 128 (one shape),
  with the NLLs of one big batch (the full-forward reference is the test above); the sweep's prompts of a length (every depth) share one
  bucket and batch shape, within batch_tokens with the generated tokens."""
  tok = data_lib.ByteTokenizer()
  rope = rope_lib.none(head_dim=CFG.head_dim)
  shapes = []
  selected_nll_fn = eval_lib.selected_nll_fn

  def recording(config):
    fn = selected_nll_fn(config)
    return lambda p, tokens, r, index: (shapes.append(tokens.shape), fn(p, tokens, r, index))[1]

  monkeypatch.setattr(eval_lib, 'selected_nll_fn', recording)
  bounded = eval_lib.passkey_answer_nll(CFG, params, tok, 128, rope, trials=16, batch_tokens=256)
  assert set(shapes) == {(2, 128)} and len(shapes) == 8
  shapes.clear()
  whole = eval_lib.passkey_answer_nll(CFG, params, tok, 128, rope, trials=16, batch_tokens=4096)
  assert set(shapes) == {(16, 128)}
  np.testing.assert_allclose(bounded, whole, rtol=1e-6)
  generate_fn = eval_lib._generate_fn
  calls = []

  def recording_generate(config, num_tokens):
    fn = generate_fn(config, num_tokens)
    return lambda p, prompt_BP, pad_B, r: (calls.append((prompt_BP.shape, num_tokens)),
                                           fn(p, prompt_BP, pad_B, r))[1]

  monkeypatch.setattr(eval_lib, '_generate_fn', recording_generate)
  eval_lib.passkey_accuracy(CFG, params, tok, [128, 192], methods=('none',), depths=(0.0, 1.0),
                            trials=3, progress=False, batch_tokens=700)
  # 6 prompts per length: 128-token ones in batches of 700 // (128 + 7) = 5, 192 ones of 3.
  assert sorted(set(calls)) == [((3, 192), 7), ((5, 128), 7)]
  assert len(calls) == 4


def test_methods_equal_at_a_length_run_once(params, docs, monkeypatch):
  """At L <= L0 every method is plain RoPE (s = 1): one forward serves them all, in perplexity
  and in the passkey sweep; beyond L0 each runs its own."""
  calls = []
  document_nll = eval_lib.document_nll
  monkeypatch.setattr(eval_lib, 'document_nll',
                      lambda *a, **k: (calls.append(a[2].shape[1]), document_nll(*a, **k))[1])
  methods = ('none', 'linear', 'yarn', 'llama3')
  res = eval_lib.perplexity_vs_length(CFG, params, docs, [64, 128], methods=methods,
                                      num_windows=2, progress=False)
  assert calls == [64] + [128] * 4
  for m in methods:
    assert res['methods'][m]['nll_per_document'][0] == res['methods']['none']['nll_per_document'][0]
  sweeps = []
  eval_lib.passkey_accuracy(CFG.replace(original_length=128), params, data_lib.ByteTokenizer(),
                            [128, 192], methods=methods, depths=(0.5,), trials=1, progress=False,
                            generate=lambda prompts, rope, n: (sweeps.append(len(prompts[0])),
                                                               np.zeros((len(prompts), n)))[1])
  assert len(sweeps) == 1 + 4  # L0 = 128: one sweep there, one per method at 192
  assert eval_lib.rope_key(rope_lib.linear(head_dim=16, scale=1.0)) == \
      eval_lib.rope_key(rope_lib.none(head_dim=16))


def test_every_length_sees_the_same_documents(params, docs):
  results = eval_lib.perplexity_vs_length(CFG, params, docs, [64, 128, 256], methods=('none',),
                                          num_windows=3, seed=1, progress=False)
  # The 4 documents of >= 256 tokens qualify; 3 are drawn once and truncated at each length.
  assert results['num_qualified'] == 4 and results['document_length'] == 256
  spans = data_lib.eval_windows(docs, 256, 3, seed=1)
  rope = rope_lib.none(head_dim=CFG.head_dim)
  for j, L in enumerate([64, 128, 256]):
    per_doc = results['methods']['none']['nll_per_document'][j]
    np.testing.assert_allclose(per_doc, eval_lib.document_nll(CFG, params, spans[:, :L], rope),
                               rtol=1e-6)
    assert results['methods']['none']['nll'][j] == pytest.approx(np.mean(per_doc))
  with pytest.raises(ValueError, match=r'evaluate.num_windows = 3 .* only 2 of the split'):
    eval_lib.perplexity_vs_length(CFG, params, docs, [64, 520], methods=('none',),
                                  num_windows=3, progress=False)


def test_sliding_windows_score_every_token_once():
  spans = np.arange(22).reshape(2, 11)
  windows, scored, doc = eval_lib.sliding_windows(spans, 4, 3)
  # Starts 0, 3, 6 and a last window ending at the span's end (7).
  np.testing.assert_array_equal(windows[:4, 0], [0, 3, 6, 7])
  np.testing.assert_array_equal(scored[:4], [[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(doc, [0] * 4 + [1] * 4)
  _, scored, _ = eval_lib.sliding_windows(spans[:, :10], 4, 2)
  np.testing.assert_array_equal(scored[:4], [[1, 1, 1], [0, 1, 1], [0, 1, 1], [0, 1, 1]])
  assert scored.sum() == 2 * 9  # every prediction of each span once
  with pytest.raises(ValueError, match='evaluate.stride'):
    eval_lib.sliding_windows(spans, 4, 5)


def test_sliding_mode_matches_truncated_at_the_span_and_adds_context(params, docs):
  kw = dict(methods=('none',), num_windows=2, progress=False)
  truncated = eval_lib.perplexity_vs_length(CFG, params, docs, [64, 256], **kw)
  sliding = eval_lib.perplexity_vs_length(CFG, params, docs, [64, 256], stride=32, **kw)
  t, s = truncated['methods']['none']['nll'], sliding['methods']['none']['nll']
  # At the span's own length one window covers it: the two modes agree.
  assert s[1] == pytest.approx(t[1], rel=1e-6)
  # At 64 the sliding mode scores all 255 predictions of the span, not the first 63.
  spans = data_lib.eval_windows(docs, 256, 2)
  rope = rope_lib.none(head_dim=CFG.head_dim)
  windows, scored, doc = eval_lib.sliding_windows(spans, 64, 32)
  nll = np.asarray(eval_lib.nll_fn(CFG)(params, jnp.asarray(windows), rope))
  expected = [(nll * scored)[doc == i].sum() / 255 for i in range(2)]
  np.testing.assert_allclose(sliding['methods']['none']['nll_per_document'][0], expected,
                             rtol=1e-5)
  assert sliding['stride'] == 32 and truncated['stride'] is None
