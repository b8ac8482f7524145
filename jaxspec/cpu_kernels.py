"""The decode step's few-row float32 work on XLA:CPU through small C++ kernels (``cpu_kernels.cc``) on every core.

Why: a decode step multiplies one row (a verify, 2-13 rows) by every weight matrix, one after another. XLA:CPU runs
each such product on about one core's bandwidth, and at 2+ rows streams 1.5-3x slower per byte than at one row,
which is what made a verify cost several decode steps here. ``matmul``/``matmul_t`` split each product over all
cores (each streams its own contiguous share of the weights) and are as fast at 2-5 rows as at one. ``model.pack``'s
``Packed`` weights (tiles of one vector's width of columns, each tile's rows back to back) go to a third product
kernel that streams each tile once with its sums in registers: a 9-row verify's products then cost ~1.2 decode
steps' instead of ~1.5 (the (K, N) kernel's panels stream 8 rows at once and reload their sums). Where a weight's
float32 values are exactly GGUF blocks (``blockquant``: SmolLM2's Q4_1 layers and Q8_0 head), its tiles hold the
blocks' scales and codes instead, and the kernel rebuilds the same float32 weights in registers: the same results
bit for bit from 5-6x fewer bytes, a decode step 2.2x faster (BENCHMARKS.md, "Exact 4-bit weights"). Weights whose
float32 values are all float16 (an HF LLaMA checkpoint's) or bfloat16 ones are stored as those 2 bytes and widened
in registers, exactly: half the bytes, AR decode 1.8-1.9x faster, the same bits ("Exact 2-byte weights"). Stacked packed
weights (``pack_layers``, one array per kind for all layers) and the stacked KV cache are read in place at a layer
index given at run time, so the model can loop over its layers (``model.scan_layers``) without copying a layer's
slice. ``attend`` does a layer's attention core of a few query tokens in one call over the live keys only (the jnp
version is ~10 small XLA kernels per layer over the whole cache window), in chunks of 64 keys that both cores share
(1.5-1.7x faster than one work item per KV head at 1-3.5k contexts: BENCHMARKS.md, "Attention in key chunks"). Every
output element is computed in one fixed order whatever the row count, so a T-token verify computes bit for bit what
T decode steps compute.

The kernels are compiled on first use with the machine's C++ compiler (``g++``/``c++``, ``-march=native``) into
``$JAXSPEC_CACHE/kernels`` and registered with XLA as FFI targets. Without a compiler, on other backends, for other
dtypes, for more than ``MAX_ROWS`` rows or query tokens (prefill: XLA's own kernels are faster there) or with
``JAXSPEC_CPU_KERNELS=0``, the model's jnp code runs instead. ``JAXSPEC_CPU_THREADS`` sets the threads (default:
the CPUs this process may use).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import blockquant

Array = jax.Array
SOURCE = Path(__file__).with_suffix(".cc")
MAX_ROWS = 32  # rows (query tokens) above which XLA is as fast (BENCHMARKS.md, "Decode on both cores")
MAX_PACKED_ROWS = 48  # the same for packed products: 33-48-token prompt chunks too (BENCHMARKS.md, "Short prompts")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=gnu++20", "-shared", "-fPIC", "-pthread")
_on = os.environ.get("JAXSPEC_CPU_KERNELS", "1") != "0"
_lock = threading.Lock()  # ``aot``'s loader threads and the tracing thread may ask for the library at once


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Trace with (or without) the kernels inside the block; already-traced functions keep what they were traced with
    (``jax.clear_caches()`` to re-trace, e.g. for an A/B benchmark)."""
    global _on
    old, _on = _on, on
    try:
        yield
    finally:
        _on = old


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)


def _library_path(cxx: str) -> Path:
    """Where this source, compiled by this compiler for this CPU and jaxlib, lives."""
    import jaxlib

    from jaxspec.fetch import cache_dir

    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln for ln in lines if ln.startswith(("flags", "Features"))), "")
    h = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, version, cpu, platform.machine(),
                                  " ".join(FLAGS)]).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_kernels-{h}.so"


