"""Batch jobs: prompts from JSONL in, one result line per prompt id out, resumable after a kill.

Input lines are ``{"id": str | int, "prompt": str}`` plus optional per-row ``max_new_tokens``, ``temperature``,
``top_k``, ``top_p``. A malformed line (bad JSON, missing or duplicate id, empty prompt, unknown key, bad value,
prompt too long for the context) is reported by line number and, by default, skipped; ``on_error="reject"``
instead refuses the whole job before generating anything. Blank lines are ignored.

Rows with the same sampling settings share a decoder; they are sorted by (budget, prompt length) and cut into
batches of at most ``batch_size`` (each padded to a power-of-two bucket, ``bucket``), every batch fixed by the
*whole* input, with seed ``seed + batch index``. Each result is appended as one complete line
``{"id", "text", "token_ids", "stats"}`` (write, flush, fsync). The output must be such a file or new: anything
else (or the input itself) is refused, untouched. A rerun reads the ids already in the output (dropping a truncated
last line and rewriting the file cleanly), skips the batches whose rows are all there and recomputes any partly
written batch whole, writing only its missing ids: every id appears exactly once, with the result an uninterrupted
run would have given.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import numpy as np

from jaxspec import validate
from jaxspec.decode import Decoder, Result, generate
from jaxspec.files import atomic_write
from jaxspec.model import Params
from jaxspec.sampling import Sampling
from jaxspec.sharding import MeshDecoder, pad_rows, shard_params

SAMPLING_KEYS = ("temperature", "top_k", "top_p")
RESULT_KEYS = frozenset({"id", "text", "token_ids", "stats"})  # what every line of a job's output holds


class TokenizerLike(Protocol):
    """What a batch job needs of ``tokenizer.Tokenizer`` (``apply_chat_template`` only with ``chat``)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


class BatchInputError(ValueError):
    """The input file is unreadable, or malformed lines were found with ``on_error="reject"``."""


@dataclass(frozen=True)
class Row:
    id: str | int
    prompt: str
    line: int  # 1-based line number in the input
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return json.dumps(self.id)


