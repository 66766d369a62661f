"""The generated docs (longrope_jax/docs.py, experiments/docs.py): the committed pages equal what
the generator writes, the run and bench sections from small fixtures, --check, and every
relative link of the README and docs/ resolves."""

import json
import pathlib

import numpy as np
import pytest

from experiments import docs as docs_main
from longrope_jax import docs
from longrope_jax import report as report_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Links to pages that other work adds; allowed to be missing until it lands (then checked).
PENDING = set()
MACHINE = dict(cpu='Test CPU', cores=2, platform='cpu', accelerator=None, devices=1, processes=1,
               jax='0.10.2', jaxlib='0.10.2', flax='0.12.8', python='3.11.7',
               system='Linux x86_64')


def test_committed_pages_are_what_the_generator_writes():
  stale = docs.stale(REPO)
  assert not stale, (f'{stale} differ from what the generator writes from the committed '
                     'artifacts: run `python -m experiments.docs` and commit the result.')


def _perplexity() -> dict:
  rng = np.random.default_rng(0)
  base = rng.normal(2.0, 0.3, size=12)
  per_doc = {'none': [base, base + 1.0], 'yarn': [base, base + 0.2],
             'longrope': [None, base + 0.1 + rng.normal(0, 0.01, 12)]}
  methods = {}
  for name, columns in per_doc.items():
    nll = [None if c is None else float(np.mean(c)) for c in columns]
    methods[name] = dict(nll=nll, nll_per_document=[None if c is None else c.tolist()
                                                    for c in columns],
                         perplexity=[None if v is None else float(np.exp(v)) for v in nll])
  return dict(lengths=[64, 128], original_length=64, num_windows=12, split='test',
              methods=methods)


def _results(run: dict | None) -> dict:
  results = dict(machine=MACHINE, perplexity=_perplexity(),
                 pretrain=dict(steps=20, params=1000, tokens=5120, seconds=3.0,
                               val_bits_per_token=4.25),
                 search=dict(strategy='paper_ga', evaluations=32, target_length=128,
                             perplexity=6.5, seeds={'yarn': dict(perplexity=7.0),
                                                    'linear': dict(perplexity=9.0)}),
                 passkey=dict(skipped=True))
  if run is not None:
    results['run'] = run
  return results


def _write_run(folder: pathlib.Path, results: dict | None, report: str = '# report\n'):
  folder.mkdir(parents=True)
  if results is not None:
    (folder / 'results.json').write_text(json.dumps(results))
  (folder / 'report.md').write_text(report)


