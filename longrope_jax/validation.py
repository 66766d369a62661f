"""Config validation: small reusable checks and one pass over the whole config before any stage.

Owns the rules. Every check takes (value, field) and raises `ConfigError` (a ValueError) naming
the dotted field (`pretrain.batch_size`) and the fix; the library's dataclasses (ModelConfig,
OptimConfig, SearchConfig) call the same checks with their own field names. `validate_config`
walks `RULES` (field -> check) and the cross-field checks in `CROSS_CHECKS`; a section that is
absent (configs/hf.py has no pretrain) is skipped.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping

from longrope_jax.strategies import PAPER_GA

Check = Callable[[Any, str], None]
_ABSENT = object()


class ConfigError(ValueError):
  """A bad config value: `field` is its dotted name."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def fail(field: str, value: Any, what: str, fix: str | None = None) -> None:
  """Raises ConfigError: '{field} must be {what}, got {value!r}; {fix}.'."""
  fix = fix or f"set {field} to {what} (e.g. --config.{field}=...)"
  raise ConfigError(field, f"{field} must be {what}, got {value!r}; {fix}.")


# ----------------------------------------------------------------------------- single values
def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any, field: str) -> None:
  if not _is_int(value) or value < 1:
    fail(field, value, 'a positive integer (>= 1)')


def non_negative_int(value: Any, field: str) -> None:
  if not _is_int(value) or value < 0:
    fail(field, value, 'a non-negative integer (>= 0)')


def fraction(value: Any, field: str) -> None:
  if not _is_real(value) or not 0.0 <= value <= 1.0:
    fail(field, value, 'a number in [0, 1]')


def positive_float(value: Any, field: str) -> None:
  if not _is_real(value) or value <= 0:
    fail(field, value, 'a finite number > 0')


def non_negative_float(value: Any, field: str) -> None:
  if not _is_real(value) or value < 0:
    fail(field, value, 'a finite number >= 0')


def boolean(value: Any, field: str) -> None:
  if not isinstance(value, bool):
    fail(field, value, 'True or False')


def string(value: Any, field: str) -> None:
  if not isinstance(value, str) or not value:
    fail(field, value, 'a non-empty string')


def at_least(minimum: float) -> Check:
  """A finite number >= minimum."""

  def check(value: Any, field: str) -> None:
    if not _is_real(value) or value < minimum:
      fail(field, value, f'a finite number >= {minimum:g}')

  return check


def choice(options: Iterable[str] | Callable[[], Iterable[str]]) -> Check:
  """One of `options` (or of what the callable returns, looked up when checked)."""

  def check(value: Any, field: str) -> None:
    allowed = sorted(options() if callable(options) else options)
    if value not in allowed:
      fail(field, value, f"one of {', '.join(map(repr, allowed))}")

  return check


def optional(check: Check) -> Check:
  """None (unset), or a value passing `check`."""

  def checked(value: Any, field: str) -> None:
    if value is not None:
      try:
        check(value, field)
      except ConfigError as e:
        raise ConfigError(e.field, f"{e} (None leaves it unset)") from None

  return checked


def tuple_of(check: Check, nonempty: bool = True) -> Check:
  """A tuple (or list) whose every item passes `check` (the item is named field[i])."""

  def checked(value: Any, field: str) -> None:
    if not isinstance(value, (tuple, list)) or (nonempty and not value):
      fail(field, value, f"a {'non-empty ' if nonempty else ''}tuple",
           f"set {field} to e.g. (1, 2)")
    for i, item in enumerate(value):
      check(item, f'{field}[{i}]')

  return checked


# ----------------------------------------------------------------------------- choices
def _methods() -> Iterable[str]:
  from longrope_jax import rope
  return rope.METHODS


def _variants() -> Iterable[str]:
  from longrope_jax import model
  return model.VARIANTS


def _dtypes() -> Iterable[str]:
  from longrope_jax import model
  return model.DTYPES


