"""The LongRoPE2 section of the run report (results.json in, markdown out): the critical
dimensions found, perplexity and retrieval of every arm, short-context retention at L0, and the
table of the paper's three claims, each held / not held / not resolved from 95% paired intervals.

A claim is a list of conditions, each a paired comparison (two rows on the same documents or
prompts) at the target length or at L0 with the direction the paper claims. A condition holds
when its interval lies wholly on the claimed side, fails when it lies wholly on the other, and is
not resolved otherwise; a claim holds when all its conditions hold and fails when any fails.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from longrope_jax import report as report_lib

HELD, NOT_HELD, NOT_RESOLVED = 'held', 'not held', 'not resolved'
METRICS = {  # name -> (what, the better direction of a - b)
    'retrieval': ('retrieval accuracy (share of values retrieved, every prompt of every needle '
                  'task run)', 'higher'),
    'perplexity': ('per-document NLL (nats/token)', 'lower'),
}


@dataclasses.dataclass(frozen=True)
class Condition:
  """`a` is better than `b` by `metric` at `where` ('target': the fine-tuning length, 'L0'); a
  row name of a tuple is the first the results hold."""

  a: str | tuple[str, ...]
  b: str | tuple[str, ...]
  metric: str
  where: str


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim decided by `conditions`, with `shown` comparisons beside it."""

  text: str
  conditions: tuple[Condition, ...]
  shown: tuple[Condition, ...] = ()


# Ours in claims 1 and 2: LongRoPE2's factors under plain fine-tuning when that arm ran (so the
# two searches compared share their fine-tuning), else LongRoPE2 itself.
_OURS = ('longrope2_plain', 'longrope2')
# The paper's claims (Shang et al., 2025, Tables 6, 10 and 7).
CLAIMS = (
    Claim('(1) the needle-driven objective beats plain perplexity at the target length',
          (Condition(_OURS, 'longrope2_ppl', 'retrieval', 'target'),),
          (Condition(_OURS, 'longrope2_ppl', 'perplexity', 'target'),)),
    Claim('(2) the rcd constraint beats a free search',
          (Condition(_OURS, 'longrope2_free', 'retrieval', 'target'),),
          (Condition(_OURS, 'longrope2_free', 'perplexity', 'target'),)),
    Claim('(3) mixed-window training retains L0 quality where plain fine-tuning loses it',
          (Condition('base', 'longrope2_plain', 'perplexity', 'L0'),
           Condition('longrope2', 'longrope2_plain', 'perplexity', 'L0')),
          (Condition('longrope2', 'longrope2_plain', 'retrieval', 'L0'),)),
)


def verdict(low: float, high: float, better: str) -> str:
  """Whether an interval of a - b shows a better than b ('lower' or 'higher' is better)."""
  if better == 'lower':
    low, high = -high, -low
  return HELD if low > 0 else NOT_HELD if high < 0 else NOT_RESOLVED


def combine(verdicts: list[str]) -> str:
  """A claim from its conditions: held if all hold, not held if any fails."""
  if NOT_HELD in verdicts:
    return NOT_HELD
  return HELD if verdicts and all(v == HELD for v in verdicts) else NOT_RESOLVED


def _row(r: Mapping, name) -> str | None:
  names = (name,) if isinstance(name, str) else name
  return next((n for n in names if n in r['perplexity']['methods']), None)


def _samples(r: Mapping, metric: str, name: str, length: int) -> np.ndarray | None:
  """Per-document NLLs, or every prompt's retrieval score over the tasks run, at `length`."""
  if metric == 'perplexity':
    p = r['perplexity']
    j = p['lengths'].index(length)
    values = p['methods'][name]['nll_per_document'][j]
    return None if values is None else np.asarray(values, np.float64)
  scores = []
  for task in r['retrieval'].values():
    if length not in task['lengths']:
      continue
    j = task['lengths'].index(length)
    cell = task['methods'][name]['scores'][j]
    if cell is None:
      return None
    scores += [s for depth in cell for s in depth]
  return np.asarray(scores, np.float64) if scores else None


def compare(r: Mapping, condition: Condition) -> dict | None:
  """The paired comparison of a condition: {'a', 'b', 'length', 'mean_a', 'mean_b', 'diff',
  'low', 'high', 'verdict', 'n'}; None when a row or value is missing."""
  a, b = _row(r, condition.a), _row(r, condition.b)
  length = r['finetune_length'] if condition.where == 'target' else \
      r['perplexity']['original_length']
  if a is None or b is None or length not in r['perplexity']['lengths']:
    return None
  xa, xb = (_samples(r, condition.metric, n, length) for n in (a, b))
  if xa is None or xb is None:
    return None
  diff, low, high = report_lib.paired_bootstrap(xa, xb)
  return dict(a=a, b=b, length=length, mean_a=float(xa.mean()), mean_b=float(xb.mean()),
              diff=diff, low=low, high=high, n=int(xa.size), metric=condition.metric,
              verdict=verdict(low, high, METRICS[condition.metric][1]))


