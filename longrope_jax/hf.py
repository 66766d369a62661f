"""Hugging Face interop: local Llama / Mistral / Phi-3 checkpoints in, LongRoPE factors out.

Reads `config.json` and safetensors weights (one `model.safetensors` or a sharded
`model.safetensors.index.json`) without torch: tensors are memory-mapped from the raw
safetensors layout (bf16 as `ml_dtypes.bfloat16`), converted one at a time and placed with an
optional sharding, so a 7B model loads onto a mesh without a full host copy.

HF layout -> ours (Linear weights are [out, in]; q/k are already in rotate-half layout):
  q_proj.weight [N*H, D] -> attn/q [D, N, H]      o_proj.weight [D, N*H] -> attn/o [N, H, D]
  k_proj, v_proj [K*H, D] -> attn/k, attn/v [D, K, H]
  gate_proj, up_proj [F, D] -> mlp/gate, mlp/up [D, F]   down_proj [D, F] -> mlp/down [F, D]
  Phi-3 fuses qkv_proj [(N + 2K) * H, D] and gate_up_proj [2F, D] (gate rows first).

RoPE settings (`rope_scaling`, or `rope_parameters` in transformers >= 5) map onto
`rope.RopeScaling` as transformers' `modeling_rope_utils` computes them at a given length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from longrope_jax import rope as rope_lib
from longrope_jax import model as model_lib
from longrope_jax.model import ModelConfig

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_FILE = 'tokenizer.json'

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
                 'Phi3ForCausalLM': 'phi3'}
ROPE_TYPES = ('default', 'linear', 'dynamic', 'yarn', 'longrope', 'llama3')
# Phi3Config's default when config.json has no top-level original_max_position_embeddings.
PHI3_DEFAULT_ORIGINAL_LENGTH = 4096

_SAFETENSORS_DTYPES = {'F32': np.dtype('<f4'), 'F64': np.dtype('<f8'), 'F16': np.dtype('<f2'),
                       'BF16': np.dtype(ml_dtypes.bfloat16)}
# Checkpoint dtype -> ModelConfig.param_dtype when none is asked for (f16 has no slot: bf16).
_DEFAULT_PARAM_DTYPE = {'F32': 'float32', 'F64': 'float32', 'F16': 'bfloat16',
                        'BF16': 'bfloat16'}
_NUMPY_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
# `sliding_window=KEEP` (the default of `load` and `model_config`): the window config.json sets.
KEEP = 'keep'
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)

Path = str | os.PathLike
ParamPath = tuple[str, ...]
ShardingSpec = (Callable[[ParamPath], jax.sharding.Sharding] | jax.sharding.Sharding | dict |
                None)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A loaded checkpoint: our `ModelConfig`, Flax params, the raw HF config and its folder."""

  config: ModelConfig
  params: dict
  hf_config: dict
  path: pathlib.Path

  def rope_for_length(self, length: int) -> rope_lib.RopeScaling:
    """The RoPE scaling transformers uses for this checkpoint at sequence `length`."""
    return rope_for_length(self.hf_config, length)


# ----------------------------------------------------------------------------- config
def read_config(path: Path) -> dict:
  """The parsed `config.json` of a checkpoint folder (or of a path to the file itself)."""
  path = pathlib.Path(path)
  file = path if path.is_file() else path / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"No {CONFIG_FILE} at {file}: pass a Hugging Face checkpoint folder.")
  try:
    hf_config = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(hf_config, dict):
    raise ValueError(f"{file} must hold a JSON object, got {type(hf_config).__name__}.")
  return hf_config


def architecture(hf_config: dict) -> str:
  """The checkpoint's architecture name, checked against `ARCHITECTURES`."""
  names = hf_config.get('architectures') or []
  if not names:
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    if hf_config.get('model_type') in by_type:
      return by_type[hf_config['model_type']]
  name = names[0] if names else None
  if name not in ARCHITECTURES:
    raise ValueError(
        f"Unsupported architecture {name!r} (model_type {hf_config.get('model_type')!r}) in "
        f"{CONFIG_FILE}; supported: {sorted(ARCHITECTURES)}.")
  return name


def _require(mapping: dict, key: str, where: str = CONFIG_FILE) -> Any:
  if mapping.get(key) is None:
    raise ValueError(f"{where} is missing the required field {key!r}.")
  return mapping[key]


