"""Writes the generated docs from the committed artifacts (longrope_jax/docs.py):
docs/results.md from docs/<run>/results.json and report.md, docs/benchmarks.md from
bench/results/*.json.

  python -m experiments.docs            # rewrites the pages that changed
  python -m experiments.docs --check    # exits 1 and lists the stale pages, writes nothing
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from longrope_jax import docs

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true',
                      help='list the pages that differ from what the generator writes and exit 1 '
                      'if any does; write nothing')
  parser.add_argument('--root', default=str(REPO), help='the repository (default: this one)')
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  if args.check:
    stale = docs.stale(root)
    for name in stale:
      print(f'stale: {name}')
    if stale:
      print('run `python -m experiments.docs` and commit the result', file=sys.stderr)
    return 1 if stale else 0
  for name in docs.write(root):
    print(f'wrote {name}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
