"""LongRoPE's evolutionary search for per-frequency rescale factors (Ding et al., 2024, sec. 3.2).

A candidate is a genome i32[G], G = F + 1: grid indices k_i of the factors
lambda_i = 1 + step * k_i, then the index of n_hat among the space's choices. A population of
genomes decodes to a stacked `RopeScaling`; its fitness (mean next-token NLL on N windows of
length L') comes from one compiled call: `jax.vmap` over candidates, candidates sharded over the
'pop' mesh axis, chunked to fit memory, documents micro-batched.

Every strategy follows evosax's init / ask / tell protocol, so one loop runs them all: the paper's
genetic algorithm (`PaperGA`) and any evosax 0.3 algorithm (`EvosaxStrategy`) through a continuous
parametrization that is valid by construction. The loop checkpoints its whole state with orbax
every generation and resumes to exactly the uninterrupted result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from tqdm.auto import tqdm

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax.rope import RopeScaling

# Seeds of the first population (LongRoPE seeds PI, NTK and YaRN; dynamic NTK at L' is added).
SEED_METHODS = ('linear', 'ntk', 'yarn', 'dynamic_ntk')
PAPER_GA = 'paper_ga'


# ----------------------------------------------------------------------------- search space
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


def make_space(*, head_dim: int, original_length: int, target_length: int,
               lambda_max: float | None = None, step: float = 0.01, monotone: bool = True,
               search_n_hat: bool = True, n_hat: int = 0,
               n_hat_choices: tuple[int, ...] | None = None,
               attn_scale: float | None = None) -> SearchSpace:
  """The paper's space for extending `original_length` to `target_length` (s = L' / L).

  lambda_max defaults to 1.25 s; n_hat choices default to the paper's set up to L'; attn_scale
  defaults to LongRoPE's sqrt(1 + ln s / ln L).
  """
  if original_length < 2 or target_length < original_length:
    raise ValueError(f"target_length ({target_length}) must be at least the original length "
                     f"({original_length}): the search extends the context window.")
  scale = target_length / original_length
  lambda_max = 1.25 * scale if lambda_max is None else float(lambda_max)
  if lambda_max < 1.0:
    raise ValueError(f"lambda_max must be >= 1 (factors lie in [1, lambda_max]; the paper uses "
                     f"1.25 * s = {1.25 * scale:g}), got {lambda_max}.")
  if search_n_hat:
    if n_hat_choices is None:
      n_hat_choices = tuple(c for c in rope_lib.N_HAT_CHOICES if c < target_length)
    beyond = [c for c in n_hat_choices if c >= target_length]
    if beyond:
      raise ValueError(f"n_hat choices {beyond} reach beyond the target length L' = "
                       f"{target_length}; keep n_hat_choices below L'.")
  else:
    if not 0 <= n_hat < target_length:
      raise ValueError(f"the fixed n_hat ({n_hat}) must lie in [0, L' = {target_length}).")
    n_hat_choices = (int(n_hat),)
  if attn_scale is None:
    attn_scale = rope_lib.longrope_attention_scale(scale, original_length)
  return SearchSpace(num_freqs=head_dim // 2, lambda_max=lambda_max, step=step,
                     monotone=monotone, n_hat_choices=tuple(n_hat_choices),
                     attn_scale=float(attn_scale))


# ----------------------------------------------------------------------------- seeds, operators
def seed_genomes(space: SearchSpace, *, head_dim: int, theta: float, original_length: int,
                 target_length: int, methods: tuple[str, ...] = SEED_METHODS
                 ) -> dict[str, np.ndarray]:
  """Each seed method at L' projected into the space (n_hat = the choice nearest 0)."""
  kwargs = rope_lib.method_kwargs(head_dim=head_dim, theta=theta, original_length=original_length,
                                  length=target_length)
  return {m: space.encode(np.asarray(rope_lib.get(m, **kwargs).factors)) for m in methods}


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
  `num_crossovers` crossovers of them, every one a candidate never proposed before (the state
  holds an archive of all of them), so the population is parents + children = population_size.
  """

  def __init__(self, space: SearchSpace, *, population_size: int = 64, num_parents: int = 32,
               num_mutations: int = 16, num_crossovers: int = 16, max_generations: int = 40,
               max_tries: int = 64):
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
    self.archive_size = population_size + max_generations * (num_mutations + num_crossovers)
    self.max_tries = max_tries

  @property
  def default_params(self) -> GAParams:
    return GAParams()

  def init(self, key: jax.Array, population: np.ndarray, fitness: np.ndarray,
           params: GAParams | None = None) -> dict:
    del key, params
    population = self.space.check(population)
    archive = np.zeros((self.archive_size, self.space.genome_size), np.int32)
    archive[:len(population)] = population
    return dict(population=population, fitness=_finite(fitness), archive=archive,
                archive_count=np.asarray(len(population), np.int32))

  def ask(self, key: jax.Array, state: dict, params: GAParams | None = None
          ) -> tuple[np.ndarray, dict]:
    params = params or self.default_params
    rng = numpy_rng(key)
    count = int(state['archive_count'])
    new = self.num_mutations + self.num_crossovers
    if count + new > self.archive_size:
      raise ValueError(f"the GA archive holds {self.archive_size} candidates; build PaperGA with "
                       "max_generations covering every generation you run.")
    order = np.argsort(state['fitness'], kind='stable')
    parents = state['population'][order[:self.num_parents]]
    seen = {g.tobytes() for g in state['archive'][:count]}
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
        if child is not None and child.tobytes() not in seen:
          break
      seen.add(child.tobytes())  # a repeat only if the neighbourhood is exhausted
      children.append(child)
    population = np.concatenate([parents, np.asarray(children, np.int32).reshape(
        new, self.space.genome_size)])
    archive = state['archive'].copy()
    archive[count:count + new] = population[self.num_parents:]
    return population, dict(state, archive=archive,
                            archive_count=np.asarray(count + new, np.int32))

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


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Search hyper-parameters; the defaults are the paper's (population 64, 32 parents, 16
  mutations and 16 crossovers with p = 0.3, 40 generations; lambda in [1, 1.25 s] on a 0.01
  grid, monotone; n_hat searched)."""

  strategy: str = PAPER_GA          # 'paper_ga' or an evosax algorithm name (CMA_ES, SNES, ...)
  population: int = 64
  parents: int = 32
  mutations: int = 16
  crossovers: int = 16
  mutation_prob: float = 0.3
  generations: int = 40
  max_evaluations: int = 0          # stop once this many candidates were evaluated (0: no cap)
  lambda_max: float = 0.0           # 0: 1.25 * s
  lambda_step: float = 0.01
  monotone: bool = True
  search_n_hat: bool = True
  n_hat: int = 0                    # the fixed n_hat when search_n_hat is False
  n_hat_choices: tuple[int, ...] = ()   # (): the paper's set below L'
  attn_scale: float = 0.0           # 0: sqrt(1 + ln s / ln L)
  es_std: float = 1.0               # evosax: initial std in latent (logit) space
  doc_batch: int = 1                # eval windows per micro-batch
  chunk: int = 0                    # candidates per device per step (0: from memory_gb)
  memory_gb: float = 2.0            # activation memory per device for the fitness call
  mesh_pop: int = 0                 # devices on the 'pop' axis (0: all)
  attention: str = ''               # the model's attention for the search ('': as configured)

  def __post_init__(self):
    for name in ('population', 'parents', 'generations', 'doc_batch'):
      if getattr(self, name) < 1:
        raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}.")
    if not 0.0 <= self.mutation_prob <= 1.0:
      raise ValueError(f"search.mutation_prob must lie in [0, 1], got {self.mutation_prob}.")
    if self.population < self.parents:
      raise ValueError(f"search.population ({self.population}) is smaller than search.parents "
                       f"({self.parents}); the population must hold the parents.")

  @classmethod
  def from_config(cls, config: Mapping,
                  ignore: tuple[str, ...] = ('split', 'multiple', 'num_windows')
                  ) -> 'SearchConfig':
    """Builds from a mapping (e.g. an ml_collections section), skipping the pipeline's keys."""
    config = dict(config.items())
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if k not in fields and k not in ignore)
    if unknown:
      raise ValueError(f"unknown search settings {unknown}; known: {sorted(fields)}.")
    values = {k: v for k, v in config.items() if k in fields}
    if 'n_hat_choices' in values:
      values['n_hat_choices'] = tuple(int(c) for c in values['n_hat_choices'])
    return cls(**values)


