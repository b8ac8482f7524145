"""Tokenizer tests: LLaMA-2 sentencepiece vocab against llama.cpp's reference cases, SmolLM2 byte-level BPE from its
GGUF, save/from_dir round trips, chat templates and streaming decode."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import jinja2
import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from jaxspec.tokenizer import StreamDecoder, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "llama2_vocab"
LLAMA_GGUF = FIXTURES / "ggml-vocab-llama-spm.gguf"

TRICKY = [
    "Hello world",
    " leading space and trailing  ",
    "\n\nnew\nlines\n",
    "digits 12345 and 3.14159, 1,000,000",
    "unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 中文测试，这是一个句子。",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "def f(x):\n    if x:\n\treturn [i ** 2 for i in range(10)]  # comment\n",
    "tabs\tand\u00a0nbsp and zero\u200bwidth",
    "It's I'M we'd THEY'LL",
]


def _reference_cases() -> list[tuple[str, list[int]]]:
    """llama.cpp's ``.inp``/``.out`` pairs: each text ends with a ``\\n__ggml_vocab_test__\\n`` line."""
    texts = (FIXTURES / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""
    lines = (FIXTURES / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(texts[:-1]) == len(ids) == 46
    return list(zip(texts[:-1], ids, strict=True))


@pytest.fixture(scope="module")
def llama() -> Tokenizer:
    return Tokenizer.from_gguf(LLAMA_GGUF)


@pytest.fixture(scope="module")
def smol_reader(smollm2_gguf: str) -> GGUFReader:
    return GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def smol(smol_reader: GGUFReader) -> Tokenizer:
    return Tokenizer.from_gguf(smol_reader)  # from a reader, not a path


@pytest.fixture(scope="module")
def smol_vocab(smol_reader: GGUFReader) -> dict[str, int]:
    return {t: i for i, t in enumerate(smol_reader.fields["tokenizer.ggml.tokens"].contents())}


# ------------------------------------------------------------------------------------------------ LLaMA-2 (SPM)


@pytest.mark.parametrize("case", range(46))
def test_llama2_reference_cases(llama: Tokenizer, case: int) -> None:
    text, expected = _reference_cases()[case]
    assert llama.encode(text, add_bos=False) == expected  # llama.cpp's test (and the .out) use no BOS
    assert llama.encode(text) == [1, *expected]
    assert llama.decode(expected) == text


def test_llama2_attributes(llama: Tokenizer) -> None:
    assert (llama.vocab_size, llama.bos_id, llama.eos_ids, llama.add_bos) == (32000, 1, (2,), True)
    assert (llama.bos_token, llama.eos_token) == ("<s>", "</s>")
    assert llama.token_to_id("▁Hello") == 15043 and llama.id_to_token(15043) == "▁Hello"
    assert llama.token_to_id("not-a-piece") is None
    assert llama.encode("Hello world") == [1, 15043, 3186]


def test_llama2_special_tokens_in_text(llama: Tokenizer) -> None:
    # As HF's LlamaTokenizerFast: <s>, </s>, <unk> become their ids; the text between gets its own "▁" prefix.
    assert llama.encode("<s>Hello</s>", add_bos=False) == [1, 15043, 2]
    assert llama.encode("Hello <s>there", add_bos=False) == [15043, 29871, 1, 727]
    assert llama.encode("<unk>", add_bos=False) == [0]
    assert llama.encode("<s>[INST] hi [/INST]", add_bos=False)[:2] == [1, llama.token_to_id("▁[")]


def test_llama2_decode_specials(llama: Tokenizer) -> None:
    assert llama.decode([1, 15043, 2]) == "<s> Hello</s>"
    assert llama.decode([1, 15043, 2], skip_special=True) == "Hello"
    assert llama.decode([15043, 2, 3186]) == "Hello</s> world"
    assert llama.decode([15043, 2, 3186], skip_special=True) == "Hello world"
    assert llama.decode(np.array([15043, 3186])) == "Hello world"
    assert llama.decode([]) == ""


@pytest.mark.parametrize("text", TRICKY)
def test_llama2_round_trip(llama: Tokenizer, text: str) -> None:
    assert llama.decode(llama.encode(text, add_bos=False)) == text
    assert llama.decode(llama.encode(text), skip_special=True) == text
    assert llama.decode(llama.encode(text)) == "<s> " + text


def test_llama2_byte_fallback(llama: Tokenizer) -> None:
    ids = llama.encode("🦙", add_bos=False)  # not in the vocab: UTF-8 bytes as <0xXX> pieces
    assert [llama.id_to_token(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert llama.decode(ids) == "🦙"


def test_no_chat_template(llama: Tokenizer) -> None:
    assert llama.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        llama.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------ SmolLM2 (byte-level)


def test_smollm2_attributes(smol: Tokenizer, smol_vocab: dict[str, int]) -> None:
    assert smol.vocab_size == len(smol_vocab) == 49152
    assert smol.bos_id == smol_vocab["<|im_start|>"] == 1
    assert smol.eos_ids == (smol_vocab["<|im_end|>"],) == (2,)
    assert smol.add_bos is False
    assert smol.encode("Hello") == smol.encode("Hello", add_bos=False)
    assert smol.encode("Hello", add_bos=True)[0] == 1


def test_smollm2_special_tokens(smol: Tokenizer, smol_reader: GGUFReader, smol_vocab: dict[str, int]) -> None:
    types = smol_reader.fields["tokenizer.ggml.token_type"].contents()
    control = [t for t, i in smol_vocab.items() if types[i] == 3]
    assert len(control) == 17 and "<|endoftext|>" in control and "<filename>" in control
    for t in control:
        assert smol.encode(t) == [smol_vocab[t]]
        assert smol.is_special(smol_vocab[t])
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids == [1, smol_vocab["user"], smol_vocab["Ċ"], smol_vocab["hi"], 2, smol_vocab["Ċ"]]
    assert smol.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert smol.decode(ids, skip_special=True) == "user\nhi\n"


def test_smollm2_pre_tokenizer(smol: Tokenizer, smol_vocab: dict[str, int]) -> None:
    v = smol_vocab
    assert smol.encode("12345") == [v[d] for d in "12345"]  # Digits(individual_digits=True)
    assert smol.encode("x 42") == [v["x"], v["Ġ"], v["4"], v["2"]]
    assert smol.encode(" Hello world") == [v["ĠHello"], v["Ġworld"]]  # GPT-2 byte-level: space joins the word
    assert smol.encode("Hello world") == [v["Hello"], v["Ġworld"]]  # no add_prefix_space
    assert smol.encode("it's") == [v["it"], v["'s"]]
    assert smol.encode("    return") == [v["ĠĠĠ"], v["Ġreturn"]]  # \s+(?!\S) leaves the last space to the word


@pytest.mark.parametrize("text", TRICKY)
def test_smollm2_round_trip(smol: Tokenizer, text: str) -> None:
    assert smol.decode(smol.encode(text)) == text


def test_smollm2_chat_template(smol: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    user = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert smol.apply_chat_template(msgs) == system + user + "<|im_start|>assistant\n"
    assert smol.apply_chat_template(msgs, add_generation_prompt=False) == system + user
    own = [{"role": "system", "content": "Be brief."}, *msgs]
    assert smol.apply_chat_template(own).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    ids = smol.encode(smol.apply_chat_template(msgs))
    assert ids[0] == 1 and ids.count(1) == 3 and smol.decode(ids[ids.index(1, -5) :]) == "<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------- templates in general


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    tok = copy.copy(tok)
    tok.chat_template = template
    return tok


def test_chat_template_features(llama: Tokenizer) -> None:
    # LLaMA-2-chat style: bos/eos variables, raise_exception, loop controls, trim_blocks/lstrip_blocks, tojson.
    template = (
        "{% for m in messages %}\n"
        "  {% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}\n"
        "  {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
        "{{ bos_token }}[{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}\n"
        "{% endfor %}"
    )
    tok = _with_template(llama, template)
    msgs = [
        {"role": "user", "content": "héllo"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    assert tok.apply_chat_template(msgs) == '<s>[user] "héllo"</s>\n<s>[assistant] "ok"</s>\n'
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    with pytest.raises(jinja2.exceptions.SecurityError):  # sandboxed and immutable, as HF
        _with_template(llama, "{{ messages.append(1) }}").apply_chat_template([])


# ---------------------------------------------------------------------------------------------- save / from_dir


@pytest.mark.parametrize("name", ["llama", "smol"])
def test_save_from_dir_round_trip(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    tok.save(tmp_path)
    model_file = "tokenizer.model" if name == "llama" else "tokenizer.json"
    assert sorted(os.listdir(tmp_path)) == sorted([model_file, "tokenizer_config.json"])  # no temp files left
    back = Tokenizer.from_dir(tmp_path)
    attrs = ("vocab_size", "bos_id", "eos_ids", "add_bos", "chat_template", "bos_token", "eos_token")
    assert [getattr(back, a) for a in attrs] == [getattr(tok, a) for a in attrs]
    for text in [*TRICKY, "<s>x</s>", "<|im_start|>a<|im_end|>"]:
        ids = tok.encode(text)
        assert back.encode(text) == ids
        assert back.decode(ids) == tok.decode(ids)


def test_save_replaces_stale_model_file(smol: Tokenizer, llama: Tokenizer, tmp_path: Path) -> None:
    llama.save(tmp_path)
    smol.save(tmp_path)  # a byte-level tokenizer must not be shadowed by the old tokenizer.model
    assert Tokenizer.from_dir(tmp_path).vocab_size == smol.vocab_size


def test_from_dir_hf_config(llama: Tokenizer, tmp_path: Path) -> None:
    llama.save(tmp_path)
    cfg = {
        "add_bos_token": False,
        "bos_token": {"content": "<s>", "lstrip": False, "special": True},
        "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2, 0), False)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"
    (tmp_path / "chat_template.jinja").write_text("[{{ messages | length }}]")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "[0]"


def test_from_dir_defaults(llama: Tokenizer, smol: Tokenizer, tmp_path: Path) -> None:
    llama.save(tmp_path / "spm")
    (tmp_path / "spm" / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(tmp_path / "spm")  # bos/eos from the sentencepiece model; LLaMA adds BOS
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == (1, (2,), True, None)
    smol.save(tmp_path / "bpe")
    (tmp_path / "bpe" / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(tmp_path / "bpe")
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (None, (), False)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path / "nothing")


def _tiny_gguf(path: Path, model: str, pre: str = "gpt-2") -> Path:
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(["<eos>", "<tool>", "a", "b", "ab", "Ġ"])
    w.add_token_types([3, 4, 1, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_from_gguf_synthetic(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(_tiny_gguf(tmp_path / "t.gguf", "gpt2"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (6, None, (0,), False)
    assert tok.encode("ab a<tool>b<eos>") == [4, 5, 2, 1, 3, 0]
    assert tok.decode([4, 1, 0], skip_special=True) == "ab<tool>"  # user-defined tokens are not special
    with pytest.raises(ValueError, match="tokenizer model"):
        Tokenizer.from_gguf(_tiny_gguf(tmp_path / "bert.gguf", "bert"))
    with pytest.raises(ValueError, match="pre-tokenizer"):
        Tokenizer.from_gguf(_tiny_gguf(tmp_path / "qwen.gguf", "gpt2", pre="qwen2"))


# ------------------------------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    sd = StreamDecoder(tok, skip_special=skip_special)
    return [sd.put(i) for i in ids] + [sd.flush()]


@pytest.mark.parametrize("name", ["llama", "smol"])
def test_stream_decoder_text(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    for text in TRICKY:
        ids = tok.encode(text, add_bos=False)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks)  # incomplete characters are held back, never printed
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) > 1 and _stream(tok, ids)[:-2] == [""] * (len(ids) - 1)


@pytest.mark.parametrize("name", ["llama", "smol"])
def test_stream_decoder_random_ids(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_token(i).startswith("<0x")] or list(range(100, 400))
    for _ in range(60):
        ids = [rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(tok.vocab_size) for _ in range(30)]
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special=skip)


def test_stream_decoder_window_stays_small(smol: Tokenizer) -> None:
    ids = smol.encode(" ".join(TRICKY) * 20)
    sd = StreamDecoder(smol)
    out, longest = [], 0
    for i in ids:
        out.append(sd.put(i))
        longest = max(longest, len(sd._ids))
    out.append(sd.flush())
    assert "".join(out) == smol.decode(ids)
    assert len(ids) > 1000 and longest <= 8
    assert sd.put([]) == "" and sd.put(smol.encode("a b")) == "a b"  # usable again after flush; lists accepted
    assert sd.put(np.int64(smol.token_to_id("Ġc"))) == " c" and sd.put(np.array([smol.token_to_id("Ġd")])) == " d"
