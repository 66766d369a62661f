"""LongRoPE's search loop (Ding et al., 2024, sec. 3.2): settings, the archive of evaluated
candidates, checkpointed generations, the result and its files.

One loop runs every strategy (`strategies.py`) over the space of an `rope.Extension`
(`search_space.py`), each generation's fitness coming from one compiled population call
(`fitness.py`). Progressive extension is the same call with `base` factors: candidates multiply
them, on a model fine-tuned at the extension's `base_length`. The whole state is checkpointed
with orbax every generation and a rerun resumes to exactly the uninterrupted result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import checks
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import plots
from longrope_jax import rope as rope_lib
from longrope_jax.fitness import PopulationFitness
from longrope_jax.rope import Extension, RopeScaling
from longrope_jax.search_space import (RcdSearchSpace, SearchSpace, make_rcd_space, make_space,
                                       seed_genomes)
from longrope_jax.strategies import PAPER_GA, EvosaxStrategy, PaperGA, initial_population, numpy_rng


def _check_strategy(value: Any, field: str) -> None:
  if value == PAPER_GA:
    return
  from evosax.algorithms import algorithms  # evosax is imported only when asked for
  if value not in algorithms:
    checks.fail(field, value,
                f"{PAPER_GA!r} or an evosax algorithm ({', '.join(sorted(algorithms))})",
                f"set --config.{field}={PAPER_GA} or e.g. --config.{field}=CMA_ES")


# The rules of SearchConfig's fields (config sections search.settings, progressive.search).
SEARCH_SETTINGS_RULES: dict[str, checks.Rule] = {
    'strategy': checks.Rule(checks.Check(_check_strategy, f"{PAPER_GA!r} or the name of an "
                                         "evosax algorithm (CMA_ES, SNES, ...)"),
                            "the search strategy: the paper's GA or an evosax algorithm"),
    'space': checks.Rule(checks.choice(lambda: SPACES),
                         "the search space: 'longrope' (per-dimension factors in [1, lambda_max] "
                         "and n_hat), 'longrope2' (LongRoPE2: d_rcd a gene, factors in [s, 2s] "
                         "from it, NTK below), 'longrope2_free' (LongRoPE2 without the NTK "
                         "constraint below d_rcd)"),
    'population': checks.Rule(checks.positive_int, 'candidates per generation'),
    'parents': checks.Rule(checks.positive_int, 'paper_ga: top candidates kept as parents'),
    'mutations': checks.Rule(checks.non_negative_int, 'paper_ga: mutated children per generation'),
    'crossovers': checks.Rule(checks.non_negative_int,
                              'paper_ga: crossover children per generation'),
    'mutation_prob': checks.Rule(checks.fraction, 'paper_ga: probability of resampling each gene'),
    'generations': checks.Rule(checks.positive_int, 'generations after the initial population'),
    'max_evaluations': checks.Rule(checks.optional(checks.positive_int),
                                   'stop after this many candidates (None: no cap)'),
    'lambda_max': checks.Rule(checks.optional(checks.at_least(1.0)),
                              'largest factor (None: 1.25 s)'),
    'lambda_step': checks.Rule(checks.positive_float, 'grid step of the factors'),
    'monotone': checks.Rule(checks.boolean, 'factors non-decreasing with the frequency index'),
    'search_n_hat': checks.Rule(checks.boolean,
                                'search n_hat among n_hat_choices (else fixed at n_hat)'),
    'n_hat': checks.Rule(checks.non_negative_int, 'the fixed n_hat when it is not searched'),
    'n_hat_choices': checks.Rule(checks.optional(checks.tuple_of(checks.non_negative_int)),
                                 "n_hat choices (None: the paper's set below L')"),
    'attn_scale': checks.Rule(checks.optional(checks.positive_float),
                              'attention scale of every candidate (None: sqrt(1 + ln s / ln L0))'),
    'es_std': checks.Rule(checks.positive_float,
                          'evosax strategies: initial standard deviation in the latent space'),
    'doc_batch': checks.Rule(checks.positive_int, 'fitness documents per micro-batch'),
    'chunk': checks.Rule(checks.optional(checks.positive_int),
                         'candidates per device per step (None: from memory_gb)'),
    'memory_gb': checks.Rule(checks.positive_float,
                             'activation memory per device for the fitness call (GiB)'),
    'attention': checks.Rule(checks.optional(checks.choice(model_lib.ATTENTION)),
                             'attention implementation of the fitness call (None: '
                             'model.attention)'),
}


def check_search_settings(settings: Mapping, prefix: str = 'search.settings') -> None:
  """Every SearchConfig field present in `settings`, then the cross-field rules (names reported
  as prefix.field)."""
  checks.check_section(settings, SEARCH_SETTINGS_RULES, prefix)
  population, parents = settings.get('population'), settings.get('parents')
  if population is not None and parents is not None and parents > population:
    raise checks.ConfigError(
        f'{prefix}.parents', f"{prefix}.population ({population}) is smaller than "
        f"{prefix}.parents ({parents}); the population must hold the parents: raise "
        f"{prefix}.population or lower {prefix}.parents.")
  space = settings.get('space', 'longrope')
  for field, ok, value in (('monotone', settings.get('monotone', True) is True, 'True'),
                           ('n_hat', settings.get('n_hat', 0) == 0, '0'),
                           ('n_hat_choices', settings.get('n_hat_choices') is None, 'None')):
    if space != 'longrope' and not ok:
      raise checks.ConfigError(
          f'{prefix}.{field}', f"{prefix}.space={space!r} (LongRoPE2) is monotone with n_hat = 0, "
          f"which is not part of it; set {prefix}.{field}={value} or "
          f"{prefix}.space='longrope'.")
  if settings.get('strategy', PAPER_GA) == PAPER_GA and all(
      settings.get(k) is not None for k in ('population', 'parents', 'mutations', 'crossovers')):
    total = settings['parents'] + settings['mutations'] + settings['crossovers']
    if total != population:
      raise checks.ConfigError(
          f'{prefix}.population',
          f"{PAPER_GA} needs {prefix}.parents + mutations + crossovers == population; got "
          f"{settings['parents']} + {settings['mutations']} + {settings['crossovers']} = "
          f"{total} != {population}: change {prefix}.population or the three counts.")


def _longrope_space(settings: SearchConfig, *, head_dim: int, theta: float,
                    extension: Extension) -> SearchSpace:
  del theta
  return make_space(head_dim=head_dim, extension=extension, lambda_max=settings.lambda_max,
                    step=settings.lambda_step, monotone=settings.monotone,
                    search_n_hat=settings.search_n_hat, n_hat=settings.n_hat,
                    n_hat_choices=settings.n_hat_choices, attn_scale=settings.attn_scale)


def _longrope2_space(free_below: bool):
  def build(settings: SearchConfig, *, head_dim: int, theta: float,
            extension: Extension) -> RcdSearchSpace:
    return make_rcd_space(head_dim=head_dim, theta=theta, extension=extension,
                          step=settings.lambda_step, lambda_max=settings.lambda_max,
                          free_below=free_below, attn_scale=settings.attn_scale)
  return build


# search.settings.space -> the space's builder from the settings and the model's rotary context.
SPACES: dict[str, Callable[..., SearchSpace | RcdSearchSpace]] = {
    'longrope': _longrope_space,
    'longrope2': _longrope2_space(free_below=False),
    'longrope2_free': _longrope2_space(free_below=True),
}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Search hyper-parameters; the defaults are the paper's (population 64, 32 parents, 16
  mutations and 16 crossovers with p = 0.3, 40 generations; lambda in [1, 1.25 s] on a 0.01
  grid, monotone; n_hat searched).

  `space` picks the search space (`SPACES`): 'longrope' (LongRoPE's), 'longrope2' (LongRoPE2's:
  d_rcd in [d10_tcd, d_tcd], lambda in [s, lambda_max = 2 s] from d_rcd on, NTK below) or
  'longrope2_free' (the ablation without the rcd constraint: the pairs below d_rcd searched too,
  in [1, lambda_max]). The LongRoPE2 spaces are monotone with n_hat = 0: they ignore
  search_n_hat and refuse monotone=False, n_hat != 0 or n_hat_choices.
  """

  strategy: str = PAPER_GA          # 'paper_ga' or an evosax algorithm name (CMA_ES, SNES, ...)
  space: str = 'longrope'           # 'longrope', 'longrope2' or 'longrope2_free' (SPACES)
  population: int = 64
  parents: int = 32
  mutations: int = 16
  crossovers: int = 16
  mutation_prob: float = 0.3
  generations: int = 40
  max_evaluations: int | None = None   # stop once this many candidates were evaluated
  lambda_max: float | None = None   # None: 1.25 * s ('longrope'), 2 * s ('longrope2*')
  lambda_step: float = 0.01
  monotone: bool = True
  search_n_hat: bool = True
  n_hat: int = 0                    # the fixed n_hat when search_n_hat is False
  n_hat_choices: tuple[int, ...] | None = None   # None: the paper's set below L'
  attn_scale: float | None = None   # None: sqrt(1 + ln s / ln L0)
  es_std: float = 1.0               # evosax: initial std in latent (logit) space
  doc_batch: int = 1                # eval windows per micro-batch
  chunk: int | None = None          # candidates per device per step (None: from memory_gb)
  memory_gb: float = 2.0            # activation memory per device for the fitness call
  attention: str | None = None      # the model's attention for the search (None: as configured)

  def __post_init__(self):
    check_search_settings(dataclasses.asdict(self), 'search.settings')

  @classmethod
  def from_config(cls, config: Mapping) -> 'SearchConfig':
    """Builds from a mapping (e.g. the `search.settings` section of an ml_collections config)."""
    config = dict(config.items())
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if k not in fields)
    if unknown:
      raise ValueError(f"unknown search settings {unknown}; known: {sorted(fields)}.")
    if config.get('n_hat_choices') is not None:
      config['n_hat_choices'] = tuple(int(c) for c in config['n_hat_choices'])
    return cls(**config)


