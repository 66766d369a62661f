"""Export that transformers reproduces: a tiny Llama checkpoint (tests/hf_fixtures.py) + known
LongRoPE factors -> `hf.export_longrope` -> transformers' perplexity on PG19-like books equals the
project's for the same factors (short ones at L <= L0, long ones beyond, one attention factor)."""

import json
import logging
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import corpus
from longrope_jax import data as data_lib
from longrope_jax import hf
from longrope_jax import model as model_lib
from longrope_jax import rope as rope_lib

pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import hf_fixtures  # noqa: E402

L0 = hf_fixtures.ORIGINAL
TARGET = 4 * L0
LENGTHS = (96, 256)  # one at or below L0 (short factors), one beyond (long factors)
ATTN = rope_lib.longrope_attention_scale(TARGET / L0, L0)
LONG = dict(factors=hf_fixtures.LONG_FACTOR, n_hat=0, attn_scale=ATTN, original_length=L0,
            target_length=TARGET)
SHORT = dict(LONG, factors=hf_fixtures.SHORT_FACTOR, target_length=L0)


@pytest.fixture(scope='module')
def windows(hf_assets):
  """Two validation books per length, read through the TFDS builder, tokenized by the
  checkpoint's SentencePiece-layout tokenizer.json."""
  pytest.importorskip('tensorflow_datasets')
  name, data_dir = hf_assets.pg19()
  tok = data_lib.get_tokenizer(str(hf_assets.tokenizer_file('sentencepiece')))
  docs = data_lib.encode_documents(
      corpus.load_split('tfds', 'validation', tfds_name=name, data_dir=str(data_dir)), tok)
  return {L: data_lib.eval_windows(docs, L, 2) for L in LENGTHS}


def _hf_perplexity(folder, windows_NL: np.ndarray) -> float:
  return math.exp(hf.transformers_nll(folder, windows_NL).mean())


def _our_perplexity(ckpt, windows_NL: np.ndarray, rope) -> float:
  nll = model_lib.token_nll(ckpt.config, ckpt.params, jnp.asarray(windows_NL), rope)
  return math.exp(float(jnp.mean(nll)))


def test_transformers_reproduces_the_exported_factors(hf_assets, windows, tmp_path):
  source = hf_assets.checkpoint('llama')
  out = hf.export_longrope(source, tmp_path / 'export', LONG, short=SHORT)
  written = hf.read_config(out)['rope_scaling']
  assert written['long_factor'] == LONG['factors'] and written['short_factor'] == SHORT['factors']
  assert written['original_max_position_embeddings'] == L0
  assert hf.read_config(out)['max_position_embeddings'] == TARGET
  assert written['attention_factor'] == pytest.approx(ATTN)
  assert (out / 'tokenizer.json').read_bytes() == (source / 'tokenizer.json').read_bytes()

  ckpt = hf.load(source)  # the project's side: the source weights with the searched factors
  ours = {L: rope_lib.make(SHORT['factors'] if L <= L0 else LONG['factors'], 0, ATTN)
          for L in LENGTHS}
  for L in LENGTHS:
    expected = hf.rope_for_length(out, L)
    np.testing.assert_allclose(expected.factors, ours[L].factors, rtol=1e-6)
    assert float(expected.attn_scale) == pytest.approx(ATTN, rel=1e-6)
    theirs, mine = _hf_perplexity(out, windows[L]), _our_perplexity(ckpt, windows[L], ours[L])
    rel = abs(theirs - mine) / theirs
    print(f'L={L} ({"short" if L <= L0 else "long"}): transformers {theirs:.6f}, '
          f'longrope-jax {mine:.6f}, relative difference {rel:.2e}')
    assert rel < 1e-4, (L, theirs, mine)
    plain = _our_perplexity(ckpt, windows[L], rope_lib.none(head_dim=ckpt.config.head_dim))
    assert abs(plain - mine) / mine > 1e-3  # the factors and the attention factor matter here


def _transformers_warnings(load) -> list[str]:
  """The warnings transformers logs while `load()` runs (whatever verbosity other tests set)."""
  messages, handler = [], logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  logger, level = logging.getLogger('transformers'), transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_warning()
  logger.addHandler(handler)
  try:
    load()
  finally:
    logger.removeHandler(handler)
    transformers.logging.set_verbosity(level)
  return messages


