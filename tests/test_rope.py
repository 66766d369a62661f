"""RoPE scaling math, tested three ways: golden values from the published formulas, a frozen
plain-numpy reference kept here, and properties. Float32 results are held to 1e-6 or to the
float32 rounding bound of the computation (u = 2**-24 per rounding), whichever is tighter.
"""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import rope as rope_lib

U = 2.0 ** -24  # unit roundoff of float32

# The golden setting: small enough to derive every number by hand.
HEAD_DIM, THETA, L0, S = 8, 1e4, 256, 4.0
# theta = 2**16 with head_dim 8 gives inverse frequencies 1, 2**-4, 2**-8, 2**-12, so with
# power-of-two factors every angle n * inv_freq / lambda is exact in float32.
EXACT_THETA = 2.0 ** 16
B, T, N = 2, 16, 2
# One compiled apply_rope for the many-case tests (eager calls stay in the golden tests).
apply_rope = jax.jit(rope_lib.apply_rope, static_argnames='theta')


def reference_rope(x, positions, factors, n_hat, attn_scale, theta):
  """Frozen plain-numpy rotate-half RoPE (Su et al., 2021; HF / GPT-NeoX layout) with LongRoPE's
  factors and n_hat (Ding et al., 2024, eq. 3): angle_i(n) = n * theta**(-2i/H) / lambda_i for
  n >= n_hat and n * theta**(-2i/H) below; cos and sin are multiplied by attn_scale.

  The angle is rounded to float32 in HF's order (inv_freq, / lambda, * n) so the comparison can be
  1e-6 at any position; everything after the angle is float64. `test_angles_*` checks the angle.
  """
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  inv_freq = (1.0 / theta ** (np.arange(half) * 2.0 / x.shape[-1])).astype(np.float32)
  n = np.asarray(positions)[..., None]
  freq = np.where(n < n_hat, inv_freq, inv_freq / np.asarray(factors, np.float32))
  angle = (n.astype(np.float32) * freq).astype(np.float64)[:, :, None, :]
  cos, sin = np.cos(angle) * attn_scale, np.sin(angle) * attn_scale
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def scores(q_BTNH, k_BTNH):
  """q.k logits [B, N, T, T] in float64."""
  q, k = np.asarray(q_BTNH, np.float64), np.asarray(k_BTNH, np.float64)
  return np.einsum('bqnh,bknh->bnqk', q, k)


def assert_scores_close(got, want, q_BTNH, k_BTNH, tol=1e-6):
  """|got - want| <= tol * |q||k|: a logit's float32 error scales with |q||k|, not its value."""
  q_BTN, k_BTN = np.linalg.norm(q_BTNH, axis=-1), np.linalg.norm(k_BTNH, axis=-1)
  norms = np.einsum('bqn,bkn->bnqk', q_BTN, k_BTN)
  excess = np.abs(got - want) / (tol * norms)
  assert np.all(excess <= 1.0), f'logit error {excess.max():.2f} x {tol} |q||k|'


def random_x(seed, head_dim=HEAD_DIM, scale=1.0):
  return scale * np.random.default_rng(seed).standard_normal((B, T, N, head_dim)).astype(np.float32)


