"""Accelerator attention on a GPU against dense attention: a short prepared check.

  python bench/gpu_check.py --out gpu_check.json            # on a GPU: about 2 minutes
  python bench/gpu_check.py --cpu-smoke --out smoke.json    # here: interpret mode / XLA stand-ins

Each check runs one implementation at small shapes in f32 or bf16 for one layout of positions
(contiguous, sliding window, packed documents with segment ids, queries after a prefix, a zigzag
ring shard, shuffled positions with empty rows) and compares the output and the gradients wrt q,
k, v with a dense f32 reference (HIGHEST matmul precision) on the same inputs: f32 within 1e-5,
bf16 within 1% of max(1, the reference's largest magnitude). Implementations: the Pallas (Triton)
kernels at their default tiles and at 16-wide tiles, cuDNN (`cudnn`: is_causal, or its fallback;
the lowered HLO says whether cuDNN ran), ring attention with the Pallas step kernel on a
one-device 'seq' mesh, and what 'auto' resolves to. It prints a pass / fail table with the max
errors, writes JSON to --out after every check, exits 1 if any check fails and never hangs: a
watchdog (--timeout) dumps the stacks and exits 1.

It imports only the attention modules (jax, numpy; no flax, orbax, ml_collections), so it runs
where only jax is installed.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import pathlib
import platform
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

F32_ATOL = 1e-5
BF16_RTOL = 1e-2


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True, help='JSON file to write')
  p.add_argument('--cpu-smoke', action='store_true',
                 help='run on the CPU: Pallas in interpret mode, the cuDNN call by XLA')
  p.add_argument('--all', action='store_true',
                 help='with --cpu-smoke: every check of the GPU list, not the smoke subset')
  p.add_argument('--timeout', type=float, default=None,
                 help='seconds before the watchdog exits (default 150 on a GPU, 900 smoke)')
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs
def _layout(name: str, B: int, T: int, S: int):
  """(q_pos, k_pos, q_seg, k_seg, window) of a named layout of positions."""
  import jax.numpy as jnp
  import numpy as np
  from longrope_jax import ring_attention

  as_i32 = lambda x: jnp.asarray(np.broadcast_to(x, (B, x.shape[-1])), jnp.int32)
  k_pos = as_i32(np.arange(S))
  if name in ('causal', 'window'):
    return k_pos[:, S - T:], k_pos, None, None, (T // 5 if name == 'window' else None)
  if name == 'prefix':
    return k_pos[:, S - T:], k_pos, None, None, None
  if name == 'packed':
    lengths = [T * 2 // 5, T // 4, T - T * 2 // 5 - T // 4]
    pos = as_i32(np.concatenate([np.arange(n) for n in lengths]))
    seg = as_i32(np.repeat(np.arange(len(lengths)), lengths))
    return pos, pos, seg, seg, T // 6
  if name == 'zigzag':
    pos = as_i32(ring_attention.layout_order(T, 4))
    return pos, pos, None, None, None
  if name == 'shuffled':
    rng = np.random.default_rng(1)
    q_pos = as_i32(rng.permutation(T))
    return q_pos, q_pos + 7, None, None, T // 2  # queries at 0..6 see no key
  raise ValueError(name)


def _reference(q, k, v, q_pos, k_pos, window, q_seg, k_seg):
  """Dense causal GQA in f32 at HIGHEST precision, the contract's mask written out."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  diff = q_pos[:, :, None] - k_pos[:, None, :]
  mask = diff >= 0
  if window is not None:
    mask &= diff < window
  if q_seg is not None:
    mask &= q_seg[:, :, None] == k_seg[:, None, :]
  mask = mask[:, None]
  hi = lax.Precision.HIGHEST
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, jnp.repeat(k, G, axis=2), precision=hi) * H ** -0.5
  probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1), 0.0)
  return jnp.einsum('BNTS,BSNH->BTNH', probs, jnp.repeat(v, G, axis=2), precision=hi)


