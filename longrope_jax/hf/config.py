"""Hugging Face checkpoints' config.json: architecture, shape, and RoPE settings mapped onto ours.

RoPE settings (`rope_scaling`, or `rope_parameters` in transformers >= 5) map onto
`rope.RopeScaling` as transformers' `modeling_rope_utils` computes them at a given length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from longrope_jax import rope as rope_lib
from longrope_jax.model import ModelConfig

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.json'

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
                 'Phi3ForCausalLM': 'phi3'}
ROPE_TYPES = ('default', 'linear', 'dynamic', 'yarn', 'longrope', 'llama3')
# Phi3Config's default when config.json has no top-level original_max_position_embeddings.
PHI3_DEFAULT_ORIGINAL_LENGTH = 4096
# `sliding_window=KEEP` (the default of `load` and `model_config`): the window config.json sets.
KEEP = 'keep'

Path = str | os.PathLike


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
    supported = ', '.join(f'{a} (model_type {t!r})' for a, t in sorted(ARCHITECTURES.items()))
    raise ValueError(
        f"Unsupported architecture {name!r} (model_type {hf_config.get('model_type')!r}) in "
        f"{CONFIG_FILE}: longrope-jax reads Llama-family decoders (rotary positions, RMSNorm, "
        f"SwiGLU, weights named model.embed_tokens / model.layers.N...), supported: "
        f"{supported}; point model.path at such a checkpoint.")
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

