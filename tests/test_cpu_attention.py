"""The fused CPU flash-attention kernel against the dense reference: outputs and gradients."""

import functools
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attention_lib
from longrope_jax import cpu_attention
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib

EMPTY = attention_lib.EMPTY_POSITION


@pytest.fixture(scope='module')
def kernel():
  """Skips a test when the kernel cannot be built here (no compiler, not a CPU backend)."""
  if not cpu_attention.available():
    pytest.skip(f'flash_cpu kernel unavailable: {cpu_attention.unavailable_reason()}')


def _inputs(seed, B, T, S, N, K, H):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)))


def _arange(B, T, S):
  """Queries are the last T of S keys."""
  k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  return k_pos[:, S - T:], k_pos


def _out_and_grads(fn, q, k, v, q_pos, k_pos, dout, **kwargs):
  def loss(q, k, v):
    out = fn(q, k, v, q_pos, k_pos, **kwargs)
    return jnp.sum(out * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_matches_dense(q, k, v, q_pos, k_pos, dout, window=None, tiles=None,
                          backward_tiles=None):
  want, want_grads = _out_and_grads(attention_lib.dense_attention, q, k, v, q_pos, k_pos, dout,
                                    window=window)
  got, got_grads = _out_and_grads(cpu_attention.flash_cpu_attention, q, k, v, q_pos, k_pos, dout,
                                  window=window, tiles=tiles,
                                  backward_tiles=backward_tiles or tiles)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for name, g, w in zip('qkv', got_grads, want_grads):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g, w, atol=1e-5 * max(scale, 1.0), rtol=0, err_msg=f'd{name}')


@pytest.mark.parametrize('N,K', [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize('tiles', [(8, 16), None])
def test_matches_dense_gqa_and_ragged_tiles(kernel, N, K, tiles):
  B, T, S, H = 2, 45, 53, 16  # neither length a multiple of any tile
  q, k, v, dout = _inputs(0, B, T, S, N, K, H)
  _assert_matches_dense(q, k, v, *_arange(B, T, S), dout, tiles=tiles,
                        backward_tiles=tiles and tiles[::-1])


@pytest.mark.parametrize('H', [8, 24, 80, 128])
def test_matches_dense_any_head_dim(kernel, H):
  """Head dims below, between and above the kernel's 16-float vectors and 64-column strips."""
  B, T = 1, 37
  q, k, v, dout = _inputs(9, B, T, T, 4, 2, H)
  _assert_matches_dense(q, k, v, *_arange(B, T, T), dout, window=20, tiles=(8, 32))


@pytest.mark.parametrize('window', [1, 7, 30])
def test_matches_dense_sliding_window(kernel, window):
  B, T, H = 1, 61, 16
  q, k, v, dout = _inputs(1, B, T, T, 4, 2, H)
  _assert_matches_dense(q, k, v, *_arange(B, T, T), dout, window=window, tiles=(8, 16))


def test_matches_dense_kv_cache_with_empty_slots(kernel):
  """A cache of S slots of which the first 20 hold keys; queries at 17..21 (the last two see no
  new slot but all earlier keys); empty slots must stay invisible even to a window."""
  B, T, S, H = 2, 5, 40, 16
  q, k, v, dout = _inputs(2, B, T, S, 4, 2, H)
  k_pos = jnp.where(jnp.arange(S) < 20, jnp.arange(S), EMPTY).astype(jnp.int32)
  k_pos = jnp.broadcast_to(k_pos, (B, S))
  q_pos = jnp.broadcast_to(jnp.arange(17, 17 + T, dtype=jnp.int32), (B, T))
  for window in (None, 6):
    _assert_matches_dense(q, k, v, q_pos, k_pos, dout, window=window, tiles=(4, 8))


def test_matches_dense_ring_offset_and_shuffled_positions(kernel):
  """Global positions with an offset (a ring shard) and keys in a shuffled order."""
  B, T, S, H = 2, 24, 48, 16
  q, k, v, dout = _inputs(3, B, T, S, 4, 1, H)
  rng = np.random.default_rng(3)
  q_pos = jnp.asarray(np.stack([np.arange(100, 100 + T), rng.permutation(T) + 80]), jnp.int32)
  k_pos = jnp.asarray(np.stack([np.arange(76, 76 + S), rng.permutation(S) + 60]), jnp.int32)
  _assert_matches_dense(q, k, v, q_pos, k_pos, dout, tiles=(8, 8))
  _assert_matches_dense(q, k, v, q_pos, k_pos, dout, window=9, tiles=(8, 8))


def test_rows_with_no_visible_key_give_zeros(kernel):
  B, T, S, H = 1, 12, 16, 16
  q, k, v, dout = _inputs(4, B, T, S, 2, 1, H)
  q_pos = jnp.arange(T, dtype=jnp.int32)[None]
  k_pos = jnp.arange(6, 6 + S, dtype=jnp.int32)[None]  # queries 0..5 see nothing
  out = cpu_attention.flash_cpu_attention(q, k, v, q_pos, k_pos, tiles=(4, 8))
  assert float(jnp.abs(out[:, :6]).max()) == 0.0
  assert float(jnp.abs(out[:, 6:]).min()) > 0.0
  _assert_matches_dense(q, k, v, q_pos, k_pos, dout, tiles=(4, 8))


def test_vmap_folds_into_the_batch(kernel):
  """vmap over candidates (as the population fitness does), forward and gradients."""
  P, B, T, H = 3, 2, 33, 16
  q, k, v, dout = _inputs(5, P * B, T, T, 4, 2, H)
  q, k, v, dout = (x.reshape(P, B, *x.shape[1:]) for x in (q, k, v, dout))
  q_pos, k_pos = _arange(B, T, T)

  def loss(fn, q, k, v, dout):
    return jnp.sum(fn(q, k, v, q_pos, k_pos, window=11) * dout)

  def per_candidate(fn):
    return jax.jit(jax.vmap(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2))))

  (want, want_grads) = per_candidate(attention_lib.dense_attention)(q, k, v, dout)
  (got, got_grads) = per_candidate(cpu_attention.flash_cpu_attention)(q, k, v, dout)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))), rtol=0)