def head_dim(hf_config: dict) -> int:
  """Per-head dimension: `head_dim` when set, else hidden_size // num_attention_heads."""
  return int(hf_config.get('head_dim') or
             _require(hf_config, 'hidden_size') // _require(hf_config, 'num_attention_heads'))


def rope_parameters(hf_config: dict) -> dict:
  """The checkpoint's RoPE settings, normalized the way transformers reads them.

  Returns the HF block (factor, short_factor, ...) plus `rope_type` (legacy `type` and "su"
  resolved), `rope_theta`, `partial_rotary_factor`, `max_position_embeddings` and
  `original_max_position_embeddings` (the pretraining window L0).
  """
  arch = architecture(hf_config)
  # transformers >= 5 prefers a legacy `rope_scaling` block over `rope_parameters`.
  raw = hf_config.get('rope_scaling') or hf_config.get('rope_parameters') or {}
  if not isinstance(raw, dict):
    raise ValueError(f"rope_scaling / rope_parameters must be a JSON object, got {raw!r}.")
  if any(isinstance(v, dict) for v in raw.values()):
    raise NotImplementedError("Per-layer-type RoPE settings (nested rope_parameters) are not "
                              "supported; Llama, Mistral and Phi-3 use one block.")
  params = dict(raw)
  rope_type = params.get('rope_type') or params.get('type') or 'default'
  if rope_type == 'su' or (arch == 'Phi3ForCausalLM' and rope_type == 'yarn'):
    rope_type = 'longrope'  # as Phi3Config does
  if rope_type not in ROPE_TYPES:
    raise NotImplementedError(f"RoPE type {rope_type!r} is not supported; choose one of "
                              f"{ROPE_TYPES}.")
  max_len = int(_require(hf_config, 'max_position_embeddings'))
  # A top-level original_max_position_embeddings wins (Phi-3 style), as in transformers.
  top_original = hf_config.get('original_max_position_embeddings')
  if top_original is None and arch == 'Phi3ForCausalLM' and rope_type == 'longrope':
    top_original = PHI3_DEFAULT_ORIGINAL_LENGTH
  original = top_original or params.get('original_max_position_embeddings') or max_len
  params.pop('type', None)
  params.update(
      rope_type=rope_type,
      rope_theta=float(params.get('rope_theta') or hf_config.get('rope_theta') or 10000.0),
      partial_rotary_factor=float(params.get('partial_rotary_factor') or
                                  hf_config.get('partial_rotary_factor') or 1.0),
      max_position_embeddings=max_len,
      original_max_position_embeddings=int(original))
  return params


def parse_sliding_window(value: str | int | None) -> int | None | str:
  """A config or flag value as `load`'s `sliding_window`: 'keep' -> KEEP (config.json's),
  None or 'none' -> None (no window), a positive number (or its string) -> that many tokens."""
  if value is None or (isinstance(value, str) and value.lower() == 'none'):
    return None
  if value == KEEP:
    return KEEP
  try:
    window = int(value)
  except (TypeError, ValueError):
    window = 0
  if isinstance(value, bool) or window <= 0 or str(window) != str(value).strip():
    raise ValueError(f"sliding_window must be {KEEP!r} (config.json's), 'none' (no window) or a "
                     f"positive number of tokens, got {value!r}.")
  return window


def model_config(hf_config: dict, *, param_dtype: str = 'float32', dtype: str | None = None,
                 sliding_window: int | None | str = KEEP, **overrides) -> ModelConfig:
  """Our `ModelConfig` for an HF config; `original_length` is the original (pretraining) window.

  `sliding_window`: KEEP takes config.json's (Mistral, Phi-3; Llama has none), None disables
  it (full causal attention), an int sets it.
  """
  arch = architecture(hf_config)
  if sliding_window != KEEP and sliding_window is not None and (
      isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or
      sliding_window <= 0):
    raise ValueError(f"sliding_window must be {KEEP!r} (config.json's), None (no window) or a "
                     f"positive number of tokens, got {sliding_window!r}.")
  act = hf_config.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    raise NotImplementedError(f"hidden_act {act!r} is not supported (model.py uses SwiGLU).")
  for key in ('attention_bias', 'mlp_bias'):
    if hf_config.get(key):
      raise NotImplementedError(f"{key}=true is not supported: model.py has no bias terms.")
  rope = rope_parameters(hf_config)
  if rope['partial_rotary_factor'] != 1.0:
    raise NotImplementedError(
        f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported: model.py "
        "rotates the whole head (Phi-3 mini/medium use 1.0; Phi-4-mini's 0.75 is not covered).")
  num_heads = int(_require(hf_config, 'num_attention_heads'))
  scaled = rope['rope_type'] != 'default'
  window = hf_config.get('sliding_window') if arch != 'LlamaForCausalLM' else None
  if sliding_window != KEEP:
    window = sliding_window
  fields = dict(
      vocab_size=int(_require(hf_config, 'vocab_size')),
      dim=int(_require(hf_config, 'hidden_size')),
      num_layers=int(_require(hf_config, 'num_hidden_layers')),
      num_heads=num_heads,
      num_kv_heads=int(hf_config.get('num_key_value_heads') or num_heads),
      head_dim=head_dim(hf_config),
      mlp_dim=int(_require(hf_config, 'intermediate_size')),
      original_length=(rope['original_max_position_embeddings'] if scaled
                       else rope['max_position_embeddings']),
      rope_theta=rope['rope_theta'],
      norm_eps=float(hf_config.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf_config.get('tie_word_embeddings', False)),
      sliding_window=int(window) if window else None,
      param_dtype=param_dtype,
      dtype=dtype or param_dtype)
  fields.update(overrides)
  return ModelConfig(**fields)


# ----------------------------------------------------------------------------- RoPE
def rope_for_length(source: dict | Path | Checkpoint, length: int) -> rope_lib.RopeScaling:
  """The `RopeScaling` transformers applies to a sequence of `length` tokens (positions 0..L-1).

  `source` is an HF config dict, a checkpoint folder, or a `Checkpoint`. Matches
  `modeling_rope_utils`. LongRoPE / Phi-3 uses short_factor while length <=
  original_max_position_embeddings and long_factor beyond, with attention scale attention_factor
  or sqrt(1 + ln s / ln L0), s = factor or max_position_embeddings / L0, at every length.

  Dynamic NTK here is the formula's value at `length`: NTK-aware with base
  theta * (factor * L / L0 - (factor - 1)) ** (H / (H - 2)) for L > L0 = max_position_embeddings,
  vanilla RoPE for L <= L0, a pure function of the length. transformers' dynamic rotary embedding
  is stateful instead: it recomputes the base only when a sequence grows past the longest it has
  seen, keeps that base for shorter sequences still beyond L0 (and resets to vanilla below L0),
  and during cached generation the keys already cached keep the rotation of the base they were
  computed with. The two agree on one forward of a fresh model at `length`, or on lengths
  evaluated in ascending order; transformers' number for a shorter sequence after a longer one,
  or for a generation that crosses lengths, is not this function's.
  """
  if isinstance(source, Checkpoint):
    hf_config = source.hf_config
  elif isinstance(source, dict):
    hf_config = source
  else:
    hf_config = read_config(source)
  if int(length) != length or length <= 0:
    raise ValueError(f"length must be a positive integer, got {length!r}.")
  p = rope_parameters(hf_config)
  H, theta = head_dim(hf_config), p['rope_theta']
  if p['partial_rotary_factor'] != 1.0:
    raise NotImplementedError(f"partial_rotary_factor={p['partial_rotary_factor']} is not "
                              "supported: model.py rotates the whole head.")
  max_len, original = p['max_position_embeddings'], p['original_max_position_embeddings']
  kind, where = p['rope_type'], f"rope_scaling ({p['rope_type']})"
  if kind == 'default':
    return rope_lib.none(head_dim=H)
  if kind == 'linear':
    return rope_lib.linear(head_dim=H, scale=float(_require(p, 'factor', where)))
  if kind == 'dynamic':
    return rope_lib.dynamic_ntk(head_dim=H, length=int(length), original_length=max_len,
                                dynamic_factor=float(_require(p, 'factor', where)))
  if kind == 'yarn':
    factor = float(p.get('factor') or max_len / original)
    attn_scale = p.get('attention_factor')
    if attn_scale is None:
      mscale, mscale_all_dim = p.get('mscale'), p.get('mscale_all_dim')
      if mscale and mscale_all_dim:
        attn_scale = (rope_lib.yarn_attention_scale(factor, mscale) /
                      rope_lib.yarn_attention_scale(factor, mscale_all_dim))
      else:
        attn_scale = rope_lib.yarn_attention_scale(factor)
    return rope_lib.yarn(head_dim=H, scale=factor, theta=theta, original_length=original,
                         beta_fast=float(p.get('beta_fast') or 32),
                         beta_slow=float(p.get('beta_slow') or 1), attn_scale=float(attn_scale),
                         truncate=bool(p.get('truncate', True)))
  if kind == 'llama3':
    return rope_lib.llama3(head_dim=H, scale=float(_require(p, 'factor', where)), theta=theta,
                           original_length=original,
                           low_freq_factor=float(_require(p, 'low_freq_factor', where)),
                           high_freq_factor=float(_require(p, 'high_freq_factor', where)))
  # longrope
  key = 'long_factor' if length > original else 'short_factor'
  factors = np.asarray(_require(p, key, where), dtype=np.float64)
  if factors.shape != (H // 2,):
    raise ValueError(f"rope_scaling.{key} has {factors.size} entries; head_dim {H} needs "
                     f"{H // 2}.")
  if np.any(factors < 1.0):
    bad = int(np.argmin(factors))
    raise ValueError(
        f"rope_scaling.{key}[{bad}] = {factors[bad]} < 1: RopeScaling represents interpolation "
        "only (factors >= 1), so this checkpoint's RoPE cannot be reproduced exactly.")
  factor = float(p.get('factor') or max_len / original)
  attn_scale = p.get('attention_factor')
  if attn_scale is None:
    attn_scale = rope_lib.longrope_attention_scale(factor, original)
  return rope_lib.longrope(factors=factors, n_hat=0, attn_scale=float(attn_scale), head_dim=H)


# ----------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor: its shape and how it maps to (and from) our params."""

  name: str
  shape: tuple[int, ...]
  paths: tuple[ParamPath, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


def _split_heads(w_XD: np.ndarray, heads: int) -> np.ndarray:
  """[heads * H, D] (an HF q/k/v weight) -> [D, heads, H]."""
  return w_XD.T.reshape(w_XD.shape[1], heads, -1)


def _merge_heads(w_DXH: np.ndarray) -> np.ndarray:
  """[D, heads, H] -> [heads * H, D]."""
  return w_DXH.reshape(w_DXH.shape[0], -1).T


def _layout(config: ModelConfig, arch: str) -> list[_Tensor]:
  """Every HF tensor of `arch` for `config`, in a fixed order."""
  D, N, K, H, F, V = (config.dim, config.num_heads, config.num_kv_heads, config.head_dim,
                      config.mlp_dim, config.vocab_size)
  same = (lambda w: (w,), lambda x: x)
  transposed = (lambda w: (w.T,), lambda x: x.T)
  tensors = [_Tensor('model.embed_tokens.weight', (V, D), (('embed', 'embedding'),), *same)]
  for i in range(config.num_layers):
    pre, ours = f'model.layers.{i}.', f'layer_{i}'
    attn = lambda name, ours=ours: (ours, 'attn', name)
    mlp = lambda name, ours=ours: (ours, 'mlp', name)
    if arch == 'Phi3ForCausalLM':
      tensors += [
          _Tensor(pre + 'self_attn.qkv_proj.weight', ((N + 2 * K) * H, D),
                  (attn('q'), attn('k'), attn('v')),
                  lambda w: tuple(_split_heads(part, heads) for part, heads in
                                  zip(np.split(w, [N * H, (N + K) * H]), (N, K, K))),
                  lambda q, k, v: np.concatenate([_merge_heads(x) for x in (q, k, v)])),
          _Tensor(pre + 'mlp.gate_up_proj.weight', (2 * F, D), (mlp('gate'), mlp('up')),
                  lambda w: (w[:F].T, w[F:].T),
                  lambda gate, up: np.concatenate([gate.T, up.T])),
      ]
    else:
      for name, heads in (('q', N), ('k', K), ('v', K)):
        tensors.append(_Tensor(pre + f'self_attn.{name}_proj.weight', (heads * H, D),
                               (attn(name),), lambda w, heads=heads: (_split_heads(w, heads),),
                               _merge_heads))
      for name in ('gate', 'up'):
        tensors.append(_Tensor(pre + f'mlp.{name}_proj.weight', (F, D), (mlp(name),),
                               *transposed))
    tensors += [
        _Tensor(pre + 'self_attn.o_proj.weight', (D, N * H), (attn('o'),),
                lambda w: (w.T.reshape(N, H, D),), lambda x: x.reshape(N * H, D).T),
        _Tensor(pre + 'mlp.down_proj.weight', (D, F), (mlp('down'),), *transposed),
        _Tensor(pre + 'input_layernorm.weight', (D,), ((ours, 'attn_norm', 'scale'),), *same),
        _Tensor(pre + 'post_attention_layernorm.weight', (D,), ((ours, 'mlp_norm', 'scale'),),
                *same),
    ]
  tensors.append(_Tensor('model.norm.weight', (D,), (('final_norm', 'scale'),), *same))
  if not config.tie_embeddings:
    tensors.append(_Tensor('lm_head.weight', (V, D), (('lm_head',),), *transposed))
  return tensors


# ----------------------------------------------------------------------------- safetensors
@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  file: pathlib.Path
  dtype: str
  shape: tuple[int, ...]
  start: int  # absolute byte offset in the file
  end: int


def _read_header(file: pathlib.Path) -> dict[str, _TensorInfo]:
  """The tensor table of a safetensors file (8-byte little-endian length + JSON header)."""
  size = file.stat().st_size
  with open(file, 'rb') as f:
    prefix = f.read(8)
    length = int.from_bytes(prefix, 'little') if len(prefix) == 8 else -1
    if length < 0 or 8 + length > size:
      raise ValueError(f"{file} is not a safetensors file (bad header length).")
    try:
      header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{file} is not a safetensors file (header is not JSON: {e}).") from e
  infos = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    start, end = entry['data_offsets']
    infos[name] = _TensorInfo(file, entry['dtype'], tuple(entry['shape']), 8 + length + start,
                              8 + length + end)
    if infos[name].end > size:
      raise ValueError(f"{file}: tensor {name!r} runs past the end of the file (truncated?).")
  return infos


def _read_tensor(name: str, info: _TensorInfo) -> np.ndarray:
  """A read-only memory map of one tensor in its stored dtype."""
  dtype = _SAFETENSORS_DTYPES[info.dtype]
  count = math.prod(info.shape)
  if info.end - info.start != count * dtype.itemsize:
    raise ValueError(f"{info.file}: tensor {name!r} holds {info.end - info.start} bytes; "
                     f"{info.dtype}{list(info.shape)} needs {count * dtype.itemsize}.")
  if count == 0:
    return np.zeros(info.shape, dtype)
  data = np.memmap(info.file, dtype=np.uint8, mode='r', offset=info.start,
                   shape=(info.end - info.start,))
  return data.view(dtype).reshape(info.shape)


def weight_files(path: Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint folder, in load order."""
  path = pathlib.Path(path)
  index = path / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index} has no valid 'weight_map': {e}") from e
    files = [path / name for name in sorted(set(weight_map.values()))]
    for file in files:
      if not file.is_file():
        raise FileNotFoundError(f"{index} lists {file.name}, which is missing from {path}.")
    return files
  if (path / WEIGHTS_FILE).is_file():
    return [path / WEIGHTS_FILE]
  raise FileNotFoundError(
      f"No {WEIGHTS_FILE} or {INDEX_FILE} in {path} (PyTorch .bin weights are not read: "
      "convert them to safetensors).")


def _index_tensors(path: pathlib.Path, tensors: list[_Tensor]) -> dict[str, _TensorInfo]:
  """Reads every header and checks names, shapes and dtypes before any tensor is loaded."""
  infos: dict[str, _TensorInfo] = {}
  for file in weight_files(path):
    infos.update(_read_header(file))
  index = path / INDEX_FILE
  weight_map = json.loads(index.read_text())['weight_map'] if index.is_file() else {}
  for t in tensors:
    if t.name not in infos:
      where = (f"{INDEX_FILE} puts it in {weight_map[t.name]}" if t.name in weight_map else
               f"not in {INDEX_FILE}" if weight_map else f"not in {WEIGHTS_FILE}")
      raise ValueError(f"Missing tensor {t.name!r} in {path} ({where}).")
    info = infos[t.name]
    if info.shape != t.shape:
      raise ValueError(
          f"Tensor {t.name!r} in {info.file.name} has shape {list(info.shape)} but "
          f"{CONFIG_FILE} implies {list(t.shape)}.")
    if info.dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(f"Tensor {t.name!r} in {info.file.name} has dtype {info.dtype}; only "
                       f"{sorted(_SAFETENSORS_DTYPES)} are supported (no quantized weights).")
  # A tied checkpoint may still store lm_head.weight (a copy of the embedding): ignored.
  wanted = {t.name for t in tensors} | {'lm_head.weight'}
  unused = [n for n in infos if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)]
  if unused:
    raise ValueError(
        f"{len(unused)} tensors in {path} have no place in the model, e.g. {unused[0]!r} in "
        f"{infos[unused[0]].file.name} (biases and extra modules are not supported).")
  return infos


def _sharding_lookup(sharding: ShardingSpec) -> Callable[[ParamPath], Any]:
  """A function param path -> Sharding (or None: default device) from any ShardingSpec."""
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return lambda path: sharding
  if callable(sharding):
    return sharding
  flat = traverse_util.flatten_dict(sharding)

  def lookup(path):
    if path not in flat:
      raise ValueError(f"The sharding tree has no entry for param {'/'.join(path)}.")
    return flat[path]

  return lookup


def _place(host: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def checkpoint_dtype(path: Path) -> str:
  """The safetensors dtype (F32, BF16, F16, ...) of a checkpoint's embedding table."""
  for file in weight_files(path):
    infos = _read_header(pathlib.Path(file))
    if 'model.embed_tokens.weight' in infos:
      return infos['model.embed_tokens.weight'].dtype
  raise ValueError(f"Missing tensor 'model.embed_tokens.weight' in {path}.")


def load_params(path: Path, config: ModelConfig, hf_config: dict, *,
                sharding: ShardingSpec = None) -> dict:
  """Flax params of `config` from the checkpoint folder `path`, one file and tensor at a time.

  `sharding` places each param: a `jax.sharding.Sharding` for all, a function of the param
  path (e.g. ('layers', 'attn', 'q'), layers stacked) returning one, or a tree of shardings shaped like the
  params. Tensors are cast to `config.param_dtype` on the host (bf16 stays bf16).
  """
  path = pathlib.Path(path)
  tensors = _layout(config, architecture(hf_config))
  infos = _index_tensors(path, tensors)
  dtype = _NUMPY_DTYPES[config.param_dtype]
  sharding_for = _sharding_lookup(sharding)
  by_file: dict[pathlib.Path, list[_Tensor]] = {}
  for t in tensors:
    by_file.setdefault(infos[t.name].file, []).append(t)
  flat = {}
  for file in sorted(by_file):
    for t in by_file[file]:
      stored = _read_tensor(t.name, infos[t.name])
      for param_path, value in zip(t.paths, t.to_ours(stored)):
        flat[param_path] = np.ascontiguousarray(value, dtype=dtype)
      del stored
  # HF stores one tensor per layer; the model scans over layers stacked on a leading axis.
  stacked = model_lib.stack_layers(traverse_util.unflatten_dict(flat), config.num_layers)
  del flat
  flat = traverse_util.flatten_dict(stacked)
  return traverse_util.unflatten_dict(
      {path: _place(flat.pop(path), sharding_for(path)) for path in list(flat)})


def load(path: Path, *, sharding: ShardingSpec = None, param_dtype: str | None = None,
         dtype: str | None = None, sliding_window: int | None | str = KEEP,
         **overrides) -> Checkpoint:
  """Reads a local HF checkpoint folder into a `Checkpoint` (config, params, raw HF config).

  `param_dtype` defaults to the stored dtype (bf16 stays bf16; f16 becomes bf16); `dtype`
  (compute) defaults to `param_dtype`; `sliding_window` keeps config.json's (KEEP), disables it
  (None) or sets it (an int): the official LongRoPE scripts take Mistral's L0 = its 4k window
  and search and evaluate with the window raised past the target length. `overrides` set other
  `ModelConfig` fields (attention='blockwise', original_length=4096, ...).
  """
  path = pathlib.Path(path)
  hf_config = read_config(path)
  if param_dtype is None:
    param_dtype = _DEFAULT_PARAM_DTYPE.get(checkpoint_dtype(path), 'float32')
  config = model_config(hf_config, param_dtype=param_dtype, dtype=dtype,
                        sliding_window=sliding_window, **overrides)
  rope = rope_parameters(hf_config)  # RoPE errors surface before any weight is read
  longest = max(rope['max_position_embeddings'], rope['original_max_position_embeddings'])
  for length in (1, longest + 1):
    rope_for_length(hf_config, length)
  params = load_params(path, config, hf_config, sharding=sharding)
  return Checkpoint(config=config, params=params, hf_config=hf_config, path=path)


# ----------------------------------------------------------------------------- export
def hf_config_for(config: ModelConfig, *, arch: str | None = None,
                  base: dict | None = None) -> dict:
  """An HF config.json dict for `config`: `base` (e.g. the imported one) with our fields set.

  Without `base` the RoPE block is plain ('default') with max_position_embeddings = max_len.
  """
  arch = arch or (architecture(base) if base else
                  'MistralForCausalLM' if config.sliding_window else 'LlamaForCausalLM')
  if arch not in ARCHITECTURES:
    raise ValueError(f"Unsupported architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
  if arch == 'LlamaForCausalLM' and config.sliding_window:
    raise ValueError("LlamaForCausalLM has no sliding window; export as MistralForCausalLM.")
  out = dict(base or {})
  out.update(
      architectures=[arch], model_type=ARCHITECTURES[arch], hidden_size=config.dim,
      intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, vocab_size=config.vocab_size, rms_norm_eps=config.norm_eps,
      tie_word_embeddings=config.tie_embeddings, hidden_act='silu', dtype=config.param_dtype,
      torch_dtype=config.param_dtype)
  if arch != 'Phi3ForCausalLM':
    out.update(attention_bias=False, mlp_bias=False)
  if arch != 'LlamaForCausalLM':
    out['sliding_window'] = config.sliding_window
  if base is None:
    out.update(max_position_embeddings=config.original_length, rope_theta=config.rope_theta,
               rope_parameters={'rope_type': 'default', 'rope_theta': config.rope_theta})
  return out


def _write_json_atomic(data: dict, file: pathlib.Path) -> None:
  with tempfile.NamedTemporaryFile('w', dir=file.parent, suffix='.tmp', delete=False) as f:
    json.dump(data, f, indent=2)
    f.write('\n')
  os.replace(f.name, file)


def save_params(params: dict, config: ModelConfig, out_dir: Path, *,
                hf_config: dict | None = None, arch: str | None = None) -> pathlib.Path:
  """Writes Flax params as an HF checkpoint (model.safetensors + config.json); returns out_dir.

  `hf_config` (e.g. `Checkpoint.hf_config`) keeps its other fields (token ids, RoPE block);
  `arch` picks the layout (default: the base's, else Mistral with a sliding window, else Llama).
  """
  from safetensors.numpy import save_file
  out_dir = pathlib.Path(out_dir)
  if (out_dir / INDEX_FILE).exists():
    raise ValueError(f"{out_dir} holds a sharded checkpoint ({INDEX_FILE}); save into an empty "
                     "folder.")
  out_config = hf_config_for(config, arch=arch, base=hf_config)
  if model_lib.LAYERS in params:  # the model's stacked layers -> HF's one tensor per layer
    params = model_lib.unstack_layers(params)
  flat = traverse_util.flatten_dict(params)
  tensors = {}
  for t in _layout(config, architecture(out_config)):
    ours = []
    for path in t.paths:
      if path not in flat:
        raise ValueError(f"params have no {'/'.join(path)} (needed for {t.name}).")
      ours.append(np.asarray(jax.device_get(flat[path])))
    value = np.ascontiguousarray(t.to_hf(*ours))
    if value.shape != t.shape:
      raise ValueError(f"{t.name} would have shape {list(value.shape)}; config implies "
                       f"{list(t.shape)} (check params against the ModelConfig).")
    tensors[t.name] = value
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = out_dir / (WEIGHTS_FILE + '.tmp')
  save_file(tensors, str(tmp), metadata={'format': 'pt'})
  os.replace(tmp, out_dir / WEIGHTS_FILE)
  _write_json_atomic(out_config, out_dir / CONFIG_FILE)
  return out_dir


def longrope_block(short_factor: Iterable[float], long_factor: Iterable[float],
                   original_max_position_embeddings: int, max_position_embeddings: int, *,
                   head_dim: int | None = None, attention_factor: float | None = None) -> dict:
  """An HF `rope_scaling` block for LongRoPE factors (validated: >= 1, one per frequency)."""
  original, max_len = int(original_max_position_embeddings), int(max_position_embeddings)
  if original <= 0 or max_len < original:
    raise ValueError(f"Need 0 < original_max_position_embeddings ({original}) <= "
                     f"max_position_embeddings ({max_len}).")
  block = {'rope_type': 'longrope', 'type': 'longrope'}
  for key, values in (('short_factor', short_factor), ('long_factor', long_factor)):
    values = np.asarray(values, dtype=np.float64)
    try:
      rope_lib.make(values, head_dim=head_dim)
    except ValueError as e:
      raise ValueError(f"{key}: {e}") from e
    block[key] = [float(v) for v in values]
  block.update(original_max_position_embeddings=original, factor=max_len / original)
  if attention_factor is not None:
    block['attention_factor'] = float(attention_factor)
  return block


def export_rope_scaling(config_dir_in: Path, out_dir: Path, short_factor: Iterable[float],
                        long_factor: Iterable[float], original_max_position_embeddings: int,
                        max_position_embeddings: int, *, attention_factor: float | None = None,
                        others: str = 'link') -> pathlib.Path:
  """Writes config_dir_in's config.json into out_dir with a LongRoPE `rope_scaling` block.

  The block ({rope_type, type: 'longrope', short_factor, long_factor,
  original_max_position_embeddings, factor}) is written as `rope_scaling` (read first by
  transformers 5, and by 4.x) and as `rope_parameters` (with rope_theta); the top-level
  max_position_embeddings / original_max_position_embeddings are set to match. LongRoPE's n_hat
  has no HF field and is not exported. `others` ('link', 'copy' or 'none') brings the folder's
  other files (weights, tokenizer) along so out_dir loads on its own. Returns out_dir.
  """
  if others not in ('link', 'copy', 'none'):
    raise ValueError(f"others must be 'link', 'copy' or 'none', got {others!r}.")
  src, out_dir = pathlib.Path(config_dir_in), pathlib.Path(out_dir)
  out_config = read_config(src)
  architecture(out_config)
  block = longrope_block(short_factor, long_factor, original_max_position_embeddings,
                         max_position_embeddings, head_dim=head_dim(out_config),
                         attention_factor=attention_factor)
  theta = rope_parameters(out_config)['rope_theta']
  for key in ('rope_scaling', 'rope_parameters'):
    out_config.pop(key, None)
  out_config.update(
      rope_scaling=block, rope_parameters={**block, 'rope_theta': theta}, rope_theta=theta,
      max_position_embeddings=int(max_position_embeddings),
      original_max_position_embeddings=int(original_max_position_embeddings))
  out_dir.mkdir(parents=True, exist_ok=True)
  if others != 'none' and src.resolve() != out_dir.resolve():
    for item in src.iterdir():
      target = out_dir / item.name
      if item.name == CONFIG_FILE or not item.is_file() or target.exists():
        continue
      if others == 'link':
        target.symlink_to(item.resolve())
      else:
        shutil.copy2(item, target)
  _write_json_atomic(out_config, out_dir / CONFIG_FILE)
  return out_dir


# Files of a checkpoint folder that export rewrites rather than copies.
_WEIGHT_FILES = (WEIGHTS_FILE, INDEX_FILE)


def _check_record(record: Mapping[str, Any], name: str, drop_n_hat: bool) -> None:
  """A searched result as results.json holds it: factors, n_hat, attn_scale, lengths."""
  missing = [k for k in ('factors', 'n_hat', 'attn_scale', 'original_length', 'target_length')
             if k not in record]
  if missing:
    raise ValueError(f"the {name} result has no {missing} (expected a results.json 'search' "
                     "record or a 'progressive' 'long' / 'short' record).")
  if int(record['n_hat']) > 0 and not drop_n_hat:
    raise ValueError(
        f"the {name} result has n_hat = {record['n_hat']}: Hugging Face's longrope has no field "
        "for LongRoPE's un-interpolated first positions, so transformers would not reproduce "
        "the searched perplexity. Search with n_hat fixed at 0 for an HF export, or drop it "
        "knowingly (drop_n_hat=True, --drop_n_hat).")


def export_longrope(source: Path, out_dir: Path, long: Mapping[str, Any], *,
                    short: Mapping[str, Any] | Iterable[float] | None = None,
                    drop_n_hat: bool = False, sliding_window: int | None | str = KEEP,
                    params: dict | None = None, config: ModelConfig | None = None
                    ) -> pathlib.Path:
  """Writes a complete HF folder (config.json, weights, tokenizer files) that transformers
  loads with the searched LongRoPE scaling; returns out_dir.

  `long` is a searched result ({factors, n_hat, attn_scale, original_length, target_length}:
  results.json's 'search' record or a 'progressive' 'long' one): long_factor, with
  original_max_position_embeddings = original_length, max_position_embeddings = target_length
  and attention_factor = attn_scale. `short` (a record or factors; default all 1: no
  interpolation) is short_factor. transformers applies the one attention_factor to the short
  factors too, so a short record must have been searched under the long record's attn_scale;
  n_hat > 0 has no HF field and is refused unless `drop_n_hat`. `sliding_window` keeps the
  source's (KEEP), or writes None (no window) or an int. The weights are the source's, or
  `params` of `config` (e.g. a fine-tuned model) when given. Nothing is written on an error.
  """
  src, out_dir = pathlib.Path(source), pathlib.Path(out_dir)
  hf_config = read_config(src)
  _check_record(long, 'long', drop_n_hat)
  original, target = int(long['original_length']), int(long['target_length'])
  attn_scale = float(long['attn_scale'])
  if isinstance(short, Mapping):
    _check_record(short, 'short', drop_n_hat)
    if int(short['target_length']) != original:
      raise ValueError(f"the short result was searched for {short['target_length']} tokens; "
                       f"short factors serve lengths up to original_length = {original}.")
    if not math.isclose(float(short['attn_scale']), attn_scale, rel_tol=1e-6):
      raise ValueError(
          f"the short result was searched with attn_scale {short['attn_scale']}, the long one "
          f"with {attn_scale}; transformers applies one attention_factor to both, so the short "
          f"factors must be searched under attn_scale = {attn_scale} to be exported.")
    short = short['factors']
  short_factor = np.ones(head_dim(hf_config) // 2) if short is None else np.asarray(short)
  longrope_block(short_factor, long['factors'], original, target,  # validates before writing
                 head_dim=head_dim(hf_config), attention_factor=attn_scale)
  if params is not None and config is None:
    raise ValueError("export_longrope with params needs their ModelConfig (config=...).")
  if out_dir.exists() and any(out_dir.iterdir()):
    raise ValueError(f"{out_dir} is not empty; export into a new folder.")
  base = dict(hf_config)
  if sliding_window != KEEP:
    if architecture(hf_config) == 'LlamaForCausalLM' and sliding_window is not None:
      raise ValueError("LlamaForCausalLM has no sliding window; export as MistralForCausalLM.")
    base['sliding_window'] = sliding_window
  out_dir.mkdir(parents=True, exist_ok=True)
  for item in src.iterdir():
    weights = item.name in _WEIGHT_FILES or item.name.endswith('.safetensors')
    if item.is_file() and item.name != CONFIG_FILE and not (weights and params is not None):
      shutil.copy2(item, out_dir / item.name)
  if params is not None:
    save_params(params, config, out_dir, hf_config=base)
    written = read_config(out_dir)
    if 'sliding_window' in base:  # the window asked for, not the one the params ran with
      written['sliding_window'] = base['sliding_window']
    base = written
  _write_json_atomic(base, out_dir / CONFIG_FILE)
  return export_rope_scaling(out_dir, out_dir, short_factor, long['factors'], original, target,
                             attention_factor=attn_scale, others='none')
