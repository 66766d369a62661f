"""Tokens/s and model FLOP utilization on an accelerator: the forward, the population fitness and
the training step per attention implementation, against PyTorch SDPA (flash) in transformers.

The device command (one line; bench/gpu_check.py first, about 2 min, its watchdog 150 s; this
script at most 315 s by default: --budget_s 270 of cells from its start, a watchdog at
--budget_s + 45 s; run it with timeout_s 540):

  set -o pipefail; export PYTHONUNBUFFERED=1; python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log; python3 bench/accelerator.py --out-dir $OUT 2>&1 | tee $OUT/accelerator.log

  python bench/accelerator.py --dry-run           # the cells and their time estimates, no device
  python bench/accelerator.py --cpu-smoke --out-dir /tmp/smoke   # tiny shapes on this CPU

Shapes (bf16 weights and compute, one sequence per step): `wide` = bench/forward.py's wide shape
(dim 256, 4 layers, 4 heads, 4 kv heads, head dim 64, MLP 768, 258-byte vocabulary, tied
embeddings, 0.8M parameters); `1b` = a Llama of dim 2048, 16 layers, 32 heads, 8 kv heads, head
dim 64, MLP 5632 (TinyLlama's layer), vocabulary 32000, untied: 0.85B parameters.
Parts: `forward` (jitted model.forward, logits f32[1, T, V]); `fitness` (fitness.PopulationFitness
of --candidates PI candidates on one window, the model running T positions); `train`
(train.make_train_step: AdamW, clip 1.0, remat --remat). Torch: transformers' LlamaForCausalLM
(attn_implementation='sdpa', bf16, eager) of the same shape with random weights, the SDPA flash
backend forced (torch.nn.attention.sdpa_kernel; recorded if refused), `use_cache=False`; its train
step is the same loss, AdamW (fused) and clip. Attention 'auto' is resolved
(attention_select.resolve_attention) and shares the cell of the implementation it names.

MFU = model FLOPs / time / peak: the forward's matmul FLOPs, 2 per weight per token plus causal
attention at half (plan.model_flops; x3 for the train step, remat recomputation not counted),
against the device's bf16 dense peak from PEAKS (stated in the JSON; --peak_tflops overrides) and
against a bf16 8192^3 jnp.dot measured in the same run (torch.matmul's too, in the torch process).

Timing: each cell alone (the GPU is not shared, so rounds are not interleaved): its first call
(compile + run), one warm call, then repeats until about --target_s (3 to --repeats); median and
min / max. Torch runs first, in a child process (its own memory pool, given back when it exits),
then JAX without preallocation. A cell that raises (out of memory included) is recorded and the
run goes on; a cell whose estimated time would pass --budget_s is skipped and recorded. The JSON
(accelerator_<device>.json under --out-dir) is rewritten after every cell. Never asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import gc
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))
import harness  # noqa: E402

TORCH = 'torch_sdpa'
PARTS = ('forward', 'fitness', 'train')
_WIDE = dict(vocab_size=258, dim=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
             mlp_dim=768, original_length=256, tie_embeddings=True)
SHAPES = {
    'wide': _WIDE,
    '1b': dict(vocab_size=32000, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
               head_dim=64, mlp_dim=5632, original_length=4096, tie_embeddings=False),
    'tiny': dict(vocab_size=258, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, original_length=64, tie_embeddings=True),  # --cpu-smoke
}
# (substring of the lower-cased device kind, bf16 dense TFLOP/s per chip, source); first match.
PEAKS = (
    ('h200', 989.0, 'NVIDIA H200 SXM datasheet (the H100 SXM rates), bf16 dense'),
    ('gh200', 989.0, 'NVIDIA GH200 datasheet, bf16 dense'),
    ('h100 pcie', 756.0, 'NVIDIA H100 PCIe datasheet, bf16 dense'),
    ('h100 nvl', 835.0, 'NVIDIA H100 NVL datasheet, bf16 dense'),
    ('h100', 989.0, 'NVIDIA H100 SXM datasheet, bf16 dense'),
    ('b200', 2250.0, 'NVIDIA B200 datasheet, bf16 dense'),
    ('a100', 312.0, 'NVIDIA A100 datasheet, bf16 dense'),
    ('l40s', 362.0, 'NVIDIA L40S datasheet, bf16 dense'),
    ('l4', 121.0, 'NVIDIA L4 datasheet, bf16 dense'),
    ('tpu v6', 918.0, 'Cloud TPU v6e, bf16 per chip'),
    ('tpu v5 lite', 197.0, 'Cloud TPU v5e, bf16 per chip'),
    ('tpu v5e', 197.0, 'Cloud TPU v5e, bf16 per chip'),
    ('tpu v5', 459.0, 'Cloud TPU v5p, bf16 per chip'),
    ('tpu v4', 275.0, 'Cloud TPU v4, bf16 per chip'),
)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One measurement: a part of one shape at one length with one attention implementation."""

  part: str
  shape: str
  length: int
  impl: str

  @property
  def name(self) -> str:
    return f'{self.part} {self.shape} {self.length} {self.impl}'


