"""Our RoPE scalings against Hugging Face transformers' rope init functions.

Each case builds a small LlamaConfig here (nothing is downloaded), asks
`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[type]` for (inv_freq, attention factor), and
compares with ours: inv_freq = theta ** (-2i/H) / lambda_i and attn_scale. Skips without torch or
transformers. Works with the `rope_parameters` config API (transformers 5) and `rope_scaling` (4.x).

Tolerance. HF forms inv_freq in float32: the exponent 2i/H is rounded (u = 2**-24 relative), and
theta ** x turns that into a relative error up to ln(theta) * u (x < 1); pow, the reciprocal, the
method's division or blend and our float32 factors each add about u. Budget: (ln(base) + 8) u, i.e.
1.0e-6 at theta 1e4 and 1.26e-6 at 5e5 (the measured worst case over these configs is 5.5 u =
3.3e-7). Our float64 inv_freq is exact by comparison. Against HF's own float32 default inv_freq the
shared pow error cancels, so the implied factors hf_default / hf_method match ours to 1e-6 flat.
HF's attention factors are Python floats from the same formulas: equal to our helpers exactly, and
to the float32 attn_scale we store within its rounding (u).
"""

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
rope_utils = pytest.importorskip('transformers.modeling_rope_utils')

from longrope_jax import rope as rope_lib  # noqa: E402

U = 2.0 ** -24
CONFIGS = [(head_dim, theta, scale)
           for head_dim in (16, 64, 128) for theta in (1e4, 5e5) for scale in (2, 8, 16)]
ORIGINAL_LENGTH = {1e4: 4096, 5e5: 8192}  # Llama-2 and Llama-3.1 pretraining windows
IDS = [f'H{h}-theta{t:g}-s{s}' for h, t, s in CONFIGS]


def hf_config(head_dim, theta, max_positions, params, **extra):
  """A one-layer LlamaConfig with the given RoPE parameters, in whichever API is installed."""
  kwargs = dict(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                num_hidden_layers=1, intermediate_size=8, vocab_size=8,
                max_position_embeddings=max_positions, **extra)
  if 'rope_parameters' in inspect.signature(transformers.LlamaConfig.__init__).parameters:
    return transformers.LlamaConfig(rope_parameters=dict(rope_theta=theta, **params), **kwargs)
  params = dict(params) if params.get('rope_type', 'default') != 'default' else None
  return transformers.LlamaConfig(rope_theta=theta, rope_scaling=params, **kwargs)


def hf_rope(rope_type, config, seq_len=None):
  """(inv_freq float64 numpy, attention factor) from HF's init function for `rope_type`."""
  inv_freq, attention_factor = rope_utils.ROPE_INIT_FUNCTIONS[rope_type](
      config, device=None, seq_len=seq_len)
  assert inv_freq.dtype == torch.float32
  return inv_freq.double().numpy(), float(attention_factor)


def hf_default(head_dim, theta):
  """HF's vanilla (inv_freq, attention factor).

  transformers 4 registers 'default'; transformers 5 moved it onto each model's rotary module
  (LlamaRotaryEmbedding.compute_default_rope_parameters), whose import costs seconds. Its float32
  formula is 'linear''s before the division by factor (checked bitwise equal for these configs
  with transformers 5.24), so there 'linear' at factor 1 stands in for it.
  """
  if 'default' in rope_utils.ROPE_INIT_FUNCTIONS:
    return hf_rope('default', hf_config(head_dim, theta, 4096, dict(rope_type='default')))
  return hf_rope('linear', hf_config(head_dim, theta, 4096, dict(rope_type='linear', factor=1.0)))


def hf_default_inv_freq(head_dim, theta):
  return hf_default(head_dim, theta)[0]


def inv_freq_rtol(log_base):
  return (log_base + 8) * U


def assert_matches_hf(rope, hf_inv_freq, hf_attention, theta, default_inv_freq=None,
                      log_base=None):
  """inv_freq = theta ** (-2i/H) / factors and attn_scale against HF's (see the module doc)."""
  factors = np.asarray(rope.factors, np.float64)
  ours = rope_lib.inv_frequencies(2 * rope.num_freqs, theta) / factors
  rtol = inv_freq_rtol(math.log(theta) if log_base is None else log_base)
  np.testing.assert_allclose(hf_inv_freq, ours, rtol=rtol, atol=0)
  if default_inv_freq is not None:
    np.testing.assert_allclose(default_inv_freq / hf_inv_freq, factors, rtol=1e-6, atol=0)
  np.testing.assert_allclose(float(rope.attn_scale), hf_attention, rtol=U, atol=0)


