"""A memory-mappable copy of a checkpoint's parameters, for fast warm loads (orbax stays the source of truth).

One file per checkpoint directory and dtype: a JSON header (the checkpoint's signature; every array's name, dtype,
shape and offset), then the raw arrays. Loading maps the file read-only and hands each array to ``jax.device_put``,
which aliases 64-byte-aligned read-only host memory on XLA:CPU (no copy: pages are read on first use). The layers'
arrays of one kind (``layers.{i}.wq`` for every i, and ``packed.layers.{i}.wq``) lie back to back, so the same bytes
are also one stacked (n_layers, ...) array, at no cost in memory: the long-prompt prefill scans over those instead of
stacking ~0.25 s of SmolLM2's weights per call, and the decode loop over the packed ones (``model.scan_layers``).
The signature (manifest bytes, every parameter file's size and mtime) must match the checkpoint, else the copy is
ignored and ``write`` replaces it (atomically).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import re
import struct
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAGIC = b"jaxspec-weights-3\n"  # 2: the layers' arrays of a kind back to back; 3: the packed ones too
ALIGN = 4096
VIEW_ALIGN = 64  # what device_put needs to alias host memory
LAYER = re.compile(r"(.*)layers\.(\d+)\.(\w+)")  # a layer's array: kind (prefix + name) and index


def _layer(name: str) -> tuple[str, int] | None:
    """The kind (``wq``, ``packed.wq``) and layer index of a layer array's name, else None."""
    m = LAYER.fullmatch(name)
    return (m.group(1) + m.group(3), int(m.group(2))) if m else None


def path_for(cache: Path, ckpt: Path, dtype: str) -> Path:
    """The copy of checkpoint ``ckpt`` loaded as ``dtype`` under directory ``cache``."""
    ckpt = ckpt.resolve()
    return cache / f"{ckpt.name}-{hashlib.sha256(str(ckpt).encode()).hexdigest()[:16]}-{dtype}.bin"


def signature(ckpt: Path, dtype: str, packed: str = "") -> dict[str, Any]:
    """What the copy must agree with: the manifest's hash, every parameter file's size and mtime, and ``packed``: how
    the packed weights it also holds are laid out (``cpu_kernels.packing()``), "" for none."""
    from jaxspec.files import tree_files

    return {"checkpoint": str(ckpt.resolve()), "dtype": dtype,
            "manifest": hashlib.sha256((ckpt / "manifest.json").read_bytes()).hexdigest(),
            "files": [list(f) for f in tree_files(ckpt / "params")], "packed": packed}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write(path: Path, sig: Mapping[str, Any], flat: Mapping[str, Any]) -> None:
    """Write ``flat`` (name → array) with signature ``sig`` to ``path`` (atomically)."""
    from jaxspec.files import atomic_write

    arrays = dict(sorted(((n, np.asarray(a)) for n, a in flat.items()), key=lambda na: _order(na[0])))
    index, offset, prev = {}, 0, None
    for n, a in arrays.items():
        kind = (_layer(n) or (None,))[0]
        if not (kind and kind == prev and a.nbytes % VIEW_ALIGN == 0):
            offset = _align(offset)  # a new group starts on a page; a layer's next array of the same kind follows on
        index[n], offset, prev = [str(a.dtype), list(a.shape), offset], offset + a.nbytes, kind
    head = json.dumps({"signature": sig, "arrays": index}).encode()
    start = _align(len(MAGIC) + 8 + len(head))

    def chunks() -> Iterator[bytes]:
        yield MAGIC + struct.pack("<Q", len(head)) + head + bytes(start - len(MAGIC) - 8 - len(head))
        pos = 0
        for n, a in arrays.items():
            yield bytes(index[n][2] - pos)
            yield np.ascontiguousarray(a).tobytes()  # one array at a time
            pos = index[n][2] + a.nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, chunks())
    drop_orphans(path.parent)


def _order(name: str) -> tuple[str, int]:
    """File order: the other arrays by name, then each kind of layer array in layer order."""
    layer = _layer(name)
    return ("~" + layer[0], layer[1]) if layer else (name, 0)


def _header(f: Any) -> dict[str, Any]:
    """The JSON header of an open copy (raises on anything that is not one)."""
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError("not a weights copy")
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n))


def drop_orphans(cache: Path) -> list[Path]:
    """Delete the copies under ``cache`` whose checkpoint directory is gone (a copy is as large as its checkpoint:
    a deleted or moved checkpoint's copy would otherwise stay for good). Returns what was deleted."""
    gone = []
    for p in cache.glob("*.bin"):
        try:
            with open(p, "rb") as f:
                ckpt = Path(_header(f)["signature"]["checkpoint"])
            if not ckpt.exists():
                p.unlink()
                gone.append(p)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue  # being written, or not ours: leave it
    return gone


MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the whole mapping in, as reads would


def _populate_in_background(mm: mmap.mmap) -> None:
    """Map every page of ``mm`` now, in a thread (ctypes drops the GIL), instead of one page fault per 4 KiB on the
    first pass over the weights: that pass is the prompt's prefill, where SmolLM2's 131k faults cost ~40 ms of
    the first token. Best effort: elsewhere (older kernels, not Linux) pages are faulted in on use, as before."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    view = np.frombuffer(mm, np.uint8)  # held by the thread: ``mm`` cannot be unmapped under it

    def populate() -> None:
        madvise(view.ctypes.data, view.size, MADV_POPULATE_READ)

    threading.Thread(target=populate, name="fastweights-populate", daemon=True).start()


def read(path: Path, sig: Mapping[str, Any], device: jax.Device
         ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]] | None:
    """The arrays of the copy at ``path`` on ``device`` and, per layer array kind whose arrays lie back to back
    (``wq``, ...), the same bytes as one (n_layers, ...) array; None if the copy is missing, damaged or stale."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        head = _header(mm)
        if head["signature"] != sig:
            return None
        start = _align(mm.tell())
        index = head["arrays"]
        end = max((start + off + int(np.prod(shape)) * jnp.dtype(dt).itemsize for dt, shape, off in index.values()),
                  default=start)
        if end > len(mm):
            return None  # truncated
        mm.madvise(mmap.MADV_WILLNEED)  # read ahead while the caller goes on
        _populate_in_background(mm)

        def put(dt: str, shape: list[int], off: int) -> np.ndarray:
            return np.frombuffer(mm, jnp.dtype(dt), int(np.prod(shape)), start + off).reshape(shape)

        kinds: dict[str, list[list]] = {}
        for name, entry in index.items():
            if layer := _layer(name):
                kinds.setdefault(layer[0], []).append([layer[1], *entry])
        stacked = {}
        for kind, rows in kinds.items():
            rows.sort()
            (_, dt, shape, off), size = rows[0], int(np.prod(rows[0][2])) * jnp.dtype(rows[0][1]).itemsize
            if all(r[0] == i and r[1:3] == [dt, shape] and r[3] == off + i * size for i, r in enumerate(rows)):
                stacked[kind] = put(dt, [len(rows), *shape], off)
        # One device_put for all the arrays: ~0.1 ms of dispatch each when put one by one (SmolLM2's 492: 0.08 s)
        return jax.device_put(({name: put(*entry) for name, entry in index.items()}, stacked),
                              jax.sharding.SingleDeviceSharding(device))
    except (ValueError, KeyError, TypeError, struct.error):
        return None