def _cells(part, shape, lengths, impls):
  return [Cell(part, shape, L, i) for L in lengths for i in impls]


K = 1024
# Most telling first, so that a budget cut drops the tail; torch's cells run first (their own
# process, --torch_share of the budget). 'auto' shares the cell of the implementation it names.
DEFAULT_CELLS = (
    _cells('forward', '1b', [8 * K], [TORCH, 'cudnn', 'pallas_gpu', 'blockwise', 'auto'])
    + _cells('train', '1b', [8 * K], [TORCH, 'cudnn', 'auto'])
    + _cells('fitness', '1b', [8 * K], ['cudnn', 'auto'])
    + _cells('train', '1b', [8 * K], ['pallas_gpu'])
    + _cells('forward', '1b', [32 * K], [TORCH, 'cudnn', 'pallas_gpu'])
    + _cells('train', '1b', [32 * K], [TORCH, 'cudnn'])
    + _cells('forward', 'wide', [8 * K], [TORCH, 'cudnn', 'pallas_gpu', 'blockwise', 'chunked',
                                          'dense'])
    + _cells('forward', 'wide', [32 * K], [TORCH, 'cudnn', 'pallas_gpu', 'blockwise'])
    + _cells('forward', 'wide', [128 * K], [TORCH, 'cudnn', 'pallas_gpu'])
    + _cells('forward', '1b', [128 * K], [TORCH, 'cudnn'])
    + _cells('fitness', '1b', [8 * K], ['pallas_gpu'])
    + _cells('fitness', '1b', [32 * K], ['cudnn'])
    + _cells('train', 'wide', [8 * K, 32 * K], [TORCH, 'cudnn', 'pallas_gpu'])
    + _cells('train', '1b', [128 * K], [TORCH, 'cudnn'])
    + _cells('train', '1b', [8 * K], ['blockwise', 'chunked'])
    + _cells('forward', '1b', [8 * K], ['chunked', 'dense'])
    + _cells('forward', 'wide', [128 * K], ['blockwise']))
SMOKE_CELLS = (  # the same code paths at 64 tokens (the Pallas kernel interpreted)
    _cells('forward', 'tiny', [64], [TORCH, 'cudnn', 'pallas_gpu', 'auto'])
    + _cells('fitness', 'tiny', [64], ['auto'])
    + _cells('train', 'tiny', [64], [TORCH, 'auto'])
    + _cells('forward', 'tiny', [4 * K * K], ['dense']))  # skipped: its scores do not fit


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out-dir', default=str(harness.RESULTS),
                 help='the JSON is written here as accelerator_<device>.json')
  p.add_argument('--out', default=None, help='the JSON file (overrides --out-dir)')
  p.add_argument('--budget_s', type=float, default=None,
                 help='seconds of cells (default 270; 600 with --cpu-smoke); a cell whose '
                 'estimate would pass it is skipped and recorded')
  p.add_argument('--torch_share', type=float, default=0.3,
                 help='fraction of --budget_s the torch process may take first')
  p.add_argument('--parts', default=None, help=f'comma-separated of {PARTS}: with --shapes, '
                 '--lengths and --impls, every combination instead of the default cells')
  p.add_argument('--shapes', default=None, help=f'comma-separated of {sorted(SHAPES)}')
  p.add_argument('--lengths', default=None, help='comma-separated, e.g. 8192,32768')
  p.add_argument('--impls', default=None,
                 help=f'comma-separated attention implementations and {TORCH}')
  p.add_argument('--candidates', type=int, default=4, help='population fitness candidates')
  p.add_argument('--remat', default='none', help="the train step's ModelConfig.remat")
  p.add_argument('--repeats', type=int, default=10, help='timed calls per cell at most')
  p.add_argument('--target_s', type=float, default=1.5, help='timed seconds per cell, about')
  p.add_argument('--peak_tflops', type=float, default=None, help='overrides PEAKS')
  p.add_argument('--matmul', type=int, default=8192, help='n of the n^3 bf16 matmul measured')
  p.add_argument('--cpu-smoke', action='store_true',
                 help='tiny shapes on the CPU: Pallas interpreted, cuDNN by XLA; torch on CPU')
  p.add_argument('--dry-run', action='store_true', help='print the cells and estimates only')
  p.add_argument('--assume-device', default='NVIDIA H200', help='device kind for --dry-run')
  p.add_argument('--torch-child', default=None, help=argparse.SUPPRESS)  # internal
  args = p.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = 600.0 if args.cpu_smoke else 270.0
  if args.cpu_smoke:
    args.matmul, args.repeats, args.target_s = min(args.matmul, 256), 3, 0.0
  return args


