"""The one-command pipeline on the toy config: every stage runs, writes its outputs, resumes."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import demo as demo_config
from longrope_jax import console
from longrope_jax import corpus
from longrope_jax import metrics as metrics_lib
from longrope_jax import pipeline
from longrope_jax import stages as stages_lib


def test_demo_test_config_runs_end_to_end_and_resumes(tmp_path):
  config = demo_config.get_config('test')
  run = pipeline.run(config, tmp_path)
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'report.md', 'plots/pretrain.png',
               'plots/perplexity.png', 'plots/passkey.png'):
    assert (tmp_path / name).exists(), name
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results) >= {'pretrain', 'search', 'perplexity', 'passkey'}
  ppl = results['perplexity']
  assert ppl['lengths'] == [64, 128, 256]
  assert 'longrope' in ppl['methods'] and ppl['methods']['longrope']['nll'][0] is None
  report = (tmp_path / 'report.md').read_text()
  assert '| method | 64 (1x) | 128 (2x) | 256 (4x) |' in report
  assert '## Passkey retrieval' in report
  assert f"Measured on: {console.describe_machine(results['machine'])}." in report
  # TensorBoard: every stage's scalars, read back without TensorFlow
  tb = {stage: metrics_lib.read_scalars(tmp_path / 'tb' / stage)
        for stage in ('pretrain', 'search', 'perplexity', 'passkey')}
  assert [s for s, _ in tb['pretrain']['val_bits_per_token']] == [10, 20]
  assert len(tb['search']['search/best_perplexity']) == results['search']['generations'] + 1
  assert [s for s, _ in tb['perplexity']['perplexity/longrope']] == [128, 256]
  assert [s for s, _ in tb['passkey']['passkey/none']] == results['passkey']['lengths']
  # The run says what ran: the attention implementations (the toy model's dense, which the
  # search keeps) and the run itself.
  dense = dict(requested='dense', ran='dense', reason=None)
  assert results['attention'] == dict(model=dense, search=dense)
  assert 'Attention: dense (model, search).' in report
  record = results['run']
  assert set(record) == {'date', 'commit', 'command', 'stage_seconds'}
  assert record['date'].endswith('+00:00') and record['command']
  assert record['commit'] is None or re.fullmatch(r'[0-9a-f]{40}(-dirty)?', record['commit'])
  assert list(record['stage_seconds']) == list(config.stages)
  # Everything is done: a second run recomputes nothing and gives the same results.
  mtime = (tmp_path / 'ckpt').stat().st_mtime
  pipeline.run(config, tmp_path)
  again = json.loads((tmp_path / 'results.json').read_text())
  assert again['perplexity'] == ppl
  for stage, seconds in record['stage_seconds'].items():  # accumulated over the two runs
    assert again['run']['stage_seconds'][stage] > seconds
  assert (tmp_path / 'ckpt').stat().st_mtime == mtime
  assert run.results()['pretrain']['steps'] == 20
  # A model that does not copy: the passkey stage says so and skips its sweep of zeros.
  config.passkey.skip_fraction = 0.5
  pipeline.run(config, tmp_path, stages=('passkey', 'report'))
  skipped = json.loads((tmp_path / 'results.json').read_text())['passkey']
  assert skipped['skipped'] and skipped['methods'] == {}
  assert skipped['answer_nll']['total'] > 0.5 * skipped['answer_nll']['guess']
  assert 'Skipped: the base model does not copy' in (tmp_path / 'report.md').read_text()
  # The copying diagnostic reads the same workdir.
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.copy_probe', '--config', 'configs/demo.py:test',
       '--workdir', str(tmp_path)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  digits = proc.stdout.split('per digit at 112 tokens: ')[1].split(' (')[0].split(', ')
  assert len(digits) == 5 and all(0 < float(x) < 20 for x in digits)
  assert 'repeated-string NLL by quarter' in proc.stdout


def test_unknown_stage_and_locked_config(tmp_path):
  config = demo_config.get_config('test')
  with pytest.raises(ValueError, match='unknown stages'):
    pipeline.run(config, tmp_path, stages=('pretrain', 'finetune_everything'))
  with pytest.raises(ValueError, match='unknown config argument'):
    demo_config.get_config('huge')
  # The entry point locks the config: a misspelled field fails loudly.
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config', 'configs/demo.py:test',
       '--workdir', str(tmp_path / 'x'), '--config.pretrain.stepz=3'],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'stepz' in proc.stderr
  assert not (tmp_path / 'x').exists()


def test_progressive_stages_on_the_toy_config(tmp_path):
  config = demo_config.get_config('test')
  stages = ('pretrain', 'search', 'evaluate', 'passkey', 'progressive', 'progressive_evaluate',
            'progressive_passkey', 'report')
  pipeline.run(config, tmp_path, stages=stages)
  results = json.loads((tmp_path / 'results.json').read_text())
  prog = results['progressive']
  L0 = 64
  assert prog['finetune_length'] == 4 * L0 and prog['target_length'] == 8 * L0
  import numpy as np
  first, second = (np.asarray(f) for f in prog['long']['stage_factors'])
  np.testing.assert_allclose(prog['long']['factors'], first * second, rtol=1e-5)
  assert prog['long']['scale'] == 8
  # The short factors up to L0 are the searched ones (lambda <= 1.25) unless the long ones
  # give a lower NLL at L0 on the same windows; the choice and both NLLs are recorded.
  at_l0 = prog['short_nll_at_l0']
  assert prog['short_source'] == ('searched' if at_l0['searched'] <= at_l0['long'] else 'long')
  searched = np.asarray(prog['short_searched']['factors'])
  assert np.all((searched >= 1.0) & (searched <= 1.25 + 1e-9))
  source = prog['short_searched'] if prog['short_source'] == 'searched' else prog['long']
  assert prog['short']['factors'] == source['factors']
  # one attention scale for short and long factors, as transformers' longrope applies
  assert prog['short_searched']['n_hat'] == 0
  assert prog['short']['attn_scale'] == prog['long']['attn_scale']
  ppl = results['progressive_perplexity']['methods']
  assert all(v is not None for v in ppl['longrope_progressive']['nll'])
  # Up to L0 the switch takes the short factors, beyond it the long ones.
  assert ppl['longrope_progressive']['nll'][1:] == ppl['longrope_progressive_no_short']['nll'][1:]
  report = (tmp_path / 'report.md').read_text()
  assert '## Progressive extension' in report
  base = results['perplexity']['methods']
  short_1x = ppl['longrope_progressive']['perplexity'][0]
  assert f"the base model {base['none']['perplexity'][0]:.3f}" in report
  assert f"short factors {short_1x:.3f}" in report
  best_4x = min(m['perplexity'][-1] for m in base.values() if m['perplexity'][-1] is not None)
  assert f"{best_4x:.3f} (" in report
  # Passkey retrieval of the fine-tuned model at passkey.multiples (2x) and the second search's
  # length (8x), next to the base rows (2x only) in one table and heat map.
  keys = results['progressive_passkey']
  assert keys['lengths'] == [2 * L0, 8 * L0] and list(keys['methods']) == ['longrope_progressive']
  accuracy = keys['methods']['longrope_progressive']['accuracy']
  assert [len(row) for row in accuracy] == [2, 2]
  assert all(0.0 <= a <= 1.0 for row in accuracy for a in row)
  assert '## Passkey retrieval after progressive extension' in report
  table = report.split('## Passkey retrieval after progressive extension')[1]
  assert '| 128 (2x) | 512 (8x) |' in table and '| yarn |' in table
  assert (tmp_path / 'plots' / 'progressive_passkey.png').stat().st_size > 0
  # Every output a stage owns (deleted when the stage is recomputed) is a file it wrote: a
  # misnamed cache survives a new fine-tune and reports the old model's numbers.
  for stage in stages:
    for output in stages_lib.STAGES[stage].outputs:
      assert list(tmp_path.glob(output)), (stage, output)
  # Resumes per cell: a second run computes nothing.
  cells = (tmp_path / 'eval' / 'progressive_passkey.jsonl').read_text()
  pipeline.run(config, tmp_path, stages=stages)
  assert (tmp_path / 'eval' / 'progressive_passkey.jsonl').read_text() == cells


@pytest.mark.slow
def test_ring_attention_from_the_command_line(tmp_path):
  """`experiments.run --config configs/demo.py:test --config.model.attention=ring
  --config.mesh.seq=4` on 8 simulated devices: pretraining shards each sequence over 'seq' (ring
  attention forward and backward), the search's fitness too (candidates over 'pop' = 2, the
  scanned layers' ring over 'seq' = 4), evaluation too; every number equals a blockwise run's
  within float tolerance. (tests/test_search.py compares the two fitnesses directly, fast.)"""
  blockwise, ring = tmp_path / 'blockwise', tmp_path / 'ring'
  for workdir, extra in ((blockwise, ['--config.model.attention=blockwise']),
                         (ring, ['--config.model.attention=ring', '--config.mesh.seq=4'])):
    proc = subprocess.run([sys.executable, '-m', 'experiments.run', '--config',
                           'configs/demo.py:test', *extra, '--workdir', str(workdir)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = (json.loads((w / 'results.json').read_text()) for w in (blockwise, ring))
  assert b['pretrain']['val_bits_per_token'] == pytest.approx(a['pretrain']['val_bits_per_token'],
                                                              rel=1e-4)
  assert (a['search']['attention'], a['search']['seq_devices']) == ('blockwise', 1)
  assert (b['search']['attention'], b['search']['seq_devices']) == ('ring', 4)
  assert b['search']['nll'] == pytest.approx(a['search']['nll'], abs=1e-4)
  assert b['search']['factors'] == a['search']['factors']
  for name, method in a['perplexity']['methods'].items():  # None (nan): longrope below L'
    np.testing.assert_allclose(np.array(b['perplexity']['methods'][name]['nll'], float),
                               np.array(method['nll'], float), rtol=1e-4, err_msg=name)


def test_empty_split_is_caught_before_the_first_stage(tmp_path):
  """A 'files' corpus whose five files all hash to train: the run stops before pretraining,
  naming the split, how files are split, the fix and the stages that read it."""
  folder = tmp_path / 'corpus'
  folder.mkdir()
  names = (f'book{i}.txt' for i in range(10_000))
  for name in [n for n in names if corpus.split_of(n) == 'train'][:5]:
    (folder / name).write_text('a long book\n' * 200)
  config = demo_config.get_config('test')
  config.data.update(source='files', path=str(folder))
  with pytest.raises(ValueError) as e:
    pipeline.run(config, tmp_path / 'run')
  message = str(e.value)
  assert message.startswith("the 'validation' split of the corpus (data.source = 'files', "
                            f"data.path = {folder}) is empty")
  assert 'md5 hash of its path' in message and 'train/, validation/ and test/ subfolders' in message
  assert message.endswith('Read by: pretrain, search (search.split).')
  assert list((tmp_path / 'run').iterdir()) == []  # nothing written


def test_unsupported_checkpoint_is_caught_before_the_first_stage(tmp_path):
  """configs/hf.py on a GPT-2 folder: its model_type and the supported ones, before anything."""
  folder = tmp_path / 'gpt2'
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps(dict(
      architectures=['GPT2LMHeadModel'], model_type='gpt2', n_embd=32, n_layer=1, n_head=2)))
  from configs import hf as hf_config
  config = hf_config.get_config()
  config.model.path = str(folder)
  with pytest.raises(ValueError, match=rf"^model.path = {folder}: Unsupported architecture "
                                       r"'GPT2LMHeadModel' \(model_type 'gpt2'\).*supported: "
                                       r"LlamaForCausalLM \(model_type 'llama'\)"):
    pipeline.run(config, tmp_path / 'run')
  assert list((tmp_path / 'run').iterdir()) == []