def test_results_page_from_fixture_runs(tmp_path):
  run = {'date': '2026-12-04T16:43:00Z', 'commit': '0123456789ab-dirty',
         'command': 'python -m experiments.run --config configs/demo.py:test --workdir /tmp/t',
         'stage_seconds': {'pretrain': 90.0, 'search': 150.0, 'report': 0.5}}
  _write_run(tmp_path / 'a_full', _results(run))
  _write_run(tmp_path / 'b_no_run', _results(None))
  _write_run(tmp_path / 'c_report_only', None, report='\n'.join([
      '# longrope-jax run report', '', 'Measured on: Old CPU, 2 cores, cpu, jax 0.10.2.', '',
      '## Pretraining', '', '800 steps; validation bits per token at L0: **2.239**.', '',
      '![pretraining](pretrain.png)', '', '## Perplexity vs length (held-out)', '',
      'Caption.', '', '| method | 256 (1x) |', '|---|---|', '| none | 5.003 |', '',
      '![perplexity](perplexity.png)', '', '## Search', '', '| x |']) + '\n')
  (tmp_path / 'no_run_here').mkdir()  # neither results.json nor report.md: not a run
  page = docs.results_page(tmp_path)
  sections = page.split('\n## ')
  assert [s.split('\n')[0] for s in sections[1:]] == ['a_full', 'b_no_run', 'c_report_only']
  full, no_run, report_only = sections[1:]
  assert ('- Date: 2026-12-04T16:43:00Z\n'
          '- Machine: Test CPU, 2 cores, cpu, jax 0.10.2\n'
          '- Commit: `0123456789ab-dirty`\n'
          '- Command: `python -m experiments.run --config configs/demo.py:test --workdir '
          '/tmp/t`\n'
          '- Stage times: pretrain 90 s, search 2.5 min, report 0 s (total 4.0 min)\n') in full
  assert 'Full report: [report.md](a_full/report.md).' in full
  perplexity = _results(None)['perplexity']
  assert report_lib.markdown_table(perplexity) in full
  assert report_lib.comparison_table(report_lib.paired_comparison(perplexity, 'longrope')) in full
  assert ('Search: `paper_ga`, 32 candidates at 128 tokens; validation perplexity 6.5000 '
          'against its best seed (yarn) 7.0000.') in full
  assert 'Pretraining: 20 steps, 5,120 tokens; validation bits per token at L0 4.250.' in full
  assert 'Passkey retrieval: skipped' in full
  # A results.json without `run`: the facts say so; the tables are there all the same.
  assert ('- Date: not recorded\n- Machine: Test CPU, 2 cores, cpu, jax 0.10.2\n'
          '- Commit: not recorded\n- Command: not recorded\n- Stage times: not recorded\n'
          ) in no_run
  assert report_lib.markdown_table(perplexity) in no_run
  # Only a report.md: its machine line, pretraining paragraph and perplexity table, verbatim.
  assert 'date, commit, command and stage times are not recorded' in report_only
  assert '- Machine (from the report): Old CPU, 2 cores, cpu, jax 0.10.2.' in report_only
  assert ('Pretraining, quoted from the report:\n\n800 steps; validation bits per token at L0: '
          '**2.239**.\n') in report_only
  assert ('Perplexity vs length (held-out), quoted from the report:\n\n| method | 256 (1x) |\n'
          '|---|---|\n| none | 5.003 |\n') in report_only
  assert '| x |' not in report_only and 'Caption.' not in report_only


def _ratio(values: list[float]) -> dict:
  return dict(min=min(values), median=float(np.median(values)), max=max(values), all=values)


def _bench_root(tmp_path: pathlib.Path) -> pathlib.Path:
  """A repository with bench/forward.py, a forward JSON, a memory JSON without a command, a plan
  and its .md, and a JSON from a script no renderer knows."""
  bench, results = tmp_path / 'bench', tmp_path / 'bench' / 'results'
  results.mkdir(parents=True)
  (bench / 'forward.py').write_text('"""Forward of one sequence against torch.\n\nMore."""\n')
  (bench / 'memory.py').write_text('"""Peak memory.\n"""\n')
  facts = dict(cpu='Test CPU', cpu_count=4, usable_cores=2, platform='Linux',
               versions=dict(jax='0.10.2', torch='2.13.0'), torch_threads=2)
  row = dict(length=2048, seconds_median=dict(torch=0.07, flash_cpu=0.05),
             ratio_torch_over_ours=dict(flash_cpu=_ratio([1.2, 1.3, 1.5])),
             mfu=dict(torch=dict(vs_torch_peak=0.45, vs_jax_peak=0.6),
                      flash_cpu=dict(vs_torch_peak=0.58, vs_jax_peak=0.78)),
             max_abs_logits_diff_vs_torch=dict(flash_cpu=1.3e-5))
  (results / 'forward_x.json').write_text(json.dumps(dict(
      command=['/venv/bin/python', 'bench/forward.py', '--shapes', 'demo'], machine=facts,
      date='2026-12-01T05:42:00Z', load_average_start=[0.43, 1, 1], load_average_end=[1.68, 1, 1],
      busy=True, malloc='tuned', wall_seconds=117.0, matmul_peak_flops=dict(jax=182e9, torch=243e9),
      rows=[row])))
  (results / 'memory.json').write_text(json.dumps(dict(
      machine=dict(platform='Linux', cpus=2, python='3.11.7'), load_average_start=[0.25, 1, 1],
      load_average_end=[1.78, 1, 1], commit='abc', runs=[dict(
          name='forward_64k', tree='after', remat='none', length=65536,
          measured_peak_bytes=300 * 2 ** 20, planned_bytes=200 * 2 ** 20)])))
  (results / 'odd.json').write_text(json.dumps(dict(command=['python', 'bench/odd.py'])))
  (results / 'forward_other_mode.json').write_text(json.dumps(dict(
      command=['python', 'bench/forward.py', '--label', 'a b'], machine=facts, parts=['x'])))
  plan = dict(variant='llama2_7b', kind='train', length=32768, batch=8, mesh=dict(fsdp=8),
              model_flops=2e15, step_s=5.0, peak_bytes=int(77.9 * 2 ** 30))
  (results / 'plan_x.json').write_text(json.dumps([plan, dict(plan, mesh=dict(fsdp=4, seq=2),
                                                              peak_bytes=int(58.6 * 2 ** 30))]))
  (results / 'plan_x.md').write_text('# Plan\n\npython -m experiments.plan --out '
                                     'bench/results/plan_x.json\n')
  return tmp_path


