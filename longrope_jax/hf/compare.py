"""A checkpoint folder as transformers runs it: per-window perplexity, and an export's relative
difference from its source at a length (extra `compare`: torch and transformers).

  hf.relative_difference('/ckpt/SmolLM2', 'runs/smollm2/hf', windows_NL)   # windows [N, L]

`relative_difference` is what a user of the exported folder sees at L: at L <= L0 a longrope
export differs from the original by its attention factor (`export_longrope`'s plain_short), at
L > L0 by the searched scaling.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from longrope_jax.hf.config import Path


def _transformers():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError("running a checkpoint in transformers needs the `compare` extra: "
                      "pip install -e '.[compare]'") from e
  return torch, transformers


def transformers_nll(folder: Path, windows_NL: np.ndarray, *, dtype: str = 'float32',
                     attention: str = 'eager') -> np.ndarray:
  """Mean next-token NLL (nats) of each window i32[N, L] as transformers computes it for the
  checkpoint in `folder` (AutoModelForCausalLM, one window per forward: transformers' longrope
  picks short or long factors by the sequence length): f64[N]."""
  torch, transformers = _transformers()
  windows_NL = np.asarray(windows_NL)
  if windows_NL.ndim != 2 or windows_NL.shape[1] < 2:
    raise ValueError(f"windows_NL must be [N, L] token ids with L >= 2, got shape "
                     f"{windows_NL.shape}.")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(folder), attn_implementation=attention, dtype=getattr(torch, dtype)).eval()
  nll = []
  with torch.no_grad():
    for row in windows_NL:
      tokens = torch.tensor(row[None], dtype=torch.long)
      nll.append(float(model(tokens, labels=tokens).loss))
  return np.asarray(nll, np.float64)


def relative_difference(original: Path, exported: Path, windows_NL: np.ndarray,
                        **kwargs: Any) -> dict:
  """transformers' perplexity of the `exported` folder against the `original` one on the same
  windows i32[N, L]: {'length', 'windows', 'original', 'exported', 'relative'} with relative =
  exported / original - 1 (perplexity of the mean NLL over windows). `kwargs` go to
  `transformers_nll` (dtype, attention)."""
  before = transformers_nll(original, windows_NL, **kwargs)
  after = transformers_nll(exported, windows_NL, **kwargs)
  ppl_before, ppl_after = math.exp(before.mean()), math.exp(after.mean())
  return dict(length=int(np.shape(windows_NL)[1]), windows=int(np.shape(windows_NL)[0]),
              original=ppl_before, exported=ppl_after, relative=ppl_after / ppl_before - 1)