def longrope_factors(head_dim, scale, long):
  """Phi-3-like factors on LongRoPE's 0.01 grid, non-decreasing in [1, 1.25 s] (short: near 1)."""
  i = np.arange(head_dim // 2) / (head_dim // 2 - 1)
  top = 1.25 * scale if long else 1.0 + 0.05 * scale
  return list(np.round(1.0 + (top - 1.0) * i ** 2, 2))


@pytest.mark.parametrize('head_dim, theta', sorted({(h, t) for h, t, _ in CONFIGS}))
def test_default(head_dim, theta):
  inv_freq, attention = hf_default(head_dim, theta)
  assert_matches_hf(rope_lib.none(head_dim=head_dim), inv_freq, attention, theta)


@pytest.mark.parametrize('head_dim, theta, scale', CONFIGS, ids=IDS)
def test_linear(head_dim, theta, scale):
  original = ORIGINAL_LENGTH[theta]
  config = hf_config(head_dim, theta, scale * original,
                     dict(rope_type='linear', factor=float(scale)))
  inv_freq, attention = hf_rope('linear', config)
  assert_matches_hf(rope_lib.linear(head_dim=head_dim, scale=scale), inv_freq, attention, theta,
                    default_inv_freq=hf_default_inv_freq(head_dim, theta))


@pytest.mark.parametrize('head_dim, theta, scale', CONFIGS, ids=IDS)
def test_dynamic(head_dim, theta, scale):
  # HF's `factor` is our dynamic_factor; HF's max_position_embeddings is the original window.
  original = ORIGINAL_LENGTH[theta]
  for dynamic_factor in (1.0, float(scale)):
    config = hf_config(head_dim, theta, original, dict(rope_type='dynamic', factor=dynamic_factor))
    for length in (original // 2, original, scale * original + 17):
      inv_freq, attention = hf_rope('dynamic', config, seq_len=length)
      rope = rope_lib.dynamic_ntk(head_dim=head_dim, length=length, original_length=original,
                                  dynamic_factor=dynamic_factor)
      effective = rope_lib.dynamic_scale(length, original, dynamic_factor)
      log_base = math.log(theta) + head_dim / (head_dim - 2) * math.log(effective)
      assert_matches_hf(rope, inv_freq, attention, theta, log_base=log_base)


@pytest.mark.parametrize('head_dim, theta, scale', CONFIGS, ids=IDS)
def test_yarn(head_dim, theta, scale):
  original = ORIGINAL_LENGTH[theta]
  config = hf_config(head_dim, theta, scale * original,
                     dict(rope_type='yarn', factor=float(scale),
                          original_max_position_embeddings=original))
  inv_freq, attention = hf_rope('yarn', config)
  rope = rope_lib.yarn(head_dim=head_dim, scale=scale, theta=theta, original_length=original)
  assert_matches_hf(rope, inv_freq, attention, theta,
                    default_inv_freq=hf_default_inv_freq(head_dim, theta))
  assert rope_lib.yarn_attention_scale(scale) == attention


@pytest.mark.parametrize('head_dim, theta, scale', CONFIGS, ids=IDS)
def test_llama3(head_dim, theta, scale):
  original = ORIGINAL_LENGTH[theta]
  config = hf_config(head_dim, theta, scale * original,
                     dict(rope_type='llama3', factor=float(scale), low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=original))
  inv_freq, attention = hf_rope('llama3', config)
  rope = rope_lib.llama3(head_dim=head_dim, scale=scale, theta=theta, original_length=original)
  assert_matches_hf(rope, inv_freq, attention, theta,
                    default_inv_freq=hf_default_inv_freq(head_dim, theta))


@pytest.mark.parametrize('head_dim, theta, scale', CONFIGS, ids=IDS)
def test_longrope_phi3_style(head_dim, theta, scale):
  # Phi-3: max_position_embeddings = s * L0 with original_max_position_embeddings = L0 beside it;
  # short factors up to L0, long factors beyond; one attention factor sqrt(1 + ln s / ln L0).
  original = ORIGINAL_LENGTH[theta]
  short, long = longrope_factors(head_dim, scale, False), longrope_factors(head_dim, scale, True)
  config = hf_config(head_dim, theta, scale * original,
                     dict(rope_type='longrope', short_factor=short, long_factor=long),
                     original_max_position_embeddings=original)
  default = hf_default_inv_freq(head_dim, theta)
  for factors, seq_len in ((short, None), (short, original), (long, original + 1)):
    inv_freq, attention = hf_rope('longrope', config, seq_len=seq_len)
    rope = rope_lib.longrope(factors=factors, scale=scale, original_length=original,
                             head_dim=head_dim)
    assert_matches_hf(rope, inv_freq, attention, theta, default_inv_freq=default)
  assert rope_lib.longrope_attention_scale(scale, original) == attention


@pytest.mark.parametrize('head_dim, theta, scale', CONFIGS[::4], ids=IDS[::4])
def test_longrope_explicit_factor_and_attention(head_dim, theta, scale):
  # HF also takes `factor` and `attention_factor` inside the rope parameters.
  original = ORIGINAL_LENGTH[theta]
  long = longrope_factors(head_dim, scale, True)
  for attention_factor in (None, 1.3):
    params = dict(rope_type='longrope', factor=float(scale), short_factor=long, long_factor=long,
                  original_max_position_embeddings=original)
    if attention_factor is not None:
      params['attention_factor'] = attention_factor
    inv_freq, attention = hf_rope('longrope', hf_config(head_dim, theta, scale * original, params),
                                  seq_len=2 * original)
    rope = rope_lib.longrope(factors=long, scale=scale, original_length=original,
                             attn_scale=attention_factor)
    assert_matches_hf(rope, inv_freq, attention, theta)
