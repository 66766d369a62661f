"""A Llama / Mistral-style decoder in Flax linen whose RoPE scaling is a call argument.

Shapes: B batch, T length (queries), S cache length (keys), N query heads, K kv heads,
G = N // K, H head dim, D model dim, F MLP hidden dim, V vocab, L layers, M = B * T rows.

`rope` (a `rope.RopeScaling` pytree) and `positions` are inputs, never attributes, so one
compiled forward serves every scaling method and every search candidate at a given shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from longrope_jax import attention as attention_lib
from longrope_jax import ring_attention as ring_lib
from longrope_jax.rope import RopeScaling, apply_rope

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# name -> fn(q, k, v, q_pos, k_pos, *, window, block_q, block_k) -> out[B, T, N, H]
# ring: T split over the 'seq' axis of the current mesh (`jax.set_mesh`);
# fused: jax.nn.dot_product_attention (cuDNN on a GPU).
ATTENTION: dict[str, Callable[..., jax.Array]] = {
    'dense': attention_lib.dense_attention,
    'blockwise': attention_lib.blockwise_attention,
    'ring': ring_lib.ring_attention,
    'fused': attention_lib.fused_attention,
}
ATTENTION_IMPLS = tuple(ATTENTION)


def attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, impl: str = 'dense',
           window: int | None = None, block_q: int = 512, block_k: int = 512) -> jax.Array:
  """Causal GQA out[B, T, N, H] by the implementation registered as `impl` in ATTENTION."""
  if impl not in ATTENTION:
    raise ValueError(f"Unknown attention implementation {impl!r}; choose one of "
                     f"{sorted(ATTENTION)}.")
  return ATTENTION[impl](q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window=window,
                         block_q=block_q, block_k=block_k)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder. `original_length` is the original (pretraining) context window L0."""

  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  original_length: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  sliding_window: int | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'dense'
  block_q: int = 512
  block_k: int = 512

  def __post_init__(self):
    for name in ('vocab_size', 'dim', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                 'mlp_dim', 'original_length', 'block_q', 'block_k'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads}).")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"ModelConfig.sliding_window must be positive or None, got "
                       f"{self.sliding_window}.")
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {sorted(DTYPES)}, got "
                         f"{getattr(self, name)!r}.")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention!r}.")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    D, N, K, H, F, V = (self.dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim,
                        self.vocab_size)
    layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F + 2 * D
    return self.num_layers * layer + V * D * (1 if self.tie_embeddings else 2) + D


