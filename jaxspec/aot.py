"""Compiled executables kept across processes: ``call(jitted, *args, static=...)`` runs ``jitted`` with an executable
serialized by an earlier run when one matches, skipping Python tracing and lowering (a warm ``generate.py`` run).

Off until ``enable(directory)`` (``generate.py`` does). An entry's key covers the function, its static arguments'
``repr``, the dynamic arguments' tree, shapes, dtypes and placement, jax/jaxlib versions, backend, devices, compiler
flags, the jaxspec sources and whether products use ``cpu_kernels``'s kernel; a missing, unreadable, corrupt or
foreign file is ignored and rewritten. Inputs that are not single-device ``jax.Array``s (``sharding.MeshDecoder``'s,
Python scalars) use plain jit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import jax

from jaxspec.files import atomic_write

MAGIC = b"jaxspec-aot-3\n"  # -1 entries may have come from XLA's cache (see ``_compile``); -2 lack devices
RECENT = "recent.json"  # the keys the latest process used, in order, and its environment: what prefetch loads
MAX_BYTES = 512 << 20  # entries beyond this total are deleted, least recently used first
_dir: Path | None = None
_memo: dict[str, Any] = {}  # key -> jax.stages.Compiled, this process
_used: list[str] = []  # keys this process used
_pending: dict[str, Future] = {}  # key -> executable being loaded in the background
_parts: dict[int, tuple[weakref.ref, str]] = {}  # id -> (a large frozen argument, its part of a key): ``_arg_part``


def enable(directory: str | Path | None, prefetch: bool = False) -> None:
    """Persist executables under ``directory`` (None: off, plain jit). ``prefetch``: start loading the executables
    the latest process used in background threads (XLA deserializes them outside the GIL), so that they are ready
    by the time the weights are. Only a process of the same environment's (``_environment``: jaxspec's sources
    included) are prefetched: an executable pickled by other code can name pytree classes whose fields have changed
    since, and unpickling one of those crashed the process (after an upgrade, or an edit of ``model.Params``)."""
    global _dir
    _dir = Path(directory) if directory is not None else None
    _memo.clear()
    _used.clear()
    _pending.clear()
    if prefetch and _dir is not None:
        try:
            recent = json.loads((_dir / RECENT).read_text())
            if not isinstance(recent, dict) or recent.get("environment") != _environment_hash():
                return
            keys = [k for k in recent["keys"] if isinstance(k, str) and k.isalnum()]
        except (OSError, ValueError, TypeError, KeyError):
            return
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aot-prefetch")
        _pending.update({k: pool.submit(_load, k) for k in keys[:16]})
        pool.shutdown(wait=False)


@cache
def _environment() -> str:
    """Everything outside the call that decides the executable: versions, backend, devices, flags, our sources."""
    import jaxlib

    src = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for f in sorted([*root.rglob("*.py"), *root.rglob("*.cc")]):
        src.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    devs = jax.devices()
    return json.dumps([jax.__version__, jaxlib.__version__, jax.default_backend(), devs[0].client.platform_version,
                       [(d.id, d.device_kind) for d in devs], os.environ.get("XLA_FLAGS", ""),
                       bool(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision),
                       src.hexdigest()])


@cache
def _environment_hash() -> str:
    return hashlib.sha256(_environment().encode()).hexdigest()


def key(fn: Callable, args: Sequence[Any], static: tuple[int, ...]) -> str | None:
    """The cache key of ``fn(*args)`` (None: not cacheable, use plain jit)."""
    from jaxspec import cpu_kernels

    parts = [_environment(), cpu_kernels.state(), f"{fn.__module__}.{fn.__qualname__}"]
    for i in static:
        r = repr(args[i])
        if " at 0x" in r:  # an object without a value repr: equal-looking keys could mean different programs
            return None
        parts.append(r)
    for a in (a for i, a in enumerate(args) if i not in static):
        part = _arg_part(a)
        if part is None:
            return None
        parts.append(part)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _arg_part(a: Any) -> str | None:
    """One dynamic argument's part of a key: its tree and its leaves' shapes, dtypes and placement (None: not
    cacheable). A frozen dataclass pytree (``model.Params``: ~520 leaves, the same object every decode call) has its
    part remembered: 1.3 ms of each streamed call's key, where the state, new each call, has a few dozen leaves."""
    hit = _parts.pop(id(a), None)
    if hit is not None and hit[0]() is a:
        _parts[id(a)] = hit  # the most recently used last
        return hit[1]
    leaves, tree = jax.tree.flatten(a)
    out = [str(tree)]
    for x in leaves:
        if not isinstance(x, jax.Array) or len(x.sharding.device_set) != 1:
            return None
        out.append(_leaf(x.shape, x.dtype, x.aval.weak_type, x.sharding, x.committed))
    part = "\n".join(out)
    params = getattr(type(a), "__dataclass_params__", None)
    if params is not None and params.frozen and hasattr(a, "__weakref__") and len(leaves) >= 16:
        _parts[id(a)] = (weakref.ref(a), part)  # not kept alive by this (a model's weights): a dead one never matches
        while len(_parts) > 8:  # the least recently used first
            del _parts[next(iter(_parts))]
    return part


