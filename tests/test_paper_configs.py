"""The paper configs and configs/hf.py run every stage they list from the command line on tiny
local Hugging Face checkpoints (tests/hf_fixtures.py: SentencePiece-layout tokenizers, PG19-like
books prepared through the TFDS builder), with only path and size overrides; the run then
exports a folder that transformers loads."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip('tensorflow_datasets')
pytest.importorskip('transformers')

import hf_fixtures  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = ['--config.model.dtype=float32', '--config.model.attention=dense',
         '--config.search.multiple=2', '--config.search.num_windows=2',
         '--config.search.settings.population=4', '--config.search.settings.parents=2',
         '--config.search.settings.mutations=1', '--config.search.settings.crossovers=1',
         '--config.search.settings.generations=2', '--config.search.settings.doc_batch=2',
         '--config.evaluate.num_windows=2', '--config.evaluate.multiples=(1,2)',
         '--config.passkey.multiples=(1,2)', '--config.passkey.trials=1',
         '--config.passkey.depths=(0.5,)']


def _run(args, tmp_path):
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
  return proc


@pytest.mark.parametrize('config, kind, extra', [
    ('configs/llama2_7b.py', 'llama', ['--config.search.settings.search_n_hat=False']),
    pytest.param('configs/mistral_7b.py', 'mistral', ['--config.search.settings.search_n_hat=False'],
                 marks=pytest.mark.slow),
    pytest.param('configs/hf.py', 'phi3', [], marks=pytest.mark.slow),
])
def test_config_runs_every_stage_and_exports(hf_assets, tmp_path, config, kind, extra):
  ckpt = hf_assets.checkpoint(kind)
  name, data_dir = hf_assets.pg19()
  workdir = tmp_path / 'run'
  spec = f'{config}:{ckpt}' if 'hf.py' not in config else config
  args = ['experiments.run', '--config', spec, '--workdir', str(workdir), *SIZES, *extra,
          f'--config.data.data_dir={data_dir}',
          f'--config.model.original_length={hf_fixtures.ORIGINAL}']
  if 'hf.py' in config:
    args += [f'--config.model.path={ckpt}', '--config.data.source=tfds',
             f'--config.data.tfds_name={name}', "--config.stages=('search','evaluate','passkey','report')"]
  _run(args, tmp_path)
  results = json.loads((workdir / 'results.json').read_text())
  stages = json.loads((workdir / 'config.json').read_text())['stages']
  assert results['search']['target_length'] == 2 * hf_fixtures.ORIGINAL
  assert 'longrope' in results['perplexity']['methods']
  if 'passkey' in stages:  # a random checkpoint does not copy: the sweep is skipped, said why
    passkey = results['passkey']
    assert passkey.get('skipped') or set(passkey['methods']) >= {'none', 'longrope'}
    assert passkey['answer_nll']['total'] > 0
  assert (workdir / 'report.md').exists()

  out = tmp_path / 'exported'
  _run(['experiments.export', '--workdir', str(workdir), '--output', str(out),
        '--sliding_window=none'], tmp_path)
  rope_scaling = json.loads((out / 'config.json').read_text())['rope_scaling']
  assert rope_scaling['long_factor'] == pytest.approx(results['search']['factors'])
  assert rope_scaling['original_max_position_embeddings'] == hf_fixtures.ORIGINAL


@pytest.mark.parametrize('name', ['llama2_7b', 'mistral_7b'])
def test_progressive_recipe_searches_with_the_models_ring_attention(name):
  """The recipe's searches take the model's attention (ring over mesh.seq), not a fallback."""
  import importlib
  c = importlib.import_module(f'configs.{name}').get_config('/a/checkpoint,progressive')
  assert (c.model.attention, c.mesh.seq) == ('ring', 8)
  assert c.search.settings.attention is None and c.progressive.search.attention is None


@pytest.mark.slow
def test_llama2_progressive_recipe_on_eight_devices(hf_assets, tmp_path):
  """configs/llama2_7b.py:CKPT,progressive at tiny lengths on 8 simulated devices (conftest's
  XLA_FLAGS reach the subprocess): the searches on (pop 4, seq 2) with ring attention,
  fine-tuning with one sequence over 'seq' (ring attention), the second search on top of the
  first factors, short factors."""
  ckpt = hf_assets.checkpoint('llama')
  name, data_dir = hf_assets.pg19()
  workdir = tmp_path / 'run'
  sizes = [a for a in SIZES if 'multiples' not in a and 'attention' not in a]
  _run(['experiments.run', '--config', f'configs/llama2_7b.py:{ckpt},progressive', '--workdir',
        str(workdir), *sizes, f'--config.data.data_dir={data_dir}',
        f'--config.model.original_length={hf_fixtures.ORIGINAL}', '--config.mesh.seq=2',
        '--config.search.settings.search_n_hat=False', '--config.progressive.multiple=4',
        '--config.progressive.finetune.steps=2', '--config.progressive.finetune.warmup=1',
        '--config.progressive.short_num_windows=2',
        '--config.progressive.search.population=4', '--config.progressive.search.parents=2',
        '--config.progressive.search.mutations=1', '--config.progressive.search.crossovers=1',
        '--config.progressive.search.generations=1',
        '--config.progressive.search.search_n_hat=False',
        "--config.evaluate.multiples=(1,2,4)", "--config.passkey.multiples=(1,)"], tmp_path)
  results = json.loads((workdir / 'results.json').read_text())
  L0 = hf_fixtures.ORIGINAL
  prog = results['progressive']
  assert (prog['finetune_length'], prog['target_length']) == (2 * L0, 4 * L0)
  assert prog['short']['attn_scale'] == prog['long']['attn_scale']
  assert results['machine']['devices'] == 8
  assert 'longrope_progressive' in results['progressive_perplexity']['methods']
  # Every search of the recipe runs ring attention, each sequence over the 2 'seq' devices.
  for record in (results['search'], prog['long'], prog['short_searched']):
    assert (record['attention'], record['seq_devices']) == ('ring', 2)