def _attention_impls() -> Iterable[str]:
  from longrope_jax import model
  return model.ATTENTION_IMPLS


def _splits() -> Iterable[str]:
  from longrope_jax import data
  return data.SPLITS


def _sources() -> Iterable[str]:
  from longrope_jax import data
  return data.SOURCES


def sliding_window(value: Any, field: str) -> None:
  """'keep' (the checkpoint's or variant's window), 'none' (no window) or a positive integer."""
  from longrope_jax import hf
  try:
    hf.parse_sliding_window(value)
  except ValueError:
    fail(field, value, "'keep', 'none' or a positive number of tokens",
         f"set --config.{field}=keep (the model's own window) or none (full causal attention)")


def strategy(value: Any, field: str) -> None:
  """'paper_ga' or the name of an evosax 0.3 algorithm."""
  if value == PAPER_GA:
    return
  from evosax.algorithms import algorithms
  if value not in algorithms:
    fail(field, value, f"{PAPER_GA!r} or an evosax algorithm ({', '.join(sorted(algorithms))})",
         f"set --config.{field}={PAPER_GA} or e.g. --config.{field}=CMA_ES")


# ----------------------------------------------------------------------------- the rule table
# search.settings and progressive.search share these (SearchConfig's fields).
SEARCH_SETTINGS_RULES: dict[str, Check] = {
    'strategy': strategy,
    'population': positive_int,
    'parents': positive_int,
    'mutations': non_negative_int,
    'crossovers': non_negative_int,
    'mutation_prob': fraction,
    'generations': positive_int,
    'max_evaluations': optional(positive_int),
    'lambda_max': optional(at_least(1.0)),
    'lambda_step': positive_float,
    'monotone': boolean,
    'search_n_hat': boolean,
    'n_hat': non_negative_int,
    'n_hat_choices': optional(tuple_of(non_negative_int)),
    'attn_scale': optional(positive_float),
    'es_std': positive_float,
    'doc_batch': positive_int,
    'chunk': optional(positive_int),
    'memory_gb': positive_float,
    'attention': optional(choice(_attention_impls)),
}

OPTIM_RULES: dict[str, Check] = {
    'steps': positive_int,
    'lr': positive_float,
    'warmup': non_negative_int,
    'final_lr_ratio': fraction,
    'weight_decay': non_negative_float,
    'clip': positive_float,
}

RULES: dict[str, Check] = {
    'seed': non_negative_int,
    'stages': tuple_of(string),
    'overwrite': boolean,
    **{f'mesh.{axis}': at_least(-1) for axis in ('data', 'fsdp', 'seq', 'pop')},
    'model.variant': string,
    'model.path': optional(string),
    'model.attention': choice(_attention_impls),
    'model.dtype': choice(_dtypes),
    'model.param_dtype': optional(choice(_dtypes)),
    'model.original_length': optional(positive_int),
    'model.sliding_window': sliding_window,
    'model.remat': string,
    'data.source': choice(_sources),
    'data.path': optional(string),
    'data.tfds_name': optional(string),
    'data.data_dir': optional(string),
    'data.text_key': string,
    'data.tokenizer': string,
    **{f'pretrain.{k}': v for k, v in OPTIM_RULES.items()},
    'pretrain.batch_size': positive_int,
    'pretrain.eval_every': positive_int,
    'pretrain.ckpt_every': positive_int,
    'pretrain.eval_windows': positive_int,
    'pretrain.passkey_fraction': fraction,
    'pretrain.copy_fraction': fraction,
    'search.multiple': at_least(1.0),
    'search.split': choice(_splits),
    'search.num_windows': positive_int,
    **{f'search.settings.{k}': v for k, v in SEARCH_SETTINGS_RULES.items()},
    'evaluate.split': choice(_splits),
    'evaluate.multiples': tuple_of(positive_float),
    'evaluate.methods': tuple_of(choice(_methods), nonempty=False),
    'evaluate.num_windows': positive_int,
    'evaluate.batch_tokens': positive_int,
    'evaluate.stride': optional(positive_int),
    'evaluate.sliding_stride': positive_int,
    'search.num_seeds': positive_int,
    'finetuned.methods': tuple_of(choice(_methods)),
    'finetuned.multiples': tuple_of(positive_float),
    'passkey.multiples': tuple_of(positive_float),
    'passkey.methods': tuple_of(choice(_methods), nonempty=False),
    'passkey.depths': tuple_of(fraction),
    'passkey.trials': positive_int,
    'passkey.skip_fraction': optional(positive_float),
    'progressive.multiple': at_least(1.0),
    'progressive.short_lambda_max': at_least(1.0),
    'progressive.short_num_windows': positive_int,
    **{f'progressive.finetune.{k}': OPTIM_RULES[k]
       for k in ('steps', 'lr', 'warmup', 'final_lr_ratio', 'weight_decay', 'clip')},
    'progressive.finetune.batch_size': positive_int,
    'progressive.finetune.passkey_fraction': fraction,
    'progressive.finetune.copy_fraction': fraction,
    'progressive.finetune.ckpt_every': positive_int,
    **{f'progressive.search.{k}': v for k, v in SEARCH_SETTINGS_RULES.items()},
}