def parse_line(text: str, line: int) -> Row:
    """One input line → ``Row``; ``ValueError`` with the reason when it is malformed (``validate.row``'s rules)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    rid, prompt, settings = validate.row(obj)
    return Row(rid, prompt, line, settings)


def read_rows(path: str | Path) -> tuple[list[Row], list[tuple[int, str]]]:
    """Valid rows of a JSONL file and ``(line number, reason)`` per malformed line (duplicates included)."""
    rows: list[Row] = []
    errors: list[tuple[int, str]] = []
    first: dict[str, int] = {}
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BatchInputError(f"{path}: cannot read input ({e.strerror})") from None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
            if not text.strip():
                continue
            row = parse_line(text, n)
            if row.key in first:
                raise ValueError(f"duplicate id {row.id!r} (first on line {first[row.key]})")
        except UnicodeDecodeError:
            errors.append((n, "not valid UTF-8"))
            continue
        except ValueError as e:
            errors.append((n, str(e)))
            continue
        first[row.key] = n
        rows.append(row)
    return rows, errors


# ---- output ------------------------------------------------------------------------------------------------

def _scan(path: Path) -> tuple[set[str], list[bytes], int, bytes]:
    """Ids, lines to keep, lines to drop (blank or repeated) and the truncated tail of an output file; raises
    ``BatchInputError`` unless every complete line is a result and the tail starts like one (see ``done_ids``)."""
    parts = path.read_bytes().split(b"\n")
    tail = parts.pop()  # after the final newline: b"" unless the last line is truncated
    keep, seen, bad = [], set(), 0
    for n, part in enumerate(parts, 1):
        if not part.strip():
            bad += 1
            continue
        try:
            obj = json.loads(part)
            key = json.dumps(obj["id"]) if isinstance(obj, dict) and obj.keys() >= RESULT_KEYS else None
        except (ValueError, RecursionError):  # bad JSON or UTF-8
            key = None
        if key is None:
            raise BatchInputError(f"{path}: line {n} is not a batch result (a JSON object with "
                                  f"{', '.join(sorted(RESULT_KEYS))}): refusing to overwrite a file this job did not "
                                  "write; give another --output")
        if key in seen:
            bad += 1
            continue
        seen.add(key)
        keep.append(part + b"\n")
    start = b'{"id": '  # how append_line's lines begin
    if tail and not (tail.startswith(start) or start.startswith(tail)):
        raise BatchInputError(f"{path}: its last line is not a batch result: refusing to overwrite a file this job "
                              "did not write; give another --output")
    return seen, keep, bad, tail


def done_ids(path: str | Path, log: Callable[[str], None] = lambda s: None) -> tuple[set[str], bool]:
    """Ids (as ``Row.key``) already in the output, and whether the file was replaced (reopen it then).

    Only a file this module wrote is touched: every complete line must be a result (a JSON object with
    ``RESULT_KEYS``) and a truncated last line must start like one, else ``BatchInputError`` and the file is left
    as it is. The truncated last line (a kill mid-write) is cut off in place; repeated ids or blank lines (not
    written by this module) make an atomic rewrite of the file without them.
    """
    path = Path(path)
    if not path.exists():
        return set(), False
    seen, keep, bad, tail = _scan(path)
    if tail or bad:
        log(f"{path}: dropping {bad + bool(tail)} incomplete, blank or repeated line(s) left by an interrupted run")
    if bad:
        atomic_write(path, keep)
    elif tail:
        os.truncate(path, path.stat().st_size - len(tail))
    return seen, bool(bad)


def append_line(f: Any, obj: Mapping[str, Any]) -> None:
    """Append ``obj`` as one JSON line with a single write, then flush and fsync: durable once this returns."""
    f.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


# ---- planning ----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    index: int
    decoder: Decoder
    rows: list[Row]
    ids: list[list[int]]  # prompt token ids per row
    budgets: list[int]


def plan_batches(rows: list[Row], ids: Mapping[str, list[int]], decoder_factory: Callable[[Sampling], Decoder],
                 default_sampling: Sampling, default_max_new: int, batch_size: int) -> list[Batch]:
    """Group rows by decoder (sampling settings), sort each group by (budget, prompt length), cut into batches."""
    groups: dict[Decoder, list[Row]] = {}
    for row in rows:
        s = dataclasses.replace(default_sampling, **{k: row.settings[k] for k in SAMPLING_KEYS if k in row.settings})
        groups.setdefault(decoder_factory(s), []).append(row)
    batches: list[Batch] = []
    for dec, group in groups.items():  # equal budgets together: the loop's output width is the largest budget
        group = sorted(group, key=lambda r: (r.settings.get("max_new_tokens", default_max_new), len(ids[r.key])))
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            batches.append(Batch(len(batches), dec, chunk, [ids[r.key] for r in chunk],
                                 [int(r.settings.get("max_new_tokens", default_max_new)) for r in chunk]))
    return batches


def bucket(rows: int, batch_size: int, mesh: jax.sharding.Mesh | None = None) -> int:
    """The batch width ``rows`` rows are padded to: the next power of two (at most ``batch_size``), then a multiple of
    the mesh's data axis. A few shapes to compile, and one row never runs ``batch_size`` wide."""
    return pad_rows(min(1 << (rows - 1).bit_length(), batch_size), mesh)


def _open_locked(path: Path) -> Any:
    """Open the output for appending, holding an exclusive lock: one job per output file."""
    f = open(path, "ab")  # noqa: SIM115 - the caller closes it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BatchInputError(f"{path} is being written by another batch job") from None
    return f


def _agree(todo: np.ndarray) -> np.ndarray:
    """Process 0's list of batches to run, on every process (they must run the same batches in lockstep)."""
    if jax.process_count() == 1:
        return todo
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(todo))


def _row_stats(res: Result, b: int, decoder: Decoder, batch: Batch) -> dict[str, Any]:
    toks = res.tokens[b]
    st: dict[str, Any] = {"prompt_tokens": res.prompt_tokens[b], "new_tokens": len(toks),
                          "finish": "eos" if toks and toks[-1] in decoder.eos_ids else "length",
                          "mode": decoder.mode, "batch": batch.index, "batch_rows": len(batch.rows),
                          "batch_tokens_per_s": round(res.tokens_per_s, 2)}
    if res.stats is not None:
        st.update(res.stats.summary(b))
    return st


