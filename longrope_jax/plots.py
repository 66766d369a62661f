"""Matplotlib figures for reports (written as PNG, headless backend)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def perplexity_vs_length(results: dict, path, *, title: str = 'Perplexity vs. context length',
                         metric: str = 'perplexity') -> pathlib.Path:
  """One line per method, x = evaluation length (log2), y = perplexity (log); the original
  window is marked."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  lengths = np.asarray(results['lengths'])
  for name, values in results['methods'].items():
    ys = np.array([np.nan if v is None else v for v in values[metric]], dtype=float)
    style = dict(lw=2.5, marker='o') if name.startswith('longrope') else dict(lw=1.5, marker='.')
    ax.plot(lengths, ys, label=name, **style)
  ax.axvline(results['original_length'], color='gray', ls='--', lw=1, label='training length')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('evaluation length (tokens)')
  ax.set_ylabel(metric.replace('_', ' '))
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def training_curve(records: list[dict], path, *, title: str = 'Pretraining') -> pathlib.Path:
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
  return _save(fig, path)


def factor_curves(curves: dict[str, np.ndarray], path, *, title: str = 'Rescale factors',
                  critical_dim: int | None = None) -> pathlib.Path:
  """lambda_i against frequency index i, one line per method (log y)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, factors in curves.items():
    style = dict(lw=2.5, marker='o', ms=3) if name.startswith('longrope') else dict(lw=1.2)
    ax.plot(np.arange(len(factors)), factors, label=name, **style)
  if critical_dim is not None:
    ax.axvline(critical_dim, color='gray', ls=':', lw=1, label='critical dimension')
  ax.set_yscale('log', base=2)
  ax.set_xlabel('RoPE frequency index i')
  ax.set_ylabel('rescale factor lambda_i')
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def fitness_curve(history: list[dict], path, *, title: str = 'Search') -> pathlib.Path:
  """Best and mean fitness (perplexity) against generation."""
  fig, ax = plt.subplots(figsize=(7, 4))
  gens = [h['generation'] for h in history]
  ax.plot(gens, [h['best_perplexity'] for h in history], marker='o', label='best so far')
  if all('mean_perplexity' in h for h in history):
    ax.plot(gens, [h['mean_perplexity'] for h in history], alpha=0.6, label='population mean')
  ax.set_xlabel('generation')
  ax.set_ylabel('perplexity')
  ax.set_yscale('log')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  return _save(fig, path)


def heatmap(matrix: np.ndarray, rows: list, cols: list, path, *, title: str, xlabel: str,
            ylabel: str, vmin: float = 0.0, vmax: float = 1.0) -> pathlib.Path:
  """An annotated heat map (e.g. passkey accuracy: length x depth)."""
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.5 * len(rows)))
  im = ax.imshow(matrix, cmap='RdYlGn', vmin=vmin, vmax=vmax, aspect='auto')
  ax.set_xticks(range(len(cols)), [str(c) for c in cols])
  ax.set_yticks(range(len(rows)), [str(r) for r in rows])
  for i in range(len(rows)):
    for j in range(len(cols)):
      if not np.isnan(matrix[i, j]):
        ax.text(j, i, f'{matrix[i, j]:.2f}', ha='center', va='center', fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def passkey_heatmaps(results: dict, path, *, title: str = 'Passkey retrieval accuracy'
                     ) -> pathlib.Path:
  """One length x depth accuracy heat map per method, side by side."""
  names = [n for n, v in results['methods'].items() if any(a is not None for a in v['accuracy'])]
  lengths, depths = results['lengths'], results['depths']
  cols = min(4, len(names))
  rows = (len(names) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, rows * (1.4 + 0.4 * len(lengths))),
                           squeeze=False)
  for ax in axes.flat[len(names):]:
    ax.axis('off')
  for ax, name in zip(axes.flat, names):
    acc = np.array([[np.nan] * len(depths) if row is None else row
                    for row in results['methods'][name]['accuracy']], dtype=float)
    ax.imshow(acc, cmap='RdYlGn', vmin=0, vmax=1, aspect='auto')
    ax.set_xticks(range(len(depths)), [f'{d:g}' for d in depths], fontsize=7)
    ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
    for i in range(len(lengths)):
      for j in range(len(depths)):
        if not np.isnan(acc[i, j]):
          ax.text(j, i, f'{acc[i, j]:.1f}', ha='center', va='center', fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('depth', fontsize=8)
    ax.set_ylabel('length', fontsize=8)
  fig.suptitle(title)
  return _save(fig, path)
