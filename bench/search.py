"""Benchmarks of the LongRoPE search: population fitness throughput, compilations, strategies.

  python bench/search.py --config configs/demo.py --workdir COPY_OF_A_PRETRAINED_RUN
  python bench/search.py --quick                  # the test model, seconds to minutes
  python bench/search.py --quick --devices 8      # simulate 8 CPU devices on the 'pop' axis
  python bench/search.py --vs-torch [--devices 2] [--impls blockwise,chunked,flash_cpu] [--force]

Prints its figures and writes them as JSON (--out). Figures:
  (a) candidates / s of the vectorized, sharded population call (one compile, then reused);
  (b) candidates / s of the naive port: one candidate at a time, its factors baked into the
      program as constants, so every candidate compiles anew;
  the number of compilations of the fitness over a 5-generation search (1 expected);
  strategies on one evaluation budget: the paper's GA against evosax ones, each best candidate's
  perplexity on held-out test documents at L' (never seen by the search).
With --vs-torch, only the population workload against PyTorch (bench/harness.py: all cores,
interleaved, load checked; writes bench/results/population.json): P candidates' mean NLL on the
same window(s) of length T, ours one vectorized `fitness.PopulationFitness` call per attention
implementation, against a loop over candidates in transformers' LlamaForCausalLM (sdpa, the same
weights) that sets the rotary inverse frequencies to inv_freq / factors and the cos / sin scale to
attn_scale per candidate; P = 8 and 16, T = 2K and 8K, time per candidate as P grows. Candidates
have n_hat = 0 (transformers has no n_hat; the cost does not depend on it), so both compute the
same NLL (the max difference is reported).
Timings depend on the machine and its load; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default=None, help="config file[:variant] (default configs/demo.py, "
                 "or configs/demo.py:test with --quick)")
  p.add_argument('--workdir', default=None, help='a run with a trained checkpoint (read only); '
                 'without one the model has random weights (throughput figures only mean much)')
  p.add_argument('--quick', action='store_true', help='small model, population and budget')
  p.add_argument('--devices', type=int, default=0, help='simulate this many CPU devices')
  p.add_argument('--population', type=int, default=None)
  p.add_argument('--repeats', type=int, default=None, help='timed population calls')
  p.add_argument('--naive', type=int, default=None, help='candidates for the naive loop')
  p.add_argument('--budget', type=int, default=None, help='evaluations per strategy')
  p.add_argument('--strategies', default='paper_ga,CMA_ES,SNES')
  p.add_argument('--out', default=None, help='JSON output (default bench/results/search.json, '
                 'population.json with --vs-torch)')
  p.add_argument('--vs-torch', action='store_true', help='only the population workload against '
                 'a PyTorch loop over candidates')
  p.add_argument('--impls', default='blockwise,chunked,flash_cpu',
                 help='--vs-torch: attention implementations (unregistered names skipped)')
  p.add_argument('--lengths', default='2048,8192', help='--vs-torch: window lengths T')
  p.add_argument('--populations', default='8,16', help='--vs-torch: population sizes P')
  p.add_argument('--windows', type=int, default=1, help='--vs-torch: windows per candidate')
  p.add_argument('--max-load', type=float, default=0.5)
  p.add_argument('--force', action='store_true')
  return p.parse_args(argv)


def population_vs_torch(args, run: harness.Run) -> dict:
  """P candidates' NLL: PopulationFitness (one call) against a PyTorch loop over candidates."""
  import jax
  import numpy as np
  import torch

  import forward
  from longrope_jax import fitness as fitness_lib
  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib

  impls = harness.attention_impls(args.impls)
  base = model_lib.get_config('demo')
  params = model_lib.init_params(base, jax.random.key(0))
  torch_model = forward.torch_from_ours(base, params, 0)
  rotary = torch_model.model.rotary_emb
  inv_freq = rope_lib.inv_frequencies(base.head_dim, base.rope_theta)
  rng = np.random.default_rng(0)
  rows = []
  for length in [int(x) for x in args.lengths.split(',')]:
    windows = rng.integers(0, base.vocab_size, (args.windows, length))
    windows_t = torch.from_numpy(windows)
    scale = length / base.original_length
    attn_scale = rope_lib.longrope_attention_scale(scale, base.original_length)
    for P in [int(x) for x in args.populations.split(',')]:
      factors_PF = np.sort(rng.uniform(1.0, 1.25 * scale, (P, base.head_dim // 2)), axis=-1)
      population = rope_lib.stack([rope_lib.make(f, 0, attn_scale) for f in factors_PF])

      def torch_loop():
        nll = []
        with torch.inference_mode():
          for f in factors_PF:
            rotary.inv_freq = torch.as_tensor(inv_freq / f, dtype=torch.float32)
            rotary.attention_scaling = attn_scale
            logits = torch_model(windows_t[:, :-1]).logits
            nll.append(float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), windows_t[:, 1:].reshape(-1))))
        return np.asarray(nll)

      fns, fitness = {'torch': torch_loop}, {}
      for impl in impls:
        fitness[impl] = fitness_lib.PopulationFitness(base.replace(attention=impl), params,
                                                      windows, max_population=P)
        fns[impl] = lambda f=fitness[impl]: f(population)
      reference = torch_loop()  # also torch's warm-up
      compile_s, diff = {}, {}
      for impl in impls:  # the first call compiles; its NLL is compared with torch's
        start = time.perf_counter()
        diff[impl] = float(np.abs(fns[impl]() - reference).max())
        compile_s[impl] = time.perf_counter() - start
      summary = harness.summarize(harness.interleaved(fns, args.repeats or 3, warmup=0), 'torch')
      per_candidate = {k: v / P for k, v in summary['seconds_median'].items()}
      rows.append(dict(length=length, population=P, windows=args.windows,
                       chunk={k: f.chunk for k, f in fitness.items()},
                       pop_devices={k: f.pop_devices for k, f in fitness.items()},
                       first_call_seconds=compile_s, max_abs_nll_diff_vs_torch=diff,
                       seconds_per_candidate=per_candidate, **summary))
      print(f"T={length:6d} P={P:3d}  s per candidate: " +
            '  '.join(f'{k} {v:.3f}' for k, v in per_candidate.items()) +
            f"  | torch/ours {harness.format_ratios(summary)}  | max|dNLL| "
            f"{max(diff.values()):.1e}", flush=True)
  return dict(impls=impls, devices=len(jax.devices()), rows=rows)