def _fmt(c: Mapping) -> str:
  if c['metric'] == 'perplexity':
    pct = lambda x: f'{100 * math.expm1(x):+.1f}%'  # noqa: E731
    return (f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] nats "
            f"({pct(c['diff'])} [{pct(c['low'])}, {pct(c['high'])}] perplexity)")
  return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def claims_table(r: Mapping) -> tuple[str, list[str]]:
  """The claims table in markdown and each claim's verdict."""
  lines = ['| claim | condition | at | a | b | a - b [95% CI] | condition is | claim |',
           '|---|---|---|---|---|---|---|---|']
  verdicts = []
  for claim in CLAIMS:
    rows = [compare(r, c) for c in claim.conditions]
    found = combine([c['verdict'] if c else NOT_RESOLVED for c in rows])
    verdicts.append(found)
    shown = list(zip(claim.conditions, rows)) + [(c, compare(r, c)) for c in claim.shown]
    for i, (condition, c) in enumerate(shown):
      head = claim.text if i == 0 else ''
      what = (f"{METRICS[condition.metric][0].split(' (')[0]}, "
              f"{METRICS[condition.metric][1]} is better" +
              (' (shown, not deciding)' if i >= len(claim.conditions) else ''))
      if c is None:
        lines.append(f'| {head} | {what} | {condition.where} | - | - | missing | '
                     f'{NOT_RESOLVED} | {found if i == 0 else ""} |')
        continue
      lines.append(f"| {head} | {what} | {c['length']} | {c['a']} {c['mean_a']:.3f} | "
                   f"{c['b']} {c['mean_b']:.3f} | {_fmt(c)} | {c['verdict']} | "
                   f"{found if i == 0 else ''} |")
  return '\n'.join(lines), verdicts


def retention_table(r: Mapping) -> str:
  """At L0: each row's perplexity and retrieval against the base model's, paired."""
  L0 = r['perplexity']['original_length']
  lines = [f'| row | perplexity at L0 = {L0} | ΔNLL vs base [95% CI] | retrieval at L0 | '
           'Δ vs base [95% CI] |', '|---|---|---|---|---|']
  for name in r['perplexity']['methods']:
    cells = [name]
    for metric in ('perplexity', 'retrieval'):
      c = compare(r, Condition(name, 'base', metric, 'L0'))
      if c is None:
        cells += ['-', '-']
        continue
      value = math.exp(c['mean_a']) if metric == 'perplexity' else c['mean_a']
      cells += [f'{value:.3f}', '' if name == 'base' else _fmt(c)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def critical_dimensions(search: Mapping) -> str:
  """'d_rcd found: longrope2 5, ... against d_tcd 7 (search range from d10_tcd 3)'."""
  found = ', '.join(f"{name} {s['rcd']}" for name, s in search['searches'].items()
                    if s.get('rcd') is not None)
  return (f"Critical dimension (rotary pair index): d_rcd found {found or '-'}, against the "
          f"theoretical d_tcd = {search['d_tcd']} (the search ranges from d10_tcd = "
          f"{search['d10_tcd']} to d_tcd).")


def render(results: Mapping) -> str:
  """The '## LongRoPE2' section of report.md ('' when the run has no longrope2 results)."""
  if 'longrope2' not in results:
    return ''
  r = results['longrope2']
  p = r['perplexity']
  arms = r['arms']
  lines = ['## LongRoPE2', '',
           f"Copies of the base model fine-tuned {r['finetune_steps']} steps at "
           f"{r['finetune_length']} tokens per row, the same rows x tokens for each: "
           + '; '.join(f"`{name}` {a['label']} ({a['finetune']})" for name, a in arms.items())
           + f". Every row uses the short RoPE ({r['short_rope']}) at L <= L0 and its factors "
           "beyond; `base` is the base model without scaling (at L0 only).", '']
  if 'longrope2_search' in results:
    lines += [critical_dimensions(results['longrope2_search']), '']
  lines += ['### Claims of the paper at demo scale', '']
  table, _ = claims_table(r)
  lines += [table, '', 'Retrieval differences are paired over prompts, perplexity ones over '
            f'documents ({report_lib.RESAMPLES} bootstrap resamples).', '']
  lines += ['### Perplexity', '', report_lib._caption(p), '', report_lib.markdown_table(p), '']
  lines += ['### Short-context retention at L0', '', retention_table(r), '']
  for task, t in r['retrieval'].items():
    lines += [f'### Retrieval: {task}', '',
              f"Share of the values retrieved over {t['trials']} prompts at each of "
              f"{len(t['depths'])} depths per length; greedy decoding.", '',
              report_lib.markdown_table(t, metric='mean', digits=2, best=max), '']
    lines += [f'![{task}](plots/longrope2_{task}.png)', '']
  for task, reason in r.get('skipped', {}).items():
    lines += [f'NIAH `{task}` skipped: {reason}.', '']
  return '\n'.join(lines)