# ----------------------------------------------------------------------------- cross-field
def lookup(config: Mapping, field: str, default: Any = None) -> Any:
  """config['a']['b'] for field 'a.b' (ConfigDict or nested dicts); `default` if absent."""
  node = config
  for part in field.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return default
    node = node[part]
  return node


def check_search_settings(settings: Mapping, prefix: str = 'search.settings') -> None:
  """Every SearchConfig field present in `settings`, then the cross-field rules (for
  SearchConfig.__post_init__: `check_search_settings(dataclasses.asdict(self), 'search')`)."""
  check_section(settings, SEARCH_SETTINGS_RULES, prefix)
  population, parents = settings.get('population'), settings.get('parents')
  if population is not None and parents is not None and parents > population:
    raise ConfigError(f'{prefix}.parents', f"{prefix}.population ({population}) is smaller than "
                      f"{prefix}.parents ({parents}); the population must hold the parents: raise "
                      f"{prefix}.population or lower {prefix}.parents.")
  if settings.get('strategy', PAPER_GA) == PAPER_GA and all(
      settings.get(k) is not None for k in ('population', 'parents', 'mutations', 'crossovers')):
    total = settings['parents'] + settings['mutations'] + settings['crossovers']
    if total != population:
      raise ConfigError(f'{prefix}.population',
                        f"{PAPER_GA} needs {prefix}.parents + mutations + crossovers == population;"
                        f" got {settings['parents']} + {settings['mutations']} + "
                        f"{settings['crossovers']} = {total} != {population}: change "
                        f"{prefix}.population or the three counts.")


def check_section(values: Mapping, rules: Mapping[str, Check], prefix: str) -> None:
  """Checks each field of `values` that has a rule (names reported as prefix.field)."""
  for name, check in rules.items():
    if name in values:
      check(values[name], f'{prefix}.{name}')


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
  p, c = lookup(config, 'pretrain.passkey_fraction', 0.0), lookup(config,
                                                                   'pretrain.copy_fraction', 0.0)
  if p + c > 1.0:
    raise ConfigError('pretrain.copy_fraction', f"pretrain.passkey_fraction + "
                      f"pretrain.copy_fraction = {p} + {c} > 1; lower one of them.")


