"""The paper's non-fine-tuned setting for LLaMA-2-7B: search LongRoPE factors for 4k -> 32k (8x)
on PG19 validation books, then compare every method on PG19 test books at 4k-32k.

Needs the weights (a local Hugging Face checkpoint folder, read by longrope_jax/hf/) and an
accelerator; the search evaluates a population of 64 candidates on 5 documents of 32k tokens per
generation.

  python -m experiments.run --config configs/llama2_7b.py:/path/to/Llama-2-7b-hf \
      --workdir runs/llama2
  python -m experiments.search --config configs/llama2_7b.py:/path/to/Llama-2-7b-hf \
      --workdir runs/llama2 --config.search.settings.strategy=CMA_ES

`:/path,progressive` is the progressive recipe: search 4k -> 128k, fine-tune at 128k (400 steps,
one 128k sequence over 8 devices with ring attention), search again for 256k on top of those
factors, short factors for 4k.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the Hugging Face checkpoint folder (or set --config.model.path)."""
  return common.paper_model_config(arg, variant='llama2_7b', multiple=8, doc_tokens=32768,
                                   progressive=(32, 64))
