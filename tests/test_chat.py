"""Interactive chat: each turn appends only its new tokens to the warm cache, and greedy answers equal single-shot
generation on the conversation's ids; the REPL works through a pseudo-terminal."""

import os
import pty
import select
import sys
from pathlib import Path

import jax
import pytest
import tinymodel

from jaxspec.chat import ChatSession
from jaxspec.config import SkipMask
from jaxspec.decode import Decoder, generate
from jaxspec.speculative import SpecDecoder

CFG = tinymodel.CFG
ROOT = Path(__file__).resolve().parents[1]


class NumberTokenizer:
    """Text of space-separated token ids; the chat template joins the messages' contents (so the tiny model,
    trained on arithmetic progressions, sees progressions)."""

    eos_ids = (0,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return "".join(f"{i} " for i in ids)

    def _decode(self, ids: list[int], skip_special: bool, at_start: bool = True) -> str:
        return self.decode(ids)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return "".join(m["content"].strip() + " " for m in messages)


@pytest.fixture(scope="module")
def params():
    return tinymodel.trained()


def numbers(start: int, stride: int, n: int) -> str:
    return " ".join(map(str, tinymodel.progression(start, stride, n)))


@pytest.mark.parametrize("dec", [Decoder(CFG), SpecDecoder(CFG, skip=SkipMask(attn=(1,), mlp=(2,)), max_draft=4)],
                         ids=["ar", "ssd"])
def test_turns_append_to_the_cache_and_match_single_shot(params, dec):
    chat = ChatSession(dec, params, NumberTokenizer(), max_new=12)
    history: list[int] = []
    compiled: list[int] = []  # decode loops compiled after each turn
    compiles: list[str] = []  # the XLA compilations while a turn streams (reading the streamed tokens included)

    def count(name: str, secs: float, **kw: object) -> None:
        if name.endswith("backend_compile_duration"):
            compiles.append(str(kw.get("fun_name", name)))

    for turn, (start, stride) in enumerate([(10, 3), (50, 2), (7, 1)]):
        before = list(chat.ids)
        jax.monitoring.register_event_duration_secs_listener(count)
        try:
            text = "".join(chat.send(numbers(start, stride, 5)))
        finally:
            jax.monitoring.unregister_event_duration_listener(count)
        if turn == 2:  # a warm conversation (the first append compiled in turn 2) compiles nothing, streaming included
            assert compiles == [], f"turn {turn + 1} compiled: {compiles}"
        compiles.clear()
        new = chat.ids[len(before):]
        prompt_new = chat.last["new_prompt_tokens"]
        answer = new[prompt_new:]
        assert text == NumberTokenizer().decode(answer)
        # Single-shot greedy generation on the whole conversation so far gives the same answer.
        history = before + new[:prompt_new]
        assert generate(Decoder(CFG), params, [history], 12).tokens[0] == answer
        # Turn 2 on writes only the new tokens (plus the answer's last one or two, never written by the loop).
        if turn:
            assert prompt_new <= chat.last["fed_tokens"] <= prompt_new + 2
        compiled.append(Decoder.run._cache_size())
        assert len(answer) == 12 and chat.reprefills == 0
    assert compiled[1:] == compiled[:-1]  # later turns reuse the compiled decode loop
    chat.reset()
    assert chat.ids == [] and chat.cache_len == 0


def test_interrupted_answer_stays_in_the_conversation(params):
    chat = ChatSession(Decoder(CFG), params, NumberTokenizer(), max_new=40, steps_per_call=2)
    pieces = chat.send(numbers(10, 3, 5))
    next(pieces)
    chat.interrupted = True
    list(pieces)
    partial = chat.ids[5:]
    assert 0 < len(partial) < 40
    before = list(chat.ids)
    "".join(chat.send(numbers(20, 1, 4)))
    history = before + chat.ids[len(before):len(before) + 4]
    assert generate(Decoder(CFG), params, [history], 40).tokens[0] == chat.ids[len(history):]


@pytest.mark.filterwarnings("ignore:os.fork")  # the child execs at once
def test_repl_through_a_pseudo_terminal(tmp_path):
    """/stats, /reset, an unknown command and /exit through a real pty (the tiny model, random weights)."""
    script = tmp_path / "repl.py"
    script.write_text(f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import jax
from test_chat import NumberTokenizer
from jaxspec.chat import ChatSession, repl
from jaxspec.decode import Decoder
from jaxspec.model import init_params
import tinymodel
cfg = tinymodel.CFG
sys.exit(repl(ChatSession(Decoder(cfg), init_params(cfg, jax.random.key(0)), NumberTokenizer(), max_new=6)))
""")
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, str(script)])
    out = b""

    def until(marker: bytes, timeout: float = 120.0, check: bool = True) -> bool:
        nonlocal out
        while marker not in out:
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready or not check, f"timed out waiting for {marker!r}; got {out!r}"
            if not ready:
                return False
            out += os.read(fd, 4096)
        return True

    until(b">>> ")
    # Ctrl-C at the prompt does not end the session. CPython's input() writes the prompt before it blocks in
    # read(): a SIGINT in between only sets a flag and the read goes on waiting (a loaded CI machine hit this),
    # so a Ctrl-C that shows no answer within a few seconds is pressed again, as a user would.
    assert any(os.write(fd, b"\x03") and until(b"to quit", 3.0, check=False) for _ in range(20)), out
    for line, marker in [(b"5 8 11", b">>> "), (b"/stats", b"turns=1"), (b"/bogus", b"unknown command"),
                         (b"7 9", b">>> "), (b"/stats", b"turns=2"), (b"/reset", b"new conversation"),
                         (b"/stats", b"turns=0")]:
        out = b""
        os.write(fd, line + b"\n")
        until(marker)
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
