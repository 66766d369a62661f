"""The search spaces of LongRoPE (Ding et al., 2024, sec. 3.2) and LongRoPE2 (Shang et al., 2025,
sec. 3.2), and their seeds.

A candidate is a genome i32[G] of integer genes. `SearchSpace` is LongRoPE's: G = F + 1, grid
indices k_i of the factors lambda_i = 1 + step * k_i, then the index of n_hat among the space's
choices. `RcdSearchSpace` is LongRoPE2's: the same grid indices, then the critical dimension d_rcd
itself; the pairs below d_rcd follow NTK (a function of the rest). `make_space` and
`make_rcd_space` build them for an `rope.Extension`; `seed_genomes` projects PI, NTK, YaRN (and
dynamic NTK) into either. How a strategy moves through a space (mutation, crossover, a continuous
parametrization) is in strategies.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from longrope_jax import rope as rope_lib
from longrope_jax.rope import Extension, RopeScaling

# Seeds of the first population (LongRoPE seeds PI, NTK and YaRN; dynamic NTK at L' is added).
SEED_METHODS = ('linear', 'ntk', 'yarn', 'dynamic_ntk')


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """lambda_i on the grid 1, 1 + step, ..., <= lambda_max (non-decreasing in i if `monotone`)
  and n_hat from `n_hat_choices` (one choice when n_hat is fixed); every candidate shares
  `attn_scale`."""

  num_freqs: int
  lambda_max: float
  step: float = 0.01
  monotone: bool = True
  n_hat_choices: tuple[int, ...] = (0,)
  attn_scale: float = 1.0

  def __post_init__(self):
    if not isinstance(self.num_freqs, (int, np.integer)) or self.num_freqs <= 0:
      raise ValueError(f"num_freqs must be a positive integer (head_dim // 2), got "
                       f"{self.num_freqs!r}.")
    if not math.isfinite(self.lambda_max) or self.lambda_max < 1.0:
      raise ValueError(f"lambda_max must be >= 1 (factors lie in [1, lambda_max]; the paper uses "
                       f"1.25 * s), got {self.lambda_max}.")
    if not math.isfinite(self.step) or self.step <= 0:
      raise ValueError(f"the lambda grid step must be positive (the paper uses 0.01), got "
                       f"{self.step}.")
    choices = tuple(int(c) for c in self.n_hat_choices)
    if not choices or any(c < 0 for c in choices) or len(set(choices)) != len(choices):
      raise ValueError(f"n_hat_choices must be distinct non-negative integers, got "
                       f"{self.n_hat_choices!r}.")
    object.__setattr__(self, 'n_hat_choices', tuple(sorted(choices)))
    if not math.isfinite(self.attn_scale) or self.attn_scale <= 0:
      raise ValueError(f"attn_scale must be a positive number, got {self.attn_scale}.")

  @property
  def num_steps(self) -> int:
    """K: the largest grid index (lambda = 1 + step * K <= lambda_max)."""
    return int(math.floor((self.lambda_max - 1.0) / self.step + 1e-6))

  @property
  def genome_size(self) -> int:
    return self.num_freqs + 1

  @property
  def searches_n_hat(self) -> bool:
    return len(self.n_hat_choices) > 1

  def encode(self, factors, n_hat=None) -> np.ndarray:
    """Genomes i32[..., G] of the nearest valid candidates (bounds, grid, monotone, n_hat)."""
    factors = np.asarray(factors, np.float64)
    if factors.shape[-1:] != (self.num_freqs,):
      raise ValueError(f"factors has shape {factors.shape}; the space has {self.num_freqs} "
                       "frequencies (head_dim // 2) on its last axis.")
    k = np.clip(np.rint((factors - 1.0) / self.step), 0, self.num_steps).astype(np.int32)
    if self.monotone:
      k = np.maximum.accumulate(k, axis=-1)
    n_hat = np.zeros(factors.shape[:-1], np.int64) if n_hat is None else np.asarray(n_hat)
    choices = np.asarray(self.n_hat_choices)
    index = np.abs(n_hat[..., None] - choices).argmin(axis=-1).astype(np.int32)
    return np.concatenate([k, index[..., None]], axis=-1)

  def decode(self, genomes) -> tuple[np.ndarray, np.ndarray]:
    """(factors f64[..., F], n_hat i32[...]) of genomes i32[..., G]."""
    genomes = self.check(genomes)
    factors = 1.0 + self.step * genomes[..., :-1].astype(np.float64)
    return factors, np.asarray(self.n_hat_choices, np.int32)[genomes[..., -1]]

  def project(self, factors, n_hat=None) -> tuple[np.ndarray, np.ndarray]:
    """Maps any proposal into the space: (factors on the grid in [1, lambda_max], monotone if
    the space is; n_hat the nearest choice)."""
    return self.decode(self.encode(factors, n_hat))

  def check(self, genomes) -> np.ndarray:
    """Genomes as i32[..., G], or a ValueError if one lies outside the space."""
    genomes = np.asarray(genomes)
    if genomes.shape[-1:] != (self.genome_size,) or not np.issubdtype(genomes.dtype, np.integer):
      raise ValueError(f"genomes must be integers of shape [..., {self.genome_size}] (F grid "
                       f"indices, then the n_hat index), got {genomes.dtype}{list(genomes.shape)}.")
    k, index = genomes[..., :-1], genomes[..., -1]
    bad = (k.min(initial=0) < 0 or k.max(initial=0) > self.num_steps or index.min(initial=0) < 0
           or index.max(initial=0) >= len(self.n_hat_choices)
           or (self.monotone and np.any(np.diff(k, axis=-1) < 0)))
    if bad:
      raise ValueError("genomes lie outside the search space (grid index beyond [0, "
                       f"{self.num_steps}], unknown n_hat index, or not monotone); pass them "
                       "through SearchSpace.encode.")
    return genomes.astype(np.int32)

  def rope(self, genomes) -> RopeScaling:
    """A stacked `RopeScaling` (leading axis P) for genomes i32[P, G]."""
    return _stacked_rope(*self.decode(genomes), self.attn_scale)

  def critical_dimension(self, genome) -> None:
    """LongRoPE's genomes have no critical-dimension gene."""
    del genome
    return None


