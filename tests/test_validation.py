"""One validation pass over the whole config: every bad value raises a ConfigError naming its
dotted field, before any stage runs; the library's dataclasses use the same checks. Every case
starts from configs/demo.py:test and changes it."""

import pathlib

import pytest

from configs import hf as hf_config
from longrope_jax import model as model_lib
from longrope_jax import search as search_lib
from longrope_jax import train as train_lib
from longrope_jax import validation
from toy_config import DELETE, toy_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

SEARCH_SETTINGS = toy_config().search.settings.to_dict()


def test_the_toy_config_is_valid():
  validation.validate_config(toy_config())
  assert validation.errors(toy_config()) == []


def test_a_config_without_pretrain_is_valid():
  assert validation.errors(toy_config(pretrain=DELETE,
                                   stages=('search', 'evaluate', 'report'))) == []


# (field changed, bad value, field the error must name). The cases come first.
BAD = [
    ('pretrain.batch_size', 0, 'pretrain.batch_size'),
    ('pretrain.eval_every', 0, 'pretrain.eval_every'),
    ('pretrain.ckpt_every', 0, 'pretrain.ckpt_every'),
    ('evaluate.multiples', (0, 1), 'evaluate.multiples[0]'),
    ('evaluate.num_windows', 0, 'evaluate.num_windows'),
    ('seed', -1, 'seed'),
    # types and ranges
    ('seed', 1.5, 'seed'),
    ('stages', (), 'stages'),
    ('stages', ('pretrain', 'serach'), 'stages'),
    ('overwrite', 'yes', 'overwrite'),
    ('model.variant', 'llama9', 'model.variant'),
    ('model.attention', 'flash', 'model.attention'),
    ('model.dtype', 'float16', 'model.dtype'),
    ('model.param_dtype', 'int8', 'model.param_dtype'),
    ('model.original_length', 0, 'model.original_length'),
    ('model.sliding_window', -4, 'model.sliding_window'),
    ('data.source', 'web', 'data.source'),
    ('data.text_key', '', 'data.text_key'),
    ('pretrain.steps', 0, 'pretrain.steps'),
    ('pretrain.steps', -5, 'pretrain.steps'),
    ('pretrain.batch_size', True, 'pretrain.batch_size'),
    ('pretrain.lr', 0.0, 'pretrain.lr'),
    ('pretrain.lr', float('nan'), 'pretrain.lr'),
    ('pretrain.warmup', -1, 'pretrain.warmup'),
    ('pretrain.final_lr_ratio', 1.5, 'pretrain.final_lr_ratio'),
    ('pretrain.weight_decay', -0.1, 'pretrain.weight_decay'),
    ('pretrain.clip', 0.0, 'pretrain.clip'),
    ('pretrain.eval_windows', 0, 'pretrain.eval_windows'),
    ('pretrain.passkey_fraction', -0.1, 'pretrain.passkey_fraction'),
    ('pretrain.copy_fraction', 2.0, 'pretrain.copy_fraction'),
    ('search.multiple', 0.5, 'search.multiple'),
    ('search.split', 'dev', 'search.split'),
    ('search.num_windows', 0, 'search.num_windows'),
    ('search.settings.strategy', 'CMAES', 'search.settings.strategy'),
    ('search.settings.population', 0, 'search.settings.population'),
    ('search.settings.parents', 0, 'search.settings.parents'),
    ('search.settings.mutations', -1, 'search.settings.mutations'),
    ('search.settings.crossovers', -1, 'search.settings.crossovers'),
    ('search.settings.mutation_prob', 1.3, 'search.settings.mutation_prob'),
    ('search.settings.generations', 0, 'search.settings.generations'),
    ('search.settings.max_evaluations', 0, 'search.settings.max_evaluations'),
    ('search.settings.lambda_max', 0.5, 'search.settings.lambda_max'),
    ('search.settings.lambda_step', 0.0, 'search.settings.lambda_step'),
    ('search.settings.monotone', 1, 'search.settings.monotone'),
    ('search.settings.n_hat', -2, 'search.settings.n_hat'),
    ('search.settings.n_hat_choices', (0, -4), 'search.settings.n_hat_choices[1]'),
    ('search.settings.attn_scale', 0.0, 'search.settings.attn_scale'),
    ('search.settings.es_std', -1.0, 'search.settings.es_std'),
    ('search.settings.doc_batch', 0, 'search.settings.doc_batch'),
    ('search.settings.chunk', 0, 'search.settings.chunk'),
    ('search.settings.memory_gb', 0.0, 'search.settings.memory_gb'),
    ('search.settings.attention', 'flash', 'search.settings.attention'),
    ('evaluate.split', 'train2', 'evaluate.split'),
    ('evaluate.multiples', (), 'evaluate.multiples'),
    ('evaluate.multiples', (1, -2), 'evaluate.multiples[1]'),
    ('evaluate.methods', ('none', 'yarm'), 'evaluate.methods[1]'),
    ('evaluate.batch_tokens', 0, 'evaluate.batch_tokens'),
    ('passkey.multiples', (0,), 'passkey.multiples[0]'),
    ('passkey.methods', ('ntk_aware',), 'passkey.methods[0]'),
    ('passkey.depths', (0.0, 1.5), 'passkey.depths[1]'),
    ('passkey.trials', 0, 'passkey.trials'),
    ('progressive.multiple', 0, 'progressive.multiple'),
    ('progressive.short_lambda_max', 0.9, 'progressive.short_lambda_max'),
    ('progressive.short_num_windows', 0, 'progressive.short_num_windows'),
    ('progressive.finetune.steps', 0, 'progressive.finetune.steps'),
    ('progressive.finetune.batch_size', 0, 'progressive.finetune.batch_size'),
    ('progressive.finetune.lr', -1e-3, 'progressive.finetune.lr'),
    ('progressive.finetune.ckpt_every', 0, 'progressive.finetune.ckpt_every'),
    ('progressive.search.population', 0, 'progressive.search.population'),
    ('progressive.search.mutation_prob', -0.1, 'progressive.search.mutation_prob'),
    # fields hand-built configs used to lack
    ('model.remat', 'sometimes', 'model.remat'),
    ('evaluate.sliding_stride', 0, 'evaluate.sliding_stride'),
    ('evaluate.stride', 0, 'evaluate.stride'),
    ('passkey.skip_fraction', 0.0, 'passkey.skip_fraction'),
    ('finetuned.methods', ('pi',), 'finetuned.methods[0]'),
    ('search.num_seeds', 0, 'search.num_seeds'),
    ('mesh.seq', -2, 'mesh.seq'),
    ('mesh.pop', 16, 'mesh'),  # 8 devices
    # cross-field
    ('pretrain.warmup', 20, 'pretrain.warmup'),
    ('progressive.finetune.warmup', 4, 'progressive.finetune.warmup'),
    ('pretrain.passkey_fraction', 0.7, 'pretrain.copy_fraction', {'pretrain.copy_fraction': 0.5}),
    ('search.settings.population', 9, 'search.settings.population'),
    ('search.settings.parents', 10, 'search.settings.parents'),
    ('progressive.search.crossovers', 3, 'progressive.search.population'),
    ('search.settings.n_hat_choices', (0, 4), 'search.settings.n_hat_choices',
     {'search.settings.search_n_hat': False}),
    ('data.source', 'files', 'data.path'),
    ('data.source', 'tfds', 'data.tfds_name'),
    ('data.tokenizer', 'auto', 'data.tokenizer'),
    ('model.attention', 'ring', 'model.attention'),
    ('search.settings.attention', 'ring', 'search.settings.attention'),
    ('passkey.multiples', (1, 2), 'passkey.multiples[0]'),  # 64 tokens: no room for a prompt
    ('pretrain.passkey_fraction', 0.1, 'pretrain.passkey_fraction'),  # same, in training
    ('stages', ('pretrain', 'passkey'), 'passkey', {'passkey': DELETE}),
]


