"""Perplexity vs. context length for every scaling method (batched, jitted, one compile per shape).

Every method at a length is a `RopeScaling` argument of the same compiled function, so adding a
method costs forward passes, never a compilation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from longrope_jax import attention as attention_lib
from longrope_jax import data as data_lib
from longrope_jax import model as model_lib
from longrope_jax import niah
from longrope_jax import rope as rope_lib
from longrope_jax.rope import RopeScaling

LN2 = math.log(2.0)
DEFAULT_METHODS = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn', 'llama3')

# A rope source is a fixed RopeScaling, or a function of the evaluation length returning one
# (or None to skip that length).
RopeSource = RopeScaling | Callable[[int], RopeScaling | None]


def rope_key(rope: RopeScaling) -> bytes:
  """The values of `rope` as the model uses them (f32): sources with equal keys give the same
  forward, which the evaluations compute once (at L <= L0 every method is plain RoPE)."""
  return b'|'.join(np.asarray(x, np.float32).tobytes()
                   for x in (rope.factors, rope.n_hat, rope.attn_scale))


def batch_size_for(length: int, batch_tokens: int) -> int:
  """Windows per forward so a micro-batch holds about `batch_tokens` tokens (at least 1)."""
  return max(1, batch_tokens // length)


@functools.cache
def nll_fn(config: model_lib.ModelConfig) -> Callable:
  """Jitted (params, tokens i32[B, T], rope) -> next-token NLL f32[B, T - 1] (one per config)."""
  return jax.jit(lambda params, tokens_BT, rope: model_lib.token_nll(config, params, tokens_BT,
                                                                     rope))


@functools.cache
def selected_nll_fn(config: model_lib.ModelConfig) -> Callable:
  """Jitted (params, tokens i32[B, T], rope, index i32[B, A]) -> NLL f32[B, A] of the tokens
  after the selected positions (`model.selected_nll`; one per config)."""
  return jax.jit(lambda params, tokens_BT, rope, index_BA: model_lib.selected_nll(
      config, params, tokens_BT, rope, index_BA))


@functools.cache
def nll_sum_fn(config: model_lib.ModelConfig) -> Callable:
  """Jitted (params, windows i32[B, L], rope) -> summed next-token NLL f32[B] (one per config)."""
  return jax.jit(lambda params, windows_BL, rope: model_lib.token_nll(config, params, windows_BL,
                                                                      rope).sum(axis=-1))


def document_nll(config: model_lib.ModelConfig, params: Any, windows_NL: np.ndarray,
                 rope: RopeScaling, *, batch_tokens: int = 16384) -> np.ndarray:
  """Mean next-token NLL (nats) of each window[N, L]: f64[N], in micro-batches of equal shape."""
  N, L = windows_NL.shape
  batch = min(N, batch_size_for(L, batch_tokens))
  fn = nll_sum_fn(config)
  sums = []
  for start in range(0, N, batch):
    chunk = windows_NL[start:start + batch]
    real = chunk.shape[0]
    if real < batch:  # pad to the compiled shape; padded rows are dropped below
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
    sums.append(np.asarray(fn(params, jnp.asarray(chunk), rope), np.float64)[:real])
  return np.concatenate(sums) / (L - 1)


def mean_nll(config: model_lib.ModelConfig, params: Any, windows_NL: np.ndarray,
             rope: RopeScaling, *, batch_tokens: int = 16384) -> float:
  """Mean next-token NLL (nats) over windows[N, L] (every window has L - 1 predictions)."""
  return float(document_nll(config, params, windows_NL, rope, batch_tokens=batch_tokens).mean())


def sliding_windows(spans_ND: np.ndarray, length: int,
                    stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Windows of `length` tokens every `stride` tokens over each span (the last one ends at D), and
  which predictions each scores: every token after the first is scored once, with the longest
  context its window gives (Hugging Face's strided perplexity, as LongRoPE's evaluation offers).

  Returns windows i32[N * W, length], scored bool[N * W, length - 1] and doc i32[N * W].
  """
  N, D = spans_ND.shape
  if not 0 < stride <= length <= D:
    raise ValueError(f"a sliding-window evaluation needs 0 < evaluate.stride ({stride}) <= the "
                     f"length ({length}) <= the document span ({D}); lower evaluate.stride.")
  starts = list(range(0, D - length + 1, stride))
  if starts[-1] != D - length:
    starts.append(D - length)
  scored_WT = np.zeros((len(starts), length - 1), bool)
  scored_until = 0  # predictions of tokens < scored_until are done
  for w, s in enumerate(starts):
    target = s + 1 + np.arange(length - 1)  # absolute index of each prediction's target
    scored_WT[w] = target >= max(scored_until, 1)
    scored_until = s + length
  windows = np.stack([spans_ND[:, s:s + length] for s in starts], axis=1)  # [N, W, L]
  return (windows.reshape(-1, length).astype(np.int32), np.tile(scored_WT, (N, 1)),
          np.repeat(np.arange(N, dtype=np.int32), len(starts)))