VARIANTS: dict[str, ModelConfig] = {
    # The embedded default: a byte-level model trained here on the standard library's source.
    # Sized for a 2-core CPU: about 0.8M parameters, compute-optimal for ~10 minutes of training.
    'demo': ModelConfig(vocab_size=258, dim=128, num_layers=4, num_heads=2, num_kv_heads=1,
                        head_dim=64, mlp_dim=384, original_length=256, tie_embeddings=True),
    # A few seconds to train; for tests.
    'test': ModelConfig(vocab_size=258, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=128, original_length=64, tie_embeddings=True),
    # LLaMA-2-7B (Touvron et al., 2023): 4k window.
    'llama2_7b': ModelConfig(vocab_size=32000, dim=4096, num_layers=32, num_heads=32,
                             num_kv_heads=32, head_dim=128, mlp_dim=11008, original_length=4096,
                             norm_eps=1e-5, dtype='bfloat16', param_dtype='bfloat16',
                             attention='blockwise'),
    # Mistral-7B v0.1 (Jiang et al., 2023): GQA, 4k sliding window over an 8k window.
    'mistral_7b': ModelConfig(vocab_size=32000, dim=4096, num_layers=32, num_heads=32,
                              num_kv_heads=8, head_dim=128, mlp_dim=14336, original_length=8192,
                              norm_eps=1e-5, sliding_window=4096, dtype='bfloat16',
                              param_dtype='bfloat16', attention='blockwise'),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A named variant, with fields overridden (validated again)."""
  if name not in VARIANTS:
    raise ValueError(f"Unknown model variant {name!r}; choose one of {sorted(VARIANTS)}.")
  return VARIANTS[name].replace(**overrides)


# ----------------------------------------------------------------------------- modules
# Projections run as 2-D matmuls over M = B * T rows: XLA:CPU differentiates a SwiGLU block written
# so about 1.5x faster than with 3-D einsums, and the demo's train step ran 1.24x faster
# (bench/train_step.py).
def project(x_MD: jax.Array, w_DXY: jax.Array) -> jax.Array:
  """x[M, D] @ w[D, X, Y] -> [M, X * Y]."""
  return x_MD @ w_DXY.reshape(w_DXY.shape[0], -1)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE applied at explicit positions."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, rope: RopeScaling, cache: dict | None = None):
    c = self.config
    init = nn.initializers.normal(c.dim ** -0.5)
    wq_DNH = self.param('q', init, (c.dim, c.num_heads, c.head_dim), c.weight_dtype)
    wk_DKH = self.param('k', init, (c.dim, c.num_kv_heads, c.head_dim), c.weight_dtype)
    wv_DKH = self.param('v', init, (c.dim, c.num_kv_heads, c.head_dim), c.weight_dtype)
    wo_NHD = self.param('o', nn.initializers.normal((c.num_heads * c.head_dim) ** -0.5 /
                                                    (2 * c.num_layers) ** 0.5),
                        (c.num_heads, c.head_dim, c.dim), c.weight_dtype)
    dt = c.compute_dtype
    B, T, D = x_BTD.shape
    x_MD = x_BTD.astype(dt).reshape(B * T, D)
    q_BTNH = project(x_MD, wq_DNH.astype(dt)).reshape(B, T, c.num_heads, c.head_dim)
    k_BTKH = project(x_MD, wk_DKH.astype(dt)).reshape(B, T, c.num_kv_heads, c.head_dim)
    v_BTKH = project(x_MD, wv_DKH.astype(dt)).reshape(B, T, c.num_kv_heads, c.head_dim)
    q_BTNH = apply_rope(q_BTNH, positions_BT, rope, theta=c.rope_theta)
    k_BTKH = apply_rope(k_BTKH, positions_BT, rope, theta=c.rope_theta)

    if cache is None:
      k_BSKH, v_BSKH, k_pos_BS = k_BTKH, v_BTKH, positions_BT
    else:
      cache = update_cache(cache, k_BTKH, v_BTKH, positions_BT)
      k_BSKH, v_BSKH, k_pos_BS = cache['k'], cache['v'], cache['pos']
    out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, positions_BT, k_pos_BS,
                      impl=c.attention if cache is None else 'dense', window=c.sliding_window,
                      block_q=c.block_q, block_k=c.block_k)
    out_MD = out_BTNH.reshape(B * T, -1) @ wo_NHD.astype(dt).reshape(-1, D)
    return out_MD.reshape(B, T, D), cache


class MLP(nn.Module):
  """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.config
    dt = c.compute_dtype
    init = nn.initializers.normal(c.dim ** -0.5)
    w_gate_DF = self.param('gate', init, (c.dim, c.mlp_dim), c.weight_dtype)
    w_up_DF = self.param('up', init, (c.dim, c.mlp_dim), c.weight_dtype)
    w_down_FD = self.param('down', nn.initializers.normal(c.mlp_dim ** -0.5 /
                                                          (2 * c.num_layers) ** 0.5),
                           (c.mlp_dim, c.dim), c.weight_dtype)
    B, T, D = x_BTD.shape
    x_MD = x_BTD.astype(dt).reshape(B * T, D)
    gate_MF = x_MD @ w_gate_DF.astype(dt)
    up_MF = x_MD @ w_up_DF.astype(dt)
    return ((nn.silu(gate_MF) * up_MF) @ w_down_FD.astype(dt)).reshape(B, T, D)


class DecoderLayer(nn.Module):
  """Pre-norm residual layer: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, rope, cache=None):
    c = self.config
    norm = lambda name: nn.RMSNorm(epsilon=c.norm_eps, dtype=jnp.float32,
                                   param_dtype=c.weight_dtype, name=name)
    attn_BTD, cache = Attention(c, name='attn')(norm('attn_norm')(x_BTD), positions_BT, rope,
                                                cache)
    x_BTD = x_BTD + attn_BTD.astype(x_BTD.dtype)
    x_BTD = x_BTD + MLP(c, name='mlp')(norm('mlp_norm')(x_BTD)).astype(x_BTD.dtype)
    return x_BTD, cache


class Decoder(nn.Module):
  """Token ids i32[B, T] at positions i32[B, T] -> logits f32[B, T, V] (and the updated cache)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, rope: RopeScaling, cache: list | None = None):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(c.dim ** -0.5),
                     param_dtype=c.weight_dtype, name='embed')
    x_BTD = embed(tokens_BT).astype(jnp.float32)
    new_cache = [] if cache is not None else None
    for i in range(c.num_layers):
      x_BTD, layer_cache = DecoderLayer(c, name=f'layer_{i}')(
          x_BTD, positions_BT, rope, None if cache is None else cache[i])
      if cache is not None:
        new_cache.append(layer_cache)
    x_BTD = nn.RMSNorm(epsilon=c.norm_eps, dtype=jnp.float32, param_dtype=c.weight_dtype,
                       name='final_norm')(x_BTD)
    if c.tie_embeddings:
      w_DV = embed.embedding.T
    else:
      w_DV = self.param('lm_head', nn.initializers.normal(c.dim ** -0.5), (c.dim, c.vocab_size),
                        c.weight_dtype)
    B, T, D = x_BTD.shape
    logits_MV = x_BTD.astype(c.compute_dtype).reshape(B * T, D) @ w_DV.astype(c.compute_dtype)
    return logits_MV.reshape(B, T, -1).astype(jnp.float32), new_cache


