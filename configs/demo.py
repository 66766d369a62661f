"""The embedded default: a byte-level Llama trained here on the standard library's source, then
extended 8x and beyond. Nothing is downloaded.

  python -m experiments.run --config configs/demo.py --workdir runs/demo
  python -m experiments.run --config configs/demo.py:test --workdir /tmp/demo_test   # seconds
  python -m experiments.run --config configs/demo.py:progressive --workdir runs/demo

Opt-in reproduction variants (combinable, `:seeds,finetuned`, and with `test`; each resumes):
  :seeds        the search repeated with search.num_seeds seeds on disjoint fitness documents
  :finetuned    PI, YaRN and LongRoPE each fine-tuned at 8x with one budget, evaluated 1x-32x
  :ablations    uniform PI / per-dim factors / + n_hat / best seed (LongRoPE Table 11)
  :sliding      the perplexity table again with windows sliding by evaluate.sliding_stride
  :retrieval    a base model that copies (L0 = 256 bytes, induction-rich pretraining), so that
                passkey retrieval is compared across methods from 1x to 16x (its own workdir);
                :retrieval,progressive adds the fine-tuned model's retrieval up to 32x
  :longrope2    LongRoPE2 (rcd search, needle objective, mixed context window fine-tuning)
                against LongRoPE, YaRN, YaRN-rcd, NTK-rcd and its ablations under one
                fine-tuning budget, the RULER NIAH suite, the claims table (with :retrieval)
  :perlength    LongRoPE searched at 2x, 4x, 8x and 16x on the same base model, each length
                evaluated with its own factors (LongRoPE Table 1): the row
                'longrope (searched per length)'; lengths without their own search (32x with
                :progressive or :finetuned) take the longest search's factors, a length between
                two searches the factors of the one above it

The per-length searches are a variant, not the default: they cost about 4.3 minutes more than
the demo's one 8x search on a quiet machine, not the 2 that would make them the default. One
generation (8 new candidates, population 16, 4 fitness documents, flash_cpu), timed paired and
interleaved on this 2-core CPU, costs 0.21x (2x), 0.49x (4x) and 3.0x (16x) the 8x one (the
attention at 4096 bytes dominates: not the 2x a linear cost would give); the 8x search takes
about 70 s when the machine is quiet, so the extra searches take about (0.21 + 0.49 + 3.0) x 70
= 260 s (even a 16x search at twice the 8x one would leave (0.21 + 0.49 + 2) x 70 = 189 s).
Measured whole on a busy machine (load 6-10): 18 s, 43 s, 132 s and 464 s for 2x, 4x, 8x and
16x (the stage: 11m 10s). Evaluation costs nothing more: the row replaces 'longrope'.

Any field can be overridden: --config.pretrain.steps=200 --config.search.settings.population=32
"""

import ml_collections

from configs import common
from longrope_jax import data

