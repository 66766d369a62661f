"""LongRoPE factors out to Hugging Face: config.json for our models, safetensors weights, and
the `rope_scaling` block transformers reads, in a folder that loads on its own."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax.hf.config import (ARCHITECTURES, CONFIG_FILE, KEEP, Path, architecture,
                                    head_dim, read_config, rope_parameters)
from longrope_jax.hf.weights import INDEX_FILE, WEIGHTS_FILE, tensor_layout
from longrope_jax.model import ModelConfig


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
  for t in tensor_layout(config, architecture(out_config)):
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
                   head_dim: int | None = None, attention_factor: float | None = None,
                   short_mscale: float | None = None, long_mscale: float | None = None) -> dict:
  """An HF `rope_scaling` block for LongRoPE factors (validated: >= 1, one per frequency).

  `short_mscale` / `long_mscale` (written when given) are the attention factors of the short and
  long factors that vLLM's longrope reads (its get_rope passes them to its Phi-3 LongRoPE
  rotary embedding, for any architecture); transformers ignores them (it warns of unrecognized
  keys) and applies `attention_factor` to both.
  """
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
  for key, value in (('attention_factor', attention_factor), ('short_mscale', short_mscale),
                     ('long_mscale', long_mscale)):
    if value is not None:
      if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}.")
      block[key] = float(value)
  return block


def export_rope_scaling(config_dir_in: Path, out_dir: Path, short_factor: Iterable[float],
                        long_factor: Iterable[float], original_max_position_embeddings: int,
                        max_position_embeddings: int, *, attention_factor: float | None = None,
                        short_mscale: float | None = None, long_mscale: float | None = None,
                        others: str = 'link') -> pathlib.Path:
  """Writes config_dir_in's config.json into out_dir with a LongRoPE `rope_scaling` block.

  The block ({rope_type, type: 'longrope', short_factor, long_factor,
  original_max_position_embeddings, factor, and attention_factor, short_mscale, long_mscale when
  given: `longrope_block`) is written as `rope_scaling` (read first by
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
                         attention_factor=attention_factor, short_mscale=short_mscale,
                         long_mscale=long_mscale)
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
                    params: dict | None = None, config: ModelConfig | None = None,
                    plain_short: bool = False) -> pathlib.Path:
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

  Within L0 the default export is not the original model: transformers' longrope has one
  attention factor for short and long factors, so sequences up to L0 get attn_scale too (on
  SmolLM2-135M at 8K = L0, perplexity 1.5% above the original's; `hf.relative_difference`
  measures it). `plain_short` (short factors 1 only) also writes short_mscale = 1 and
  long_mscale = attn_scale, the per-side factors vLLM's longrope reads (it ignores
  attention_factor and derives both from max/original when they are absent): there the
  model runs plain RoPE, the original, up to L0 and the searched scaling beyond. transformers
  ignores the two keys (logging "Unrecognized keys") and still applies attention_factor at every
  length, so its numbers do not change.
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
  if plain_short and np.any(short_factor != 1.0):
    raise ValueError("plain_short keeps plain RoPE up to L0, so it needs short factors 1: export "
                     "without `short` (the search's result), or without plain_short (short "
                     "factors are searched under the long attention factor).")
  mscales = dict(short_mscale=1.0, long_mscale=attn_scale) if plain_short else {}
  longrope_block(short_factor, long['factors'], original, target,  # validates before writing
                 head_dim=head_dim(hf_config), attention_factor=attn_scale, **mscales)
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
                             attention_factor=attn_scale, others='none', **mscales)
