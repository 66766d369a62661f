"""Model: config validation, one compile for every scaling method, KV-cache decode == forward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib

CFG = model_lib.get_config('test')


@pytest.fixture(scope='module')
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


def _tokens(B, T, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)


def test_variants_validate():
  for name, cfg in model_lib.VARIANTS.items():
    assert cfg.num_heads % cfg.num_kv_heads == 0, name
  assert model_lib.VARIANTS['llama2_7b'].num_params() == pytest.approx(6.74e9, rel=0.01)
  assert model_lib.VARIANTS['mistral_7b'].num_params() == pytest.approx(7.24e9, rel=0.01)


@pytest.mark.parametrize('field,value,match', [
    ('num_kv_heads', 3, 'num_kv_heads'), ('head_dim', 15, 'head_dim'), ('dim', 0, 'dim'),
    ('dtype', 'float16', 'dtype'), ('attention', 'flash', 'attention'),
    ('sliding_window', 0, 'sliding_window')])
def test_config_errors_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    CFG.replace(**{field: value})
  with pytest.raises(ValueError, match='Unknown model variant'):
    model_lib.get_config('llama9')


def test_one_compile_serves_every_method(params):
  T = 32
  tokens, positions = _tokens(2, T), jnp.broadcast_to(jnp.arange(T), (2, T))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(rope):
    return model_lib.forward(CFG, params, tokens, positions, rope)

  outs = []
  for name in rope_lib.METHODS:
    if name == 'longrope':
      r = rope_lib.longrope(factors=np.linspace(1, 4, CFG.head_dim // 2), n_hat=4, scale=4.0,
                            original_length=CFG.original_length)
    else:
      r = rope_lib.get(name, **rope_lib.method_kwargs(head_dim=CFG.head_dim, theta=CFG.rope_theta,
                                                      original_length=CFG.original_length, length=4 * T))
    outs.append(fwd(r))
  chex.clear_trace_counter()
  assert all(np.all(np.isfinite(o)) for o in outs)
  # Methods differ, so their logits must too (the scaling is really used).
  assert not np.allclose(outs[0], outs[1])


def test_vmap_over_population_equals_loop(params):
  tokens = _tokens(1, 24)
  pop = [rope_lib.linear(head_dim=CFG.head_dim, scale=s) for s in (1.0, 2.0, 3.0)]
  stacked = rope_lib.stack(pop)
  nll = jax.vmap(lambda r: model_lib.token_nll(CFG, params, tokens, r))(stacked)
  for i, r in enumerate(pop):
    np.testing.assert_allclose(nll[i], model_lib.token_nll(CFG, params, tokens, r), atol=1e-5)


@pytest.mark.parametrize('check_vma', [True, False])
def test_scanned_layers_inside_a_shard_map_whose_positions_vary(params, check_vma):
  """Inside a shard_map over 'pop' with the tokens, rope and params replicated and the positions
  split (an offset per device), the layers' output varies over 'pop' while their input does
  not: the scan carry enters with the output's type (model.vary_like). Equal to each alone."""
  from jax.sharding import PartitionSpec
  from longrope_jax import mesh as mesh_lib
  T = 16
  tokens = _tokens(1, T)
  rope = rope_lib.linear(head_dim=CFG.head_dim, scale=2.0)
  positions = jnp.stack([jnp.arange(T), jnp.arange(T) + 40])[:, None]  # [2, 1, T]

  def hidden(positions_1BT):
    x_BTD, _ = model_lib.Decoder(CFG).apply({'params': params}, tokens, positions_1BT[0], rope,
                                            hidden=True)
    return x_BTD[None]

  pop = PartitionSpec(mesh_lib.POP_AXIS)
  split = jax.jit(jax.shard_map(hidden, mesh=mesh_lib.make_mesh(pop=2), in_specs=pop,
                                out_specs=pop, check_vma=check_vma))(positions)
  alone = jax.jit(hidden)
  for i in range(2):
    np.testing.assert_allclose(split[i], alone(positions[i:i + 1])[0], atol=1e-6, rtol=0)


def test_positions_shift_invariance_with_vanilla_rope(params):
  # With n_hat = 0, RoPE attention depends only on relative positions: a global shift of the
  # positions leaves logits unchanged.
  T = 16
  tokens = _tokens(1, T)
  r = rope_lib.linear(head_dim=CFG.head_dim, scale=2.0)
  pos = jnp.arange(T)[None]
  a = model_lib.forward(CFG, params, tokens, pos, r)
  b = model_lib.forward(CFG, params, tokens, pos + 37, r)
  np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize('window', [None, 5])
