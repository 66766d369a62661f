"""A memory and time plan for the paper's shapes, compiled ahead of time with no weights.

  python -m experiments.plan --variants llama2_7b mistral_7b --lengths 32768 131072 \
      --meshes fsdp=8 fsdp=4,seq=2 --devices 8 --peak_tflops 989 --mfu 0.4
  python -m experiments.plan --config configs/llama2_7b.py:progressive --devices 8
  python -m experiments.plan --pod --out bench/results/plan_2048k.json      # the 2048K plan

Simulates `--devices` CPU devices (--xla_force_host_platform_device_count), compiles the
fine-tuning step and the search fitness (one candidate's NLL) for every variant, length and mesh,
and prints a table per mesh: per-device memory from XLA's memory analysis, FLOPs per device, and
the step time at the given accelerator peak and MFU. The numbers are a plan, not a measurement.
XLA:CPU's hoisted f32 copy of the bf16 weights is kept out (plan.CPU_PLAN_XLA_FLAGS).

`--pod` plans the paper's 2048K recipe instead (longrope_jax/pod_plan.py): the 256K fine-tune,
the 2048K search and evaluation and the 128K search on 8-1024 simulated devices, the linear
memory model checked against the compiles, and the mesh each memory class needs; it writes the
JSON (--out) and its markdown beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=4,seq=2' -> {'fsdp': 4, 'seq': 2}."""
  sizes = {}
  for part in text.split(','):
    name, _, value = part.partition('=')
    sizes[name.strip()] = int(value)
  return sizes


def from_config(args: argparse.Namespace) -> None:
  """Sets variants, lengths, meshes and remat from `args.config` ('file.py' or 'file.py:arg')."""
  import importlib.util
  path, _, arg = args.config.partition(':')
  spec = importlib.util.spec_from_file_location('plan_config', path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(pathlib.Path(path).resolve().parents[1]))
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  from longrope_jax import model as model_lib
  from longrope_jax import rope as rope_lib
  L0 = config.model.original_length or model_lib.get_config(config.model.variant).original_length
  multiples = [config.search.multiple]
  if 'progressive' in config.stages:
    multiples.append(config.progressive.multiple)
  args.variants = [config.model.variant]
  args.lengths = [rope_lib.Extension.by_multiple(L0, m).target_length for m in multiples]
  args.meshes = [','.join(f'{k}={config.mesh[k]}' for k in ('data', 'fsdp', 'seq'))]
  args.remat = config.model.remat


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=None,
                      help='a config file (configs/llama2_7b.py:progressive): its model variant, '
                      'lengths (search, and progressive when it runs), mesh and remat replace '
                      '--variants, --lengths, --meshes and --remat')
  parser.add_argument('--variants', nargs='+', default=['llama2_7b', 'mistral_7b'])
  parser.add_argument('--lengths', type=int, nargs='+', default=[32768, 131072])
  parser.add_argument('--meshes', nargs='+', default=['fsdp=8', 'fsdp=4,seq=2'])
  parser.add_argument('--kinds', nargs='+', default=['train', 'fitness'])
  parser.add_argument('--batch', type=int, default=None,
                      help='sequences per step (default: mesh.data x mesh.fsdp, one each)')
  parser.add_argument('--devices', type=int, default=None,
                      help='simulated CPU devices (default 8; 1024 with --pod)')
  parser.add_argument('--remat', default='full')
  parser.add_argument('--block', type=int, default=2048, help='attention block_q = block_k')
  parser.add_argument('--peak_tflops', type=float, default=989.0, help='H100 bf16 dense: 989')
  parser.add_argument('--mfu', type=float, default=0.4)
  parser.add_argument('--out', default=None, help='also write the plans as JSON here')
  parser.add_argument('--pod', action='store_true',
                      help="plan the 2048K recipe on pod meshes (default --devices 1024)")
  args = parser.parse_args(argv)
  if args.config:
    from_config(args)
  args.devices = args.devices or (1024 if args.pod else 8)
  from longrope_jax import plan as plan_lib  # imports jax without touching a device
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices} '
                             f'{plan_lib.CPU_PLAN_XLA_FLAGS}')
  import jax
  jax.config.update('jax_platforms', 'cpu')
  if args.pod:
    return pod(args)
  from longrope_jax import mesh as mesh_lib
  from longrope_jax import model as model_lib

  results = []
  for mesh_text in args.meshes:
    sizes = parse_mesh(mesh_text)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**sizes))
    batch = args.batch or mesh.shape['data'] * mesh.shape['fsdp']
    plans = []
    for variant in args.variants:
      attention = 'ring' if mesh.shape['seq'] > 1 else 'blockwise'
      config = model_lib.get_config(variant, attention=attention, remat=args.remat,
                                    block_q=args.block, block_k=args.block)
      for length in args.lengths:
        for kind in args.kinds:
          p = plan_lib.plan_step(kind, config, mesh, batch, length)
          print(f'{variant} {kind} {length} {mesh_text}: peak {p.peak_bytes / 2**30:.2f} GiB, '
                f'compiled in {p.compile_s:.0f} s', file=sys.stderr, flush=True)
          plans.append((variant, p))
          results.append(dict(variant=variant, **{k: v for k, v in vars(p).items()},
                              peak_bytes=p.peak_bytes,
                              step_s=p.step_seconds(args.peak_tflops * 1e12, args.mfu)))
    print(f'\n### Plan on mesh {mesh_text} ({mesh.devices.size} devices), remat {args.remat}, '
          f'{args.peak_tflops:g} TFLOP/s at MFU {args.mfu:g}\n')
    for variant in args.variants:
      print(f'{variant}:\n')
      print(plan_lib.table([p for v, p in plans if v == variant], args.peak_tflops * 1e12,
                           args.mfu))
      print()
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))


def pod_markdown(result: dict) -> str:
  """The --pod study's markdown page: a header with the command, then pod_plan.markdown."""
  from longrope_jax import pod_plan
  return (f"# The 2048K plan (XLA:CPU ahead-of-time compiles on up to {result['max_devices']} "
          f"simulated devices; a plan, not a measurement)\n\n{result['command']}\n\nStep "
          f"times at {result['peak_tflops']:g} TFLOP/s and MFU {result['mfu']:g} "
          f"(recommendations: each memory class's own peak); ring attention, remat "
          f"{result['remat']}, blocks {result['block']}.\n\n" + pod_plan.markdown(result))


def pod(args: argparse.Namespace) -> None:
  """The 2048K plan (pod_plan.study): tables on stdout, JSON at --out and markdown beside it."""
  import platform
  import time
  from longrope_jax import pod_plan
  start = time.time()
  log = lambda line: print(line, file=sys.stderr, flush=True)
  result = pod_plan.study(args.variants, remat=args.remat, block=args.block,
                          max_devices=args.devices, peak_tflops=args.peak_tflops, mfu=args.mfu,
                          log=log)
  command = 'python -m experiments.plan ' + ' '.join(sys.argv[1:])
  result.update(command=command, date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(start)),
                wall_seconds=time.time() - start, machine=platform.platform())
  text = pod_markdown(result)
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + '\n')
    out.with_suffix('.md').write_text(text)


if __name__ == '__main__':
  main()