def every_method(head_dim=HEAD_DIM, theta=THETA, original_length=L0, length=int(S * L0)):
  """One RopeScaling per registered method at the same head_dim (LongRoPE with n_hat = 4)."""
  kwargs = rope_lib.method_kwargs(head_dim=head_dim, theta=theta, original_length=original_length,
                                  length=length)
  factors = np.linspace(1.0, 1.25 * kwargs['scale'], head_dim // 2)
  ropes = {name: rope_lib.get(name, **kwargs) for name in rope_lib.METHODS if name != 'longrope'}
  ropes['longrope'] = rope_lib.get('longrope', factors=factors, n_hat=4, **kwargs)
  return ropes


# ----------------------------------------------------------------------------- golden values
def test_inverse_frequencies_golden():
  np.testing.assert_allclose(rope_lib.inv_frequencies(8, 1e4), [1.0, 0.1, 0.01, 0.001], rtol=1e-15)
  np.testing.assert_array_equal(rope_lib.inv_frequencies(8, EXACT_THETA),
                                [1.0, 2**-4, 2**-8, 2**-12])


def test_linear_golden():
  rope = rope_lib.linear(head_dim=HEAD_DIM, scale=S)
  np.testing.assert_array_equal(rope.factors, [4.0, 4.0, 4.0, 4.0])
  assert int(rope.n_hat) == 0 and float(rope.attn_scale) == 1.0


def test_ntk_golden():
  # lambda_i = s ** (2i / (d - 2)) = 4 ** (i / 3)  (bloc97: base' = base * s ** (d / (d - 2))).
  rope = rope_lib.ntk(head_dim=HEAD_DIM, scale=S)
  np.testing.assert_allclose(rope.factors, [1.0, 4 ** (1 / 3), 4 ** (2 / 3), 4.0], rtol=U, atol=0)
  # Equivalently the base grows to theta * s ** (d / (d - 2)): same inverse frequencies.
  new_base = THETA * S ** (8 / 6)
  np.testing.assert_allclose(rope_lib.inv_frequencies(8, THETA) / np.float64(rope.factors),
                             rope_lib.inv_frequencies(8, new_base), rtol=2 * U)
  assert float(rope.attn_scale) == 1.0


def test_dynamic_ntk_golden():
  # HF / emozilla: s_eff = f * max(L, L0) / L0 - (f - 1).
  assert rope_lib.dynamic_scale(1024, 256) == 4.0
  assert rope_lib.dynamic_scale(1024, 256, 2.0) == 7.0
  assert rope_lib.dynamic_scale(100, 256) == 1.0 and rope_lib.dynamic_scale(100, 256, 2.0) == 1.0
  assert rope_lib.dynamic_scale(256, 256, 3.0) == 1.0
  rope = rope_lib.dynamic_ntk(head_dim=HEAD_DIM, length=1024, original_length=L0)
  np.testing.assert_array_equal(rope.factors, rope_lib.ntk(head_dim=HEAD_DIM, scale=4.0).factors)
  rope = rope_lib.dynamic_ntk(head_dim=HEAD_DIM, length=1024, original_length=L0,
                              dynamic_factor=2.0)
  np.testing.assert_allclose(rope.factors, [1.0, 7 ** (1 / 3), 7 ** (2 / 3), 7.0], rtol=U, atol=0)


def test_dynamic_ntk_through_method_kwargs_uses_the_length():
  # Regression: method_kwargs passes scale = L' / L, which must not become HF's dynamic factor
  # (that gave s_eff = s**2 - s + 1 = 57 at 8x instead of 8).
  kwargs = rope_lib.method_kwargs(head_dim=HEAD_DIM, theta=THETA, original_length=L0, length=8 * L0)
  np.testing.assert_array_equal(rope_lib.get('dynamic_ntk', **kwargs).factors,
                                rope_lib.ntk(head_dim=HEAD_DIM, scale=8.0).factors)


def test_yarn_golden():
  # Correction dim for r rotations (YaRN reference code, as HF): d ln(L0 / (2 pi r)) / (2 ln theta)
  # = log10(256 / (2 pi r)) here; r = 32 -> 0.105 -> floor 0, r = 1 -> 1.610 -> ceil 2; the ramp
  # is linear in the index between them.
  ramp = rope_lib.yarn_ramp(HEAD_DIM, THETA, L0, beta_fast=32, beta_slow=1)
  np.testing.assert_array_equal(ramp, [0.0, 0.5, 1.0, 1.0])
  # inv_freq' = inv_freq * (ramp / s + 1 - ramp): lambda = 1, 1 / (1/8 + 1/2) = 1.6, 4, 4.
  rope = rope_lib.yarn(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=L0)
  np.testing.assert_allclose(rope.factors, [1.0, 1.6, 4.0, 4.0], rtol=U, atol=0)
  # sqrt(1 / t) = 0.1 ln s + 1 (YaRN eq. 22), applied to cos and sin.
  np.testing.assert_allclose(float(rope.attn_scale), 0.1 * math.log(4.0) + 1.0, rtol=U)
  assert rope_lib.yarn_attention_scale(4.0) == 0.1 * math.log(4.0) + 1.0
  assert rope_lib.yarn_attention_scale(1.0) == 1.0
  # Without truncation the ramp runs between the raw correction dims.
  low, high = math.log10(256 / (2 * math.pi * 32)), math.log10(256 / (2 * math.pi))
  np.testing.assert_allclose(rope_lib.yarn_ramp(HEAD_DIM, THETA, L0, 32, 1, truncate=False),
                             np.clip((np.arange(4) - low) / (high - low), 0, 1), rtol=1e-12)


def test_llama3_golden():
  # Wavelengths 2 pi / inv_freq = 6.28, 62.8, 628, 6283. With L0 = 256 (low 1, high 4): < 64 kept,
  # > 256 divided by s, nothing in between.
  rope = rope_lib.llama3(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=L0)
  np.testing.assert_array_equal(rope.factors, [1.0, 1.0, 4.0, 4.0])
  assert float(rope.attn_scale) == 1.0
  # With L0 = 2048 the third wavelength (628) is between 512 and 2048: smooth = (L0/wl - 1) / 3 and
  # inv_freq' = (1 - smooth) inv_freq / s + smooth inv_freq.
  rope = rope_lib.llama3(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=2048)
  smooth = (2048 / (200 * math.pi) - 1) / 3
  np.testing.assert_allclose(rope.factors, [1.0, 1.0, 1 / ((1 - smooth) / 4 + smooth), 4.0],
                             rtol=U, atol=0)


def test_longrope_golden():
  # sqrt(1 + ln s / ln L0) = sqrt(1 + ln 4 / ln 256) = sqrt(1.25).
  rope = rope_lib.longrope(factors=[1.0, 1.5, 2.0, 5.0], n_hat=4, scale=S, original_length=L0)
  np.testing.assert_allclose(float(rope.attn_scale), math.sqrt(1.25), rtol=U)
  assert rope_lib.longrope_attention_scale(S, L0) == math.sqrt(1 + math.log(4) / math.log(256))
  assert rope_lib.longrope_attention_scale(1.0, L0) == 1.0
  np.testing.assert_array_equal(rope.factors, [1.0, 1.5, 2.0, 5.0])
  assert int(rope.n_hat) == 4
  explicit = rope_lib.longrope(factors=[1.0, 1.5, 2.0, 5.0], attn_scale=1.5)
  assert float(explicit.attn_scale) == 1.5


def test_critical_dimension_golden():
  # Wavelength 2 pi theta ** (2i / d) first exceeds L0 = 256 at i = 2 (628 > 256 > 62.8).
  assert rope_lib.critical_dimension(HEAD_DIM, THETA, L0) == 2
  assert rope_lib.critical_dimension(HEAD_DIM, THETA, 10 ** 6) == 4
  # Ten turns: the period first exceeds 25.6 at i = 1 (62.8 > 25.6 > 6.28).
  assert rope_lib.critical_dimension(HEAD_DIM, THETA, L0, periods=10) == 1


@pytest.mark.parametrize('head_dim, theta, original_length, d_tcd, d10_tcd', [
    (96, 1e4, 2048, 31, 19),     # Phi3-mini (LongRoPE2 sec. 2.1: "62, the 31st cosine dimension")
    (128, 5e5, 8192, 35, 24),    # LLaMA3-8B (sec. 3.2: d_tcd 35)
    (64, 1e4, 256, 13, 5),       # the demo model
    (32, 1e4, 256, 7, 3),        # the retrieval model
])
def test_theoretical_critical_dimensions_golden(head_dim, theta, original_length, d_tcd, d10_tcd):
  # LongRoPE2 eq. 7 (halved to a pair index) and Algorithm 1 line 2, by hand:
  # ceil((d / 2) log_theta(L0 / (2 pi periods))).
  for periods, want in ((1, d_tcd), (10, d10_tcd)):
    by_hand = math.ceil(head_dim / 2 * math.log(original_length / (2 * math.pi * periods))
                        / math.log(theta))
    assert by_hand == want
    assert rope_lib.critical_dimension(head_dim, theta, original_length, periods=periods) == want
  # The real critical dimensions the paper found lie in its search range [d10_tcd, d_tcd].
  assert d10_tcd <= {96: 25, 128: 30}.get(head_dim, d10_tcd) <= d_tcd


def test_ntk_rcd_golden():
  # lambda_i = s ** (i / rcd); d_tcd = 2 here, so the default is 4 ** (i / 2).
  rope = rope_lib.ntk_rcd(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=L0)
  np.testing.assert_array_equal(rope.factors, [1.0, 2.0, 4.0, 8.0])
  assert float(rope.attn_scale) == 1.0 and int(rope.n_hat) == 0
  rope = rope_lib.ntk_rcd(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=L0, rcd=3)
  np.testing.assert_allclose(rope.factors, [1.0, 4 ** (1 / 3), 4 ** (2 / 3), 4.0], rtol=U, atol=0)
  # It is NTK with the base theta * s ** (d / (2 rcd)): here 1e4 * 4 ** (8 / 6).
  np.testing.assert_allclose(rope_lib.inv_frequencies(8, THETA) / np.float64(rope.factors),
                             rope_lib.inv_frequencies(8, THETA * S ** (8 / 6)), rtol=2 * U)
  # A searched d_rcd reaches it through the registry like any option.
  kwargs = rope_lib.method_kwargs(head_dim=HEAD_DIM, theta=THETA, original_length=L0,
                                  length=int(S * L0))
  np.testing.assert_array_equal(rope_lib.get('ntk_rcd', rcd=1, **kwargs).factors,
                                [1.0, 4.0, 16.0, 64.0])


def test_yarn_rcd_golden():
  # YaRN's low boundary is floor(log10(256 / (2 pi 32))) = floor(0.105) = 0; the ramp now ends at
  # rcd: rcd = 3 gives ramp (0, 1/3, 2/3, 1) and lambda = 1 / (ramp / 4 + 1 - ramp)
  # = 1, 1 / (1/12 + 2/3) = 4/3, 1 / (1/6 + 1/3) = 2, 4.
  rope = rope_lib.yarn_rcd(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=L0, rcd=3)
  np.testing.assert_allclose(rope.factors, [1.0, 4 / 3, 2.0, 4.0], rtol=U, atol=0)
  np.testing.assert_allclose(float(rope.attn_scale), 0.1 * math.log(4.0) + 1.0, rtol=U)
  rope = rope_lib.yarn_rcd(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=L0, rcd=1)
  np.testing.assert_array_equal(rope.factors, [1.0, 4.0, 4.0, 4.0])
  # The default rcd is d_tcd = 2 = ceil(YaRN's beta_slow = 1 correction dim): YaRN itself.
  rope = rope_lib.yarn_rcd(head_dim=HEAD_DIM, scale=S, theta=THETA, original_length=L0)
  np.testing.assert_allclose(rope.factors, [1.0, 1.6, 4.0, 4.0], rtol=U, atol=0)


def _rcd_numpy(kind, head_dim, theta, original_length, scale, rcd, beta_fast=32.0):
  """LongRoPE2's NTK-rcd / YaRN-rcd factors in plain numpy, from the formulas."""
  i = np.arange(head_dim // 2)
  if kind == 'ntk_rcd':
    return scale ** (i / rcd)
  low = max(math.floor(head_dim * math.log(original_length / (beta_fast * 2 * math.pi))
                       / (2 * math.log(theta))), 0)
  ramp = np.clip((i - low) / (rcd - low), 0, 1)
  return 1 / (ramp / scale + 1 - ramp)


@pytest.mark.parametrize('kind', ['ntk_rcd', 'yarn_rcd'])
@pytest.mark.parametrize('head_dim, theta, original_length', [
    (32, 1e4, 256), (64, 1e4, 256), (96, 1e4, 2048), (128, 5e5, 8192)])
@pytest.mark.parametrize('scale', [2.0, 16.0, 64.0])
def test_rcd_methods_follow_their_formula_and_properties(kind, head_dim, theta, original_length,
                                                         scale):
  d_tcd = rope_lib.critical_dimension(head_dim, theta, original_length)
  d10 = rope_lib.critical_dimension(head_dim, theta, original_length, periods=10)
  default = rope_lib.get(kind, head_dim=head_dim, theta=theta, original_length=original_length,
                         scale=scale)
  for rcd in range(d10, d_tcd + 1):
    rope = rope_lib.get(kind, head_dim=head_dim, theta=theta, original_length=original_length,
                        scale=scale, rcd=rcd)
    factors = np.asarray(rope.factors, np.float64)
    want = _rcd_numpy(kind, head_dim, theta, original_length, scale, rcd)
    np.testing.assert_allclose(factors, want.astype(np.float32), rtol=U, atol=0)
    assert factors[0] == 1.0 and np.all(factors >= 1.0) and np.all(np.diff(factors) >= 0)
    np.testing.assert_allclose(factors[rcd], scale, rtol=U)  # the OOD bound at d_rcd (eq. 10)
    assert np.all(factors[:rcd] < scale)
    if kind == 'yarn_rcd':  # PI from d_rcd on
      np.testing.assert_allclose(factors[rcd:], scale, rtol=U)
    else:  # NTK keeps growing past it
      assert np.all(np.diff(factors[rcd:]) > 0)
    if rcd == d_tcd:
      np.testing.assert_array_equal(rope.factors, default.factors)
  if kind == 'yarn_rcd':  # the default (d_tcd) is YaRN itself
    yarn = rope_lib.yarn(head_dim=head_dim, theta=theta, original_length=original_length,
                         scale=scale)
    np.testing.assert_array_equal(default.factors, yarn.factors)
    assert float(default.attn_scale) == float(yarn.attn_scale)


def test_apply_rope_golden():
  # head_dim 4, theta 100: inv_freq = (1, 0.1). PI with s = 2 at position 2 gives angles (1, 0.1);
  # x = (x1 | x2) = (1, 2 | 3, 4) rotates to (x1 cos - x2 sin | x2 cos + x1 sin).
  x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  pos = jnp.asarray([[2]])
  out = rope_lib.apply_rope(x, pos, rope_lib.linear(head_dim=4, scale=2.0), theta=100.0)
  c1, s1, c2, s2 = math.cos(1), math.sin(1), math.cos(0.1), math.sin(0.1)
  want = [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2]
  np.testing.assert_allclose(np.ravel(out), want, rtol=1e-6, atol=1e-6)
  # n_hat = 3 > 2 keeps the original angles (2, 0.2) at position 2; attn_scale multiplies all.
  rope = rope_lib.make([2.0, 2.0], n_hat=3, attn_scale=1.5)
  out = rope_lib.apply_rope(x, pos, rope, theta=100.0)
  c1, s1, c2, s2 = math.cos(2), math.sin(2), math.cos(0.2), math.sin(0.2)
  want = [1.5 * v for v in (1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2)]
  np.testing.assert_allclose(np.ravel(out), want, rtol=1e-6, atol=1e-6)


def test_make_dtypes_and_registry():
  rope = rope_lib.make([1, 2, 3, 4], n_hat=2, attn_scale=1.25, head_dim=8)
  assert rope.factors.dtype == jnp.float32 and rope.factors.shape == (4,)
  assert rope.n_hat.dtype == jnp.int32 and rope.n_hat.shape == ()
  assert rope.attn_scale.dtype == jnp.float32 and rope.attn_scale.shape == ()
  assert rope.num_freqs == 4
  assert set(rope_lib.METHODS) == {
      'none', 'linear', 'ntk', 'dynamic_ntk', 'yarn', 'llama3', 'longrope', 'ntk_rcd', 'yarn_rcd'}
  assert rope_lib.N_HAT_CHOICES == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
  for name, rope in every_method().items():
    assert rope.factors.shape == (HEAD_DIM // 2,), name
    assert np.all(np.asarray(rope.factors) >= 1.0), name


# ----------------------------------------------------------------------------- frozen reference
@pytest.mark.parametrize('theta', [THETA, 5e5])
def test_apply_rope_matches_reference(theta):
  rng = np.random.default_rng(0)
  x = random_x(1)
  # Positions that are not arange: shuffled, with gaps, and a zigzag-like second row.
  positions = np.stack([rng.permutation(64)[:T] * 3 + 5,
                        np.concatenate([np.arange(8), np.arange(4000, 4008)])]).astype(np.int32)
  cases = [
      rope_lib.make(np.linspace(1.0, 5.0, 4), n_hat=0),
      rope_lib.make(np.linspace(1.0, 5.0, 4), n_hat=20, attn_scale=1.2),
      rope_lib.make([1.0, 1.3, 2.7, 4.4], n_hat=4000),
      rope_lib.make([1.0, 1.0, 1.0, 1.0], n_hat=0),
  ] + list(every_method(theta=theta).values())
  for rope in cases:
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), rope, theta=theta)
    want = reference_rope(x, positions, np.asarray(rope.factors), int(rope.n_hat),
                          float(rope.attn_scale), theta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_apply_rope_keeps_dtype_and_vanilla_reference_in_bfloat16():
  x = random_x(2)
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  out = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions),
                   rope_lib.none(head_dim=HEAD_DIM), theta=THETA)
  assert out.dtype == jnp.bfloat16
  want = reference_rope(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), positions,
                        np.ones(4), 0, 1.0, THETA)
  # Computed in float32, rounded once to bfloat16 (relative 2**-9).
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2 ** -8, atol=1e-6)


