"""The paper's search for Mistral-7B (v0.1, 8k window, 4k sliding window): LongRoPE factors for
8k -> 64k (8x, the extension the paper reaches without fine-tuning) on PG19 validation books, then
every method on PG19 test books at 8k-64k. For the paper's 128k Mistral, search at 16x
(--config.search.multiple=16) and fine-tune (progressive extension).

  python -m experiments.run --config configs/mistral_7b.py:/path/to/Mistral-7B-v0.1 \
      --workdir runs/mistral
  python -m experiments.search --config configs/mistral_7b.py:/path/to/Mistral-7B-v0.1 \
      --workdir runs/mistral --config.search.settings.strategy=CMA_ES
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the Hugging Face checkpoint folder (or set --config.model.path)."""
  # Trained at 8k (config.json says 32768).
  return common.paper_model_config(arg, variant='mistral_7b', multiple=8, doc_tokens=65536,
                                   original_length=8192)