# ----------------------------------------------------------------------------- helpers
def init_params(config: ModelConfig, key: jax.Array) -> Any:
  """Random parameters for `config` (shapes only traced; nothing is run at full length)."""
  from longrope_jax import rope as rope_lib
  tokens = jnp.zeros((1, 8), jnp.int32)
  positions = jnp.arange(8, dtype=jnp.int32)[None]
  rope = rope_lib.none(head_dim=config.head_dim)
  init = jax.jit(lambda k: Decoder(config).init(k, tokens, positions, rope)['params'])
  return init(key)


def forward(config: ModelConfig, params, tokens_BT, positions_BT, rope: RopeScaling) -> jax.Array:
  """Logits f32[B, T, V] of a full forward pass (no cache)."""
  logits_BTV, _ = Decoder(config).apply({'params': params}, tokens_BT, positions_BT, rope)
  return logits_BTV


def token_nll(config: ModelConfig, params, tokens_BT, rope: RopeScaling,
              positions_BT: jax.Array | None = None) -> jax.Array:
  """Next-token negative log-likelihood f32[B, T - 1] (nats) of sequences tokens[B, T]."""
  B, T = tokens_BT.shape
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  logits_BTV = forward(config, params, tokens_BT[:, :-1], positions_BT[:, :-1], rope)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  return logz_BT - target_BT


# ----------------------------------------------------------------------------- KV cache
def init_cache(config: ModelConfig, batch: int, length: int) -> list[dict]:
  """An empty KV cache for `length` positions: per layer k, v [B, S, K, H], pos [B, S], end []."""
  dt = config.compute_dtype
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  return [dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
               pos=jnp.full((batch, length), attention_lib.EMPTY_POSITION, jnp.int32),
               end=jnp.zeros((), jnp.int32)) for _ in range(config.num_layers)]


def update_cache(cache: dict, k_BTKH, v_BTKH, positions_BT) -> dict:
  """Writes T new rotated keys, values and their positions at slot `end`."""
  end = cache['end']
  zero = jnp.zeros((), jnp.int32)
  return dict(
      k=jax.lax.dynamic_update_slice(cache['k'], k_BTKH.astype(cache['k'].dtype),
                                     (zero, end, zero, zero)),
      v=jax.lax.dynamic_update_slice(cache['v'], v_BTKH.astype(cache['v'].dtype),
                                     (zero, end, zero, zero)),
      pos=jax.lax.dynamic_update_slice(cache['pos'], positions_BT.astype(jnp.int32), (zero, end)),
      end=end + k_BTKH.shape[1])


def forward_with_cache(config: ModelConfig, params, tokens_BT, positions_BT, rope: RopeScaling,
                       cache: list[dict]):
  """Logits for T new tokens given a cache holding the previous ones; returns (logits, cache)."""
  return Decoder(config).apply({'params': params}, tokens_BT, positions_BT, rope, cache)
