"""Fused flash attention on CPU: a C++ kernel (csrc/flash_attention.cc) called through XLA FFI.

Same semantics as `attention.dense_attention` (masking by explicit positions, sliding window,
segment ids, GQA, zeros for rows with no visible key), forward and backward, under jit, vmap
(folded into the kernel's batch), scan and grad. The library is compiled with the system C++
compiler on first use (one console line says so) into a cache directory keyed by the source,
flags, compiler and CPU; without a compiler, without `fcntl` (file locks, POSIX only), or on
another platform, `flash_cpu_attention` warns once and runs `attention.blockwise_attention`.

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import attention as attention_lib
from longrope_jax import runtime

try:
  import fcntl
except ImportError:  # not POSIX (Windows): the kernel reports itself unavailable
  fcntl = None

SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'flash_attention.cc'
FLAGS = ('-O3', '-march=native', '-std=c++17', '-ffp-contract=fast', '-fPIC', '-shared',
         '-pthread')
_FORWARD, _BACKWARD = 'longrope_flash_forward', 'longrope_flash_backward'
# The same kernels with segment ids (separate C++ specializations: no cost without them).
_FORWARD_SEG, _BACKWARD_SEG = 'longrope_flash_forward_segments', 'longrope_flash_backward_segments'
_TARGETS = {_FORWARD: 'LongropeFlashForward', _BACKWARD: 'LongropeFlashBackward',
            _FORWARD_SEG: 'LongropeFlashForwardSegments',
            _BACKWARD_SEG: 'LongropeFlashBackwardSegments'}
COMPILE_MESSAGE = 'compiling the CPU attention kernel (~15 s, once per machine) ...'
_NO_WINDOW = np.iinfo(np.int32).max

_lock = threading.Lock()
_state: dict[str, object] = {}  # 'lib' (ctypes.CDLL) or 'error' (str), 'warned'


def _compiler() -> str | None:
  return shutil.which(os.environ.get('CXX', 'g++')) or shutil.which('c++')


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith(('flags', 'Features')):
        return line
  except OSError:
    pass
  return platform.processor()


def _compile(compiler: str, output: str, source: pathlib.Path = SOURCE) -> None:
  """Compiles `source` (the kernel's) into the library `output` with FLAGS (raises
  subprocess.CalledProcessError with the compiler's stderr)."""
  subprocess.run([compiler, *FLAGS, '-I', jax.ffi.include_dir(), str(source), '-o', output,
                  '-ldl'], capture_output=True, text=True, check=True)


def _build(compiler: str) -> pathlib.Path:
  """Compiles the kernel unless a build for this source, compiler and CPU is cached; says so on
  stderr, in one line, when it compiles."""
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                           check=True).stdout
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), ' '.join(FLAGS), version, _cpu_flags(),
                                  jax.__version__, sys.platform]).encode()).hexdigest()[:16]
  directory = runtime.cache_dir()
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / f'flash_attention-{key}.so'
  with open(directory / f'flash_attention-{key}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: one compiles, the rest wait
    if not target.exists():
      print(COMPILE_MESSAGE, file=sys.stderr, flush=True)
      fd, tmp = tempfile.mkstemp(suffix='.so', dir=directory)
      os.close(fd)
      try:
        _compile(compiler, tmp)
        os.replace(tmp, target)
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
  return target


def _load() -> ctypes.CDLL | None:
  with _lock:
    if 'lib' in _state or 'error' in _state:
      return _state.get('lib')
    if fcntl is None:
      _state['error'] = ("no fcntl module (not a POSIX system): the kernel's build cache "
                         "needs its file locks")
      return None
    compiler = _compiler()
    if compiler is None:
      _state['error'] = 'no C++ compiler found (set $CXX or install g++)'
      return None
    try:
      lib = ctypes.CDLL(str(_build(compiler)))
    except subprocess.CalledProcessError as e:
      _state['error'] = f'compiling {SOURCE.name} failed: {e.stderr.strip()[-2000:]}'
      return None
    except OSError as e:
      _state['error'] = f'loading the compiled kernel failed: {e}'
      return None
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
    _state['lib'] = lib
    return lib


def available() -> bool:
  """True when the kernel is compiled and registered (and jax's default backend is the CPU)."""
  return jax.default_backend() == 'cpu' and _load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False, or None."""
  if jax.default_backend() != 'cpu':
    return f'the default backend is {jax.default_backend()!r}, not the CPU'
  _load()
  return _state.get('error')  # type: ignore[return-value]


def num_threads() -> int:
  """Threads the kernel runs on (the CPUs this process may use); 0 when unavailable."""
  lib = _load()
  return int(lib.LongropeFlashNumThreads()) if lib is not None else 0


# ----------------------------------------------------------------------------- tiles
def default_tiles(num_groups: int) -> tuple[int, int]:
  """Forward (query block Q, key block C), by measurement (bench/flash_cpu.py --tiles, 2-core
  Xeon, demo and 4-kv-head shapes at 4K-8K): 256 x 256, with at most 1024 stacked rows (G * Q)."""
  return max(16, min(256, 1024 // num_groups)), 256


def default_backward_tiles(num_groups: int) -> tuple[int, int]:
  """Backward (Q, C), as `default_tiles`: 128 x 128 (its five products and their buffers per
  block pair favour smaller blocks), with at most 512 stacked rows."""
  return max(16, min(128, 512 // num_groups)), 128


# ----------------------------------------------------------------------------- custom calls
def _attrs(window: int | None, head_dim: int, tiles: tuple[int, int]) -> dict:
  return dict(window=np.int32(_NO_WINDOW if window is None else window),
              scale=np.float32(head_dim ** -0.5), block_q=np.int64(tiles[0]),
              block_k=np.int64(tiles[1]))


def _masks(q_pos, k_pos, q_seg, k_seg) -> tuple:
  """The kernel's integer inputs: positions, then segment ids when given."""
  return (q_pos, k_pos) if q_seg is None else (q_pos, k_pos, q_seg, k_seg)


def _forward_call(q, k, v, q_pos, k_pos, q_seg, k_seg, window, tiles):
  B, T, N, H = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
               jax.ShapeDtypeStruct((B, N, T), jnp.float32))
  target = _FORWARD if q_seg is None else _FORWARD_SEG
  return jax.ffi.ffi_call(target, out_types, vmap_method='broadcast_all')(
      q, k, v, *_masks(q_pos, k_pos, q_seg, k_seg), **_attrs(window, H, tiles))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window, tiles, backward_tiles):
  return _forward_call(q, k, v, q_pos, k_pos, q_seg, k_seg, window, tiles)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, tiles, backward_tiles):
  out, lse = _forward_call(q, k, v, q_pos, k_pos, q_seg, k_seg, window, tiles)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(window, tiles, backward_tiles, residuals, dout):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  target = _BACKWARD if q_seg is None else _BACKWARD_SEG
  dq, dk, dv = jax.ffi.ffi_call(target, out_types, vmap_method='broadcast_all')(
      q, k, v, *_masks(q_pos, k_pos, q_seg, k_seg), out, lse, dout.astype(jnp.float32),
      **_attrs(window, q.shape[-1], backward_tiles))
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_cpu_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                        q_pos_BT: jax.Array, k_pos_BS: jax.Array, *, window: int | None = None,
                        q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None,
                        tiles: tuple[int, int] | None = None,
                        backward_tiles: tuple[int, int] | None = None, **unused) -> jax.Array:
  """Causal GQA out[B, T, N, H] by the fused C++ kernel (f32 inside; bf16 is upcast), equal to
  `attention.dense_attention`. Falls back, with one warning, to `attention.blockwise_attention`
  when the kernel cannot be built or the backend is not the CPU. `tiles` and `backward_tiles`
  = (Q, C) override `default_tiles` and `default_backward_tiles`."""
  attention_lib.validate_attention_shapes(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS)
  attention_lib.validate_segments(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window must be a positive integer or None, got {window!r}.")
  if not available():
    if not _state.get('warned'):
      _state['warned'] = True
      warnings.warn(f"flash_cpu attention is unavailable ({unavailable_reason()}); using "
                    f"blockwise attention instead.", stacklevel=2)
    return attention_lib.blockwise_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS,
                                             window=window, q_seg_BT=q_seg_BT,
                                             k_seg_BS=k_seg_BS, **unused)
  G = q_BTNH.shape[2] // k_BSKH.shape[2]
  tiles = default_tiles(G) if tiles is None else tuple(tiles)
  backward_tiles = (default_backward_tiles(G) if backward_tiles is None else
                    tuple(backward_tiles))
  segments = (None, None) if q_seg_BT is None else (q_seg_BT.astype(jnp.int32),
                                                     k_seg_BS.astype(jnp.int32))
  out_BTNH = _flash(q_BTNH.astype(jnp.float32), k_BSKH.astype(jnp.float32),
                    v_BSKH.astype(jnp.float32), q_pos_BT.astype(jnp.int32),
                    k_pos_BS.astype(jnp.int32), *segments, window, tiles, backward_tiles)
  return out_BTNH.astype(q_BTNH.dtype)