def select_cells(args) -> list[Cell]:
  """The default cells (SMOKE_CELLS with --cpu-smoke), or every combination of the flags."""
  if not any((args.parts, args.shapes, args.lengths, args.impls)):
    return list(SMOKE_CELLS if args.cpu_smoke else DEFAULT_CELLS)
  parts = (args.parts or ','.join(PARTS)).split(',')
  shapes = (args.shapes or ('tiny' if args.cpu_smoke else 'wide,1b')).split(',')
  lengths = [int(x) for x in (args.lengths or ('64' if args.cpu_smoke else '8192')).split(',')]
  impls = (args.impls or f'{TORCH},cudnn,pallas_gpu,blockwise,auto').split(',')
  for name, values, known in (('--parts', parts, PARTS), ('--shapes', shapes, SHAPES)):
    bad = [v for v in values if v not in known]
    if bad:
      raise SystemExit(f'{name}: unknown {bad}; choose from {sorted(known)}.')
  return [Cell(part, shape, L, impl) for shape in shapes for part in parts for L in lengths
          for impl in impls if not (part == 'fitness' and impl == TORCH)]


# ----------------------------------------------------------------------------- estimates
def peak_for(device_kind: str) -> tuple[float | None, str]:
  """(bf16 dense TFLOP/s, source) of the first PEAKS entry found in `device_kind`."""
  kind = device_kind.lower()
  for key, tflops, source in PEAKS:
    if key in kind:
      return tflops, source
  return None, f'no entry for {device_kind!r} in PEAKS (pass --peak_tflops)'


def model_config(shape: str, impl: str, remat: str = 'none'):
  from longrope_jax import model as model_lib
  return model_lib.ModelConfig(**SHAPES[shape], dtype='bfloat16', param_dtype='bfloat16',
                               attention=impl, remat=remat)


def cell_flops(cell: Cell, candidates: int) -> float:
  """Model FLOPs of one call of the cell (plan.model_flops)."""
  from longrope_jax import plan
  config = model_config(cell.shape, 'dense')
  batch = candidates if cell.part == 'fitness' else 1
  return plan.model_flops(config, batch, cell.length, train=cell.part == 'train')


def dense_fits(cell: Cell, memory_bytes: float) -> bool:
  """Dense attention's f32 scores and probabilities (every layer's, for a train step) in 40% of
  the device memory."""
  c = SHAPES[cell.shape]
  scores = 2 * 4 * c['num_heads'] * cell.length ** 2
  return scores * (c['num_layers'] if cell.part == 'train' else 1) < 0.4 * memory_bytes


# First-call seconds (compile and first run) on an H200's host, guessed before any run there
# (XLA compiles a scanned layer once; the Pallas kernels add Triton compiles). The JSON records
# each cell's estimate beside its measured wall time, to correct these.
COMPILE_S = {('forward', False): 5, ('forward', True): 14, ('fitness', False): 8,
             ('fitness', True): 22, ('train', False): 10, ('train', True): 40}
FLASH = ('cudnn', 'pallas_gpu', 'splash', TORCH)


