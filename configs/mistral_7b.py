"""The paper's search for Mistral-7B (v0.1): LongRoPE factors for 4k -> 32k (8x) on PG19 validation
books, then every method on PG19 test books at 4k-32k.

Mistral v0.1 attends through a 4k sliding window. As the official LongRoPE scripts do, the
original window L0 is that 4k window and the sliding window is switched off for the extension
(`model.sliding_window='none'`; they raise it past the target), so attention spans the whole
extended context. Export such a run with `--sliding_window=none` too.

  python -m experiments.run --config configs/mistral_7b.py:/path/to/Mistral-7B-v0.1 \
      --workdir runs/mistral
  python -m experiments.search --config configs/mistral_7b.py:/path/to/Mistral-7B-v0.1 \
      --workdir runs/mistral --config.search.settings.strategy=CMA_ES

`:/path,progressive`: search 4k -> 64k, fine-tune at 64k, search again for 128k on top of those
factors (the paper's 128k Mistral), short factors for 4k.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the Hugging Face checkpoint folder (or set --config.model.path)."""
  return common.paper_model_config(arg, variant='mistral_7b', multiple=8, doc_tokens=32768,
                                   original_length=4096, sliding_window='none',
                                   progressive=(16, 32))
