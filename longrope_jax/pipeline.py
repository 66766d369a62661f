"""Experiment stages driven by an ml_collections config, each resumable from its workdir.

The entry points in `experiments/` only parse flags and call `run`. Workdir layout:
config.json, metrics.jsonl, ckpt/, eval/, search/, results.json, report.md, plots/*.png.
"""

from __future__ import annotations

import dataclasses
import contextlib
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import console
from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import gguf_import
from longrope_jax import hf
from longrope_jax import mesh as mesh_lib
from longrope_jax import metrics as metrics_lib
from longrope_jax import model as model_lib
from longrope_jax import plots
from longrope_jax import provenance
from longrope_jax import report as report_lib
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib
from longrope_jax import search_space
from longrope_jax import train as train_lib
from longrope_jax import validation


class Run:
  """A config and a workdir, with the data and model built once and shared by the stages.

  Lengths come from here only: `extension(multiple)` is L0 -> multiple x L0 (`rope.Extension`),
  `lengths(multiples)` the evaluation lengths.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    self.config = config
    self.workdir = ckpt_lib.abspath(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.results_path = self.workdir / 'results.json'

  # -------------------------------------------------------------------------- shared pieces
  @functools.cached_property
  def tokenizer(self) -> data_lib.Tokenizer:
    spec = self.config.data.tokenizer
    if spec == 'auto':
      if not self.hf_path:
        raise ValueError("data.tokenizer='auto' takes the tokenizer.json of model.path; set "
                         "model.path or data.tokenizer (bytes or a tokenizer.json path).")
      spec = str(pathlib.Path(self.hf_path) / 'tokenizer.json')
    return data_lib.get_tokenizer(spec)

  @functools.cached_property
  def hf_path(self) -> str | None:
    """The Hugging Face checkpoint folder (config.model.path; a GGUF spec such as 'gguf:smollm2'
    is converted once into a cached folder, gguf_import.resolve_model_path), or None for a
    workdir model."""
    return gguf_import.resolve_model_path(self.config.model.path)

  @functools.cached_property
  def hf_checkpoint(self) -> hf.Checkpoint:
    return hf.load(self.hf_path, param_dtype=self.config.model.param_dtype,
                   dtype=self.config.model.dtype,
                   sliding_window=hf.parse_sliding_window(self.config.model.sliding_window))

  @functools.cached_property
  def model_config(self) -> model_lib.ModelConfig:
    c = self.config.model
    base = self.hf_checkpoint.config if self.hf_path else model_lib.get_config(c.variant)
    overrides = dict(attention=c.attention, dtype=c.dtype, remat=c.remat)
    window = hf.parse_sliding_window(c.sliding_window)
    if not self.hf_path and window != hf.KEEP:
      overrides['sliding_window'] = window
    if c.original_length is not None:  # the pretraining window, where config.json's differs
      overrides['original_length'] = c.original_length
    if base.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"model.variant {c.variant!r} has vocab_size {base.vocab_size} but the "
                       f"tokenizer has {self.tokenizer.vocab_size} ids; choose a matching variant.")
    return base.replace(**overrides)

  @functools.lru_cache(maxsize=None)
  def documents(self, split: str) -> list:
    d = self.config.data
    docs = data_lib.load_split(d.source, split, path=d.path, tfds_name=d.tfds_name,
                               data_dir=d.data_dir, text_key=d.text_key)
    return data_lib.encode_documents(docs, self.tokenizer)

  @property
  def original_length(self) -> int:
    return self.model_config.original_length

  def _mesh_config(self) -> mesh_lib.MeshConfig:
    return mesh_lib.MeshConfig(**{k: int(v) for k, v in self.config.mesh.items()})

  @functools.cached_property
  def train_mesh(self) -> jax.sharding.Mesh | None:
    """The (data, fsdp, seq) mesh of pretraining and fine-tuning; None on a single device."""
    m = self._mesh_config().replace(pop=1)
    return mesh_lib.make_mesh(m) if math.prod(m.shape(len(jax.devices())).values()) > 1 else None

  @functools.cached_property
  def search_mesh(self) -> jax.sharding.Mesh:
    """The search's mesh: candidates over 'pop' (the rest of the devices by default), one
    sequence over 'seq' with ring attention."""
    m = self._mesh_config()
    return mesh_lib.make_mesh(mesh_lib.MeshConfig(pop=m.pop, seq=m.seq))

  def sequence_mesh(self):
    """A context setting the 'seq' mesh for ring attention in evaluation (a no-op without)."""
    seq = self._mesh_config().seq
    if self.model_config.attention != 'ring' or seq == 1:
      return contextlib.nullcontext()
    return jax.set_mesh(mesh_lib.make_mesh(mesh_lib.MeshConfig(seq=seq, pop=1)))

  def training_config(self, attention: str) -> model_lib.ModelConfig:
    """The model as trained: ring attention when the training mesh splits sequences over 'seq',
    else `attention` (the model's own)."""
    ring = self.train_mesh is not None and self.train_mesh.shape[mesh_lib.SEQ_AXIS] > 1
    return self.model_config.replace(attention='ring' if ring else attention)

  def extension(self, multiple: float, **kwargs) -> rope_lib.Extension:
    """L0 -> multiple x L0."""
    return rope_lib.Extension.by_multiple(self.original_length, multiple, **kwargs)

  def lengths(self, multiples) -> list[int]:
    return [self.extension(m).target_length for m in multiples]

  def params(self) -> Any:
    """The workdir's latest checkpoint; else, with config.model.path, the HF checkpoint."""
    if self.hf_path and not (self.workdir / 'ckpt').exists():
      return self.hf_checkpoint.params
    return train_lib.load_params(self.model_config, self.workdir)

  def results(self) -> dict:
    if not self.results_path.exists():
      return {}
    return ckpt_lib.read_json(self.results_path, what='results',
                              fix=f'delete {self.results_path}: each stage rewrites its entry '
                              'from its caches')

  def save_result(self, key: str, value: Any) -> None:
    results = self.results()
    results[key] = value
    ckpt_lib.write_json(self.results_path, results)

  def searched(self, key: str = 'search') -> search_lib.SearchResult:
    """A finished search's result (results.json[key])."""
    return search_lib.SearchResult.from_json(self.results()[key])

  def write_config(self) -> None:
    ckpt_lib.write_json(self.workdir / 'config.json', json.loads(self.config.to_json_best_effort()))


# ----------------------------------------------------------------------------- stages
def pretrain(run: Run) -> None:
  """Pretrains the base model at its original window (resumes from workdir/ckpt)."""
  c = run.config.pretrain
  mc = run.model_config
  batches = data_lib.PackedBatches(run.documents('train'), c.batch_size, run.original_length,
                                   seed=run.config.seed, passkey_fraction=c.passkey_fraction,
                                   copy_fraction=c.copy_fraction, tokenizer=run.tokenizer)
  val = data_lib.eval_windows(run.documents('validation'), run.original_length, c.eval_windows,
                              seed=run.config.seed)
  t0 = time.time()
  train_lib.train(run.training_config(run.model_config.attention),
                  train_lib.OptimConfig.from_config(c), batches,
                  rope_lib.none(head_dim=mc.head_dim), run.workdir, seed=run.config.seed,
                  eval_windows=val, eval_every=c.eval_every, ckpt_every=c.ckpt_every,
                  desc='pretrain', mesh=run.train_mesh)
  records = ckpt_lib.read_jsonl(run.workdir / 'metrics.jsonl')
  plots.training_curve(records, run.workdir / 'plots' / 'pretrain.png',
                       caption=plots.measured_caption(
                           what=f'Validation bits per token at L0 = {run.original_length}',
                           split='validation', documents=c.eval_windows,
                           machine=run.results().get('machine')))
  summary = dict(steps=c.steps, params=mc.num_params(),
                 tokens=c.steps * c.batch_size * run.original_length)
  prior = run.results().get('pretrain', {})
  summary['seconds'] = prior.get('seconds', 0.0) + (time.time() - t0)
  last_val = [r for r in records if 'val_bits_per_token' in r]
  if last_val:
    summary['val_bits_per_token'] = last_val[-1]['val_bits_per_token']
  run.save_result('pretrain', summary)


def evaluate(run: Run) -> dict:
  """Perplexity of every method at every length on held-out documents (resumable per cell)."""
  c = run.config.evaluate
  extra = {}
  if 'search' in run.results():
    extra['longrope'] = longrope_source(run)
  results = _perplexity(run, 'perplexity', run.params(), c.methods, extra)
  plots.perplexity_vs_length(results, run.workdir / 'plots' / 'perplexity.png',
                             title=f'Held-out perplexity vs length ({c.split} split)',
                             caption=plots.measured_caption(
                                 what='Per-token perplexity on the first L tokens',
                                 split=c.split, documents=c.num_windows,
                                 machine=run.results().get('machine')))
  return results


def _perplexity(run: Run, key: str, params: Any, methods, extra: dict, *,
                multiples=None, stride: int | None = None, depends: Any = None,
                save: bool = True) -> dict:
  """Perplexity vs length of `methods` and `extra` sources at `multiples` (default
  evaluate.multiples) on one set of documents as long as the longest of these and
  evaluate.multiples (so tables of one run pair document by document), truncated, or sliding by
  `stride` (default evaluate.stride). Cached per cell in eval/<key>.jsonl (cells of another
  protocol or other `depends` (JSON: what the sources were built from), or without per-document
  values, are dropped and recomputed); saved as results.json[key] if `save`."""
  c = run.config.evaluate
  multiples = tuple(c.multiples if multiples is None else multiples)
  lengths = run.lengths(multiples)
  protocol = dict(split=c.split, num_windows=c.num_windows, seed=run.config.seed,
                  document_length=max(run.lengths(tuple(c.multiples) + multiples)),
                  stride=c.stride if stride is None else stride)
  if depends is not None:
    protocol['depends'] = json.loads(json.dumps(depends))
  cache_path = run.workdir / 'eval' / f'{key}.jsonl'
  current = lambda r: r.get('protocol') == protocol and 'nll_per_document' in r  # noqa: E731
  ckpt_lib.truncate_jsonl(cache_path, current)
  done = {(r['method'], r['length']): r['nll_per_document']
          for r in ckpt_lib.read_jsonl(cache_path)}

  def on_result(method, length, docs_nll):
    nll = None if docs_nll is None else float(np.mean(docs_nll))
    ckpt_lib.append_jsonl(cache_path, dict(method=method, length=length, nll=nll,
                                           nll_per_document=docs_nll, protocol=protocol))

  with run.sequence_mesh():
    results = eval_lib.perplexity_vs_length(
        run.model_config, params, run.documents(c.split), lengths, methods=methods, extra=extra,
        num_windows=c.num_windows, seed=run.config.seed, batch_tokens=c.batch_tokens,
        document_length=protocol['document_length'], stride=protocol['stride'], done=done,
        on_result=on_result)
  results['split'] = c.split
  if save:
    run.save_result(key, results)
    metrics_lib.write_per_length(run.workdir, key, results)
  return results


def passkey_model(run: Run) -> model_lib.ModelConfig:
  """The model as passkey prompts run it: ring attention becomes blockwise (prompts of any
  length, one per device; decoding is dense)."""
  mc = run.model_config
  return mc.replace(attention='blockwise') if mc.attention == 'ring' else mc


def passkey_batch_tokens(run: Run) -> int:
  """Tokens per batch of the passkey stages' forwards: the evaluation's memory bound
  (evaluate.batch_tokens), so the skip check and the sweep hold what a perplexity batch does."""
  section = run.config.get('evaluate')
  return int(section.batch_tokens) if section is not None else 16384


def passkey(run: Run) -> dict:
  """Passkey retrieval accuracy per method, length and depth (resumable per cell).

  First the teacher-forced NLL of the answer at the shortest length (at most
  evaluate.PASSKEY_CHECK_LENGTH tokens) without scaling: a model whose total over the key stays
  above passkey.skip_fraction of a guess (5 ln 10 for 5 digits) does not copy, so the sweep (all
  zeros) is skipped and the stage says so."""
  c = run.config.passkey
  mc = passkey_model(run)
  lengths = run.lengths(c.multiples)
  answer_length = min(min(lengths, default=run.original_length), eval_lib.PASSKEY_CHECK_LENGTH)
  answer_nll = []
  if lengths:
    answer_nll = eval_lib.passkey_answer_nll(mc, run.params(), run.tokenizer, answer_length,
                                             rope_lib.none(head_dim=mc.head_dim),
                                             seed=run.config.seed,
                                             batch_tokens=passkey_batch_tokens(run))
  guess = data_lib.PASSKEY_DIGITS * math.log(10)
  answer = dict(length=answer_length, nll=answer_nll, total=float(sum(answer_nll)), guess=guess)
  if c.skip_fraction is not None and answer_nll and answer['total'] > c.skip_fraction * guess:
    print(f"passkey: skipped; the model does not copy the key (teacher-forced NLL of the answer "
          f"{answer['total']:.2f} nats at {answer_length} tokens, a guess is {guess:.2f}; "
          f"passkey.skip_fraction = {c.skip_fraction} skips the sweep above "
          f"{c.skip_fraction * guess:.2f}).",
          flush=True)
    results = dict(skipped=True, lengths=lengths, original_length=run.original_length,
                   depths=list(c.depths), trials=c.trials, methods={}, answer_nll=answer)
    run.save_result('passkey', results)
    return results
  cache_path = run.workdir / 'eval' / 'passkey.jsonl'
  done = {(r['method'], r['length']): r['accuracy']
          for r in ckpt_lib.read_jsonl(cache_path, required=('method', 'length', 'accuracy'))}
  extra = {}
  if 'search' in run.results():
    extra['longrope'] = longrope_source(run)
  results = eval_lib.passkey_accuracy(
      mc, run.params(), run.tokenizer, lengths, methods=c.methods, extra=extra, depths=c.depths,
      trials=c.trials, seed=run.config.seed, done=done, batch_tokens=passkey_batch_tokens(run),
      on_result=lambda m, L, acc: ckpt_lib.append_jsonl(cache_path, dict(method=m, length=L,
                                                                          accuracy=acc)))
  results['answer_nll'] = answer
  run.save_result('passkey', results)
  metrics_lib.write_per_length(run.workdir, 'passkey', results, metric='mean', tag='passkey')
  plots.passkey_heatmaps(results, run.workdir / 'plots' / 'passkey.png',
                         caption=plots.measured_caption(
                             what=f'Accuracy over {c.trials} keys per cell, greedy decoding',
                             machine=run.results().get('machine')))
  return results


def search(run: Run) -> dict:
  """Searches LongRoPE factors at search.multiple x L0 on `search.split` documents (resumable:
  workdir/search/ckpt holds the state of every generation)."""
  c = run.config.search
  extension = run.extension(c.multiple)
  windows = data_lib.eval_windows(run.documents(c.split), extension.target_length,
                                  c.num_windows, seed=run.config.seed)
  with metrics_lib.MetricWriter(run.workdir, 'search') as writer:
    result = search_lib.search(
        run.model_config, run.params(), windows, extension=extension, mesh=run.search_mesh,
        settings=search_lib.SearchConfig.from_config(c.settings), workdir=run.workdir / 'search',
        seed=run.config.seed,
        on_generation=lambda record: metrics_lib.write_search_generation(writer, record))
  summary = dict(result.to_json(), split=c.split, num_windows=c.num_windows)
  run.save_result('search', summary)
  return summary


def progressive(run: Run) -> dict:
  """Progressive extension (LongRoPE section 3.3): fine-tune at L1 = search.multiple x L0 with the
  searched factors, search again on the fine-tuned model for L2 = progressive.multiple x L0 on
  top of them, and readjust short factors for L0 with a reduced lambda_max. Every step resumes
  from workdir/progressive."""
  c = run.config.progressive
  first = run.searched()
  L1 = first.target_length
  workdir = run.workdir / 'progressive'
  params = finetune(run, first.rope(), workdir)

  # Second search on top of the first stage's factors, on the model fine-tuned at L1.
  settings = search_lib.SearchConfig.from_config(c.search)
  extension = run.extension(c.multiple, base_length=L1)
  windows = data_lib.eval_windows(run.documents(run.config.search.split),
                                  extension.target_length, run.config.search.num_windows,
                                  seed=run.config.seed)
  long = search_lib.search(run.model_config, params, windows, extension=extension,
                           mesh=run.search_mesh,
                           settings=settings, base=first.rope(),
                           workdir=workdir / 'search_long', seed=run.config.seed)

  # Short-context readjustment: factors for L0 itself on the fine-tuned model.
  # Under the long factors' attention scale: transformers' longrope applies one attention factor
  # to short and long factors alike, so this is what an exported model computes at L <= L0.
  short_settings = dataclasses.replace(settings, lambda_max=c.short_lambda_max,
                                       attn_scale=long.attn_scale, search_n_hat=False, n_hat=0)
  short_extension = run.extension(1)
  windows0 = data_lib.eval_windows(run.documents(run.config.search.split),
                                   short_extension.target_length, c.short_num_windows,
                                   seed=run.config.seed)
  short = search_lib.search(run.model_config, params, windows0, extension=short_extension,
                            mesh=run.search_mesh,
                            settings=short_settings, workdir=workdir / 'search_short',
                            seed=run.config.seed)
  # The readjusted factors must earn their place at L0: the model was fine-tuned with the long
  # factors, which lie outside the short search's lambda <= short_lambda_max and can be better
  # there (the demo: 4.538 against 5.035). Then they serve as the short factors too.
  with run.sequence_mesh():  # ring attention needs its 'seq' mesh
    at_l0 = {name: eval_lib.mean_nll(run.model_config, params, windows0, result.rope())
             for name, result in (('searched', short), ('long', long))}
  chosen = 'searched' if at_l0['searched'] <= at_l0['long'] else 'long'
  print(f"progressive: short factors at L0 = {run.original_length}: searched NLL "
        f"{at_l0['searched']:.4f}, long {at_l0['long']:.4f} on the short fitness windows; "
        f"using the {chosen} factors up to L0.")
  short_record = short.to_json() if chosen == 'searched' else dict(
      long.to_json(), target_length=short_extension.target_length, nll=at_l0['long'])
  summary = dict(finetune_length=L1, finetune_steps=c.finetune.steps,
                 target_length=extension.target_length, long=long.to_json(),
                 short=short_record, short_searched=short.to_json(), short_source=chosen,
                 short_nll_at_l0=at_l0)
  run.save_result('progressive', summary)
  return summary


def progressive_factors(run: Run) -> tuple[rope_lib.LongRopeFactors, dict]:
  """The progressive stage's factors (short up to L0, long beyond) and what they were built
  from (JSON, for the cells' `depends`)."""
  record = run.results()['progressive']
  factors = rope_lib.LongRopeFactors(
      search_lib.SearchResult.from_json(record['short']).rope(),
      search_lib.SearchResult.from_json(record['long']).rope(), run.original_length)
  return factors, dict(long=record['long']['factors'], short=record['short']['factors'])


def progressive_evaluate(run: Run) -> dict:
  """Perplexity of the fine-tuned model with the progressive factors (the short ones at L <= L0)
  next to the base model's methods (results 'perplexity'), on the same held-out windows."""
  factors, depends = progressive_factors(run)
  params = train_lib.load_params(run.model_config, run.workdir / 'progressive')
  # Cells depend on the factors: a progressive record rewritten (its short factors chosen anew)
  # recomputes them instead of reporting the old ones.
  return _perplexity(run, 'progressive_perplexity', params, (),
                     {'longrope_progressive': factors.select,
                      'longrope_progressive_no_short': factors.long}, depends=depends)


def progressive_passkey(run: Run) -> dict:
  """Passkey retrieval of the fine-tuned model with the progressive factors, on the passkey
  stage's prompts, at passkey.multiples and the second search's length (resumable per cell;
  cells depend on the factors). Skipped, as the passkey stage, when the base model does not
  copy."""
  base = run.results()['passkey']
  if base.get('skipped'):
    print('progressive_passkey: skipped, as the passkey stage (the base model does not copy).',
          flush=True)
    results = dict(skipped=True)
    run.save_result('progressive_passkey', results)
    return results
  c = run.config.passkey
  mc = passkey_model(run)
  factors, depends = progressive_factors(run)
  params = train_lib.load_params(run.model_config, run.workdir / 'progressive')
  lengths = run.lengths(tuple(c.multiples) + (run.config.progressive.multiple,))
  cache_path = run.workdir / 'eval' / 'progressive_passkey.jsonl'
  ckpt_lib.truncate_jsonl(cache_path, lambda r: r.get('depends') == depends)
  done = {(r['method'], r['length']): r['accuracy'] for r in ckpt_lib.read_jsonl(cache_path)}
  results = eval_lib.passkey_accuracy(
      mc, params, run.tokenizer, lengths, methods=(),
      extra={'longrope_progressive': factors.select}, depths=c.depths, trials=c.trials,
      seed=run.config.seed, done=done, batch_tokens=passkey_batch_tokens(run),
      on_result=lambda m, L, acc: ckpt_lib.append_jsonl(cache_path, dict(
          method=m, length=L, accuracy=acc, depends=depends)))
  run.save_result('progressive_passkey', results)
  plots.passkey_heatmaps(report_lib.merged_passkey(base, results),
                         run.workdir / 'plots' / 'progressive_passkey.png',
                         title='Passkey retrieval: base model and after progressive extension',
                         caption=plots.measured_caption(
                             what=f'Accuracy over {c.trials} keys per cell, greedy decoding',
                             machine=run.results().get('machine')))
  return results


def finetune(run: Run, rope: rope_lib.RopeScaling, workdir: pathlib.Path) -> Any:
  """Fine-tunes a copy of the base model at the search length with `rope` and the budget of
  progressive.finetune (the same batches for every method); resumes from workdir/ckpt and
  returns the fine-tuned params."""
  c = run.config.progressive.finetune
  L1 = run.searched().target_length
  batches = data_lib.PackedBatches(run.documents('train'), c.batch_size, L1,
                                   seed=run.config.seed + 1,
                                   passkey_fraction=c.passkey_fraction,
                                   copy_fraction=c.copy_fraction, tokenizer=run.tokenizer)
  train_lib.train(run.training_config(run.model_config.attention),
                  train_lib.OptimConfig.from_config(c), batches, rope,
                  workdir, seed=run.config.seed, init_params=run.params(),
                  ckpt_every=c.ckpt_every, log_every=10, desc=f'finetune_{workdir.name}@{L1}',
                  tb_workdir=run.workdir, mesh=run.train_mesh)
  return train_lib.load_params(run.model_config, workdir)


def seed_windows(token_docs: list, length: int, num: int, count: int,
                 seed: int) -> tuple[list[np.ndarray], bool]:
  """`count` sets of fitness windows i32[num, length] (first `length` tokens of documents),
  disjoint when the split has count x num documents that long (else drawn independently per
  set); and whether they are disjoint."""
  long_enough = [i for i, d in enumerate(token_docs) if len(d) >= length]
  if len(long_enough) < num:
    raise ValueError(f"only {len(long_enough)} search.split documents have {length} tokens but "
                     f"search.num_windows = {num}; lower it.")
  if len(long_enough) >= count * num:
    order = np.random.default_rng(seed).permutation(long_enough)
    chosen = [sorted(order[k * num:(k + 1) * num].tolist()) for k in range(count)]
    return [np.stack([token_docs[i][:length] for i in c]).astype(np.int32) for c in chosen], True
  return [data_lib.eval_windows(token_docs, length, num, seed + k) for k in range(count)], False


def seeds(run: Run) -> dict:
  """The search repeated with search.num_seeds seeds, each on its own fitness documents (disjoint
  where the split allows), each resumable in workdir/seeds/seed_k; every seed's factors on the
  held-out documents at the search length, beside the methods (results 'seeds',
  'seeds_perplexity')."""
  c = run.config.search
  if c.num_seeds < 2:
    raise ValueError(f"search.num_seeds = {c.num_seeds}; the seeds stage needs at least 2 (3 or "
                     "more to speak of a spread).")
  extension = run.extension(c.multiple)
  settings = search_lib.SearchConfig.from_config(c.settings)
  windows, disjoint = seed_windows(run.documents(c.split), extension.target_length,
                                   c.num_windows, c.num_seeds, run.config.seed)
  searches = {}
  for k, windows_NL in enumerate(windows):
    result = search_lib.search(run.model_config, run.params(), windows_NL, extension=extension,
                               mesh=run.search_mesh,
                               settings=settings, workdir=run.workdir / 'seeds' / f'seed_{k}',
                               seed=run.config.seed + k)
    searches[f'seed_{k}'] = result.to_json()
  held_out = _perplexity(run, 'seeds_perplexity', run.params(), run.config.evaluate.methods,
                         {k: search_lib.SearchResult.from_json(r).rope()
                          for k, r in searches.items()}, multiples=(c.multiple,),
                         depends={k: r['factors'] + [r['n_hat']] for k, r in searches.items()})
  summary = dict(num_seeds=c.num_seeds, disjoint=disjoint, num_windows=c.num_windows,
                 split=c.split, target_length=extension.target_length, searches=searches)
  run.save_result('seeds', summary)
  return held_out


def finetuned(run: Run) -> dict:
  """The paper's comparison: copies of the base model fine-tuned at the search length with each
  of finetuned.methods (same budget and batches, progressive.finetune; 'longrope' = the searched
  factors, sharing workdir/progressive's fine-tune), each evaluated at finetuned.multiples with
  its own scaling: the fine-tuned one up to the fine-tuning length, the method re-derived for
  longer ones (LongRoPE keeps its factors); the progressive row beside them when present."""
  c = run.config.finetuned
  mc = run.model_config
  first = run.searched()
  L1 = first.target_length
  searched = run.results()['search']['factors'] + [first.n_hat]  # what the fine-tunes start from
  methods = {}
  for method in c.methods:
    if method == 'longrope':
      rope, workdir = first.rope(), run.workdir / 'progressive'
      source = lambda length, rope=rope: rope  # noqa: E731
    else:
      rope = eval_lib.method_rope(method, config=mc, length=L1)
      workdir = run.workdir / 'finetuned' / method
      source = lambda length, rope=rope, method=method: (  # noqa: E731
          rope if length <= L1 else eval_lib.method_rope(method, config=mc, length=length))
    params = finetune(run, rope, workdir)
    r = _perplexity(run, f'finetuned_{method}', params, (), {f'{method} (ft)': source},
                    multiples=c.multiples, depends=searched, save=False)
    methods.update(r['methods'])
  if 'progressive' in run.results():
    record = run.results()['progressive']
    factors = rope_lib.LongRopeFactors(
        search_lib.SearchResult.from_json(record['short']).rope(),
        search_lib.SearchResult.from_json(record['long']).rope(), run.original_length)
    r = _perplexity(run, 'finetuned_progressive', train_lib.load_params(mc, run.workdir /
                                                                         'progressive'),
                    (), {'longrope_progressive': factors.select}, multiples=c.multiples,
                    depends=dict(long=record['long']['factors'], short=record['short']['factors']),
                    save=False)
    methods.update(r['methods'])
  results = dict(r, methods=methods, finetune_length=L1,
                 finetune_steps=run.config.progressive.finetune.steps)
  run.save_result('finetuned', results)
  plots.perplexity_vs_length(results, run.workdir / 'plots' / 'finetuned.png',
                             title=f'Fine-tuned at {L1} tokens: perplexity vs length')
  return results


def ablations(run: Run) -> dict:
  """LongRoPE's Table 11 on the base model at the search length: uniform PI (with and without
  LongRoPE's attention scale), per-dimension factors with n_hat fixed at 0 (a search of its own,
  workdir/ablations/search_n_hat_0), per-dimension factors plus searched n_hat (the search), and
  the search's best initial seed; held-out perplexity at the evaluate.multiples >= the search's
  (results 'ablations')."""
  c = run.config.search
  mc = run.model_config
  first = run.searched()
  extension = run.extension(c.multiple)
  settings = search_lib.SearchConfig.from_config(c.settings)
  windows = data_lib.eval_windows(run.documents(c.split), extension.target_length,
                                  c.num_windows, seed=run.config.seed)  # the search's own
  fixed = search_lib.search(mc, run.params(), windows, extension=extension,
                            mesh=run.search_mesh,
                            settings=dataclasses.replace(settings, search_n_hat=False, n_hat=0),
                            workdir=run.workdir / 'ablations' / 'search_n_hat_0',
                            seed=run.config.seed)
  # The search's space, to decode its best seed genome as the search saw it.
  space = search_space.make_space(head_dim=mc.head_dim, extension=extension,
                                  lambda_max=settings.lambda_max, step=settings.lambda_step,
                                  monotone=settings.monotone,
                                  search_n_hat=settings.search_n_hat, n_hat=settings.n_hat,
                                  n_hat_choices=settings.n_hat_choices,
                                  attn_scale=settings.attn_scale)
  genomes = search_space.seed_genomes(space, head_dim=mc.head_dim, theta=mc.rope_theta,
                                      extension=extension)
  best_seed = min(first.seeds, key=lambda m: first.seeds[m]['nll'])
  s = extension.scale
  rows = {
      'PI (uniform)': rope_lib.linear(head_dim=mc.head_dim, scale=s),
      'PI (uniform) + attention scale': rope_lib.make(np.full(mc.head_dim // 2, s), 0,
                                                      space.attn_scale),
      'per-dim, n_hat = 0 (searched)': fixed.rope(),
      'per-dim + n_hat (searched)': first.rope(),
      f'best seed ({best_seed})': rope_lib.unstack(space.rope(genomes[best_seed][None]))[0],
  }
  multiples = [m for m in run.config.evaluate.multiples if m >= c.multiple]
  results = _perplexity(run, 'ablations', run.params(), (), rows, multiples=multiples,
                        depends=[np.asarray(r.factors).round(6).tolist() + [int(r.n_hat)]
                                 for r in rows.values()], save=False)
  results['validation_perplexity'] = {
      'per-dim, n_hat = 0 (searched)': fixed.perplexity,
      'per-dim + n_hat (searched)': first.perplexity,
      f'best seed ({best_seed})': first.seeds[best_seed]['perplexity']}
  run.save_result('ablations', results)
  return results


def evaluate_sliding(run: Run) -> dict:
  """The evaluate stage's methods with windows sliding by evaluate.sliding_stride over each
  document's span (LongRoPE's official evaluation offers it), beside the truncated table."""
  extra = {'longrope': longrope_source(run)} if 'search' in run.results() else {}
  return _perplexity(run, 'perplexity_sliding', run.params(), run.config.evaluate.methods, extra,
                     stride=run.config.evaluate.sliding_stride)


def longrope_source(run: Run) -> Callable[[int], rope_lib.RopeScaling | None]:
  """The searched factors at every length beyond L0 (None at L <= L0, where no scaling is
  needed)."""
  rope = run.searched().rope()
  return lambda length: rope if length > run.original_length else None


def report(run: Run) -> str:
  """Writes report.md from results.json."""
  mc = run.model_config
  model = (f'Model: `{run.config.model.variant}` ({mc.num_params():,} parameters, '
           f'{mc.num_layers} layers, dim {mc.dim}, head_dim {mc.head_dim}), training length '
           f'L0 = {mc.original_length} tokens; corpus `{run.config.data.source}`, tokenizer '
           f'`{run.config.data.tokenizer}`.')
  text = report_lib.render(run.results(), model=model)
  ckpt_lib.write_text(run.workdir / 'report.md', text)
  return text


STAGES: dict[str, Callable[[Run], Any]] = {
    'pretrain': pretrain,
    'search': search,
    'evaluate': evaluate,
    'passkey': passkey,
    'progressive': progressive,
    'progressive_evaluate': progressive_evaluate,
    'progressive_passkey': progressive_passkey,
    'evaluate_sliding': evaluate_sliding,
    'seeds': seeds,
    'finetuned': finetuned,
    'ablations': ablations,
    'report': report,
}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        stages: tuple[str, ...] | None = None) -> Run:
  """Runs `stages` (default: config.stages) in order after validating the whole config. A stage
  whose inputs (config fields, upstream results) are unchanged is reused; one whose inputs
  changed is recomputed with everything downstream of it, or, without config.overwrite, the run
  refuses naming the changed fields. Every stage resumes from the workdir."""
  stages = tuple(stages or config.stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown} in config.stages; choose from {list(STAGES)}.")
  validation.validate_config(config)
  r = Run(config, workdir)
  earlier = provenance.read_records(r.workdir)
  decisions = provenance.prepare(config, stages, r.workdir,
                                 overwrite=config.get('overwrite', False))
  r.write_config()
  if jax.process_index() == 0:
    r.save_result('machine', console.machine_info())
  seconds = {}
  for d in decisions:
    state = 'new' if d.stage not in earlier else _ACTION_WORDS[d.action]
    details = dict(stage_details(r, d.stage),
                   workdir=state + (f": {'; '.join(d.changes)}" if d.changes else ''))
    console.stage_header(d.stage, details)
    t0 = time.time()
    provenance.begin(r.workdir, d)
    STAGES[d.stage](r)
    provenance.finish(r.workdir, d)
    seconds[d.stage] = time.time() - t0
  console.summary(r.results(), seconds,
                  report_path=r.workdir / 'report.md' if 'report' in stages else None,
                  tensorboard_dir=r.workdir / metrics_lib.TB_DIR)
  return r


_ACTION_WORDS = {provenance.KEEP: 'inputs unchanged (reused, resumed where unfinished)',
                 provenance.RERUN: 'rerun, cached cells kept', provenance.EXTEND: 'extended',
                 provenance.RECOMPUTE: 'recomputed'}


def stage_details(run: Run, stage: str) -> dict:
  """What a stage will do, for its console header."""
  c, L0 = run.config, run.original_length
  searched = ['longrope'] if 'search' in run.results() or 'search' in c.stages else []
  if stage == 'pretrain':
    p = c.pretrain
    return {'model': f'{c.model.variant}, {run.model_config.num_params():,} parameters',
            'steps': f'{p.steps} x {p.batch_size} rows x L0 = {L0} tokens',
            'validation': f'{p.eval_windows} windows every {p.eval_every} steps'}
  if stage == 'search':
    s = c.search.settings
    return {'target': f'{run.extension(c.search.multiple).target_length} tokens '
                      f'({c.search.multiple:g}x L0 = {L0})',
            'strategy': f'{s.strategy}, population {s.population}, {s.generations} generations',
            'fitness': f'mean NLL on {c.search.num_windows} {c.search.split} documents'}
  if stage == 'evaluate':
    e = c.evaluate
    return {'lengths': run.lengths(e.multiples), 'methods': list(e.methods) + searched,
            'documents': f'{e.num_windows} {e.split} documents per length'}
  if stage == 'passkey':
    k = c.passkey
    return {'lengths': run.lengths(k.multiples), 'methods': list(k.methods) + searched,
            'keys': f'{k.trials} per depth at depths {", ".join(f"{d:g}" for d in k.depths)}'}
  if stage == 'progressive':
    return {'fine-tune': f'{c.progressive.finetune.steps} steps at '
                         f'{run.extension(c.search.multiple).target_length} tokens with the '
                         'searched factors',
            'search': f'again for {run.extension(c.progressive.multiple).target_length} tokens, '
                      'then short factors for L0'}
  if stage == 'report':
    return {'writes': [str(run.workdir / 'report.md'), str(run.workdir / 'plots')]}
  return {}
