"""Figures show every series: identical ones merged and named, seeds named, log scales only where
a series spans a decade, captions, and the passkey panels through the one `plots.heatmap`."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from longrope_jax import plots

MACHINE = dict(cpu='Made-up CPU 9000', cores=2, platform='cpu', accelerator=None, devices=1,
               jax='0.10.2')


def perplexity_results(none_at_8x: float = 33.0) -> dict:
  """Like the demo's: dynamic_ntk equals ntk at integer multiples, longrope absent at L0."""
  ntk = [4.1, 3.6, 5.3, 8.6, 11.2, 17.0]
  return dict(lengths=[256, 512, 1024, 2048, 4096, 8192], original_length=256, num_windows=4,
              split='test', methods={
                  'none': dict(perplexity=[4.1, 4.7, 8.1, 15.5, 19.8, none_at_8x]),
                  'linear': dict(perplexity=[4.1, 8.8, 16.9, 26.0, 30.1, 34.0]),
                  'ntk': dict(perplexity=ntk),
                  'dynamic_ntk': dict(perplexity=list(ntk)),
                  'yarn': dict(perplexity=[4.1, 3.6, 4.3, 4.7, 5.0, 6.6]),
                  'llama3': dict(perplexity=[4.1, 3.5, 4.3, 5.2, 7.0, 11.0]),
                  'longrope': dict(perplexity=[None, 4.2, 4.6, 4.5, 7.1, 13.3])})


def search_histories() -> dict:
  """The notebook's case: the run repeats paper_ga's first generations exactly."""
  def history(bests):
    return [dict(generation=g, evaluations=16 + 8 * g, best_perplexity=b, best_nll=math.log(b),
                 mean_perplexity=b * 1.3) for g, b in enumerate(bests)]
  ga = [3.84, 3.84, 3.84, 3.84, 3.80, 3.80, 3.80]
  return {'paper_ga': history(ga), 'CMA_ES': history([3.84, 3.84, 3.84, 3.80, 3.66, 3.55, 3.50]),
          'the run: paper_ga': history(ga + [3.76, 3.72, 3.72, 3.71])}


SEEDS = {'linear': 41.2, 'ntk': 3.856, 'yarn': 3.862, 'dynamic_ntk': 3.856}


@pytest.fixture
def captured(monkeypatch):
  """The figures a plots function built, kept open for inspection."""
  figures = []
  monkeypatch.setattr(plt, 'close', lambda fig=None: figures.append(fig))
  return figures


def legend_texts(fig) -> list[str]:
  return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]


def test_group_identical():
  groups = plots.group_identical({'a': [1, None, 3], 'b': [1, 2, 3], 'c': [1, None, 3],
                                  'd': [1, 2]})
  assert list(groups) == ['a = c', 'b', 'd']
  np.testing.assert_array_equal(groups['a = c'], [1, np.nan, 3])


def test_perplexity_plot_names_identical_series_and_scales(tmp_path, captured):
  caption = plots.measured_caption(what='Perplexity', split='test', documents=4, machine=MACHINE)
  assert caption == ('Perplexity on 4 test documents. Measured on: Made-up CPU 9000, 2 cores, '
                     'cpu, jax 0.10.2.')
  path = plots.perplexity_vs_length(perplexity_results(), tmp_path / 'ppl.png', caption=caption)
  assert path.stat().st_size > 10_000
  fig = captured[0]
  labels = legend_texts(fig)
  assert 'ntk = dynamic_ntk' in labels and 'ntk' not in labels and 'dynamic_ntk' not in labels
  assert labels.count('longrope') == 1 and 'training length L0 = 256' in labels
  ax = fig.axes[0]
  assert ax.get_yscale() == 'linear'  # 3.5 .. 34 is under a decade
  lines = [l for l in ax.get_lines() if not l.get_label().startswith('training')]
  styles = {(l.get_marker(), l.get_linestyle(), l.get_color()) for l in lines}
  assert len(styles) == len(lines) == 6
  assert caption in [t.get_text().replace('\n', ' ') for t in fig.texts]
  plots.perplexity_vs_length(perplexity_results(none_at_8x=120.0), tmp_path / 'log.png')
  assert captured[1].axes[0].get_yscale() == 'log'


def test_fitness_curve_names_seeds_and_keeps_every_curve_visible(tmp_path, captured):
  plots.fitness_curve(search_histories(), tmp_path / 'fitness.png', seeds=SEEDS,
                      x='evaluations', caption='Validation perplexity at 2048 tokens.')
  fig = captured[0]
  labels = legend_texts(fig)
  assert labels[:3] == ['paper_ga (6 generations)', 'CMA_ES (6 generations)',
                        'the run: paper_ga (10 generations)']
  assert 'seed ntk = dynamic_ntk: 3.856' in labels and 'seed yarn: 3.862' in labels
  assert 'seed linear: 41.2 (off the axes)' in labels
  ax = fig.axes[0]
  curves = ax.get_lines()[:3]
  # the curve drawn first (paper_ga, hidden under the run) is the widest, with the largest marker
  assert curves[0].get_linewidth() > curves[2].get_linewidth()
  assert curves[0].get_markersize() > curves[2].get_markersize()
  assert len({c.get_marker() for c in curves}) == 3
  lo, hi = ax.get_ylim()
  assert lo < 3.50 and 3.862 < hi < 41.2 and ax.get_yscale() == 'linear'


def test_fitness_curve_of_one_history(tmp_path, captured):
  plots.fitness_curve(search_histories()['CMA_ES'], tmp_path / 'one.png')
  assert legend_texts(captured[0]) == ['best so far', 'population mean']


def test_passkey_heatmaps_go_through_heatmap_and_merge_identical_panels(tmp_path, captured,
                                                                       monkeypatch):
  zeros = [[0.0] * 3] * 3
  results = dict(lengths=[256, 512, 1024], depths=[0.0, 0.5, 1.0], trials=4, methods={
      'none': dict(accuracy=zeros), 'ntk': dict(accuracy=zeros),
      'yarn': dict(accuracy=[[1.0, 0.75, 0.5], [0.5, 0.25, 0.0], [0.0, 0.0, 0.0]]),
      'longrope': dict(accuracy=[None, [0.0] * 3, [0.0] * 3]),
      'skipped': dict(accuracy=[None, None, None])})
  calls = []
  heatmap = plots.heatmap
  monkeypatch.setattr(plots, 'heatmap', lambda *a, **k: calls.append(a) or heatmap(*a, **k))
  plots.passkey_heatmaps(results, tmp_path / 'passkey.png', caption='4 keys per cell.')
  assert len(calls) == 1
  fig = captured[0]
  titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
  assert titles == ['none = ntk', 'yarn', 'longrope']
  longrope = fig.axes[2]
  assert [t.get_text() for t in longrope.texts][:3] == ['-', '-', '-']  # not measured at L0
  assert (tmp_path / 'passkey.png').stat().st_size > 10_000


def test_single_heatmap(tmp_path, captured):
  plots.heatmap(np.eye(2), ['a', 'b'], [1, 2], tmp_path / 'h.png', title='t', xlabel='x',
                ylabel='y')
  assert [t.get_text() for t in captured[0].axes[0].texts] == ['1.00', '0.00', '0.00', '1.00']
