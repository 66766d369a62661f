"""Hugging Face interop: tiny Llama / Mistral / Phi-3 checkpoints built locally (no download),
imported and compared with transformers (f32, eager attention) for every RoPE type, at lengths
below and above the original window; LongRoPE factors exported and loaded back; bad input.

The transformers comparisons skip cleanly without torch / transformers (the `compare` extra);
the rest only needs safetensors.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from longrope_jax import hf, model, rope

ORIGINAL = 32  # original window L0 of the tiny checkpoints
LENGTHS = (24, 80)  # below and above L0 (Phi-3: short_factor, then long_factor)
TOL = 1e-4
SHORT_FACTOR = [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5]
LONG_FACTOR = [1.0, 1.1, 1.4, 2.0, 2.9, 4.1, 5.6, 7.5]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, rms_norm_eps=1e-6)

# name: (architecture, config fields beyond TINY)
CASES = {
    'llama-default-tied': ('LlamaForCausalLM',
                           dict(max_position_embeddings=ORIGINAL, tie_word_embeddings=True)),
    'llama-linear': ('LlamaForCausalLM', dict(
        max_position_embeddings=ORIGINAL, rope_scaling={'rope_type': 'linear', 'factor': 4.0})),
    'llama-dynamic': ('LlamaForCausalLM', dict(
        max_position_embeddings=ORIGINAL, rope_scaling={'rope_type': 'dynamic', 'factor': 2.0})),
    'llama-yarn': ('LlamaForCausalLM', dict(
        max_position_embeddings=4 * ORIGINAL,
        rope_scaling={'rope_type': 'yarn', 'factor': 4.0,
                      'original_max_position_embeddings': ORIGINAL})),
    'llama-llama3': ('LlamaForCausalLM', dict(
        max_position_embeddings=4 * ORIGINAL,
        rope_scaling={'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0,
                      'high_freq_factor': 4.0, 'original_max_position_embeddings': ORIGINAL})),
    'mistral-default-window16': ('MistralForCausalLM',
                                 dict(max_position_embeddings=ORIGINAL, sliding_window=16)),
    'mistral-yarn-window16': ('MistralForCausalLM', dict(
        max_position_embeddings=4 * ORIGINAL, sliding_window=16,
        rope_scaling={'rope_type': 'yarn', 'factor': 4.0, 'beta_fast': 16, 'beta_slow': 2,
                      'original_max_position_embeddings': ORIGINAL})),
    'phi3-default': ('Phi3ForCausalLM', dict(max_position_embeddings=ORIGINAL,
                                             original_max_position_embeddings=ORIGINAL)),
    'phi3-longrope': ('Phi3ForCausalLM', dict(
        max_position_embeddings=4 * ORIGINAL, original_max_position_embeddings=ORIGINAL,
        rope_scaling={'type': 'longrope', 'short_factor': SHORT_FACTOR,
                      'long_factor': LONG_FACTOR})),
}

# One compiled forward per (config, length): the cases share configs where they can.
_forward = jax.jit(model.forward, static_argnums=0)
# What hf.load makes of an untied TINY Llama (the export test reuses its compiled forward).
TINY_CONFIG = model.ModelConfig(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=16, mlp_dim=128, original_length=ORIGINAL, norm_eps=1e-6)


def _transformers():
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  transformers.logging.set_verbosity_error()
  return transformers


def _tiny_hf_model(arch: str, fields: dict, seed: int = 0):
  """A random transformers model with weights large enough to make the logits interesting."""
  transformers = _transformers()
  import torch
  config_cls = getattr(transformers, arch.replace('ForCausalLM', 'Config'))
  config = config_cls(**TINY, **fields)
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  hf_model = getattr(transformers, arch)(config).eval()
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      p.normal_(1.0, 0.2) if name.endswith('norm.weight') else p.normal_(0.0, 0.1)
  return hf_model


def _hf_logits(hf_model, tokens_BT: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return hf_model(torch.tensor(tokens_BT)).logits.numpy()


def _our_logits(config, params, tokens_BT: np.ndarray, rope_scaling) -> np.ndarray:
  B, T = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return np.asarray(_forward(config, params, jnp.asarray(tokens_BT), positions_BT, rope_scaling))


def _tokens(length: int, vocab: int = 128) -> np.ndarray:
  return np.random.default_rng(length).integers(0, vocab, (1, length))


def _random_params(config: model.ModelConfig, seed: int = 0) -> dict:
  """Random params of the model's shapes (traced, never compiled: cheap on a busy CPU)."""
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  values = [(1.0 if len(x.shape) == 1 else 0.0) + 0.1 * rng.standard_normal(x.shape)
            for x in leaves]
  return jax.tree.unflatten(treedef, [jnp.asarray(v, x.dtype) for v, x in zip(values, leaves)])


