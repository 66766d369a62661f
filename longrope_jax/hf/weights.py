"""Hugging Face safetensors weights in: the tensor layout, a torch-free reader, `load`.

Reads safetensors weights (one `model.safetensors` or a sharded `model.safetensors.index.json`)
without torch: tensors are memory-mapped from the raw safetensors layout (bf16 as
`ml_dtypes.bfloat16`), converted one at a time and placed with an optional sharding, so a 7B
model loads onto a mesh without a full host copy.

HF layout -> ours (Linear weights are [out, in]; q/k are already in rotate-half layout):
  q_proj.weight [N*H, D] -> attn/q [D, N, H]      o_proj.weight [D, N*H] -> attn/o [N, H, D]
  k_proj, v_proj [K*H, D] -> attn/k, attn/v [D, K, H]
  gate_proj, up_proj [F, D] -> mlp/gate, mlp/up [D, F]   down_proj [D, F] -> mlp/down [F, D]
  Phi-3 fuses qkv_proj [(N + 2K) * H, D] and gate_up_proj [2F, D] (gate rows first).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from longrope_jax import model as model_lib
from longrope_jax.hf.config import (CONFIG_FILE, KEEP, Checkpoint, Path, architecture,
                                    model_config, read_config, rope_for_length, rope_parameters)
from longrope_jax.model import ModelConfig

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'

_SAFETENSORS_DTYPES = {'F32': np.dtype('<f4'), 'F64': np.dtype('<f8'), 'F16': np.dtype('<f2'),
                       'BF16': np.dtype(ml_dtypes.bfloat16)}
# Checkpoint dtype -> ModelConfig.param_dtype when none is asked for (f16 has no slot: bf16).
_DEFAULT_PARAM_DTYPE = {'F32': 'float32', 'F64': 'float32', 'F16': 'bfloat16',
                        'BF16': 'bfloat16'}
_NUMPY_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)

ParamPath = tuple[str, ...]
ShardingSpec = (Callable[[ParamPath], jax.sharding.Sharding] | jax.sharding.Sharding | dict |
                None)


# ----------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class HFTensor:
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


def tensor_layout(config: ModelConfig, arch: str) -> list[HFTensor]:
  """Every HF tensor of `arch` for `config`, in a fixed order."""
  D, N, K, H, F, V = (config.dim, config.num_heads, config.num_kv_heads, config.head_dim,
                      config.mlp_dim, config.vocab_size)
  same = (lambda w: (w,), lambda x: x)
  transposed = (lambda w: (w.T,), lambda x: x.T)
  tensors = [HFTensor('model.embed_tokens.weight', (V, D), (('embed', 'embedding'),), *same)]
  for i in range(config.num_layers):
    pre, ours = f'model.layers.{i}.', f'layer_{i}'
    attn = lambda name, ours=ours: (ours, 'attn', name)
    mlp = lambda name, ours=ours: (ours, 'mlp', name)
    if arch == 'Phi3ForCausalLM':
      tensors += [
          HFTensor(pre + 'self_attn.qkv_proj.weight', ((N + 2 * K) * H, D),
                  (attn('q'), attn('k'), attn('v')),
                  lambda w: tuple(_split_heads(part, heads) for part, heads in
                                  zip(np.split(w, [N * H, (N + K) * H]), (N, K, K))),
                  lambda q, k, v: np.concatenate([_merge_heads(x) for x in (q, k, v)])),
          HFTensor(pre + 'mlp.gate_up_proj.weight', (2 * F, D), (mlp('gate'), mlp('up')),
                  lambda w: (w[:F].T, w[F:].T),
                  lambda gate, up: np.concatenate([gate.T, up.T])),
      ]
    else:
      for name, heads in (('q', N), ('k', K), ('v', K)):
        tensors.append(HFTensor(pre + f'self_attn.{name}_proj.weight', (heads * H, D),
                               (attn(name),), lambda w, heads=heads: (_split_heads(w, heads),),
                               _merge_heads))
      for name in ('gate', 'up'):
        tensors.append(HFTensor(pre + f'mlp.{name}_proj.weight', (F, D), (mlp(name),),
                               *transposed))
    tensors += [
        HFTensor(pre + 'self_attn.o_proj.weight', (D, N * H), (attn('o'),),
                lambda w: (w.T.reshape(N, H, D),), lambda x: x.reshape(N * H, D).T),
        HFTensor(pre + 'mlp.down_proj.weight', (D, F), (mlp('down'),), *transposed),
        HFTensor(pre + 'input_layernorm.weight', (D,), ((ours, 'attn_norm', 'scale'),), *same),
        HFTensor(pre + 'post_attention_layernorm.weight', (D,), ((ours, 'mlp_norm', 'scale'),),
                *same),
    ]
  tensors.append(HFTensor('model.norm.weight', (D,), (('final_norm', 'scale'),), *same))
  if not config.tie_embeddings:
    tensors.append(HFTensor('lm_head.weight', (V, D), (('lm_head',),), *transposed))
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


def _index_tensors(path: pathlib.Path, tensors: list[HFTensor]) -> dict[str, _TensorInfo]:
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
  tensors = tensor_layout(config, architecture(hf_config))
  infos = _index_tensors(path, tensors)
  dtype = _NUMPY_DTYPES[config.param_dtype]
  sharding_for = _sharding_lookup(sharding)
  by_file: dict[pathlib.Path, list[HFTensor]] = {}
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
  try:  # the architecture before any weight: another model's tensors have other names
    architecture(hf_config)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
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

