"""LongRoPE2's search space (Shang et al., 2025, sec. 3.2, Algorithms 1-2) and its ablation without
the rcd constraint: golden decodes, the invariants every strategy keeps (monotone, bounds, NTK
below d_rcd, d_rcd in its range), the paper's operators, and short searches that run and resume."""

import math

import jax
import numpy as np
import pytest

from longrope_jax import evaluate as eval_lib
from longrope_jax import fitness as fitness_lib
from longrope_jax import rope as rope_lib
from longrope_jax import search as search_lib
from longrope_jax import search_space
from longrope_jax import strategies
from test_search import CFG, EXT, L0, SMALL, TARGET, random_params

SPACES = ('longrope2', 'longrope2_free')

# Microsoft's LLaMA3-8B LongRoPE2 factors (8K -> 128K, nnscaler examples/longrope2/
# llama3_8b_longrope2_config.json, long_factor): NTK up to pair 33, searched from there on.
LLAMA3_LONG_FACTOR = [
    1, 1.097906416, 1.205398499, 1.323414747, 1.452985542, 1.595242149, 1.751426591,
    1.922902493, 2.111166985, 2.317863779, 2.544797515, 2.79394952, 3.067495105, 3.367822558,
    3.697553996, 4.059568257, 4.457026037, 4.893397485, 5.372492496, 5.898493984, 6.475994392,
    7.110035795, 7.806153921, 8.570426477, 9.40952622, 10.33077921, 11.34222878, 12.45270576,
    13.67190555, 15.01047283, 16.48009443, 18.09360142, 19.8650811, 21.81, 21.87, 21.88, 22.23,
    22.28, 22.53, 22.65, 22.73, 22.89, 22.92, 23.18, 23.23, 23.36, 23.42, 23.47, 23.51, 23.52,
    23.75, 23.82, 23.89, 24.06, 24.13, 24.14, 24.3, 24.53, 24.67, 24.75, 24.97, 25.49, 26.01,
    26.05]


def space(free_below=False, extension=EXT, head_dim=CFG.head_dim, theta=CFG.rope_theta, **kw):
  return search_space.make_rcd_space(head_dim=head_dim, theta=theta, extension=extension,
                                     free_below=free_below, **kw)


def ntk_below(factors, rcd):
  """Plain numpy: lambda_i = lambda_rcd ** (i / rcd) for i < rcd."""
  i = np.arange(rcd)
  return factors[rcd] ** (i / rcd)