PAPER = SearchConfig()


def make_strategy(settings: SearchConfig, space: SearchSpace):
  """The strategy named by settings.strategy over `space`."""
  if settings.strategy == PAPER_GA:
    return PaperGA(space, population_size=settings.population, num_parents=settings.parents,
                   num_mutations=settings.mutations, num_crossovers=settings.crossovers,
                   max_generations=settings.generations)
  return EvosaxStrategy(settings.strategy, space, population_size=settings.population,
                        std_init=settings.es_std)


# ----------------------------------------------------------------------------- fitness
def auto_chunk(config: model_lib.ModelConfig, length: int, doc_batch: int,
               memory_bytes: float) -> int:
  """Candidates per device per step so one step's activations fit `memory_bytes` (rough f32
  estimate: one layer's attention scores, MLP and residual activations, and the logits)."""
  attn_keys = length if config.attention == 'dense' else min(length, config.block_k)
  per_candidate = 4 * doc_batch * length * (config.num_heads * attn_keys + 6 * config.dim +
                                            3 * config.mlp_dim + 2 * config.vocab_size)
  return max(1, int(memory_bytes // per_candidate))


class PopulationFitness:
  """Mean next-token NLL of every candidate of a stacked `RopeScaling` on windows[N, L'].

  One jitted call per population: candidates are placed round-robin over the 'pop' mesh axis
  (`jax.shard_map`); on each device `lax.map` walks chunks of `chunk` candidates, `jax.vmap`
  evaluates a chunk, `lax.scan` walks the documents `doc_batch` at a time, and a chunk holding no
  candidate is skipped (`lax.cond`). Shapes are fixed by `max_population`, so a whole search
  compiles once; `traces` counts compilations.
  """

  def __init__(self, config: model_lib.ModelConfig, params: Any, windows_NL: np.ndarray, *,
               length: int | None = None, max_population: int,
               mesh: jax.sharding.Mesh | None = None,
               chunk: int = 0, doc_batch: int = 1, memory_bytes: float = 2e9,
               base_factors: np.ndarray | None = None):
    windows_NL = np.asarray(windows_NL)
    if windows_NL.ndim != 2 or windows_NL.shape[0] < 1:
      raise ValueError(f"eval windows must be i32[N, L] with N >= 1, got shape "
                       f"{windows_NL.shape}.")
    length = windows_NL.shape[1] if length is None else int(length)
    if windows_NL.shape[1] < length:
      raise ValueError(f"eval windows have {windows_NL.shape[1]} tokens, shorter than the target "
                       f"length L' = {length}; use documents of at least L' tokens "
                       "(data.eval_windows(docs, L', N)).")
    if max_population < 1 or doc_batch < 1 or chunk < 0:
      raise ValueError(f"max_population and doc_batch must be >= 1 and chunk >= 0, got "
                       f"{max_population}, {doc_batch}, {chunk}.")
    self.config, self.length = config, length
    # Progressive extension: candidates' factors multiply these (the first stage's factors).
    self.base_factors = None if base_factors is None else np.asarray(base_factors, np.float32)
    self.mesh = mesh_lib.population_mesh() if mesh is None else mesh
    self.pop_devices = mesh_lib.population_axis_size(self.mesh)
    local = -(-max_population // self.pop_devices)
    chunk = chunk or auto_chunk(config, length, doc_batch, memory_bytes)
    self.chunk = min(chunk, local)
    self.local = -(-local // self.chunk) * self.chunk
    self.capacity = self.local * self.pop_devices
    windows_NL = windows_NL[:, :length].astype(np.int32)
    N = windows_NL.shape[0]
    doc_batch = min(doc_batch, N)
    num_batches = -(-N // doc_batch)
    pad = num_batches * doc_batch - N
    windows_NL = np.concatenate([windows_NL, np.repeat(windows_NL[-1:], pad, axis=0)])
    weights_N = np.concatenate([np.ones(N, np.float32), np.zeros(pad, np.float32)])
    self.num_tokens = N * (length - 1)
    replicated = mesh_lib.replicated_sharding(self.mesh)
    self._params = jax.device_put(params, replicated)
    self._windows_bBL = jax.device_put(windows_NL.reshape(num_batches, doc_batch, length),
                                       replicated)
    self._weights_bB = jax.device_put(weights_N.reshape(num_batches, doc_batch), replicated)
    self.traces = 0
    pop = PartitionSpec(mesh_lib.POP_AXIS)
    self._fn = jax.jit(jax.shard_map(
        self._local, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(),
                                               pop, pop),
        out_specs=pop))

  def _local(self, params, windows_bBL, weights_bB, rope: RopeScaling, active_P):
    """Summed NLL / token count per local candidate f32[P_local]; inactive slots get inf."""
    self.traces += 1
    num_chunks, C = self.local // self.chunk, self.chunk
    config, num_tokens = self.config, self.num_tokens

    def candidate_nll(one: RopeScaling):
      def body(total, batch):
        windows_BL, weights_B = batch
        nll_B = model_lib.token_nll(config, params, windows_BL, one).sum(axis=-1)
        return total + jnp.sum(nll_B * weights_B), None

      zero = jnp.zeros_like(one.attn_scale)  # varies over 'pop', like the sum it starts
      total, _ = jax.lax.scan(body, zero, (windows_bBL, weights_bB))
      return total / num_tokens

    def chunk_nll(inputs):
      rope_C, active_C = inputs
      return jax.lax.cond(jnp.any(active_C), jax.vmap(candidate_nll),
                          lambda r: jnp.full_like(r.attn_scale, jnp.inf), rope_C)

    rope_cC = jax.tree.map(lambda x: x.reshape(num_chunks, C, *x.shape[1:]), rope)
    nll_cC = jax.lax.map(chunk_nll, (rope_cC, active_P.reshape(num_chunks, C)))
    return jnp.where(active_P, nll_cC.reshape(-1), jnp.inf)

  def slots(self, num: int) -> np.ndarray:
    """Buffer slot of each of `num` candidates: round-robin over devices, front of each block."""
    j = np.arange(num)
    return (j % self.pop_devices) * self.local + j // self.pop_devices

  def __call__(self, rope: RopeScaling) -> np.ndarray:
    """Mean NLL f32[P] of a stacked RopeScaling with P <= capacity candidates."""
    P = rope.factors.shape[0]
    if self.base_factors is not None:
      rope = dataclasses.replace(rope, factors=np.asarray(rope.factors) * self.base_factors)
    if not 1 <= P <= self.capacity:
      raise ValueError(f"this fitness evaluates 1 to {self.capacity} candidates per call "
                       f"(max_population), got {P}.")
    slots = self.slots(P)
    fill = np.zeros(self.capacity, np.int64)  # unused slots repeat candidate 0 (always valid)
    fill[slots] = np.arange(P)
    active = np.zeros(self.capacity, bool)
    active[slots] = True
    buffer = jax.tree.map(lambda x: np.asarray(x)[fill], rope)
    sharding = mesh_lib.population_sharding(self.mesh)
    buffer, active = jax.device_put((buffer, active), sharding)
    nll = self._fn(self._params, self._windows_bBL, self._weights_bB, buffer, active)
    return mesh_lib.to_host(nll)[slots]


# ----------------------------------------------------------------------------- the search loop
@dataclasses.dataclass
class SearchResult:
  """The best candidate found and the search's record."""

  factors: np.ndarray
  n_hat: int
  attn_scale: float
  nll: float
  scale: float
  original_length: int
  target_length: int
  strategy: str
  generations: int
  evaluations: int
  history: list
  seeds: dict
  genome: np.ndarray

  @property
  def perplexity(self) -> float:
    return math.exp(self.nll)

  def rope(self) -> RopeScaling:
    return rope_lib.make(self.factors, self.n_hat, self.attn_scale)

  def to_json(self) -> dict:
    return dict(factors=[round(float(f), 6) for f in self.factors], n_hat=int(self.n_hat),
                attn_scale=float(self.attn_scale), scale=float(self.scale),
                original_length=int(self.original_length),
                target_length=int(self.target_length), nll=float(self.nll),
                perplexity=self.perplexity, strategy=self.strategy,
                generations=int(self.generations), evaluations=int(self.evaluations),
                seeds=self.seeds, fitness='validation mean NLL (nats / token)')


def rope_from_json(record: Mapping) -> RopeScaling:
  """The RopeScaling of a saved result (best_factors.json or results.json['search'])."""
  return rope_lib.make(record['factors'], record['n_hat'], record['attn_scale'])


class _Archive:
  """Every evaluated genome and its fitness (so none is evaluated twice), fixed capacity."""

  def __init__(self, capacity: int, genome_size: int):
    self.genomes = np.zeros((capacity, genome_size), np.int32)
    self.fitness = np.full(capacity, np.inf, np.float32)
    self.count = 0
    self.index: dict[bytes, int] = {}

  def load(self, genomes, fitness, count) -> None:
    self.genomes, self.fitness, self.count = np.array(genomes), np.array(fitness), int(count)
    self.index = {g.tobytes(): i for i, g in enumerate(self.genomes[:self.count])}

  def evaluate(self, genomes: np.ndarray, fitness_fn: Callable[[np.ndarray], np.ndarray]
               ) -> tuple[np.ndarray, int]:
    """Fitness of each genome, calling fitness_fn only on genomes never seen; (fitness, new)."""
    pending, queued = [], set()
    for g in genomes:
      if g.tobytes() not in self.index and g.tobytes() not in queued:
        queued.add(g.tobytes())
        pending.append(g)
    if pending:
      if self.count + len(pending) > len(self.genomes):
        raise ValueError(f"the search archive is full ({len(self.genomes)} candidates).")
      new = np.asarray(fitness_fn(np.stack(pending)), np.float32)
      for g, f in zip(pending, new):
        self.genomes[self.count], self.fitness[self.count] = g, f
        self.index[g.tobytes()] = self.count
        self.count += 1
    return np.asarray([self.fitness[self.index[g.tobytes()]] for g in genomes],
                      np.float32), len(pending)

  def best(self) -> int:
    return int(np.argmin(np.where(np.isnan(self.fitness[:self.count]), np.inf,
                                  self.fitness[:self.count])))


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def search(model_config: model_lib.ModelConfig, params: Any, windows_NL: np.ndarray, *,
           target_length: int, settings: SearchConfig = PAPER,
           workdir: str | pathlib.Path | None = None, seed: int = 0,
           mesh: jax.sharding.Mesh | None = None, progress: bool = True,
           fitness: PopulationFitness | None = None,
           on_generation: Callable[[dict], None] | None = None) -> SearchResult:
  """Searches LongRoPE factors extending model_config.original_length to `target_length`.

  Fitness is the mean NLL on windows_NL (validation documents, truncated to L'). With a
  `workdir`, the state is checkpointed there every generation (workdir/ckpt) and a rerun resumes
  it; best_factors.json / .csv, history.jsonl and plots are written there.
  """
  if settings.attention:
    model_config = model_config.replace(attention=settings.attention)
  L0 = model_config.original_length
  space = make_space(head_dim=model_config.head_dim, original_length=L0,
                     target_length=target_length, lambda_max=settings.lambda_max or None,
                     step=settings.lambda_step, monotone=settings.monotone,
                     search_n_hat=settings.search_n_hat, n_hat=settings.n_hat,
                     n_hat_choices=settings.n_hat_choices or None,
                     attn_scale=settings.attn_scale or None)
  strategy = make_strategy(settings, space)
  if fitness is None:
    if mesh is None:
      mesh = mesh_lib.population_mesh(settings.mesh_pop or None)
    fitness = PopulationFitness(model_config, params, windows_NL, length=target_length,
                                max_population=settings.population, mesh=mesh,
                                chunk=settings.chunk, doc_batch=settings.doc_batch,
                                memory_bytes=settings.memory_gb * 2**30)
  elif fitness.length != target_length or fitness.capacity < settings.population:
    raise ValueError("the given fitness was built for another target length or a smaller "
                     "population.")
  seeds = seed_genomes(space, head_dim=model_config.head_dim, theta=model_config.rope_theta,
                       original_length=L0, target_length=target_length)
  archive = _Archive(settings.population * (settings.generations + 1), space.genome_size)
  evaluate = lambda genomes: fitness(space.rope(genomes))
  meta_expected = dict(strategy=settings.strategy, space=dataclasses.asdict(space),
                       population=settings.population, generations=settings.generations,
                       target_length=target_length, original_length=L0, seed=seed)

  workdir = None if workdir is None else ckpt_lib.abspath(workdir)
  mngr = None if workdir is None else ckpt_lib.manager(workdir / 'ckpt')
  state = None
  if mngr is not None and mngr.latest_step() is not None:
    state, history, seed_nll = _restore(mngr, strategy, space, settings, archive, meta_expected)
    _write_history(workdir, history)  # a kill between checkpoint and history loses no line
  if state is None:
    key = jax.random.key(seed)
    key, k_init, k_strategy = jax.random.split(key, 3)
    population = initial_population(space, seeds, settings.population, numpy_rng(k_init),
                                    mutation_prob=settings.mutation_prob)
    t0 = time.time()
    fit, new = archive.evaluate(population, evaluate)
    state = dict(generation=0, key=key,
                 strategy=strategy.init(k_strategy, population, fit))
    seed_nll = {name: float(archive.fitness[archive.index[g.tobytes()]])
                for name, g in seeds.items()}
    history = [_record(0, archive, fit, new, time.time() - t0)]
    _save(mngr, state, archive, history, seed_nll, meta_expected, workdir)
    if on_generation is not None:
      on_generation(history[-1])

  bar = tqdm(total=settings.generations, initial=state['generation'], desc='search',
             disable=not progress, dynamic_ncols=True)
  bar.set_postfix(best_ppl=f"{history[-1]['best_perplexity']:.4f}", evals=archive.count)
  while state['generation'] < settings.generations and not (
      settings.max_evaluations and archive.count >= settings.max_evaluations):
    t0 = time.time()
    key, k_ask, k_tell = jax.random.split(state['key'], 3)
    population, strategy_state = strategy.ask(k_ask, state['strategy'])
    fit, new = archive.evaluate(population, evaluate)
    strategy_state = strategy.tell(k_tell, population, fit, strategy_state)
    generation = state['generation'] + 1
    state = dict(generation=generation, key=key, strategy=strategy_state)
    history.append(_record(generation, archive, fit, new, time.time() - t0))
    _save(mngr, state, archive, history, seed_nll, meta_expected, workdir)
    bar.set_postfix(best_ppl=f"{history[-1]['best_perplexity']:.4f}", evals=archive.count)
    bar.update(1)
    if on_generation is not None:
      on_generation(history[-1])
  bar.close()

  best = archive.best()
  factors, n_hat = space.decode(archive.genomes[best])
  result = SearchResult(
      factors=factors, n_hat=int(n_hat), attn_scale=space.attn_scale,
      nll=float(archive.fitness[best]), scale=target_length / L0, original_length=L0,
      target_length=target_length, strategy=settings.strategy,
      generations=int(state['generation']), evaluations=archive.count, history=history,
      seeds={m: dict(nll=v, perplexity=math.exp(v)) for m, v in seed_nll.items()},
      genome=archive.genomes[best].copy())
  if workdir is not None:
    write_outputs(result, workdir, model_config)
  return result


def _record(generation: int, archive: _Archive, fit: np.ndarray, new: int,
            seconds: float) -> dict:
  finite = fit[np.isfinite(fit)]
  best = float(archive.fitness[archive.best()])
  mean = float(finite.mean()) if finite.size else float('inf')
  return dict(generation=generation, best_nll=best, best_perplexity=math.exp(best),
              mean_nll=mean, mean_perplexity=float(np.exp(finite).mean()) if finite.size
              else float('inf'), evaluations=archive.count, new=new, seconds=round(seconds, 3))


def _checkpoint_state(state: dict, archive: _Archive) -> dict:
  return dict(generation=np.asarray(state['generation'], np.int32),
              key=np.asarray(jax.random.key_data(state['key'])),
              strategy=_to_numpy(jax.tree.leaves(state['strategy'])),
              archive=archive.genomes, archive_fitness=archive.fitness,
              archive_count=np.asarray(archive.count, np.int32))


def _save(mngr, state, archive, history, seed_nll, meta, workdir) -> None:
  """Checkpoints the whole state (synchronously), then rewrites history.jsonl from it."""
  if mngr is None:
    return
  ckpt_lib.save(mngr, int(state['generation']), _checkpoint_state(state, archive),
                meta=dict(meta, history=history, seeds=seed_nll))
  _write_history(workdir, history)


def _write_history(workdir: pathlib.Path, history: list[dict]) -> None:
  ckpt_lib.write_text(workdir / 'history.jsonl', ''.join(json.dumps(h) + '\n' for h in history))


def _restore(mngr, strategy, space: SearchSpace, settings: SearchConfig, archive: _Archive,
             expected: dict):
  """The checkpointed (state, history, seed NLLs), or a ValueError if it is another search."""
  restored_meta = mngr.restore(mngr.latest_step(), args=ckpt_lib.ocp.args.Composite(
      meta=ckpt_lib.ocp.args.JsonRestore()))['meta']
  for k, v in expected.items():
    if ckpt_lib.to_json(v) != ckpt_lib.to_json(restored_meta.get(k)):
      raise ValueError(f"{mngr.directory} holds a search with a different {k} "
                       f"({restored_meta.get(k)!r} != {ckpt_lib.to_json(v)!r}); use a fresh "
                       "workdir (or delete search/) for a different search.")
  dummy = np.zeros((settings.population, space.genome_size), np.int32)
  template_strategy = strategy.init(jax.random.key(0), dummy,
                                    np.zeros(settings.population, np.float32))
  treedef = jax.tree.structure(template_strategy)
  template = _checkpoint_state(dict(generation=0, key=jax.random.key(0),
                                    strategy=template_strategy), archive)
  restored = ckpt_lib.restore(mngr, template)
  leaves = [np.asarray(x) for x in restored['strategy']]
  if isinstance(strategy, EvosaxStrategy):
    leaves = [jnp.asarray(x) for x in leaves]
  state = dict(generation=int(restored['generation']),
               key=jax.random.wrap_key_data(np.asarray(restored['key'])),
               strategy=jax.tree.unflatten(treedef, leaves))
  archive.load(restored['archive'], restored['archive_fitness'], restored['archive_count'])
  return state, list(restored_meta['history']), dict(restored_meta['seeds'])


# ----------------------------------------------------------------------------- outputs
def write_outputs(result: SearchResult, directory: str | pathlib.Path,
                  model_config: model_lib.ModelConfig | None = None) -> None:
  """best_factors.json, best_factors.csv (one factor per line), fitness.png and factors.png."""
  from longrope_jax import plots
  directory = ckpt_lib.abspath(directory)
  ckpt_lib.write_json(directory / 'best_factors.json', result.to_json())
  ckpt_lib.write_text(directory / 'best_factors.csv',
                      ''.join(f'{f:.2f}\n' for f in result.factors))
  plots.fitness_curve(result.history, directory / 'fitness.png',
                      title=f'{result.strategy} search at {result.scale:g}x (validation)')
  if model_config is not None:
    kwargs = rope_lib.method_kwargs(head_dim=model_config.head_dim, theta=model_config.rope_theta,
                                    original_length=result.original_length,
                                    length=result.target_length)
    curves = {f'longrope (searched, n_hat={result.n_hat})': result.factors}
    curves.update({name: np.asarray(rope_lib.get(m, **kwargs).factors) for name, m in
                   (('PI', 'linear'), ('NTK', 'ntk'), ('YaRN', 'yarn'))})
    plots.factor_curves(curves, directory / 'factors.png',
                        title=f'Rescale factors at {result.scale:g}x',
                        critical_dim=rope_lib.critical_dimension(
                            model_config.head_dim, model_config.rope_theta,
                            result.original_length))


def markdown_summary(record: Mapping, directory: str = 'search') -> str:
  """Validation fitness of the seeds and of the best candidate (for report.md)."""
  lines = [f"Strategy `{record['strategy']}`, {record['generations']} generations, "
           f"{record['evaluations']} candidates evaluated, target {record['target_length']} "
           f"tokens ({record['scale']:g}x); best n_hat = {record['n_hat']}, attention scale "
           f"{record['attn_scale']:.4f}.", '',
           '| candidate | validation perplexity |', '|---|---|']
  for name, v in record.get('seeds', {}).items():
    lines.append(f"| seed {name} | {v['perplexity']:.4f} |")
  lines += [f"| **searched** | **{record['perplexity']:.4f}** |", '',
            f'![fitness]({directory}/fitness.png) ![factors]({directory}/factors.png)']
  return '\n'.join(lines)