def test_angles_match_float64_within_float32_rounding():
  # angle = n * fl(fl(inv_freq) / fl(lambda)): four float32 roundings, so |error| <= 4u |angle|.
  positions = np.asarray([[0, 1, 7, 255, 4096, 65535, 131071]], np.int32)
  factors = np.asarray([1.0, 1.37, 3.3, 41.7])
  angles = rope_lib.rope_angles(jnp.asarray(positions), rope_lib.make(factors), theta=THETA)
  exact = positions[..., None] * (rope_lib.inv_frequencies(HEAD_DIM, THETA) / factors)
  np.testing.assert_allclose(np.asarray(angles, np.float64), exact, rtol=4 * U, atol=0)


def test_n_hat_keeps_original_angles_below_it():
  positions = jnp.arange(8)[None]
  angles = rope_lib.rope_angles(positions, rope_lib.make([4.0] * 4, n_hat=3), theta=THETA)
  vanilla = rope_lib.rope_angles(positions, rope_lib.none(head_dim=HEAD_DIM), theta=THETA)
  pi = rope_lib.rope_angles(positions, rope_lib.linear(head_dim=HEAD_DIM, scale=4.0), theta=THETA)
  np.testing.assert_array_equal(angles[0, :3], vanilla[0, :3])
  np.testing.assert_array_equal(angles[0, 3:], pi[0, 3:])