def run_batch_job(input_path: str | Path, output_path: str | Path, decoder_factory: Callable[[Sampling], Decoder],
                  params: Params, tokenizer: TokenizerLike, batch_size: int, default_max_new: int, *,
                  default_sampling: Sampling | None = None, mesh: jax.sharding.Mesh | None = None, chat: bool = False,
                  seed: int = 0, init: Mapping[str, float] | None = None,
                  on_error: Literal["skip", "reject"] = "skip", progress: bool = True,
                  on_result: Callable[[dict[str, Any]], None] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every prompt of ``input_path`` not yet in ``output_path``; returns a summary dict.

    ``decoder_factory(sampling)`` gives the (AR or SSD) decoder for a row's sampling settings (the defaults
    overridden per row). With ``mesh``, decoders run as ``sharding.MeshDecoder`` with rows split over the data
    axis and ``params`` are placed on the mesh (a no-op when loaded there). ``init`` (e.g. ``{"theta": 0.6}``)
    goes to SSD decoders' ``init_stats``. ``on_result`` sees each result once its line is durable. Only process 0
    writes the output in a multi-process job. Malformed input lines are reported through ``log`` (default:
    stderr) and skipped, or, with ``on_error="reject"``, raise ``BatchInputError`` before anything runs.
    """
    if on_error not in ("skip", "reject"):
        raise ValueError(f"on_error must be 'skip' or 'reject', got {on_error!r}")
    validate.value("batch_size", batch_size)
    validate.value("max_new_tokens", default_max_new)
    output_path = Path(output_path)
    if output_path.exists() and Path(input_path).exists() and os.path.samefile(input_path, output_path):
        raise BatchInputError(f"output {output_path} is the input file {input_path}: give another --output")
    if output_path.is_file():
        _scan(output_path)  # refuse a file that is not this job's results before reading or reporting anything
    default_sampling = default_sampling or Sampling()
    log = log or (lambda s: print(f"jaxspec batch: {s}", file=sys.stderr, flush=True))
    writer = jax.process_index() == 0
    rows, bad = read_rows(input_path)
    ids: dict[str, list[int]] = {}
    valid = []
    context = decoder_factory(default_sampling).cfg.max_seq_len
    for row in rows:  # tokenize up front: too-long prompts are input errors too, reported by line
        text = tokenizer.apply_chat_template([{"role": "user", "content": row.prompt}]) if chat else row.prompt
        toks = list(tokenizer.encode(text))
        budget = int(row.settings.get("max_new_tokens", default_max_new))
        if not toks:
            bad.append((row.line, "prompt encodes to no tokens"))
        elif len(toks) + budget > context:
            bad.append((row.line, f"prompt ({len(toks)} tokens) + {budget} new tokens exceed the context ({context})"))
        else:
            ids[row.key] = toks
            valid.append(row)
    errors = [f"line {n}: {msg}" for n, msg in sorted(bad)]
    if errors and on_error == "reject":
        raise BatchInputError(f"{input_path}: {len(errors)} malformed line(s), nothing run: " + "; ".join(errors))
    for e in errors:
        log(f"{input_path}: skipping {e}")

    batches = plan_batches(valid, ids, decoder_factory, default_sampling, default_max_new, batch_size)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    out = None
    try:
        done: set[str] = set()
        if writer:
            out = _open_locked(output_path)
            done, replaced = done_ids(output_path, log)
            if replaced:
                out.close()
                out = _open_locked(output_path)
        todo = _agree(np.asarray([any(r.key not in done for r in b.rows) for b in batches], bool))
        n_done = sum(r.key in done for r in valid)
        summary = {"rows": len(valid), "malformed": errors, "already_done": n_done, "written": 0,
                   "batches": int(todo.sum()), "new_tokens": 0}
        if mesh is not None and batches:
            params = shard_params(params, batches[0].decoder.cfg, mesh)
        bar = None
        if progress and writer:
            from tqdm import tqdm

            bar = tqdm(total=len(valid) - n_done, unit="row", desc="batch job", file=sys.stderr)
        t0 = time.perf_counter()
        for batch in (b for b, t in zip(batches, todo, strict=True) if t):
            dec = batch.decoder if mesh is None else MeshDecoder.wrap(batch.decoder, mesh)
            pad = bucket(len(batch.rows), batch_size, mesh) - len(batch.rows)  # copies of the first row, budget 1
            kw = dict(init or {}) if dec.mode == "ssd" else {}
            res = generate(dec, params, batch.ids + [batch.ids[0]] * pad, batch.budgets + [1] * pad,
                           seed=seed + batch.index, **kw)
            for b, row in enumerate(batch.rows):
                if row.key in done:
                    continue
                toks, st = res.tokens[b], _row_stats(res, b, batch.decoder, batch)
                text = tokenizer.decode(toks[:-1] if st["finish"] == "eos" else toks)  # as generate.py: no EOS
                result = {"id": row.id, "text": text, "token_ids": toks, "stats": st}
                summary["new_tokens"] += len(toks)
                if out is not None:
                    append_line(out, result)
                    summary["written"] += 1
                done.add(row.key)
                if on_result is not None:
                    on_result(result)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{summary['new_tokens'] / (time.perf_counter() - t0):.1f} tok/s")
        summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
        summary["tokens_per_s"] = round(summary["new_tokens"] / max(summary["elapsed_s"], 1e-9), 2)
        if bar is not None:
            bar.close()
        return summary
    finally:
        if out is not None:
            out.close()


def iter_results(path: str | Path) -> Iterator[dict[str, Any]]:
    """The complete result lines of an output file."""
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                yield json.loads(line)