def load_config(spec: str):
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.vs_torch:
    args.out = args.out or str(harness.RESULTS / 'population.json')
    run = harness.Run(args)
  if args.devices:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')
  import jax
  if args.devices:
    jax.config.update('jax_num_cpu_devices', args.devices)
  import jax.numpy as jnp
  import numpy as np

  if args.vs_torch:
    out = population_vs_torch(args, run)
    run.write(out)
    return out

  from longrope_jax import data as data_lib
  from longrope_jax import evaluate as eval_lib
  from longrope_jax import model as model_lib
  from longrope_jax import pipeline
  from longrope_jax import fitness as fitness_lib
  from longrope_jax import rope as rope_lib
  from longrope_jax import search as search_lib
  from longrope_jax import search_space

  root = pathlib.Path(__file__).resolve().parents[1]
  config = load_config(args.config or str(root / ('configs/demo.py' + (':test' if args.quick
                                                                         else ''))))
  population = args.population or (8 if args.quick else 16)
  repeats = args.repeats or (3 if args.quick else 2)
  naive_count = args.naive or (4 if args.quick else 4)
  budget = args.budget or (4 * population if args.quick else 6 * population)
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_search_')
  run = pipeline.Run(config, workdir)
  mc = run.model_config
  try:
    params = run.params()
    weights = f'trained ({run.workdir})'
  except FileNotFoundError:
    params = model_lib.init_params(mc, jax.random.key(0))
    weights = 'random (no checkpoint in --workdir)'
  c = config.search
  extension = run.extension(c.multiple)
  length = extension.target_length
  val = data_lib.eval_windows(run.documents(c.split), length, c.num_windows, seed=config.seed)
  test = data_lib.eval_windows(run.documents(config.evaluate.split), length,
                               config.evaluate.num_windows, seed=config.seed)
  base = search_lib.SearchConfig.from_config(c.settings)
  parents = population // 2
  mutations = (population - parents) // 2
  settings = search_lib.SearchConfig(**dict(
      vars(base), population=population, parents=parents, mutations=mutations,
      crossovers=population - parents - mutations, generations=10_000))
  if settings.attention:  # the search's attention (numerically the model's, maybe faster)
    mc = mc.replace(attention=settings.attention)
  space = search_space.make_space(head_dim=mc.head_dim, extension=extension)
  rng = np.random.default_rng(0)

  def random_genomes(n):
    return space.encode(np.sort(rng.uniform(1, space.lambda_max, (n, space.num_freqs)), -1),
                        rng.choice(space.n_hat_choices, n))

  out = dict(model=config.model.variant, weights=weights, devices=len(jax.devices()),
             attention=mc.attention,
             platform=jax.devices()[0].platform, extension=dataclasses.asdict(extension),
             windows=int(len(val)),
             population=population)
  print(f"model {config.model.variant} ({weights}), L' = {length}, {len(val)} windows, "
        f"{len(jax.devices())} {out['platform']} device(s)", flush=True)

  # (a) the vectorized, sharded population call.
  fitness = fitness_lib.PopulationFitness(mc, params, val, length=length,
                                         max_population=population, chunk=settings.chunk,
                                         doc_batch=settings.doc_batch,
                                         memory_bytes=settings.memory_gb * 2**30)
  t0 = time.perf_counter()
  fitness(space.rope(random_genomes(population)))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    fitness(space.rope(random_genomes(population)))
  vector_s = time.perf_counter() - t0
  out['vectorized'] = dict(candidates_per_s=population * repeats / vector_s,
                           first_call_s=compile_s, chunk=fitness.chunk,
                           pop_devices=fitness.pop_devices, traces=fitness.traces)

  # (b) the naive port: factors baked in as constants, one compile per candidate.
  def naive(rope_one):
    const = jax.tree.map(np.asarray, rope_one)

    def nll(params, windows_BL):
      return model_lib.token_nll(mc, params, windows_BL, jax.tree.map(jnp.asarray, const)).sum()

    fn = jax.jit(nll)  # a new function: a new compilation
    batch = max(1, config.evaluate.batch_tokens // length)
    total = sum(float(fn(params, jnp.asarray(val[i:i + batch]))) for i in range(0, len(val),
                                                                               batch))
    return total / (len(val) * (length - 1))

  naive_genomes = random_genomes(naive_count)
  t0 = time.perf_counter()
  naive_nll = [naive(r) for r in rope_lib.unstack(space.rope(naive_genomes))]
  naive_s = time.perf_counter() - t0
  vector_nll = fitness(space.rope(naive_genomes))
  out['naive'] = dict(candidates_per_s=naive_count / naive_s, candidates=naive_count,
                      max_abs_diff_vs_vectorized=float(np.max(np.abs(np.asarray(naive_nll) -
                                                                     vector_nll))))
  out['speedup'] = out['vectorized']['candidates_per_s'] / out['naive']['candidates_per_s']
  print(f"(a) vectorized: {out['vectorized']['candidates_per_s']:.2f} candidates/s "
        f"(first call with compile {compile_s:.1f} s, chunk {fitness.chunk} on "
        f"{fitness.pop_devices} device(s))\n(b) naive: {out['naive']['candidates_per_s']:.3f} "
        f"candidates/s -> speedup {out['speedup']:.1f}x (same NLL to "
        f"{out['naive']['max_abs_diff_vs_vectorized']:.1e})", flush=True)

  # Compilations of the fitness over a 5-generation search.
  fresh = fitness_lib.PopulationFitness(mc, params, val, length=length, max_population=population,
                                       chunk=settings.chunk, doc_batch=settings.doc_batch,
                                       memory_bytes=settings.memory_gb * 2**30)
  five = search_lib.SearchConfig(**dict(vars(settings), generations=5))
  result = search_lib.search(mc, params, val, extension=extension, settings=five,
                             fitness=fresh, progress=False)
  out['compilations_5_generations'] = dict(traces=fresh.traces,
                                           jit_cache_size=fresh._fn._cache_size(),
                                           evaluations=result.evaluations)
  print(f"fitness compilations over a 5-generation search: {fresh.traces} "
        f"({result.evaluations} candidates evaluated)", flush=True)

  # Strategies on one evaluation budget; held-out perplexity of each best candidate.
  def held_out(rope):
    return math.exp(eval_lib.mean_nll(mc, params, test, rope,
                                      batch_tokens=config.evaluate.batch_tokens))

  baselines = {m: held_out(eval_lib.method_rope(m, config=mc, length=length))
               for m in ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn')}
  strategies = {}
  for name in args.strategies.split(','):
    t0 = time.perf_counter()
    r = search_lib.search(mc, params, val, extension=extension, fitness=fitness,
                          settings=search_lib.SearchConfig(**dict(
                              vars(settings), strategy=name, max_evaluations=budget)),
                          progress=False)
    strategies[name] = dict(evaluations=r.evaluations, generations=r.generations,
                            validation_perplexity=r.perplexity,
                            test_perplexity=held_out(r.rope()), n_hat=r.n_hat,
                            seconds=time.perf_counter() - t0)
    print(f"{name:>12}: {r.evaluations} evaluations, validation ppl {r.perplexity:.4f}, "
          f"held-out ppl {strategies[name]['test_perplexity']:.4f}", flush=True)
  out['strategies'] = dict(budget=budget, results=strategies, baselines_test_perplexity=baselines,
                           test_windows=int(len(test)))
  print('held-out baselines: ' + ', '.join(f'{k} {v:.4f}' for k, v in baselines.items()))

  path = pathlib.Path(args.out or root / 'bench' / 'results' / 'search.json')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2))
  print(f'wrote {path}')
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