def _stacked_rope(factors, n_hat, attn_scale: float) -> RopeScaling:
  return RopeScaling(factors=jnp.asarray(factors, jnp.float32),
                     n_hat=jnp.asarray(n_hat, jnp.int32),
                     attn_scale=jnp.full(np.shape(n_hat), attn_scale, jnp.float32))


def make_space(*, head_dim: int, extension: Extension, lambda_max: float | None = None,
               step: float = 0.01, monotone: bool = True, search_n_hat: bool = True,
               n_hat: int = 0, n_hat_choices: tuple[int, ...] | None = None,
               attn_scale: float | None = None) -> SearchSpace:
  """The paper's space for `extension` (from its stage length to L').

  lambda_max defaults to 1.25 times the stage's scale; n_hat choices default to the paper's set
  below L'; attn_scale defaults to LongRoPE's sqrt(1 + ln s / ln L0) for the whole extension.
  """
  base, target = extension.stage_length, extension.target_length
  if base < 2 or target < base:
    raise ValueError(f"target_length ({target}) must be at least the window it extends "
                     f"({base}): the search extends the context window.")
  scale = extension.stage_scale
  lambda_max = 1.25 * scale if lambda_max is None else float(lambda_max)
  if lambda_max < 1.0:
    raise ValueError(f"lambda_max must be >= 1 (factors lie in [1, lambda_max]; the paper uses "
                     f"1.25 * s = {1.25 * scale:g}), got {lambda_max}.")
  if search_n_hat:
    if n_hat_choices is None:
      n_hat_choices = tuple(c for c in rope_lib.N_HAT_CHOICES if c < target)
    beyond = [c for c in n_hat_choices if c >= target]
    if beyond:
      raise ValueError(f"n_hat choices {beyond} reach beyond the target length L' = "
                       f"{target}; keep n_hat_choices below L'.")
  else:
    if not 0 <= n_hat < target:
      raise ValueError(f"the fixed n_hat ({n_hat}) must lie in [0, L' = {target}).")
    n_hat_choices = (int(n_hat),)
  if attn_scale is None:
    attn_scale = extension.attention_scale
  return SearchSpace(num_freqs=head_dim // 2, lambda_max=lambda_max, step=step,
                     monotone=monotone, n_hat_choices=tuple(n_hat_choices),
                     attn_scale=float(attn_scale))