@lru_cache(maxsize=4096)
def _leaf(shape: tuple[int, ...], dtype: Any, weak_type: bool, sharding: Any, committed: bool) -> str:
    """An array leaf's part of a key: formatting it costs ~12 us, a look-up ~3 (the decode loop's ~620 leaves:
    5.1 -> 1.3 ms per call)."""
    return f"{shape}{dtype}{weak_type}{sharding}{committed}"


def _path(k: str) -> Path:
    assert _dir is not None
    return _dir / (k if k == RECENT else f"{k}.bin")


def _load(k: str) -> Any:
    """The executable stored under ``k``, or None if there is none or it cannot be used."""
    from jax.experimental.serialize_executable import deserialize_and_load

    from jaxspec import cpu_kernels

    try:
        cpu_kernels.register()
        data = _path(k).read_bytes()
        if not data.startswith(MAGIC):
            return None
        digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
        if hashlib.sha256(payload).digest() != digest:
            return None  # truncated or corrupt
        serialized, in_tree, out_tree, ids = pickle.loads(payload)
        devices = {d.id: d for d in jax.devices()}
        # on the devices it was compiled for: by default it would load onto all of them (and, with more than one,
        # expect every argument split over them all)
        exe = deserialize_and_load(serialized, in_tree, out_tree, execution_devices=[devices[i] for i in ids])
        os.utime(_path(k))  # recently used: ``_trim`` keeps it
        return exe
    except Exception:  # noqa: BLE001 - any unreadable entry: compile again and overwrite it
        return None


def _save(k: str, compiled: Any) -> None:
    from jax.experimental.serialize_executable import serialize

    try:
        # ``key`` admits only single-device inputs; an executable without array inputs ran on the default device
        ids = sorted({d.id for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set})
        ids = ids or [jax.devices()[0].id]
        payload = pickle.dumps((*serialize(compiled), ids), protocol=pickle.HIGHEST_PROTOCOL)
        _path(k).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(_path(k), [MAGIC, hashlib.sha256(payload).digest(), payload])
    except Exception:  # noqa: BLE001 - not serializable, or the cache is not writable: only later runs lose
        return
    _trim(MAX_BYTES)


def _trim(limit: int) -> None:
    """Delete entries, least recently used first, until the directory holds at most ``limit`` bytes of them (every
    jaxspec upgrade and new shape adds entries; the keys of old ones never come back)."""
    assert _dir is not None
    entries = []
    for p in _dir.glob("*.bin"):
        with contextlib.suppress(OSError):
            st = p.stat()
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            p.unlink()
        total -= size


def _note(k: str) -> None:
    """Record that this process uses ``k`` (for the next process's prefetch)."""
    _used.append(k)
    with contextlib.suppress(OSError):
        atomic_write(_path(RECENT), json.dumps({"environment": _environment_hash(), "keys": _used}).encode())


def _compile(fn: Callable, args: Sequence[Any]) -> Any:
    """Compile ``fn`` for ``args`` afresh, bypassing XLA's persistent compilation cache both ways: an executable that
    cache supplied serializes incompletely (loaded again, it fails with "Function ... not found"). JAX decides once
    per process whether that cache is in use, so turning it off means resetting that decision, before and after."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    try:
        return fn.lower(*args).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        cc.reset_cache()


def call(fn: Callable, *args: Any, static: tuple[int, ...] = ()) -> Any:
    """``fn(*args)`` for a ``jax.jit`` function with ``static_argnums=static``, through the persisted executable."""
    if _dir is None or not hasattr(fn, "lower"):
        return fn(*args)
    k = key(fn, args, static)
    if k is None:
        return fn(*args)
    dynamic = [a for i, a in enumerate(args) if i not in static]
    exe = _memo.get(k)
    if exe is None:
        _note(k)
        exe = _pending.pop(k).result() if k in _pending else _load(k)
        if exe is not None:
            try:
                out = exe(*dynamic)  # a stale entry whose inputs disagree raises before running (nothing donated)
            except (TypeError, ValueError):
                exe = None
            else:
                _memo[k] = exe
                return out
        exe = _compile(fn, args)
        _save(k, exe)
        _memo[k] = exe
    return exe(*dynamic)
