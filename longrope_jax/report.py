"""The run report: results dicts (results.json) in, markdown out. Nothing here runs a model.

`markdown_table` renders a perplexity or passkey table, `paired_bootstrap` / `comparison_table`
the paired confidence intervals over documents, `search_summary` a search record,
`progressive_summary` the two checks of progressive extension, and `render` the whole report.md.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import numpy as np

from longrope_jax import console

RESAMPLES = 2000
# The row of LongRoPE searched at each length of search.multiples (one search: 'longrope').
PER_LENGTH = 'longrope (searched per length)'
SEARCHED_ROWS = (PER_LENGTH, 'longrope')


def searched_row(results: Mapping) -> str | None:
  """The searched factors' row of a table (PER_LENGTH or 'longrope'), or None."""
  return next((m for m in SEARCHED_ROWS if m in results['methods']), None)


def per_length_note(per_length: Mapping) -> str:
  """What the per-length row is, from results.json's 'search_per_length' ({L': record})."""
  lengths = sorted(int(L) for L in per_length)
  return (f"`{PER_LENGTH}`: LongRoPE searched at each of {', '.join(map(str, lengths))} tokens on "
          "the same base model, every length evaluated with the factors searched for it "
          "(LongRoPE's Table 1); a length without its own search uses those of the shortest "
          "searched length above it, and beyond the longest, the longest's.")