def _next_token_nll(logits_BTV: np.ndarray, tokens_BT: np.ndarray) -> float:
  logits = logits_BTV[:, :-1].astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  return float((logz - target).mean())


# ----------------------------------------------------------------------------- vs transformers
@pytest.mark.parametrize('case', CASES)
def test_logits_match_transformers(case, tmp_path):
  arch, fields = CASES[case]
  hf_model = _tiny_hf_model(arch, fields)
  hf_model.save_pretrained(tmp_path)
  ckpt = hf.load(tmp_path)
  assert ckpt.config.original_length == ORIGINAL
  for length in LENGTHS:  # ascending: transformers' dynamic rope only grows within one model
    tokens = _tokens(length)
    ours = _our_logits(ckpt.config, ckpt.params, tokens, hf.rope_for_length(ckpt, length))
    diff = float(np.abs(ours - _hf_logits(hf_model, tokens)).max())
    print(f'{case:>26s} L={length:3d} max|ours - transformers| = {diff:.2e}')
    assert diff < TOL, (case, length, diff)


def test_transformers_bf16_checkpoint_stays_bf16(tmp_path):
  """A bf16 Phi-3 saved by transformers (fused qkv / gate_up) loads as bf16, bit for bit."""
  _transformers()
  import torch
  hf_model = _tiny_hf_model('Phi3ForCausalLM', CASES['phi3-longrope'][1]).to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path)
  ckpt = hf.load(tmp_path)
  assert ckpt.config.param_dtype == ckpt.config.dtype == 'bfloat16'
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ckpt.params))
  state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
  qkv = state['model.layers.1.self_attn.qkv_proj.weight']
  np.testing.assert_array_equal(np.asarray(ckpt.params['layers']['attn']['k'][1], np.float32),
                                qkv[64:96].T.reshape(64, 2, 16))
  up = state['model.layers.0.mlp.gate_up_proj.weight'][128:]
  np.testing.assert_array_equal(np.asarray(ckpt.params['layers']['mlp']['up'][0], np.float32), up.T)


def test_phi3_factor_switch_is_exercised():
  """The two lengths pick different factor sets, and both differ from vanilla RoPE."""
  ckpt_config = dict(architectures=['Phi3ForCausalLM'], **TINY, **CASES['phi3-longrope'][1])
  short = hf.rope_for_length(ckpt_config, LENGTHS[0])
  long = hf.rope_for_length(ckpt_config, LENGTHS[1])
  np.testing.assert_allclose(short.factors, SHORT_FACTOR, rtol=1e-6)
  np.testing.assert_allclose(long.factors, LONG_FACTOR, rtol=1e-6)
  expected_scale = np.sqrt(1 + np.log(4.0) / np.log(ORIGINAL))
  np.testing.assert_allclose([short.attn_scale, long.attn_scale], [expected_scale] * 2,
                             rtol=1e-6)
  # The switch is at length > L0 (max position >= L0), as transformers decides it.
  np.testing.assert_allclose(hf.rope_for_length(ckpt_config, ORIGINAL).factors, SHORT_FACTOR,
                             rtol=1e-6)
  np.testing.assert_allclose(hf.rope_for_length(ckpt_config, ORIGINAL + 1).factors, LONG_FACTOR,
                             rtol=1e-6)