RETRIEVAL_STEPS = 3000  # pretraining steps of the :retrieval variant
PER_LENGTH_MULTIPLES = (2, 4, 8, 16)  # the :perlength variant's searched lengths


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: empty, `test` (every stage on a toy model in seconds) and/or any of `progressive`,
  `seeds`, `finetuned`, `ablations`, `sliding`, `retrieval`, `longrope2`."""
  a = common.parse_arg(arg, test=False, progressive=False, seeds=False, finetuned=False,
                       ablations=False, sliding=False, retrieval=False, perlength=False,
                       longrope2=False)
  c = common.base_config(('pretrain', 'search', 'evaluate', 'passkey', 'report'))
  # demo: L0 = 256 bytes. Attention is the fused CPU kernel (bench/forward.py: 1.2-1.4x
  # PyTorch's forward on this CPU); where it cannot be built it warns and runs blockwise.
  c.model = common.model_section('demo', attention='flash_cpu')
  c.data = common.data_section()
  # Rows of a repeated random string (induction data): 0 in the demo. At 0.2 the 800-step model
  # still did not copy (copy-row NLL 3.4-3.6 nats of ln 62 = 4.1 at step 500) and its held-out
  # bits per byte at step 400 rose from 2.66 to 3.02; worth it only with a longer budget.
  c.pretrain = common.pretrain_section(copy_fraction=0.0)
  # LongRoPE's search at 8x with a short budget (the paper's: population 64, 32 parents,
  # 16 + 16 children, 40 generations, 5 documents); fitness on validation documents only;
  # the attention kernel skips masked blocks.
  c.search = common.search_section(8, num_windows=4, population=16, parents=8, mutations=4,
                                   crossovers=4, generations=10, attention='flash_cpu')
  c.evaluate = common.evaluate_section(multiples=(1, 2, 4, 8, 16), num_windows=16)
  c.passkey = common.passkey_section()
  # Progressive extension (variant :progressive): fine-tune at the search length with the
  # searched factors, search again at 32 x L0, readjust short factors for L0.
  c.progressive = common.progressive_section(
      32, search_settings=dict(c.search.settings.items(), population=12, parents=6, mutations=3,
                               crossovers=3, generations=6))

  # Fine-tuned baselines (variant :finetuned): each of these fine-tuned at the search length
  # with progressive.finetune's budget, then evaluated from 1x to 32x.
  c.finetuned = common.finetuned_section()
  # The RULER NIAH suite (stage niah, and the arms of :longrope2): byte-level wording (a needle
  # is about 42 bytes, so three fit a 256-byte window with a question), 5-digit values as the
  # passkey's.
  c.niah = common.niah_section(format='short', digits=data.PASSKEY_DIGITS,
                               multiples=(1, 2, 4, 8, 16), methods=('none', 'yarn'))
  # LongRoPE2 against LongRoPE, YaRN, YaRN-rcd and NTK-rcd, and its ablations (variant
  # :longrope2, meant with :retrieval, a model that retrieves). Its choices:
  # - Arms: every one of longrope2_stages.ARMS. 'longrope2_plain' (LongRoPE2's factors, plain
  #   fine-tuning) isolates each claim: needle vs perplexity objective and rcd vs free search
  #   under the same (plain) fine-tuning, mixed vs plain fine-tuning for the same factors.
  # - The LongRoPE2 searches take the LongRoPE search's settings (population 16, 10
  #   generations), only the space changed: one search budget for every searched arm.
  # - Mixed context window: a step is all short or all long rows (the model takes one RoPE per
  #   call), 0.3 of the steps short, spread evenly (the paper's 3B of 10B tokens). The stdlib
  #   has 140 training files of at most 256 bytes (15 KB), so a short document is an L0-token
  #   crop as pretraining saw it (short_documents='crops', passkey and copy samples included).
  # - Short RoPE at L <= L0: the original one (factors 1, no attention scale) for every arm.
  # - Budget, :retrieval,longrope2 on top of the pretrained base model: each of the 8 arms
  #   64 steps x 4 rows x 2048 tokens (524K tokens, a third of progressive.finetune's 200 steps).
  #   Pieces measured first on the 2-core CPU at load 8 (shared): a long step 4.5 s, a short one
  #   2.8 s, a search generation of 8 candidates 16 s, a NIAH cell at 4096 tokens 33 s (hence
  #   the skip rule: the retrieval model scores 0.0 on every NIAH wording at L0). At the 2.4x
  #   slowdown that load gave pretraining (1.49 against 0.62 s a step), quiet: 8 x 64 x 1.8 s =
  #   15 min of fine-tuning, 3 searches x (16 + 10 x 8) candidates x 0.8 s = 4 min, evaluation
  #   of 9 rows (16 documents, 5 lengths; 3 depths x 6 passkey prompts) about 4 min, beside
  #   :retrieval's own search, evaluate and passkey (about 8 min). The whole variant then ran in
  #   53 min at load 5-9 (search 3.3, evaluate 1.9, passkey 13.4, niah 0.2, longrope2_search
  #   10.1, longrope2_finetune 18.8, longrope2_evaluate 5.3 min; the last 3.4 min when quiet).
  #   Quiet, with pretraining from scratch (docs/longrope2/): 27.2 min, 11.6 of them after the
  #   15.6 min of pretraining (longrope2_search 1.8, longrope2_finetune 6.2, evaluate 1.5 min).
  c.longrope2 = common.longrope2_section(needle_format='short', finetune=dict(
      steps=64, batch_size=4, lr=1e-3, warmup=6, ckpt_every=16, passkey_fraction=0.1))
  c.niah.trials = 6

  stages = ['pretrain', 'search', 'evaluate', 'passkey']
  if a.sliding:
    stages.append('evaluate_sliding')
  if a.seeds:
    stages.append('seeds')
  if a.ablations:
    stages.append('ablations')
  if a.progressive:  # with passkey retrieval of the fine-tuned model (skipped with the base's)
    stages += ['progressive', 'progressive_evaluate', 'progressive_passkey']
  if a.finetuned:
    stages.append('finetuned')
  if a.longrope2:
    stages += ['niah', 'longrope2_search', 'longrope2_finetune', 'longrope2_evaluate']
  if a.progressive or a.finetuned:  # one set of documents, as long as 32x, for every table
    c.evaluate.multiples = (1, 2, 4, 8, 16, 32)
  if a.retrieval:
    # Induction heads do not form within the demo's budget (the README's passkey section). With
    # half the rows passkey prompts and 40% repeated random strings at L0 = 128 bytes, the demo
    # model copied the key's first digit by step 500 but stayed at the bag-of-digits plateau for
    # the rest (1.2 nats per digit at step 2600); four heads with their own keys and values
    # (model 'retrieval') copied all five (answer NLL 0.75 nats in all at step 1250). Its L0 is
    # 256: at 128 the passkey rows had no room for filler, and that model retrieved at L0 (1.00)
    # but at no longer length with any method.
    c.model.variant = 'retrieval'
    c.pretrain.update(steps=RETRIEVAL_STEPS, passkey_fraction=0.5, copy_fraction=0.4)
    # Fine-tuning (:retrieval,progressive) keeps pretraining's mixture: with the demo's (10%
    # passkey rows, no copy rows) the fine-tuned model lost retrieval even at L0 (0.08).
    c.progressive.finetune.update(passkey_fraction=0.5, copy_fraction=0.4)
    c.passkey.update(multiples=(1, 2, 4, 8, 16))
    # :retrieval,longrope2: the model retrieves in the passkey wording only (NIAH in the 'short'
    # and any other wording tried: 0.0 at L0, so the niah stage skips those tasks), so the needle
    # objective's documents use it, and fine-tuning keeps pretraining's mixture as above.
    c.longrope2.update(needle_format='passkey')
    c.longrope2.finetune.update(passkey_fraction=0.5, copy_fraction=0.4)
  c.stages = tuple(stages + ['report'])
  if a.perlength:  # LongRoPE searched at each evaluated length beyond L0 (LongRoPE Table 1)
    c.search.multiples = PER_LENGTH_MULTIPLES

  if a.test:  # a seconds-long run of every stage, for tests and smoke checks
    c.model.variant = 'test'
    c.model.attention = 'dense'
    c.pretrain.update(steps=20, batch_size=4, warmup=5, eval_every=10, ckpt_every=10,
                      eval_windows=4, passkey_fraction=0.0)
    c.evaluate.update(multiples=(1, 2, 4), num_windows=2, sliding_stride=32)
    c.finetuned.update(multiples=(1, 2, 4, 8))
    # The test model's 64-token window is too short for a passkey prompt.
    c.passkey.update(multiples=(2,), depths=(0.0, 1.0), trials=2, skip_fraction=None)
    c.search.update(multiple=4, num_windows=2)
    if a.perlength:
      c.search.multiples = (2, 4)
    # dense: shorter than one attention block
    c.search.settings.update(population=8, parents=4, mutations=2, crossovers=2, generations=3,
                             attention=None)
    c.progressive.update(multiple=8, short_num_windows=2)
    c.progressive.finetune.update(steps=4, batch_size=2, warmup=1, ckpt_every=2)
    c.progressive.search.update(population=4, parents=2, mutations=1, crossovers=1,
                                generations=2)
    # One arm of each kind: mixed, plain, a method re-based on d_rcd.
    c.longrope2.update(arms=('longrope2', 'longrope2_plain', 'yarn_rcd'), multiples=(1, 2, 4))
    c.longrope2.finetune.update(steps=4, batch_size=2, warmup=1, ckpt_every=2,
                                passkey_fraction=0.0, short_fraction=0.5)
    c.niah.update(multiples=(2, 4), methods=('none',), depths=(0.0, 1.0), trials=2)
  return c
