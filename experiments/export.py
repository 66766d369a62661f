"""Writes a Hugging Face folder from a finished run: its searched LongRoPE factors as a longrope
`rope_scaling` block (long_factor, short_factor, original_max_position_embeddings,
max_position_embeddings, attention_factor), the weights and the tokenizer files.

  python -m experiments.export --workdir runs/llama2 --output runs/llama2/hf
  python -m experiments.export --workdir runs/mistral --output runs/mistral/hf \
      --checkpoint /ckpt/Mistral-7B-v0.1 --sliding_window=none

The run's results.json decides what is exported: a 'progressive' record (long and short factors,
the fine-tuned weights of workdir/progressive), else the 'search' record (long factors, short
factors 1, the checkpoint's weights); --result=longrope2:<arm> exports a LongRoPE2 arm (its long
factors, short factors 1.0 as nnscaler's LLaMA3 config, the weights fine-tuned in
workdir/longrope2/finetune_<arm>). LongRoPE's n_hat has no HF field: a result with n_hat > 0
is refused unless --drop_n_hat.

Within L0 transformers applies the long factors' attention factor too (one attention_factor for
both sides), so the export is not the original model there; --plain_short writes the per-side
factors (short_mscale = 1) that vLLM reads (hf.export_longrope says more).

  python -m experiments.export --workdir runs/phi3 --output runs/phi3/hf_longrope2 \
      --result=longrope2:longrope2
"""

import json
import pathlib

from absl import app
from absl import flags

WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run (its results.json and config.json).')
OUTPUT = flags.DEFINE_string('output', None, 'The HF folder to write (new or empty).')
CHECKPOINT = flags.DEFINE_string('checkpoint', None, "The HF checkpoint folder the run started "
                                 "from (default: the run's config model.path).")
DROP_N_HAT = flags.DEFINE_bool('drop_n_hat', False, 'Export a result with n_hat > 0 without its '
                               'n_hat (transformers will then not reproduce its perplexity).')
SLIDING_WINDOW = flags.DEFINE_string('sliding_window', 'keep', "'keep' (the checkpoint's), "
                                     "'none' (no window) or a number of tokens.")
PLAIN_SHORT = flags.DEFINE_bool(
    'plain_short', False, 'Also write short_mscale = 1 and long_mscale = the attention factor: '
    "vLLM's longrope then runs plain RoPE (the original model) up to L0; "
    'transformers ignores both keys and applies attention_factor at every length. Only with '
    'short factors 1 (a search result, not a progressive one).')
RESULT = flags.DEFINE_string('result', 'auto', "What to export: 'auto' (the progressive record, "
                             "else the search's), 'search', 'progressive', or 'longrope2:<arm>' "
                             '(an arm of the longrope2_finetune stage).')
flags.mark_flags_as_required(['workdir', 'output'])


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a finished run.")
  return json.loads(path.read_text())


def main(argv):
  del argv
  from longrope_jax.hf import gguf as gguf_import
  from longrope_jax import hf
  from longrope_jax import train as train_lib
  workdir = pathlib.Path(WORKDIR.value)
  results = _read_json(workdir / 'results.json')
  checkpoint = CHECKPOINT.value or _read_json(workdir / 'config.json').get('model', {}).get('path')
  if not checkpoint:
    raise ValueError(f"the run in {workdir} has no model.path; pass --checkpoint (the HF folder "
                     "whose config.json and tokenizer files the export starts from).")
  checkpoint = gguf_import.resolve_model_path(checkpoint)  # 'gguf:...': its converted folder
  window = hf.parse_sliding_window(SLIDING_WINDOW.value)
  params = config = None
  which = RESULT.value
  if which == 'auto':
    which = 'progressive' if 'progressive' in results else 'search'
  if which.startswith('longrope2:'):
    arm = which.split(':', 1)[1]
    arms = results.get('longrope2_finetune', {})
    if arm not in arms:
      raise ValueError(f"{workdir / 'results.json'} has no longrope2_finetune arm {arm!r} "
                       f"(arms: {sorted(arms)}); run the longrope2_finetune stage with it.")
    record = arms[arm]
    long = dict(factors=record['factors'], n_hat=0, attn_scale=record['attn_scale'],
                original_length=record['original_length'], target_length=record['length'])
    short = None  # factors 1.0: LongRoPE2's short RoPE is the original one
    config = hf.model_config(hf.read_config(checkpoint))
    params = train_lib.load_params(config, workdir / 'longrope2' / f'finetune_{arm}')
    dtype = str(params['embed']['embedding'].dtype)
    config = config.replace(param_dtype=dtype, dtype=dtype)
  elif which == 'progressive' and 'progressive' in results:
    long, short = results['progressive']['long'], results['progressive']['short']
    config = hf.model_config(hf.read_config(checkpoint))
    params = train_lib.load_params(config, workdir / 'progressive')  # the fine-tuned weights
    dtype = str(params['embed']['embedding'].dtype)
    config = config.replace(param_dtype=dtype, dtype=dtype)
  elif which == 'search' and 'search' in results:
    long, short = results['search'], None
  elif which in ('search', 'progressive'):
    raise ValueError(f"{workdir / 'results.json'} has no {which!r} result: run that stage "
                     "first.")
  else:
    raise ValueError(f"--result={RESULT.value!r}: expected auto, search, progressive or "
                     "longrope2:<arm>.")
  out = hf.export_longrope(checkpoint, OUTPUT.value, long, short=short,
                           drop_n_hat=DROP_N_HAT.value, sliding_window=window, params=params,
                           config=config, plain_short=PLAIN_SHORT.value)
  print(f'wrote {out} (long factors for {long["target_length"]} tokens, original '
        f'{long["original_length"]}, attention factor {long["attn_scale"]:.6f})')


if __name__ == '__main__':
  app.run(main)
