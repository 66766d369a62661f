"""LongRoPE search: space and operators, strategies, the population fitness (one compile, same on
1 and 8 devices, equal to the evaluator), and a search's outputs (resume: test_search_resume)."""

import json
import math

import jax
import numpy as np
import pytest

from longrope_jax import evaluate as eval_lib
from longrope_jax import fitness as fitness_lib
from longrope_jax import mesh as mesh_lib
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib
from longrope_jax import search_space
from longrope_jax import strategies

CFG = model_lib.get_config('test', num_layers=1, dim=32, mlp_dim=64)  # F = 8 factors, L0 = 64
L0, TARGET = CFG.original_length, 4 * CFG.original_length
EXT = rope_lib.Extension(L0, TARGET)
SMALL = search_lib.SearchConfig(population=8, parents=4, mutations=2, crossovers=2,
                                generations=4)


def random_params(config, seed=0):
  """Random weights without compiling the initializer (norm scales 1, the rest N(0, 0.1))."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: np.ones(s.shape, s.dtype) if 'norm' in jax.tree_util.keystr(path)
      else (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope='module')
def params():
  return random_params(CFG)


@pytest.fixture(scope='module')
def windows():
  return np.random.default_rng(0).integers(0, 256, size=(3, TARGET)).astype(np.int32)


def space(**kw):
  return search_space.make_space(head_dim=CFG.head_dim, extension=EXT, **kw)


# ----------------------------------------------------------------------------- space
def test_space_defaults_follow_the_paper():
  s = space()
  assert s.lambda_max == pytest.approx(1.25 * 4) and s.step == 0.01 and s.monotone
  assert s.num_steps == 400  # 1.00, 1.01, ..., 5.00
  assert s.n_hat_choices == tuple(c for c in rope_lib.N_HAT_CHOICES if c < TARGET)
  assert s.attn_scale == pytest.approx(math.sqrt(1 + math.log(4) / math.log(L0)))
  fixed = space(search_n_hat=False, n_hat=8)
  assert fixed.n_hat_choices == (8,) and not fixed.searches_n_hat


def test_project_maps_any_proposal_onto_grid_bounds_and_monotone():
  s = space()
  rng = np.random.default_rng(0)
  proposals = rng.uniform(-3, 9, size=(200, s.num_freqs))
  factors, n_hat = s.project(proposals, rng.integers(-10, 400, size=200))
  assert factors.min() >= 1.0 and factors.max() <= s.lambda_max + 1e-9
  np.testing.assert_allclose(np.round((factors - 1) / 0.01), (factors - 1) / 0.01, atol=1e-9)
  assert np.all(np.diff(factors, axis=-1) >= 0)
  assert set(n_hat.tolist()) <= set(s.n_hat_choices)
  # Valid candidates are fixed points; non-monotone proposals stay as they are without monotone.
  again, _ = s.project(factors, n_hat)
  np.testing.assert_array_equal(again, factors)
  free = space(monotone=False)
  assert np.any(np.diff(free.project(proposals)[0], axis=-1) < 0)
  np.testing.assert_allclose(s.project([1.004, 0.5, 2.226, 99, 1, 1, 3.333, 2])[0],
                             [1.0, 1.0, 2.23, 5.0, 5.0, 5.0, 5.0, 5.0])


def test_genomes_round_trip_and_decode_to_a_stacked_rope():
  s = space()
  genomes = s.encode(np.linspace(1, 4.5, 8)[None].repeat(3, 0), np.array([0, 16, 300]))
  factors, n_hat = s.decode(genomes)
  np.testing.assert_array_equal(s.encode(factors, n_hat), genomes)
  assert n_hat.tolist() == [0, 16, 128]  # 300 -> the nearest choice below L'
  rope = s.rope(genomes)
  assert rope.factors.shape == (3, 8) and rope.n_hat.shape == (3,)
  np.testing.assert_allclose(rope.attn_scale, s.attn_scale, rtol=1e-6)
  with pytest.raises(ValueError, match='outside the search space'):
    s.rope(genomes[:, ::-1].copy())


def test_seeds_are_pi_ntk_yarn_and_dynamic_ntk_at_the_target_length():
  s = space()
  seeds = search_space.seed_genomes(s, head_dim=CFG.head_dim, theta=CFG.rope_theta,
                                    extension=EXT)
  assert list(seeds) == ['linear', 'ntk', 'yarn', 'dynamic_ntk']
  factors = {k: s.decode(g)[0] for k, g in seeds.items()}
  np.testing.assert_allclose(factors['linear'], 4.0)
  np.testing.assert_allclose(factors['ntk'], np.round(rope_lib.ntk_factors(16, 4.0), 2))
  np.testing.assert_array_equal(factors['dynamic_ntk'], factors['ntk'])  # same scale at L'
  yarn = rope_lib.yarn(head_dim=16, scale=4.0, theta=CFG.rope_theta, original_length=L0)
  np.testing.assert_allclose(factors['yarn'], np.asarray(yarn.factors), atol=0.005 + 1e-6)


@pytest.mark.parametrize('bad, match', [
    (dict(lambda_max=0.9), 'lambda_max must be >= 1'),
    (dict(n_hat_choices=(0, 4, 256, 512)), r'beyond the target length'),
    (dict(search_n_hat=False, n_hat=TARGET), 'fixed n_hat'),
])
def test_bad_space_raises(bad, match):
  with pytest.raises(ValueError, match=match):
    space(**bad)


def test_bad_search_settings_raise(params, windows):
  with pytest.raises(ValueError, match='smaller than search.settings.parents'):
    search_lib.SearchConfig(population=16, parents=32)
  with pytest.raises(ValueError, match='must hold at least the parents'):
    strategies.PaperGA(space(), population_size=8, num_parents=16)
  with pytest.raises(ValueError, match="strategy must be 'paper_ga' or an evosax algorithm"):
    search_lib.SearchConfig(strategy='CMAES')
  with pytest.raises(ValueError, match='unknown search settings'):
    search_lib.SearchConfig.from_config({'populaton': 8})
  with pytest.raises(ValueError, match="shorter than the target length L' = 256"):
    fitness_lib.PopulationFitness(CFG, params, windows[:, :200], length=TARGET, max_population=4)
  with pytest.raises(ValueError, match='shorter than the target length'):
    search_lib.search(CFG, params, windows[:, :100], extension=EXT, settings=SMALL,
                      progress=False)


# ----------------------------------------------------------------------------- operators
def test_mutation_resamples_between_neighbours_and_keeps_monotone():
  s = space()
  rng = np.random.default_rng(1)
  parent = s.encode(np.linspace(1.0, 5.0, 8), 16)
  changed = np.zeros(9)
  for _ in range(300):
    child = strategies.mutate(s, parent, rng, 0.3)
    s.check(child)  # in bounds and monotone
    changed += child != parent
  assert 0.2 < changed[:8].mean() / 300 < 0.4  # about p = 0.3 of the genes move
  assert changed[8] > 0  # n_hat is mutated too
  # Each gene is drawn between its left neighbour (already mutated) and its right one.
  for _ in range(50):
    child = strategies.mutate(s, parent, rng, 1.0)
    left = np.concatenate([[0], child[:7]])
    right = np.concatenate([parent[1:8], [s.num_steps]])
    assert np.all((left <= child[:8]) & (child[:8] <= right))
  # PI (all neighbours equal) only moves from its ends inwards.
  pi = s.encode(np.full(8, 4.0))
  moved = np.stack([strategies.mutate(s, pi, rng, 0.3) for _ in range(200)])
  inner = (moved[:, 1:7] != 300).any(axis=1)
  assert inner.any() and np.all(moved[inner, 0] < 300)  # only after the first gene moved down
  assert np.all(moved[:, 1:7] <= 300) and np.all(moved[:, 7] >= moved[:, 6])


def test_crossover_mixes_parents_and_rejects_non_monotone_children():
  s = space()
  rng = np.random.default_rng(2)
  a, b = s.encode(np.linspace(1, 2, 8), 0), s.encode(np.linspace(2, 5, 8), 64)
  for _ in range(50):
    child = strategies.crossover(s, a, b, rng)
    if child is not None:
      s.check(child)
      assert np.all((child == a) | (child == b))
  low, high = s.encode(np.full(8, 1.0)), s.encode(np.full(8, 5.0))
  results = [strategies.crossover(s, high, low, rng) for _ in range(50)]
  assert any(r is None for r in results)  # 5, 1 in a row is not monotone


def test_paper_ga_keeps_top_parents_and_never_proposes_a_candidate_twice():
  s = space()
  seen = set()  # the search loop's archive of evaluated genomes
  ga = strategies.PaperGA(s, archive=seen)  # the paper's defaults: 64 = 32 parents + 16 + 16
  assert (ga.population_size, ga.num_parents, ga.num_mutations, ga.num_crossovers) == \
      (64, 32, 16, 16)
  assert ga.default_params.mutation_prob == 0.3
  seeds = search_space.seed_genomes(s, head_dim=16, theta=CFG.rope_theta, extension=EXT)
  key = jax.random.key(0)
  population = strategies.initial_population(s, seeds, 64, strategies.numpy_rng(key))
  assert len({g.tobytes() for g in population}) == 64
  np.testing.assert_array_equal(population[:3], np.stack(list(seeds.values())[:3]))

  def toy_fitness(genomes):  # prefers factors near 3 and n_hat = 8
    factors, n_hat = s.decode(genomes)
    return (np.abs(factors - 3).mean(-1) + (n_hat != 8)).astype(np.float32)

  state = ga.init(key, population, toy_fitness(population))
  seen.update(g.tobytes() for g in population)
  best = initial_best = toy_fitness(population).min()
  for g in range(10):
    k_ask, k_tell = jax.random.split(jax.random.fold_in(key, g))
    previous = state['population'][np.argsort(state['fitness'], kind='stable')[:32]]
    population, state = ga.ask(k_ask, state)
    s.check(population)
    np.testing.assert_array_equal(population[:32], previous)  # the top-k parents
    children = {c.tobytes() for c in population[32:]}
    assert len(children) == 32 and not children & seen
    seen |= children
    fitness = toy_fitness(population)
    state = ga.tell(k_tell, population, fitness, state)
    assert fitness.min() <= best
    best = fitness.min()
  assert best < initial_best


@pytest.mark.parametrize('name', ['SNES'] + [
    pytest.param(n, marks=pytest.mark.slow)  # each compiles its own init / ask / tell
    for n in ('CMA_ES', 'Sep_CMA_ES', 'Open_ES', 'DifferentialEvolution', 'SimpleGA')])
def test_evosax_strategies_propose_valid_candidates(name):
  s = space()
  strategy = search_lib.make_strategy(search_lib.SearchConfig(strategy=name, population=8,
                                                              parents=4), s)
  rng = np.random.default_rng(0)
  genomes = s.encode(np.sort(rng.uniform(1, 5, size=(8, 8)), axis=-1), rng.integers(0, 200, 8))
  np.testing.assert_array_equal(strategy.from_latent(strategy.to_latent(genomes)), genomes)
  key = jax.random.key(1)
  fitness = lambda g: np.abs(s.decode(g)[0] - 2.5).mean(-1).astype(np.float32)
  state = strategy.init(key, genomes, fitness(genomes))
  for g in range(3):
    k_ask, k_tell = jax.random.split(jax.random.fold_in(key, g))
    population, state = strategy.ask(k_ask, state)
    assert population.shape == (8, 9)
    s.check(population)  # valid by construction: bounds, grid, monotone, n_hat choice
    state = strategy.tell(k_tell, population, fitness(population), state)


def test_continuous_parametrization_without_monotone_constraint():
  s = space(monotone=False, search_n_hat=False)
  strategy = strategies.EvosaxStrategy('CMA_ES', s, population_size=8)
  assert strategy.num_dims == 8
  genomes = s.encode(np.random.default_rng(0).uniform(1, 5, size=(4, 8)))
  np.testing.assert_array_equal(strategy.from_latent(strategy.to_latent(genomes)), genomes)


# ----------------------------------------------------------------------------- fitness
def test_population_fitness_matches_the_evaluator(params, windows):
  s = space()
  genomes = s.encode(np.sort(np.random.default_rng(3).uniform(1, 5, (5, 8)), -1),
                     np.array([0, 4, 16, 64, 128]))
  fitness = fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET, max_population=8,
                                         doc_batch=2)
  nll = fitness(s.rope(genomes))
  expected = [eval_lib.mean_nll(CFG, params, windows, r) for r in rope_lib.unstack(s.rope(genomes))]
  np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_fitness_is_the_same_on_one_and_eight_devices_and_compiles_once(params, windows):
  assert len(jax.devices()) == 8
  s = space()
  rng = np.random.default_rng(4)
  genomes = s.encode(np.sort(rng.uniform(1, 5, (13, 8)), -1), rng.integers(0, 200, 13))
  one = fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET, max_population=16,
                                     mesh=mesh_lib.population_mesh(1), chunk=4)
  eight = fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET, max_population=16,
                                       mesh=mesh_lib.population_mesh(8), chunk=4)
  assert (one.capacity, one.chunk, eight.capacity, eight.chunk) == (16, 4, 16, 2)
  # Chunks are balanced: 16 under a limit of 13 run as 2 x 8, not 2 x 13 (10 padded).
  balanced = fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET,
                                           max_population=16, mesh=mesh_lib.population_mesh(1),
                                           chunk=13)
  assert (balanced.chunk, balanced.capacity) == (8, 16)
  a, b = one(s.rope(genomes)), eight(s.rope(genomes))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  # Any population size up to the capacity reuses the one compiled program.
  for n in (1, 5, 16):
    more = s.encode(np.sort(rng.uniform(1, 5, (n, 8)), -1))
    eight(s.rope(more))
  np.testing.assert_allclose(eight(s.rope(genomes[:3])), a[:3], rtol=1e-5)
  assert eight.traces == 1 and one.traces == 1


def test_ring_fitness_on_a_pop_seq_mesh_equals_blockwise(windows):
  """Ring attention inside the population fitness, two scanned layers, on a (pop 2, seq 4) mesh:
  candidates over 'pop', each sequence over 'seq'; the NLLs equal blockwise's, whose candidates
  spread over all 8 devices of the same mesh."""
  config = CFG.replace(num_layers=2, block_q=16, block_k=16)
  params = random_params(config, seed=1)
  s = space()
  rng = np.random.default_rng(5)
  genomes = s.encode(np.sort(rng.uniform(1, 5, (6, 8)), -1), rng.integers(0, 200, 6))
  mesh = mesh_lib.make_mesh(pop=2, seq=4)
  ring, blockwise = (fitness_lib.PopulationFitness(config.replace(attention=impl), params,
                                                   windows, length=TARGET, max_population=8,
                                                   mesh=mesh, doc_batch=2)
                     for impl in ('ring', 'blockwise'))
  assert (ring.pop_axes, ring.pop_devices, ring.seq_devices) == (('pop', 'data', 'fsdp'), 2, 4)
  assert (blockwise.pop_devices, blockwise.seq_devices) == (8, 1)
  expected = blockwise(s.rope(genomes))
  np.testing.assert_allclose(ring(s.rope(genomes)), expected, atol=1e-5, rtol=0)
  # One candidate: the second 'pop' device has none, yet joins the ring's collectives (a device
  # skipping them would leave its 'seq' partners waiting forever).
  np.testing.assert_allclose(ring(s.rope(genomes[:1])), expected[:1], atol=1e-5, rtol=0)
  # The memory estimate sees a quarter of each sequence per device.
  assert (fitness_lib.auto_chunk(config.replace(attention='ring'), TARGET, 2, 2**24, seq=4) >=
          4 * fitness_lib.auto_chunk(config.replace(attention='blockwise'), TARGET, 2, 2**24))
  with pytest.raises(ValueError, match='not divisible by 2 \\* ring size'):
    fitness_lib.PopulationFitness(config.replace(attention='ring'), params, windows,
                                  length=TARGET - 4, max_population=8, mesh=mesh)


@pytest.mark.parametrize('strategy', ['paper_ga', 'SNES',
                                      pytest.param('CMA_ES', marks=pytest.mark.slow)])
def test_a_whole_search_compiles_the_fitness_once(params, windows, strategy):
  settings = search_lib.SearchConfig(**dict(vars(SMALL), strategy=strategy, generations=5))
  fitness = fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET, max_population=8)
  result = search_lib.search(CFG, params, windows, extension=EXT, settings=settings,
                             fitness=fitness, progress=False)
  assert fitness.traces == 1 and fitness._fn._cache_size() == 1
  assert result.generations == 5
  if strategy == 'paper_ga':  # 8 initial + 4 new per generation, none evaluated twice
    assert result.evaluations == 8 + 5 * 4
    assert [h['new'] for h in result.history] == [8, 4, 4, 4, 4, 4]
  best = [h['best_nll'] for h in result.history]
  assert best == sorted(best, reverse=True)
  assert result.nll <= min(v['nll'] for v in result.seeds.values())
  np.testing.assert_allclose(eval_lib.mean_nll(CFG, params, windows, result.rope()), result.nll,
                             rtol=1e-5)


def test_max_evaluations_caps_the_budget(params, windows):
  settings = search_lib.SearchConfig(**dict(vars(SMALL), generations=50, max_evaluations=20))
  result = search_lib.search(CFG, params, windows, extension=EXT, settings=settings,
                             progress=False)
  assert result.evaluations == 20 and result.generations == 3


# ----------------------------------------------------------------------------- workdir
def test_outputs_and_resume_of_a_finished_search(params, windows, tmp_path):
  result = search_lib.search(CFG, params, windows, extension=EXT, settings=SMALL,
                             workdir=tmp_path, progress=False)
  saved = json.loads((tmp_path / 'best_factors.json').read_text())
  assert saved['factors'] == pytest.approx(result.factors.tolist())
  assert saved['n_hat'] == result.n_hat and saved['target_length'] == TARGET
  csv = (tmp_path / 'best_factors.csv').read_text().splitlines()
  assert len(csv) == 8 and [float(x) for x in csv] == pytest.approx(result.factors.tolist())
  history = [json.loads(l) for l in (tmp_path / 'history.jsonl').read_text().splitlines()]
  assert [h['generation'] for h in history] == [0, 1, 2, 3, 4]
  assert all('best_perplexity' in h and 'mean_perplexity' in h for h in history)
  assert (tmp_path / 'fitness.png').stat().st_size > 0
  assert (tmp_path / 'factors.png').stat().st_size > 0
  # A rerun finds the finished search and evaluates nothing.
  fitness = fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET, max_population=8)
  again = search_lib.search(CFG, params, windows, extension=EXT, settings=SMALL,
                            workdir=tmp_path, fitness=fitness, progress=False)
  assert fitness.traces == 0
  np.testing.assert_array_equal(again.genome, result.genome)
  assert again.nll == result.nll and again.history == result.history
  with pytest.raises(ValueError, match='different generations'):
    search_lib.search(CFG, params, windows, extension=EXT, progress=False,
                      settings=search_lib.SearchConfig(**dict(vars(SMALL), generations=6)),
                      workdir=tmp_path)
  with pytest.raises(ValueError, match='different strategy'):
    search_lib.search(CFG, params, windows, extension=EXT, progress=False,
                      settings=search_lib.SearchConfig(**dict(vars(SMALL), strategy='SNES')),
                      workdir=tmp_path)



def test_configured_mutation_prob_reaches_the_ga_ask(monkeypatch):
  s = space()
  strategy = search_lib.make_strategy(
      search_lib.SearchConfig(population=8, parents=4, mutations=4, crossovers=0,
                              mutation_prob=0.7), s)
  probs = []
  real = strategies.mutate
  monkeypatch.setattr(strategies, 'mutate',
                      lambda *a: probs.append(a[3]) or real(*a))
  rng = np.random.default_rng(0)
  population = s.encode(np.sort(rng.uniform(1, 5, (8, 8)), -1))
  state = strategy.init(jax.random.key(0), population, np.arange(8, dtype=np.float32))
  strategy.ask(jax.random.key(1), state)
  assert probs and set(probs) == {0.7}