# ----------------------------------------------------------------------------- implementations
def _implementations(smoke: bool):
  """name -> fn(q, k, v, q_pos, k_pos, window, q_seg, k_seg) -> out."""
  import jax
  from longrope_jax import gpu_attention
  from longrope_jax import mesh as mesh_lib
  from longrope_jax import pallas_attention
  from longrope_jax import ring_attention

  def pallas(tiles=None, backward_tiles=None):
    return lambda q, k, v, qp, kp, w, qs, ks: pallas_attention.pallas_attention(
        q, k, v, qp, kp, window=w, q_seg_BT=qs, k_seg_BS=ks, tiles=tiles,
        backward_tiles=backward_tiles)

  def cudnn(q, k, v, qp, kp, w, qs, ks):
    return gpu_attention.cudnn_attention(q, k, v, qp, kp, window=w, q_seg_BT=qs, k_seg_BS=ks,
                                         implementation='xla' if smoke else 'cudnn',
                                         fallback='pallas_gpu')

  one_device = mesh_lib.make_mesh(seq=1, devices=jax.devices()[:1])

  def ring(q, k, v, qp, kp, w, qs, ks):
    return ring_attention.ring_attention(q, k, v, qp, kp, window=w, mesh=one_device,
                                         step='pallas_gpu')

  return {'pallas_gpu': pallas(), 'pallas_gpu_16': pallas((16, 16), (16, 32)), 'cudnn': cudnn,
          'ring_pallas': ring}


def _checks(smoke: bool, every: bool = False):
  """(implementation, dtype, layout, (B, T, S, N, K, H))."""
  small = (1, 64, 64, 4, 2, 32) if smoke else (2, 256, 256, 4, 2, 64)
  wide = (1, 64, 64, 2, 2, 128) if smoke else (1, 256, 256, 4, 4, 128)
  prefix = (1, 32, 64, 4, 2, 32) if smoke else (2, 128, 256, 4, 2, 64)
  checks = []
  for dtype in ('float32', 'bfloat16'):
    checks += [('pallas_gpu', dtype, 'causal', wide), ('pallas_gpu', dtype, 'window', small),
               ('pallas_gpu', dtype, 'packed', small), ('pallas_gpu', dtype, 'prefix', prefix),
               ('pallas_gpu', dtype, 'shuffled', small)]
  checks += [('pallas_gpu_16', 'bfloat16', 'causal', small),
             ('cudnn', 'bfloat16', 'causal', wide), ('cudnn', 'bfloat16', 'window', small),
             ('cudnn', 'bfloat16', 'zigzag', small), ('cudnn', 'bfloat16', 'packed', small),
             ('cudnn', 'float32', 'causal', small),
             ('ring_pallas', 'float32', 'zigzag', small),
             ('ring_pallas', 'bfloat16', 'causal', small)]
  if smoke and not every:  # the same code paths, fewer of them: interpret mode is slow
    keep = {('pallas_gpu', 'float32', 'packed'), ('pallas_gpu', 'bfloat16', 'shuffled'),
            ('cudnn', 'bfloat16', 'causal'), ('cudnn', 'bfloat16', 'zigzag'),
            ('ring_pallas', 'float32', 'zigzag')}
    checks = [c for c in checks if c[:3] in keep]
  return checks


def _run_check(fn, impl, dtype_name, layout, shape, seed):
  import jax
  import jax.numpy as jnp
  import numpy as np

  B, T, S, N, K, H = shape
  dtype = jnp.dtype(dtype_name)
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in ((B, T, N, H), (B, S, K, H),
                                                               (B, S, K, H)))
  dout = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  q_pos, k_pos, q_seg, k_seg, window = _layout(layout, B, T, S)
  run = lambda f: jax.jit(lambda q, k, v: jax.vjp(
      lambda q, k, v: f(q, k, v).astype(jnp.float32), q, k, v)[1](dout) + (f(q, k, v),))
  under_test = lambda q, k, v: fn(q, k, v, q_pos, k_pos, window, q_seg, k_seg)
  reference = lambda q, k, v: _reference(q, k, v, q_pos, k_pos, window, q_seg, k_seg)
  start = time.perf_counter()
  got = jax.block_until_ready(run(under_test)(q, k, v))
  seconds = time.perf_counter() - start
  f32 = lambda x: x.astype(jnp.float32)
  want = run(reference)(f32(q), f32(k), f32(v))
  row = dict(impl=impl, dtype=dtype_name, layout=layout, shape=list(shape), window=window,
             segments=q_seg is not None, seconds=round(seconds, 2), passed=True)
  for name, g, w in zip(('dq', 'dk', 'dv', 'out'), got, want):
    g, w = np.asarray(f32(g)), np.asarray(w)
    tol = F32_ATOL if dtype == jnp.float32 else BF16_RTOL * max(1.0, float(np.abs(w).max()))
    err = float(np.abs(g - w).max()) if np.all(np.isfinite(g)) else float('inf')
    row[f'err_{name}'], row[f'tol_{name}'] = err, tol
    row['passed'] &= err <= tol
  if impl == 'cudnn' and jax.default_backend() == 'gpu':
    hlo = jax.jit(under_test).lower(q, k, v).as_text().lower()
    row['cudnn_in_hlo'] = 'cudnn' in hlo
  return row


