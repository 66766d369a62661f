"""The report stage: report.md rewritten from results.json on every run."""

from __future__ import annotations

from longrope_jax import checkpoint as ckpt_lib
from longrope_jax import report as report_lib
from longrope_jax import report_longrope2
from longrope_jax.stages import export as export_stage
from longrope_jax.stages.run import Run
from longrope_jax.stages.stage import Stage


def report(run: Run) -> str:
  """Writes report.md from results.json."""
  mc = run.model_config
  model = (f'Model: `{run.config.model.variant}` ({mc.num_params():,} parameters, '
           f'{mc.num_layers} layers, dim {mc.dim}, head_dim {mc.head_dim}), training length '
           f'L0 = {mc.original_length} tokens; corpus `{run.config.data.source}`, tokenizer '
           f'`{run.config.data.tokenizer}`.')
  results = run.results()
  text = report_lib.render(results, model=model)
  if 'longrope2' in results:
    text = text.rstrip('\n') + '\n\n' + report_longrope2.render(results)
  if 'export' in results:
    text = (text.rstrip('\n') + '\n\n' +
            '\n'.join(export_stage.summary(results['export'], mc.original_length)))
  ckpt_lib.write_text(run.workdir / 'report.md', text)
  return text


def _header(run: Run) -> dict:
  return {'writes': [str(run.workdir / 'report.md'), str(run.workdir / 'plots')]}


# Rewritten from results.json on every run: nothing cached, so always kept.
REPORT = Stage('report', report, reads=(), outputs=('report.md',), header=_header)
