"""The notebooks run top to bottom (nbclient) in the small setting: the toy config
(`configs/demo.py:test`) trained into a temp dir, short searches, figures written to a temp dir.
They are stored without outputs."""

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))
KERNEL = 'longrope-jax-test'
CELL_TIMEOUT = 600
FIGURES = {
    '01_rope_scaling': ('wavelengths.png', 'factors_by_method.png', 'effective_length.png',
                        'n_hat.png'),
    '02_search': ('search_fitness.png', 'search_factors.png'),
    '03_long_context': ('perplexity.png', 'passkey.png'),
}


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """A kernelspec running this interpreter (the venv's python) on this checkout's library (not
  an installed copy elsewhere), and one toy run for 02 and 03."""
  root = tmp_path_factory.mktemp('notebooks')
  spec = root / 'jupyter' / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps(dict(
      argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      display_name='longrope-jax (tests)', language='python', env=dict(PYTHONPATH=str(REPO)))))
  return root


def test_notebooks_are_stored_without_outputs_and_take_parameters():
  assert [nb.stem for nb in NOTEBOOKS] == sorted(FIGURES)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(not c.outputs and c.execution_count is None for c in code), path.name
    assert 'parameters' in code[0].metadata.get('tags', []), path.name
    assert not any(line.lstrip().startswith(('def ', 'class ')) for c in code
                   for line in c.source.splitlines()), f'{path.name} defines code; import it'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, shared, tmp_path, monkeypatch):
  figures = tmp_path / 'figures'
  monkeypatch.setenv('JUPYTER_PATH', str(shared / 'jupyter'))
  monkeypatch.setenv('LONGROPE_WORKDIR', '')
  monkeypatch.setenv('LONGROPE_TOY_DIR', str(shared / 'toy'))
  monkeypatch.setenv('LONGROPE_FIGURES', str(figures))
  monkeypatch.setenv('LONGROPE_SMALL', '1')
  monkeypatch.delenv('XLA_FLAGS', raising=False)  # one CPU device, as on a laptop
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                          resources={'metadata': {'path': str(path.parent)}})
  client.execute()
  for name in FIGURES[path.stem]:
    assert (figures / name).stat().st_size > 0, name