def sliding_document_nll(config: model_lib.ModelConfig, params: Any, spans_ND: np.ndarray,
                         length: int, stride: int, rope: RopeScaling, *,
                         batch_tokens: int = 16384) -> np.ndarray:
  """Mean NLL (nats) of every token of each span after the first, predicted by windows of
  `length` tokens sliding by `stride` (`sliding_windows`): f64[N]."""
  windows_BL, scored_BT, doc_B = sliding_windows(spans_ND, length, stride)
  B, L = windows_BL.shape
  batch = min(B, batch_size_for(L, batch_tokens))
  fn = nll_fn(config)
  sums = np.zeros(spans_ND.shape[0])
  for start in range(0, B, batch):
    chunk = windows_BL[start:start + batch]
    real = chunk.shape[0]
    if real < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
    nll_BT = np.asarray(fn(params, jnp.asarray(chunk), rope), np.float64)[:real]
    np.add.at(sums, doc_B[start:start + real], (nll_BT * scored_BT[start:start + real]).sum(-1))
  return sums / (spans_ND.shape[1] - 1)


def eval_documents(token_docs: list[np.ndarray], length: int, num: int, *,
                   seed: int = 0) -> tuple[np.ndarray, int]:
  """The first `length` tokens of `num` documents at least `length` long, i32[num, length], and
  how many documents qualified: one fixed set of documents for every evaluated length."""
  qualified = sum(len(d) >= length for d in token_docs)
  if qualified < num:
    raise ValueError(
        f"evaluate.num_windows = {num} documents of at least {length} tokens are needed (the "
        f"longest evaluated length, so every length sees the same documents) but only "
        f"{qualified} of the split's {len(token_docs)} qualify; lower evaluate.num_windows or "
        f"the longest of evaluate.multiples, or choose a split with longer documents "
        f"(evaluate.split).")
  windows = data_lib.eval_windows(token_docs, length, num, seed, field='evaluate.num_windows')
  return windows, qualified


def method_rope(name: str, *, config: model_lib.ModelConfig, length: int,
                **overrides) -> RopeScaling:
  """Registered method `name` extending config.original_length to `length` (scale s = length / L0)."""
  kwargs = rope_lib.method_kwargs(head_dim=config.head_dim, theta=config.rope_theta,
                                  original_length=config.original_length, length=length)
  kwargs.update(overrides)
  return rope_lib.get(name, **kwargs)


