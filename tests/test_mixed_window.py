"""LongRoPE2's mixed context window training (packing.py, train.py): short steps pack documents
of at most L0 tokens with segment ids and positions restarting at 0, long steps crop the long
documents; the proportion of short steps is exact; a step runs under the RoPE the inference
switch picks (short factors when max(position) + 1 <= L0); packed rows average the loss over
each document's own predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import model as model_lib
from longrope_jax import packing
from longrope_jax import rope as rope_lib
from longrope_jax import train as train_lib

CFG = model_lib.get_config('test')  # L0 = 64
L0, T = CFG.original_length, 4 * CFG.original_length


def docs(seed=0):
  """Documents of every size around L0: short ones (<= L0 tokens) and long ones."""
  rng = np.random.default_rng(seed)
  sizes = [5, 17, 40, 64, 65, 100, 300, 1000, 2000] * 3
  return [rng.integers(0, 256, size=n).astype(np.int32) for n in sizes]


def test_pack_restarts_positions_and_cuts_the_last_unit():
  units = [np.arange(1, 4), np.arange(10, 16), np.arange(20, 30), np.arange(40, 43)]
  rows = packing.pack(units, 2, 8)
  np.testing.assert_array_equal(rows.tokens, [[1, 2, 3, 10, 11, 12, 13, 14],
                                              [20, 21, 22, 23, 24, 25, 26, 27]])
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 2, 2, 2, 2, 2],
                                                   [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 0, 1, 2, 3, 4],
                                                 [0, 1, 2, 3, 4, 5, 6, 7]])
  assert rows.span == 7  # over the inputs (the last token is only a target)
  with pytest.raises(ValueError, match='empty'):
    packing.pack([np.zeros(0)], 1, 4)


@pytest.mark.parametrize('fraction', [0.0, 0.3, 0.5, 1 / 3, 1.0])
def test_short_steps_hold_the_fraction_at_every_prefix(fraction):
  short = [packing.is_short_step(s, fraction) for s in range(300)]
  for n in (1, 7, 10, 64, 300):
    assert sum(short[:n]) == int(n * round(fraction * 10**6) // 10**6)


@pytest.mark.parametrize('source', list(packing.SHORT_DOCUMENTS))
def test_mixed_batches(source):
  token_docs = docs()
  short_docs = {d.tobytes() for d in token_docs if len(d) <= L0}
  stream = np.concatenate([d for d in token_docs if len(d) > L0])
  batches = packing.MixedBatches(token_docs, 3, T, original_length=L0, short_fraction=0.5,
                                 short_documents=source, seed=4)
  again = packing.MixedBatches(token_docs, 3, T, original_length=L0, short_fraction=0.5,
                               short_documents=source, seed=4)
  kinds = []
  for step in range(6):
    rows = batches.batch(step)
    twin = again.batch(step)  # a pure function of (seed, step)
    np.testing.assert_array_equal(rows.tokens, twin.tokens)
    assert rows.tokens.shape == (3, T + 1) and rows.tokens.dtype == np.int32
    kinds.append(batches.is_short(step))
    if not batches.is_short(step):  # long rows: crops of the long documents' stream
      assert rows.segment_ids is None and rows.positions is None and rows.span == T
      for row in rows.tokens:
        starts = np.nonzero(stream[:stream.size - T] == row[0])[0]
        assert any(np.array_equal(stream[s:s + T + 1], row) for s in starts)
      continue
    assert rows.span <= L0  # the switch picks the short factors
    for b in range(3):
      seg, pos, tok = rows.segment_ids[b], rows.positions[b], rows.tokens[b]
      assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
      for s in np.unique(seg):
        unit = tok[seg == s]
        np.testing.assert_array_equal(pos[seg == s], np.arange(unit.size))
        assert unit.size <= L0
        last = s == seg[-1]
        if source == 'documents':  # whole short documents (the last one may be cut)
          assert unit.tobytes() in short_docs or last
        elif not last:  # crops: L0 tokens each, as pretraining's rows
          assert unit.size == L0
  assert kinds == [packing.is_short_step(s, 0.5) for s in range(6)] and any(kinds)


def test_mixed_batches_refuse_bad_input():
  token_docs = docs()
  with pytest.raises(ValueError, match='longer than the original window'):
    packing.MixedBatches(token_docs, 2, L0, original_length=L0, short_fraction=0.3)
  with pytest.raises(ValueError, match='short_documents must be one of'):
    packing.MixedBatches(token_docs, 2, T, original_length=L0, short_fraction=0.3,
                         short_documents='books')
  with pytest.raises(ValueError, match='no training document has at most'):
    packing.MixedBatches([d for d in token_docs if len(d) > L0], 2, T, original_length=L0,
                         short_fraction=0.3, short_documents='documents')
  with pytest.raises(ValueError, match='no training document is longer'):
    packing.MixedBatches([d for d in token_docs if len(d) <= L0], 2, T, original_length=L0,
                         short_fraction=0.3)


@pytest.fixture(scope='module')
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


def test_packed_loss_is_the_mean_over_each_documents_own_predictions(params):
  """The step's loss on packed rows: the mean NLL of every token predicted within its own
  document, each document as if it were alone at positions 0.."""
  units = [np.arange(5, 5 + n) % 250 for n in (30, 64, 12, 64, 50)]
  rows = packing.pack(units, 2, 100)
  optimizer = train_lib.make_optimizer(train_lib.OptimConfig(steps=2, warmup=0, lr=1e-3))
  state = train_lib.init_state(CFG, optimizer, params=params)
  rope = rope_lib.none(head_dim=CFG.head_dim)
  _, metrics = train_lib.make_train_step(CFG, optimizer)(
      state, jnp.asarray(rows.tokens), rope, rows.segment_ids, rows.positions)
  alone = []
  for b in range(2):
    for s in np.unique(rows.segment_ids[b]):
      unit = rows.tokens[b][rows.segment_ids[b] == s]
      if unit.size > 1:
        alone.append(np.asarray(model_lib.token_nll(CFG, params, jnp.asarray(unit[None]),
                                                    rope))[0])
  np.testing.assert_allclose(float(metrics['loss']), np.concatenate(alone).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match='both segment_ids_BT and positions_BT'):
    train_lib.make_train_step(CFG, optimizer)(state, jnp.asarray(rows.tokens), rope,
                                              rows.segment_ids)


def test_each_step_runs_under_the_rope_the_switch_picks(params, tmp_path):
  """train() with mixed batches and LongRopeFactors equals stepping by hand with the short
  factors on short steps and the long ones on long steps (and differs from the long factors
  throughout)."""
  token_docs = docs(1)
  batches = packing.MixedBatches(token_docs, 2, T, original_length=L0, short_fraction=0.5,
                                 seed=2)
  short = rope_lib.none(head_dim=CFG.head_dim)
  long = rope_lib.linear(head_dim=CFG.head_dim, scale=T / L0)
  factors = rope_lib.LongRopeFactors(short, long, L0)
  optim = train_lib.OptimConfig(steps=4, warmup=1, lr=1e-2)
  state = train_lib.train(CFG, optim, batches, factors, tmp_path / 'mixed', init_params=params,
                          ckpt_every=4, log_every=2)
  optimizer = train_lib.make_optimizer(optim)
  step_fn = train_lib.make_train_step(CFG, optimizer)
  by_hand = {name: train_lib.init_state(CFG, optimizer, params=params) for name in ('switch',
                                                                                     'long')}
  for step in range(4):
    rows = batches.batch(step)
    rope = short if batches.is_short(step) else long
    assert factors.select(rows.span) is rope
    by_hand['switch'], _ = step_fn(by_hand['switch'], jnp.asarray(rows.tokens), rope,
                                   rows.segment_ids, rows.positions)
    by_hand['long'], _ = step_fn(by_hand['long'], jnp.asarray(rows.tokens), long,
                                 rows.segment_ids, rows.positions)
  ours = jax.tree.leaves(state['params'])
  for a, b in zip(ours, jax.tree.leaves(by_hand['switch']['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert max(float(jnp.abs(a - b).max()) for a, b in
             zip(ours, jax.tree.leaves(by_hand['long']['params']))) > 1e-4
