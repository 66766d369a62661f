"""Matplotlib figures for reports (written as PNG, headless backend).

Every series stays visible: series with the very same values are drawn once and labelled as one
('ntk = dynamic_ntk'), the others get their own color, marker and line style; a y axis is
logarithmic only where the values span an order of magnitude; every figure takes a `caption`
(what was measured, on which split and machine: see `measured_caption`).
"""

from __future__ import annotations

import itertools
import pathlib
import textwrap
from typing import Mapping, Sequence

import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from longrope_jax import console  # noqa: E402

MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '<', '>', 'h')
LINESTYLES = ('-', '--', '-.', ':')
CAPTION_FONTSIZE = 8


def measured_caption(*, what: str | None = None, split: str | None = None,
                     documents: int | None = None, machine: Mapping | None = None) -> str:
  """'Perplexity on 4 test documents per length. Measured on: Xeon, 2 cores, cpu, jax 0.10.2.'"""
  parts = []
  if what or split or documents:
    where = ' '.join(str(p) for p in (documents, split, 'documents' if documents or split else None)
                     if p)
    parts.append(' on '.join(p for p in (what, where) if p) + '.')
  if machine:
    parts.append(f'Measured on: {console.describe_machine(machine)}.')
  return ' '.join(parts)


def _save(fig, path, caption: str | None = None) -> pathlib.Path:
  """Lays out the figure with room for `caption` (small grey text under the axes), writes it
  (on process 0 only, in a multi-process run)."""
  path = pathlib.Path(path)
  if jax.process_index() != 0:
    plt.close(fig)
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  width, height = fig.get_size_inches()
  if caption:
    text = textwrap.fill(caption, width=int(width * 17))
    lines = text.count('\n') + 1
    bottom = (0.08 + lines * CAPTION_FONTSIZE * 1.45 / 72) / height
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.text(0.5, 0.04 / height, text, ha='center', va='bottom', fontsize=CAPTION_FONTSIZE,
             color='0.3')
  else:
    fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _as_float(values: Sequence) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in values], dtype=float)


def group_identical(series: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
  """Series with exactly the same values (None = missing) merged under 'a = b', in order."""
  groups: list[tuple[list[str], np.ndarray]] = []
  for name, values in series.items():
    ys = _as_float(values)
    for names, other in groups:
      if other.shape == ys.shape and np.array_equal(other, ys, equal_nan=True):
        names.append(name)
        break
    else:
      groups.append(([name], ys))
  return {' = '.join(names): ys for names, ys in groups}


def _spans_decade(*arrays: np.ndarray) -> bool:
  values = np.concatenate([np.ravel(a) for a in arrays])
  values = values[np.isfinite(values) & (values > 0)]
  return values.size > 0 and values.max() / values.min() >= 10


def _plain_log_ticks(axis) -> None:
  """Log axis ticks written as plain numbers (40, 60, 100) rather than 4 x 10^1."""
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  axis.set_minor_formatter(ticker.FuncFormatter(
      lambda v, _: f'{v:g}' if f'{v:.0e}'[0] in '235' else ''))


def _styles(n: int):
  """(marker, linestyle, markersize, linewidth, zorder) per series: earlier series sit below
  with larger markers and wider lines, so a later series on top of one leaves it visible."""
  for i, (marker, ls) in zip(range(n), zip(itertools.cycle(MARKERS), itertools.cycle(LINESTYLES))):
    yield dict(marker=marker, ls=ls, ms=4 + 3.5 * (n - 1 - i) / max(n - 1, 1),
               lw=1.2 + 1.0 * (n - 1 - i) / max(n - 1, 1), zorder=2 + i)


def perplexity_vs_length(results: dict, path, *, title: str = 'Perplexity vs. context length',
                         metric: str = 'perplexity', caption: str | None = None) -> pathlib.Path:
  """One line per method (identical ones merged and labelled 'a = b'), x = evaluation length
  (log2, ticks at the lengths with their multiple of L0), y = `metric` (log where it spans 10x);
  the original window is marked."""
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  lengths = np.asarray(results['lengths'])
  L0 = results['original_length']
  series = group_identical({n: v[metric] for n, v in results['methods'].items()})
  longrope = [n for n in series if 'longrope' in n]
  others = [n for n in series if n not in longrope]
  for name, style in zip(others + longrope, _styles(len(series))):
    if name in longrope:  # the method under study: thick, solid, on top
      style.update(lw=2.8, ls='-', marker='*', ms=max(style['ms'], 10), zorder=10)
      if len(longrope) == 1:
        style['color'] = 'black'
    ax.plot(lengths, series[name], label=name, **style)
  ax.axvline(L0, color='gray', ls='--', lw=1, label=f'training length L0 = {L0}', zorder=1)
  ax.set_xscale('log', base=2)
  ax.set_xticks(lengths, [f'{L}\n{L / L0:g}x' for L in lengths])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  if _spans_decade(*series.values()):
    ax.set_yscale('log')
    _plain_log_ticks(ax.yaxis)
  ax.set_xlabel('evaluation length (tokens, multiple of L0)')
  ax.set_ylabel(metric.replace('_', ' '))
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path, caption)