@dataclasses.dataclass(frozen=True)
class RcdSearchSpace:
  """LongRoPE2's space (Shang et al., 2025, sec. 3.2, Algorithms 1-2), in rotary pair indices.

  A critical dimension d_rcd in [rcd_min, rcd_max] (the paper's d10_tcd and d_tcd); for pairs
  i >= d_rcd, lambda_i on the grid 1 + step * k within [lambda_min, lambda_max] (the paper's
  [s, 2s]), non-decreasing in i; below d_rcd NTK re-based on d_rcd, exactly (not on the grid):

    lambda_i = lambda_{d_rcd} ** (i / d_rcd),  i < d_rcd,

  i.e. base theta' = theta * lambda_{d_rcd} ** (H / (2 d_rcd)), the curve meeting lambda_{d_rcd}
  (Algorithm 1 lines 6-7, Algorithm 2 lines 7-8). With `free_below` (the ablation "all dims",
  Table 10) the pairs below d_rcd are genes too, on the grid in [1, lambda_max], the whole curve
  non-decreasing (so below lambda_{d_rcd}); pairs from d_rcd on keep [lambda_min, lambda_max].

  Genome i32[F + 1]: grid indices k_i, then d_rcd. Below d_rcd the NTK-constrained space stores
  the NTK curve's nearest grid indices, a function of the other genes, so one candidate has one
  genome. n_hat is 0 (it is not part of LongRoPE2); every candidate shares `attn_scale`.
  """

  num_freqs: int
  lambda_min: float
  lambda_max: float
  rcd_min: int
  rcd_max: int
  step: float = 0.01
  free_below: bool = False
  attn_scale: float = 1.0

  def __post_init__(self):
    if not isinstance(self.num_freqs, (int, np.integer)) or self.num_freqs < 2:
      raise ValueError(f"num_freqs must be an integer >= 2 (head_dim // 2), got "
                       f"{self.num_freqs!r}.")
    if not (math.isfinite(self.lambda_max) and 1.0 <= self.lambda_min <= self.lambda_max):
      raise ValueError(f"LongRoPE2 needs 1 <= lambda_min <= lambda_max (the paper: [s, 2s] "
                       f"beyond d_rcd), got [{self.lambda_min}, {self.lambda_max}].")
    if not math.isfinite(self.step) or self.step <= 0:
      raise ValueError(f"the lambda grid step must be positive (the paper uses 0.01), got "
                       f"{self.step}.")
    if self.min_step > self.num_steps:
      raise ValueError(f"no grid value 1 + {self.step} k lies in [{self.lambda_min}, "
                       f"{self.lambda_max}]; use a finer step.")
    if not 0 <= self.rcd_min <= self.rcd_max < self.num_freqs:
      raise ValueError(f"d_rcd's range [{self.rcd_min}, {self.rcd_max}] must lie in [0, F - 1 = "
                       f"{self.num_freqs - 1}] (at least one pair from d_rcd on is searched).")
    if not math.isfinite(self.attn_scale) or self.attn_scale <= 0:
      raise ValueError(f"attn_scale must be a positive number, got {self.attn_scale}.")

  @property
  def num_steps(self) -> int:
    """K: the largest grid index (lambda = 1 + step * K <= lambda_max)."""
    return int(math.floor((self.lambda_max - 1.0) / self.step + 1e-6))

  @property
  def min_step(self) -> int:
    """The smallest grid index at or above lambda_min (for pairs i >= d_rcd)."""
    return int(math.ceil((self.lambda_min - 1.0) / self.step - 1e-6))

  @property
  def genome_size(self) -> int:
    return self.num_freqs + 1

  @property
  def rcd_choices(self) -> np.ndarray:
    return np.arange(self.rcd_min, self.rcd_max + 1)

  def critical_dimension(self, genome) -> int:
    """d_rcd of a genome."""
    return int(self.check(genome)[..., -1])

  def with_rcd(self, k, rcd) -> np.ndarray:
    """Genomes i32[..., G] from grid indices k[..., F] (valid from pair rcd on) and rcd[...]: the
    pairs below rcd re-derived by NTK from k_rcd, or (free_below) kept non-decreasing within
    [0, k_rcd]."""
    k, rcd = np.asarray(k, np.int64), np.asarray(rcd, np.int64)
    below = np.arange(self.num_freqs) < rcd[..., None]
    k_rcd = np.take_along_axis(k, rcd[..., None], axis=-1)
    if self.free_below:
      lower = np.minimum(np.maximum.accumulate(np.clip(k, 0, self.num_steps), axis=-1), k_rcd)
    else:
      lower = np.rint((self._ntk(1.0 + self.step * k_rcd[..., 0], rcd) - 1.0) / self.step)
    k = np.where(below, lower, k)
    return np.concatenate([k, rcd[..., None]], axis=-1).astype(np.int32)

  def _ntk(self, lambda_rcd, rcd) -> np.ndarray:
    """lambda_rcd ** (i / rcd) for every pair i: f64[..., F]."""
    exponent = np.arange(self.num_freqs) / np.maximum(rcd, 1)[..., None]
    return np.asarray(lambda_rcd, np.float64)[..., None] ** exponent

  def encode(self, factors, n_hat=None) -> np.ndarray:
    """Genomes i32[..., G] of the nearest valid candidates: for each d_rcd of the range, the
    factors clipped onto the grid and bounds (non-decreasing), the pairs below d_rcd re-derived;
    the d_rcd whose candidate is nearest in log-factor (sum of squares) wins, the smallest on
    ties."""
    if n_hat is not None and np.any(np.asarray(n_hat) != 0):
      raise ValueError("n_hat is not part of LongRoPE2's space (it is 0); pass n_hat=None.")
    factors = np.asarray(factors, np.float64)
    if factors.shape[-1:] != (self.num_freqs,):
      raise ValueError(f"factors has shape {factors.shape}; the space has {self.num_freqs} "
                       "frequencies (head_dim // 2) on its last axis.")
    k = np.clip(np.rint((factors - 1.0) / self.step), 0, self.num_steps)
    target = np.log(np.maximum(factors, 1.0))
    best, best_distance = None, None
    for rcd in self.rcd_choices:
      upper = np.maximum.accumulate(np.clip(k[..., rcd:], self.min_step, self.num_steps), axis=-1)
      genome = self.with_rcd(np.concatenate([k[..., :rcd], upper], axis=-1),
                             np.full(factors.shape[:-1], rcd))
      distance = np.sum((np.log(self.decode(genome)[0]) - target) ** 2, axis=-1)
      if best is None:
        best, best_distance = genome, distance
      else:
        closer = distance < best_distance
        best = np.where(closer[..., None], genome, best)
        best_distance = np.where(closer, distance, best_distance)
    return best

  def decode(self, genomes) -> tuple[np.ndarray, np.ndarray]:
    """(factors f64[..., F], n_hat i32[...] = 0) of genomes i32[..., G]."""
    genomes = self.check(genomes)
    k, rcd = genomes[..., :-1], genomes[..., -1]
    grid = 1.0 + self.step * k.astype(np.float64)
    n_hat = np.zeros(rcd.shape, np.int32)
    if self.free_below:
      return grid, n_hat
    lambda_rcd = np.take_along_axis(grid, rcd[..., None].astype(np.int64), axis=-1)[..., 0]
    below = np.arange(self.num_freqs) < rcd[..., None]
    return np.where(below, self._ntk(lambda_rcd, rcd), grid), n_hat

  def project(self, factors, n_hat=None) -> tuple[np.ndarray, np.ndarray]:
    """Maps any proposal into the space: (factors, n_hat = 0) of the nearest candidate."""
    return self.decode(self.encode(factors, n_hat))

  def check(self, genomes) -> np.ndarray:
    """Genomes as i32[..., G], or a ValueError if one lies outside the space."""
    genomes = np.asarray(genomes)
    if genomes.shape[-1:] != (self.genome_size,) or not np.issubdtype(genomes.dtype, np.integer):
      raise ValueError(f"genomes must be integers of shape [..., {self.genome_size}] (F grid "
                       f"indices, then d_rcd), got {genomes.dtype}{list(genomes.shape)}.")
    k, rcd = genomes[..., :-1].astype(np.int64), genomes[..., -1].astype(np.int64)
    if rcd.min(initial=self.rcd_min) < self.rcd_min or rcd.max(initial=0) > self.rcd_max:
      raise ValueError(f"d_rcd genes lie outside [{self.rcd_min}, {self.rcd_max}]; pass the "
                       "genomes through RcdSearchSpace.encode.")
    upper = np.arange(self.num_freqs) >= rcd[..., None]
    rising = np.diff(k, axis=-1) >= 0
    bad = (k.min(initial=0) < 0 or k.max(initial=0) > self.num_steps
           or np.any(upper & (k < self.min_step))
           or np.any(~rising & (upper[..., :-1] | self.free_below))
           or np.any(self.with_rcd(k, rcd)[..., :-1] != k))
    if bad:
      raise ValueError(f"genomes lie outside the search space (grid index beyond [0, "
                       f"{self.num_steps}], below {self.min_step} from d_rcd on, not monotone, or "
                       "pairs below d_rcd that are not its NTK curve); pass them through "
                       "RcdSearchSpace.encode.")
    return genomes.astype(np.int32)

  def rope(self, genomes) -> RopeScaling:
    """A stacked `RopeScaling` (leading axis P) for genomes i32[P, G]."""
    return _stacked_rope(*self.decode(genomes), self.attn_scale)