def assert_valid(s, genomes):
  """Every invariant of the space, on the decoded factors."""
  genomes = np.atleast_2d(genomes)
  s.check(genomes)
  factors, n_hat = s.decode(genomes)
  assert np.all(n_hat == 0)
  for g, f in zip(genomes, factors):
    rcd = int(g[-1])
    assert s.rcd_min <= rcd <= s.rcd_max
    assert np.all(np.diff(f) >= 0), f  # non-decreasing over every pair
    assert np.all(f[rcd:] >= s.lambda_min - 1e-9) and np.all(f[rcd:] <= s.lambda_max + 1e-9)
    k = np.rint((f[rcd:] - 1) / s.step)
    np.testing.assert_allclose(1 + s.step * k, f[rcd:], rtol=1e-12)  # on the grid
    if s.free_below:
      assert np.all(f[:rcd] >= 1.0) and np.all(f[:rcd] <= f[rcd])
    else:
      np.testing.assert_allclose(f[:rcd], ntk_below(f, rcd), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- space
def test_space_follows_the_paper():
  s = space()  # the test model: head_dim 16, theta 1e4, L0 = 64, 4x
  assert (s.rcd_min, s.rcd_max) == (1, 3)  # d10_tcd, d_tcd
  assert (s.lambda_min, s.lambda_max, s.step) == (4.0, 8.0, 0.01)  # [s, 2s] on the 0.01 grid
  assert (s.min_step, s.num_steps, s.genome_size) == (300, 700, 9)
  assert s.attn_scale == pytest.approx(math.sqrt(1 + math.log(4) / math.log(L0)))
  # The retrieval model at 16x: d_rcd in [3, 7] (head_dim 32), the demo's in [5, 13].
  ext = rope_lib.Extension(256, 16 * 256)
  retrieval = space(extension=ext, head_dim=32)
  assert (retrieval.rcd_min, retrieval.rcd_max, retrieval.lambda_min, retrieval.lambda_max) == \
      (3, 7, 16.0, 32.0)
  assert (space(extension=ext, head_dim=64).rcd_min, space(extension=ext, head_dim=64).rcd_max) \
      == (5, 13)
  assert space(lambda_max=6.0).num_steps == 500


def test_decode_reproduces_microsofts_llama3_factors():
  """The official factors are a point of the space: NTK below d_rcd = 33, meeting lambda_33."""
  s = space(extension=rope_lib.Extension(8192, 131072), head_dim=128, theta=5e5)
  assert (s.rcd_min, s.rcd_max, s.lambda_min, s.lambda_max) == (24, 35, 16.0, 32.0)
  genome = s.encode(LLAMA3_LONG_FACTOR)
  assert genome[-1] == 33 and s.critical_dimension(genome) == 33
  factors, _ = s.decode(genome)
  np.testing.assert_allclose(factors, LLAMA3_LONG_FACTOR, rtol=1e-8)
  np.testing.assert_allclose(factors[:33], ntk_below(np.asarray(LLAMA3_LONG_FACTOR), 33),
                             rtol=1e-12)


def test_decode_golden():
  s = space()
  # rcd = 2, lambda from pair 2 on: 5, 5.5, 6, ...: below it 5 ** (0 / 2), 5 ** (1 / 2).
  k = np.asarray([0, 0, 400, 450, 500, 500, 600, 700])
  genome = s.with_rcd(k, 2)
  factors, n_hat = s.decode(genome)
  np.testing.assert_allclose(factors, [1.0, math.sqrt(5.0), 5.0, 5.5, 6.0, 6.0, 7.0, 8.0],
                             rtol=1e-15)
  assert genome[1] == round((math.sqrt(5) - 1) / 0.01) and n_hat == 0  # the NTK's grid index
  rope = s.rope(genome[None].repeat(3, 0))
  assert rope.factors.shape == (3, 8) and np.all(np.asarray(rope.n_hat) == 0)
  np.testing.assert_allclose(rope.attn_scale, s.attn_scale, rtol=1e-6)
  # The free ablation keeps the genes below d_rcd as they are.
  free = space(free_below=True)
  np.testing.assert_allclose(free.decode(free.with_rcd([0, 150, 400, 450, 500, 500, 600, 700],
                                                       2))[0],
                             [1.0, 2.5, 5.0, 5.5, 6.0, 6.0, 7.0, 8.0], rtol=1e-15)


@pytest.mark.parametrize('free_below', [False, True])
def test_project_maps_any_proposal_into_the_space(free_below):
  s = space(free_below)
  rng = np.random.default_rng(0)
  proposals = rng.uniform(-3, 12, size=(200, s.num_freqs))
  genomes = s.encode(proposals)
  assert_valid(s, genomes)
  # Candidates are fixed points (in factors: lambda_3 = 2 s makes d_rcd = 3's NTK curve meet s at
  # pair 2, so d_rcd = 2 with lambda_2 = s is the same candidate, and projection picks the lower).
  factors = s.decode(genomes)[0]
  np.testing.assert_allclose(s.project(factors)[0], factors, rtol=1e-12)
  with pytest.raises(ValueError, match='n_hat is not part'):
    s.encode(proposals, np.full(200, 4))


@pytest.mark.parametrize('free_below', [False, True])
def test_check_rejects_genomes_outside_the_space(free_below):
  s = space(free_below)
  good = s.with_rcd(np.asarray([0, 0, 400, 450, 500, 500, 600, 700]), 2)
  bad = {
      'rcd beyond d_tcd': np.r_[good[:-1], 4],
      'below lambda_min from d_rcd on': np.r_[good[:2], 250, good[3:]],
      'beyond lambda_max': np.r_[good[:7], 701, 2],
      'decreasing': np.r_[good[:3], 600, 500, good[5:]],
  }
  if not free_below:
    bad['not the NTK curve below d_rcd'] = np.r_[0, good[1] + 1, good[2:]]
  for name, genome in bad.items():
    with pytest.raises(ValueError, match='outside'):
      s.check(genome.astype(np.int32))


def test_bad_rcd_space_raises():
  with pytest.raises(ValueError, match='lambda_max must be >= s'):
    space(lambda_max=3.0)
  with pytest.raises(ValueError, match='no critical dimension'):
    search_space.make_rcd_space(head_dim=8, theta=2.0, extension=rope_lib.Extension(4096, 8192))
  with pytest.raises(ValueError, match='at least the window'):
    space(extension=rope_lib.Extension(64, 32))


def test_seeds_are_projected_into_the_space():
  s = space()
  seeds = search_space.seed_genomes(s, head_dim=CFG.head_dim, theta=CFG.rope_theta,
                                    extension=EXT)
  assert list(seeds) == list(search_space.SEED_METHODS)
  assert_valid(s, np.stack(list(seeds.values())))
  # PI is s everywhere: from d_rcd = 1 on exactly, NTK below (lambda_0 = 1).
  np.testing.assert_allclose(s.decode(seeds['linear'])[0], [1.0] + [4.0] * 7)


# ----------------------------------------------------------------------------- operators
def test_initialization_is_algorithm_1_then_mutations():
  s = space()
  rng = np.random.default_rng(0)
  first = strategies.initial_candidates(s, rng)
  assert [int(g[-1]) for g in first] == [1, 2, 3]  # one per candidate d_rcd
  for g in first:
    rcd = int(g[-1])
    assert len(set(g[rcd:-1].tolist())) == 1  # one random s' for every pair from d_rcd on
  assert_valid(s, np.stack(first))
  seeds = search_space.seed_genomes(s, head_dim=16, theta=CFG.rope_theta, extension=EXT)
  population = strategies.initial_population(s, seeds, 64, rng)
  assert population.shape == (64, 9) and len({g.tobytes() for g in population}) == 64
  assert_valid(s, population)
  assert strategies.initial_candidates(search_space.make_space(head_dim=16, extension=EXT),
                                       rng) == []  # LongRoPE's space adds nothing


@pytest.mark.parametrize('free_below', [False, True])
def test_mutation_keeps_every_invariant_and_touches_only_d_rcd_and_beyond(free_below):
  s = space(free_below)
  rng = np.random.default_rng(1)
  parent = s.with_rcd(np.asarray([0, 60, 150, 350, 400, 500, 600, 650]), 3)
  assert_valid(s, parent)
  moved = np.zeros(s.genome_size)
  for _ in range(400):
    child = strategies.mutate(s, parent, rng, 0.3)
    assert_valid(s, child)
    moved += child != parent
    if not free_below and child[-1] == parent[-1] and child[3] == parent[3]:
      np.testing.assert_array_equal(child[:3], parent[:3])  # derived, not mutated
  # About p = 0.3 of the searched genes move (d_rcd to one of its two other values).
  assert 0.2 < moved[3:8].mean() / 400 < 0.4 and 0.2 < moved[-1] / 400 < 0.4
  if free_below:  # the pairs below d_rcd are genes too (and rise to s when d_rcd drops to 1)
    assert 0.3 < moved[1] / 400 < 0.55
  for _ in range(100):
    assert_valid(s, strategies.mutate(s, parent, rng, 1.0))


@pytest.mark.parametrize('free_below', [False, True])
def test_crossover_children_are_valid_or_refused(free_below):
  s = space(free_below)
  rng = np.random.default_rng(2)
  population = strategies.initial_population(s, {}, 32, rng)
  made = 0
  for _ in range(300):
    i, j = rng.choice(32, size=2, replace=False)
    child = strategies.crossover(s, population[i], population[j], rng)
    if child is not None:
      assert_valid(s, child)
      made += 1
  assert made > 50


@pytest.mark.parametrize('free_below', [False, True])
def test_paper_ga_over_the_rcd_space_proposes_only_valid_new_candidates(free_below):
  s = space(free_below)
  seen = set()
  ga = strategies.PaperGA(s, archive=seen)
  key = jax.random.key(0)
  population = strategies.initial_population(s, {}, 64, strategies.numpy_rng(key))

  target = s.decode(s.with_rcd(np.asarray([0, 0, 330, 420, 480, 560, 610, 690]), 2))[0]

  def toy_fitness(genomes):  # prefers one candidate with d_rcd = 2
    factors, _ = s.decode(genomes)
    return (np.abs(np.log(factors / target)).mean(-1) + 0.1 * (genomes[:, -1] != 2)
            ).astype(np.float32)

  state = ga.init(key, population, toy_fitness(population))
  seen.update(g.tobytes() for g in population)
  best = initial = toy_fitness(population).min()
  for g in range(6):
    k_ask, k_tell = jax.random.split(jax.random.fold_in(key, g))
    population, state = ga.ask(k_ask, state)
    assert_valid(s, population)
    children = {c.tobytes() for c in population[32:]}
    assert len(children) == 32 and not children & seen
    seen |= children
    fitness = toy_fitness(population)
    state = ga.tell(k_tell, population, fitness, state)
    best = min(best, fitness.min())
  assert best < initial


@pytest.mark.parametrize('free_below', [False, True])
def test_unit_cube_round_trip_and_evosax_proposals_are_valid(free_below):
  s = space(free_below)
  rng = np.random.default_rng(3)
  genomes = strategies.initial_population(s, {}, 8, rng)
  strategy = search_lib.make_strategy(
      search_lib.SearchConfig(strategy='SNES', space=SPACES[free_below], population=8,
                              parents=4), s)
  assert strategy.num_dims == s.num_freqs + 1
  np.testing.assert_array_equal(strategy.from_latent(strategy.to_latent(genomes)), genomes)
  assert_valid(s, strategies.from_unit(s, rng.uniform(size=(200, s.num_freqs + 1))))
  key = jax.random.key(1)
  fitness = lambda g: np.abs(s.decode(g)[0] - 5.5).mean(-1).astype(np.float32)
  state = strategy.init(key, genomes, fitness(genomes))
  for g in range(3):
    k_ask, k_tell = jax.random.split(jax.random.fold_in(key, g))
    population, state = strategy.ask(k_ask, state)
    assert population.shape == (8, 9)
    assert_valid(s, population)
    state = strategy.tell(k_tell, population, fitness(population), state)


# ----------------------------------------------------------------------------- settings
def test_space_setting_is_validated_and_the_preset_is_the_papers():
  assert search_lib.SearchConfig().space == 'longrope'
  preset = search_lib.LONGROPE2
  assert (preset.space, preset.population, preset.generations, preset.mutation_prob) == \
      ('longrope2', 64, 40, 0.3)
  with pytest.raises(ValueError, match="search.settings.space must be one of 'longrope', "
                                       "'longrope2', 'longrope2_free'"):
    search_lib.SearchConfig(space='longrope3')
  for bad in (dict(monotone=False), dict(n_hat=4), dict(n_hat_choices=(0, 4))):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=rf"search.settings.{field}=.*space='longrope'"):
      search_lib.SearchConfig(space='longrope2', **bad)
  built = search_lib.make_search_space(search_lib.SearchConfig(space='longrope2_free'),
                                       head_dim=16, theta=CFG.rope_theta, extension=EXT)
  assert isinstance(built, search_space.RcdSearchSpace) and built.free_below


