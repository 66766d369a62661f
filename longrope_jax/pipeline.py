"""Experiment stages driven by an ml_collections config, each resumable from its workdir.

The entry points in `experiments/` only parse flags and call `run`. Workdir layout:
config.json, metrics.jsonl, ckpt/, eval/, search/, results.json, report.md, plots/*.png.
"""

from __future__ import annotations

import dataclasses
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
from longrope_jax import data as data_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import plots
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib
from longrope_jax import train as train_lib


class Run:
  """A config and a workdir, with the data and model built once and shared by the stages."""

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

  @property
  def hf_path(self) -> str:
    """The Hugging Face checkpoint folder (config.model.path), or '' for a workdir model."""
    return self.config.model.get('path', '') or ''

  @functools.cached_property
  def hf_checkpoint(self):
    from longrope_jax import hf
    return hf.load(self.hf_path, param_dtype=self.config.model.get('param_dtype') or None,
                   dtype=self.config.model.dtype)

  @functools.cached_property
  def model_config(self) -> model_lib.ModelConfig:
    c = self.config.model
    if self.hf_path:
      base = self.hf_checkpoint.config
    else:
      base = model_lib.get_config(c.variant)
    overrides = dict(attention=c.attention, dtype=c.dtype)
    if c.get('original_length'):  # the pretraining window, where config.json's differs (Mistral)
      overrides['original_length'] = int(c.original_length)
    if base.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"model.variant {c.variant!r} has vocab_size {base.vocab_size} but the "
                       f"tokenizer has {self.tokenizer.vocab_size} ids; choose a matching variant.")
    return base.replace(**overrides)

  @functools.lru_cache(maxsize=None)
  def documents(self, split: str) -> list:
    d = self.config.data
    docs = data_lib.load_split(d.source, split, path=d.path or None, tfds_name=d.tfds_name or None,
                               data_dir=d.data_dir or None, text_key=d.text_key)
    return data_lib.encode_documents(docs, self.tokenizer)

  @property
  def original_length(self) -> int:
    return self.model_config.original_length

  def params(self) -> Any:
    """The workdir's latest checkpoint; else, with config.model.path, the HF checkpoint."""
    if self.hf_path and not (self.workdir / 'ckpt').exists():
      return self.hf_checkpoint.params
    return train_lib.load_params(self.model_config, self.workdir)

  def results(self) -> dict:
    return json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

  def save_result(self, key: str, value: Any) -> None:
    results = self.results()
    results[key] = value
    ckpt_lib.write_json(self.results_path, results)

  def write_config(self) -> None:
    path = self.workdir / 'config.json'
    new = json.loads(self.config.to_json_best_effort())
    if path.exists():
      old = json.loads(path.read_text())
      changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      if changed:
        print(f"note: config sections {changed} differ from the run already in {self.workdir}; "
              "finished stages are reused, so use a fresh --workdir for a different experiment.")
    ckpt_lib.write_json(path, new)


# ----------------------------------------------------------------------------- stages
def pretrain(run: Run) -> None:
  """Pretrains the base model at its original window (resumes from workdir/ckpt)."""
  c = run.config.pretrain
  mc = run.model_config
  optim = train_lib.OptimConfig(steps=c.steps, lr=c.lr, warmup=c.warmup,
                                final_lr_ratio=c.final_lr_ratio, weight_decay=c.weight_decay,
                                clip=c.clip)
  batches = data_lib.PackedBatches(run.documents('train'), c.batch_size, mc.original_length,
                                   seed=run.config.seed, passkey_fraction=c.passkey_fraction,
                                   copy_fraction=c.copy_fraction, tokenizer=run.tokenizer)
  val = data_lib.eval_windows(run.documents('validation'), mc.original_length, c.eval_windows,
                              seed=run.config.seed)
  t0 = time.time()
  train_lib.train(mc.replace(attention='dense'), optim, batches, rope_lib.none(head_dim=mc.head_dim),
                  run.workdir, seed=run.config.seed, eval_windows=val, eval_every=c.eval_every,
                  ckpt_every=c.ckpt_every, desc='pretrain')
  records = ckpt_lib.read_jsonl(run.workdir / 'metrics.jsonl')
  plots.training_curve(records, run.workdir / 'plots' / 'pretrain.png')
  summary = dict(steps=c.steps, params=mc.num_params(), tokens=c.steps * c.batch_size * mc.original_length)
  prior = run.results().get('pretrain', {})
  summary['seconds'] = prior.get('seconds', 0.0) + (time.time() - t0)
  last_val = [r for r in records if 'val_bits_per_token' in r]
  if last_val:
    summary['val_bits_per_token'] = last_val[-1]['val_bits_per_token']
  run.save_result('pretrain', summary)