@pytest.mark.parametrize('case', BAD, ids=[f'{c[0]}={c[1]!r}' for c in BAD])
def test_bad_value_names_its_field(case):
  field, value, named, *extra = case
  config = toy_config(**{field: value}, **(extra[0] if extra else {}))
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(config)
  assert e.value.field == named
  assert named in str(e.value)
  assert isinstance(e.value, ValueError)


def test_messages_say_the_fix():
  with pytest.raises(ValueError) as e:
    validation.validate_config(toy_config(**{'pretrain.batch_size': 0}))
  assert str(e.value) == ("pretrain.batch_size must be a positive integer (>= 1), got 0; set "
                          "pretrain.batch_size to a positive integer (>= 1) (e.g. "
                          "--config.pretrain.batch_size=...).")
  with pytest.raises(ValueError, match=r"parents \+ mutations \+ crossovers == population"):
    validation.validate_config(toy_config(**{'search.settings.population': 9}))
  with pytest.raises(ValueError, match="no mesh section; set mesh.seq"):
    validation.validate_config(toy_config(**{'model.attention': 'ring', 'mesh': DELETE}))
  with pytest.raises(ValueError, match="has mesh.seq = 1; set mesh.seq"):
    validation.validate_config(toy_config(**{'model.attention': 'ring'}))


