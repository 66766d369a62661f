"""The local real-format fixtures (tests/hf_fixtures.py) are what they claim, and Mistral's sliding
window is kept, disabled or set on purpose, as transformers computes it."""

import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import corpus
from longrope_jax import data as data_lib
from longrope_jax import hf
from longrope_jax import model as model_lib

pytest.importorskip('tokenizers')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import hf_fixtures  # noqa: E402


def test_checkpoints_load_with_their_tokenizers(hf_assets):
  for kind, arch in (('llama', 'LlamaForCausalLM'), ('mistral', 'MistralForCausalLM'),
                     ('phi3', 'Phi3ForCausalLM')):
    ckpt = hf.load(hf_assets.checkpoint(kind))
    tok = data_lib.get_tokenizer(str(ckpt.path / 'tokenizer.json'))
    assert hf.architecture(ckpt.hf_config) == arch
    assert ckpt.config.vocab_size == tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id) == (ckpt.hf_config['bos_token_id'],
                                        ckpt.hf_config['eos_token_id']) == (1, 2)
    assert ckpt.config.original_length == hf_fixtures.ORIGINAL
  assert hf.load(hf_assets.checkpoint('mistral')).config.sliding_window == 32
  phi3 = hf_assets.checkpoint('phi3')
  np.testing.assert_allclose(hf.rope_for_length(phi3, 200).factors, hf_fixtures.LONG_FACTOR,
                             rtol=1e-6)


def test_sentencepiece_layout(hf_assets):
  tok = hf_assets.tokenizer('sentencepiece')
  assert tok.id_to_token(0) == '<unk>' and tok.id_to_token(3) == '<0x00>'
  ids = tok.encode('Ça va? 42', add_special_tokens=False)
  assert ids.tokens[0].startswith('▁') and '<0xC3>' in ids.tokens  # prepend + byte fallback
  assert [t for t in ids.tokens if t.strip('▁').isdigit()] == ['4', '2']  # digits split
  assert tok.decode(ids.ids) == 'Ça va? 42'
  bpe = hf_assets.tokenizer('byte_bpe')
  assert bpe.decode(bpe.encode('Ça va? 42').ids) == 'Ça va? 42'


def test_books_through_the_tfds_builder(hf_assets):
  pytest.importorskip('tensorflow_datasets')
  name, data_dir = hf_assets.pg19()
  assert name == 'local_text/pg19'
  tok = data_lib.get_tokenizer(str(hf_assets.tokenizer_file('sentencepiece')))
  for split, count in (('train', 6), ('validation', 4), ('test', 4)):
    docs = corpus.load_split('tfds', split, tfds_name=name, data_dir=str(data_dir))
    assert len(docs) == count
    assert min(len(t) for t in data_lib.encode_documents(docs, tok)) > 3000
  # The builder's features are 'name' and 'text' (data.text_key = 'text'), not PG19's 'book_text'.
  with pytest.raises(ValueError, match=r"no feature 'book_text'.*\['name', 'text'\]"):
    corpus.load_split('tfds', 'test', tfds_name=name, data_dir=str(data_dir),
                        text_key='book_text')


def _hf_logits(folder, tokens_BT, **config_changes):
  config = transformers.AutoConfig.from_pretrained(folder, **config_changes)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, config=config, attn_implementation='eager', dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens_BT, dtype=torch.long)).logits.numpy()


def _our_logits(ckpt, tokens_BT):
  positions = jnp.arange(tokens_BT.shape[1])[None]
  return np.asarray(model_lib.forward(ckpt.config, ckpt.params, jnp.asarray(tokens_BT), positions,
                                      hf.rope_for_length(ckpt, tokens_BT.shape[1])))


def test_sliding_window_kept_disabled_or_set(hf_assets):
  folder = hf_assets.checkpoint('mistral')
  tokens = np.random.default_rng(0).integers(0, 512, (1, 96))  # longer than the 32-token window
  kept = hf.load(folder)
  off = hf.load(folder, sliding_window=None)
  wider = hf.load(folder, sliding_window=64)
  assert (kept.config.sliding_window, off.config.sliding_window,
          wider.config.sliding_window) == (32, None, 64)
  for ckpt, changes in ((kept, {}), (off, dict(sliding_window=None)),
                        (wider, dict(sliding_window=64))):
    diff = np.abs(_our_logits(ckpt, tokens) - _hf_logits(folder, tokens, **changes)).max()
    assert diff < 1e-4, (ckpt.config.sliding_window, diff)
  assert np.abs(_our_logits(kept, tokens) - _our_logits(off, tokens)).max() > 1e-2
  for bad in (0, -4, 2.5, 'none'):
    with pytest.raises(ValueError, match='sliding_window must be'):
      hf.load(folder, sliding_window=bad)


def test_parse_sliding_window():
  assert hf.parse_sliding_window('keep') == hf.KEEP
  assert hf.parse_sliding_window('none') is None and hf.parse_sliding_window(None) is None
  assert hf.parse_sliding_window('4096') == hf.parse_sliding_window(4096) == 4096
  for bad in ('0', -1, '2.5', 'off', True):
    with pytest.raises(ValueError, match='sliding_window must be'):
      hf.parse_sliding_window(bad)