# ----------------------------------------------------------------------------- searches
@pytest.fixture(scope='module')
def params():
  return random_params(CFG)


@pytest.fixture(scope='module')
def windows():
  return np.random.default_rng(0).integers(0, 256, size=(3, TARGET)).astype(np.int32)


@pytest.fixture(scope='module')
def fitness(params, windows):
  return fitness_lib.PopulationFitness(CFG, params, windows, length=TARGET, max_population=8)


@pytest.mark.parametrize('space_name, strategy', [
    ('longrope2', 'paper_ga'), ('longrope2', 'SNES'), ('longrope2_free', 'paper_ga')])
def test_a_short_search_runs_in_the_rcd_space(params, windows, fitness, space_name, strategy):
  settings = search_lib.SearchConfig(**dict(vars(SMALL), space=space_name, strategy=strategy,
                                            search_n_hat=False))
  result = search_lib.search(CFG, params, windows, extension=EXT, settings=settings,
                             fitness=fitness, progress=False)
  s = search_lib.make_search_space(settings, head_dim=16, theta=CFG.rope_theta, extension=EXT)
  assert_valid(s, result.genome)
  assert result.space == space_name and result.rcd == int(result.genome[-1])
  assert 1 <= result.rcd <= 3 and result.n_hat == 0
  np.testing.assert_array_equal(result.factors, s.decode(result.genome)[0])
  record = result.to_json()
  assert record['space'] == space_name and record['rcd'] == result.rcd
  assert search_lib.SearchResult.from_json(record).rcd == result.rcd
  if strategy == 'paper_ga':
    assert [h['new'] for h in result.history] == [8, 4, 4, 4, 4]
  best = [h['best_nll'] for h in result.history]
  assert best == sorted(best, reverse=True)
  np.testing.assert_allclose(eval_lib.mean_nll(CFG, params, windows, result.rope()), result.nll,
                             rtol=1e-5)
  assert fitness.traces == 1  # every space shares the one compiled population call