def test_bfloat16_inputs_are_upcast(kernel):
  B, T, H = 1, 20, 16
  q, k, v, _ = _inputs(6, B, T, T, 2, 1, H)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  pos = _arange(B, T, T)
  got = cpu_attention.flash_cpu_attention(q, k, v, *pos)
  want = attention_lib.dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), *pos)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2)


@pytest.fixture(scope='module')
def model_setup():
  config = model_lib.get_config('test')
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)  # random weights without Flax's eager init (slow op by op)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 40)))
  rope = rope_lib.longrope(factors=np.linspace(1, 3, config.head_dim // 2), n_hat=4, scale=3.0,
                          original_length=config.original_length)
  return config, params, tokens, rope


@pytest.mark.parametrize('window', [None, 9])
def test_model_logits_and_grads_match_dense(kernel, model_setup, window):
  config, params, tokens, rope = model_setup
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

  def loss_and_logits(attention):
    cfg = config.replace(attention=attention, sliding_window=window)

    def loss(params):
      logits = model_lib.forward(cfg, params, tokens, positions, rope)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, want), want_grads = loss_and_logits('dense')
  (_, got), got_grads = loss_and_logits('flash_cpu')
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5 * max(float(jnp.max(jnp.abs(w))), 1e-3), rtol=0)


def test_model_kv_cache_decode_matches_full_forward(kernel, model_setup):
  config, params, tokens, rope = model_setup
  config = config.replace(attention='flash_cpu')
  B, T, P = tokens.shape[0], 12, 8
  tokens = tokens[:, :T]
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  full = model_lib.forward(config.replace(attention='dense'), params, tokens, positions, rope)
  step = jax.jit(functools.partial(model_lib.forward_with_cache, config))
  logits, cache = step(params, tokens[:, :P], positions[:, :P], rope,
                       model_lib.init_cache(config, B, T))
  steps = [logits]
  for t in range(P, T):
    logits, cache = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], rope, cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


def test_unavailable_kernel_warns_once_and_falls_back(monkeypatch):
  B, T, H = 1, 19, 16
  q, k, v, _ = _inputs(7, B, T, T, 4, 2, H)
  pos = _arange(B, T, T)
  monkeypatch.setattr(cpu_attention, 'available', lambda: False)
  monkeypatch.setitem(cpu_attention._state, 'warned', False)
  with pytest.warns(UserWarning, match='blockwise'):
    got = cpu_attention.flash_cpu_attention(q, k, v, *pos, window=5)
  want = attention_lib.blockwise_attention(q, k, v, *pos, window=5)
  np.testing.assert_array_equal(got, want)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    cpu_attention.flash_cpu_attention(q, k, v, *pos, window=5)  # no second warning


def test_bad_window_is_a_clear_error(kernel):
  q, k, v, _ = _inputs(8, 1, 4, 4, 2, 1, 16)
  with pytest.raises(ValueError, match='window'):
    cpu_attention.flash_cpu_attention(q, k, v, *_arange(1, 4, 4), window=0)


def test_compile_says_so_once_and_not_on_a_cache_hit(monkeypatch, tmp_path, capsys):
  """One console line when the kernel really compiles; none when the build is cached. (The
  compiler is faked: `_compile` writes the library, `--version` asks the Python executable.)"""
  compiled = []

  def fake_compile(compiler, output, source=cpu_attention.SOURCE):
    compiled.append(output)
    pathlib.Path(output).write_bytes(b'library')

  monkeypatch.setenv('LONGROPE_JAX_CACHE', str(tmp_path))
  monkeypatch.setattr(cpu_attention, '_compile', fake_compile)
  first = cpu_attention._build(sys.executable)
  out = capsys.readouterr()
  assert out.out == '' and out.err == cpu_attention.COMPILE_MESSAGE + '\n'
  assert 'compiling the CPU attention kernel' in out.err
  assert first.read_bytes() == b'library' and len(compiled) == 1
  assert cpu_attention._build(sys.executable) == first  # cached: no compile, nothing printed
  out = capsys.readouterr()
  assert out.out == out.err == '' and len(compiled) == 1


def test_import_without_fcntl_reports_the_kernel_unavailable():
  """Where `fcntl` does not exist (not POSIX), the package imports and the kernel says why it
  is unavailable; flash_cpu then runs blockwise attention (with its warning)."""
  code = ("import sys; sys.modules['fcntl'] = None\n"
          "import warnings, jax.numpy as jnp\n"
          "from longrope_jax import cpu_attention, model\n"
          "print(cpu_attention.available(), cpu_attention.unavailable_reason())\n"
          "x = jnp.ones((1, 4, 2, 8)); pos = jnp.arange(4)[None]\n"
          "with warnings.catch_warnings(record=True) as caught:\n"
          "  warnings.simplefilter('always')\n"
          "  model.attend(x, x[:, :, :1], x[:, :, :1], pos, pos, impl='flash_cpu')\n"
          "print(caught[0].message)\n")
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          check=True)
  available, message = result.stdout.splitlines()
  assert available.startswith('False no fcntl module (not a POSIX system)')
  assert 'using blockwise attention instead' in message and 'fcntl' in message
