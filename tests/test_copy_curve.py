"""experiments.copy_curve: the reference levels, and both trainers on the same batches."""

import math
import subprocess
import sys

import numpy as np
import pytest

from experiments import copy_curve
from longrope_jax import data as data_lib


def test_reference_levels_of_a_known_row():
  tok = data_lib.ByteTokenizer()
  row = np.concatenate([[tok.bos_id], tok.encode('abcd' * 5)])  # 20 targets, unit 4
  assert copy_curve.period(row) == 4
  bag, copy = copy_curve.reference_losses(row[None])
  a = math.log(len(data_lib.COPY_ALPHABET))
  assert bag == pytest.approx((4 * a + 16 * math.log(4)) / 20)
  assert copy == pytest.approx(4 * a / 20)
  rows = np.stack([data_lib.copy_sample(np.random.default_rng(i), 65, tok, 4, 16)
                   for i in range(8)])
  assert all(4 <= copy_curve.period(r) <= 16 for r in rows)


def test_jax_and_torch_start_from_the_same_loss():
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.copy_curve', '--variant', 'test', '--steps', '4',
       '--batch', '4', '--length', '32', '--units', '2,6', '--every', '2', '--warmup', '1'],
      capture_output=True, text=True, timeout=300, check=True).stdout
  rows = [line.split() for line in out.splitlines() if line.split()[:1] in (['2'], ['4'])]
  assert len(rows) == 2
  jax_loss, torch_loss, bag, copy = (float(x) for x in rows[0][1:])
  # Untrained models guess among the 258 ids; the two implementations agree on that.
  assert abs(jax_loss - math.log(258)) < 0.5 and abs(torch_loss - math.log(258)) < 0.5
  assert 0 < copy < bag < math.log(len(data_lib.COPY_ALPHABET))