def estimate_s(cell: Cell, args, rate: float) -> float:
  """Guessed seconds of a cell: its first call, one warm call and ~target_s of repeats, the run
  at `rate` FLOP/s x 0.35 for flash kernels (x 0.1 for the XLA attentions)."""
  big = SHAPES[cell.shape]['num_layers'] * SHAPES[cell.shape]['dim'] ** 2 > 1e7
  first = 3.0 if cell.impl == TORCH else COMPILE_S[(cell.part, big)]
  if args.cpu_smoke:
    first = 2.0
  run = cell_flops(cell, args.candidates) / (rate * (0.35 if cell.impl in FLASH else 0.1)) + 2e-3
  return first + 2 * run + min(max(3 * run, args.target_s), args.repeats * run)


# ----------------------------------------------------------------------------- timing
def measure(fn, sync, args) -> dict:
  """Seconds of fn(): the first call, then one warm call and repeats until about target_s."""
  start = time.perf_counter()
  fn()
  sync()
  first = time.perf_counter() - start

  def timed():
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0

  warm = timed()
  repeats = max(3, min(args.repeats, int(args.target_s / max(warm, 1e-6))))
  times = [timed() for _ in range(repeats)]
  s = harness.summarize({'t': times}, None)
  median = s['seconds_median']['t']
  return dict(first_call_s=first, seconds_median=median, seconds_min=min(times),
              seconds_max=max(times), spread=(max(times) - min(times)) / median,
              seconds_all=times, compile_s_about=max(0.0, first - median))


def classify(error: BaseException) -> str:
  """'oom' for out-of-memory errors (XLA's RESOURCE_EXHAUSTED, torch's OutOfMemoryError)."""
  text = f'{type(error).__name__}: {error}'
  return 'oom' if re.search(r'RESOURCE_EXHAUSTED|out of memory|OutOfMemory', text, re.I) else \
      'error'


class Budget:
  """Skips a cell whose estimate would pass the deadline (and longer lengths of a cell that ran
  out of memory); rows say why."""

  def __init__(self, deadline: float):
    self.deadline = deadline
    self.oom: set[tuple] = set()

  def skip_reason(self, cell: Cell, estimate: float, now: float | None = None) -> str | None:
    now = time.perf_counter() if now is None else now
    if any(key == (cell.part, cell.shape, cell.impl) and length <= cell.length
           for key, length in self.oom):
      return 'skipped: out of memory at this or a shorter length'
    if now + estimate > self.deadline:
      return f'skipped: budget (estimate {estimate:.0f} s, {max(0, self.deadline - now):.0f} s left)'
    return None

  def record(self, cell: Cell, status: str) -> None:
    if status == 'oom':
      self.oom.add(((cell.part, cell.shape, cell.impl), cell.length))


def run_cells(cells, make, sync, args, rate, budget: Budget, on_row) -> list[dict]:
  """Each cell: skipped (budget, memory), or `make(cell)` -> fn timed by `measure`; errors and
  OOM recorded per cell."""
  rows = []
  for cell in cells:
    estimate = estimate_s(cell, args, rate)
    row = dict(part=cell.part, shape=cell.shape, length=cell.length, impl=cell.impl,
               estimated_s=round(estimate, 1))
    reason = budget.skip_reason(cell, estimate)
    if reason:
      row['status'] = reason
    else:
      start = time.perf_counter()
      try:
        fn, info = make(cell)
        row.update(info)
        row.update(measure(fn, sync, args))
        row['status'] = 'ok'
      except Exception as e:  # a cell's failure is recorded; the others still run
        row['status'] = classify(e)
        row['error'] = f'{type(e).__name__}: {str(e)[:2000]}'
        traceback.print_exc()
      finally:
        fn = None
        gc.collect()
      row['wall_s'] = round(time.perf_counter() - start, 2)
      budget.record(cell, row['status'])
    rows.append(row)
    on_row(row)
  return rows


