"""LongRoPE search (and evaluation) on any local Hugging Face Llama-family checkpoint
(LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM), read by longrope_jax/hf/.

  python -m experiments.search --config configs/hf.py --config.model.path=/path/to/ckpt \
      --workdir runs/my_model
  python -m experiments.run --config configs/hf.py:paper --config.model.path=DIR --workdir DIR2

The default corpus is the standard library's source tokenized with the checkpoint's
tokenizer.json (nothing to download); point data.source/data.path at your own text files, or at
a TFDS dataset prepared as array_record. `:paper` uses the paper's search budget.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: empty or `paper` (the paper's search budget)."""
  a = common.parse_arg(arg, paper=False)
  c = common.base_config(('search', 'evaluate', 'report'))
  # The checkpoint's config.json decides the shape; bf16 compute, params as stored.
  c.model = common.model_section('hf', dtype='bfloat16')
  c.data = common.data_section(tokenizer='auto')
  # n_hat fixed at 0: transformers' longrope has no field for it, and these runs are meant to be
  # exported (python -m experiments.export).
  c.search = common.search_section(8, num_windows=5, population=32, parents=16, mutations=8,
                                   crossovers=8, generations=10, memory_gb=8.0,
                                   search_n_hat=False, n_hat=0)
  c.evaluate = common.evaluate_section(num_windows=8, batch_tokens=32768)
  c.passkey = common.passkey_section()   # add 'passkey' to stages to run it
  if a.paper:
    c.search.settings.update(population=64, parents=32, mutations=16, crossovers=16,
                             generations=40)
  return c