class Stop(Exception):
  pass


def test_an_interrupted_rcd_search_resumes_to_the_uninterrupted_result(params, windows, fitness,
                                                                        tmp_path):
  settings = search_lib.SearchConfig(**dict(vars(SMALL), space='longrope2', search_n_hat=False))
  run = lambda workdir, hook=None: search_lib.search(
      CFG, params, windows, extension=EXT, settings=settings, workdir=workdir, fitness=fitness,
      progress=False, on_generation=hook)
  straight = run(tmp_path / 'a')

  def stop_at_2(record):
    if record['generation'] == 2:
      raise Stop

  with pytest.raises(Stop):
    run(tmp_path / 'b', stop_at_2)
  resumed = run(tmp_path / 'b')
  np.testing.assert_array_equal(resumed.genome, straight.genome)
  assert resumed.nll == straight.nll and resumed.rcd == straight.rcd
  assert resumed.evaluations == straight.evaluations
  assert (tmp_path / 'b' / 'best_factors.json').read_text() == \
      (tmp_path / 'a' / 'best_factors.json').read_text()
  with pytest.raises(ValueError, match='different space'):
    search_lib.search(CFG, params, windows, extension=EXT, workdir=tmp_path / 'b',
                      settings=search_lib.SearchConfig(**dict(vars(settings),
                                                              space='longrope2_free')),
                      fitness=fitness, progress=False)