# ----------------------------------------------------------------------------- torch (child)
def torch_main(spec_path: str) -> None:
  """The torch cells of a spec written by the parent; rows written to spec['out']."""
  spec = json.loads(pathlib.Path(spec_path).read_text())
  args = argparse.Namespace(**spec['args'])
  import torch
  import transformers
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  info = dict(torch=torch.__version__, transformers=transformers.__version__,
              device=torch.cuda.get_device_name() if cuda else 'cpu', flash_forced=cuda)
  out = dict(info=info, rows=[])
  write = lambda: pathlib.Path(spec['out']).write_text(json.dumps(out, indent=1))
  n = args.matmul
  a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
  t = measure(lambda: torch.matmul(a, b), sync, args)
  info['matmul_tflops'] = 2 * n ** 3 / t['seconds_median'] / 1e12
  del a, b
  write()

  def sdpa():
    """The flash backend forced while it runs; PyTorch's own choice once it refused."""
    if not info['flash_forced']:
      return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

  def flash_or_default(run):
    """run(), again under PyTorch's default SDPA choice if the flash backend refused."""
    def fn():
      try:
        return run()
      except RuntimeError as e:
        if not info['flash_forced'] or 'kernel' not in str(e).lower():
          raise
        info.update(flash_forced=False, flash_refused=str(e)[:500])
        print(f'SDPA flash backend refused ({str(e)[:200]}); default choice from now on',
              flush=True)
        return run()
    return fn

  models = {}

  def make(cell: Cell):
    if cell.shape not in models:
      models.clear()  # one shape's model on the device at a time
    gc.collect()
    if cuda:
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    if cell.shape not in models:
      hf = dict(spec['hf_configs'][cell.shape], max_position_embeddings=max(
          spec['max_length'], spec['hf_configs'][cell.shape]['max_position_embeddings']))
      config = transformers.LlamaConfig.from_dict(hf, attn_implementation='sdpa')
      torch.manual_seed(0)
      with device:
        models[cell.shape] = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model = models[cell.shape]
    x = torch.randint(0, model.config.vocab_size, (1, cell.length + 1), device=device)
    if cell.part == 'forward':
      model.eval()

      def forward():
        with torch.inference_mode(), sdpa():
          return model(input_ids=x[:, :-1], use_cache=False).logits
      return flash_or_default(forward), {}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=cuda)

    def step():
      with sdpa():
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
      loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                               x[:, 1:].reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
    return flash_or_default(step), {}

  def on_row(row):
    row['sdpa'] = 'flash (forced)' if info['flash_forced'] else 'default choice'
    if cuda and row.get('status') == 'ok':
      row['torch_peak_bytes'] = torch.cuda.max_memory_allocated()
    out['rows'].append(row)
    write()
    print(format_row(row, None, None), flush=True)

  cells = [Cell(**c) for c in spec['cells']]
  run_cells(cells, make, sync, args, spec['rate'], Budget(time.perf_counter() + spec['budget_s']),
            on_row)


def run_torch(cells, args, rate: float, budget_s: float, out_path: pathlib.Path) -> dict:
  """The torch cells in a child process (its CUDA memory given back when it exits); its rows and
  versions, or why it did not run."""
  try:
    import importlib.util
    if importlib.util.find_spec('torch') is None or importlib.util.find_spec(
        'transformers') is None:
      return dict(info=dict(skipped='torch or transformers not installed'), rows=[])
  except ValueError:
    pass
  from longrope_jax.hf import export
  shapes = list(dict.fromkeys(c.shape for c in cells))
  spec = dict(args=dict(repeats=args.repeats, target_s=args.target_s, matmul=args.matmul,
                        candidates=args.candidates, cpu_smoke=args.cpu_smoke),
              cells=[dataclasses.asdict(c) for c in cells], rate=rate, budget_s=budget_s,
              max_length=max(c.length for c in cells), out=str(out_path),
              hf_configs={s: export.hf_config_for(model_config(s, 'dense')) for s in shapes})
  spec_path = out_path.with_suffix('.spec.json')
  spec_path.write_text(json.dumps(spec))
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # the child never touches the accelerator via JAX
  try:
    subprocess.run([sys.executable, __file__, '--torch-child', str(spec_path)], env=env,
                   timeout=budget_s + 60, check=False)
  except subprocess.TimeoutExpired:
    print(f'torch process stopped after {budget_s + 60:.0f} s', flush=True)
  if not out_path.is_file():
    return dict(info=dict(skipped='the torch process wrote nothing (see the log)'), rows=[])
  return json.loads(out_path.read_text())


