"""RoPE scaling methods as data.

Every method is a point in LongRoPE's search space (Ding et al., 2024, arXiv 2402.13753): one
rescale factor lambda_i per rotary frequency, a count n_hat of initial positions that keep the
original angles, and an attention scale applied to cos and sin. A `RopeScaling` is a pytree of
arrays, so one compiled model serves every method and `jax.vmap` over a stacked `RopeScaling`
evaluates a whole population.

Shapes: B batch, T length, N heads, H head dim, F = H // 2 rotary frequencies.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# The paper's n_hat choices (LongRoPE, section 3.2).
N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Per-frequency rescale factors, un-interpolated prefix length and attention scale.

  factors: f32[F]  lambda_i; for position n >= n_hat the angle is n * inv_freq_i / lambda_i.
  n_hat:   i32[]   positions n < n_hat keep the original angle n * inv_freq_i.
  attn_scale: f32[] multiplies cos and sin (q.k logits scale by attn_scale ** 2), as HF does.

  Leading batch axes are allowed (a stacked population: factors f32[P, F], n_hat i32[P], ...).
  """

  factors: jax.Array
  n_hat: jax.Array
  attn_scale: jax.Array

  @property
  def num_freqs(self) -> int:
    return self.factors.shape[-1]


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """Original RoPE inverse frequencies theta ** (-2i / H), i = 0..F-1 (float64 numpy)."""
  _check_head_dim(head_dim)
  return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _check_n_hat(n_hat) -> int:
  """n_hat as an int: a finite, non-negative, whole number (4 or 4.0; not nan, 2.5, True or '4')."""
  value = None
  if not isinstance(n_hat, (bool, np.bool_, str, bytes)) and np.ndim(n_hat) == 0:
    try:
      value = float(n_hat)
    except (TypeError, ValueError):
      value = None
  if value is None or not math.isfinite(value) or value < 0 or value != int(value):
    raise ValueError(f"n_hat must be a finite non-negative integer (how many initial positions "
                     f"keep the original angles), got {n_hat!r}; pass e.g. n_hat=0.")
  return int(value)


def make(factors, n_hat=0, attn_scale=1.0, *, head_dim: int | None = None) -> RopeScaling:
  """Builds a validated `RopeScaling` from concrete values (eagerly: never call under jit)."""
  factors = np.asarray(factors, dtype=np.float64)
  if factors.ndim != 1:
    raise ValueError(f"factors must be one-dimensional (one per frequency), got shape {factors.shape}.")
  if head_dim is not None and factors.shape[0] != head_dim // 2:
    raise ValueError(
        f"factors has length {factors.shape[0]} but head_dim={head_dim} needs head_dim // 2 = "
        f"{head_dim // 2}: pass one factor per rotary frequency.")
  bad_F = ~np.isfinite(factors) | (factors < 1.0)
  if np.any(bad_F):
    bad = int(np.argmax(bad_F))
    raise ValueError(
        f"factors must all be finite and >= 1 (interpolation only); factors[{bad}] = "
        f"{factors[bad]}. Clip the factors to [1, lambda_max].")
  n_hat = _check_n_hat(n_hat)
  if not math.isfinite(attn_scale) or attn_scale <= 0:
    raise ValueError(f"attn_scale must be a positive number, got {attn_scale}.")
  return RopeScaling(
      factors=jnp.asarray(factors, jnp.float32),
      n_hat=jnp.asarray(n_hat, jnp.int32),
      attn_scale=jnp.asarray(attn_scale, jnp.float32))


# ----------------------------------------------------------------------------- constructors
METHODS: dict[str, Callable[..., RopeScaling]] = {}


def register(name: str):
  """Registers a constructor under `name` in `METHODS`."""

  def wrap(fn):
    if name in METHODS:
      raise ValueError(f"RoPE method {name!r} is already registered.")
    METHODS[name] = fn
    return fn

  return wrap


# What `method_kwargs` describes about an extension; each constructor takes the part it needs.
CONTEXT_KEYS = ('head_dim', 'theta', 'original_length', 'length', 'scale')