def test_plain_short_writes_per_side_attention_factors(hf_assets, windows, tmp_path):
  """plain_short: short_mscale 1 and long_mscale = attn_scale beside attention_factor (what
  vLLM's longrope reads); transformers ignores the two keys, so in transformers
  the export is the default one, attn_scale within L0 included (the figure printed)."""
  source = hf_assets.checkpoint('llama')
  default = hf.export_longrope(source, tmp_path / 'default', LONG)
  plain = hf.export_longrope(source, tmp_path / 'plain', LONG, plain_short=True)
  written = hf.read_config(plain)
  for key in ('rope_scaling', 'rope_parameters'):
    block = written[key]
    assert block['short_mscale'] == 1.0 and block['long_mscale'] == pytest.approx(ATTN, rel=1e-12)
    assert block['attention_factor'] == pytest.approx(ATTN, rel=1e-12)
    assert block['short_factor'] == [1.0] * 8 and block['long_factor'] == LONG['factors']
  assert {k: v for k, v in written['rope_scaling'].items() if not k.endswith('_mscale')} == \
      hf.read_config(default)['rope_scaling']
  assert 'short_mscale' not in hf.read_config(default)['rope_scaling']
  with pytest.raises(ValueError, match=r'plain_short keeps plain RoPE up to L0, so it needs '
                                       'short factors 1'):
    hf.export_longrope(source, tmp_path / 'refused', LONG, short=SHORT, plain_short=True)
  assert not (tmp_path / 'refused').exists()

  warned = _transformers_warnings(lambda: transformers.AutoConfig.from_pretrained(plain))
  assert any('Unrecognized keys' in m and 'short_mscale' in m and 'long_mscale' in m
             for m in warned), warned  # read, then ignored
  short = windows[LENGTHS[0]]  # within L0
  same = hf.relative_difference(default, plain, short)
  assert same['relative'] == 0.0 and same['length'] == LENGTHS[0] <= L0
  within = hf.relative_difference(source, default, short)
  print(f"export vs original in transformers at L = {LENGTHS[0]} <= L0 = {L0}: "
        f"{within['original']:.4f} -> {within['exported']:.4f} ({100 * within['relative']:+.3f}%)")
  assert abs(within['relative']) > 1e-4  # the attention factor within L0 is visible here


def test_n_hat_is_refused_unless_dropped(hf_assets, tmp_path):
  source = hf_assets.checkpoint('llama')
  with pytest.raises(ValueError, match=r'n_hat = 8.*drop_n_hat'):
    hf.export_longrope(source, tmp_path / 'refused', dict(LONG, n_hat=8))
  assert not (tmp_path / 'refused').exists()
  out = hf.export_longrope(source, tmp_path / 'dropped', dict(LONG, n_hat=8), drop_n_hat=True)
  block = hf.read_config(out)['rope_scaling']
  assert block['long_factor'] == LONG['factors'] and block['short_factor'] == [1.0] * 8


def test_short_factors_must_share_the_attention_factor(hf_assets, tmp_path):
  with pytest.raises(ValueError, match='one attention_factor'):
    hf.export_longrope(hf_assets.checkpoint('llama'), tmp_path / 'out', LONG,
                       short=dict(SHORT, attn_scale=1.0))
  assert not (tmp_path / 'out').exists()


def test_mistral_window_is_kept_or_set(hf_assets, tmp_path):
  source = hf_assets.checkpoint('mistral')
  kept = hf.export_longrope(source, tmp_path / 'kept', LONG)
  assert hf.load(kept).config.sliding_window == hf_fixtures.SLIDING_WINDOW
  off = hf.export_longrope(source, tmp_path / 'off', LONG, sliding_window=None)
  assert hf.read_config(off)['sliding_window'] is None
  assert hf.load(off).config.sliding_window is None


def test_fine_tuned_params_are_written(hf_assets, tmp_path):
  ckpt = hf.load(hf_assets.checkpoint('llama'))
  params = dict(ckpt.params, final_norm={'scale': ckpt.params['final_norm']['scale'] * 2})
  out = hf.export_longrope(ckpt.path, tmp_path / 'tuned', LONG, params=params,
                           config=ckpt.config)
  np.testing.assert_array_equal(np.asarray(hf.load(out).params['final_norm']['scale']),
                                np.asarray(params['final_norm']['scale']))
  assert (out / 'tokenizer.json').exists()


