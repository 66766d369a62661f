"""Report tables bold only a true best (report.markdown_table)."""

from longrope_jax import report as report_lib


def table(values: dict, metric='perplexity', lengths=(64, 128)) -> dict:
  return dict(lengths=list(lengths), original_length=64,
              methods={name: {metric: v} for name, v in values.items()})


def bold_cells(text: str) -> list[tuple[str, int]]:
  """(method, column) of every bold cell."""
  out = []
  for row in text.splitlines()[2:]:
    cells = [c.strip() for c in row.strip('|').split('|')]
    out += [(cells[0], j) for j, c in enumerate(cells[1:]) if c.startswith('**')]
  return out


def test_perplexity_bolds_the_best_but_not_an_all_equal_column():
  # at L0 every method is vanilla RoPE: equal, nothing to bold; longrope not measured there
  text = report_lib.markdown_table(table({'none': [4.1, 9.0], 'ntk': [4.1, 5.2],
                                        'longrope': [None, 4.9]}))
  assert bold_cells(text) == [('longrope', 1)]
  assert '| longrope | - | **4.900** |' in text


def test_compared_as_printed_and_ties_at_the_top():
  results = table({'ntk': [4.1, 5.2], 'dynamic_ntk': [4.1, 5.2], 'yarn': [4.1, 5.2004]})
  # 5.2004 prints as 5.200: every printed value in the column is the same
  assert bold_cells(report_lib.markdown_table(results)) == []
  results['methods']['yarn']['perplexity'][1] = 6.0  # ntk and dynamic_ntk tie at the top:
  assert bold_cells(report_lib.markdown_table(results)) == []  # a tie is nobody's best
  results['methods']['yarn']['perplexity'][1] = 5.1
  assert bold_cells(report_lib.markdown_table(results)) == [('yarn', 1)]


def test_passkey_bolds_only_a_strict_best():
  zeros = table({'none': [0.0, 0.0], 'ntk': [0.0, 0.0], 'longrope': [None, 0.0]}, 'mean')
  text = report_lib.markdown_table(zeros, metric='mean', digits=2, best=max)
  assert '**' not in text and '| ntk | 0.00 | 0.00 |' in text
  some = table({'none': [1.0, 0.0], 'ntk': [1.0, 0.4], 'yarn': [0.8, 0.4],
                'longrope': [None, 0.6]}, 'mean')
  text = report_lib.markdown_table(some, metric='mean', digits=2, best=max)
  assert bold_cells(text) == [('longrope', 1)]  # the 1.00 tie at 64 is bolded by no one
  some['methods']['longrope']['mean'][1] = 0.4
  text = report_lib.markdown_table(some, metric='mean', digits=2, best=max)
  assert bold_cells(text) == []


def test_a_single_measured_value_is_not_a_best():
  text = report_lib.markdown_table(table({'none': [None, None], 'longrope': [None, 3.0]}))
  assert '**' not in text