# ----------------------------------------------------------------------------- properties
def test_factor_one_is_vanilla_rope():
  x = random_x(3)
  positions = jnp.tile(jnp.arange(T, dtype=jnp.int32) * 37, (B, 1))
  vanilla = apply_rope(x, positions, rope_lib.none(head_dim=HEAD_DIM), theta=THETA)
  np.testing.assert_allclose(np.asarray(vanilla),
                             reference_rope(x, positions, np.ones(4), 0, 1.0, THETA),
                             rtol=1e-6, atol=1e-6)
  kwargs = dict(head_dim=HEAD_DIM, theta=THETA, original_length=L0, scale=1.0)
  at_scale_one = [
      rope_lib.get('linear', **kwargs), rope_lib.get('ntk', **kwargs),
      rope_lib.get('yarn', **kwargs), rope_lib.get('llama3', **kwargs),
      rope_lib.get('dynamic_ntk', length=L0 // 2, **kwargs),
      rope_lib.get('longrope', factors=np.ones(4), n_hat=8, **kwargs),
      rope_lib.make(np.ones(4), n_hat=5)]
  for rope in at_scale_one:
    np.testing.assert_array_equal(rope.factors, np.ones(4))
    assert float(rope.attn_scale) == 1.0
    np.testing.assert_array_equal(apply_rope(x, positions, rope, theta=THETA), vanilla)


def test_yarn_at_scale_one_is_vanilla():
  for beta_fast, beta_slow in [(32, 1), (16, 2)]:
    rope = rope_lib.yarn(head_dim=64, scale=1.0, theta=5e5, original_length=8192,
                         beta_fast=beta_fast, beta_slow=beta_slow)
    np.testing.assert_array_equal(rope.factors, np.ones(32))
    assert float(rope.attn_scale) == 1.0


@pytest.mark.parametrize('n_hat', [0, 3])
def test_scores_depend_only_on_relative_offset_exact_angles(n_hat):
  # Power-of-two factors and theta = 2**16: angles are exact, so 1e-6 is the cos/sin/dot rounding.
  q, k = random_x(4, scale=0.5), random_x(5, scale=0.5)
  base = np.tile(np.arange(T, dtype=np.int32), (B, 1)) + n_hat
  for factors in ([1.0, 1.0, 1.0, 1.0], [4.0] * 4, [1.0, 2.0, 4.0, 8.0]):
    rope = rope_lib.make(factors, n_hat=n_hat)
    got = []
    for shift in (0, 5, 1000):
      pos = jnp.asarray(base + shift)
      got.append(scores(apply_rope(q, pos, rope, theta=EXACT_THETA),
                        apply_rope(k, pos, rope, theta=EXACT_THETA)))
    for other in got[1:]:
      assert_scores_close(other, got[0], q, k)


@pytest.mark.parametrize('name', ['ntk', 'yarn', 'llama3', 'longrope', 'ntk_rcd', 'yarn_rcd'])
def test_scores_depend_only_on_relative_offset(name):
  # Generic theta: each angle carries float32 error <= 4u * angle <= 4u * max_position (inv_freq and
  # 1 / lambda are <= 1), so a logit moves by at most |q||k| (8u * max_position + 16u).
  q, k = random_x(6), random_x(7)
  rope = every_method()[name]
  base = np.tile(np.arange(T, dtype=np.int32), (B, 1)) + int(rope.n_hat)
  reference = scores(apply_rope(q, jnp.asarray(base), rope, theta=THETA),
                     apply_rope(k, jnp.asarray(base), rope, theta=THETA))
  for shift in (7, 300):
    pos = jnp.asarray(base + shift)
    got = scores(apply_rope(q, pos, rope, theta=THETA), apply_rope(k, pos, rope, theta=THETA))
    assert_scores_close(got, reference, q, k, tol=8 * U * (base.max() + shift) + 16 * U)


def test_uniform_longrope_is_position_interpolation():
  x = random_x(8)
  positions = jnp.tile(jnp.arange(T, dtype=jnp.int32) * 11, (B, 1))
  pi = rope_lib.linear(head_dim=HEAD_DIM, scale=S)
  uniform = rope_lib.longrope(factors=np.full(4, S), scale=S, original_length=L0)
  np.testing.assert_array_equal(uniform.factors, pi.factors)
  np.testing.assert_array_equal(rope_lib.rope_angles(positions, uniform, theta=THETA),
                                rope_lib.rope_angles(positions, pi, theta=THETA))
  # Same angles; the attention scale differs unless passed.
  assert float(uniform.attn_scale) != float(pi.attn_scale)
  np.testing.assert_allclose(
      apply_rope(x, positions, uniform, theta=THETA),
      float(uniform.attn_scale) * apply_rope(x, positions, pi, theta=THETA),
      rtol=1e-6, atol=1e-6)
  same = rope_lib.longrope(factors=np.full(4, S), attn_scale=1.0)
  np.testing.assert_array_equal(apply_rope(x, positions, same, theta=THETA),
                                apply_rope(x, positions, pi, theta=THETA))


def test_attn_scale_multiplies_scores_by_its_square():
  q, k = random_x(9), random_x(10)
  positions = jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1))
  plain = rope_lib.make([1.0, 1.5, 3.0, 4.0], n_hat=2)
  scaled = rope_lib.make([1.0, 1.5, 3.0, 4.0], n_hat=2, attn_scale=1.3)
  want = 1.3 ** 2 * scores(apply_rope(q, positions, plain, theta=THETA),
                           apply_rope(k, positions, plain, theta=THETA))
  got = scores(apply_rope(q, positions, scaled, theta=THETA),
               apply_rope(k, positions, scaled, theta=THETA))
  assert_scores_close(got, want, q, k)