def evaluate(run: Run, extra: dict | None = None, key: str = 'perplexity') -> dict:
  """Perplexity of every method at every length on held-out documents (resumable per cell)."""
  c = run.config.evaluate
  mc = run.model_config
  lengths = [int(m * mc.original_length) for m in c.multiples]
  cache_path = run.workdir / 'eval' / f'{key}.jsonl'
  done = {(r['method'], r['length']): r['nll'] for r in ckpt_lib.read_jsonl(cache_path)}
  params = run.params()
  extra = dict(extra or {})
  if 'search' in run.results() and 'longrope' not in extra:
    extra['longrope'] = longrope_source(run)
  results = eval_lib.perplexity_vs_length(
      mc, params, run.documents(c.split), lengths, methods=c.methods, extra=extra,
      num_windows=c.num_windows, seed=run.config.seed, batch_tokens=c.batch_tokens, done=done,
      on_result=lambda m, L, nll: ckpt_lib.append_jsonl(cache_path, dict(method=m, length=L,
                                                                          nll=nll)))
  results['split'] = c.split
  run.save_result(key, results)
  plots.perplexity_vs_length(results, run.workdir / 'plots' / f'{key}.png',
                             title=f'Held-out perplexity vs length ({c.split} split)')
  return results


def passkey(run: Run) -> dict:
  """Passkey retrieval accuracy per method, length and depth (resumable per cell)."""
  c = run.config.passkey
  mc = run.model_config
  lengths = [int(m * mc.original_length) for m in c.multiples]
  cache_path = run.workdir / 'eval' / 'passkey.jsonl'
  done = {(r['method'], r['length']): r['accuracy'] for r in ckpt_lib.read_jsonl(cache_path)}
  extra = {}
  if 'search' in run.results():
    extra['longrope'] = longrope_source(run)
  results = eval_lib.passkey_accuracy(
      mc, run.params(), run.tokenizer, lengths, methods=c.methods, extra=extra, depths=c.depths,
      trials=c.trials, seed=run.config.seed, done=done,
      on_result=lambda m, L, acc: ckpt_lib.append_jsonl(cache_path, dict(method=m, length=L,
                                                                          accuracy=acc)))
  # Where accuracy is 0, the answer's per-digit NLL at the shortest length (no scaling) says
  # whether the model copies the key at all.
  results['answer_nll'] = dict(length=min(lengths, default=mc.original_length), nll=(
      eval_lib.passkey_answer_nll(mc, run.params(), run.tokenizer, min(lengths),
                                  rope_lib.none(head_dim=mc.head_dim), seed=run.config.seed)
      if lengths else []))
  run.save_result('passkey', results)
  plots.passkey_heatmaps(results, run.workdir / 'plots' / 'passkey.png')
  return results


def search(run: Run) -> dict:
  """Searches LongRoPE factors at search.multiple x L0 on `search.split` documents (resumable:
  workdir/search/ckpt holds the state of every generation)."""
  c = run.config.search
  mc = run.model_config
  length = int(c.multiple * mc.original_length)
  windows = data_lib.eval_windows(run.documents(c.split), length, c.num_windows,
                                  seed=run.config.seed)
  result = search_lib.search(mc, run.params(), windows, target_length=length,
                             settings=search_lib.SearchConfig.from_config(c),
                             workdir=run.workdir / 'search', seed=run.config.seed)
  summary = dict(result.to_json(), split=c.split, num_windows=c.num_windows)
  if run.results().get('search', {}).get('factors') not in (None, summary['factors']):
    for cache in (run.workdir / 'eval').glob('*.jsonl'):  # stale longrope evaluations
      ckpt_lib.truncate_jsonl(cache, lambda r: r.get('method') != 'longrope')
  run.save_result('search', summary)
  return summary