def test_benchmarks_page_from_fixture_results(tmp_path):
  page = docs.benchmarks_page(_bench_root(tmp_path))
  sections = {s.split('\n')[0]: s for s in page.split('\n## ')[1:]}
  assert list(sections) == ['forward_other_mode', 'forward_x', 'memory', 'odd',
                            "Plans of the paper's shapes"]
  other = sections['forward_other_mode']
  assert "- Command: `python bench/forward.py --label 'a b'`" in other
  assert "its layout lacks 'rows', which the renderer of forward.py" in other
  forward = sections['forward_x']
  assert '`bench/forward.py`: Forward of one sequence against torch.' in forward
  assert ('- Command: `python bench/forward.py --shapes demo`\n'
          '- Machine: Test CPU, 2 cores, Linux, jax 0.10.2, torch 2.13.0\n'
          '- Date: 2026-12-01T05:42:00Z\n'
          '- Load average (1 min) before / after: 0.43 / 1.68 (**busy**: over `--max-load`, '
          'written with `--force`)\n'
          '- Threads: torch 2, jax all 2 usable cores\n') in forward
  assert '| length | torch ms | flash_cpu |\n|---|---|---|\n| 2048 | 70.0 | 1.30 [1.20-1.50] |' \
      in forward
  assert ('| length | torch | flash_cpu |\n|---|---|---|\n| 2048 | 45% (60%) | 58% (78%) |'
          in forward)
  assert "Max |logits - torch's| at 2048: flash_cpu 1.3e-05." in forward
  memory = sections['memory']
  assert '- Command: not recorded (the script: `python bench/memory.py`)' in memory
  assert '- Date: not recorded\n- Commit: `abc`\n' in memory
  assert '- Threads: not recorded' in memory
  assert '| forward_64k | after | none | 65,536 | 300 | 200 | 1.50 |' in memory
  assert 'The script that wrote it is not in bench/.' in sections['odd']
  assert 'No table for `odd.json` here' in sections['odd']
  plans = sections["Plans of the paper's shapes"]
  assert '- Command: `python -m experiments.plan --out bench/results/plan_x.json`' in plans
  assert '400 TFLOP/s per device' in plans
  assert ('| model | step | length | fsdp 8 | fsdp 4 x seq 2 |\n|---|---|---|---|---|\n'
          '| llama2_7b | train | 32,768 | 77.9 | 58.6 |') in plans
  assert '[plan_x.md](../bench/results/plan_x.md)' in plans


