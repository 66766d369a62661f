"""The embedded default: a byte-level Llama trained here on the standard library's source, then
extended 8x and beyond. Nothing is downloaded.

  python -m experiments.run --config configs/demo.py --workdir runs/demo
  python -m experiments.run --config configs/demo.py:test --workdir /tmp/demo_test   # seconds

Any field can be overridden: --config.pretrain.steps=200 --config.evaluate.num_windows=8
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('pretrain', 'evaluate', 'report')

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'demo'          # model.VARIANTS: demo (L0 = 256 bytes), test, llama2_7b, ...
  c.model.attention = 'dense'       # dense | blockwise | ring (used for long evaluations)
  c.model.dtype = 'float32'

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'          # stdlib | files | tfds
  c.data.path = ''                  # files: a text file or folder
  c.data.tfds_name = ''             # tfds: a prepared dataset name
  c.data.data_dir = ''              # tfds: its data_dir
  c.data.text_key = 'text'
  c.data.tokenizer = 'bytes'        # bytes | path of a tokenizer.json

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 1200
  c.pretrain.batch_size = 16
  c.pretrain.lr = 3e-3
  c.pretrain.warmup = 50
  c.pretrain.final_lr_ratio = 0.1
  c.pretrain.weight_decay = 0.1
  c.pretrain.clip = 1.0
  c.pretrain.eval_every = 200
  c.pretrain.ckpt_every = 100
  c.pretrain.eval_windows = 64      # validation windows at the training length

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.split = 'test'         # held-out documents, never seen by training or search
  c.evaluate.multiples = (1, 2, 4, 8, 16)   # lengths as multiples of the training length
  c.evaluate.methods = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn', 'llama3')
  c.evaluate.num_windows = 16
  c.evaluate.batch_tokens = 16384   # tokens per evaluation micro-batch

  if arg == 'test':  # a seconds-long run of every stage, for tests and smoke checks
    c.model.variant = 'test'
    c.pretrain.steps = 20
    c.pretrain.batch_size = 4
    c.pretrain.warmup = 5
    c.pretrain.eval_every = 10
    c.pretrain.ckpt_every = 10
    c.pretrain.eval_windows = 4
    c.evaluate.multiples = (1, 2, 4)
    c.evaluate.num_windows = 2
  elif arg not in (None, ''):
    raise ValueError(f"unknown config variant {arg!r} for configs/demo.py; use 'test' or none.")
  return c