# ----------------------------------------------------------------------------- jit and vmap
def test_one_compiled_apply_rope_serves_every_method():
  x, positions = random_x(11), jnp.tile(jnp.arange(T, dtype=jnp.int32) * 5, (B, 1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def rotate(x, positions, rope):
    return rope_lib.apply_rope(x, positions, rope, theta=THETA)

  ropes = every_method()
  ropes['longrope_other'] = rope_lib.make(np.linspace(1.0, 6.0, 4), n_hat=16, attn_scale=1.7)
  for name, rope in ropes.items():
    np.testing.assert_allclose(rotate(x, positions, rope),
                               rope_lib.apply_rope(x, positions, rope, theta=THETA),
                               rtol=1e-6, atol=1e-6, err_msg=name)


def test_vmap_over_stacked_methods_equals_each():
  x, positions = random_x(12), jnp.tile(jnp.arange(T, dtype=jnp.int32) * 3, (B, 1))
  ropes = list(every_method().values())
  stacked = rope_lib.stack(ropes)
  assert stacked.factors.shape == (len(ropes), HEAD_DIM // 2)
  assert stacked.n_hat.shape == (len(ropes),)
  rotate_all = jax.jit(jax.vmap(lambda r: rope_lib.apply_rope(x, positions, r, theta=THETA)))
  out_PBTNH = rotate_all(stacked)
  for i, rope in enumerate(ropes):
    np.testing.assert_allclose(out_PBTNH[i], apply_rope(x, positions, rope, theta=THETA),
                               rtol=1e-6, atol=1e-6)
  for back, rope in zip(rope_lib.unstack(stacked), ropes):
    jax.tree.map(np.testing.assert_array_equal, back, rope)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize('build, field', [
    (lambda: rope_lib.make([1.0, 0.9, 2.0, 3.0]), 'factors'),
    (lambda: rope_lib.make([1.0, np.nan, 2.0, 3.0]), 'factors'),
    (lambda: rope_lib.make([[1.0, 2.0]]), 'factors'),
    (lambda: rope_lib.make([1.0, 2.0, 3.0], head_dim=8), 'head_dim'),
    (lambda: rope_lib.longrope(factors=[1.0] * 3, head_dim=8, attn_scale=1.0), 'head_dim'),
    (lambda: rope_lib.make([1.0] * 4, n_hat=-1), 'n_hat'),
    (lambda: rope_lib.make([1.0] * 4, n_hat=1.5), 'n_hat'),
    (lambda: rope_lib.make([1.0] * 4, attn_scale=0.0), 'attn_scale'),
    (lambda: rope_lib.linear(head_dim=8, scale=0.5), 'scale'),
    (lambda: rope_lib.linear(head_dim=7, scale=2.0), 'head_dim'),
    (lambda: rope_lib.none(head_dim=0), 'head_dim'),
    (lambda: rope_lib.ntk(head_dim=8, scale=0.99), 'scale'),
    (lambda: rope_lib.ntk(head_dim=2, scale=2.0), 'head_dim'),
    (lambda: rope_lib.yarn(head_dim=8, scale=0.5, theta=1e4, original_length=256), 'scale'),
    (lambda: rope_lib.yarn(head_dim=8, scale=2.0, theta=1.0, original_length=256), 'theta'),
    (lambda: rope_lib.yarn(head_dim=8, scale=2.0, theta=1e4, original_length=0), 'original_length'),
    (lambda: rope_lib.llama3(head_dim=8, scale=0.5, theta=1e4, original_length=256), 'scale'),
    (lambda: rope_lib.llama3(head_dim=8, scale=2.0, theta=1e4, original_length=256,
                             low_freq_factor=4.0, high_freq_factor=1.0), 'low_freq_factor'),
    (lambda: rope_lib.longrope(factors=[1.0] * 4, scale=0.5, original_length=256), 'scale'),
    (lambda: rope_lib.longrope(factors=[1.0] * 4, scale=2.0, original_length=1), 'original_length'),
    (lambda: rope_lib.longrope(factors=[1.0] * 4), 'attn_scale'),
    (lambda: rope_lib.dynamic_ntk(head_dim=8, length=512, original_length=256,
                                  dynamic_factor=0.5), 'dynamic_factor'),
    (lambda: rope_lib.dynamic_ntk(head_dim=8, length=0, original_length=256), 'length'),
    (lambda: rope_lib.ntk_rcd(head_dim=8, scale=2.0, theta=1e4, original_length=256, rcd=0),
     'rcd'),
    (lambda: rope_lib.ntk_rcd(head_dim=8, scale=2.0, theta=1e4, original_length=256, rcd=5),
     'rcd'),
    (lambda: rope_lib.ntk_rcd(head_dim=8, scale=2.0, theta=1e4, original_length=256, rcd=2.5),
     'rcd'),
    (lambda: rope_lib.ntk_rcd(head_dim=8, scale=0.5, theta=1e4, original_length=256), 'scale'),
    (lambda: rope_lib.ntk_rcd(head_dim=8, scale=2.0, theta=1e4, original_length=4), 'rcd'),
    (lambda: rope_lib.yarn_rcd(head_dim=8, scale=2.0, theta=1.0, original_length=256), 'theta'),
    # LLaMA3's YaRN keeps pairs up to floor(18.1) = 18 unscaled: rcd 10 lies below.
    (lambda: rope_lib.yarn_rcd(head_dim=128, scale=16.0, theta=5e5, original_length=8192,
                               rcd=10), 'rcd'),
    (lambda: rope_lib.yarn_rcd(head_dim=8, scale=2.0, theta=1e4, original_length=256,
                               beta_fast=0.0), 'beta_fast'),
    (lambda: rope_lib.critical_dimension(8, 1e4, 256, periods=0), 'periods'),
    (lambda: rope_lib.get('nope', head_dim=8), 'Unknown RoPE method'),
    # A misspelled option is an error, not silently dropped; context keywords are not.
    (lambda: rope_lib.get('yarn', head_dim=8, scale=2.0, theta=1e4, original_length=256,
                          length=512, beta_fst=16.0), 'beta_fst'),
    (lambda: rope_lib.get('dynamic_ntk', head_dim=8, length=512, original_length=256,
                          dynamic_scale=2.0), 'dynamic_scale'),
])
def test_bad_input_raises_naming_the_field(build, field):
  with pytest.raises(ValueError, match=field):
    build()


def test_apply_rope_rejects_mismatched_head_dim_and_unvmapped_population():
  x, positions = random_x(13), jnp.zeros((B, T), jnp.int32)
  with pytest.raises(ValueError, match='head_dim'):
    rope_lib.apply_rope(x, positions, rope_lib.none(head_dim=16), theta=THETA)
  stacked = rope_lib.stack([rope_lib.none(head_dim=HEAD_DIM)] * 2)
  with pytest.raises(ValueError, match='vmap'):
    rope_lib.rope_angles(positions, stacked, theta=THETA)


@pytest.mark.parametrize('beta_fast,beta_slow', [(1.0, 32.0), (4.0, 4.0), (2.0, 0.0)])
def test_yarn_rejects_beta_fast_not_above_beta_slow(beta_fast, beta_slow):
  with pytest.raises(ValueError, match=r'beta_fast > beta_slow > 0.*32 and 1'):
    rope_lib.yarn(head_dim=16, scale=4.0, theta=1e4, original_length=256, beta_fast=beta_fast,
                  beta_slow=beta_slow)
  with pytest.raises(ValueError, match='beta_fast'):
    rope_lib.yarn_ramp(16, 1e4, 256, beta_fast, beta_slow)


@pytest.mark.parametrize('bad,index', [(np.inf, 2), (np.nan, 2), (-np.inf, 2), (0.5, 2)])
def test_make_names_the_first_bad_factor(bad, index):
  factors = [1.0, 1.5, bad, 2.0]
  with pytest.raises(ValueError, match=rf'factors\[{index}\] = '):
    rope_lib.make(factors)
  factors = [1.0, 1.5, 1.2, bad]  # not the smallest, not the first: the bad one
  with pytest.raises(ValueError, match=r'factors\[3\] = '):
    rope_lib.make(factors)


@pytest.mark.parametrize('n_hat', [np.nan, np.inf, -np.inf, 2.5, -1, True, '4', None,
                                   np.array([1, 2])])
def test_longrope_refuses_a_non_integral_n_hat_naming_it(n_hat):
  with pytest.raises(ValueError, match=r'n_hat must be a finite non-negative integer .*got '
                                       rf'{re.escape(repr(n_hat))}; pass e.g. n_hat=0'):
    rope_lib.longrope(factors=[1.0, 2.0], n_hat=n_hat, attn_scale=1.0)


@pytest.mark.parametrize('n_hat', [4, 4.0, np.int64(4), np.float32(4.0), jnp.asarray(4)])
def test_longrope_takes_any_whole_n_hat(n_hat):
  rope = rope_lib.longrope(factors=[1.0, 2.0], n_hat=n_hat, attn_scale=1.0)
  assert rope.n_hat.dtype == jnp.int32 and int(rope.n_hat) == 4