def test_check_lists_stale_pages_and_writes_nothing(tmp_path, capsys):
  root = _bench_root(tmp_path)
  _write_run(root / 'docs' / 'run', _results(None))
  assert docs_main.main(['--check', '--root', str(root)]) == 1
  assert capsys.readouterr().out.split() == ['stale:', 'docs/results.md', 'stale:',
                                             'docs/benchmarks.md', 'stale:', 'docs/config.md']
  assert not (root / 'docs' / 'results.md').exists()
  assert docs_main.main(['--root', str(root)]) == 0
  assert docs_main.main(['--check', '--root', str(root)]) == 0
  # A changed artifact makes its page stale again, and only that page.
  (root / 'docs' / 'run' / 'results.json').write_text(json.dumps(_results(None) | {'passkey': {
      'skipped': False, 'lengths': [64], 'original_length': 64, 'trials': 1, 'depths': [0.5],
      'methods': {'none': {'accuracy': [1.0], 'mean': [1.0]}}}}))
  assert docs.stale(root) == ['docs/results.md']


def test_a_damaged_artifact_is_named(tmp_path):
  root = _bench_root(tmp_path)
  (root / 'bench' / 'results' / 'memory.json').write_text('{"cut')
  with pytest.raises(ValueError, match='memory.json is not valid JSON'):
    docs.generate(root)


def _markdown_files() -> list[pathlib.Path]:
  return [REPO / 'README.md', *sorted((REPO / 'docs').rglob('*.md')),
          *sorted((REPO / 'bench' / 'results').glob('*.md'))]


def test_relative_links_of_readme_and_docs_resolve():
  broken = {}
  for path in _markdown_files():
    missing = [t for t in docs.broken_links(path)
               if (path.parent / t.partition('#')[0]).resolve().relative_to(REPO).as_posix()
               not in PENDING]
    if missing:
      broken[path.relative_to(REPO).as_posix()] = missing
  assert not broken, f'links to files that do not exist: {broken}'


def test_broken_links_finds_missing_files_and_anchors_but_not_urls(tmp_path):
  (tmp_path / 'there.png').write_bytes(b'')
  (tmp_path / 'other.md').write_text("# Title\n\n## The paper's shapes\n\n```\n# not a heading\n```\n")
  page = tmp_path / 'page.md'
  page.write_text('# Page\n\n![a](there.png) ![b](gone.png) [c](missing.md#part) [d](#page) '
                  "[e](https://example.org/x.md) [f](other.md#the-papers-shapes) [g](#nowhere) "
                  '[h](other.md#not-a-heading)\n')
  assert docs.relative_links(page) == ['there.png', 'gone.png', 'missing.md#part', '#page',
                                       'other.md#the-papers-shapes', '#nowhere',
                                       'other.md#not-a-heading']
  assert docs.broken_links(page) == ['gone.png', 'missing.md#part', '#nowhere',
                                     'other.md#not-a-heading']


def test_readme_tables_are_quoted_from_the_documented_reports():
  demo = (REPO / 'docs' / 'demo' / 'report.md').read_text().splitlines()
  reports = {line for path in (REPO / 'docs').glob('*/report.md')
             for line in path.read_text().splitlines()}
  rows = [line for line in (REPO / 'README.md').read_text().splitlines() if line.startswith('|')]
  assert rows and rows[0] in demo, "the README's first table is the demo's headline table"
  assert [row for row in rows if row not in reports] == [], (
      "the README's table rows must be quoted verbatim from a documented run's report "
      "(docs/<run>/report.md)")