def paired_bootstrap(a_N, b_N, *, resamples: int = RESAMPLES, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
  """Mean of a - b over N paired documents and its `level` percentile bootstrap interval
  (documents resampled with replacement, the same draw for a and b): (mean, low, high)."""
  a_N, b_N = np.asarray(a_N, np.float64), np.asarray(b_N, np.float64)
  if a_N.ndim != 1 or a_N.shape != b_N.shape or a_N.size == 0:
    raise ValueError(f"paired_bootstrap needs two equal-length 1-D samples (the same documents), "
                     f"got shapes {a_N.shape} and {b_N.shape}.")
  d_N = a_N - b_N
  idx_RN = np.random.default_rng(seed).integers(0, d_N.size, size=(resamples, d_N.size))
  low, high = np.quantile(d_N[idx_RN].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
  return float(d_N.mean()), float(low), float(high)


def _per_document(results: Mapping, name: str, j: int):
  values = results['methods'][name].get('nll_per_document')
  return None if values is None else values[j]


def _resolved_best(results: Mapping, metric: str, j: int, best: Callable,
                   digits: int) -> str | None:
  """The best of two or more methods in column j, if it is not tied with the runner-up as
  printed (`digits`) and, with per-document values, its paired interval against the runner-up
  excludes zero."""
  column = {m: v[metric][j] for m, v in results['methods'].items() if v[metric][j] is not None}
  if not column:
    return None
  ranked = sorted(column, key=column.get, reverse=best is max)
  if len(ranked) == 1:  # nothing to be best against
    return None
  if round(column[ranked[0]], digits) == round(column[ranked[1]], digits):
    return None  # a tie (as printed) is nobody's best
  first, second = (_per_document(results, m, j) for m in ranked[:2])
  if first is None or second is None:  # no per-document values (passkey): plain best
    return ranked[0]
  _, low, high = paired_bootstrap(first, second)
  return ranked[0] if low > 0 or high < 0 else None


def markdown_table(results: Mapping, metric: str = 'perplexity', digits: int = 3,
                   best: Callable = min) -> str:
  """One row per method, one column per length (as a multiple of the original window); the
  best value of each column (`best` = min or max) in bold where it is resolved: with
  per-document NLLs, where its 95% paired bootstrap interval against the runner-up excludes 0."""
  lengths, L0 = results['lengths'], results['original_length']
  header = '| method | ' + ' | '.join(f'{L} ({L / L0:g}x)' for L in lengths) + ' |'
  rows = [header, '|' + '---|' * (len(lengths) + 1)]
  top = [_resolved_best(results, metric, j, best, digits) for j in range(len(lengths))]
  for name, values in results['methods'].items():
    cells = []
    for j, v in enumerate(values[metric]):
      if v is None:
        cells.append('-')
      else:
        text = f'{v:.{digits}f}'
        cells.append(f'**{text}**' if top[j] == name else text)
    rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def paired_comparison(results: Mapping, ours: str, *, others: Iterable[str] | None = None,
                      against: Mapping | None = None) -> list[dict]:
  """At each length where `ours` has a value: the best of `others` (default: every other
  method; from `against` when given, results on the same documents) by perplexity, and the
  mean per-document NLL difference ours - best with its 95% paired bootstrap interval."""
  against = results if against is None else against
  rows = []
  for j, L in enumerate(results['lengths']):
    mine = _per_document(results, ours, j)
    if mine is None or L not in against['lengths']:
      continue
    k = against['lengths'].index(L)
    names = [m for m in (against['methods'] if others is None else others)
             if m != ours and m in against['methods'] and _per_document(against, m, k) is not None]
    if not names:
      continue
    rival = min(names, key=lambda m: against['methods'][m]['nll'][k])
    diff, low, high = paired_bootstrap(mine, _per_document(against, rival, k))
    rows.append(dict(length=L, multiple=L / results['original_length'], ours=ours,
                     perplexity=results['methods'][ours]['perplexity'][j], rival=rival,
                     rival_perplexity=against['methods'][rival]['perplexity'][k], diff=diff,
                     low=low, high=high, documents=len(mine)))
  return rows


def _verdict(row: Mapping) -> str:
  return 'lower' if row['high'] < 0 else 'higher' if row['low'] > 0 else 'not resolved'


def comparison_table(rows: list[dict]) -> str:
  """`paired_comparison` rows as markdown: difference in nats per token, and as a perplexity
  ratio exp(diff) - 1 in percent, each with its 95% interval."""
  lines = ['| length | ours | perplexity | best other | perplexity | ΔNLL nats/token [95% CI] | '
           'Δperplexity [95% CI] | ours is |', '|---|---|---|---|---|---|---|---|']
  pct = lambda x: f'{100 * math.expm1(x):+.1f}%'  # noqa: E731
  for r in rows:
    lines.append(f"| {r['length']} ({r['multiple']:g}x) | {r['ours']} | {r['perplexity']:.3f} | "
                 f"{r['rival']} | {r['rival_perplexity']:.3f} | {r['diff']:+.4f} "
                 f"[{r['low']:+.4f}, {r['high']:+.4f}] | {pct(r['diff'])} "
                 f"[{pct(r['low'])}, {pct(r['high'])}] | {_verdict(r)} |")
  return '\n'.join(lines)


def _protocol(r: Mapping) -> str:
  """How a perplexity table was measured, in words."""
  n, q = r['num_windows'], r.get('num_qualified')
  docs = (f"the same {n} `{r['split']}` documents at every length (drawn from the {q} at least "
          f"{r['document_length']} tokens long)" if q is not None else
          f"{n} `{r['split']}` documents per length")
  if r.get('stride'):
    return (f"Per-token perplexity of the first {r['document_length']} tokens of {docs}, "
            f"predicted by windows of L tokens sliding by {r['stride']}")
  return f"Per-token perplexity on the first L tokens of {docs}"


BOLD_RULE = ('best per column in bold where its 95% paired bootstrap interval over documents '
             f'({RESAMPLES} resamples) against the runner-up excludes zero')


def _row_note(results: Mapping, table: Mapping) -> str:
  """' ' + what the per-length row is, where `table` has it; else ''."""
  if PER_LENGTH not in table['methods'] or 'search_per_length' not in results:
    return ''
  return ' ' + per_length_note(results['search_per_length'])


def _caption(r: Mapping) -> str:
  """The protocol and the bold rule, with a warning where too few documents make the percentile
  bootstrap's interval too narrow to trust."""
  few = (f" (only {r['num_windows']} documents: intervals this small-sample are optimistic)"
         if r['num_windows'] < 10 else '')
  return f'{_protocol(r)}; {BOLD_RULE}{few}.'


def per_length_summary(per_length: Mapping) -> str:
  """Each searched length's validation fitness, against its best seed, and its search time."""
  lines = ['| target | n_hat | attention scale | best seed | its perplexity | searched perplexity '
           '| candidates | search time |', '|---|---|---|---|---|---|---|---|']
  for L, r in sorted(per_length.items(), key=lambda item: int(item[0])):
    seeds = {name: s['perplexity'] for name, s in r.get('seeds', {}).items()}
    best = min(seeds, key=seeds.get) if seeds else None
    seconds = r.get('seconds')
    lines.append(
        f"| {L} ({r['scale']:g}x) | {r['n_hat']} | {r['attn_scale']:.4f} | "
        f"{best or '-'} | {f'{seeds[best]:.4f}' if best else '-'} | **{r['perplexity']:.4f}** | "
        f"{r['evaluations']} | {console.format_seconds(seconds) if seconds else '-'} |")
  return '\n'.join(lines)


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


def progressive_summary(base: Mapping, prog: Mapping, prog_record: Mapping | None = None
                        ) -> list[str]:
  """The two checks of progressive extension, in words: at the longest length, the fine-tuned
  model against every method without fine-tuning; at L0, the short factors against the base
  (and, from the stage's record `prog_record`, which short factors were kept)."""
  prog_record = prog_record or {}
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
  source, at_l0 = prog_record.get('short_source'), prog_record.get('short_nll_at_l0')
  if source and at_l0:
    lines.append(f"- Short factors up to L0: the {source} ones (fitness NLL at L0: searched "
                 f"{at_l0['searched']:.4f}, long {at_l0['long']:.4f}; the readjustment keeps "
                 f"the searched ones only where they do better).")
  return lines + [''] if lines else []


def seeds_summary(seeds: Mapping, held_out: Mapping) -> list[str]:
  """The search repeated with several seeds: each seed's validation fitness and held-out
  perplexity at the search length, its paired interval against the best method, and the
  spread over seeds."""
  L, L0 = seeds['target_length'], held_out['original_length']
  names = list(seeds['searches'])
  methods = [m for m in held_out['methods'] if m not in names]
  lines = ['| seed | n_hat | fitness perplexity (its own documents) | held-out perplexity | '
           'best method | ΔNLL vs it [95% CI] | seed is |', '|---|---|---|---|---|---|---|']
  ppl, diffs = [], []
  for name in names:
    record = seeds['searches'][name]
    (row,) = [r for r in paired_comparison(held_out, name, others=methods) if r['length'] == L]
    ppl.append(row['perplexity'])
    diffs.append(row['diff'])
    lines.append(f"| {name} | {record['n_hat']} | {record['perplexity']:.4f} | "
                 f"{row['perplexity']:.3f} | {row['rival']} {row['rival_perplexity']:.3f} | "
                 f"{row['diff']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}] | "
                 f"{_verdict(row)} |")
  ppl, diffs = np.asarray(ppl), np.asarray(diffs)
  spread = lambda x, d: (f'{x.mean():.{d}f} ± {x.std(ddof=1):.{d}f} (sd over seeds; '  # noqa
                         f'range {x.min():.{d}f} to {x.max():.{d}f})')
  docs = ('disjoint' if seeds['disjoint'] else
          'drawn independently: the split is too small for disjoint sets')
  return [f"{len(names)} searches at {L} tokens ({L / L0:g}x), each on its own "
          f"{seeds['num_windows']} `{seeds['split']}` fitness documents ({docs}). Held-out "
          f"columns: {_protocol(held_out)}.", '', *lines, '',
          f"Held-out perplexity over seeds: {spread(ppl, 3)}; ΔNLL against the best method: "
          f"{spread(diffs, 4)} nats/token.", '']


def finetuned_summary(r: Mapping) -> list[str]:
  """The fine-tuned comparison table and LongRoPE's rows against the best fine-tuned baseline."""
  ours = [m for m in r['methods'] if m.startswith('longrope')]
  baselines = [m for m in r['methods'] if m not in ours]
  lines = [f"Copies of the base model fine-tuned {r['finetune_steps']} steps at "
           f"{r['finetune_length']} tokens with each method (same budget, same batches), each "
           "evaluated with its own scaling: the fine-tuned one up to the fine-tuning length, the "
           "method re-derived for longer ones (LongRoPE keeps its searched factors; "
           "`longrope_progressive` is the progressive stage's model and factors). " + _caption(r),
           '', markdown_table(r), '']
  for name in ours:
    rows = paired_comparison(r, name, others=baselines)
    if rows:
      lines += [f'`{name}` against the best fine-tuned baseline:', '', comparison_table(rows),
                '']
  return lines


ABLATION_REFERENCE = 'per-dim + n_hat (searched)'


def ablations_summary(r: Mapping) -> list[str]:
  """LongRoPE Table 11's shape: each variant's held-out perplexity, and the full search against
  each other variant with its paired interval."""
  lines = ['On the base model, factors for the search length. ' + _caption(r), '',
           markdown_table(r), '']
  fitness = r.get('validation_perplexity', {})
  if fitness:
    lines += ['Validation (fitness) perplexity: ' + '; '.join(
        f'{name} {v:.4f}' for name, v in fitness.items()) + '.', '']
  rows = [row for other in r['methods'] if other != ABLATION_REFERENCE
          for row in paired_comparison(r, ABLATION_REFERENCE, others=[other])]
  if rows:
    lines += [f'`{ABLATION_REFERENCE}` against each variant:', '', comparison_table(rows), '']
  return lines


def merged_passkey(base: dict, extra: dict) -> dict:
  """Passkey results of the base model and `extra` rows on the union of their lengths (None
  where a row has no cell)."""
  lengths = sorted(set(base['lengths']) | set(extra['lengths']))
  methods = {}
  for source in (base, extra):
    for name, row in source['methods'].items():
      at = dict(zip(source['lengths'], zip(row['accuracy'], row['mean'])))
      methods[name] = dict(accuracy=[at.get(L, (None, None))[0] for L in lengths],
                           mean=[at.get(L, (None, None))[1] for L in lengths])
  return dict(base, lengths=lengths, methods=methods)


def attention_line(attention: Mapping[str, Mapping]) -> str:
  """'Attention: flash_cpu (model, search).' from results.json's 'attention' ({part: {requested,
  ran, reason}}); a fallback reads 'flash_cpu requested, blockwise ran (reason)'."""
  parts: dict[str, list[str]] = {}
  for name, used in attention.items():
    what = (used['ran'] if used['ran'] == used['requested'] else
            f"{used['requested']} requested, {used['ran']} ran ({used.get('reason')})")
    parts.setdefault(what, []).append(name.replace('_', ' '))
  return 'Attention: ' + '; '.join(f"{what} ({', '.join(names)})"
                                   for what, names in parts.items()) + '.'


def render(results: Mapping, *, model: str) -> str:
  """report.md from results.json; `model` is the opening line describing model and corpus."""
  lines = ['# longrope-jax run report', '', model, '']
  if 'machine' in results:
    lines += [f"Measured on: {console.describe_machine(results['machine'])}.", '']
  if 'attention' in results:
    lines += [attention_line(results['attention']), '']
  if 'pretrain' in results:
    p = results['pretrain']
    lines += ['## Pretraining', '',
              f"{p['steps']} steps, {p['tokens']:,} tokens, {p['seconds'] / 60:.1f} min; "
              f"validation bits per token at L0: **{p.get('val_bits_per_token', float('nan')):.3f}**.",
              '', '![pretraining](plots/pretrain.png)', '']
  if 'perplexity' in results:
    r = results['perplexity']
    lines += ['## Perplexity vs length (held-out)', '', _caption(r) + _row_note(results, r), '',
              markdown_table(r), '', '![perplexity](plots/perplexity.png)', '']
    ours = searched_row(r)
    rows = paired_comparison(r, ours) if ours else []
    if rows:
      lines += ['LongRoPE against the best other method at each length (difference of mean '
                'per-document NLL; negative: LongRoPE lower):', '', comparison_table(rows), '']
  if 'perplexity_sliding' in results:
    r = results['perplexity_sliding']
    lines += ['## Perplexity vs length, sliding windows', '', _caption(r) + _row_note(results, r),
              '', markdown_table(r), '']
    ours = searched_row(r)
    rows = paired_comparison(r, ours) if ours else []
    if rows:
      lines += [comparison_table(rows), '']
  if 'seeds' in results and 'seeds_perplexity' in results:
    lines += ['## Search seeds', ''] + seeds_summary(results['seeds'],
                                                      results['seeds_perplexity'])
  if 'ablations' in results:
    lines += ['## Ablations (LongRoPE Table 11)', ''] + ablations_summary(results['ablations'])
  if results.get('passkey', {}).get('skipped'):
    a = results['passkey']['answer_nll']
    lines += ['## Passkey retrieval', '',
              f"Skipped: the base model does not copy the key. The teacher-forced NLL of the "
              f"answer at {a['length']} tokens without scaling is {a['total']:.2f} nats "
              f"({', '.join(f'{x:.2f}' for x in a['nll'])} per token) against {a['guess']:.2f} "
              "for a guess among digits, so every accuracy would be 0. Retrieval needs a model "
              "that copies (induction heads): on the embedded corpus, `configs/demo.py:retrieval` "
              "trains one (the README's passkey section).", '']
  elif 'passkey' in results:
    r = results['passkey']
    lines += ['## Passkey retrieval', '',
              f"Accuracy over {r['trials']} keys at each of {len(r['depths'])} depths "
              f"({', '.join(f'{d:g}' for d in r['depths'])}) per length; greedy decoding with the "
              "KV cache; best per column in bold." + _row_note(results, r), '',
              markdown_table(r, metric='mean', digits=2, best=max), '',
              '![passkey](plots/passkey.png)', '']
    if r.get('answer_nll', {}).get('nll'):
      a = r['answer_nll']
      lines += [f"Teacher-forced NLL of the answer's digits at {a['length']} tokens without "
                f"scaling: {', '.join(f'{x:.2f}' for x in a['nll'])} nats (ln 10 = "
                f"{math.log(10):.2f} is a guess among digits; a model that copies the key goes "
                "toward 0).", '']
  prog_key = results.get('progressive_passkey', {})
  if 'passkey' in results and prog_key and not prog_key.get('skipped'):
    p = results.get('progressive', {})
    merged = merged_passkey(results['passkey'], prog_key)
    lines += ['## Passkey retrieval after progressive extension', '',
              f"`longrope_progressive`: the model fine-tuned {p.get('finetune_steps', '?')} steps "
              f"at {p.get('finetune_length', '?')} tokens (passkey rows in its data as set by "
              "progressive.finetune.passkey_fraction), with the progressive factors (short up to "
              "L0, long beyond); "
              "the other rows are the base model without fine-tuning, on the same prompts. "
              "Best per column in bold.", '',
              markdown_table(merged, metric='mean', digits=2, best=max), '',
              '![progressive passkey](plots/progressive_passkey.png)', '']
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
      lines += progressive_summary(base, prog, p)
      rows = paired_comparison(prog, 'longrope_progressive', others=list(base['methods']),
                               against=base)
      same_documents = all(prog.get(k) == base.get(k) for k in ('document_length', 'stride'))
      if rows and prog.get('num_qualified') is not None and same_documents:
        lines += ['`longrope_progressive` against the best method without fine-tuning:', '',
                  comparison_table(rows), '']
  if 'finetuned' in results:
    lines += ['## Fine-tuned baselines', ''] + finetuned_summary(results['finetuned'])
  if 'search' in results:
    lines += [f"## LongRoPE search ({results['search']['split']} split)", '',
              search_summary(results['search']), '']
  if 'search_per_length' in results:
    per_length = results['search_per_length']
    lines += ['Searched at each length, each on its own validation documents truncated to that '
              'length (search times as run, compilation included):', '',
              per_length_summary(per_length), '',
              ' '.join(f'![{L}](search/length_{L}/fitness.png)' for L in sorted(
                  per_length, key=int) if int(L) != results['search']['target_length']), '']
  return '\n'.join(lines)