def test_export_longrope_round_trip(tmp_path):
  """Our params + LongRoPE factors -> HF checkpoint -> transformers: same logits and NLL."""
  transformers = _transformers()
  import torch
  config = TINY_CONFIG
  params = _random_params(config)
  plain, extended = tmp_path / 'plain', tmp_path / 'extended'
  hf.save_params(params, config, plain)
  hf.export_rope_scaling(plain, extended, SHORT_FACTOR, LONG_FACTOR,
                         original_max_position_embeddings=ORIGINAL,
                         max_position_embeddings=4 * ORIGINAL)

  written = hf.read_config(extended)
  for key in ('rope_scaling', 'rope_parameters'):
    assert written[key]['rope_type'] == written[key]['type'] == 'longrope'
    assert written[key]['factor'] == 4.0
  assert hf.load(extended).config == config

  for folder, ropes in ((plain, {length: rope.none(head_dim=16) for length in LENGTHS}),
                        (extended, {LENGTHS[0]: rope.longrope(factors=SHORT_FACTOR, scale=4.0,
                                                              original_length=ORIGINAL),
                                    LENGTHS[1]: rope.longrope(factors=LONG_FACTOR, scale=4.0,
                                                              original_length=ORIGINAL)})):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation='eager', dtype=torch.float32).eval()
    assert type(hf_model).__name__ == 'LlamaForCausalLM'
    for length in LENGTHS:
      tokens = _tokens(length)
      ours = _our_logits(config, params, tokens, ropes[length])
      diff = float(np.abs(ours - _hf_logits(hf_model, tokens)).max())
      print(f'export {folder.name:>8s} L={length:3d} max|ours - transformers| = {diff:.2e}')
      assert diff < TOL, (folder.name, length, diff)
      np.testing.assert_allclose(hf.rope_for_length(folder, length).factors,
                                 ropes[length].factors)
      nll = _next_token_nll(ours, tokens)
      with torch.no_grad():
        hf_nll = float(hf_model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss)
      assert abs(nll - hf_nll) < 1e-5, (folder.name, length, nll, hf_nll)


# ----------------------------------------------------------------------------- no torch needed
def _saved(tmp_path, arch='LlamaForCausalLM', param_dtype='float32', **overrides):
  config = TINY_CONFIG.replace(param_dtype=param_dtype, dtype=param_dtype, **overrides)
  params = _random_params(config, seed=1)
  return config, params, hf.save_params(params, config, tmp_path / 'ckpt', arch=arch)


@pytest.mark.parametrize('arch', ['LlamaForCausalLM', 'Phi3ForCausalLM'])
@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])
def test_save_load_is_exact(tmp_path, arch, param_dtype):
  config, params, folder = _saved(tmp_path, arch, param_dtype)
  stored = {'float32': 'F32', 'bfloat16': 'BF16'}[param_dtype]
  assert hf.checkpoint_dtype(folder) == stored
  ckpt = hf.load(folder)
  assert ckpt.config == config and hf.architecture(ckpt.hf_config) == arch
  for path, value in jax.tree_util.tree_leaves_with_path(ckpt.params):
    assert value.dtype == config.weight_dtype, path
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               ckpt.params, params)


def test_sharded_index_and_placement(tmp_path):
  """A two-file checkpoint with an index loads shard by shard onto a mesh."""
  config, params, folder = _saved(tmp_path)
  tensors = load_file(folder / hf.WEIGHTS_FILE)
  names = sorted(tensors)
  parts = {'model-00001-of-00002.safetensors': names[::2],
           'model-00002-of-00002.safetensors': names[1::2]}
  for file, part in parts.items():
    save_file({n: tensors[n] for n in part}, folder / file, metadata={'format': 'pt'})
  (folder / hf.WEIGHTS_FILE).unlink()
  (folder / hf.INDEX_FILE).write_text(json.dumps(
      {'metadata': {}, 'weight_map': {n: f for f, part in parts.items() for n in part}}))

  mesh = jax.make_mesh((8,), ('x',))
  by_vocab = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x', None))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  ckpt = hf.load(folder, sharding=lambda path: by_vocab if path[0] == 'embed' else replicated)
  assert ckpt.params['embed']['embedding'].sharding == by_vocab
  assert ckpt.params['layers']['attn']['q'].sharding == replicated
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               ckpt.params, params)
  tree = jax.tree.map(lambda x: x.sharding, ckpt.params)  # a tree of shardings works too
  assert jax.tree.map(lambda x: x.sharding, hf.load(folder, sharding=tree).params) == tree

  (folder / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='model-00002-of-00002.safetensors'):
    hf.load(folder)


def test_rope_settings_legacy_and_new_keys():
  base = dict(architectures=['LlamaForCausalLM'], **TINY, max_position_embeddings=4 * ORIGINAL)
  legacy = dict(base, rope_theta=500.0, rope_scaling={'type': 'linear', 'factor': 2.0})
  new = dict(base, rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 500.0})
  for hf_config in (legacy, new):
    p = hf.rope_parameters(hf_config)
    assert (p['rope_type'], p['rope_theta'], p['factor']) == ('linear', 500.0, 2.0)
    np.testing.assert_array_equal(hf.rope_for_length(hf_config, 10).factors, np.full(8, 2.0))
  su = dict(base, architectures=['Phi3ForCausalLM'], original_max_position_embeddings=ORIGINAL,
            rope_scaling={'type': 'su', 'short_factor': SHORT_FACTOR, 'long_factor': LONG_FACTOR,
                          'attention_factor': 1.5})
  assert hf.rope_parameters(su)['rope_type'] == 'longrope'
  assert float(hf.rope_for_length(su, 100).attn_scale) == 1.5
  assert hf.model_config(su).original_length == ORIGINAL
  assert hf.model_config(base).original_length == 4 * ORIGINAL  # no scaling: the whole window


