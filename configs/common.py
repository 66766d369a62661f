"""Section builders shared by the configs, and `parse_arg` for `config.py:variant` strings.

Each builder returns one config section with the project's defaults, overridable by keyword
(`search_section(8, population=32)`); an unset value is None (a typed placeholder, so the command
line can still set it). The search settings are the fields of `search.SearchConfig` itself, so a
setting is declared once.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import ml_collections
from ml_collections import config_dict

from longrope_jax import niah
from longrope_jax import search
from longrope_jax.stages import longrope2 as longrope2_stages

METHODS = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn', 'llama3')


def parse_arg(arg: str | None, *, positional: str | None = None, **spec) -> ml_collections.ConfigDict:
  """Parses 'a=1,b,c=x' into a ConfigDict typed by `spec`'s defaults (big_vision's habit): a bare
  name sets a bool field True; a bare value fills the `positional` field (a checkpoint path)."""
  result = ml_collections.ConfigDict(spec)
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    if not eq and isinstance(spec.get(key), bool):
      result[key] = True
    elif eq and key in spec:
      result[key] = type(spec[key])(value) if not isinstance(spec[key], bool) else \
          value.lower() in ('1', 'true', 'yes')
    elif not eq and positional is not None:
      result[positional] = item
    else:
      raise ValueError(f"unknown config argument {item!r}; this config takes "
                       f"{', '.join(f'{k}={v!r}' for k, v in spec.items())}.")
  return result


def base_config(stages: tuple[str, ...], seed: int = 0) -> ml_collections.ConfigDict:
  """The run itself: the stages `experiments.run` runs, the seed, and whether a rerun may
  recompute stages whose inputs changed (`overwrite`; otherwise it refuses, naming them)."""
  c = ml_collections.ConfigDict(dict(seed=seed, stages=tuple(stages), overwrite=False))
  c.mesh = mesh_section()
  return c


def mesh_section(**overrides) -> ml_collections.ConfigDict:
  """Device mesh axes (mesh.MeshConfig; one of them may be -1: the rest of the devices).
  Training and fine-tuning shard the batch over `data` and `fsdp`, parameters and optimizer
  state over `fsdp`, one sequence over `seq` (ring attention); the search spreads candidates over
  `pop` (and `seq`); evaluation uses `seq` for ring attention."""
  return _section(dict(data=1, fsdp=1, seq=1, pop=-1), {}, overrides, 'mesh')


def _section(defaults: dict, types_: dict, overrides: dict, name: str) -> ml_collections.ConfigDict:
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f"unknown {name} fields {unknown}; known: {sorted(defaults)}.")
  section = ml_collections.ConfigDict()
  for key, value in {**defaults, **overrides}.items():
    if value is None:
      section[key] = config_dict.placeholder(types_[key])
    else:
      section[key] = value
  return section


def _field_type(annotation) -> type:
  """The non-None type of a dataclass field's annotation (int | None -> int)."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    annotation = args[0]
  return typing.get_origin(annotation) or annotation


def settings_section(**overrides) -> ml_collections.ConfigDict:
  """`search.SearchConfig`'s fields (the paper's defaults) as a config section."""
  hints = typing.get_type_hints(search.SearchConfig)
  defaults = {f.name: f.default for f in dataclasses.fields(search.SearchConfig)}
  return _section(defaults, {k: _field_type(hints[k]) for k in defaults}, overrides,
                  'search.settings')


def search_section(multiple: float, *, multiples: tuple[float, ...] | None = None,
                   split: str = 'validation', num_windows: int = 5, num_seeds: int = 3,
                   objective: str = 'perplexity', needle_format: str = 'ruler',
                   **settings) -> ml_collections.ConfigDict:
  """The search stage: target length multiple x L0, fitness documents, and its settings;
  `multiples` (None: only `multiple`) searches at each of these lengths too, `multiple` among
  them, each length evaluated with its own factors; `num_seeds`: how many times the seeds stage
  repeats the search at `multiple` (disjoint fitness documents); `objective`: what the fitness
  scores (data.OBJECTIVES: 'perplexity', LongRoPE's, or 'needle', LongRoPE2's needle-driven
  perplexity, with needles in `needle_format`, data.NEEDLE_FORMATS)."""
  section = ml_collections.ConfigDict(dict(multiple=multiple, split=split,
                                           num_windows=num_windows, num_seeds=num_seeds,
                                           objective=objective, needle_format=needle_format,
                                           settings=settings_section(**settings)))
  section.multiples = (config_dict.placeholder(tuple) if multiples is None else
                       tuple(multiples))
  return section


