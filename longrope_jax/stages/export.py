"""The export stage: the searched factors written as a Hugging Face longrope folder, then run in
transformers on the evaluate stage's own documents and compared with this project's numbers.

At a length L > L0 transformers' perplexity of the export is checked against the evaluate
stage's searched row (the same windows and factors, so the two differ only by the frameworks'
float arithmetic); at L <= L0 against the original model (the evaluate stage's `none` row, equal
to transformers' own within 1e-5): there the difference is what a user of the folder pays within
L0, transformers' one attention factor for short and long factors (`hf.export_longrope`).
"""

from __future__ import annotations

import math
import shutil

import numpy as np

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import evaluate as eval_lib
from longrope_jax import hf
from longrope_jax import report as report_lib
from longrope_jax.hf import compare
from longrope_jax.stages.run import PER_LENGTH_KEY, Run
from longrope_jax.stages.stage import MODEL_FIELDS, Stage

FOLDER = 'hf'


def _windows(run: Run, num: int) -> np.ndarray:
  """The evaluate stage's documents (its protocol: same split, seed and document length),
  the first `num` of them: i32[num, document_length]."""
  e = run.config.evaluate
  spans_ND, _ = eval_lib.eval_documents(run.documents(e.split), max(run.lengths(e.multiples)),
                                        e.num_windows, seed=run.config.seed)
  return spans_ND[:num]


def _reference(run: Run, length: int) -> tuple[str, list[float]]:
  """The evaluate stage's row the export is compared with at `length`, and its per-document
  NLLs: the searched row beyond L0, the original model (`none`) within it."""
  table = run.results()['perplexity']
  name = report_lib.searched_row(table) if length > run.original_length else 'none'
  if name is None or name not in table['methods']:
    raise ValueError(f"the export check at {length} tokens compares with the evaluate stage's "
                     f"{'searched' if length > run.original_length else 'none'} row, which "
                     "results.json lacks: add 'none' to evaluate.methods and run search and "
                     "evaluate first.")
  j = table['lengths'].index(length)
  return name, table['methods'][name]['nll_per_document'][j]


def export(run: Run) -> dict:
  """Writes workdir/hf (`hf.export_longrope` of the search's factors, export.plain_short as
  the CLI's flag), then at each export.multiples length runs export.num_windows of the evaluate
  stage's documents through transformers (cached per length in eval/export.jsonl)."""
  c, results = run.config.export, run.results()
  missing = [k for k in ('search', 'perplexity') if k not in results]
  if missing:
    raise ValueError(f"the export stage needs the {' and '.join(missing)} result(s) in "
                     f"{run.results_path}: put 'search' and 'evaluate' before 'export' in "
                     "stages.")
  if PER_LENGTH_KEY in results:
    print('export: the factors searched at search.multiple are exported (a longrope folder '
          'holds one long_factor); the per-length searches are not.', flush=True)
  folder = run.workdir / FOLDER
  if not (folder / 'config.json').is_file():
    shutil.rmtree(folder, ignore_errors=True)
    hf.export_longrope(run.hf_path, folder, results['search'], plain_short=c.plain_short,
                       sliding_window=hf.parse_sliding_window(run.config.model.sliding_window))
  windows_ND = _windows(run, c.num_windows)
  cache_path = run.workdir / 'eval' / 'export.jsonl'
  done = {r['length']: r for r in ckpt_lib.read_jsonl(cache_path, required=('length',))}
  checks = []
  for L in run.lengths(c.multiples):
    name, jax_nll = _reference(run, L)
    if L not in done:
      print(f'export: transformers at {L} tokens on {c.num_windows} document(s)', flush=True)
      nll = compare.transformers_nll(folder, windows_ND[:, :L], attention=c.attention)
      done[L] = dict(length=L, transformers_nll=nll.tolist())
      ckpt_lib.append_jsonl(cache_path, done[L])
    ours = np.asarray(jax_nll[:c.num_windows], np.float64)
    theirs = np.asarray(done[L]['transformers_nll'], np.float64)
    checks.append(dict(
        length=L, windows=int(c.num_windows), reference=name,
        transformers_nll=theirs.tolist(), reference_nll=ours.tolist(),
        max_abs_nll_difference=float(np.max(np.abs(theirs - ours))),
        relative_perplexity=math.exp(theirs.mean() - ours.mean()) - 1))
  record = dict(folder=FOLDER, plain_short=bool(c.plain_short), attention=c.attention,
                target_length=results['search']['target_length'], checks=checks)
  run.save_result('export', record)
  return record


def summary(record: dict, original_length: int) -> list[str]:
  """The report's lines for an export record."""
  lines = ['## Export to Hugging Face', '',
           f"`workdir/{record['folder']}` (long factors for {record['target_length']} tokens"
           f"{', plain_short' if record['plain_short'] else ''}) run in transformers "
           f"({record['attention']} attention) on the evaluate stage's documents:", '',
           '| length | compared with | transformers NLL | ours | max abs difference | '
           'perplexity vs ours |', '|---|---|---|---|---|---|']
  for r in record['checks']:
    within = 'original model (none)' if r['length'] <= original_length else r['reference']
    lines.append(f"| {r['length']} | {within} | {np.mean(r['transformers_nll']):.5f} | "
                 f"{np.mean(r['reference_nll']):.5f} | {r['max_abs_nll_difference']:.2e} | "
                 f"{100 * r['relative_perplexity']:+.2f}% |")
  lines += ['', f'Beyond L0 = {original_length} the export should equal our searched row up to '
            "float arithmetic; within L0 transformers applies the long factors' attention "
            'factor to plain RoPE too, which is the perplexity cost shown against the original '
            "model (vLLM with plain_short runs the original there).", '']
  return lines


def _header(run: Run) -> dict:
  c = run.config.export
  return {'writes': str(run.workdir / FOLDER),
          'check': f'transformers ({c.attention}) at {run.lengths(c.multiples)} tokens on '
                   f'{c.num_windows} evaluate document(s)'}


EXPORT = Stage(
    'export', export,
    reads=('seed', *MODEL_FIELDS, 'data', 'evaluate.split', 'evaluate.multiples',
           'evaluate.num_windows', 'export'),
    ignore=('export.attention',), cells=('export.multiples',),
    upstream=('search', 'evaluate'), outputs=(FOLDER, 'eval/export.jsonl'),
    results=('export',), splits=('evaluate.split',), header=_header)
