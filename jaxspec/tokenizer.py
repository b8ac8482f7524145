"""Tokenizers for LLaMA-family checkpoints, built on ``sentencepiece`` and HF ``tokenizers`` (no hand-written BPE).

Two backends sit behind one interface, :class:`Tokenizer`:

* :class:`SentencePieceTokenizer`: LLaMA-2 style sentencepiece BPE (``tokenizer.model``, or GGUF
  ``tokenizer.ggml.model == "llama"``, whose vocab is turned back into a sentencepiece ``ModelProto``), run by the
  ``sentencepiece`` package.
* :class:`ByteLevelTokenizer`: byte-level BPE (``tokenizer.json``, or GGUF ``tokenizer.ggml.model == "gpt2"``, e.g.
  SmolLM2), run by HF ``tokenizers``.

Special tokens written in the text (``<|im_start|>``; for sentencepiece vocabularies ``<s>``, ``</s>``, ``<unk>``)
encode to their single ids, as HF's tokenizers do. :class:`StreamDecoder` turns a growing list of generated ids into
printable text chunks for streaming.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from jaxspec.files import atomic_write

if TYPE_CHECKING:
    import sentencepiece as spm  # imported where used: 15-20 ms that byte-level (HF tokenizer.json) models skip
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

__all__ = ["ByteLevelTokenizer", "SentencePieceTokenizer", "StreamDecoder", "Tokenizer"]

# GGUF token types (llama.cpp's llama_token_type) use the numbers of sentencepiece's SentencePiece.Type.
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6
_SPACE = "\u2581"  # sentencepiece's escaped space "▁"
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe")
_LLAMA3_REGEX = (  # the Split regex of LLaMA-3's tokenizer.json
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer of the ``tokenizer.json`` that llama.cpp names ``pre`` (``tokenizer.ggml.pre``)."""
    if pre == "smollm":  # SmolLM/SmolLM2 tokenizer.json: every digit alone, then GPT-2's byte-level regex
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in ("gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in _LLAMA3_NAMES:
        split = pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_REGEX), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"unsupported GGUF byte-level pre-tokenizer {pre!r} (known: smollm, gpt-2, llama-bpe)")


