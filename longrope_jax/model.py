"""A Llama / Mistral-style decoder in Flax linen whose RoPE scaling is a call argument.

Shapes: B batch, T length (queries), S cache length (keys), N query heads, K kv heads,
G = N // K, H head dim, D model dim, F MLP hidden dim, V vocab, L layers, M = B * T rows,
n chunks of the NLL.

`rope` (a `rope.RopeScaling` pytree) and `positions` are inputs, never attributes, so one
compiled forward serves every scaling method and every search candidate at a given shape.
`segment_ids` (optional, i32[B, T]) pack several documents into a row: a token attends only to
its own document, whose positions restart at 0 (so RoPE and n_hat are per document). They are
data too: one compiled forward serves every packing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import attention as attention_lib
from longrope_jax import attention_select
from longrope_jax import checks
from longrope_jax import chunked_attention
from longrope_jax import cpu_attention
from longrope_jax import gpu_attention
from longrope_jax import mesh as mesh_lib
from longrope_jax import pallas_attention
from longrope_jax import tpu_attention
from longrope_jax import ring_attention as ring_lib
from longrope_jax import rope as rope_lib
from longrope_jax.rope import RopeScaling

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# name -> fn(q, k, v, q_pos, k_pos, *, window, block_q, block_k, q_seg, k_seg) -> out[B, T, N, H]
# (the contract at the top of attention.py);
# ring: T split over the 'seq' axis of the current mesh (`jax.set_mesh`);
# fused: jax.nn.dot_product_attention (cuDNN on a GPU);
# flash_cpu: the fused C++ kernel of cpu_attention.py (XLA FFI custom call on the CPU);
# cudnn: cuDNN flash attention with is_causal for contiguous positions, else pallas_gpu;
# pallas_gpu: the Pallas (Triton) flash kernels of pallas_attention.py (interpreted off a GPU);
# splash: TPU splash attention for contiguous positions, else blockwise (interpreted off a TPU);
# auto: the fastest correct one for the backend, dtype and length (attention_select.py).
ATTENTION: dict[str, Callable[..., jax.Array]] = {
    'dense': attention_lib.dense_attention,
    'blockwise': attention_lib.blockwise_attention,
    'chunked': chunked_attention.chunked_attention,
    'ring': ring_lib.ring_attention,
    'fused': attention_lib.fused_attention,
    'flash_cpu': cpu_attention.flash_cpu_attention,
    'cudnn': gpu_attention.cudnn_attention,
    'pallas_gpu': pallas_attention.pallas_attention,
    'splash': tpu_attention.splash_attention,
    attention_select.AUTO: lambda *args, **kwargs: _auto_attention(*args, **kwargs),
}
ATTENTION_IMPLS = tuple(ATTENTION)
# name -> (why it cannot run here or None, the implementation that runs instead): the
# implementations that fall back by themselves where they cannot run.
FALLBACKS: dict[str, tuple[Callable[[], str | None], str]] = {
    'flash_cpu': (cpu_attention.unavailable_reason, 'blockwise'),
}
REMAT_NAMED = ('none', 'full')  # other values name a jax.checkpoint_policies policy
LAYERS = 'layers'  # params[LAYERS]: every layer's params stacked on a leading axis of size L


def attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, impl: str = 'dense',
           window: int | None = None, block_q: int | None = None, block_k: int | None = None,
           q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None) -> jax.Array:
  """Causal GQA out[B, T, N, H] by the implementation registered as `impl` in ATTENTION ('auto'
  resolved first, for this backend, dtype and length); block sizes left None are
  `attention.default_block(T, impl)`. Segment ids (both or neither) keep each query to keys of
  its own segment."""
  if impl not in ATTENTION:
    raise ValueError(f"Unknown attention implementation {impl!r}; choose one of "
                     f"{sorted(ATTENTION)}.")
  T = q_BTNH.shape[1]
  impl, _ = attention_select.resolve_attention(impl, backend=jax.default_backend(),
                                               dtype=q_BTNH.dtype, length=T)
  block_q = attention_lib.default_block(T, impl) if block_q is None else block_q
  block_k = attention_lib.default_block(T, impl) if block_k is None else block_k
  return ATTENTION[impl](q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window=window,
                         block_q=block_q, block_k=block_k, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS)


def _auto_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, **kwargs) -> jax.Array:
  """The implementation `attention_select.resolve_attention` picks for this backend, dtype and
  length (decided at trace time; `attend` resolves it before dispatch, this serves direct calls
  of ATTENTION['auto'])."""
  impl, _ = attention_select.resolve_attention(attention_select.AUTO,
                                               backend=jax.default_backend(),
                                               dtype=q_BTNH.dtype, length=q_BTNH.shape[1])
  return ATTENTION[impl](q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, **kwargs)


def attention_that_runs(impl: str, *, dtype: str = 'float32', length: int | None = None) -> dict:
  """What computes `impl`'s attention on this machine: {'requested': impl, 'ran': the
  implementation that runs, 'reason': why it differs (None when it does not)}. 'auto' resolves
  for the backend, `dtype` and query `length` (attention_select.resolve_attention); flash_cpu
  runs blockwise where its kernel cannot be built (`FALLBACKS`)."""
  if impl not in ATTENTION:
    raise ValueError(f"Unknown attention implementation {impl!r}; choose one of "
                     f"{sorted(ATTENTION)}.")
  ran, reason = impl, None
  if impl == attention_select.AUTO:
    ran, reason = attention_select.resolve_attention(
        impl, backend=jax.default_backend(), dtype=DTYPES.get(dtype, dtype), length=length or 0)
  unavailable, instead = FALLBACKS.get(ran, (lambda: None, ran))
  fallback = unavailable()
  if fallback is not None:
    ran, reason = instead, fallback
  return dict(requested=impl, ran=ran, reason=reason)


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
  # Query / key block (chunk) sizes of blockwise, chunked and ring attention; None: chosen per
  # length by measurement (attention.default_block).
  block_q: int | None = None
  block_k: int | None = None
  # Rematerialization of each layer in the backward pass: 'none', 'full' (save only the layer's
  # input), or the name of a jax.checkpoint_policies policy ('dots_with_no_batch_dims_saveable').
  remat: str = 'none'
  # token_nll computes logits for at most this many positions at once (no [B, T, V] array).
  nll_chunk: int = 2048
  # Layers per iteration of the layer scan (num_layers: straight-line code, params sliced
  # statically, no residual stacking in the backward). Compile time grows with it; 1 keeps one
  # compiled layer. The training step unrolls small models fully (train.UNROLL_MAX_LAYERS).
  scan_unroll: int = 1

  def __post_init__(self):
    for name in ('vocab_size', 'dim', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                 'mlp_dim', 'original_length', 'nll_chunk', 'scan_unroll'):
      checks.positive_int(getattr(self, name), f'ModelConfig.{name}')
    for name in ('block_q', 'block_k'):
      checks.optional(checks.positive_int)(getattr(self, name), f'ModelConfig.{name}')
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads}).")
    checks.optional(checks.positive_int)(self.sliding_window, 'ModelConfig.sliding_window')
    checks.positive_float(self.rope_theta, 'ModelConfig.rope_theta')
    checks.positive_float(self.norm_eps, 'ModelConfig.norm_eps')
    for name in ('dtype', 'param_dtype'):
      checks.choice(DTYPES)(getattr(self, name), f'ModelConfig.{name}')
    checks.choice(ATTENTION_IMPLS)(self.attention, 'ModelConfig.attention')
    if self.remat not in REMAT_NAMED and not hasattr(jax.checkpoint_policies, self.remat):
      raise ValueError(f"ModelConfig.remat must be 'none', 'full' or a jax.checkpoint_policies "
                       f"name (e.g. 'dots_with_no_batch_dims_saveable'), got {self.remat!r}.")

  @property
  def remat_policy(self) -> Callable | None:
    """The jax.checkpoint policy of `remat` (None: save nothing but the layer input)."""
    return None if self.remat in REMAT_NAMED else getattr(jax.checkpoint_policies, self.remat)

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
    # The demo's width with four heads of their own keys and values: it learns to copy (induction
    # heads) within a few thousand steps, where the demo's two query heads sharing one kv head
    # stayed at the bag-of-digits plateau (configs/demo.py:retrieval). L0 = 256 as the demo's: at
    # 128 a passkey prompt fills the window, so training never retrieves across filler.
    'retrieval': ModelConfig(vocab_size=258, dim=128, num_layers=4, num_heads=4, num_kv_heads=4,
                             head_dim=32, mlp_dim=384, original_length=256, tie_embeddings=True),
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
  """Grouped-query self-attention at explicit positions; queries and keys rotated by the table
  `rotary` = (cos, sin) f32[B, T, H] (rope.rope_cos_sin, built once per forward by Decoder).
  `segment_ids_BT`: each token attends only to its own segment (None: one document); not with a
  KV cache (decoding continues one document)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, rotary: tuple[jax.Array, jax.Array],
               cache: dict | None = None, segment_ids_BT: jax.Array | None = None):
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
    q_BTNH = rope_lib.rotate(q_BTNH, *rotary)
    k_BTKH = rope_lib.rotate(k_BTKH, *rotary)

    if cache is None:
      k_BSKH, v_BSKH, k_pos_BS = k_BTKH, v_BTKH, positions_BT
    else:
      cache = update_cache(cache, k_BTKH, v_BTKH, positions_BT)
      k_BSKH, v_BSKH, k_pos_BS = cache['k'], cache['v'], cache['pos']
    # With a cache, a prefill (T > 1) runs the model's attention over the whole cache (empty
    # slots sit at EMPTY_POSITION, never visible): dense would build [B, N, T, S] scores, 10 GB
    # for one 16K prompt of a 9-head model. One-token decoding steps (and ring) stay dense.
    prefill = cache is not None and T > 1 and c.attention != 'ring'
    out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, positions_BT, k_pos_BS,
                      impl=c.attention if cache is None or prefill else 'dense',
                      window=c.sliding_window, block_q=c.block_q, block_k=c.block_k,
                      q_seg_BT=segment_ids_BT, k_seg_BS=segment_ids_BT)
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
  """Pre-norm residual layer: x + attn(norm(x)), then x + mlp(norm(x)); on a mesh the residual
  stream keeps the batch over ('data', 'fsdp') and the length over 'seq'
  (mesh.constrain_activations), so FSDP gathers weights, not activations."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, rotary, cache=None, segment_ids_BT=None):
    c = self.config
    norm = lambda name: nn.RMSNorm(epsilon=c.norm_eps, dtype=jnp.float32,
                                   param_dtype=c.weight_dtype, name=name)
    x_BTD = mesh_lib.constrain_activations(x_BTD)
    attn_BTD, cache = Attention(c, name='attn')(norm('attn_norm')(x_BTD), positions_BT, rotary,
                                                cache, segment_ids_BT)
    x_BTD = mesh_lib.constrain_activations(x_BTD + attn_BTD.astype(x_BTD.dtype))
    x_BTD = x_BTD + MLP(c, name='mlp')(norm('mlp_norm')(x_BTD)).astype(x_BTD.dtype)
    return mesh_lib.constrain_activations(x_BTD), cache


def vary_like(x: jax.Array, *trees: Any) -> jax.Array:
  """x marked as varying over the manual mesh axes that any leaf of `trees` varies over
  (`lax.pcast`, no data moved); x itself outside `jax.shard_map`, where nothing varies (jit, one
  device, `jax.set_mesh`'s Auto axes) or when the shard_map does not check (check_vma=False).

  Inside a shard_map a layer's output varies over the axes its inputs vary over, and a scan carry
  must enter with the type it leaves with. The search is manual over 'pop' (candidates' rope
  varying) and leaves 'seq' Auto: ring attention's own shard_map splits the sequence over it and
  returns an array that varies over no more axes than its inputs.
  """
  varying = frozenset().union(*(jax.typeof(leaf).mat.varying for leaf in jax.tree.leaves(trees)))
  missing = tuple(sorted(varying - jax.typeof(x).mat.varying))
  return jax.lax.pcast(x, missing, to='varying') if missing else x


def _layer_class(config: ModelConfig) -> type[nn.Module]:
  """DecoderLayer, wrapped in nn.remat when `config.remat` asks for it."""
  if config.remat == 'none':
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=config.remat_policy, prevent_cse=False)


class Decoder(nn.Module):
  """Token ids i32[B, T] at positions i32[B, T] -> logits f32[B, T, V] (and the updated cache).

  Layers run as one `nn.scan` over params stacked on a leading axis (params['layers'], one
  compiled layer whatever the depth). `scan_layers=False` unrolls them with params 'layer_{i}'
  (the layout of `init_params`' random draw and of HF checkpoints; see stack_layers).
  `hidden=True` returns the final-norm hidden states f32[B, T, D] instead of logits.
  `rotary`: the (cos, sin) table of `positions` (rope.rope_cos_sin, f32[B or 1, T, H]) when the
  caller computed it in another jitted call (see train.make_train_step); built here otherwise.
  `segment_ids_BT`: packed documents (see the top of this file); None: one document per row.
  """

  config: ModelConfig
  scan_layers: bool = True

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, rope: RopeScaling, cache: dict | None = None,
               hidden: bool = False, rotary: tuple[jax.Array, jax.Array] | None = None,
               segment_ids_BT: jax.Array | None = None):
    c = self.config
    if cache is not None and segment_ids_BT is not None:
      raise ValueError("segment_ids_BT cannot be used with a KV cache (decoding continues one "
                       "document); pass segment_ids_BT=None.")
    embed = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(c.dim ** -0.5),
                     param_dtype=c.weight_dtype, name='embed')
    x_BTD = embed(tokens_BT).astype(jnp.float32)
    rope_lib.check_head_dim(c.head_dim, rope)
    if rotary is None:
      rotary = rope_lib.rope_cos_sin(positions_BT, rope, theta=c.rope_theta)
    layer = _layer_class(c)
    if self.scan_layers:
      # The scan carry enters with the type the layers' output leaves with.
      x_BTD = vary_like(x_BTD, self.variables.get('params'), positions_BT, rotary, rope, cache,
                        segment_ids_BT)
      layers = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True},
                       in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers,
                       unroll=min(c.scan_unroll, c.num_layers))
      x_BTD, cache = layers(c, name=LAYERS)(x_BTD, positions_BT, rotary, cache, segment_ids_BT)
    else:
      caches = []
      for i in range(c.num_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda x: x[i], cache)
        x_BTD, layer_cache = layer(c, name=f'layer_{i}')(x_BTD, positions_BT, rotary,
                                                         layer_cache, segment_ids_BT)
        caches.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *xs: jnp.stack(xs), *caches)
    x_BTD = nn.RMSNorm(epsilon=c.norm_eps, dtype=jnp.float32, param_dtype=c.weight_dtype,
                       name='final_norm')(x_BTD)
    if not c.tie_embeddings:
      self.param('lm_head', nn.initializers.normal(c.dim ** -0.5), (c.dim, c.vocab_size),
                 c.weight_dtype)
    if hidden:
      return x_BTD, cache
    B, T, D = x_BTD.shape
    return logits(c, self.variables['params'], x_BTD.reshape(B * T, D)).reshape(B, T, -1), cache


# ----------------------------------------------------------------------------- helpers
def init_params(config: ModelConfig, key: jax.Array) -> Any:
  """Random parameters for `config`, layers stacked (shapes only traced at length 8).

  Drawn in the unrolled layout and stacked, so a key gives the same weights as before scan.
  """
  tokens = jnp.zeros((1, 8), jnp.int32)
  positions = jnp.arange(8, dtype=jnp.int32)[None]
  rope = rope_lib.none(head_dim=config.head_dim)
  decoder = Decoder(config.replace(attention='dense'), scan_layers=False)  # no mesh needed
  init = jax.jit(lambda k: stack_layers(decoder.init(k, tokens, positions, rope)['params'],
                                        config.num_layers))
  return init(key)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled params {'layer_0': p0, ...} -> {'layers': stack of p_i on axis 0} (numpy or jax)."""
  names = [f'layer_{i}' for i in range(num_layers)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"params have no {missing[0]} (ModelConfig.num_layers = {num_layers}).")
  xnp = jnp if isinstance(jax.tree.leaves(params[names[0]])[0], jax.Array) else np
  out = {k: v for k, v in params.items() if k not in names}
  out[LAYERS] = jax.tree.map(lambda *xs: xnp.stack(xs), *[params[n] for n in names])
  return out


def unstack_layers(params: dict) -> dict:
  """Inverse of `stack_layers`: {'layers': stacked} -> {'layer_0': p0, ...}."""
  if LAYERS not in params:
    raise ValueError(f"params have no {LAYERS!r} entry (stacked layers).")
  num_layers = jax.tree.leaves(params[LAYERS])[0].shape[0]
  out = {k: v for k, v in params.items() if k != LAYERS}
  for i in range(num_layers):
    out[f'layer_{i}'] = jax.tree.map(lambda x: x[i], params[LAYERS])
  return out


def unembedding(config: ModelConfig, params) -> jax.Array:
  """The output projection w[D, V] (the embedding's transpose when tied)."""
  return params['embed']['embedding'].T if config.tie_embeddings else params['lm_head']


def logits(config: ModelConfig, params, x_MD: jax.Array) -> jax.Array:
  """Logits f32[M, V] of final hidden states x[M, D]."""
  dt = config.compute_dtype
  return (x_MD.astype(dt) @ unembedding(config, params).astype(dt)).astype(jnp.float32)


def forward(config: ModelConfig, params, tokens_BT, positions_BT, rope: RopeScaling,
            segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """Logits f32[B, T, V] of a full forward pass (no cache)."""
  logits_BTV, _ = Decoder(config).apply({'params': params}, tokens_BT, positions_BT, rope,
                                        segment_ids_BT=segment_ids_BT)
  return logits_BTV


def same_segment_targets(segment_ids_BT: jax.Array) -> jax.Array:
  """bool[B, T - 1]: target t + 1 is predicted from its own document (False where a packed row
  passes from one document to the next: a document's first token is not predicted)."""
  return segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]


def token_nll(config: ModelConfig, params, tokens_BT, rope: RopeScaling,
              positions_BT: jax.Array | None = None,
              rotary: tuple[jax.Array, jax.Array] | None = None,
              segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """Next-token negative log-likelihood f32[B, T - 1] (nats) of sequences tokens[B, T].

  Logits exist for at most `config.nll_chunk` positions at a time: beyond that the positions are
  split into strided chunks (chunk j: positions j, j + n, j + 2n, ...; a sequence split over the
  'seq' axis stays split) folded by a rematerialized scan, so no [B, T, V] array is built.
  `rotary`: the rotary table of the T positions, as Decoder takes it (optional).
  `segment_ids_BT`: packed documents (positions restart in each); the NLL of a document's first
  token (predicted from the previous document) is 0: average over `same_segment_targets`.
  """
  B, T = tokens_BT.shape
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  # Ring attention splits a sequence into 2 x seq blocks, so an even window of T tokens (as
  # evaluation uses) runs all T positions and drops the last prediction: causal, so the first
  # T - 1 are unchanged. Other attentions run the T - 1 positions that predict something.
  inputs = T if config.attention == 'ring' and T % 2 == 0 else T - 1
  if rotary is not None:
    rotary = tuple(table[:, :inputs] for table in rotary)
  segments = None if segment_ids_BT is None else segment_ids_BT[:, :inputs]
  x_BTD, _ = Decoder(config).apply({'params': params}, tokens_BT[:, :inputs],
                                   positions_BT[:, :inputs], rope, hidden=True, rotary=rotary,
                                   segment_ids_BT=segments)
  x_BTD = x_BTD[:, :T - 1]
  target_BT = tokens_BT[:, 1:]
  T, D = T - 1, x_BTD.shape[-1]

  def chunk_nll(x_MD, target_M):
    logits_MV = logits(config, params, x_MD)
    target_logit_M = jnp.take_along_axis(logits_MV, target_M[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits_MV, axis=-1) - target_logit_M

  keep = (lambda nll_BT: nll_BT) if segment_ids_BT is None else (
      lambda nll_BT: jnp.where(same_segment_targets(segment_ids_BT), nll_BT, 0.0))
  if T <= config.nll_chunk:
    return keep(chunk_nll(x_BTD.reshape(B * T, D), target_BT.reshape(-1)).reshape(B, T))
  n = -(-T // config.nll_chunk)  # number of chunks
  pad = -T % n
  x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
  target_BT = jnp.pad(target_BT, ((0, 0), (0, pad)))
  x_nMD = x_BTD.reshape(B, -1, n, D).transpose(2, 0, 1, 3).reshape(n, -1, D)
  target_nM = target_BT.reshape(B, -1, n).transpose(2, 0, 1).reshape(n, -1)
  body = jax.checkpoint(lambda _, xs: (None, chunk_nll(*xs)))
  _, nll_nM = jax.lax.scan(body, None, (x_nMD, target_nM))
  return keep(nll_nM.reshape(n, B, -1).transpose(1, 2, 0).reshape(B, -1)[:, :T])


def selected_nll(config: ModelConfig, params, tokens_BT, rope: RopeScaling,
                 index_BA: jax.Array) -> jax.Array:
  """Next-token NLL f32[B, A] (nats) of the tokens after positions index[B, A] of sequences
  tokens[B, T] (positions 0..T-1): one forward, logits for the A selected positions only, so no
  [B, T, V] array (the passkey answer's digits of a long prompt)."""
  B, T = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x_BTD, _ = Decoder(config).apply({'params': params}, tokens_BT, positions_BT, rope, hidden=True)
  x_BAD = jnp.take_along_axis(x_BTD, index_BA[..., None], axis=1)
  logits_BAV = logits(config, params, x_BAD.reshape(-1, x_BAD.shape[-1])).reshape(
      *index_BA.shape, -1)
  target_BA = jnp.take_along_axis(tokens_BT, index_BA + 1, axis=1)
  target_logit_BA = jnp.take_along_axis(logits_BAV, target_BA[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BAV, axis=-1) - target_logit_BA


# ----------------------------------------------------------------------------- KV cache
def init_cache(config: ModelConfig, batch: int, length: int) -> dict:
  """An empty KV cache for `length` positions, layers stacked: k, v [L, B, S, K, H],
  pos [L, B, S], end [L]."""
  dt, L = config.compute_dtype, config.num_layers
  shape = (L, batch, length, config.num_kv_heads, config.head_dim)
  return dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
              pos=jnp.full((L, batch, length), attention_lib.EMPTY_POSITION, jnp.int32),
              end=jnp.zeros((L,), jnp.int32))


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
                       cache: dict, hidden: bool = False):
  """Logits for T new tokens given a cache holding the previous ones; returns (logits, cache).
  `hidden`: the final hidden states f32[B, T, D] instead (`logits` of the rows needed)."""
  return Decoder(config).apply({'params': params}, tokens_BT, positions_BT, rope, cache,
                               hidden=hidden)