def perplexity_vs_length(config: model_lib.ModelConfig, params: Any,
                         token_docs: list[np.ndarray], lengths: Iterable[int], *,
                         methods: Iterable[str] = DEFAULT_METHODS,
                         extra: Mapping[str, RopeSource] | None = None,
                         num_windows: int = 16, seed: int = 0, batch_tokens: int = 16384,
                         document_length: int | None = None, stride: int | None = None,
                         progress: bool = True,
                         done: Mapping[tuple[str, int], list[float] | None] | None = None,
                         on_result: Callable[[str, int, list[float] | None], None] | None = None
                         ) -> dict:
  """NLL of each method at each length on ONE set of documents (LongRoPE's protocol).

  `num_windows` documents at least `document_length` tokens long (default: the longest length)
  are drawn once by `seed`; at length L each method sees the first L tokens of every one
  (`stride` None, the truncated setting), or, with a `stride`, the whole first-`document_length`
  span through windows of L tokens sliding by `stride` (`sliding_document_nll`).
  `done` maps (method, length) to per-document NLLs already computed (a resumed run skips them);
  `on_result` is called with each new (method, length, per-document NLLs) to persist it.
  Sources whose scaling has the same values at a length (every method at L <= L0, where s = 1)
  are computed once. Returns {'lengths', 'original_length', 'num_windows', 'num_qualified',
  'document_length', 'stride', 'methods': {name: {'nll', 'bits_per_token', 'perplexity',
  'nll_per_document'}}} (lists over lengths; a method skipped at a length holds None).
  """
  lengths = sorted(set(int(L) for L in lengths))
  document_length = int(document_length or max(lengths))
  if document_length < max(lengths):
    raise ValueError(f"document_length {document_length} is shorter than the longest evaluated "
                     f"length {max(lengths)}.")
  methods = list(methods)
  sources: dict[str, RopeSource] = {
      m: (lambda L, m=m: method_rope(m, config=config, length=L)) for m in methods}
  sources.update(extra or {})
  spans_ND, qualified = eval_documents(token_docs, document_length, num_windows, seed=seed)
  if stride is not None:
    sliding_windows(spans_ND[:1], min(lengths), stride)  # fails early on a bad stride

  def per_document(L: int, rope: RopeScaling) -> list[float]:
    if stride is None:
      nll_N = document_nll(config, params, spans_ND[:, :L], rope, batch_tokens=batch_tokens)
    else:
      nll_N = sliding_document_nll(config, params, spans_ND, L, stride, rope,
                                   batch_tokens=batch_tokens)
    return nll_N.tolist()

  results = {name: dict(nll=[], bits_per_token=[], perplexity=[], nll_per_document=[])
             for name in sources}
  computed: dict[tuple[int, bytes], list[float]] = {}  # sources with the same values run once
  bar = tqdm(total=len(lengths) * len(sources), desc='perplexity', disable=not progress,
             dynamic_ncols=True)
  for L in lengths:
    for name, source in sources.items():
      if done is not None and (name, L) in done:
        docs_nll = done[(name, L)]
      else:
        rope = source(L) if callable(source) else source
        docs_nll = None
        if rope is not None:
          key = (L, rope_key(rope))
          if key not in computed:
            computed[key] = per_document(L, rope)
          docs_nll = computed[key]
        if on_result is not None:
          on_result(name, L, docs_nll)
      nll = None if docs_nll is None else float(np.mean(docs_nll))
      results[name]['nll_per_document'].append(docs_nll)
      results[name]['nll'].append(nll)
      results[name]['bits_per_token'].append(None if nll is None else nll / LN2)
      results[name]['perplexity'].append(None if nll is None else math.exp(nll))
      bar.set_postfix(L=L, method=name, ppl='-' if nll is None else f'{math.exp(nll):.3f}')
      bar.update(1)
  bar.close()
  return dict(lengths=lengths, original_length=config.original_length,
              num_windows=num_windows, num_qualified=qualified,
              document_length=document_length, stride=stride, methods=results)


# ----------------------------------------------------------------------------- passkey retrieval
@functools.cache
def _decode_fns(config: model_lib.ModelConfig):
  """Jitted prefill and one-token decode with the KV cache (one pair per config)."""

  def prefill(params, prompt_BP, rope, cache):
    B, P = prompt_BP.shape
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits_BPV, cache = model_lib.forward_with_cache(config, params, prompt_BP, positions_BP,
                                                     rope, cache)
    return jnp.argmax(logits_BPV[:, -1], axis=-1).astype(jnp.int32), cache

  def step(params, token_B, position, rope, cache):
    B = token_B.shape[0]
    positions_B1 = jnp.full((B, 1), position, jnp.int32)
    logits_B1V, cache = model_lib.forward_with_cache(config, params, token_B[:, None],
                                                     positions_B1, rope, cache)
    return jnp.argmax(logits_B1V[:, -1], axis=-1).astype(jnp.int32), cache

  return jax.jit(prefill), jax.jit(step)