def _build(cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        os.replace(tmp, out)  # another process building the same file at once replaces it with an equal one
    finally:
        Path(tmp).unlink(missing_ok=True)


def _library() -> ctypes.CDLL | None:
    """The compiled kernel, registered with XLA; None where it cannot be (reported once on stderr)."""
    with _lock:
        return _load_library()


@functools.cache
def _load_library() -> ctypes.CDLL | None:
    if not SOURCE.exists() or platform.system() != "Linux":
        return None
    cxx = _compiler()
    if cxx is None:
        print("jaxspec: no C++ compiler (g++): decode runs on XLA's own kernels (slower)", file=sys.stderr)
        return None
    path = _library_path(cxx)
    try:
        if not path.exists():
            print("jaxspec: compiling the CPU kernels (once per machine) ...", file=sys.stderr, flush=True)
            _build(cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"jaxspec: CPU kernels unavailable ({e}): decode runs on XLA's own kernels (slower)", file=sys.stderr)
        return None
    jax.ffi.register_ffi_target("jaxspec_matmul_nn", jax.ffi.pycapsule(lib.JaxspecMatmulNN), platform="cpu")
    jax.ffi.register_ffi_target("jaxspec_matmul_nt", jax.ffi.pycapsule(lib.JaxspecMatmulNT), platform="cpu")
    jax.ffi.register_ffi_target("jaxspec_matmul_packed", jax.ffi.pycapsule(lib.JaxspecMatmulPacked), platform="cpu")
    jax.ffi.register_ffi_target("jaxspec_matmul_packed_at", jax.ffi.pycapsule(lib.JaxspecMatmulPackedAt),
                                platform="cpu")
    jax.ffi.register_ffi_target("jaxspec_attend", jax.ffi.pycapsule(lib.JaxspecAttend), platform="cpu")
    return lib


def register() -> None:
    """Register the kernels with XLA where they can run, before an executable that calls them is deserialized
    (``aot``: XLA refuses one whose FFI targets it does not know)."""
    if _on and jax.default_backend() == "cpu":
        _library()


def active() -> bool:
    """Whether what is traced now may use the kernels (on the CPU backend, enabled, compiled)."""
    return _on and jax.default_backend() == "cpu" and _library() is not None


def state() -> str:
    """What traced code uses, for cache keys: ``"kernel"`` or ``"xla"``."""
    return "kernel" if active() else "xla"


def takes(rows: int, packed: bool = False) -> bool:
    """Whether a product of ``rows`` rows (with ``packed`` weights) traced now goes to the kernels (float32 weights
    assumed)."""
    return rows <= (MAX_PACKED_ROWS if packed else MAX_ROWS) and active()


def _usable(x: Array, ws: Sequence[Array | Packed]) -> bool:
    packed = all(isinstance(w, Packed) for w in ws)
    return x.dtype == jnp.float32 and all(w.dtype == jnp.float32 for w in ws) and takes(x.shape[0], packed)


def tile() -> int:
    """Columns per tile of a packed weight: one vector register of floats of this CPU (0: no kernels)."""
    lib = _library()
    return int(lib.jaxspec_packed_tile()) if lib is not None else 0


def packing() -> str:
    """How ``pack`` lays weights out on this machine (a stored copy of packed weights must match it)."""
    return (f"tiles of {tile()}, exact blocks {'/'.join(blockquant.FORMATS)} of {blockquant.BLOCK}, exact "
            f"{'/'.join(HALF.values())}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["shape", "n_in"])
@dataclasses.dataclass(frozen=True)
class Packed:
    """A weight of logical ``shape`` whose first ``n_in`` axes are contracted, as the packed kernel reads it: the
    (K, N) matrix in ``ceil(N / tile())`` tiles of ``tile()`` columns, each tile's K rows back to back (zeros past
    N), so ``data`` is (tiles, K, tile()). One sequential stream per tile, each tile's sums in registers: a 9-row
    product costs ~1.2 one-row products, where the (K, N) kernel's cost 1.5 (BENCHMARKS.md, "Packed weight tiles").
    A weight that is exactly GGUF blocks (``blockquant``) has uint8 (4-bit) or int8 (8-bit) ``data`` instead:
    (tiles, K / 32, block bytes), each block its tile's scales (and offsets) then codes (``QUANT``); one whose values
    are all exactly float16 (or bfloat16) ones, as an HF checkpoint's are, the float32 layout in that dtype
    (``HALF``)."""

    data: Array
    shape: tuple[int, ...]
    n_in: int = 1

    @property
    def dtype(self) -> jnp.dtype:
        """The weights' dtype: float32 for block-quantized and 2-byte storage too (its values are float32 ones)."""
        return jnp.dtype(jnp.float32) if self.data.dtype in QUANT or self.data.dtype in HALF else self.data.dtype

    def matrix(self) -> Array:
        """The (K, N) matrix again (XLA's dots, for row counts the kernel does not take)."""
        return _unpack(self.data, math.prod(self.shape[self.n_in:]))


# Block-quantized packed storage (``blockquant``): the storage dtype names the format, the kernel's contract.
QUANT = {jnp.dtype(jnp.uint8): "q4", jnp.dtype(jnp.int8): "q8"}
# 2-byte packed storage of float32 weights whose values are all exactly such (widened exactly in the kernel).
HALF = {jnp.dtype(jnp.float16): "f16", jnp.dtype(jnp.bfloat16): "bf16"}
_HEAD_FLOATS = {"q4": 2, "q8": 1}  # float32 vectors (scale, offset) before a block's codes


def _unpack(data: Array, n: int) -> Array:
    """The (K, n) matrix of packed tiles ``data``: float32 (tiles, K, tile) or quantized (tiles, K / 32, bytes)."""
    if data.dtype in QUANT:
        data = _dequantize_tiles(data, QUANT[data.dtype])
    elif data.dtype in HALF:
        data = data.astype(jnp.float32)
    t, k, c = data.shape
    return data.transpose(1, 0, 2).reshape(k, t * c)[:, :n]


def _dequantize_tiles(data: Array, fmt: str) -> Array:
    """Quantized packed tiles (tiles, K / 32, block bytes) as float32 ones (tiles, K, tile), in jnp."""
    t, nb, size = data.shape
    c = size // (_HEAD_FLOATS[fmt] * 4 + (blockquant.BLOCK // 2 if fmt == "q4" else blockquant.BLOCK))
    floats = jax.lax.bitcast_convert_type(data[..., : _HEAD_FLOATS[fmt] * 4 * c].reshape(t, nb, -1, c, 4),
                                          jnp.float32)
    codes = data[..., _HEAD_FLOATS[fmt] * 4 * c:].reshape(t, nb, -1, c)
    if fmt == "q4":
        codes = jnp.stack([codes & 15, codes >> 4], axis=3).reshape(t, nb, blockquant.BLOCK, c)
    w = floats[:, :, :1] * codes.astype(jnp.float32)
    if fmt == "q4":
        w = w + floats[:, :, 1:2]
    return w.reshape(t, nb * blockquant.BLOCK, c)


def _quantized_tiles(b: blockquant.Blocks, c: int) -> np.ndarray:
    """``b``'s matrix as packed tiles of ``c`` columns, each block of a tile: its scales (and offsets) as float32
    bytes, then its codes row by row (q4: two rows per byte, the even row in the low nibble): ``cpu_kernels.cc``."""
    k, n = b.codes.shape
    tiles, nb = -(-n // c), k // blockquant.BLOCK

    def cols(a: np.ndarray) -> np.ndarray:  # (rows, n) -> (tiles, rows, c), zero columns past n
        out = np.zeros((a.shape[0], tiles * c), a.dtype)
        out[:, :n] = a
        return out.reshape(a.shape[0], tiles, c).transpose(1, 0, 2)

    parts = [cols(b.scale).view(np.uint8).reshape(tiles, nb, 4 * c)]
    if b.fmt == "q4":
        parts.append(cols(b.offset).view(np.uint8).reshape(tiles, nb, 4 * c))
        q = cols(b.codes).reshape(tiles, nb, blockquant.BLOCK // 2, 2, c)
        parts.append((q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(tiles, nb, -1))
    else:
        parts.append(cols(b.codes).view(np.uint8).reshape(tiles, nb, -1))
    return np.concatenate(parts, axis=2).view(np.uint8 if b.fmt == "q4" else np.int8)


def _matrix(w: Array | np.ndarray, n_in: int) -> np.ndarray:
    a = np.asarray(w)
    return a.reshape(math.prod(a.shape[:n_in]), -1)


def _tiles(a: np.ndarray) -> np.ndarray:
    """The float32 (K, N) matrix ``a`` as (tiles, K, tile) (zero columns past N)."""
    k, n = a.shape
    c = tile()
    m = np.zeros((k, -(-n // c) * c), a.dtype)
    m[:, :n] = a
    return m.reshape(k, -1, c).transpose(1, 0, 2)


def _exact_blocks(ws: Sequence[Array | np.ndarray], n_in: int) -> list[blockquant.Blocks] | None:
    """``ws`` as block-quantized matrices if every one of them is exactly blocks of one format
    (``blockquant.find``), else None."""
    found: list[blockquant.Blocks] = []
    for w in ws:
        m = _matrix(w, n_in)
        b = blockquant.find(m, (found[0].fmt,)) if found else blockquant.find(m)
        if b is None:
            return None
        found.append(b)
    return found


def _holds(a: np.ndarray, dt: np.dtype) -> bool:
    """Whether 2-byte ``dt`` holds every value of ``a`` exactly: ``a`` is of ``dt``, or float32 values that come
    back with the same bits (-0.0 too; no inf or NaN)."""
    if a.dtype == dt:
        return True
    if a.dtype != np.float32 or not np.isfinite(a).all():
        return False
    with np.errstate(over="ignore"):  # values past float16's range become inf: not equal, as they should
        return np.array_equal(a.astype(dt).astype(np.float32).view(np.uint32), a.view(np.uint32))


def _exact_half(ws: Sequence[Array | np.ndarray]) -> np.dtype | None:
    """The 2-byte dtype (float16 first, then bfloat16) holding every value of every one of the float32 ``ws``
    exactly (``_holds``), else None."""
    arrays = [np.asarray(w) for w in ws]
    if not all(a.dtype == np.float32 for a in arrays):
        return None
    return next((np.dtype(dt) for dt in HALF if all(_holds(a, dt) for a in arrays)), None)


def _packer(ws: Sequence[Array | np.ndarray], n_in: int, exact: bool) -> Callable[[int], np.ndarray]:
    """How ``ws[i]`` is packed: its exact blocks if all of ``ws`` are blocks of one format, else 2-byte tiles if all
    are exactly one 2-byte dtype (``exact``), else float32 tiles."""
    blocks = _exact_blocks(ws, n_in) if exact else None
    if blocks:
        return lambda i: _quantized_tiles(blocks[i], tile())
    half = _exact_half(ws) if exact else None
    if half is not None:
        return lambda i: _tiles(_matrix(ws[i], n_in)).astype(half)
    return lambda i: _tiles(_matrix(ws[i], n_in))


def pack(w: Array | np.ndarray, n_in: int = 1, exact: bool = True) -> Packed:
    """``w`` (contracting its first ``n_in`` axes) as a ``Packed`` weight, built on the host; ``exact``: in block-
    quantized or 2-byte storage where that reproduces its float32 values exactly (``blockquant``, ``HALF``)."""
    return Packed(jax.device_put(_packer([w], n_in, exact)(0)), tuple(w.shape), n_in)


def pack_layers(ws: Sequence[Array | np.ndarray], n_in: int = 1, exact: bool = True
                ) -> tuple[Packed, list[Packed]]:
    """The same-shaped weights ``ws`` (one per layer) packed back to back (all block-quantized in one format, all
    in one 2-byte dtype, or all float32: see ``pack``): as one ``Packed`` of (layers, *tiles) data (``matmul(...,
    layer=i)`` reads layer i of it) and as one ``Packed`` per layer over the same memory (on CPU ``device_put``
    aliases 64-byte-aligned host memory)."""
    packed = _packer(ws, n_in, exact)  # one layer at a time: no second copy of every layer's tiles
    first = packed(0)
    host = layers_buffer(len(ws), first)
    for i in range(len(ws)):
        host[i] = first if i == 0 else packed(i)
    return device_layers(host, tuple(ws[0].shape), n_in)


def layers_buffer(n: int, first: np.ndarray) -> np.ndarray:
    """An (n, *first.shape) host array of ``first``'s dtype, 64-byte aligned (``device_put`` then aliases it)."""
    raw = np.empty(n * first.size + 64 // first.dtype.itemsize, first.dtype)
    off = (-raw.ctypes.data % 64) // first.dtype.itemsize
    return raw[off : off + n * first.size].reshape(n, *first.shape)


def device_layers(host: np.ndarray, shape: tuple[int, ...], n_in: int) -> tuple[Packed, list[Packed]]:
    """The packed layers ``host`` (``layers_buffer``) of logical ``shape`` as one stacked ``Packed`` and one per layer,
    all over the same memory."""
    stacked, *layers = jax.device_put([host] + [host[i] for i in range(len(host))])
    return Packed(stacked, shape, n_in), [Packed(a, shape, n_in) for a in layers]


def pack_like(w: Array | np.ndarray, n_in: int = 1, like: np.dtype | str | None = None) -> np.ndarray:
    """The host tiles of one weight (see ``pack``): in its exact storage when ``like`` is None, else in storage
    ``like`` (the tiles' dtype: another layer's), which must hold it exactly (ValueError otherwise). Lets weights that
    are read one layer at a time be packed into one stacked buffer without a pass over all of them first."""
    if like is None:
        return _packer([w], n_in, True)(0)
    like = jnp.dtype(like)
    if like in QUANT:
        b = blockquant.find(_matrix(w, n_in), (QUANT[like],))
        if b is None:
            raise ValueError(f"not exactly {QUANT[like]} blocks, as the other layers' weights are")
        return _quantized_tiles(b, tile())
    a = _matrix(w, n_in)
    if like in HALF and not _holds(a, like):
        raise ValueError(f"not exactly {like} values, as the other layers' weights are")
    return _tiles(a).astype(like, copy=False)


def matmul(x: Array, *ws: Array | Packed, layer: Array | None = None) -> list[Array]:
    """``[x @ w for w in ws]`` for x (R, K) and weights (K, N_i) (or ``Packed``), float32 results: one kernel call
    for all (a layer's Q, K and V, or gate and up) when few-row float32 on CPU, else XLA's dots. ``layer`` (an int32
    scalar): the ``Packed`` weights are stacked (``pack_layers``) and layer ``layer`` of each is read in place (the
    kernels only)."""
    packed = [isinstance(w, Packed) for w in ws]
    if any(packed) and not all(packed):
        raise ValueError("matmul: packed and plain weights in one call")
    if all(packed) and len({w.data.dtype for w in ws}) > 1:  # one storage format per kernel call
        return [matmul(x, w, layer=layer)[0] for w in ws]
    if layer is not None:
        out = [jax.ShapeDtypeStruct((x.shape[0], math.prod(w.shape[w.n_in:])), jnp.float32) for w in ws]
        return list(_packed_at(x, jnp.asarray(layer, jnp.int32), tuple(w.data for w in ws), tuple(out)))
    if not _usable(x, ws):
        return [jnp.dot(x, w.matrix() if isinstance(w, Packed) else w, preferred_element_type=jnp.float32)
                for w in ws]
    if all(packed):
        out = [jax.ShapeDtypeStruct((x.shape[0], math.prod(w.shape[w.n_in:])), jnp.float32) for w in ws]
        return list(_packed(x, tuple(w.data for w in ws), tuple(out)))
    return list(_nn(x, tuple(ws)))


def _weight_tangent(x: Array, w: Array, dw: Array, n: int) -> Array | float:
    """The tangent of ``x @ w`` through packed ``w``'s own tangent (none for quantized storage: its codes are
    integers)."""
    return 0.0 if w.dtype in QUANT else x @ _unpack(dw, n)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _packed(x: Array, ws: tuple[Array, ...], out: tuple[jax.ShapeDtypeStruct, ...]) -> tuple[Array, ...]:
    return tuple(jax.ffi.ffi_call("jaxspec_matmul_packed", list(out))(x, *ws))


@_packed.defjvp
def _packed_jvp(out: tuple, primals: tuple, tangents: tuple) -> tuple:
    (x, ws), (dx, dws) = primals, tangents
    ns = [o.shape[1] for o in out]
    return _packed(x, ws, out), tuple(dx @ _unpack(w, n) + _weight_tangent(x, w, dw, n)
                                      for w, dw, n in zip(ws, dws, ns, strict=True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _packed_at(x: Array, layer: Array, ws: tuple[Array, ...], out: tuple[jax.ShapeDtypeStruct, ...]
               ) -> tuple[Array, ...]:
    return tuple(jax.ffi.ffi_call("jaxspec_matmul_packed_at", list(out))(x, layer, *ws))


@_packed_at.defjvp
def _packed_at_jvp(out: tuple, primals: tuple, tangents: tuple) -> tuple:
    (x, layer, ws), (dx, _, dws) = primals, tangents
    ns = [o.shape[1] for o in out]
    return _packed_at(x, layer, ws, out), tuple(dx @ _unpack(w[layer], n) + _weight_tangent(x, w[layer], dw[layer], n)
                                                for w, dw, n in zip(ws, dws, ns, strict=True))


def matmul_t(x: Array, w: Array) -> Array:
    """``x @ w.T`` for x (R, K) and w (N, K) (tied embeddings as the output head), float32."""
    if not _usable(x, (w,)):
        return jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    return _nt(x, w)


@jax.custom_jvp
def _nn(x: Array, ws: tuple[Array, ...]) -> tuple[Array, ...]:
    out = [jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32) for w in ws]
    return tuple(jax.ffi.ffi_call("jaxspec_matmul_nn", out)(x, *ws))


@_nn.defjvp
def _nn_jvp(primals: tuple, tangents: tuple) -> tuple:  # derivatives (rarely wanted at few rows) through XLA
    (x, ws), (dx, dws) = primals, tangents
    return _nn(x, ws), tuple(dx @ w + x @ dw for w, dw in zip(ws, dws, strict=True))


@jax.custom_jvp
def _nt(x: Array, w: Array) -> Array:
    return jax.ffi.ffi_call("jaxspec_matmul_nt", [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)])(
        x, w)[0]


@_nt.defjvp
def _nt_jvp(primals: tuple, tangents: tuple) -> tuple:
    (x, w), (dx, dw) = primals, tangents
    return _nt(x, w), dx @ w.T + x @ dw.T


def attend(q: Array, k: Array, v: Array, positions: Array, layer: Array | int,
           reference: Callable[..., Array]) -> Array:
    """Causal attention of a few query tokens over layer ``layer`` of the stacked cache (``model.attend``'s contract:
    q (B, T, kv, g, hd), k/v (layers, B, S, kv, hd), positions (B, T)) in one kernel call that reads only each
    query's live keys, in place, when float32 on CPU with T <= ``MAX_ROWS``; else ``reference`` (the jnp version,
    which also gives the derivatives)."""
    layer = jnp.asarray(layer, jnp.int32)
    if not (q.shape[1] <= MAX_ROWS and q.dtype == k.dtype == v.dtype == jnp.float32 and active()):
        return reference(q, k, v, positions, layer)
    return _attend(q, k, v, positions.astype(jnp.int32), layer, reference)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _attend(q: Array, k: Array, v: Array, positions: Array, layer: Array, reference: Callable[..., Array]) -> Array:
    return jax.ffi.ffi_call("jaxspec_attend", jax.ShapeDtypeStruct(q.shape, jnp.float32))(q, k, v, positions, layer)


@_attend.defjvp
def _attend_jvp(reference: Callable[..., Array], primals: tuple, tangents: tuple) -> tuple:
    (q, k, v, positions, layer), (dq, dk, dv, _, _) = primals, tangents
    _, tangent = jax.jvp(lambda q, k, v: reference(q, k, v, positions, layer), (q, k, v), (dq, dk, dv))
    return _attend(q, k, v, positions, layer, reference), tangent


def stream_sum(a: np.ndarray) -> float:
    """The sum of float32 ``a``, read once on all the kernels' threads (``roofline``'s probe of what the cores
    stream); NaN where the kernels are not available."""
    lib = _library()
    if lib is None:
        return math.nan
    a = np.ascontiguousarray(a, np.float32)
    lib.jaxspec_stream_sum.restype = ctypes.c_float
    return float(lib.jaxspec_stream_sum(a.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(a.size)))


def threads() -> int:
    """The kernel's threads (0: not available)."""
    lib = _library()
    return int(lib.jaxspec_matmul_threads()) if lib is not None else 0
