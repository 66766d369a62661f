"""The config the tests start from: configs/demo.py:test (every section a run has), changed field
by field."""

import ml_collections

from configs import demo as demo_config

DELETE = object()  # a change that removes the field or section


def toy_config(**changes) -> ml_collections.ConfigDict:
  """configs/demo.py:test with `changes` ({'dotted.field': value}, DELETE removes it) as a fresh
  ConfigDict, so a value may have any type (as a hand-written config can give)."""
  config = demo_config.get_config('test').to_dict()
  for field, value in changes.items():
    node = config
    *parents, last = field.split('.')
    for part in parents:
      node = node[part]
    if value is DELETE:
      del node[last]
    else:
      node[last] = value
  return ml_collections.ConfigDict(config)