def progressive(run: Run) -> dict:
  """Progressive extension (LongRoPE section 3.3): fine-tune at L1 = search.multiple x L0 with the
  searched factors, search again on the fine-tuned model at L2 = progressive.multiple x L0 (the
  final factors are the product of both stages'), and readjust short factors for L0 with a
  reduced lambda_max. Every step resumes from workdir/progressive."""
  c = run.config.progressive
  mc = run.model_config
  L0 = mc.original_length
  stage1 = run.results()['search']
  L1, rope1 = stage1['target_length'], search_lib.rope_from_json(stage1)
  L2 = int(c.multiple * L0)
  workdir = run.workdir / 'progressive'
  tuning = run.config.progressive.finetune
  batches = data_lib.PackedBatches(run.documents('train'), tuning.batch_size, L1,
                                   seed=run.config.seed + 1,
                                   passkey_fraction=run.config.pretrain.passkey_fraction,
                                   copy_fraction=run.config.pretrain.copy_fraction,
                                   tokenizer=run.tokenizer)
  optim = train_lib.OptimConfig(steps=tuning.steps, lr=tuning.lr, warmup=tuning.warmup,
                                final_lr_ratio=tuning.final_lr_ratio,
                                weight_decay=run.config.pretrain.weight_decay,
                                clip=run.config.pretrain.clip)
  train_lib.train(mc, optim, batches, rope1, workdir, seed=run.config.seed,
                  init_params=run.params(), ckpt_every=tuning.ckpt_every, log_every=10,
                  desc=f'finetune@{L1}')
  params = train_lib.load_params(mc, workdir)

  # Second search: candidates lambda2 multiply lambda1; the fine-tuned window is L1, so the
  # space spans s = L2 / L1, and the attention scale is the one for the whole extension L2 / L0.
  settings = search_lib.SearchConfig.from_config(c.search)
  settings = dataclasses.replace(settings, attn_scale=settings.attn_scale or
                                 rope_lib.longrope_attention_scale(L2 / L0, L0))
  windows = data_lib.eval_windows(run.documents(run.config.search.split), L2,
                                  run.config.search.num_windows, seed=run.config.seed)
  mc1 = mc.replace(original_length=L1)
  fitness = search_lib.PopulationFitness(
      mc1, params, windows, length=L2, max_population=settings.population,
      mesh=mesh_lib.population_mesh(settings.mesh_pop or None), doc_batch=settings.doc_batch,
      chunk=settings.chunk, memory_bytes=settings.memory_gb * 2**30,
      base_factors=np.asarray(rope1.factors))
  second = search_lib.search(mc1, params, windows, target_length=L2, settings=settings,
                             workdir=workdir / 'search_long', seed=run.config.seed,
                             fitness=fitness)
  long_record = dict(second.to_json(), factors=[round(float(f), 6) for f in
                                                np.asarray(rope1.factors) * second.factors],
                     stage_factors=[stage1['factors'], second.to_json()['factors']],
                     scale=L2 / L0, original_length=L0)

  # Short-context readjustment: factors for L0 itself on the fine-tuned model.
  short_settings = dataclasses.replace(settings, lambda_max=c.short_lambda_max, attn_scale=1.0,
                                       search_n_hat=False, n_hat=0)
  windows0 = data_lib.eval_windows(run.documents(run.config.search.split), L0,
                                   c.short_num_windows, seed=run.config.seed)
  short = search_lib.search(mc, params, windows0, target_length=L0, settings=short_settings,
                            workdir=workdir / 'search_short', seed=run.config.seed)
  summary = dict(finetune_length=L1, finetune_steps=tuning.steps, target_length=L2,
                 long=long_record, short=short.to_json())
  run.save_result('progressive', summary)
  return summary


def progressive_evaluate(run: Run) -> dict:
  """Perplexity of the fine-tuned model with the progressive factors (the short ones at L <= L0)
  next to the base model's methods (results 'perplexity'), on the same held-out windows."""
  c = run.config.evaluate
  mc = run.model_config
  record = run.results()['progressive']
  factors = rope_lib.LongRopeFactors(search_lib.rope_from_json(record['short']),
                                     search_lib.rope_from_json(record['long']), mc.original_length)
  lengths = [int(m * mc.original_length) for m in c.multiples]
  cache_path = run.workdir / 'eval' / 'progressive.jsonl'
  done = {(r['method'], r['length']): r['nll'] for r in ckpt_lib.read_jsonl(cache_path)}
  params = train_lib.load_params(mc, run.workdir / 'progressive')
  results = eval_lib.perplexity_vs_length(
      mc, params, run.documents(c.split), lengths, methods=(),
      extra={'longrope_progressive': factors.select,
             'longrope_progressive_no_short': factors.long},
      num_windows=c.num_windows, seed=run.config.seed, batch_tokens=c.batch_tokens, done=done,
      on_result=lambda m, L, nll: ckpt_lib.append_jsonl(cache_path, dict(method=m, length=L,
                                                                          nll=nll)))
  run.save_result('progressive_perplexity', results)
  return results


def progressive_summary(base: dict, prog: dict) -> list[str]:
  """The two checks of progressive extension, in words: at the longest length, the fine-tuned
  model against every method without fine-tuning; at L0, the short factors against the base."""
  lengths, L0 = base['lengths'], base['original_length']
  ppl = lambda results, name, j: results['methods'][name]['perplexity'][j]  # noqa: E731
  lines = []
  j = len(lengths) - 1
  others = {m: ppl(base, m, j) for m in base['methods'] if ppl(base, m, j) is not None}
  ours = ppl(prog, 'longrope_progressive', j)
  if others and ours is not None:
    best = min(others, key=others.get)
    lines.append(f"- At {lengths[j]} tokens ({lengths[j] / L0:g}x): progressive {ours:.3f} vs "
                 f"the best method without fine-tuning, {best}, {others[best]:.3f} "
                 f"({'below' if ours < others[best] else 'NOT below'} every method).")
  if L0 in lengths and 'none' in base['methods']:
    j = lengths.index(L0)
    ref, short = ppl(base, 'none', j), ppl(prog, 'longrope_progressive', j)
    no_short = ppl(prog, 'longrope_progressive_no_short', j)
    if None not in (ref, short, no_short):
      lines.append(f"- At L0 = {L0}: the base model {ref:.3f}; the fine-tuned model with the "
                   f"short factors {short:.3f} ({100 * (short / ref - 1):+.1f}%), with the long "
                   f"factors {no_short:.3f} ({100 * (no_short / ref - 1):+.1f}%).")
  return lines + [''] if lines else []