def check_searches(config: Mapping) -> None:
  for prefix in ('search.settings', 'progressive.search'):
    settings = lookup(config, prefix)
    if settings is None:
      continue
    check_search_settings(settings, prefix)
    if settings.get('search_n_hat') is False and settings.get('n_hat_choices'):
      raise ConfigError(f'{prefix}.n_hat_choices', f"{prefix}.n_hat_choices is set but "
                        f"{prefix}.search_n_hat is False (n_hat is fixed to {prefix}.n_hat); "
                        "unset one of them.")


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
  if lookup(config, 'model', None) is None:
    return
  from longrope_jax import gguf_import
  path = lookup(config, 'model.path', None)
  if gguf_import.is_spec(path):
    try:
      gguf_import.check_spec(path)
    except (ImportError, OSError, ValueError) as e:
      raise ConfigError('model.path', f"model.path {path!r}: {e}") from e
  if not lookup(config, 'model.path', None):
    variant = lookup(config, 'model.variant', None)
    choice(_variants)(variant, 'model.variant')


def check_stages(config: Mapping) -> None:
  """Every stage named is known and its section is present; progressive needs a search."""
  from longrope_jax import provenance
  stages = _stages(config)
  unknown = [s for s in stages if s not in provenance.STAGES]
  if unknown:
    raise ConfigError('stages', f"unknown stages {unknown} in stages; choose from "
                      f"{list(provenance.STAGES)}.")
  for stage in stages:
    for section in provenance.STAGES[stage].sections:
      if section != 'seed' and lookup(config, section, None) is None:
        raise ConfigError(section, f"stage {stage!r} needs the config section {section!r}, "
                          f"which is absent; add it or remove {stage!r} from stages.")


def check_passkey(config: Mapping) -> None:
  """Passkey prompts need PASSKEY_MIN_LENGTH tokens: every passkey length (and the pretraining
  window when pretrain.passkey_fraction > 0) must hold one, for a byte-level workdir model."""
  from longrope_jax import data, model
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
  if lookup(config, 'pretrain.passkey_fraction', 0.0) and L0 < data.PASSKEY_MIN_LENGTH:
    raise ConfigError('pretrain.passkey_fraction', f"pretrain.passkey_fraction > 0 needs a "
                      f"training window of at least {data.PASSKEY_MIN_LENGTH} tokens, L0 is {L0}; "
                      "set pretrain.passkey_fraction = 0.")


def _attentions(config: Mapping) -> list[tuple[str, Any]]:
  return [(f, lookup(config, f, None)) for f in
          ('model.attention', 'search.settings.attention', 'progressive.search.attention')]


def check_mesh(config: Mapping) -> None:
  """Ring attention shards one sequence over the 'seq' mesh axis: the config needs a mesh
  section with a seq axis. Hook for the mesh section's own rules (another helper owns them)."""
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
  import jax
  from longrope_jax import mesh as mesh_lib
  sizes = {k: int(mesh[k]) for k in ('data', 'fsdp', 'seq', 'pop') if k in mesh}
  try:
    mesh_lib.MeshConfig(**sizes).shape(len(jax.devices()))
  except ValueError as e:
    raise ConfigError('mesh', str(e)) from e


# Append a section's own cross-field rules here (check_mesh is the hook for the mesh section).
CROSS_CHECKS: list[Callable[[Mapping], None]] = [
    check_stages, check_model, check_data, check_optimizers, check_searches, check_passkey,
    check_mesh, check_mesh_shape]


def validate_config(config: Mapping) -> None:
  """Every field's type and range (`RULES`), then the cross-field checks; raises ConfigError
  naming the first bad field. Call before any stage runs."""
  for field, check in RULES.items():
    value = lookup(config, field, _ABSENT)
    if value is not _ABSENT:
      check(value, field)
  for cross in CROSS_CHECKS:
    cross(config)


def errors(config: Mapping) -> list[ConfigError]:
  """Every field error (not only the first), for a report of all that is wrong at once."""
  found = []
  for field, check in RULES.items():
    value = lookup(config, field, _ABSENT)
    if value is not _ABSENT:
      try:
        check(value, field)
      except ConfigError as e:
        found.append(e)
  if not found:
    for cross in CROSS_CHECKS:
      try:
        cross(config)
      except ConfigError as e:
        found.append(e)
  return found