PAPER = SearchConfig()
# LongRoPE2's search (Shang et al., 2025, Appendix B): population 64, 40 iterations, p = 0.3; it
# does not say how a generation splits into parents and children, so LongRoPE's 32 + 16 + 16.
LONGROPE2 = SearchConfig(space='longrope2', search_n_hat=False)


def make_search_space(settings: SearchConfig, *, head_dim: int, theta: float,
                      extension: Extension) -> SearchSpace | RcdSearchSpace:
  """The space `settings.space` names, for `extension` of a model with this head_dim and theta."""
  return SPACES[settings.space](settings, head_dim=head_dim, theta=theta, extension=extension)


def make_strategy(settings: SearchConfig, space: SearchSpace | RcdSearchSpace,
                  archive: 'Archive' = ()):
  """The strategy named by settings.strategy over `space` (the GA never re-proposes a genome of
  `archive`)."""
  if settings.strategy == PAPER_GA:
    return PaperGA(space, population_size=settings.population, num_parents=settings.parents,
                   num_mutations=settings.mutations, num_crossovers=settings.crossovers,
                   mutation_prob=settings.mutation_prob, archive=archive)
  return EvosaxStrategy(settings.strategy, space, population_size=settings.population,
                        std_init=settings.es_std)
# ----------------------------------------------------------------------------- result
@dataclasses.dataclass
class SearchResult:
  """The best candidate found and the search's record. With `base` factors, `factors` are the
  product of the base's and this stage's (`stage_factors` keeps both)."""

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
  history: list = dataclasses.field(default_factory=list)
  seeds: dict = dataclasses.field(default_factory=dict)
  genome: np.ndarray | None = None
  stage_factors: list | None = None
  attention: str | None = None   # the fitness's attention, its sequence split over seq_devices
  seq_devices: int = 1
  space: str = 'longrope'
  rcd: int | None = None            # LongRoPE2's spaces: the d_rcd found (a rotary pair index)

  @property
  def perplexity(self) -> float:
    return math.exp(self.nll)

  def rope(self) -> RopeScaling:
    return rope_lib.make(self.factors, self.n_hat, self.attn_scale)

  def to_json(self) -> dict:
    record = dict(factors=_rounded(self.factors), n_hat=int(self.n_hat),
                  attn_scale=float(self.attn_scale), scale=float(self.scale),
                  original_length=int(self.original_length),
                  target_length=int(self.target_length), nll=float(self.nll),
                  perplexity=self.perplexity, strategy=self.strategy,
                  generations=int(self.generations), evaluations=int(self.evaluations),
                  seeds=self.seeds, fitness='validation mean NLL (nats / token)')
    if self.stage_factors is not None:
      record['stage_factors'] = [_rounded(f) for f in self.stage_factors]
    if self.attention is not None:
      record.update(attention=self.attention, seq_devices=int(self.seq_devices))
    if self.space != 'longrope':
      record.update(space=self.space, rcd=self.rcd)
    return record

  @classmethod
  def from_json(cls, record: Mapping) -> 'SearchResult':
    """A saved result (best_factors.json, or a search record of results.json)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k in names}
    return cls(**dict(values, factors=np.asarray(record['factors'], np.float64)))


def _rounded(factors) -> list[float]:
  return [round(float(f), 6) for f in np.asarray(factors)]


# ----------------------------------------------------------------------------- archive
class Archive:
  """Every evaluated genome and its fitness, so none is evaluated (or proposed) twice."""

  def __init__(self, capacity: int, genome_size: int):
    self.genomes = np.zeros((capacity, genome_size), np.int32)
    self.fitness = np.full(capacity, np.inf, np.float32)
    self.count = 0
    self.index: dict[bytes, int] = {}

  def __contains__(self, genome_bytes: bytes) -> bool:
    return genome_bytes in self.index

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


# ----------------------------------------------------------------------------- the loop
def search(model_config: model_lib.ModelConfig, params: Any, windows_NL: np.ndarray, *,
           extension: Extension, settings: SearchConfig = PAPER,
           base: RopeScaling | None = None, workdir: str | pathlib.Path | None = None,
           seed: int = 0, mesh: jax.sharding.Mesh | None = None, progress: bool = True,
           fitness: PopulationFitness | None = None,
           on_generation: Callable[[dict], None] | None = None,
           weights_NL: np.ndarray | None = None) -> SearchResult:
  """Searches LongRoPE (or, with settings.space, LongRoPE2) factors for `extension` (from its
  stage length to L').

  Fitness is the mean NLL on windows_NL (validation documents, truncated to L'), or with
  `weights_NL` f32[N, L' - 1] the weighted mean (LongRoPE2's needle-driven objective: the
  windows and answer weights of `data.needle_windows`). With `base` (progressive extension: the
  factors the model was fine-tuned with at extension.base_length), every candidate's factors
  multiply base.factors. With a `workdir`, the state is checkpointed
  there every generation (workdir/ckpt) and a rerun resumes it; best_factors.json / .csv,
  history.jsonl and plots are written there. `fitness` reuses one compiled population call
  across searches on the same model and windows.
  """
  if (base is None) != (extension.base_length is None):
    raise ValueError("a search on top of base factors needs extension.base_length (the window "
                     "the model was fine-tuned at), and base_length needs the base factors.")
  if settings.attention:
    model_config = model_config.replace(attention=settings.attention)
  space = make_search_space(settings, head_dim=model_config.head_dim,
                            theta=model_config.rope_theta, extension=extension)
  archive = Archive(settings.population * (settings.generations + 1), space.genome_size)
  strategy = make_strategy(settings, space, archive)
  if fitness is None:
    fitness = PopulationFitness(
        model_config, params, windows_NL, length=extension.target_length,
        max_population=settings.population,
        mesh=mesh if mesh is not None else mesh_lib.population_mesh(),
        chunk=settings.chunk, doc_batch=settings.doc_batch,
        memory_bytes=settings.memory_gb * 2**30, weights_NL=weights_NL)
  elif weights_NL is not None:
    raise ValueError("pass weights_NL to the PopulationFitness given as `fitness`, not to search.")
  elif fitness.length != extension.target_length or fitness.capacity < settings.population:
    raise ValueError("the given fitness was built for another target length or a smaller "
                     "population.")
  base_factors = None if base is None else np.asarray(base.factors, np.float32)

  def evaluate(genomes):
    rope = space.rope(genomes)
    if base_factors is not None:
      rope = dataclasses.replace(rope, factors=np.asarray(rope.factors) * base_factors)
    return fitness(rope)

  seeds = seed_genomes(space, head_dim=model_config.head_dim, theta=model_config.rope_theta,
                       extension=extension)
  meta_expected = dict(strategy=settings.strategy, space=dataclasses.asdict(space),
                       population=settings.population, generations=settings.generations,
                       target_length=extension.target_length,
                       original_length=extension.stage_length, seed=seed)

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
    if progress:  # the generations' bar starts after this call, which can take minutes
      print(f'search: scoring the initial population ({len(population)} candidates at '
            f'{extension.target_length} tokens) ...', flush=True)
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
      factors=factors if base is None else np.asarray(base.factors) * factors,
      n_hat=int(n_hat), attn_scale=space.attn_scale, nll=float(archive.fitness[best]),
      scale=extension.scale, original_length=extension.original_length,
      target_length=extension.target_length, strategy=settings.strategy,
      generations=int(state['generation']), evaluations=archive.count, history=history,
      seeds={m: dict(nll=v, perplexity=math.exp(v)) for m, v in seed_nll.items()},
      genome=archive.genomes[best].copy(),
      stage_factors=None if base is None else [np.asarray(base.factors), factors],
      attention=fitness.config.attention, seq_devices=fitness.seq_devices,
      space=settings.space, rcd=space.critical_dimension(archive.genomes[best]))
  if workdir is not None:
    write_outputs(result, workdir, model_config)
  return result


def _record(generation: int, archive: Archive, fit: np.ndarray, new: int,
            seconds: float) -> dict:
  finite = fit[np.isfinite(fit)]
  best = float(archive.fitness[archive.best()])
  mean = float(finite.mean()) if finite.size else float('inf')
  return dict(generation=generation, best_nll=best, best_perplexity=math.exp(best),
              mean_nll=mean, mean_perplexity=float(np.exp(finite).mean()) if finite.size
              else float('inf'), evaluations=archive.count, new=new, seconds=round(seconds, 3))


def _checkpoint_state(state: dict, archive: Archive) -> dict:
  return dict(generation=np.asarray(state['generation'], np.int32),
              key=np.asarray(jax.random.key_data(state['key'])),
              strategy=ckpt_lib.tree_to_numpy(jax.tree.leaves(state['strategy'])),
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


def _restore(mngr, strategy, space: SearchSpace | RcdSearchSpace, settings: SearchConfig,
             archive: Archive, expected: dict):
  """The checkpointed (state, history, seed NLLs), or a ValueError if it is another search; a
  damaged generation raises WorkdirError naming its folder and what to delete."""
  restored_meta = ckpt_lib.restore_meta(mngr)
  for k, v in expected.items():
    if ckpt_lib.to_json(v) != ckpt_lib.to_json(restored_meta.get(k)):
      raise ValueError(f"{mngr.directory} holds a search with a different {k} "
                       f"({restored_meta.get(k)!r} != {ckpt_lib.to_json(v)!r}); use a fresh "
                       "workdir (or delete search/) for a different search.")
  dummy = np.repeat(space.encode(np.ones(space.num_freqs))[None], settings.population, axis=0)
  template_strategy = strategy.init(jax.random.key(0), dummy,
                                    np.zeros(settings.population, np.float32))
  treedef = jax.tree.structure(template_strategy)
  template = _checkpoint_state(dict(generation=0, key=jax.random.key(0),
                                    strategy=template_strategy), archive)
  restored = ckpt_lib.restore(mngr, template)
  leaves = [np.asarray(x) for x in restored['strategy']]
  if isinstance(strategy, EvosaxStrategy):
    leaves = [jax.numpy.asarray(x) for x in leaves]
  state = dict(generation=int(restored['generation']),
               key=jax.random.wrap_key_data(np.asarray(restored['key'])),
               strategy=jax.tree.unflatten(treedef, leaves))
  archive.load(restored['archive'], restored['archive_fitness'], restored['archive_count'])
  return state, list(restored_meta['history']), dict(restored_meta['seeds'])


# ----------------------------------------------------------------------------- outputs
def write_outputs(result: SearchResult, directory: str | pathlib.Path,
                  model_config: model_lib.ModelConfig | None = None) -> None:
  """best_factors.json, best_factors.csv (one factor per line), fitness.png and factors.png."""
  directory = ckpt_lib.abspath(directory)
  ckpt_lib.write_json(directory / 'best_factors.json', result.to_json())
  ckpt_lib.write_text(directory / 'best_factors.csv',
                      ''.join(f'{f:.2f}\n' for f in result.factors))
  plots.fitness_curve(result.history, directory / 'fitness.png',
                      seeds={name: s['perplexity'] for name, s in result.seeds.items()},
                      title=f'{result.strategy} search at {result.scale:g}x (validation)')
  if model_config is not None:
    kwargs = rope_lib.method_kwargs(head_dim=model_config.head_dim, theta=model_config.rope_theta,
                                    original_length=result.original_length,
                                    length=result.target_length)
    searched = (f'n_hat={result.n_hat}' if result.rcd is None else f'd_rcd={result.rcd}')
    curves = {f'{result.space} (searched, {searched})': result.factors}
    curves.update({name: np.asarray(rope_lib.get(m, **kwargs).factors) for name, m in
                   (('PI', 'linear'), ('NTK', 'ntk'), ('YaRN', 'yarn'))})
    plots.factor_curves(curves, directory / 'factors.png',
                        title=f'Rescale factors at {result.scale:g}x',
                        critical_dim=rope_lib.critical_dimension(
                            model_config.head_dim, model_config.rope_theta,
                            result.original_length))