# ----------------------------------------------------------------------------- JAX
def jax_maker(args):
  """make(cell) -> (fn, info) for the JAX cells; params shared by the cells of one shape."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from longrope_jax import fitness as fitness_lib
  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib
  from longrope_jax import train as train_lib

  cache = {}

  def params_for(shape):  # kept for the run: the 1B model's bf16 params are 1.7 GB
    if shape not in cache:
      cache[shape] = model_lib.init_params(model_config(shape, 'dense'), jax.random.key(0))
    return cache[shape]

  def make(cell: Cell):
    config = model_config(cell.shape, cell.impl, args.remat if cell.part == 'train' else 'none')
    params = params_for(cell.shape)
    rng = np.random.default_rng(cell.length)
    T = cell.length
    info = dict(attention=model_lib.attention_that_runs(cell.impl, dtype='bfloat16', length=T))
    rope = rope_lib.none(head_dim=config.head_dim)
    if cell.part == 'forward':
      tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, T)), jnp.int32)
      positions = jnp.arange(T, dtype=jnp.int32)[None]
      forward = jax.jit(lambda p, t: model_lib.forward(config, p, t, positions, rope))
      return lambda: forward(params, tokens).block_until_ready(), info
    if cell.part == 'fitness':
      windows = rng.integers(0, config.vocab_size, (1, T + 1))  # the model runs T positions
      fitness = fitness_lib.PopulationFitness(config, params, windows, length=T + 1,
                                             max_population=args.candidates,
                                             memory_bytes=16 * 2 ** 30)
      population = rope_lib.stack([rope_lib.linear(head_dim=config.head_dim, scale=2 + s)
                                   for s in range(args.candidates)])
      info.update(chunk=fitness.chunk, candidates=args.candidates, windows=1)
      return lambda: fitness(population), info
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(steps=1000, lr=3e-4, warmup=10))
    holder = {'state': train_lib.init_state(config, optimizer, params=params)}
    step = train_lib.make_train_step(config, optimizer)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, T + 1)), jnp.int32)

    def run():
      holder['state'], metrics = step(holder['state'], tokens, rope)
      jax.block_until_ready(metrics['loss'])
    info['remat'] = config.remat
    return run, info

  return make


def jax_matmul(n: int, args) -> float:
  """bf16 TFLOP/s of an n^3 jnp.dot on random data (median of `measure`)."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.key(1))
  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in (ka, kb))
  dot = jax.jit(jnp.dot)
  t = measure(lambda: dot(a, b).block_until_ready(), lambda: None, args)
  return 2 * n ** 3 / t['seconds_median'] / 1e12


# ----------------------------------------------------------------------------- output
def decorate(row: dict, args, peak: float | None, matmul: float | None) -> dict:
  """Adds tokens/s, model FLOP/s and MFU (against the peak and the measured matmul)."""
  if row.get('status') != 'ok':
    return row
  cell = Cell(row['part'], row['shape'], row['length'], row['impl'])
  flops = cell_flops(cell, args.candidates)
  tokens = row['length'] * (args.candidates if cell.part == 'fitness' else 1)
  rate = flops / row['seconds_median']
  row.update(model_flops=flops, tokens_per_s=tokens / row['seconds_median'],
             tflops_per_s=rate / 1e12,
             mfu_vs_peak=rate / (peak * 1e12) if peak else None,
             mfu_vs_matmul=rate / (matmul * 1e12) if matmul else None)
  return row


def format_row(row: dict, peak, matmul) -> str:
  head = f"{row['part']:7s} {row['shape']:4s} {row['length']:>7d} {row['impl']:10s}"
  if row.get('status') != 'ok':
    return f"{head} {row.get('status')}" + (f" ({row['error'][:90]})" if 'error' in row else '')
  text = (f"{head} {row['seconds_median'] * 1e3:9.1f} ms [{row['seconds_min'] * 1e3:.1f}-"
          f"{row['seconds_max'] * 1e3:.1f}]  first {row['first_call_s']:5.1f} s")
  if 'tokens_per_s' in row:
    text += f"  {row['tokens_per_s']:10,.0f} tok/s"
  if row.get('mfu_vs_peak') is not None:
    text += f"  MFU {100 * row['mfu_vs_peak']:4.1f}%"
  if row.get('mfu_vs_matmul') is not None:
    text += f" ({100 * row['mfu_vs_matmul']:.1f}% of matmul)"
  return text