def _content(tok: Any) -> str | None:
    """``tokenizer_config.json`` spells a token as a string or as an AddedToken dict with a ``content`` key."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template: the interface both backends share.

    Build one with :meth:`from_gguf` or :meth:`from_dir`. Attributes: ``bos_id`` (``None`` if the vocab has none),
    ``eos_ids`` (every id that ends generation), ``vocab_size``, ``add_bos`` (whether :meth:`encode` prepends BOS by
    default) and ``chat_template`` (a jinja2 source, or ``None``). A backend implements ``id_to_token``,
    ``token_to_id``, ``is_special``, ``_encode``, ``_decode``, ``_save_model`` and ``_wants_bos``.
    """

    vocab_size: int
    model_file: str  # the backend's file in a tokenizer directory

    def _configure(self, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool,
                   chat_template: str | None = None) -> None:
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template or None

    # ----------------------------------------------------------------------------------------------- construction

    @staticmethod
    def from_gguf(reader_or_path: GGUFReader | str | os.PathLike[str]) -> Tokenizer:
        """Build the tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata (sentencepiece or byte-level BPE)."""
        from gguf import GGUFReader  # here: gguf (and the yaml it imports) only for GGUF files, not every load

        reader = reader_or_path if isinstance(reader_or_path, GGUFReader) else GGUFReader(reader_or_path)

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        bos_id, eos_id = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
        eos_ids = [
            i
            for i in (eos_id, field("tokenizer.ggml.eot_token_id"), field("tokenizer.ggml.eom_token_id"))
            if i is not None
        ]
        if kind == "llama":
            import sentencepiece as spm

            proto = _sentencepiece_proto(
                tokens,
                field("tokenizer.ggml.scores") or [0.0] * len(tokens),
                types,
                unk_id=field("tokenizer.ggml.unknown_token_id", 0),
                bos_id=bos_id,
                eos_id=eos_id,
                add_dummy_prefix=field("tokenizer.ggml.add_space_prefix", True),
            )
            tok: Tokenizer = SentencePieceTokenizer(spm.SentencePieceProcessor(model_proto=proto.SerializeToString()))
            add_bos = field("tokenizer.ggml.add_bos_token", True)
        elif kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
            pre = field("tokenizer.ggml.pre", "gpt-2")
            vocab = {t: i for i, t in enumerate(tokens)}
            # LLaMA-3's tokenizer.json takes a pre-token found whole in the vocab as is ("ignore_merges").
            hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_NAMES))
            hf.pre_tokenizer = _byte_level_pre_tokenizer(pre)
            hf.decoder = decoders.ByteLevel()
            # Control tokens are special (skipped by decode(skip_special=True)); user-defined ones are plain added
            # tokens. Both are matched whole in the text, before pre-tokenization, as in HF's tokenizer.json.
            kinds = list(zip(tokens, types, strict=True))
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
            hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])
            tok, add_bos = ByteLevelTokenizer(hf), field("tokenizer.ggml.add_bos_token", False)
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'llama', 'gpt2')")
        tok._configure(bos_id, eos_ids, add_bos, field("tokenizer.chat_template"))
        return tok

    @staticmethod
    def from_dir(path: str | os.PathLike[str]) -> Tokenizer:
        """Load an HF-style directory: ``tokenizer.model`` (preferred) or ``tokenizer.json``, plus the optional
        ``tokenizer_config.json`` (chat_template, add_bos_token, bos/eos tokens), ``chat_template.jinja`` and
        ``generation_config.json`` (extra ``eos_token_id``\\s)."""
        root = Path(path)
        cfg = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")
        tok: Tokenizer
        if (root / "tokenizer.model").is_file():
            import sentencepiece as spm

            tok = SentencePieceTokenizer(spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model")))
        elif (root / "tokenizer.json").is_file():
            tok = ByteLevelTokenizer(tokenizers.Tokenizer.from_file(str(root / "tokenizer.json")))
        else:
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {root}")

        def token_id(token: Any) -> int | None:
            name = _content(token)
            return None if name is None else tok.token_to_id(name)

        if "bos_token_id" in cfg:
            bos_id = cfg["bos_token_id"]
        elif "bos_token" in cfg:
            bos_id = token_id(cfg["bos_token"])
        else:
            bos_id = tok.bos_id  # the model's own, if it has one
        if "eos_token_ids" in cfg:
            eos_ids = list(cfg["eos_token_ids"])
        else:
            eos = token_id(cfg["eos_token"]) if "eos_token" in cfg else (tok.eos_ids or (None,))[0]
            extra = gen.get("eos_token_id", [])
            eos_ids = [i for i in [eos, *(extra if isinstance(extra, list) else [extra])] if i is not None and i >= 0]
        add_bos = bool(cfg["add_bos_token"]) if "add_bos_token" in cfg else tok._wants_bos(bos_id)

        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: use the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        tok._configure(bos_id, eos_ids, add_bos, template)
        return tok

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the backend's model file (``tokenizer.model`` or ``tokenizer.json``) and ``tokenizer_config.json``,
        so that :meth:`from_dir` gives this tokenizer back. Files are written atomically; the other backend's model
        file left from an earlier save is removed (``tokenizer.model`` would take precedence)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._save_model(root / self.model_file)
        for other in {"tokenizer.model", "tokenizer.json"} - {self.model_file}:
            (root / other).unlink(missing_ok=True)
        cfg = {
            "add_bos_token": self.add_bos,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "bos_token_id": self.bos_id,
            "eos_token_ids": list(self.eos_ids),
            "chat_template": self.chat_template,
        }
        atomic_write(root / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False).encode("utf-8"))

    # ------------------------------------------------------------------------------------------------ vocabulary

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry (piece) of id ``i``, e.g. ``"▁Hello"`` or ``"ĠHello"``."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or ``None`` if it is not in the vocabulary."""
        raise NotImplementedError

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is a special token (dropped by ``decode(..., skip_special=True)``)."""
        raise NotImplementedError

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    # ------------------------------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS is prepended if ``add_bos`` (default: ``self.add_bos``). Special tokens written
        in the text become their single ids."""
        ids = self._encode(text)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("this vocabulary has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``. Special tokens are written out (``<s>``, ``<|im_end|>``) unless ``skip_special``."""
        return self._decode([int(i) for i in ids], skip_special, at_start=True)

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special: bool, at_start: bool) -> str:
        """:meth:`decode`; ``at_start=False`` decodes ids that continue earlier text (keeps a leading space)."""
        raise NotImplementedError

    def _save_model(self, path: Path) -> None:
        raise NotImplementedError

    def _wants_bos(self, bos_id: int | None) -> bool:
        """Whether encoding prepends BOS when ``tokenizer_config.json`` does not say."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- chat template

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the checkpoint's jinja2 chat template, as HF
        does (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``bos_token``/``eos_token``). Encode
        the result with ``encode(prompt, add_bos=False)`` if the template already writes the BOS token."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template; prompt the model with plain text instead")
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **kwargs}
        template = _compile_template(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-2 style sentencepiece BPE (``tokenizer.model``, or a GGUF ``llama`` vocabulary), run by
    ``sentencepiece``. Control and unknown pieces written in the text (``<s>``, ``</s>``, ``<unk>``) are matched,
    as HF's ``LlamaTokenizer`` does; decoding keeps ``decode(encode(t)) == t`` around the dummy-prefix space."""

    model_file = "tokenizer.model"

    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self._sp = sp
        self.vocab_size = sp.get_piece_size()
        self._special_ids = frozenset(i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i))
        names = sorted((sp.id_to_piece(i) for i in self._special_ids), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._add_dummy_prefix = _load_proto(sp).normalizer_spec.add_dummy_prefix
        bos, eos = sp.bos_id(), sp.eos_id()
        self._configure(bos if bos >= 0 else None, [eos] if eos >= 0 else [], add_bos=True)

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def _encode(self, text: str) -> list[int]:
        """The text is split at the control/unknown pieces and each piece of text in between is encoded on its own,
        so each gets sentencepiece's dummy-prefix space, as HF's ``LlamaTokenizer`` (legacy) does."""
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re is not None else ():
            if m.start() > pos:
                ids += self._sp.encode(text[pos : m.start()])
            ids.append(self._sp.piece_to_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids += self._sp.encode(text[pos:])
        return ids

    def _decode(self, ids: list[int], skip_special: bool, at_start: bool) -> str:
        """Drops the dummy-prefix space of the first text token only; text after a written-out special token keeps
        its space (``[<s>, ▁Hi]`` -> ``"<s> Hi"``, or ``"Hi"`` with ``skip_special``)."""
        out: list[str] = []
        run: list[int] = []
        strip = at_start and self._add_dummy_prefix  # whether sentencepiece's own strip of the first "▁" is wanted
        for i in [*ids, -1]:
            if i >= 0 and i not in self._special_ids:
                run.append(i)
                continue
            if run:  # sentencepiece drops the leading "▁" of every decode call: put it back unless wanted
                text = self._sp.decode(run)
                if not strip and self._add_dummy_prefix and self._sp.id_to_piece(run[0]).startswith(_SPACE):
                    text = " " + text
                out.append(text)
                run, strip = [], False
            if i >= 0 and not skip_special:
                out.append(self._sp.id_to_piece(i))
                strip = False
        return "".join(out)

    def _save_model(self, path: Path) -> None:
        atomic_write(path, self._sp.serialized_model_proto())

    def _wants_bos(self, bos_id: int | None) -> bool:
        return True  # the LLaMA-2 convention


class ByteLevelTokenizer(Tokenizer):
    """Byte-level BPE (``tokenizer.json``, or a GGUF ``gpt2`` vocabulary such as SmolLM2's), run by HF
    ``tokenizers``; added tokens written in the text (``<|im_start|>``) are matched whole."""

    model_file = "tokenizer.json"

    def __init__(self, hf: tokenizers.Tokenizer) -> None:
        self._hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)
        self._configure(None, [], add_bos=False)

    def id_to_token(self, i: int) -> str:
        return self._hf.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def _encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int], skip_special: bool, at_start: bool) -> str:
        if at_start or self._anchor is None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        # Decoders such as Metaspace's strip a leading space at the start: decode after a one-letter anchor.
        anchor_id, anchor = self._anchor
        return self._hf.decode([anchor_id, *ids], skip_special_tokens=skip_special)[len(anchor) :]

    @functools.cached_property
    def _anchor(self) -> tuple[int, str] | None:
        i = self._hf.token_to_id("a")
        return None if i is None or self._hf.decode([i]) != "a" else (i, "a")

    def _save_model(self, path: Path) -> None:
        atomic_write(path, self._hf.to_str().encode("utf-8"))

    def _wants_bos(self, bos_id: int | None) -> bool:
        # An HF post-processor (TemplateProcessing) that prepends BOS means the checkpoint wants one.
        return bos_id is not None and self._hf.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


