"""Report: the paired bootstrap and the tables that use it (synthetic results, no model)."""

import numpy as np
import pytest

from longrope_jax import report as report_lib


def _results(per_doc: dict, lengths=(64, 128), L0=64) -> dict:
  methods = {}
  for name, columns in per_doc.items():
    nll = [None if c is None else float(np.mean(c)) for c in columns]
    methods[name] = dict(nll=nll, nll_per_document=[None if c is None else list(c)
                                                    for c in columns],
                         perplexity=[None if v is None else float(np.exp(v)) for v in nll])
  return dict(lengths=list(lengths), original_length=L0, num_windows=len(columns[-1]),
              methods=methods, split='test')


def test_paired_bootstrap_separates_a_clear_difference_and_not_noise():
  rng = np.random.default_rng(0)
  base = rng.normal(3.0, 0.5, size=16)  # documents differ a lot from each other ...
  better = base - 0.05 + rng.normal(0, 0.01, size=16)  # ... the paired difference is clear
  diff, low, high = report_lib.paired_bootstrap(better, base)
  assert diff == pytest.approx(np.mean(better - base))
  assert low < diff < high < 0
  # Identical methods: the interval is [0, 0] and includes 0.
  assert report_lib.paired_bootstrap(base, base) == (0.0, 0.0, 0.0)
  # Unrelated noise around the same mean: the interval straddles 0.
  noise = base + rng.normal(0, 0.05, size=16)
  noise -= np.mean(noise - base)
  _, low, high = report_lib.paired_bootstrap(noise, base)
  assert low < 0 < high
  # Seeded: the same call gives the same interval.
  assert report_lib.paired_bootstrap(better, base) == report_lib.paired_bootstrap(better, base)
  with pytest.raises(ValueError, match='equal-length'):
    report_lib.paired_bootstrap(base, base[:3])


def test_tables_bold_only_resolved_bests():
  rng = np.random.default_rng(1)
  a = rng.normal(3.0, 0.5, size=12)
  results = _results({
      'none': [a, a + 1.0],
      'linear': [a, a + 0.2],                                   # tied with none at 1x
      'longrope': [None, a + 0.1 + rng.normal(0, 0.01, 12)],    # clearly below linear at 2x
  })
  table = report_lib.markdown_table(results)
  rows = {line.split(' | ')[0][2:]: line for line in table.splitlines()[2:]}
  assert '**' not in rows['none'] and '**' not in rows['linear']  # 1x: a tie, no bold
  longrope_2x = results['methods']['longrope']['perplexity'][1]
  assert rows['longrope'].endswith(f'| **{longrope_2x:.3f}** |')
  comparison = report_lib.paired_comparison(results, 'longrope')
  assert len(comparison) == 1 and comparison[0]['rival'] == 'linear'
  assert comparison[0]['high'] < 0
  text = report_lib.comparison_table(comparison)
  assert '| 128 (2x) | longrope |' in text and '| lower |' in text
  # Unresolved: longrope lower on average, but within noise of linear -> no bold.
  noise = rng.normal(0, 0.3, 12)
  noisy = _results({'linear': [a, a + 0.2], 'longrope': [None, a + 0.2 + noise - noise.mean()
                                                          - 1e-3]})
  assert '**' not in report_lib.markdown_table(noisy)
  assert '| not resolved |' in report_lib.comparison_table(
      report_lib.paired_comparison(noisy, 'longrope'))
