"""The run report: results dicts (results.json) in, markdown out. Nothing here computes a result.

`markdown_table` renders a perplexity or passkey table, `search_summary` a search record,
`progressive_summary` the two checks of progressive extension, and `render` the whole report.md.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping


def markdown_table(results: Mapping, metric: str = 'perplexity', digits: int = 3,
                   best: Callable = min, strict: bool = False) -> str:
  """One row per method, one column per length (as a multiple of the original window); the
  best value of each column (`best` = min or max) in bold, compared as printed (`digits`).

  Nothing is bold in a column where every printed value is the same (all 0.00, or all methods
  equal at L0) or where fewer than two methods were measured; with `strict`, only a single best
  is bold (a tie at the top bolds none).
  """
  lengths, L0 = results['lengths'], results['original_length']
  methods = results['methods']
  header = '| method | ' + ' | '.join(f'{L} ({L / L0:g}x)' for L in lengths) + ' |'
  rows = [header, '|' + '---|' * (len(lengths) + 1)]
  bold = []  # per column, the printed value to bold, or None
  for j in range(len(lengths)):
    shown = [round(v[metric][j], digits) for v in methods.values() if v[metric][j] is not None]
    top = best(shown) if len(set(shown)) > 1 else None
    bold.append(None if top is None or (strict and shown.count(top) > 1) else top)
  for name, values in methods.items():
    cells = []
    for j, v in enumerate(values[metric]):
      if v is None:
        cells.append('-')
      else:
        text = f'{v:.{digits}f}'
        cells.append(f'**{text}**' if bold[j] is not None and round(v, digits) == bold[j]
                     else text)
    rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def search_summary(record: Mapping, directory: str = 'search') -> str:
  """Validation fitness of the seeds and of the best candidate."""
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


def progressive_summary(base: Mapping, prog: Mapping) -> list[str]:
  """The two checks of progressive extension, in words: at the longest length, the fine-tuned
  model against every method without fine-tuning; at L0, the short factors against the base."""
  lengths, L0 = base['lengths'], base['original_length']
  ppl = lambda results, name, j: results['methods'][name]['perplexity'][j]  # noqa: E731
  lines = []
  j = len(lengths) - 1
  others = {m: ppl(base, m, j) for m in base['methods'] if ppl(base, m, j) is not None}
  ours = ppl(prog, 'longrope_progressive', j)
  if others and ours is not None:
    best = min(others, key=others.get)
    lines.append(f"- At {lengths[j]} tokens ({lengths[j] / L0:g}x): progressive {ours:.3f} vs "
                 f"the best method without fine-tuning, {best}, {others[best]:.3f} "
                 f"({'below' if ours < others[best] else 'NOT below'} every method).")
  if L0 in lengths and 'none' in base['methods']:
    j = lengths.index(L0)
    ref, short = ppl(base, 'none', j), ppl(prog, 'longrope_progressive', j)
    no_short = ppl(prog, 'longrope_progressive_no_short', j)
    if None not in (ref, short, no_short):
      lines.append(f"- At L0 = {L0}: the base model {ref:.3f}; the fine-tuned model with the "
                   f"short factors {short:.3f} ({100 * (short / ref - 1):+.1f}%), with the long "
                   f"factors {no_short:.3f} ({100 * (no_short / ref - 1):+.1f}%).")
  return lines + [''] if lines else []


def render(results: Mapping, *, model: str) -> str:
  """report.md from results.json; `model` is the opening line describing model and corpus."""
  lines = ['# longrope-jax run report', '', model, '']
  if 'machine' in results:
    from longrope_jax import console
    lines += [f"Measured on: {console.describe_machine(results['machine'])}.", '']
  if 'pretrain' in results:
    p = results['pretrain']
    lines += ['## Pretraining', '',
              f"{p['steps']} steps, {p['tokens']:,} tokens, {p['seconds'] / 60:.1f} min; "
              f"validation bits per token at L0: **{p.get('val_bits_per_token', float('nan')):.3f}**.",
              '', '![pretraining](plots/pretrain.png)', '']
  if 'perplexity' in results:
    r = results['perplexity']
    lines += ['## Perplexity vs length (held-out)', '',
              f"Per-token perplexity on the first L tokens of {r['num_windows']} "
              f"`{r['split']}` documents per length; best per column in bold.", '',
              markdown_table(r), '', '![perplexity](plots/perplexity.png)', '']
  if 'passkey' in results:
    r = results['passkey']
    lines += ['## Passkey retrieval', '',
              f"Accuracy over {r['trials']} keys at each of {len(r['depths'])} depths "
              f"({', '.join(f'{d:g}' for d in r['depths'])}) per length; greedy decoding with the "
              "KV cache; best per column in bold.", '',
              markdown_table(r, metric='mean', digits=2, best=max, strict=True), '',
              '![passkey](plots/passkey.png)', '']
    if r.get('answer_nll', {}).get('nll'):
      a = r['answer_nll']
      lines += [f"Teacher-forced NLL of the answer's digits at {a['length']} tokens without "
                f"scaling: {', '.join(f'{x:.2f}' for x in a['nll'])} nats (ln 10 = "
                f"{math.log(10):.2f} is a guess among digits; a model that copies the key goes "
                "toward 0).", '']
  if 'progressive_perplexity' in results and 'perplexity' in results:
    base, prog = results['perplexity'], results['progressive_perplexity']
    if base['lengths'] == prog['lengths']:
      merged = dict(base, methods={**base['methods'], **prog['methods']})
      p = results['progressive']
      lines += ['## Progressive extension', '',
                f"Fine-tuned {p['finetune_steps']} steps at {p['finetune_length']} tokens with the "
                f"searched factors, searched again for {p['target_length']} tokens (final factors "
                "= product of both stages'), short factors readjusted for L0. "
                "`longrope_progressive` uses the short factors up to L0 and the long ones beyond; "
                "the other rows are the base model without fine-tuning.", '',
                markdown_table(merged), '']
      lines += progressive_summary(base, prog)
  if 'search' in results:
    lines += [f"## LongRoPE search ({results['search']['split']} split)", '',
              search_summary(results['search']), '']
  return '\n'.join(lines)