def longrope_source(run: Run) -> Callable[[int], rope_lib.RopeScaling | None]:
  """The searched factors at every length beyond L0 (None at L <= L0, where no scaling is
  needed)."""
  rope = search_lib.rope_from_json(run.results()['search'])
  return lambda length: rope if length > run.original_length else None


def report(run: Run) -> str:
  """Writes report.md from results.json (tables and plots)."""
  results = run.results()
  mc = run.model_config
  lines = ['# longrope-jax run report', '',
           f'Model: `{run.config.model.variant}` ({mc.num_params():,} parameters, '
           f'{mc.num_layers} layers, dim {mc.dim}, head_dim {mc.head_dim}), training length '
           f'L0 = {mc.original_length} tokens; corpus `{run.config.data.source}`, tokenizer '
           f'`{run.config.data.tokenizer}`.', '']
  if 'pretrain' in results:
    p = results['pretrain']
    lines += ['## Pretraining', '',
              f"{p['steps']} steps, {p['tokens']:,} tokens, {p['seconds'] / 60:.1f} min; "
              f"validation bits per token at L0: **{p.get('val_bits_per_token', float('nan')):.3f}**.",
              '', '![pretraining](plots/pretrain.png)', '']
  if 'perplexity' in results:
    r = results['perplexity']
    lines += ['## Perplexity vs length (held-out)', '',
              f"Per-token perplexity on the first L tokens of {r['num_windows']} "
              f"`{r['split']}` documents per length; best per column in bold.", '',
              eval_lib.markdown_table(r), '', '![perplexity](plots/perplexity.png)', '']
  if 'passkey' in results:
    r = results['passkey']
    lines += ['## Passkey retrieval', '',
              f"Accuracy over {r['trials']} keys at each of {len(r['depths'])} depths "
              f"({', '.join(f'{d:g}' for d in r['depths'])}) per length; greedy decoding with the "
              "KV cache; best per column in bold.", '',
              eval_lib.markdown_table(r, metric='mean', digits=2, best=max), '',
              '![passkey](plots/passkey.png)', '']
    if r.get('answer_nll', {}).get('nll'):
      a = r['answer_nll']
      lines += [f"Teacher-forced NLL of the answer's digits at {a['length']} tokens without "
                f"scaling: {', '.join(f'{x:.2f}' for x in a['nll'])} nats (ln 10 = "
                f"{math.log(10):.2f} is a guess among digits; a model that copies the key goes "
                "toward 0).", '']
  if 'progressive_perplexity' in results and 'perplexity' in results:
    base, prog = results['perplexity'], results['progressive_perplexity']
    if base['lengths'] == prog['lengths']:
      merged = dict(base, methods={**base['methods'], **prog['methods']})
      p = results['progressive']
      lines += ['## Progressive extension', '',
                f"Fine-tuned {p['finetune_steps']} steps at {p['finetune_length']} tokens with the "
                f"searched factors, searched again for {p['target_length']} tokens (final factors "
                "= product of both stages'), short factors readjusted for L0. "
                "`longrope_progressive` uses the short factors up to L0 and the long ones beyond; "
                "the other rows are the base model without fine-tuning.", '',
                eval_lib.markdown_table(merged), '']
      lines += progressive_summary(base, prog)
  if 'search' in results:
    lines += [f"## LongRoPE search ({results['search']['split']} split)", '',
              search_lib.markdown_summary(results['search']), '']
  text = '\n'.join(lines)
  ckpt_lib.write_text(run.workdir / 'report.md', text)
  return text


STAGES: dict[str, Callable[[Run], Any]] = {
    'pretrain': pretrain,
    'search': search,
    'evaluate': evaluate,
    'passkey': passkey,
    'progressive': progressive,
    'progressive_evaluate': progressive_evaluate,
    'report': report,
}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        stages: tuple[str, ...] | None = None) -> Run:
  """Runs `stages` (default: config.stages) in order; every stage resumes from the workdir."""
  stages = tuple(stages or config.stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown} in config.stages; choose from {list(STAGES)}.")
  r = Run(config, workdir)
  r.write_config()
  for stage in stages:
    print(f'== {stage} ==', flush=True)
    STAGES[stage](r)
  return r
