"""Multi-turn chat whose KV cache stays on the device: each turn appends only its new tokens.

A ``ChatSession`` owns the conversation: its token ids (the cache holds all but the newest, as in ``decode.State``),
the messages, and the decode state. ``send(text)`` renders the chat template for the whole conversation, keeps
only what follows the text already in the cache (the template's delta: end of the last answer, the new user turn,
the assistant header), appends those tokens to the cache, and streams the answer. Greedy output therefore equals a
single-shot ``generate`` on the conversation's ids. ``repl`` is the terminal loop (``generate.py --interactive``).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import jax
import numpy as np

from jaxspec.decode import (
    MIN_WINDOW,
    Decoder,
    State,
    bucket,
    commit,
    grow,
    prefill,
    row_tokens,
    stream,
    to_device,
    write_tokens,
)
from jaxspec.model import Params
from jaxspec.tokenizer import StreamDecoder


class ChatSession:
    """A conversation with ``decoder`` (AR or speculative); ``send`` one user message at a time. Answers stream in
    calls of up to ``steps_per_call`` steps, an update about every ``update_s`` seconds (``decode.stream``)."""

    def __init__(self, decoder: Decoder, params: Params, tok: Any, max_new: int = 256, system: str | None = None,
                 seed: int = 0, steps_per_call: int = 64, update_s: float = 0.1, **init: float) -> None:
        self.decoder, self.params, self.tok, self.max_new = decoder, params, tok, max_new
        self.system, self.seed, self.steps_per_call, self.init = system, seed, steps_per_call, dict(init)
        self.update_s = update_s
        self.eos = tuple(getattr(tok, "eos_ids", ())) or decoder.cfg.eos_ids
        self.interrupted = False  # set (e.g. by a SIGINT handler) to end the current answer early
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the compiled functions stay)."""
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = []  # every token of the conversation; the cache holds all but the last
        self.text = ""  # the rendered conversation that ``ids`` encode
        self.state: State | None = None
        self.last: dict[str, float | int] = {}
        self.turns = self.reprefills = self.fed = 0  # fed: tokens written to the cache before the last answer

    @property
    def cache_len(self) -> int:
        return 0 if self.state is None else int(self.state.cache.lengths[0])

    def _render(self, user: str) -> str:
        return self.tok.apply_chat_template([*self.messages, {"role": "user", "content": user}])

    def _append(self, new: list[int]) -> State:
        """The state with ``new`` tokens added to the conversation and a fresh output buffer for the answer.

        The cache already holds the conversation but for its last token or two (a decode loop that stops does not
        write its final token; a speculative cycle may have written past it, which is rolled back), so only those
        and ``new`` are written: the cache ends up holding ``len(self.ids) + len(new) - 1`` tokens.
        """
        dec, st = self.decoder, self.state
        cfg = dec.cfg
        keep = min(int(np.asarray(st.cache.lengths)[0]), len(self.ids) - 1)
        feed = [*self.ids[keep:], *new][:-1]
        T = bucket(len(feed))
        st = grow(st.replace(cache=st.cache.replace(lengths=to_device(np.asarray([keep], np.int32)))),
                  keep + max(T, len(feed) + dec.extra + 1), cfg.max_seq_len + dec.extra, MIN_WINDOW)
        toks = np.zeros((1, T), np.int32)
        toks[0, : len(feed)] = feed
        self.fed = len(feed)
        _, cache = write_tokens(self.params, dec, st.cache, toks, [keep + len(feed)], [len(feed)])
        history = st.history  # n-gram drafts search the whole conversation, this turn's tokens included
        if history is not None:  # built on the host (valid up to the cache's length; the rest is never read)
            hist = np.zeros(history.shape, np.int32)
            hist[0, : len(self.ids) + len(new)] = [*self.ids, *new]
            history = to_device(hist)
        room = cfg.max_seq_len - len(self.ids) - len(new)
        return commit(st.replace(
            cache=cache, history=history, last=to_device(np.asarray([new[-1]], np.int32)),
            out=to_device(np.zeros(st.out.shape, np.int32)), n_out=to_device(np.zeros(st.n_out.shape, np.int32)),
            done=to_device(np.zeros(st.done.shape, bool)),
            budget=to_device(np.asarray([min(self.max_new, room)], np.int32)),
            stats=dec.init_stats(1, self.max_new, **self.init)))

    def send(self, user: str) -> Iterator[str]:
        """Add a user message and stream the answer's text. Stops early (keeping the partial answer in the
        conversation) when ``interrupted`` is set; the next ``send`` continues the conversation."""
        t0 = time.perf_counter()
        full = self._render(user)
        if self.state is not None and full.startswith(self.text):
            new = self.tok.encode(full[len(self.text):], add_bos=False)
            if self.ids[-1] in self.eos and new[:1] == self.ids[-1:]:
                new = new[1:]  # the answer's end-of-turn token is already in the conversation
        else:  # first turn, or a template that rewrites history: prefill everything
            self.reprefills += self.state is not None
            self.state, self.ids, new = None, [], self.tok.encode(full)
        if len(self.ids) + len(new) + 1 > self.decoder.cfg.max_seq_len:
            raise ValueError(f"the conversation ({len(self.ids) + len(new)} tokens) would exceed the model's context "
                             f"of {self.decoder.cfg.max_seq_len}: /reset to start over")
        if self.state is None:
            self.fed = len(new)  # and the answer's first token comes with the prefill
            state = prefill(self.params, self.decoder, [new], self.max_new, self.seed, MIN_WINDOW, **self.init)
        else:
            state = self._append(new)
        self.ids += new
        self.messages.append({"role": "user", "content": user})
        self.interrupted, out, fed, t_first = False, StreamDecoder(self.tok), 0, None
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        try:
            for state in stream(self.decoder, self.params, state, self.steps_per_call,  # noqa: B020
                                update_s=self.update_s):
                ids = row_tokens(state, 0, fed)
                t_first = t_first or time.perf_counter()
                fed += len(ids)
                piece = out.put([i for i in ids if i not in self.eos])
                if piece:
                    yield piece
                if self.interrupted:
                    break
            yield out.flush()
        finally:  # also when the consumer stops early: the conversation keeps what was generated
            answer = row_tokens(state)
            n = len(answer)
            self.state, self.ids = state, self.ids + answer
            content = self.tok.decode([i for i in answer if i not in self.eos])
            self.messages.append({"role": "assistant", "content": content})
            self.text = full + content
            stats = state.stats
            if stats is not None:  # the speculative threshold carries over to the next turn
                self.init["theta"] = float(stats.theta[0])
            t2 = time.perf_counter()
            self.turns += 1
            self.last = {"new_prompt_tokens": len(new), "fed_tokens": self.fed, "prefill_s": round(t1 - t0, 4),
                         "ttft_s": round((t_first or t2) - t0, 4), "new_tokens": n,
                         "tokens_per_s": round(n / (t2 - t1), 2) if t2 > t1 else 0.0}

    def stats(self) -> dict[str, float | int]:
        return {"turns": self.turns, "conversation_tokens": len(self.ids), "cache_len": self.cache_len,
                "cache_capacity": 0 if self.state is None else self.state.cache.max_len,
                "reprefills": self.reprefills, **self.last}


HELP = "commands: /reset (new conversation), /stats, /exit (or Ctrl-D); Ctrl-C stops an answer"


def repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Read user messages until /exit or end of input; stream each answer; Ctrl-C interrupts only the answer."""
    print(HELP, file=out, flush=True)

    def on_sigint(signum: int, frame: object) -> None:
        session.interrupted = True

    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to quit)", file=out, flush=True)
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(new conversation)", file=out, flush=True)
        elif line == "/stats":
            print(" ".join(f"{k}={v}" for k, v in session.stats().items()), file=out, flush=True)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=out, flush=True)
        else:
            previous = signal.signal(signal.SIGINT, on_sigint)
            try:
                for piece in session.send(line):
                    out.write(piece)
                    out.flush()
            except ValueError as e:
                print(f"error: {e}", file=out, flush=True)
            finally:
                signal.signal(signal.SIGINT, previous)
            print(" [interrupted]" if session.interrupted else "", file=out, flush=True)