def test_ring_attention_with_a_seq_axis_passes():
  assert validation.errors(toy_config(**{'model.attention': 'ring', 'mesh.seq': 4})) == []


def test_hf_config_without_a_checkpoint_asks_for_model_path():
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(hf_config.get_config())
  assert e.value.field == 'model.path'
  assert str(e.value).startswith('model.path is needed')
  assert '--config.model.path=' in str(e.value)
  with pytest.raises(validation.ConfigError, match="set --config.model.variant to a named "
                     "variant, or --config.model.path"):
    validation.validate_config(toy_config(**{'model.variant': 'llama9'}))


def test_the_committed_config_reference_is_the_generated_one():
  committed = (ROOT / 'docs' / 'config.md').read_text()
  assert committed == validation.reference(), (
      f'docs/config.md differs from the config rules; regenerate it: '
      f'{validation.REFERENCE_COMMAND}')


def test_the_reference_names_every_field_and_registered_choice():
  rows = {line.split(' | ')[0].strip('| `'): line
          for line in validation.reference().splitlines() if line.startswith('| `')}
  assert list(rows) == list(validation.RULES)
  for name in model_lib.ATTENTION:  # from the registry, not a hand-written list
    assert repr(name) in rows['model.attention']
  assert all(rule.doc for rule in validation.RULES.values())


def test_errors_collects_every_bad_field():
  found = validation.errors(toy_config(**{'pretrain.batch_size': 0, 'seed': -1,
                                       'evaluate.num_windows': 0}))
  assert sorted(e.field for e in found) == ['evaluate.num_windows', 'pretrain.batch_size', 'seed']


def test_search_settings_rules_serve_a_flat_mapping():
  search_lib.check_search_settings(SEARCH_SETTINGS, 'search')
  with pytest.raises(validation.ConfigError, match='search.generations'):
    search_lib.check_search_settings(dict(SEARCH_SETTINGS, generations=0), 'search')


@pytest.mark.parametrize('field,value', [
    ('dim', 0), ('num_layers', -1), ('vocab_size', 2.5), ('sliding_window', 0),
    ('dtype', 'float16'), ('attention', 'flash'), ('rope_theta', 0.0)])
def test_model_config_uses_the_shared_checks(field, value):
  with pytest.raises(validation.ConfigError, match=f'ModelConfig.{field} must be'):
    model_lib.get_config('test', **{field: value})


@pytest.mark.parametrize('kwargs,field', [
    (dict(steps=0), 'OptimConfig.steps'), (dict(steps=10, warmup=10), 'OptimConfig.warmup'),
    (dict(steps=10, warmup=1, lr=0.0), 'OptimConfig.lr'),
    (dict(steps=10, warmup=1, final_lr_ratio=2.0), 'OptimConfig.final_lr_ratio'),
    (dict(steps=10, warmup=1, clip=-1.0), 'OptimConfig.clip')])
def test_optim_config_uses_the_shared_checks(kwargs, field):
  with pytest.raises(validation.ConfigError, match=field):
    train_lib.OptimConfig(**kwargs)
