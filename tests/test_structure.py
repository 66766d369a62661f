"""The library's shape: no import circle between its modules (every import statement, at module
or function level), and no file over 600 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = 'longrope_jax'
MAX_LINES = 600


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package (a package is its
  __init__.py)."""
  modules = {}
  for path in sorted((ROOT / PACKAGE).rglob('*.py')):
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    modules['.'.join(parts)] = path
  return modules


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict) -> set[str]:
  """The project modules an import statement in `module` loads: `from a import b` is a.b when
  that is a module, else a."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  elif isinstance(node, ast.ImportFrom):
    if node.level:  # relative: from the module's package, `level` up
      package = module.split('.') if is_package else module.split('.')[:-1]
      package = package[:len(package) - node.level + 1]
      base = '.'.join(package + ([node.module] if node.module else []))
    else:
      base = node.module
    names = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
             for alias in node.names]
  else:
    return set()
  found = set()
  for name in names:
    while name and name not in modules:  # `import a.b.c` of an attribute path: its module
      name = name.rpartition('.')[0]
    if name:
      found.add(name)
  return found


def import_graph() -> dict[str, set[str]]:
  """module -> the project modules it imports anywhere in its file."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == '__init__.py'
    graph[module] = set().union(*(_imported(n, module, is_package, modules)
                                  for n in ast.walk(tree))) - {module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_a_circle_through_function_level_imports(tmp_path):
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  source = 'import os\n\ndef f():\n  from longrope_jax import model\n  return model\n'
  modules = {'longrope_jax.model': None, 'longrope_jax': None, 'longrope_jax.hf': None,
             'longrope_jax.hf.config': None}
  found = set().union(*(_imported(n, 'longrope_jax.x', False, modules)
                        for n in ast.walk(ast.parse(source))))
  assert found == {'longrope_jax.model'}
  relative = ast.parse('from . import config\nfrom .config import KEEP\n'
                       'from longrope_jax.hf.config import read_config\n')
  found = set().union(*(_imported(n, 'longrope_jax.hf.weights', False, modules)
                        for n in ast.walk(relative)))
  assert found == {'longrope_jax.hf.config'}


def test_no_import_circle_in_the_library():
  graph = import_graph()
  assert {'longrope_jax.validation', 'longrope_jax.model', 'longrope_jax.hf',
          'longrope_jax.provenance', 'longrope_jax.stages'} <= set(graph)
  assert 'longrope_jax.checks' in graph['longrope_jax.model']
  assert graph['longrope_jax.checks'] == set(), 'checks.py is a leaf'
  cycle = find_cycle(graph)
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_no_library_file_over_600_lines():
  lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in _modules().values()}
  too_long = {p: n for p, n in lengths.items() if n > MAX_LINES}
  assert not too_long, f'library files over {MAX_LINES} lines (split them by job): {too_long}'
