"""The paper's non-fine-tuned setting for LLaMA-2-7B: search LongRoPE factors for 4k -> 32k (8x)
on PG19 validation books, then compare every method on PG19 test books at 8k, 16k and 32k.

Needs the weights (a local Hugging Face checkpoint folder, read by longrope_jax/hf.py) and an
accelerator; the search evaluates a population of 64 candidates on 5 documents of 32k tokens per
generation.

  python -m experiments.run --config configs/llama2_7b.py:/path/to/Llama-2-7b-hf \
      --workdir runs/llama2
  python -m experiments.search --config configs/llama2_7b.py:/path/to/Llama-2-7b-hf \
      --workdir runs/llama2 --config.search.strategy=CMA_ES
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the Hugging Face checkpoint folder (or set --config.model.path)."""
  path = arg or ''
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('search', 'evaluate', 'report')

  c.model = ml_collections.ConfigDict()
  c.model.path = path               # HF checkpoint folder (read by hf.py); required
  c.model.variant = 'llama2_7b'     # shape reference; with a path, config.json decides
  c.model.original_length = 0       # 0: config.json's window (4096)
  c.model.param_dtype = ''          # '': as stored (bf16 stays bf16)
  c.model.attention = 'blockwise'   # memory-efficient attention at 32k
  c.model.dtype = 'bfloat16'

  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'            # PG19 prepared as array_record (extra `tfds`), or 'files'
  c.data.path = ''                  # files: a folder of PG19 books
  c.data.tfds_name = 'local_text/pg19'  # tfds_text.prepare_local_text(books_dir, data_dir, 'pg19')
  c.data.data_dir = ''
  c.data.text_key = 'book_text'
  c.data.tokenizer = 'auto'         # the checkpoint's tokenizer.json

  # The paper's search (LongRoPE sec. 3.2 / 4.1): population 64, 32 parents, 16 mutations and
  # 16 crossovers with p = 0.3, 40 generations; lambda in [1, 1.25 s] on a 0.01 grid, monotone;
  # n_hat searched; fitness = perplexity of 5 PG19 validation books truncated to L'.
  c.search = ml_collections.ConfigDict()
  c.search.multiple = 8             # 4k -> 32k
  c.search.split = 'validation'
  c.search.num_windows = 5
  c.search.strategy = 'paper_ga'
  c.search.population = 64
  c.search.parents = 32
  c.search.mutations = 16
  c.search.crossovers = 16
  c.search.mutation_prob = 0.3
  c.search.generations = 40
  c.search.max_evaluations = 0
  c.search.lambda_max = 0.0         # 0: 1.25 * s
  c.search.lambda_step = 0.01
  c.search.monotone = True
  c.search.search_n_hat = True
  c.search.n_hat = 0
  c.search.n_hat_choices = ()       # (): the paper's set {0, 1, 2, 4, ..., 128, 256}
  c.search.attn_scale = 0.0         # 0: sqrt(1 + ln s / ln L0)
  c.search.es_std = 1.0
  c.search.doc_batch = 1            # one 32k document per micro-batch
  c.search.chunk = 1                # one candidate per device per step
  c.search.memory_gb = 40.0
  c.search.mesh_pop = 0             # candidates over every device on the 'pop' axis
  c.search.attention = ''           # '': model.attention

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.split = 'test'
  c.evaluate.multiples = (1, 2, 4, 8)   # 4k, 8k, 16k, 32k
  c.evaluate.methods = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn', 'llama3')
  c.evaluate.num_windows = 10
  c.evaluate.batch_tokens = 32768
  return c