@functools.cache
def _generate_fn(config: model_lib.ModelConfig, num_tokens: int) -> Callable:
  """Jitted (params, prompts i32[B, P], pad i32[B], rope) -> greedy continuation
  i32[B, num_tokens]: one prefill and a `lax.scan` of one-token steps with the KV cache, one
  program per shape. Row b's first pad[b] tokens are left padding: they sit at EMPTY_POSITION, so
  no real token ever sees them, and real token j of the row is at position j - pad[b], as it
  would be unpadded. Only the last position's logits of the prefill are computed."""

  def generate(params, prompt_BP, pad_B, rope):
    B, P = prompt_BP.shape
    cache = model_lib.init_cache(config, B, P + num_tokens)
    positions_BP = jnp.arange(P, dtype=jnp.int32)[None] - pad_B[:, None]
    positions_BP = jnp.where(positions_BP < 0, attention_lib.EMPTY_POSITION, positions_BP)
    x_BPD, cache = model_lib.forward_with_cache(config, params, prompt_BP, positions_BP, rope,
                                                cache, hidden=True)
    first_B = jnp.argmax(model_lib.logits(config, params, x_BPD[:, -1]), axis=-1)

    def step(carry, offset):
      token_B, cache = carry
      positions_B1 = (P - pad_B + offset)[:, None]
      logits_B1V, cache = model_lib.forward_with_cache(config, params, token_B[:, None],
                                                       positions_B1, rope, cache)
      token_B = jnp.argmax(logits_B1V[:, -1], axis=-1).astype(jnp.int32)
      return (token_B, cache), token_B

    offsets = jnp.arange(num_tokens - 1, dtype=jnp.int32)
    _, rest_NB = jax.lax.scan(step, (first_B.astype(jnp.int32), cache), offsets)
    return jnp.concatenate([first_B[:, None].astype(jnp.int32), rest_NB.T], axis=1)

  return jax.jit(generate)


def greedy_generate(config: model_lib.ModelConfig, params: Any, prompt_BP: np.ndarray,
                    rope: RopeScaling, num_tokens: int) -> np.ndarray:
  """Greedy continuation i32[B, num_tokens] of equal-length prompts, with the KV cache."""
  pad_B = jnp.zeros(prompt_BP.shape[0], jnp.int32)
  return np.asarray(_generate_fn(config, int(num_tokens))(params, jnp.asarray(prompt_BP), pad_B,
                                                          rope))


# Prompts (and teacher-forced sequences) are padded to a multiple of this many tokens, so the
# prompts of a passkey length (whose sizes differ by a few tokens) share one compiled program.
PASSKEY_BUCKET = 64


