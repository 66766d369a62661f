"""Search strategies over a `SearchSpace`, all on evosax's init / ask / tell protocol.

`PaperGA` is LongRoPE's genetic algorithm (Ding et al., 2024, Algorithm 1) with its operators
(`mutate`, `crossover`, `initial_population`); `EvosaxStrategy` runs any evosax 0.3 algorithm
through a continuous latent that decodes to valid, monotone genomes. Strategies work on integer
genomes i32[P, G]; their states are pytrees of fixed-shape arrays (checkpointed by the loop).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Container, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax.search_space import SearchSpace

PAPER_GA = 'paper_ga'


def numpy_rng(key: jax.Array) -> np.random.Generator:
  """A numpy generator determined by a JAX key (host-side operators stay reproducible)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def mutate(space: SearchSpace, genome: np.ndarray, rng: np.random.Generator,
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


def crossover(space: SearchSpace, a: np.ndarray, b: np.ndarray,
              rng: np.random.Generator) -> np.ndarray | None:
  """Takes each gene (and n_hat) from `a` or `b` at random; None if it breaks monotonicity."""
  child = np.where(rng.random(space.genome_size) < 0.5, a, b)
  if space.monotone and np.any(np.diff(child[:-1]) < 0):
    return None
  return child


def initial_population(space: SearchSpace, seeds: Mapping[str, np.ndarray], size: int,
                       rng: np.random.Generator, *, mutation_prob: float = 0.3,
                       max_tries: int = 64) -> np.ndarray:
  """Distinct seeds first, then distinct mutations of random seeds, up to i32[size, G]."""
  rows, seen = [], set()
  for genome in seeds.values():
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
  """LongRoPE's search (Ding et al., 2024, Algorithm 1) as an evosax-style strategy.

  Each generation keeps the top `num_parents` candidates and adds `num_mutations` mutations and
  `num_crossovers` crossovers of them, every one a candidate never proposed before (`archive`:
  the search loop's record of evaluated genomes, as bytes), so the population is parents +
  children = population_size.
  """

  def __init__(self, space: SearchSpace, *, population_size: int = 64, num_parents: int = 32,
               num_mutations: int = 16, num_crossovers: int = 16, mutation_prob: float = 0.3,
               archive: Container[bytes] = (), max_tries: int = 64):
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


class EvosaxStrategy:
  """Any evosax 0.3 algorithm over a continuous latent z[D] that decodes to a valid genome.

  Monotone spaces use stick-breaking: u = sigmoid(z), r_i = 1 - prod_{j <= i} (1 - u_j),
  lambda_i = 1 + step * K * r_i (K the largest grid index), non-decreasing by construction;
  otherwise r = u. A searched n_hat takes one more coordinate, floor(sigmoid(z) * num_choices).
  Decoded values are rounded to the grid. evosax minimizes, as we do (fitness = NLL); it is told
  the latent it proposed.
  """

  def __init__(self, name: str, space: SearchSpace, *, population_size: int,
               std_init: float | None = None, **algo_kwargs):
    algorithms = evosax_algorithms()
    if name not in algorithms:
      raise ValueError(f"unknown search strategy {name!r}; choose {PAPER_GA!r} or an evosax "
                       f"algorithm: {sorted(algorithms)}.")
    from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
    self.name, self.space, self.population_size = name, space, population_size
    self.num_dims = space.num_freqs + (1 if space.searches_n_hat else 0)
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

  def to_latent(self, genomes: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """A latent f32[..., D] decoding to each genome (inverse of `from_latent`)."""
    genomes = self.space.check(genomes)
    K = max(self.space.num_steps, 1)
    r = np.clip(genomes[..., :-1] / K, 0.0, 1.0 - eps)
    if self.space.monotone:
      prev = np.concatenate([np.zeros_like(r[..., :1]), r[..., :-1]], axis=-1)
      u = 1.0 - (1.0 - r) / (1.0 - prev)
    else:
      u = r
    parts = [u]
    if self.space.searches_n_hat:
      parts.append(((genomes[..., -1:] + 0.5) / len(self.space.n_hat_choices)))
    u = np.clip(np.concatenate(parts, axis=-1), eps, 1.0 - eps)
    return np.log(u / (1.0 - u)).astype(np.float32)

  def from_latent(self, z) -> np.ndarray:
    """Genomes i32[..., G] of latents f32[..., D]."""
    z = np.asarray(z, np.float64)
    u = 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))
    F = self.space.num_freqs
    r = 1.0 - np.cumprod(1.0 - u[..., :F], axis=-1) if self.space.monotone else u[..., :F]
    factors = 1.0 + self.space.step * self.space.num_steps * r
    if self.space.searches_n_hat:
      choices = np.asarray(self.space.n_hat_choices)
      n_hat = choices[np.clip((u[..., F] * len(choices)).astype(int), 0, len(choices) - 1)]
    else:
      n_hat = None
    return self.space.encode(factors, n_hat)

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
