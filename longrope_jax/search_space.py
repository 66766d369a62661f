"""LongRoPE's search space (Ding et al., 2024, sec. 3.2) and its seeds.

A candidate is a genome i32[G], G = F + 1: grid indices k_i of the factors
lambda_i = 1 + step * k_i, then the index of n_hat among the space's choices. `make_space` builds
the paper's space for an `rope.Extension`; `seed_genomes` projects PI, NTK, YaRN (and dynamic
NTK) into it.
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
    factors, n_hat = self.decode(genomes)
    return RopeScaling(factors=jnp.asarray(factors, jnp.float32),
                       n_hat=jnp.asarray(n_hat, jnp.int32),
                       attn_scale=jnp.full(n_hat.shape, self.attn_scale, jnp.float32))


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


def seed_genomes(space: SearchSpace, *, head_dim: int, theta: float, extension: Extension,
                 methods: tuple[str, ...] = SEED_METHODS) -> dict[str, np.ndarray]:
  """Each seed method extending the stage length to L', projected into the space (n_hat = the
  choice nearest 0)."""
  kwargs = rope_lib.method_kwargs(head_dim=head_dim, theta=theta,
                                  original_length=extension.stage_length,
                                  length=extension.target_length)
  return {m: space.encode(np.asarray(rope_lib.get(m, **kwargs).factors)) for m in methods}