# ----------------------------------------------------------------------------- bad input
def test_folder_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    hf.load(tmp_path)


def test_unsupported_architecture(tmp_path):
  """A GPT-2 folder (GPT-2's config.json and tensor names): the model_type and the supported
  architectures, before any weight is looked for."""
  folder = tmp_path / 'gpt2'
  folder.mkdir()
  (folder / hf.CONFIG_FILE).write_text(json.dumps(dict(
      architectures=['GPT2LMHeadModel'], model_type='gpt2', n_embd=32, n_layer=1, n_head=2,
      vocab_size=100, n_positions=64)))
  save_file({'transformer.wte.weight': np.zeros((100, 32), np.float32),
             'transformer.wpe.weight': np.zeros((64, 32), np.float32)},
            folder / hf.WEIGHTS_FILE)
  with pytest.raises(ValueError, match=rf"^{folder}: Unsupported architecture 'GPT2LMHeadModel' "
                                       r"\(model_type 'gpt2'\) in config.json: .*supported: "
                                       r"LlamaForCausalLM \(model_type 'llama'\), "
                                       r"MistralForCausalLM \(model_type 'mistral'\), "
                                       r"Phi3ForCausalLM \(model_type 'phi3'\); point model.path"):
    hf.load(folder)


def test_missing_tensor(tmp_path):
  _, _, folder = _saved(tmp_path)
  tensors = load_file(folder / hf.WEIGHTS_FILE)
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, folder / hf.WEIGHTS_FILE)
  with pytest.raises(ValueError, match=r"Missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    hf.load(folder)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
  _, _, folder = _saved(tmp_path)
  hf_config = hf.read_config(folder)
  hf_config['intermediate_size'] = 96
  (folder / hf.CONFIG_FILE).write_text(json.dumps(hf_config))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' in "
                                       r"model\.safetensors has shape \[128, 64\]"):
    hf.load(folder)


def test_unsupported_dtype_and_extra_tensor(tmp_path):
  _, _, folder = _saved(tmp_path)
  tensors = load_file(folder / hf.WEIGHTS_FILE)
  good = dict(tensors)
  tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(np.int8)
  save_file(tensors, folder / hf.WEIGHTS_FILE)
  with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*dtype I8"):
    hf.load(folder)
  good['model.layers.0.self_attn.q_proj.bias'] = np.zeros(64, np.float32)
  save_file(good, folder / hf.WEIGHTS_FILE)
  with pytest.raises(ValueError, match=r"q_proj\.bias"):
    hf.load(folder)


def test_unsupported_rope_settings():
  phi3 = dict(architectures=['Phi3ForCausalLM'], **TINY, max_position_embeddings=4 * ORIGINAL,
              original_max_position_embeddings=ORIGINAL)
  with pytest.raises(NotImplementedError, match='partial_rotary_factor'):
    hf.model_config(dict(phi3, partial_rotary_factor=0.75))
  below_one = dict(phi3, rope_scaling={'type': 'longrope', 'long_factor': LONG_FACTOR,
                                       'short_factor': [0.99] + SHORT_FACTOR[1:]})
  with pytest.raises(ValueError, match=r'short_factor\[0\] = 0\.99'):
    hf.rope_for_length(below_one, 10)
  with pytest.raises(NotImplementedError, match='mrope'):
    hf.rope_for_length(dict(phi3, rope_scaling={'rope_type': 'mrope'}), 10)


def test_export_rejects_bad_factors(tmp_path):
  _, _, folder = _saved(tmp_path)
  with pytest.raises(ValueError, match='short_factor'):
    hf.export_rope_scaling(folder, tmp_path / 'out', SHORT_FACTOR[:-1], LONG_FACTOR, 32, 128)
  with pytest.raises(ValueError, match='long_factor'):
    hf.export_rope_scaling(folder, tmp_path / 'out', SHORT_FACTOR, [0.5] * 8, 32, 128)
  assert not (tmp_path / 'out').exists()  # nothing half-written