class StreamDecoder:
    """Incremental detokenizer: feed generated ids with :meth:`put`, print what it returns, then :meth:`flush`.

    The concatenated output equals ``tokenizer.decode(all_ids, skip_special)`` (barring :attr:`max_pending`). Text
    ending in an incomplete UTF-8 sequence (a trailing ``"\\ufffd"``) is held back until the next tokens complete it.
    Each call decodes only a short window of recent tokens (the tokens of the last emitted chunk plus the pending
    ones), so it costs O(1) per token.
    """

    #: Emit anyway once this many tokens are held back: only invalid byte soup gets here (valid UTF-8 split across
    #: byte-level tokens realigns within a few tokens), and it keeps the window, hence the cost per token, bounded.
    max_pending = 32

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._ids: list[int] = []  # window: context tokens, then pending (not yet printed) tokens
        self._at_start = True  # whether the window still starts at the first token of the stream
        self._read = 0  # index in _ids of the first pending token
        self._prefix_text = ""  # decode(_ids[:_read])

    def put(self, ids: int | Iterable[int]) -> str:
        """Add new token id(s) (an int, a sequence or an array); return the text now printable (possibly ``""``)."""
        try:
            self._ids.append(int(ids))  # type: ignore[arg-type]
        except TypeError:
            self._ids.extend(int(i) for i in ids)  # type: ignore[union-attr]
        text = self._decode(self._ids)
        pending = len(self._ids) - self._read
        if pending == 0 or (text.endswith("\ufffd") and pending < self.max_pending):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a truncated character at the end of generation) and reset."""
        out = self._decode(self._ids)[len(self._prefix_text) :] if len(self._ids) > self._read else ""
        self._ids, self._read, self._prefix_text, self._at_start = [], 0, "", True
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer._decode(ids, self.skip_special, at_start=self._at_start)

    def _emit(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        # The pending tokens become the context of the next window; older tokens are dropped.
        context = self._ids[self._read :]
        self._at_start = self._at_start and self._read == 0
        self._ids, self._read = context, len(context)
        self._prefix_text = self._decode(context)
        return new


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template the way HF's ``apply_chat_template`` does."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _load_proto(sp: spm.SentencePieceProcessor) -> sp_pb2.ModelProto:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _sentencepiece_proto(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    unk_id: int,
    bos_id: int | None,
    eos_id: int | None,
    add_dummy_prefix: bool,
) -> sp_pb2.ModelProto:
    """A sentencepiece BPE ``ModelProto`` equivalent to LLaMA-2's ``tokenizer.model``, from a GGUF vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _BYTE in types
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.unk_piece = unk_id, tokens[unk_id]
    trainer.bos_id, trainer.bos_piece = (bos_id, tokens[bos_id]) if bos_id is not None else (-1, "<s>")
    trainer.eos_id, trainer.eos_piece = (eos_id, tokens[eos_id]) if eos_id is not None else (-1, "</s>")
    trainer.pad_id = -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    for token, score, ty in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, score
        piece.type = ty if 1 <= ty <= 6 else _NORMAL
    return proto
