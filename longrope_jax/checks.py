"""Generic checks of one config value, shared by the config rules and the library's dataclasses.

A leaf module (it imports nothing from the project). Every check is called as
`check(value, field)` and raises `ConfigError` (a ValueError) naming the dotted field
(`pretrain.batch_size`, `ModelConfig.dim`) and the fix; its `accepts` says in words what passes,
for the generated config reference. A `Rule` pairs a check with a one-line doc of the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Iterable, Mapping


class ConfigError(ValueError):
  """A bad config value: `field` is its dotted name."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def fail(field: str, value: Any, what: str, fix: str | None = None) -> None:
  """Raises ConfigError: '{field} must be {what}, got {value!r}; {fix}.'."""
  fix = fix or f"set {field} to {what} (e.g. --config.{field}=...)"
  raise ConfigError(field, f"{field} must be {what}, got {value!r}; {fix}.")


class Check:
  """A test of one value: `check(value, field)` raises ConfigError or returns None. `accepts`
  (a string, or a callable giving one when asked: a registry read late) says what passes."""

  def __init__(self, test: Callable[[Any, str], None], accepts: str | Callable[[], str]):
    self._test = test
    self._accepts = accepts

  def __call__(self, value: Any, field: str) -> None:
    self._test(value, field)

  @property
  def accepts(self) -> str:
    return self._accepts() if callable(self._accepts) else self._accepts


@dataclasses.dataclass(frozen=True)
class Rule:
  """A config field's check and its one-line meaning (the config reference's row)."""

  check: Check
  doc: str


def _simple(test: Callable[[Any], bool], what: str) -> Check:
  """The check failing with '{field} must be {what}' where `test(value)` is false."""

  def check(value: Any, field: str) -> None:
    if not test(value):
      fail(field, value, what)

  return Check(check, what)


# ----------------------------------------------------------------------------- single values
def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


positive_int = _simple(lambda v: _is_int(v) and v >= 1, 'a positive integer (>= 1)')
non_negative_int = _simple(lambda v: _is_int(v) and v >= 0, 'a non-negative integer (>= 0)')
fraction = _simple(lambda v: _is_real(v) and 0.0 <= v <= 1.0, 'a number in [0, 1]')
positive_float = _simple(lambda v: _is_real(v) and v > 0, 'a finite number > 0')
non_negative_float = _simple(lambda v: _is_real(v) and v >= 0, 'a finite number >= 0')
boolean = _simple(lambda v: isinstance(v, bool), 'True or False')
string = _simple(lambda v: isinstance(v, str) and bool(v), 'a non-empty string')


def at_least(minimum: float) -> Check:
  """A finite number >= minimum."""
  return _simple(lambda v: _is_real(v) and v >= minimum, f'a finite number >= {minimum:g}')


def choice(options: Iterable[str] | Callable[[], Iterable[str]]) -> Check:
  """One of `options`: a collection (a registry dict is read when checked, so late registrations
  count) or a callable returning one."""

  def allowed() -> list:
    return sorted(options() if callable(options) else options)

  def accepts() -> str:
    return f"one of {', '.join(map(repr, allowed()))}"

  def check(value: Any, field: str) -> None:
    if value not in allowed():
      fail(field, value, accepts())

  return Check(check, accepts)


def optional(check: Check) -> Check:
  """None (unset), or a value passing `check`."""

  def checked(value: Any, field: str) -> None:
    if value is not None:
      try:
        check(value, field)
      except ConfigError as e:
        raise ConfigError(e.field, f"{e} (None leaves it unset)") from None

  return Check(checked, lambda: f'None (unset) or {check.accepts}')


def tuple_of(check: Check, nonempty: bool = True) -> Check:
  """A tuple (or list) whose every item passes `check` (the item is named field[i])."""

  def checked(value: Any, field: str) -> None:
    if not isinstance(value, (tuple, list)) or (nonempty and not value):
      fail(field, value, f"a {'non-empty ' if nonempty else ''}tuple",
           f"set {field} to e.g. (1, 2)")
    for i, item in enumerate(value):
      check(item, f'{field}[{i}]')

  return Check(checked, lambda: f"a {'non-empty ' if nonempty else ''}tuple, each item "
                                f"{check.accepts}")


# ----------------------------------------------------------------------------- sections
def lookup(config: Mapping, field: str, default: Any = None) -> Any:
  """config['a']['b'] for field 'a.b' (ConfigDict or nested dicts); `default` if absent."""
  node = config
  for part in field.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return default
    node = node[part]
  return node


def check_section(values: Mapping, rules: Mapping[str, Rule], prefix: str) -> None:
  """Checks each field of `values` that has a rule (names reported as prefix.field)."""
  for name, rule in rules.items():
    if name in values:
      rule.check(values[name], f'{prefix}.{name}')