def model_section(variant: str, **overrides) -> ml_collections.ConfigDict:
  """The model: a named variant, or a Hugging Face folder (`path`) whose config.json decides.
  `sliding_window`: 'keep' (the model's own), 'none' (full causal attention) or a number;
  `remat`: 'none', 'full' or a jax.checkpoint_policies name (activation memory of training)."""
  defaults = dict(variant=variant, path=None, original_length=None, sliding_window='keep',
                  attention='blockwise', dtype='float32', param_dtype=None, remat='none')
  return _section(defaults, dict(path=str, original_length=int, param_dtype=str), overrides,
                  'model')


def data_section(**overrides) -> ml_collections.ConfigDict:
  """The corpus (stdlib | files | tfds) and its tokenizer (bytes | a tokenizer.json | auto)."""
  defaults = dict(source='stdlib', path=None, tfds_name=None, data_dir=None, text_key='text',
                  tokenizer='bytes')
  return _section(defaults, dict(path=str, tfds_name=str, data_dir=str), overrides, 'data')


def pretrain_section(**overrides) -> ml_collections.ConfigDict:
  defaults = dict(steps=800, batch_size=16, lr=4e-3, warmup=50, final_lr_ratio=0.1,
                  weight_decay=0.1, clip=1.0, eval_every=200, ckpt_every=100, eval_windows=64,
                  passkey_fraction=0.1, copy_fraction=0.0)
  return _section(defaults, {}, overrides, 'pretrain')


def evaluate_section(**overrides) -> ml_collections.ConfigDict:
  """Perplexity vs length: the first L tokens of the same `num_windows` documents at every
  length (documents as long as the longest); `stride` None is the truncated setting, a stride
  slides windows of L tokens over each document's span instead (`sliding_stride`: the stride
  of the evaluate_sliding stage, next to the main table; LongRoPE's evaluation uses 256)."""
  defaults = dict(split='test', multiples=(1, 2, 4, 8), methods=METHODS, num_windows=8,
                  batch_tokens=16384, stride=None, sliding_stride=256)
  return _section(defaults, dict(stride=int), overrides, 'evaluate')


def passkey_section(**overrides) -> ml_collections.ConfigDict:
  """Passkey retrieval; the sweep is skipped when the answer's teacher-forced NLL is above
  `skip_fraction` of a guess (the model does not copy; None: always run it)."""
  defaults = dict(multiples=(1, 2, 4, 8), methods=METHODS, depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                  trials=5, skip_fraction=0.5)
  return _section(defaults, dict(skip_fraction=float), overrides, 'passkey')


def export_section(**overrides) -> ml_collections.ConfigDict:
  """The export stage (stages/export.py): the searched factors as a Hugging Face longrope folder
  in workdir/hf, run in transformers (`attention`) on `num_windows` of the evaluate stage's
  documents at `multiples` x L0 (each in evaluate.multiples) and compared with its numbers;
  `plain_short` as experiments.export's flag."""
  defaults = dict(multiples=(1, 2), num_windows=1, plain_short=False, attention='sdpa')
  return _section(defaults, {}, overrides, 'export')


def niah_section(**overrides) -> ml_collections.ConfigDict:
  """The RULER needle-in-a-haystack suite (niah.py, the niah stage): `tasks` at `multiples` x L0
  for `methods` (LongRoPE joins once searched), `trials` prompts per depth; needles worded in
  `format` (niah.FORMATS) with `digits`-digit values; multikey hides `num_distractors` other
  keys, multivalue gives its key `num_values` values, multiquery asks `num_queries` keys. A task
  is skipped when the base model's teacher-forced NLL of its answer at L0 is above
  `skip_fraction` of a guess among digits (it does not retrieve in that wording; None: never)."""
  defaults = dict(multiples=(1, 2, 4, 8), methods=METHODS, tasks=niah.TASKS, format='ruler',
                  digits=7, num_distractors=2, num_values=2, num_queries=2,
                  depths=(0.0, 0.5, 1.0), trials=4, skip_fraction=0.5)
  return _section(defaults, dict(skip_fraction=float), overrides, 'niah')