def bucket_length(length: int, multiple: int = PASSKEY_BUCKET) -> int:
  """`length` rounded up to a multiple of `multiple`."""
  return -(-int(length) // multiple) * multiple


def batches(rows: list[np.ndarray], extra: int, batch_tokens: int,
            multiple: int = PASSKEY_BUCKET) -> list[tuple[int, int, list[int]]]:
  """(bucket length, batch size, row indices) of micro-batches: rows grouped by `bucket_length`,
  at most batch_size_for(bucket + extra, batch_tokens) rows per batch (the evaluation's memory
  bound, `evaluate.batch_tokens`); every batch of a bucket has the same size (the last one is
  padded), so one compiled shape serves the bucket."""
  groups: dict[int, list[int]] = {}
  for i, row in enumerate(rows):
    groups.setdefault(bucket_length(len(row), multiple), []).append(i)
  out = []
  for bucket, indices in sorted(groups.items()):
    size = min(len(indices), batch_size_for(bucket + extra, batch_tokens))
    out += [(bucket, size, indices[k:k + size]) for k in range(0, len(indices), size)]
  return out


def _batch_rows(rows: list[np.ndarray], indices: list[int], bucket: int, size: int, fill: int,
                left: bool) -> tuple[np.ndarray, np.ndarray]:
  """(tokens i32[size, bucket], lengths i32[size]): rows[indices] padded with `fill` on the left
  or the right; rows beyond len(indices) repeat the first (their results are dropped)."""
  out = np.full((size, bucket), fill, np.int32)
  lengths = np.zeros(size, np.int32)
  for r in range(size):
    row = rows[indices[r] if r < len(indices) else indices[0]]
    lengths[r] = len(row)
    if left:
      out[r, bucket - len(row):] = row
    else:
      out[r, :len(row)] = row
  return out, lengths


def greedy_generate_padded(config: model_lib.ModelConfig, params: Any, prompts: list[np.ndarray],
                           rope: RopeScaling, num_tokens: int, *, batch_tokens: int = 16384,
                           fill: int = 0) -> np.ndarray:
  """Greedy continuations i32[len(prompts), num_tokens] of prompts of any lengths: left-padded to
  a multiple of PASSKEY_BUCKET tokens (`_generate_fn`: the padding is never visible) in batches of
  at most `batch_tokens` tokens with the continuation (`batches`); one compile per bucket and
  batch size. `fill` is the padding token id (any id)."""
  out = np.zeros((len(prompts), num_tokens), np.int32)
  fn = _generate_fn(config, int(num_tokens))
  for bucket, size, indices in batches(prompts, num_tokens, batch_tokens):
    prompt_BP, length_B = _batch_rows(prompts, indices, bucket, size, fill, left=True)
    out_BN = np.asarray(fn(params, jnp.asarray(prompt_BP), jnp.asarray(bucket - length_B), rope))
    out[indices] = out_BN[:len(indices)]
  return out


# A generate function: (prompts, i32[P_i] each, of any lengths; rope; num_tokens) -> greedy
# continuations i32[len(prompts), num_tokens].
GenerateFn = Callable[[list[np.ndarray], RopeScaling, int], np.ndarray]
# Tokens generated beyond the longest answer, so a longer number than the key reads as wrong
# (the official evaluations generate 10 tokens for a 5-digit key).
PASSKEY_MARGIN = 2


def retrieval_scores(tokenizer: data_lib.Tokenizer, samples: list['Sample'], rope: RopeScaling,
                     generate: GenerateFn, num_tokens: int | None = None) -> np.ndarray:
  """Each sample's score f32[len(samples)]: the share of its values among the numbers of the
  decoded greedy continuation (`niah.score`; one value: the first number is it, passkey's rule).
  `num_tokens` (default: the longest answer + PASSKEY_MARGIN) are generated by one `generate`
  call for all prompts, of any lengths."""
  num_tokens = num_tokens or max(len(a) for _, a, _ in samples) + PASSKEY_MARGIN
  out_BN = np.asarray(generate([p for p, _, _ in samples], rope, num_tokens))
  return np.asarray([niah.score(tokenizer.decode(row), values)
                     for row, (_, _, values) in zip(out_BN, samples)], np.float32)


# A retrieval sample: (prompt ids with BOS, answer ids, the values the answer holds).
Sample = tuple[np.ndarray, np.ndarray, list[str]]
# (rng, length, depth) -> a Sample: the task retrieval_accuracy measures.
SampleFn = Callable[[np.random.Generator, int, float], Sample]


def passkey_scores(generate: GenerateFn, tokenizer: data_lib.Tokenizer,
                   prompts: list[np.ndarray], answers: list[np.ndarray],
                   rope: RopeScaling) -> np.ndarray:
  """1.0 where the key parsed from the decoded continuation (`data.parse_passkey`) equals the
  key of the answer, else 0.0: f32[len(prompts)]. One `generate` call for all prompts."""
  samples = []
  for prompt, answer in zip(prompts, answers):
    key = data_lib.parse_passkey(tokenizer.decode(answer))
    samples.append((prompt, answer, [] if key is None else [key]))
  return retrieval_scores(tokenizer, samples, rope, generate)


def passkey_task(tokenizer: data_lib.Tokenizer) -> SampleFn:
  """The passkey task (`data.passkey_sample`) as a SampleFn."""
  def draw(rng, length, depth):
    prompt, answer = data_lib.passkey_sample(rng, length, depth, tokenizer)
    return prompt, answer, [data_lib.parse_passkey(tokenizer.decode(answer))]
  return draw


def retrieval_accuracy(config: model_lib.ModelConfig, params: Any,
                       tokenizer: data_lib.Tokenizer, lengths: Iterable[int], task: SampleFn, *,
                       methods: Iterable[str] = DEFAULT_METHODS,
                       extra: Mapping[str, RopeSource] | None = None,
                       depths: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 10,
                       seed: int | tuple = 0, progress: bool = True, desc: str = 'retrieval',
                       done: Mapping[tuple[str, int], Mapping] | None = None,
                       on_result: Callable[[str, int, dict | None], None] | None = None,
                       generate: GenerateFn | None = None, batch_tokens: int = 16384) -> dict:
  """Accuracy of a retrieval `task` (passkey, a NIAH task) per method, length and depth.

  The model continues each prompt greedily (KV cache, `greedy_generate_padded`: the prompts of a
  length, every depth, padded to one bucket, at most `batch_tokens` tokens per call; or
  `generate` when given); a continuation is scored on the numbers it decodes to
  (`retrieval_scores`), so scoring means the same for every tokenizer. The same prompts (drawn by
  rng [*seed, L, depth index]) serve every method; methods whose scaling has the same values at a
  length (every one at L <= L0) share one sweep. `done` maps (method, length) to a cell
  {'accuracy': [per depth], 'scores': [[per trial] per depth] (optional)} already computed;
  `on_result` gets each new cell (None: the source gives no scaling there). Returns {'lengths',
  'depths', 'trials', 'methods': {name: {'accuracy': [[acc per depth] per length], 'mean': [per
  length], 'scores': [[[per trial] per depth] per length] (None where unknown)}}}.
  """
  lengths = sorted(set(int(L) for L in lengths))
  depths = [float(d) for d in depths]
  seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
  if generate is None:
    def generate(prompts, rope, num_tokens):
      return greedy_generate_padded(config, params, prompts, rope, num_tokens,
                                    batch_tokens=batch_tokens, fill=tokenizer.eos_id)
  sources: dict[str, RopeSource] = {
      m: (lambda L, m=m: method_rope(m, config=config, length=L)) for m in methods}
  sources.update(extra or {})
  samples = {}
  for L in lengths:
    for j, depth in enumerate(depths):
      rng = np.random.default_rng([*seed, L, j])
      samples[L, j] = [task(rng, L, depth) for _ in range(trials)]
  results = {name: dict(accuracy=[], mean=[], scores=[]) for name in sources}
  computed: dict[tuple[int, bytes], dict] = {}  # sources with the same values run once
  bar = tqdm(total=len(lengths) * len(sources), desc=desc, disable=not progress,
             dynamic_ncols=True)
  for L in lengths:
    every = [s for j in range(len(depths)) for s in samples[L, j]]
    num_tokens = max(len(a) for _, a, _ in every) + PASSKEY_MARGIN
    for name, source in sources.items():
      if done is not None and (name, L) in done:
        cell = done[(name, L)]
      else:
        rope = source(L) if callable(source) else source
        cell = None
        if rope is not None and (L, rope_key(rope)) in computed:
          cell = computed[L, rope_key(rope)]
        elif rope is not None:
          scores = retrieval_scores(tokenizer, every, rope, generate, num_tokens)
          scores = scores.reshape(len(depths), trials).tolist()
          cell = computed[L, rope_key(rope)] = dict(
              accuracy=[float(np.mean(d)) for d in scores], scores=scores)
        if on_result is not None:
          on_result(name, L, cell)
      row = None if cell is None else cell['accuracy']
      results[name]['accuracy'].append(row)
      results[name]['mean'].append(None if row is None else float(np.mean(row)))
      results[name]['scores'].append(None if cell is None else cell.get('scores'))
      bar.set_postfix(L=L, method=name, acc='-' if row is None else f'{np.mean(row):.2f}')
      bar.update(1)
  bar.close()
  return dict(lengths=lengths, original_length=config.original_length, depths=depths,
              trials=trials, methods=results)


def passkey_accuracy(config: model_lib.ModelConfig, params: Any, tokenizer: data_lib.Tokenizer,
                     lengths: Iterable[int], *, methods: Iterable[str] = DEFAULT_METHODS,
                     extra: Mapping[str, RopeSource] | None = None,
                     depths: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 10,
                     seed: int = 0, progress: bool = True,
                     done: Mapping[tuple[str, int], list] | None = None,
                     on_result: Callable[[str, int, list], None] | None = None,
                     generate: GenerateFn | None = None, batch_tokens: int = 16384) -> dict:
  """Passkey retrieval accuracy per method, length and depth (`retrieval_accuracy` of
  `passkey_task`). `done` maps (method, length) to the accuracies per depth already computed;
  `on_result` gets each new row. Returns {'lengths', 'depths', 'trials', 'methods': {name:
  {'accuracy': [[acc per depth] per length], 'mean': [per length]}}}."""
  results = retrieval_accuracy(
      config, params, tokenizer, lengths, passkey_task(tokenizer), methods=methods, extra=extra,
      depths=depths, trials=trials, seed=seed, progress=progress, desc='passkey',
      done=None if done is None else {k: dict(accuracy=v) for k, v in done.items()},
      on_result=None if on_result is None else (
          lambda m, L, cell: on_result(m, L, None if cell is None else cell['accuracy'])),
      generate=generate, batch_tokens=batch_tokens)
  for row in results['methods'].values():
    del row['scores']
  return results


def answer_nll(config: model_lib.ModelConfig, params: Any, length: int, rope: RopeScaling,
               task: SampleFn, *, trials: int = 16, seed: int | tuple = 0,
               batch_tokens: int = 16384, fill: int = 0) -> list[float]:
  """Teacher-forced NLL (nats) of each answer token of `trials` samples of a retrieval `task` at
  `length`, at random depths (rng [*seed, length, 99]): a continuous view of retrieval where
  accuracy is all or nothing. A model that copies the values drives it toward 0; one that only
  knows the format sits at ln 10 per digit.

  Sequences (prompt + answer, tokenized together by the task) are padded on the right with
  `fill` (the model is causal: the padding changes no earlier prediction) to one bucket length
  and run in batches of at most `batch_tokens` tokens (`batches`), with logits for the answer's
  positions only (`model.selected_nll`): memory is a forward's activations, not `trials` windows
  of logits. Returns the mean over trials per answer token (a tokenizer that splits values into
  different numbers of tokens averages each position over the samples having it).
  """
  seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
  rng = np.random.default_rng([*seed, length, 99])
  samples = [task(rng, length, float(rng.random())) for _ in range(trials)]
  sequences = [np.concatenate([p, a]) for p, a, _ in samples]
  A = max(len(a) for _, a, _ in samples)
  nll_TA = np.full((trials, A), np.nan)
  fn = selected_nll_fn(config)
  for bucket, size, indices in batches(sequences, 0, batch_tokens):
    tokens_BT, _ = _batch_rows(sequences, indices, bucket, size, fill, left=False)
    starts_B = [len(samples[i][0]) - 1 for i in indices] + [0] * (size - len(indices))
    index_BA = np.minimum(np.asarray(starts_B)[:, None] + np.arange(A), bucket - 2)
    nll_BA = np.asarray(fn(params, jnp.asarray(tokens_BT), rope, jnp.asarray(index_BA, jnp.int32)))
    for i, row in zip(indices, nll_BA):
      nll_TA[i, :len(samples[i][1])] = row[:len(samples[i][1])]
  return np.nanmean(nll_TA, axis=0).tolist()


# The passkey stage's skip check runs at no more than this many tokens: whether a model copies the
# key at all shows at 2K tokens as at 8K, for a quarter of the forwards (on SmolLM2, 16 prompts
# at 8K were 9 of the stage's 11 minutes).
PASSKEY_CHECK_LENGTH = 2048


def passkey_answer_nll(config: model_lib.ModelConfig, params: Any,
                       tokenizer: data_lib.Tokenizer, length: int, rope: RopeScaling, *,
                       trials: int = 16, seed: int = 0,
                       batch_tokens: int = 16384) -> list[float]:
  """`answer_nll` of the passkey task: the teacher-forced NLL of each answer token of `trials`
  passkey prompts at `length` (prompt and key tokenized together, `data.passkey_sample`), in
  batches of at most `batch_tokens` tokens."""
  return answer_nll(config, params, length, rope, passkey_task(tokenizer), trials=trials,
                    seed=seed, batch_tokens=batch_tokens, fill=tokenizer.eos_id)


def generate_switching(config: model_lib.ModelConfig, params: Any, prompt_BP: np.ndarray,
                       factors: rope_lib.LongRopeFactors, num_tokens: int) -> np.ndarray:
  """Greedy generation with Phi-3's short/long switch: the next token after n tokens uses
  factors.select(n); when n first exceeds the original length under the short factors, the
  cache is rebuilt by a prefill of all n tokens with the long factors. Returns i32[B, num_tokens].
  """
  B, P = prompt_BP.shape
  prefill, step = _decode_fns(config)
  capacity = P + num_tokens
  rope = factors.select(P)
  cache = model_lib.init_cache(config, B, capacity)
  token_B, cache = prefill(params, jnp.asarray(prompt_BP), rope, cache)
  out = [np.asarray(token_B)]
  for i in range(1, num_tokens):
    length = P + i  # tokens in the sequence once token_B is appended
    if factors.select(length) is not rope:
      rope = factors.select(length)
      sequence = np.concatenate([prompt_BP, np.stack(out, axis=1)], axis=1)
      cache = model_lib.init_cache(config, B, capacity)
      token_B, cache = prefill(params, jnp.asarray(sequence), rope, cache)
    else:
      token_B, cache = step(params, token_B, jnp.int32(length - 1), rope, cache)
    out.append(np.asarray(token_B))
  return np.stack(out, axis=1)