def test_export_entry_point(hf_assets, tmp_path):
  """experiments/export.py on a finished run's workdir: its results.json and config.json."""
  source = hf_assets.checkpoint('llama')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'model': {'path': str(source)}}))
  (workdir / 'results.json').write_text(json.dumps({'search': dict(LONG, n_hat=4)}))
  out = tmp_path / 'exported'
  args = [sys.executable, '-m', 'experiments.export', f'--workdir={workdir}', f'--output={out}']
  proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'n_hat = 4' in proc.stderr and not out.exists()
  proc = subprocess.run(args + ['--drop_n_hat'], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert hf.read_config(out)['rope_scaling']['long_factor'] == LONG['factors']
  # A progressive record: its long and short records, with the fine-tuned weights.
  from longrope_jax import checkpoint as ckpt_lib
  params = hf.load(source).params
  params = dict(params, final_norm={'scale': params['final_norm']['scale'] + 1.0})
  ckpt_lib.save(ckpt_lib.manager(workdir / 'progressive' / 'ckpt'), 7, {'params': params})
  (workdir / 'results.json').write_text(json.dumps({'search': LONG, 'progressive': {
      'long': LONG, 'short': SHORT}}))
  proc = subprocess.run(args[:-1] + [f'--output={tmp_path / "progressive"}',
                                     f'--checkpoint={source}'],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  block = hf.read_config(tmp_path / 'progressive')['rope_scaling']
  assert block['short_factor'] == SHORT['factors']
  np.testing.assert_array_equal(
      np.asarray(hf.load(tmp_path / 'progressive').params['final_norm']['scale']),
      np.asarray(params['final_norm']['scale']))
  # A LongRoPE2 arm: its long factors, short factors 1.0, its fine-tuned weights.
  tuned = dict(params, final_norm={'scale': params['final_norm']['scale'] * 3.0})
  ckpt_lib.save(ckpt_lib.manager(workdir / 'longrope2' / 'finetune_longrope2' / 'ckpt'), 4,
                {'params': tuned})
  arm = dict(factors=LONG['factors'], attn_scale=ATTN, original_length=L0, length=TARGET,
             finetune='mixed', steps=4)
  (workdir / 'results.json').write_text(json.dumps({'search': LONG, 'progressive': {
      'long': LONG, 'short': SHORT}, 'longrope2_finetune': {'longrope2': arm}}))
  proc = subprocess.run(args[:-1] + [f'--output={tmp_path / "lr2"}', f'--checkpoint={source}',
                                     '--result=longrope2:longrope2'],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  block = hf.read_config(tmp_path / 'lr2')['rope_scaling']
  assert block['short_factor'] == [1.0] * 8 and block['long_factor'] == LONG['factors']
  np.testing.assert_array_equal(
      np.asarray(hf.load(tmp_path / 'lr2').params['final_norm']['scale']),
      np.asarray(tuned['final_norm']['scale']))


def _longrope2_record(head_dim: int, theta: float) -> dict:
  """A LongRoPE2 search result for 4x the tiny checkpoint's L0: a genome of the rcd space (d_rcd
  one below d_tcd, factors rising over [s, 2s] from it, NTK below), as results.json holds it."""
  from longrope_jax import search as search_lib
  from longrope_jax import search_space
  extension = rope_lib.Extension.by_multiple(L0, TARGET / L0)
  space = search_space.make_rcd_space(head_dim=head_dim, theta=theta, extension=extension)
  k = np.linspace(space.min_step, space.num_steps, space.num_freqs).round().astype(np.int32)
  genome = space.with_rcd(k, space.rcd_max - 1)
  factors, n_hat = space.decode(genome[None])
  return search_lib.SearchResult(
      factors=factors[0], n_hat=int(n_hat[0]), attn_scale=space.attn_scale, nll=0.0,
      scale=extension.scale, original_length=L0, target_length=TARGET, strategy='paper_ga',
      generations=0, evaluations=1, space='longrope2',
      rcd=space.critical_dimension(genome)).to_json()


def test_longrope2_factors_export_with_short_factors_one(hf_assets, windows, tmp_path):
  """LongRoPE2's factors as an HF longrope block with short factors 1.0 (nnscaler's LLaMA3
  config): transformers reproduces the project's perplexity with them beyond L0; at L <= L0 it
  computes factors 1 under the long attention factor (longrope2.short_rope='attention_factor'),
  not the original RoPE."""
  source = hf_assets.checkpoint('llama')
  ckpt = hf.load(source)
  record = _longrope2_record(ckpt.config.head_dim, ckpt.config.rope_theta)
  assert record['space'] == 'longrope2' and record['n_hat'] == 0
  factors = np.asarray(record['factors'])
  assert np.all(np.diff(factors) >= 0) and factors[-1] <= 2 * TARGET / L0 + 1e-6
  out = hf.export_longrope(source, tmp_path / 'longrope2', record)
  block = hf.read_config(out)['rope_scaling']
  assert block['short_factor'] == [1.0] * (ckpt.config.head_dim // 2)
  assert block['long_factor'] == record['factors']
  assert block['attention_factor'] == pytest.approx(record['attn_scale'])
  from longrope_jax.stages import longrope2 as longrope2_stages
  long = rope_lib.make(factors, 0, record['attn_scale'])
  ours = {96: longrope2_stages.SHORT_ROPES['attention_factor'](long), 256: long}
  for L, rope in ours.items():
    theirs, mine = _hf_perplexity(out, windows[L]), _our_perplexity(ckpt, windows[L], rope)
    print(f'LongRoPE2 L={L}: transformers {theirs:.6f}, longrope-jax {mine:.6f}')
    assert abs(theirs - mine) / theirs < 1e-4, (L, theirs, mine)
  original = longrope2_stages.SHORT_ROPES['original'](long)
  assert abs(_our_perplexity(ckpt, windows[96], original) - _hf_perplexity(out, windows[96])) \
      / _hf_perplexity(out, windows[96]) > 1e-3  # the attention factor matters at L <= L0