def _machine(jax) -> dict:
  """The host as docs/benchmarks.md reads it: CPU model, usable cores, platform, versions."""
  cpu = platform.processor()
  try:
    cpu = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
               if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return dict(cpu=cpu, usable_cores=len(os.sched_getaffinity(0)), platform=platform.platform(),
              versions=dict(jax=jax.__version__))


def _table(rows) -> str:
  lines = [f"{'impl':14s} {'dtype':9s} {'layout':9s} {'out':>9s} {'dq':>9s} {'dk':>9s} "
           f"{'dv':>9s} {'s':>6s}  result"]
  for r in rows:
    if 'error' in r:
      lines.append(f"{r['impl']:14s} {r['dtype']:9s} {r['layout']:9s} FAIL  {r['error'][:60]}")
      continue
    errs = ' '.join(f"{r['err_' + n]:9.2e}" for n in ('out', 'dq', 'dk', 'dv'))
    note = '' if 'cudnn_in_hlo' not in r else (' cuDNN' if r['cudnn_in_hlo'] else ' fallback')
    lines.append(f"{r['impl']:14s} {r['dtype']:9s} {r['layout']:9s} {errs} {r['seconds']:6.1f}  "
                 f"{'pass' if r['passed'] else 'FAIL'}{note}")
  return '\n'.join(lines)


def main(argv=None) -> int:
  args = _parse(argv)
  # The watchdog ends the process (exit=True): disarmed on every way out, so a caller that
  # imports main (the tests) is not killed minutes later.
  faulthandler.dump_traceback_later(args.timeout or (900 if args.cpu_smoke else 150), exit=True)
  try:
    return _checks_main(args)
  finally:
    faulthandler.cancel_dump_traceback_later()


def _checks_main(args) -> int:
  start = time.perf_counter()
  import jax
  from longrope_jax import attention_select

  backend = jax.default_backend()
  if backend != 'gpu' and not args.cpu_smoke:
    print(f"gpu_check: the default backend is {backend!r}, not 'gpu' (use --cpu-smoke here).",
          file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = dict(command=[sys.executable, *sys.argv],
                date=time.strftime('%Y-%m-%dT%H:%M:%S%z'), machine=_machine(jax),
                load_average_start=os.getloadavg(),
                device=str(jax.devices()[0].device_kind), backend=backend,
                jax=jax.__version__, python=platform.python_version(), cpu_smoke=args.cpu_smoke,
                auto={d: attention_select.resolve_attention('auto', backend=backend, dtype=d,
                                                            length=4096)
                      for d in ('float32', 'bfloat16')}, rows=[])
  impls = _implementations(args.cpu_smoke)
  for seed, (impl, dtype, layout, shape) in enumerate(_checks(args.cpu_smoke, args.all)):
    try:
      row = _run_check(impls[impl], impl, dtype, layout, shape, seed)
    except Exception as e:  # a failed check is reported, the others still run
      traceback.print_exc()
      row = dict(impl=impl, dtype=dtype, layout=layout, shape=list(shape), passed=False,
                 error=f'{type(e).__name__}: {e}')
    result['rows'].append(row)
    print(_table([row]).splitlines()[-1], flush=True)
    result['seconds'] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(result, indent=1, default=str))
  failed = [r for r in result['rows'] if not r['passed']]
  result['passed'] = not failed
  result['load_average_end'] = os.getloadavg()
  out.write_text(json.dumps(result, indent=1, default=str))
  print(f"\n{result['device']} ({backend}), jax {jax.__version__}, {result['seconds']} s; auto: "
        + ', '.join(f'{d} -> {impl}' for d, (impl, _) in result['auto'].items()))
  print(_table(result['rows']))
  print(f"\n{len(result['rows']) - len(failed)} passed, {len(failed)} failed; JSON: {out}")
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
