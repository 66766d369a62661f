"""The pipeline's stages, each declared once (`stage.Stage`: function, reads, outputs, results,
cells, header), grouped by what they do:

  pretrain.py     the base model at L0
  search.py       LongRoPE's search at search.multiple x L0
  evaluation.py   evaluate, passkey, evaluate_sliding (the base model, every method)
  progressive.py  progressive, progressive_evaluate, progressive_passkey
  baselines.py    seeds, finetuned, ablations (the reproduction variants)
  needles.py      niah (the RULER needle-in-a-haystack suite on the base model)
  longrope2.py    longrope2_search, longrope2_finetune, longrope2_evaluate (LongRoPE2's arms)
  export.py       export (the searched factors as an HF folder, checked in transformers)
  report.py       report.md from results.json
  run.py          `Run`: the config, the workdir, the data and model shared by the stages
  common.py       cached perplexity tables and fine-tuning, shared by several stages

`STAGES` lists them in run order, every stage after the stages it reads; `provenance.py` reads the
declarations, `pipeline.py` runs them.
"""

from longrope_jax.stages import (baselines, evaluation, export, longrope2, needles, pretrain,
                                 progressive, report, search)
from longrope_jax.stages.stage import Stage

STAGES: dict[str, Stage] = {s.name: s for s in (
    pretrain.PRETRAIN,
    search.SEARCH,
    evaluation.EVALUATE,
    evaluation.PASSKEY,
    needles.NIAH,
    progressive.PROGRESSIVE,
    progressive.PROGRESSIVE_EVALUATE,
    progressive.PROGRESSIVE_PASSKEY,
    evaluation.EVALUATE_SLIDING,
    baselines.SEEDS,
    baselines.FINETUNED,
    baselines.ABLATIONS,
    longrope2.LONGROPE2_SEARCH,
    longrope2.LONGROPE2_FINETUNE,
    longrope2.LONGROPE2_EVALUATE,
    export.EXPORT,
    report.REPORT,
)}