def summary_table(rows: list[dict]) -> str:
  """tokens/s and MFU vs peak per (part, shape, length) x implementation."""
  impls = list(dict.fromkeys(r['impl'] for r in rows))
  keys = list(dict.fromkeys((r['part'], r['shape'], r['length']) for r in rows))
  lines = [f"{'part':7s} {'shape':5s} {'length':>7s} " + ' '.join(f'{i:>17s}' for i in impls)]
  for key in keys:
    cells = []
    for impl in impls:
      r = next((r for r in rows if (r['part'], r['shape'], r['length'], r['impl']) ==
                (*key, impl)), None)
      if r is None:
        cells.append(f"{'':>17s}")
      elif r.get('status') != 'ok':
        cells.append(f"{r['status'].split(':')[0][:17]:>17s}")
      else:
        mfu = r.get('mfu_vs_peak') or r.get('mfu_vs_matmul') or 0
        cells.append(f"{r['tokens_per_s']:>10,.0f} {100 * mfu:4.1f}%")
    lines.append(f'{key[0]:7s} {key[1]:5s} {key[2]:>7d} ' + ' '.join(cells))
  return '\n'.join(lines)


def machine(torch_info: dict) -> dict:
  """harness.machine_facts without importing torch here (the child reported its versions)."""
  import platform
  versions = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'numpy'):
    versions[name] = sys.modules[name].__version__ if name in sys.modules else None
  versions.update(torch=torch_info.get('torch'), transformers=torch_info.get('transformers'))
  import jax
  return dict(cpu=harness.cpu_model(), cpu_count=os.cpu_count(), usable_cores=harness.cores(),
              platform=platform.platform(), versions=versions,
              jax_devices=[str(d) for d in jax.devices()],
              env={k: os.environ.get(k) for k in harness.ENV_KEYS + (
                  'XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION')})


def device_slug(kind: str) -> str:
  """'NVIDIA H200' -> 'h200'; 'TPU v5 lite' -> 'tpu_v5_lite'; 'cpu' -> 'cpu'."""
  kind = re.sub(r'^nvidia\s+', '', kind.lower())
  return re.sub(r'[^a-z0-9]+', '_', kind).strip('_') or 'device'


def schedule(cells: list[Cell], backend: str, memory_bytes: float
             ) -> tuple[list[Cell], list[Cell], list[dict]]:
  """(torch cells, JAX cells to run, rows decided without running): 'auto' resolved for
  `backend` (a row saying which cell it shares), repeated cells dropped, dense skipped where its
  scores would not fit."""
  from longrope_jax import attention_select
  torch_cells = [c for c in cells if c.impl == TORCH]
  shapes = list(dict.fromkeys(c.shape for c in torch_cells))
  torch_cells.sort(key=lambda c: shapes.index(c.shape))  # one model built per shape
  jax_cells, rows, seen = [], [], set()
  for cell in cells:
    if cell.impl == TORCH:
      continue
    run = cell
    if cell.impl == attention_select.AUTO:
      impl, reason = attention_select.resolve_attention(cell.impl, backend=backend,
                                                        dtype='bfloat16', length=cell.length)
      run = dataclasses.replace(cell, impl=impl)
      rows.append(dict(dataclasses.asdict(cell), status=f'same as {impl}', resolves_to=impl,
                       reason=reason))
    if run in seen:
      continue
    seen.add(run)
    if run.impl == 'dense' and not dense_fits(run, memory_bytes):
      rows.append(dict(dataclasses.asdict(run), status='skipped: dense scores do not fit'))
      continue
    jax_cells.append(run)
  return torch_cells, jax_cells, rows


JAX_SETUP_S = 20.0  # import, the matmul, the first shape's init_params (guessed, as COMPILE_S)
TORCH_SETUP_S = 15.0  # the child's imports, matmul and first model


def dry_run(cells, args) -> None:
  """The cells in run order with their estimates, as the budget would cut them on
  --assume-device (139 GiB assumed)."""
  peak, source = peak_for(args.assume_device)
  rate = (peak or 100.0) * 1e12
  torch_cells, jax_cells, rows = schedule(cells, 'gpu', 139 * 2 ** 30)
  total = TORCH_SETUP_S
  torch_budget = args.budget_s * args.torch_share
  for group, limit in ((torch_cells, torch_budget), (jax_cells, args.budget_s)):
    for cell in group:
      estimate = estimate_s(cell, args, rate)
      cut = total + estimate > limit
      total += 0 if cut else estimate
      print(f"{cell.name:32s} {estimate:6.1f} s  {'skipped (budget)' if cut else f'at {total:5.0f} s'}")
    total = max(total, 0) + (JAX_SETUP_S if group is torch_cells else 0)
  for row in rows:
    print(f"{row['part']} {row['shape']} {row['length']} {row['impl']}: {row['status']}")
  print(f'{args.assume_device}: peak {peak} TFLOP/s ({source}); budget {args.budget_s:.0f} s, '
        f'estimated end {total:.0f} s')


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.torch_child:
    torch_main(args.torch_child)
    return 0
  cells = select_cells(args)
  if args.dry_run:
    dry_run(cells, args)
    return 0
  faulthandler.dump_traceback_later(args.budget_s + 45, exit=True)  # the command's bound
  try:  # disarmed on every way out (exit=True would end a caller that imported main)
    return _bench_main(args, cells)
  finally:
    faulthandler.cancel_dump_traceback_later()