@pytest.mark.parametrize('attention', ['dense', 'blockwise'])
def test_kv_cache_decode_equals_full_forward(params, window, attention):
  """The prefill runs the model's attention over the whole cache (empty slots at
  EMPTY_POSITION), the one-token steps dense attention."""
  cfg = CFG.replace(sliding_window=window, attention=attention, block_q=4, block_k=4)
  B, T, P = 2, 20, 8
  tokens = _tokens(B, T, seed=3)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  r = rope_lib.longrope(factors=np.linspace(1, 3, cfg.head_dim // 2), n_hat=4, scale=3.0,
                        original_length=cfg.original_length)
  full = model_lib.forward(cfg, params, tokens, positions, r)
  cache = model_lib.init_cache(cfg, B, T)
  logits, cache = model_lib.forward_with_cache(cfg, params, tokens[:, :P], positions[:, :P], r,
                                               cache)
  steps = [logits]
  for t in range(P, T):
    logits, cache = model_lib.forward_with_cache(cfg, params, tokens[:, t:t + 1],
                                                 positions[:, t:t + 1], r, cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)
  assert cache['end'].tolist() == [T] * cfg.num_layers


def test_bfloat16_compute_is_close_to_float32(params):
  tokens = _tokens(1, 16)
  pos = jnp.arange(16)[None]
  r = rope_lib.none(head_dim=CFG.head_dim)
  f32 = model_lib.forward(CFG, params, tokens, pos, r)
  bf16 = model_lib.forward(CFG.replace(dtype='bfloat16'), params, tokens, pos, r)
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.1


def test_untied_head_has_its_own_weights():
  cfg = CFG.replace(tie_embeddings=False)
  p = model_lib.init_params(cfg, jax.random.key(1))
  assert p['lm_head'].shape == (cfg.dim, cfg.vocab_size)
  n = sum(x.size for x in jax.tree.leaves(p))
  assert n == cfg.num_params()


# ----------------------------------------------------------------------------- lean model
def test_scan_equals_unrolled_layers(params):
  """One scanned layer gives the unrolled decoder's logits (the params' layer axis stacked)."""
  tokens, pos = _tokens(2, 24, seed=5), jnp.broadcast_to(jnp.arange(24), (2, 24))
  r = rope_lib.yarn(head_dim=CFG.head_dim, scale=4.0, theta=CFG.rope_theta,
                    original_length=CFG.original_length)
  scanned = model_lib.forward(CFG, params, tokens, pos, r)
  unrolled, _ = model_lib.Decoder(CFG, scan_layers=False).apply(
      {'params': model_lib.unstack_layers(params)}, tokens, pos, r)
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)  # f32 rounding
  assert jax.tree.leaves(params['layers'])[0].shape[0] == CFG.num_layers
  assert not any(k.startswith('layer_') for k in params)


def test_stack_unstack_round_trip(params):
  again = model_lib.stack_layers(model_lib.unstack_layers(params), CFG.num_layers)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  with pytest.raises(ValueError, match='no layer_2'):
    model_lib.stack_layers(model_lib.unstack_layers(params), 3)


@pytest.mark.parametrize('chunk', [1, 5, 7, 64])
def test_chunked_nll_equals_full_logits(params, chunk):
  """token_nll in strided chunks equals the NLL of the full [B, T, V] logits, values and grads."""
  tokens = _tokens(2, 30, seed=7)
  r = rope_lib.none(head_dim=CFG.head_dim)
  cfg = CFG.replace(nll_chunk=chunk)

  def reference(p):
    logits = model_lib.forward(CFG, p, tokens[:, :-1], jnp.arange(29)[None], r)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]

  np.testing.assert_allclose(model_lib.token_nll(cfg, params, tokens, r), reference(params),
                             atol=1e-5, rtol=1e-6)
  g = jax.grad(lambda p: model_lib.token_nll(cfg, p, tokens, r).mean())(params)
  g_ref = jax.grad(lambda p: reference(p).mean())(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g, g_ref)


@pytest.mark.parametrize('remat', ['full', 'dots_with_no_batch_dims_saveable', 'nothing_saveable'])
def test_remat_keeps_loss_and_gradients(params, remat):
  tokens = _tokens(2, 17, seed=9)
  r = rope_lib.none(head_dim=CFG.head_dim)
  loss = lambda cfg: jax.value_and_grad(
      lambda p: model_lib.token_nll(cfg, p, tokens, r).mean())(params)
  (l0, g0), (l1, g1) = loss(CFG), loss(CFG.replace(remat=remat))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)


def test_remat_policy_is_validated():
  with pytest.raises(ValueError, match='ModelConfig.remat'):
    CFG.replace(remat='some_policy')
  assert CFG.replace(remat='full').remat_policy is None
  assert CFG.replace(remat='nothing_saveable').remat_policy is \
      jax.checkpoint_policies.nothing_saveable