def training_curve(records: list[dict], path, *, title: str = 'Pretraining',
                   caption: str | None = None) -> pathlib.Path:
  """Training and validation bits per token against step."""
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [r['step'] for r in records]
  ax.plot(steps, [r['bits_per_token'] for r in records], label='train')
  val = [(r['step'], r['val_bits_per_token']) for r in records if 'val_bits_per_token' in r]
  if val:
    ax.plot(*zip(*val), marker='o', label='validation')
  ax.set_xlabel('step')
  ax.set_ylabel('bits per token')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  return _save(fig, path, caption)


def factor_curves(curves: dict[str, np.ndarray], path, *, title: str = 'Rescale factors',
                  critical_dim: int | None = None, caption: str | None = None) -> pathlib.Path:
  """lambda_i against frequency index i, one line per method (identical ones merged; log y)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  series = group_identical(curves)
  for (name, factors), style in zip(series.items(), _styles(len(series))):
    if name.startswith('longrope'):
      style.update(lw=2.5, zorder=10)
    ax.plot(np.arange(len(factors)), factors, label=name, **dict(style, ms=3))
  if critical_dim is not None:
    ax.axvline(critical_dim, color='gray', ls=':', lw=1, label='critical dimension')
  ax.set_yscale('log', base=2)
  ax.set_xlabel('RoPE frequency index i')
  ax.set_ylabel('rescale factor lambda_i')
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path, caption)


def fitness_curve(histories: list[dict] | Mapping[str, list[dict]], path, *,
                  title: str = 'Search', seeds: Mapping[str, float] | None = None,
                  x: str = 'generation', caption: str | None = None) -> pathlib.Path:
  """Best fitness (perplexity) so far against `x` ('generation' or 'evaluations').

  One history (a list of search.search records): its best and population-mean curves. Several
  ({name: history}): one named best-so-far curve each, each with its own marker and line style,
  earlier ones drawn wider underneath so that coinciding curves stay visible. `seeds` ({name:
  perplexity}) are horizontal lines, named, identical ones merged ('seed ntk = dynamic_ntk');
  a seed far above the curves is listed in the legend with its value but left off the axes.
  """
  fig, ax = plt.subplots(figsize=(9.5, 4.5))
  single = not isinstance(histories, Mapping)
  curves = {'best so far': histories} if single else dict(histories)
  plotted = []
  for (name, history), style in zip(curves.items(), _styles(len(curves))):
    xs = [h[x] for h in history]
    ys = np.array([h['best_perplexity'] for h in history], float)
    plotted.append(ys)
    (line,) = ax.plot(xs, ys, label=name if single else
                      f'{name} ({len(history) - 1} generations)', **style)
    if single and all('mean_perplexity' in h for h in history):
      mean = np.array([h['mean_perplexity'] for h in history], float)
      plotted.append(mean[np.isfinite(mean)])
      ax.plot(xs, mean, color=line.get_color(), alpha=0.55, lw=1, ls='--', marker='.',
              label='population mean', zorder=1)
  curve_values = np.concatenate(plotted) if plotted else np.array([1.0])
  finite = curve_values[np.isfinite(curve_values)]
  lo, hi = (finite.min(), finite.max()) if finite.size else (1.0, 1.0)
  if seeds:
    seed_series = {name: float(v[0]) for name, v in group_identical(
        {n: [v] for n, v in seeds.items()}).items()}
    limit = max(hi, min(seed_series.values()))  # the best seed is always on the axes
    limit += 2 * (limit - lo)  # others while they do not squash the curves
    colors = plt.cm.Greys(np.linspace(0.45, 0.95, len(seed_series)))
    for (name, value), color, ls in zip(sorted(seed_series.items(), key=lambda kv: kv[1]),
                                        colors, itertools.cycle((':', '--', '-.'))):
      style = dict(color=color, ls=ls, lw=1.3, zorder=1)
      if value <= limit:
        ax.axhline(value, label=f'seed {name}: {value:.5g}', **style)
        hi = max(hi, value)
      else:  # listed in the legend with its value, not drawn
        ax.plot([], [], label=f'seed {name}: {value:.5g} (off the axes)', **style)
  pad = 0.08 * (hi - lo) if hi > lo else 0.05 * abs(hi)
  ax.set_ylim(lo - pad, hi + pad)
  if _spans_decade(np.array([lo, hi])):
    ax.set_yscale('log')
    _plain_log_ticks(ax.yaxis)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel('candidates evaluated' if x == 'evaluations' else x)
  ax.set_ylabel('perplexity')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1), borderaxespad=0)
  return _save(fig, path, caption)


def heatmap(matrix: np.ndarray | Mapping[str, np.ndarray], rows: Sequence, cols: Sequence, path,
            *, title: str, xlabel: str, ylabel: str, vmin: float = 0.0, vmax: float = 1.0,
            digits: int = 2, caption: str | None = None) -> pathlib.Path:
  """Annotated heat maps (e.g. passkey accuracy: length x depth) sharing one color scale: one
  matrix, or {panel name: matrix} side by side (identical panels merged under 'a = b'); a NaN
  cell (not measured) is left blank with a dash."""
  panels = {'': np.asarray(matrix, float)} if not isinstance(matrix, Mapping) else {
      name: np.asarray(m, float) for name, m in group_identical(
          {n: np.asarray(m, float).ravel() for n, m in matrix.items()}).items()}
  shape = (len(rows), len(cols))
  ncols = min(3, len(panels))
  nrows = -(-len(panels) // ncols)
  cell_w, cell_h = 0.5, 0.4
  fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout='constrained', figsize=(
      0.6 + ncols * (1.3 + cell_w * len(cols)) + 0.8, 0.9 + nrows * (1.1 + cell_h * len(rows))))
  for ax in axes.flat[len(panels):]:
    ax.axis('off')
  image = None
  for ax, (name, values) in zip(axes.flat, panels.items()):
    values = values.reshape(shape)
    image = ax.imshow(values, cmap='RdYlGn', vmin=vmin, vmax=vmax, aspect='auto')
    ax.set_xticks(range(len(cols)), [f'{c:g}' if isinstance(c, float) else str(c) for c in cols],
                  fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    for i, j in np.ndindex(*shape):
      v = values[i, j]
      shade = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.5
      ax.text(j, i, '-' if np.isnan(v) else f'{v:.{digits}f}', ha='center', va='center',
              fontsize=8, color='white' if shade < 0.15 or shade > 0.85 else 'black')
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    if name:
      ax.set_title('\n'.join(textwrap.wrap(name, 34)), fontsize=9)
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
  fig.suptitle(title)
  if caption:  # a colorbar over several axes needs the constrained layout, not _save's
    fig.supxlabel(textwrap.fill(caption, width=int(fig.get_size_inches()[0] * 17)),
                  fontsize=CAPTION_FONTSIZE, color='0.3')
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def passkey_heatmaps(results: dict, path, *, title: str = 'Passkey retrieval accuracy',
                     caption: str | None = None) -> pathlib.Path:
  """One length x depth accuracy heat map per method (methods with the same accuracies share
  one, named 'a = b'), through `heatmap`."""
  lengths, depths = results['lengths'], results['depths']
  matrices = {name: np.array([[np.nan] * len(depths) if row is None else row
                              for row in v['accuracy']], dtype=float)
              for name, v in results['methods'].items()
              if any(a is not None for a in v['accuracy'])}
  return heatmap(matrices, lengths, depths, path, title=title, xlabel='depth of the key',
                 ylabel='length', caption=caption)