def _bench_main(args, cells) -> int:
  start = time.perf_counter()
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # leaves torch's memory free
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  if args.cpu_smoke:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  date = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  load_start = os.getloadavg()
  out_dir = pathlib.Path(args.out).resolve().parent if args.out else pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  torch_cells = [c for c in cells if c.impl == TORCH]
  rate_guess = 2e10 if args.cpu_smoke else (peak_for(args.assume_device)[0] or 100.0) * 1e12
  with tempfile.TemporaryDirectory() as tmp:
    torch_out = run_torch(torch_cells, args, rate_guess, args.budget_s * args.torch_share,
                          pathlib.Path(tmp) / 'torch_rows.json') if torch_cells else dict(
                              info=dict(skipped='no torch cells'), rows=[])

  import jax  # after torch's process: JAX's memory pool starts on a free device
  device = jax.devices()[0]
  backend = jax.default_backend()
  kind = device.device_kind if device.platform != 'cpu' else 'cpu'
  peak, source = (args.peak_tflops, '--peak_tflops') if args.peak_tflops else peak_for(kind)
  out = pathlib.Path(args.out) if args.out else out_dir / f'accelerator_{device_slug(kind)}.json'
  matmul = jax_matmul(args.matmul, args)
  memory = (device.memory_stats() or {}).get('bytes_limit', 8 * 2 ** 30)
  print(f'{kind} ({backend}), jax {jax.__version__}; peak {peak} TFLOP/s ({source}); bf16 '
        f'{args.matmul}^3 matmul: jax {matmul:.1f} TFLOP/s, torch '
        f"{torch_out['info'].get('matmul_tflops', float('nan')):.1f}", flush=True)
  _, jax_cells, decided = schedule(cells, backend, memory)
  rows = [decorate(r, args, peak, matmul) for r in torch_out['rows']] + decided
  record = dict(device=str(device), device_kind=kind, backend=backend,
                cpu_smoke=args.cpu_smoke, peak_tflops=peak, peak_source=source,
                matmul=dict(n=args.matmul, jax_tflops=matmul,
                            torch_tflops=torch_out['info'].get('matmul_tflops')),
                device_memory_bytes=memory, torch=torch_out['info'],
                shapes={s: dict(SHAPES[s], params=model_config(s, 'dense').num_params())
                        for s in sorted({c.shape for c in cells})},
                settings=dict(candidates=args.candidates, remat=args.remat,
                              repeats=args.repeats, target_s=args.target_s,
                              budget_s=args.budget_s, dtype='bfloat16', batch=1),
                rows=rows, command=[sys.executable, *sys.argv], date=date,
                machine=machine(torch_out['info']), load_average_start=load_start)

  def write():
    record.update(wall_seconds=time.perf_counter() - start, load_average_end=os.getloadavg())
    tmp = out.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1, default=harness._jsonable) + '\n')
    tmp.replace(out)

  def on_row(row):
    if row.get('status') == 'ok':
      row['jax_peak_bytes_so_far'] = (device.memory_stats() or {}).get('peak_bytes_in_use')
    rows.append(decorate(row, args, peak, matmul))
    write()
    print(format_row(row, peak, matmul), flush=True)

  write()
  run_cells(jax_cells, jax_maker(args), lambda: None, args, (peak or matmul) * 1e12,
            Budget(start + args.budget_s), on_row)
  write()
  ordered = sorted(rows, key=lambda r: (PARTS.index(r['part']), r['shape'], r['length']))
  print(f"\n{kind}: tokens/s and MFU vs {peak} TFLOP/s ({source}) per implementation\n"
        + summary_table(ordered) + f"\nJSON: {out}  ({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == '__main__':
  sys.exit(main())