def longrope2_section(*, finetune: dict | None = None, **overrides) -> ml_collections.ConfigDict:
  """LongRoPE2 against its baselines and ablations (stages/longrope2.py): `arms` (ARMS: the
  factors and the fine-tuning of each) fine-tuned at search.multiple x L0 with one budget
  (`finetune`), evaluated at `multiples`; the needle objective's documents in `needle_format`
  (data.NEEDLE_FORMATS); `short_rope` the RoPE at L <= L0 (SHORT_ROPES). finetune.short_fraction:
  the share of mixed-window steps that are short rows, short_documents where those come from
  (packing.SHORT_DOCUMENTS)."""
  defaults = dict(arms=tuple(longrope2_stages.ARMS), multiples=(1, 2, 4, 8, 16),
                  needle_format='ruler', short_rope='original')
  section = _section(defaults, {}, overrides, 'longrope2')
  # The paper's mix: 3B of its 10B tokens short (<= L0), 1 epoch, lr 2e-5 cosine.
  tuning = dict(steps=200, batch_size=4, lr=1e-3, warmup=20, final_lr_ratio=0.1, weight_decay=0.1,
                clip=1.0, ckpt_every=25, passkey_fraction=0.1, copy_fraction=0.0,
                short_fraction=0.3, short_documents='crops')
  section.finetune = _section(tuning, {}, finetune or {}, 'longrope2.finetune')
  return section


def progressive_section(multiple: float, *, finetune: dict | None = None,
                        search_settings: dict | None = None,
                        **overrides) -> ml_collections.ConfigDict:
  """Progressive extension: fine-tune at the search length with the searched factors, search
  again at `multiple` x L0 (with `search_settings`), readjust short factors for L0."""
  defaults = dict(multiple=multiple, short_lambda_max=1.25, short_num_windows=16)
  section = _section(defaults, {}, overrides, 'progressive')
  tuning = dict(steps=200, batch_size=4, lr=1e-3, warmup=20, final_lr_ratio=0.1, weight_decay=0.1,
                clip=1.0, ckpt_every=25, passkey_fraction=0.1, copy_fraction=0.0)
  section.finetune = _section(tuning, {}, finetune or {}, 'progressive.finetune')
  section.search = settings_section(**(search_settings or {}))
  return section


def finetuned_section(**overrides) -> ml_collections.ConfigDict:
  """Fine-tuned baselines: `methods` each fine-tuned at the search length with the budget of
  progressive.finetune ('longrope' = the searched factors), evaluated at `multiples`."""
  defaults = dict(methods=('linear', 'yarn', 'longrope'), multiples=(1, 2, 4, 8, 16, 32))
  return _section(defaults, {}, overrides, 'finetuned')


def paper_model_config(arg: str | None, *, variant: str, multiple: float, doc_tokens: int,
                       progressive: tuple[float, float] = (32, 64),
                       **model_overrides) -> ml_collections.ConfigDict:
  """The paper's search (LongRoPE sec. 3.2 / 4.1) on a Hugging Face checkpoint: population 64,
  32 parents, 16 + 16 children with p = 0.3, 40 generations; lambda in [1, 1.25 s] on a 0.01
  grid, monotone; n_hat searched; fitness = perplexity of 5 PG19 validation books truncated to
  L'; then every method on PG19 test books. `arg`: the checkpoint folder, and `progressive`
  for the progressive recipe (below)."""
  a = parse_arg(arg, positional='path', path='', progressive=False)
  c = base_config(('search', 'evaluate', 'passkey', 'report'))
  c.model = model_section(variant, path=a.path or None, dtype='bfloat16', **model_overrides)
  c.data = data_section(source='tfds', tfds_name='local_text/pg19', tokenizer='auto')
  c.search = search_section(multiple, num_windows=5, doc_batch=1, chunk=1, memory_gb=40.0)
  c.evaluate = evaluate_section(num_windows=10, batch_tokens=doc_tokens)
  c.passkey = passkey_section()
  first, second = progressive
  # Progressive extension (LongRoPE sec. 3.3) with this pipeline's one fine-tuning stage: search
  # at `first` x L0, fine-tune there with those factors, search again at `second` x L0 on the
  # fine-tuned model on top of them, short factors for L0. (The paper goes on with a second
  # fine-tune and a search to 2048k.) Mesh and remat from the plan (python -m experiments.plan):
  # a 128K fine-tune of a 7B model needs one sequence over 8 devices (seq 8, about 75 GiB per
  # device) with full rematerialization; the search uses the same 'seq' axis.
  c.progressive = progressive_section(
      second, short_num_windows=5,
      finetune=dict(steps=400, batch_size=1, lr=2e-5, warmup=20, final_lr_ratio=0.1,
                    weight_decay=0.0, clip=1.0, ckpt_every=50, passkey_fraction=0.0,
                    copy_fraction=0.0),
      search_settings=dict(c.search.settings.items()))
  if a.progressive:
    c.stages = ('search', 'evaluate', 'passkey', 'progressive', 'progressive_evaluate', 'report')
    c.search.multiple = first
    c.model.update(attention='ring', remat='full')
    c.mesh.update(seq=8)
    c.evaluate.multiples = (1, 2, 4, 8, 16, 32)
    c.passkey.multiples = (1, 8, 32)
  return c