def make_rcd_space(*, head_dim: int, theta: float, extension: Extension, step: float = 0.01,
                   lambda_max: float | None = None, free_below: bool = False,
                   attn_scale: float | None = None) -> RcdSearchSpace:
  """LongRoPE2's space for `extension`: d_rcd in [d10_tcd, d_tcd] of the stage's window
  (`rope.critical_dimension` with 10 and 1 periods), lambda in [s, lambda_max] from d_rcd on,
  lambda_max defaulting to 2 s (s = the stage's scale); attn_scale defaults to LongRoPE's
  sqrt(1 + ln s / ln L0) for the whole extension (what an HF `longrope` block applies)."""
  base, target = extension.stage_length, extension.target_length
  if base < 2 or target < base:
    raise ValueError(f"target_length ({target}) must be at least the window it extends "
                     f"({base}): the search extends the context window.")
  scale = extension.stage_scale
  lambda_max = 2.0 * scale if lambda_max is None else float(lambda_max)
  if not lambda_max >= scale:
    raise ValueError(f"lambda_max must be >= s = {scale:g} (LongRoPE2 searches [s, 2 s] = "
                     f"[{scale:g}, {2 * scale:g}] from d_rcd on), got {lambda_max}.")
  rcd_max = rope_lib.critical_dimension(head_dim, theta, base)
  rcd_min = rope_lib.critical_dimension(head_dim, theta, base, periods=10)
  if rcd_max >= head_dim // 2:
    raise ValueError(f"every frequency of head_dim {head_dim} (theta {theta:g}) turns fully "
                     f"within {base} tokens (d_tcd = F): there is no critical dimension to "
                     "search; use search.settings.space='longrope'.")
  return RcdSearchSpace(num_freqs=head_dim // 2, lambda_min=scale, lambda_max=lambda_max,
                        rcd_min=rcd_min, rcd_max=rcd_max, step=step, free_below=free_below,
                        attn_scale=float(extension.attention_scale if attn_scale is None
                                         else attn_scale))


def seed_genomes(space: SearchSpace | RcdSearchSpace, *, head_dim: int, theta: float,
                 extension: Extension, methods: tuple[str, ...] = SEED_METHODS
                 ) -> dict[str, np.ndarray]:
  """Each seed method extending the stage length to L', projected into the space (its `encode`:
  n_hat the choice nearest 0; in LongRoPE2's space the nearest d_rcd and NTK below it)."""
  kwargs = rope_lib.method_kwargs(head_dim=head_dim, theta=theta,
                                  original_length=extension.stage_length,
                                  length=extension.target_length)
  return {m: space.encode(np.asarray(rope_lib.get(m, **kwargs).factors)) for m in methods}