def test_accelerator_bench_and_pod_plan_render(tmp_path):
  """bench/accelerator.py's JSON: a table per part, tokens/s with MFU vs the peak and the
  measured matmul, statuses for cells that did not run; experiments.plan --pod's JSON: the
  recommended meshes and the model check, in the plans section."""
  bench, results = tmp_path / 'bench', tmp_path / 'bench' / 'results'
  results.mkdir(parents=True)
  (bench / 'accelerator.py').write_text('"""Tokens/s on an accelerator.\n"""\n')
  ok = dict(part='forward', shape='1b', length=8192, impl='cudnn', status='ok',
            tokens_per_s=250000.0, mfu_vs_peak=0.412, mfu_vs_matmul=0.52)
  rows = [ok, dict(ok, impl='torch_sdpa', tokens_per_s=200000.0, mfu_vs_peak=0.33,
                   mfu_vs_matmul=0.41),
          dict(part='forward', shape='1b', length=8192, impl='auto', status='same as cudnn'),
          dict(ok, length=131072, status='oom'),
          dict(ok, part='train', status='skipped: budget (estimate 40 s, 10 s left)')]
  (results / 'accelerator_h200.json').write_text(json.dumps(dict(
      command=['python3', 'bench/accelerator.py', '--out-dir', '/out'],
      machine=dict(cpu='Host', usable_cores=16, platform='Linux',
                   versions=dict(jax='0.11.2', torch='2.11.0')),
      device_kind='NVIDIA H200', backend='gpu', peak_tflops=989.0, peak_source='datasheet',
      matmul=dict(n=8192, jax_tflops=781.23, torch_tflops=790.0),
      torch=dict(torch='2.11.0', transformers='5.17.0', flash_forced=True),
      shapes={'1b': dict(params=853_000_000)}, rows=rows)))
  pod = dict(format='pod_plan', command='python -m experiments.plan --pod --out x', max_devices=1024,
             xla_flags='--xla_disable_hlo_passes=while-loop-invariant-code-motion', remat='full',
             block=2048, mfu=0.4, usable=0.9,
             checks=[dict(variant='llama2_7b', workload='fit point', mesh=dict(seq=8),
                          error_pct=0.1),
                     dict(variant='llama2_7b', workload='search_2048k', mesh=dict(seq=64),
                          error_pct=-2.345)],
             recommendations=[dict(variant='llama2_7b', workload='search_2048k',
                                   memory_class='TPU v5e 16 GiB', mesh=dict(seq=128), devices=128,
                                   predicted_peak_gib=14.0, compiled_peak_gib=13.6, step_s=12.5),
                              dict(variant='llama2_7b', workload='finetune_256k',
                                   memory_class='TPU v5e 16 GiB', mesh=None,
                                   predicted_peak_gib=20.0, compiled_peak_gib=None)])
  (results / 'plan_2048k.json').write_text(json.dumps(pod))
  page = docs.benchmarks_page(tmp_path)
  sections = {s.split('\n')[0]: s for s in page.split('\n## ')[1:]}
  assert list(sections) == ['accelerator_h200', "Plans of the paper's shapes"]
  acc = sections['accelerator_h200']
  assert '`bench/accelerator.py`: Tokens/s on an accelerator.' in acc
  assert ('MFU against 989.0 TFLOP/s (datasheet) and against the bf16 8192^3 matmul measured in '
          'the same run: jnp.dot 781 TFLOP/s, torch.matmul 790.') in acc
  assert 'SDPA flash backend forced' in acc and '`1b` 853.0M parameters' in acc
  assert ('| shape | length | cudnn | torch_sdpa | auto |\n|---|---|---|---|---|\n'
          '| 1b | 8,192 | 250,000 (41%, 52% of matmul) | 200,000 (33%, 41% of matmul) | '
          'same as cudnn |\n| 1b | 131,072 | oom |  |  |') in acc
  assert '| 1b | 8,192 | skipped, budget |' in acc
  plans = sections["Plans of the paper's shapes"]
  assert '- Command: `python -m experiments.plan --pod --out x`' in plans
  assert 'against the 1 pod-scale compiles: largest error -2.3% (llama2_7b search_2048k, seq 64)' \
      in plans
  assert '| llama2_7b | search_2048k | TPU v5e 16 GiB | seq 128 | 128 | 13.6 | 12.50 | - |' in plans
  assert ('| llama2_7b | finetune_256k | TPU v5e 16 GiB | does not fit up to 1024 devices | - | '
          '20.0 (model) | - | - |') in plans
