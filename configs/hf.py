"""LongRoPE search (and evaluation) on any local Hugging Face Llama-family checkpoint
(LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM), read by longrope_jax/hf.py.

  python -m experiments.search --config configs/hf.py --config.model.path=/path/to/ckpt \
      --workdir runs/my_model
  python -m experiments.run --config configs/hf.py:paper --config.model.path=DIR --workdir DIR2

The default corpus is the standard library's source tokenized with the checkpoint's
tokenizer.json (nothing to download); point data.source/data.path at your own text files, or at
a TFDS dataset prepared as array_record. `:paper` uses the paper's search budget.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('search', 'evaluate', 'report')

  c.model = ml_collections.ConfigDict()
  c.model.path = ''                 # HF checkpoint folder (config.json + safetensors); required
  c.model.variant = 'hf'            # unused with a path (the checkpoint's config.json decides)
  c.model.attention = 'blockwise'
  c.model.dtype = 'bfloat16'        # compute dtype
  c.model.param_dtype = ''          # '': as stored (bf16 stays bf16)

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'          # stdlib | files | tfds
  c.data.path = ''
  c.data.tfds_name = ''
  c.data.data_dir = ''
  c.data.text_key = 'text'
  c.data.tokenizer = 'auto'         # auto: the checkpoint's tokenizer.json; or bytes / a path

  c.search = ml_collections.ConfigDict()
  c.search.multiple = 8             # L' = multiple * original window
  c.search.split = 'validation'
  c.search.num_windows = 5
  c.search.strategy = 'paper_ga'
  c.search.population = 32
  c.search.parents = 16
  c.search.mutations = 8
  c.search.crossovers = 8
  c.search.mutation_prob = 0.3
  c.search.generations = 10
  c.search.max_evaluations = 0
  c.search.lambda_max = 0.0
  c.search.lambda_step = 0.01
  c.search.monotone = True
  c.search.search_n_hat = True
  c.search.n_hat = 0
  c.search.n_hat_choices = ()
  c.search.attn_scale = 0.0
  c.search.es_std = 1.0
  c.search.doc_batch = 1
  c.search.chunk = 0
  c.search.memory_gb = 8.0
  c.search.mesh_pop = 0
  c.search.attention = ''

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.split = 'test'
  c.evaluate.multiples = (1, 2, 4, 8)
  c.evaluate.methods = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn', 'llama3')
  c.evaluate.num_windows = 8
  c.evaluate.batch_tokens = 32768

  if arg == 'paper':
    c.search.update(population=64, parents=32, mutations=16, crossovers=16, generations=40)
  elif arg not in (None, ''):
    raise ValueError(f"unknown config variant {arg!r} for configs/hf.py; use 'paper' or none.")
  return c