def get(name: str, **kwargs) -> RopeScaling:
  """Builds method `name`. Context keywords (`CONTEXT_KEYS`, as `method_kwargs` returns them) go
  to the constructors that take them; any other keyword must be one of the method's own options,
  so a misspelled option raises a ValueError instead of being silently ignored."""
  if name not in METHODS:
    raise ValueError(f"Unknown RoPE method {name!r}; choose one of {sorted(METHODS)}.")
  accepted = inspect.signature(METHODS[name]).parameters
  unknown = sorted(k for k in kwargs if k not in accepted and k not in CONTEXT_KEYS)
  if unknown:
    raise ValueError(f"RoPE method {name!r} has no option {', '.join(map(repr, unknown))}; its "
                     f"keywords are {', '.join(accepted)}.")
  return METHODS[name](**{k: v for k, v in kwargs.items() if k in accepted})


@register("none")
def none(*, head_dim: int) -> RopeScaling:
  """Vanilla RoPE: every factor 1."""
  _check_head_dim(head_dim)
  return make(np.ones(head_dim // 2), head_dim=head_dim)


@register("linear")
def linear(*, head_dim: int, scale: float) -> RopeScaling:
  """Position interpolation (Chen et al., 2023): lambda_i = s for every frequency."""
  _check_head_dim(head_dim)
  _check_scale(scale)
  return make(np.full(head_dim // 2, float(scale)), head_dim=head_dim)


def ntk_factors(head_dim: int, scale: float) -> np.ndarray:
  """NTK-aware factors: base' = base * s ** (H / (H - 2))  <=>  lambda_i = s ** (2i / (H - 2))."""
  if head_dim < 4:
    raise ValueError(
        f"NTK-aware scaling needs head_dim >= 4 (it divides by H - 2), got head_dim={head_dim}.")
  i = np.arange(head_dim // 2, dtype=np.float64)
  return float(scale) ** (2.0 * i / (head_dim - 2))


@register("ntk")
def ntk(*, head_dim: int, scale: float) -> RopeScaling:
  """NTK-aware scaled RoPE (bloc97, 2023): a larger base, highest frequency untouched."""
  _check_head_dim(head_dim)
  _check_scale(scale)
  return make(ntk_factors(head_dim, scale), head_dim=head_dim)


def dynamic_scale(length: int, original_length: int, dynamic_factor: float = 1.0) -> float:
  """Effective NTK scale at the current length L, as HF's dynamic rope with factor f:
  f * max(L, L0) / L0 - (f - 1) (so 1 up to L0, and L / L0 when f = 1; YaRN paper eq. 23)."""
  _check_length("length", length)
  _check_length("original_length", original_length)
  _check_scale(dynamic_factor, "dynamic_factor")
  length = max(length, original_length)
  return max(1.0, dynamic_factor * length / original_length - (dynamic_factor - 1.0))


@register("dynamic_ntk")
def dynamic_ntk(*, head_dim: int, length: int, original_length: int, dynamic_factor: float = 1.0) -> RopeScaling:
  """Dynamic NTK (emozilla, 2023): NTK-aware with the scale set by the current `length`.

  `dynamic_factor` is HF's rope_scaling['factor'] for type 'dynamic'; it takes no `scale`: the
  length alone sets the scale.
  """
  return ntk(head_dim=head_dim, scale=dynamic_scale(length, original_length, dynamic_factor))


def yarn_attention_scale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
  return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_ramp(head_dim: int, theta: float, original_length: int, beta_fast: float,
              beta_slow: float, truncate: bool = True) -> np.ndarray:
  """YaRN's per-frequency ramp in [0, 1]: 0 extrapolates (keeps), 1 interpolates (divides by s).

  Frequency i makes r_i = L0 * inv_freq_i / (2 pi) rotations over the original window; dims with
  more than beta_fast rotations are kept, fewer than beta_slow are interpolated. In between the
  ramp is linear in the index i (the YaRN reference code and HF, whose trained checkpoints this
  must load); the paper's eq. 18 writes it linear in r instead.
  """
  low, high = yarn_boundaries(head_dim, theta, original_length, beta_fast, beta_slow, truncate)
  return linear_ramp(head_dim // 2, low, high)


def yarn_boundaries(head_dim: int, theta: float, original_length: int, beta_fast: float,
                    beta_slow: float, truncate: bool = True) -> tuple[float, float]:
  """(low, high): the pair indices where YaRN's ramp leaves 0 and reaches 1, the correction dims
  d ln(L0 / (2 pi r)) / (2 ln theta) of r = beta_fast and beta_slow rotations (floor and ceil with
  `truncate`), clipped to [0, head_dim - 1] as the reference code does."""
  if not beta_fast > beta_slow > 0:
    raise ValueError(f"yarn needs beta_fast > beta_slow > 0 (rotations over L0: dims above "
                     f"beta_fast are kept, below beta_slow interpolated), got beta_fast="
                     f"{beta_fast}, beta_slow={beta_slow}; the published values are 32 and 1.")
  low = yarn_correction_dim(head_dim, theta, original_length, beta_fast)
  high = yarn_correction_dim(head_dim, theta, original_length, beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, head_dim - 1)


def yarn_correction_dim(head_dim: int, theta: float, original_length: int,
                        rotations: float) -> float:
  """The (fractional) pair index whose frequency makes `rotations` turns over L0:
  H ln(L0 / (2 pi r)) / (2 ln theta)."""
  return head_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def linear_ramp(num_freqs: int, low: float, high: float) -> np.ndarray:
  """clip((i - low) / (high - low), 0, 1) for i = 0..F-1 (high nudged by 0.001 when equal)."""
  if low == high:
    high += 0.001
  i = np.arange(num_freqs, dtype=np.float64)
  return np.clip((i - low) / (high - low), 0.0, 1.0)


@register("yarn")
def yarn(*, head_dim: int, scale: float, theta: float, original_length: int,
         beta_fast: float = 32.0, beta_slow: float = 1.0, mscale: float = 1.0,
         attn_scale: float | None = None, truncate: bool = True) -> RopeScaling:
  """YaRN (Peng et al., 2023): NTK-by-parts ramp plus attention temperature 0.1 ln s + 1.

  Inverse frequencies are blended, as in the paper and HF: inv_freq_i * (ramp_i / s + 1 - ramp_i).
  """
  _check_head_dim(head_dim)
  _check_scale(scale)
  _check_theta(theta)
  _check_length("original_length", original_length)
  ramp = yarn_ramp(head_dim, theta, original_length, beta_fast, beta_slow, truncate)
  factors = 1.0 / (ramp / scale + (1.0 - ramp))
  if attn_scale is None:
    attn_scale = yarn_attention_scale(scale, mscale)
  return make(factors, 0, attn_scale, head_dim=head_dim)


# LongRoPE2 (Shang et al., 2025, arXiv 2502.20082) counts critical dimensions as rotary pair
# indices i = 0..F-1 ("cosine dimensions", sec. 2.1): its d_tcd = 2 ceil(...) of eq. 7 counts the
# 2F rotary dimensions, so d_tcd = 62 there is pair 31 here. Every `rcd` below is a pair index.
def ntk_rcd_factors(num_freqs: int, scale: float, rcd: int) -> np.ndarray:
  """lambda_i = s ** (i / rcd), i = 0..F-1: NTK with the base grown so that pair `rcd` turns s
  times slower, theta' = theta * s ** (H / (2 rcd)) (LongRoPE2, sec. 2.3 and Algorithm 1)."""
  i = np.arange(num_freqs, dtype=np.float64)
  return float(scale) ** (i / rcd)


@register("ntk_rcd")
def ntk_rcd(*, head_dim: int, scale: float, theta: float, original_length: int,
            rcd: int | None = None) -> RopeScaling:
  """NTK re-based on a critical dimension (LongRoPE2's NTK-rcd, Table 5 and Fig. 9):
  lambda_i = s ** (i / rcd) for every pair, so lambda_rcd = s (the OOD bound, eq. 10) and the
  pairs beyond rcd get more. rcd None: d_tcd (`critical_dimension`), the paper's "NTK" (Liu et
  al., 2023: theta' = theta ** (ln(L / 2 pi) / ln(L0 / 2 pi)), i.e. lambda_i = s ** (i / x) with
  x = (H / 2) log_theta(L0 / 2 pi)) with its critical index rounded up to a whole pair; pass a
  searched d_rcd for NTK-rcd. Attention scale 1, as NTK.
  """
  _check_head_dim(head_dim)
  _check_scale(scale)
  _check_theta(theta)
  _check_length("original_length", original_length)
  rcd = _check_rcd(rcd, head_dim, theta, original_length)
  return make(ntk_rcd_factors(head_dim // 2, scale, rcd), head_dim=head_dim)


@register("yarn_rcd")
def yarn_rcd(*, head_dim: int, scale: float, theta: float, original_length: int,
             rcd: int | None = None, beta_fast: float = 32.0, mscale: float = 1.0,
             attn_scale: float | None = None, truncate: bool = True) -> RopeScaling:
  """YaRN re-based on a critical dimension (LongRoPE2's YaRN-rcd, Table 5 and Fig. 9): YaRN's
  ramp runs from its beta_fast boundary `low` (pairs below it kept) to pair `rcd` instead of its
  beta_slow = 1 boundary, so lambda_i = 1 / (ramp_i / s + 1 - ramp_i) with
  ramp_i = clip((i - low) / (rcd - low), 0, 1): lambda_i = s exactly for i >= rcd. rcd None:
  d_tcd, which is YaRN itself (with `truncate`, YaRN's ramp ends at ceil of the beta_slow = 1
  correction dim, which is d_tcd). Temperature 0.1 mscale ln s + 1, as YaRN.
  """
  _check_head_dim(head_dim)
  _check_scale(scale)
  _check_theta(theta)
  _check_length("original_length", original_length)
  rcd = _check_rcd(rcd, head_dim, theta, original_length)
  if not beta_fast > 0:
    raise ValueError(f"beta_fast must be a positive number of rotations over L0 (pairs making more "
                     f"are kept), got {beta_fast}; the published value is 32.")
  low = yarn_correction_dim(head_dim, theta, original_length, beta_fast)
  low = max(math.floor(low) if truncate else low, 0)
  if rcd <= low:
    raise ValueError(f"yarn_rcd needs rcd ({rcd}) above the last pair YaRN keeps unscaled "
                     f"(beta_fast = {beta_fast} rotations over L0: pair {low}); pass a larger "
                     f"rcd or a larger beta_fast.")
  ramp = linear_ramp(head_dim // 2, low, rcd)
  factors = 1.0 / (ramp / scale + (1.0 - ramp))
  if attn_scale is None:
    attn_scale = yarn_attention_scale(scale, mscale)
  return make(factors, 0, attn_scale, head_dim=head_dim)


@register("llama3")
def llama3(*, head_dim: int, scale: float, theta: float, original_length: int,
           low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> RopeScaling:
  """Llama-3.1 scaling: keep wavelengths < L0 / high_freq_factor, divide those > L0 /
  low_freq_factor by s, and interpolate inverse frequencies smoothly in between."""
  _check_head_dim(head_dim)
  _check_scale(scale)
  _check_theta(theta)
  _check_length("original_length", original_length)
  if not 0 < low_freq_factor < high_freq_factor:
    raise ValueError(
        f"llama3 needs 0 < low_freq_factor < high_freq_factor, got {low_freq_factor}, "
        f"{high_freq_factor}.")
  inv_freq = inv_frequencies(head_dim, theta)
  wavelen = 2 * math.pi / inv_freq
  smooth = (original_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smooth = np.clip(smooth, 0.0, 1.0)
  # smooth = 1 keeps the frequency (short wavelengths), 0 divides it by s (long wavelengths).
  new_inv_freq = (1.0 - smooth) * inv_freq / scale + smooth * inv_freq
  return make(inv_freq / new_inv_freq, head_dim=head_dim)


def longrope_attention_scale(scale: float, original_length: int) -> float:
  """LongRoPE / Phi-3 attention scale: sqrt(1 + ln s / ln L0) (1 for s <= 1)."""
  if scale <= 1.0:
    return 1.0
  return math.sqrt(1.0 + math.log(scale) / math.log(original_length))


@register("longrope")
def longrope(*, factors, n_hat: int = 0, scale: float | None = None,
             original_length: int | None = None, attn_scale: float | None = None,
             head_dim: int | None = None) -> RopeScaling:
  """LongRoPE: searched per-frequency factors and n_hat un-interpolated initial positions.

  The attention scale defaults to sqrt(1 + ln s / ln L0), which needs `scale` and
  `original_length`; pass `attn_scale` to set it directly.
  """
  if attn_scale is None:
    if scale is None or original_length is None:
      raise ValueError("longrope needs scale and original_length to derive attn_scale, "
                       "or attn_scale explicitly.")
    _check_scale(scale)
    _check_length("original_length", original_length, minimum=2)
    attn_scale = longrope_attention_scale(scale, original_length)
  return make(factors, n_hat, attn_scale, head_dim=head_dim)


@dataclasses.dataclass(frozen=True)
class Extension:
  """A context extension: the original (pretraining) window L0, the target length L' and the
  scale s = L' / L0 (at least 1), computed here only.

  `base_length` is the window the model was last fine-tuned at (L1 in progressive extension;
  L0 when None): a search on top of earlier factors spans `stage_scale` = L' / base_length.
  """

  original_length: int
  target_length: int
  base_length: int | None = None

  def __post_init__(self):
    _check_length("original_length", self.original_length)
    _check_length("target_length", self.target_length)
    if self.base_length is not None:
      _check_length("base_length", self.base_length)

  @classmethod
  def by_multiple(cls, original_length: int, multiple: float, **kwargs) -> 'Extension':
    """L' = int(multiple * L0): how configs name lengths."""
    return cls(int(original_length), int(multiple * original_length), **kwargs)

  @property
  def scale(self) -> float:
    """s = L' / L0, at least 1 (a length within the window needs no scaling)."""
    return max(1.0, self.target_length / self.original_length)

  @property
  def stage_length(self) -> int:
    """The window this stage extends from: base_length, else L0."""
    return self.original_length if self.base_length is None else self.base_length

  @property
  def stage_scale(self) -> float:
    """L' / stage_length: the span of a search on top of earlier factors."""
    return self.target_length / self.stage_length

  @property
  def attention_scale(self) -> float:
    """LongRoPE's attention scale for the whole extension, sqrt(1 + ln s / ln L0)."""
    return longrope_attention_scale(self.scale, self.original_length)


def method_kwargs(*, head_dim: int, theta: float, original_length: int, length: int) -> dict:
  """The context of an extension to `length` (`CONTEXT_KEYS`), for `get`."""
  extension = Extension(original_length, length)
  return dict(head_dim=head_dim, theta=theta, original_length=original_length, length=length,
              scale=extension.scale)


# ----------------------------------------------------------------------------- application
def rope_angles(positions: jax.Array, rope: RopeScaling, *, theta: float) -> jax.Array:
  """Rotation angles f32[..., T, F] for integer positions i32[..., T].

  Positions below rope.n_hat use the original frequencies; the rest use inv_freq / factors.
  """
  if rope.factors.ndim != 1:
    raise ValueError(
        f"rope.factors has shape {rope.factors.shape}; a stacked population needs jax.vmap over "
        "the RopeScaling (one candidate per call).")
  num_freqs = rope.factors.shape[-1]
  inv_freq = jnp.asarray(inv_frequencies(2 * num_freqs, theta), jnp.float32)
  pos = positions.astype(jnp.float32)[..., None]
  scaled = pos * (inv_freq / rope.factors)
  original = pos * inv_freq
  keep = (positions < rope.n_hat)[..., None]
  return jnp.where(keep, original, scaled)


def rope_cos_sin(positions: jax.Array, rope: RopeScaling, *, theta: float):
  """cos and sin f32[B, T, H] in rotate-half layout, already multiplied by rope.attn_scale."""
  angles = rope_angles(positions, rope, theta=theta)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles) * rope.attn_scale, jnp.sin(angles) * rope.attn_scale


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, rope: RopeScaling, *,
               theta: float) -> jax.Array:
  """Rotates queries or keys x[B, T, N, H] (HF / GPT-NeoX rotate-half layout)."""
  check_head_dim(x_BTNH.shape[-1], rope)
  return rotate(x_BTNH, *rope_cos_sin(positions_BT, rope, theta=theta))


def rotate(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
  """Rotates x[B, T, N, H] by a table from `rope_cos_sin` (the same for every head)."""
  cos_BT1H, sin_BT1H = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos_BT1H + rotated * sin_BT1H).astype(x_BTNH.dtype)


def check_head_dim(head_dim: int, rope: RopeScaling) -> None:
  """Raises unless `rope` has head_dim // 2 factors."""
  if head_dim != 2 * rope.factors.shape[-1]:
    raise ValueError(
        f"head_dim {head_dim} of x does not match rope with {rope.factors.shape[-1]} "
        f"factors (head_dim // 2 needed): build the RopeScaling with head_dim={head_dim}.")


def stack(ropes: list[RopeScaling]) -> RopeScaling:
  """Stacks scalings into one population pytree (leading axis P) for `jax.vmap`."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *ropes)


def unstack(rope: RopeScaling) -> list[RopeScaling]:
  """Splits a stacked population back into individual scalings."""
  size = rope.factors.shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], rope) for i in range(size)]


def critical_dimension(head_dim: int, theta: float, original_length: int, *,
                       periods: float = 1.0) -> int:
  """The first rotary pair index i in [0, F] whose period 2 pi theta ** (2i / H) exceeds
  original_length / periods (fewer than `periods` full turns fit in the window; F if none does).

  That is ceil((H / 2) log_theta(L0 / (2 pi periods))), clipped to [0, F] (the period never equals
  the bound exactly). periods = 1: LongRoPE2's theoretical critical dimension d_tcd (Shang et al.,
  2025, eq. 7, halved: the paper's d_tcd counts both dimensions of each pair); periods = 10:
  d10_tcd, where the d_rcd search starts (Algorithm 1, line 2). Phi3-mini (H = 96, theta 1e4,
  L0 = 2048): 31 and 19; LLaMA3-8B (H = 128, theta 5e5, L0 = 8192): 35 and 24.
  """
  _check_head_dim(head_dim)
  if not isinstance(periods, (int, float, np.integer, np.floating)) or not periods > 0:
    raise ValueError(f"periods must be a positive number of full turns in the window, got "
                     f"{periods!r}.")
  wavelen = 2 * math.pi / inv_frequencies(head_dim, theta)
  beyond = np.nonzero(wavelen > original_length / periods)[0]
  return int(beyond[0]) if beyond.size else head_dim // 2


# ----------------------------------------------------------------------------- validation
def _check_head_dim(head_dim: int) -> None:
  if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 or head_dim % 2:
    raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}.")


def _check_scale(scale: float, name: str = "scale") -> None:
  if not isinstance(scale, (int, float, np.floating, np.integer)) or not math.isfinite(scale) \
      or scale < 1.0:
    hint = " (L' / L)" if name == "scale" else ""
    raise ValueError(f"{name} must be a finite number >= 1{hint}, got {scale!r}.")


def _check_theta(theta: float) -> None:
  if not isinstance(theta, (int, float, np.floating, np.integer)) or not math.isfinite(theta) \
      or theta <= 1.0:
    raise ValueError(f"theta (the RoPE base) must be a finite number > 1, got {theta!r}.")


def _check_rcd(rcd: int | None, head_dim: int, theta: float, original_length: int) -> int:
  """`rcd` (d_tcd when None) as a pair index in [1, F], or a ValueError naming it."""
  if rcd is None:
    rcd = critical_dimension(head_dim, theta, original_length)
    if rcd < 1:
      raise ValueError(f"the theoretical critical dimension is 0 (L0 = {original_length} holds "
                       "no full turn of any frequency); pass rcd explicitly.")
  if not isinstance(rcd, (int, np.integer)) or isinstance(rcd, bool) or \
      not 1 <= rcd <= head_dim // 2:
    raise ValueError(f"rcd must be a rotary pair index in [1, head_dim // 2 = {head_dim // 2}] "
                     f"(the critical dimension; None for d_tcd), got {rcd!r}.")
  return int(rcd)


def _check_length(name: str, length: int, minimum: int = 1) -> None:
  if not isinstance(length, (int, float, np.floating, np.integer)) or not math.isfinite(length) \
      or length < minimum:
    raise ValueError(f"{name} must be a number of tokens >= {minimum}, got {length!r}.")


@dataclasses.dataclass(frozen=True)
class LongRopeFactors:
  """Short and long LongRoPE scalings switched by sequence length, as Phi-3 does: a sequence of
  at most `original_length` tokens uses `short`, a longer one `long`.

  A generation that crosses `original_length` must recompute its KV cache with `long` (the keys
  cached under `short` were rotated differently): see `evaluate.generate_switching`.
  """

  short: RopeScaling
  long: RopeScaling
  original_length: int

  def __post_init__(self):
    if self.original_length <= 0:
      raise ValueError(f"original_length must be positive, got {self.original_length}.")
    if self.short.factors.shape != self.long.factors.shape:
      raise ValueError(f"short and long factors differ in length: {self.short.factors.shape} vs "
                       f"{self.long.factors.shape}.")

  def select(self, length: int) -> RopeScaling:
    """The scaling for a sequence of `length` tokens."""
    return self.short if length <= self.original_length else self.long
