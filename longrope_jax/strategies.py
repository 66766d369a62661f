"""Search strategies over a search space, all on evosax's init / ask / tell protocol.

`PaperGA` is LongRoPE's genetic algorithm (Ding et al., 2024, Algorithm 1); `EvosaxStrategy` runs
any evosax 0.3 algorithm through a continuous latent that decodes to valid, monotone genomes.
Strategies work on integer genomes i32[P, G]; their states are pytrees of fixed-shape arrays
(checkpointed by the loop). How a strategy moves through a space is dispatched on the space's
type (`functools.singledispatch`): `mutate`, `crossover`, `initial_candidates` and the unit-cube
parametrization (`unit_size`, `to_unit`, `from_unit`) for LongRoPE's `SearchSpace` and LongRoPE2's
`RcdSearchSpace` (Shang et al., 2025, Algorithms 1-2).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Container, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax.search_space import RcdSearchSpace, SearchSpace

PAPER_GA = 'paper_ga'


def numpy_rng(key: jax.Array) -> np.random.Generator:
  """A numpy generator determined by a JAX key (host-side operators stay reproducible)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


@functools.singledispatch
def mutate(space, genome: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
  """A mutation of `genome` in which each gene moves with probability `prob`."""
  raise TypeError(f"no mutation for a {type(space).__name__}")


@mutate.register
def _(space: SearchSpace, genome: np.ndarray, rng: np.random.Generator,
      prob: float) -> np.ndarray:
  """Resamples each lambda_i with probability `prob` between its neighbours' values, left to
  right, so a monotone genome stays monotone (the ends use 1 and lambda_max); n_hat moves to
  another choice with the same probability."""
  F, K = space.num_freqs, space.num_steps
  child = genome.copy()
  for i in range(F):
    if rng.random() < prob:
      left = child[i - 1] if i > 0 else 0
      right = genome[i + 1] if i < F - 1 else K
      lo, hi = (left, right) if space.monotone else (min(left, right), max(left, right))
      child[i] = rng.integers(lo, hi + 1)
  choices = len(space.n_hat_choices)
  if choices > 1 and rng.random() < prob:
    other = rng.integers(choices - 1)
    child[F] = other + (other >= genome[F])
  return child


@mutate.register
def _(space: RcdSearchSpace, genome: np.ndarray, rng: np.random.Generator,
      prob: float) -> np.ndarray:
  """LongRoPE2's mutation (Algorithm 2): each lambda_i, i >= d_rcd, is resampled with
  probability `prob` between its neighbours' values within [lambda_min, lambda_max], left to
  right (the curve stays non-decreasing); then d_rcd moves to another value of its range with the
  same probability (pairs it uncovers are raised to lambda_min at least), and the pairs below the
  new d_rcd are re-derived by NTK. With free_below the pairs below d_rcd mutate like the others,
  within [1, lambda_{d_rcd}]."""
  F, K, lowest = space.num_freqs, space.num_steps, space.min_step
  k, rcd = genome[:-1].astype(np.int64), int(genome[-1])
  first = 0 if space.free_below else rcd
  for i in range(first, F):
    if rng.random() < prob:
      left = max(k[i - 1] if i > first else 0, lowest if i >= rcd else 0)
      right = genome[i + 1] if i < F - 1 else K
      k[i] = rng.integers(left, right + 1)
  choices = len(space.rcd_choices)
  if choices > 1 and rng.random() < prob:
    other = rng.integers(choices - 1)
    new = space.rcd_min + other + (other >= rcd - space.rcd_min)
    k[new:] = np.maximum(k[new:], lowest)
    rcd = new
  return space.with_rcd(k, rcd)


@functools.singledispatch
def crossover(space, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
  """A child taking each gene from `a` or `b`; None if it is not a valid candidate."""
  raise TypeError(f"no crossover for a {type(space).__name__}")


@crossover.register
def _(space: SearchSpace, a: np.ndarray, b: np.ndarray,
      rng: np.random.Generator) -> np.ndarray | None:
  """Takes each gene (and n_hat) from `a` or `b` at random; None if it breaks monotonicity."""
  child = np.where(rng.random(space.genome_size) < 0.5, a, b)
  if space.monotone and np.any(np.diff(child[:-1]) < 0):
    return None
  return child


@crossover.register
def _(space: RcdSearchSpace, a: np.ndarray, b: np.ndarray,
      rng: np.random.Generator) -> np.ndarray | None:
  """Takes each gene (d_rcd too) from `a` or `b` at random, raises the pairs from d_rcd on to
  lambda_min at least and re-derives those below; None if the searched pairs decrease."""
  child = np.where(rng.random(space.genome_size) < 0.5, a, b).astype(np.int64)
  k, rcd = child[:-1], int(child[-1])
  k[rcd:] = np.maximum(k[rcd:], space.min_step)
  if np.any(np.diff(k[0 if space.free_below else rcd:]) < 0):
    return None
  return space.with_rcd(k, rcd)


@functools.singledispatch
def initial_candidates(space, rng: np.random.Generator) -> list[np.ndarray]:
  """Candidates a space's own initialization adds to the seeds (none for LongRoPE)."""
  del space, rng
  return []


@initial_candidates.register
def _(space: RcdSearchSpace, rng: np.random.Generator) -> list[np.ndarray]:
  """LongRoPE2's initialization (Algorithm 1): for each d_rcd of the range, one random grid value
  s' in [lambda_min, lambda_max] for every pair from d_rcd on (the paper draws an integer), NTK
  below."""
  return [space.with_rcd(np.full(space.num_freqs, rng.integers(space.min_step,
                                                                space.num_steps + 1)), rcd)
          for rcd in space.rcd_choices]


def initial_population(space: SearchSpace | RcdSearchSpace, seeds: Mapping[str, np.ndarray],
                       size: int, rng: np.random.Generator, *, mutation_prob: float = 0.3,
                       max_tries: int = 64) -> np.ndarray:
  """Distinct seeds first, then the space's own `initial_candidates`, then distinct mutations of
  random ones of those, up to i32[size, G]."""
  rows, seen = [], set()
  for genome in [*seeds.values(), *initial_candidates(space, rng)]:
    if genome.tobytes() not in seen and len(rows) < size:
      seen.add(genome.tobytes())
      rows.append(genome)
  parents = list(rows)
  while len(rows) < size:
    for _ in range(max_tries):
      child = mutate(space, parents[rng.integers(len(parents))], rng, mutation_prob)
      if child.tobytes() not in seen:
        break
    seen.add(child.tobytes())
    rows.append(child)
  return np.stack(rows).astype(np.int32)


# ----------------------------------------------------------------------------- paper's GA
@dataclasses.dataclass(frozen=True)
class GAParams:
  mutation_prob: float = 0.3


class PaperGA:
  """LongRoPE's search (Ding et al., 2024, Algorithm 1) as an evosax-style strategy; over
  LongRoPE2's space it is that paper's "standard evolution search" with its operators.

  Each generation keeps the top `num_parents` candidates and adds `num_mutations` mutations and
  `num_crossovers` crossovers of them, every one a candidate never proposed before (`archive`:
  the search loop's record of evaluated genomes, as bytes), so the population is parents +
  children = population_size.
  """

  def __init__(self, space: SearchSpace | RcdSearchSpace, *, population_size: int = 64,
               num_parents: int = 32, num_mutations: int = 16, num_crossovers: int = 16,
               mutation_prob: float = 0.3, archive: Container[bytes] = (), max_tries: int = 64):
    if num_parents < 1 or population_size < num_parents:
      raise ValueError(f"the population ({population_size}) must hold at least the parents "
                       f"({num_parents}), and parents must be >= 1; raise search.population or "
                       "lower search.parents.")
    if num_mutations < 0 or num_crossovers < 0 or \
        num_parents + num_mutations + num_crossovers != population_size:
      raise ValueError(f"parents + mutations + crossovers ({num_parents} + {num_mutations} + "
                       f"{num_crossovers}) must equal the population ({population_size}), as in "
                       "the paper (32 + 16 + 16 = 64); adjust search.mutations / crossovers.")
    if num_crossovers and num_parents < 2:
      raise ValueError("crossovers need at least 2 parents; raise search.parents.")
    self.space = space
    self.population_size = population_size
    self.num_parents, self.num_mutations, self.num_crossovers = (num_parents, num_mutations,
                                                                 num_crossovers)
    if not 0.0 <= mutation_prob <= 1.0:
      raise ValueError(f"mutation_prob must lie in [0, 1], got {mutation_prob}; set "
                       "search.settings.mutation_prob.")
    self.mutation_prob = mutation_prob
    self.archive = archive
    self.max_tries = max_tries

  @property
  def default_params(self) -> GAParams:
    return GAParams(mutation_prob=self.mutation_prob)

  def init(self, key: jax.Array, population: np.ndarray, fitness: np.ndarray,
           params: GAParams | None = None) -> dict:
    del key, params
    return dict(population=self.space.check(population), fitness=_finite(fitness))

  def ask(self, key: jax.Array, state: dict, params: GAParams | None = None
          ) -> tuple[np.ndarray, dict]:
    params = params or self.default_params
    rng = numpy_rng(key)
    new = self.num_mutations + self.num_crossovers
    order = np.argsort(state['fitness'], kind='stable')
    parents = state['population'][order[:self.num_parents]]
    seen = {g.tobytes() for g in state['population']}  # with self.archive: never proposed twice
    children = []
    for n in range(new):
      for attempt in range(3 * self.max_tries):
        if n < self.num_mutations or attempt >= self.max_tries:
          # Crossovers that find nothing new fall back to mutations, then to stronger ones.
          prob = params.mutation_prob if attempt < 2 * self.max_tries else 1.0
          child = mutate(self.space, parents[rng.integers(self.num_parents)], rng, prob)
        else:
          i, j = rng.choice(self.num_parents, size=2, replace=False)
          child = crossover(self.space, parents[i], parents[j], rng)
        if child is not None and child.tobytes() not in seen and \
            child.tobytes() not in self.archive:
          break
      seen.add(child.tobytes())  # a repeat only if the neighbourhood is exhausted
      children.append(child)
    population = np.concatenate([parents, np.asarray(children, np.int32).reshape(
        new, self.space.genome_size)])
    return population, state

  def tell(self, key: jax.Array, population: np.ndarray, fitness: np.ndarray, state: dict,
           params: GAParams | None = None) -> dict:
    del key, params
    return dict(state, population=np.asarray(population, np.int32), fitness=_finite(fitness))


def _finite(fitness) -> np.ndarray:
  """Fitness as f32 with NaN (a failed evaluation) ranked last."""
  fitness = np.asarray(fitness, np.float32)
  return np.where(np.isnan(fitness), np.inf, fitness).astype(np.float32)


# ----------------------------------------------------------------------------- evosax strategies
def evosax_algorithms() -> dict:
  from evosax.algorithms import algorithms
  return algorithms


@functools.lru_cache(maxsize=None)
def _evosax_algorithm(name: str, population_size: int, num_dims: int):
  """One instance per shape: evosax jits init / ask / tell with the instance static, so reusing
  it reuses their compilations across searches."""
  return evosax_algorithms()[name](population_size=population_size, solution=jnp.zeros(num_dims))


# ----------------------------------------------------------------------------- unit cube
@functools.singledispatch
def unit_size(space) -> int:
  """D: coordinates of the unit-cube parametrization of a space's genomes."""
  raise TypeError(f"no continuous parametrization for a {type(space).__name__}")


@functools.singledispatch
def to_unit(space, genomes: np.ndarray) -> np.ndarray:
  """u f64[..., D] in (0, 1) with from_unit(space, u) == genomes."""
  raise TypeError(f"no continuous parametrization for a {type(space).__name__}")


@functools.singledispatch
def from_unit(space, u: np.ndarray) -> np.ndarray:
  """Valid genomes i32[..., G] of any u f64[..., D] in [0, 1]."""
  raise TypeError(f"no continuous parametrization for a {type(space).__name__}")


@unit_size.register
def _(space: SearchSpace) -> int:
  return space.num_freqs + (1 if space.searches_n_hat else 0)


@to_unit.register
def _(space: SearchSpace, genomes: np.ndarray, eps: float = 1e-3) -> np.ndarray:
  """Monotone spaces use stick-breaking (see `from_unit`): u_i = 1 - (1 - r_i) / (1 - r_{i-1}),
  r_i = k_i / K clipped below 1; a searched n_hat's coordinate is the middle of its choice."""
  genomes = space.check(genomes)
  K = max(space.num_steps, 1)
  r = np.clip(genomes[..., :-1] / K, 0.0, 1.0 - eps)
  if space.monotone:
    prev = np.concatenate([np.zeros_like(r[..., :1]), r[..., :-1]], axis=-1)
    u = 1.0 - (1.0 - r) / (1.0 - prev)
  else:
    u = r
  parts = [u]
  if space.searches_n_hat:
    parts.append(((genomes[..., -1:] + 0.5) / len(space.n_hat_choices)))
  return np.clip(np.concatenate(parts, axis=-1), eps, 1.0 - eps)


@from_unit.register
def _(space: SearchSpace, u: np.ndarray) -> np.ndarray:
  """Monotone spaces use stick-breaking: r_i = 1 - prod_{j <= i} (1 - u_j),
  lambda_i = 1 + step * K * r_i (K the largest grid index), non-decreasing by construction;
  otherwise r = u. A searched n_hat takes one more coordinate, floor(u * num_choices). Values are
  rounded to the grid."""
  F = space.num_freqs
  r = 1.0 - np.cumprod(1.0 - u[..., :F], axis=-1) if space.monotone else u[..., :F]
  factors = 1.0 + space.step * space.num_steps * r
  if space.searches_n_hat:
    choices = np.asarray(space.n_hat_choices)
    n_hat = choices[np.clip((u[..., F] * len(choices)).astype(int), 0, len(choices) - 1)]
  else:
    n_hat = None
  return space.encode(factors, n_hat)


@unit_size.register
def _(space: RcdSearchSpace) -> int:
  return space.num_freqs + 1


@to_unit.register
def _(space: RcdSearchSpace, genomes: np.ndarray) -> np.ndarray:
  """Each pair's own position in its bounds (see `from_unit`), d_rcd's coordinate the middle of
  its value; clipped to [eps, 1 - eps] with eps a quarter grid step, so the round trip is exact."""
  genomes = space.check(genomes)
  k, rcd = genomes[..., :-1].astype(np.float64), genomes[..., -1]
  K, lowest = space.num_steps, space.min_step
  upper = (k - lowest) / max(K - lowest, 1)
  lower = k / max(K, 1) if space.free_below else np.full_like(k, 0.5)
  below = np.arange(space.num_freqs) < rcd[..., None]
  position = (rcd - space.rcd_min + 0.5) / len(space.rcd_choices)
  u = np.concatenate([np.where(below, lower, upper), position[..., None]], axis=-1)
  eps = 0.25 / max(K, 1)
  return np.clip(u, eps, 1.0 - eps)


@from_unit.register
def _(space: RcdSearchSpace, u: np.ndarray) -> np.ndarray:
  """d_rcd = rcd_min + floor(u_F * its number of values); pair i >= d_rcd takes
  lambda_min + u_i (lambda_max - lambda_min), and those values are sorted (order statistics: the
  curve is non-decreasing by construction); pairs below d_rcd follow NTK, or (free_below) take
  u_i (lambda_max - 1) + 1 sorted and capped at lambda_{d_rcd}. Values are rounded to the grid."""
  u = np.asarray(u, np.float64)
  F, K, lowest = space.num_freqs, space.num_steps, space.min_step
  choices = len(space.rcd_choices)
  rcd = space.rcd_min + np.clip((u[..., F] * choices).astype(int), 0, choices - 1)
  below = np.arange(F) < rcd[..., None]
  upper = np.sort(np.where(below, -np.inf, lowest + u[..., :F] * (K - lowest)), axis=-1)
  lower = np.sort(np.where(below, u[..., :F] * K, np.inf), axis=-1)
  k = np.rint(np.where(below, lower, upper)).astype(np.int64)
  return space.with_rcd(np.clip(k, 0, K), rcd)


class EvosaxStrategy:
  """Any evosax 0.3 algorithm over a continuous latent z[D] that decodes to a valid genome:
  u = sigmoid(z) is the space's unit-cube parametrization (`from_unit`; LongRoPE's uses
  stick-breaking, LongRoPE2's order statistics). evosax minimizes, as we do (fitness = NLL); it is
  told the latent it proposed.
  """

  def __init__(self, name: str, space: SearchSpace | RcdSearchSpace, *, population_size: int,
               std_init: float | None = None, **algo_kwargs):
    algorithms = evosax_algorithms()
    if name not in algorithms:
      raise ValueError(f"unknown search strategy {name!r}; choose {PAPER_GA!r} or an evosax "
                       f"algorithm: {sorted(algorithms)}.")
    from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
    self.name, self.space, self.population_size = name, space, population_size
    self.num_dims = unit_size(space)
    if algo_kwargs:
      self.algo = algorithms[name](population_size=population_size,
                                   solution=jnp.zeros(self.num_dims), **algo_kwargs)
    else:
      self.algo = _evosax_algorithm(name, population_size, self.num_dims)
    self.distribution_based = isinstance(self.algo, DistributionBasedAlgorithm)
    self.std_init = std_init

  @property
  def default_params(self) -> Any:
    params = self.algo.default_params
    if self.std_init is not None and hasattr(params, 'std_init'):
      params = params.replace(std_init=jnp.asarray(self.std_init, jnp.float32))
    return params

  def to_latent(self, genomes: np.ndarray) -> np.ndarray:
    """A latent f32[..., D] decoding to each genome (inverse of `from_latent`)."""
    u = to_unit(self.space, genomes)
    return np.log(u / (1.0 - u)).astype(np.float32)

  def from_latent(self, z) -> np.ndarray:
    """Genomes i32[..., G] of latents f32[..., D]."""
    z = np.asarray(z, np.float64)
    return from_unit(self.space, 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0))))

  def init(self, key: jax.Array, population: np.ndarray, fitness: np.ndarray,
           params: Any = None) -> dict:
    """Distribution-based algorithms start at the best candidate, population-based ones from the
    whole evaluated population."""
    params = self.default_params if params is None else params
    z = jnp.asarray(self.to_latent(population))
    fitness = jnp.asarray(_finite(fitness))
    if self.distribution_based:
      algo_state = self.algo.init(key, z[jnp.argmin(fitness)], params)
    else:
      if z.shape[0] != self.population_size:
        raise ValueError(f"{self.name} needs an initial population of {self.population_size}, "
                         f"got {z.shape[0]}.")
      algo_state = self.algo.init(key, z, fitness, params)
    return dict(algo=algo_state, latent=z)

  def ask(self, key: jax.Array, state: dict, params: Any = None) -> tuple[np.ndarray, dict]:
    params = self.default_params if params is None else params
    z, algo_state = self.algo.ask(key, state['algo'], params)
    return self.from_latent(z), dict(algo=algo_state, latent=z)

  def tell(self, key: jax.Array, population: np.ndarray, fitness: np.ndarray, state: dict,
           params: Any = None) -> dict:
    del population  # the algorithm is told the latents it proposed
    params = self.default_params if params is None else params
    algo_state, _ = self.algo.tell(key, state['latent'], jnp.asarray(_finite(fitness)),
                                   state['algo'], params)
    return dict(algo=algo_state, latent=state['latent'])
