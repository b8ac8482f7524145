"""Fuzzing the validators with random (mostly bad) values: each either returns a value that obeys its rule or raises
``ValueError`` with one short line; nothing else escapes, whatever the input."""

from __future__ import annotations

import json
import math
from argparse import Namespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxspec import validate
from jaxspec.batch import parse_line, read_rows
from jaxspec.config import PRESETS, Config
from jaxspec.profile import Profile
from jaxspec.sampling import Sampling

# Lone surrogates included: what undecodable argv bytes and "\ud800" in JSON turn into.
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
TEXT = st.text(max_size=12) | st.text(st.sampled_from("a é\n\x00") | SURROGATE, min_size=1, max_size=6)
SCALARS = st.one_of(
    st.none(), st.booleans(), TEXT,
    st.integers(), st.integers(min_value=2**31 - 3, max_value=2**31 + 3), st.integers(min_value=10**20),
    st.integers(max_value=-(10**20)), st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(TEXT, SCALARS, max_size=2))


def one_line(e: Exception) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and len(msg) < 400, msg
    msg.encode("utf-8")  # printable on any stderr: no lone surrogates echoed back


def check_accepted(name: str, v: object) -> None:
    if name == "prompt":
        assert isinstance(v, str) and v and v.encode("utf-8")
        return
    assert isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    assert abs(v) <= 2**32 and validate.value(name, v) == v  # bounded, and a fixed point of its rule


def _rules(name: str, v: object) -> None:
    try:
        out = validate.value(name, v)
    except ValueError as e:
        one_line(e)
        return
    check_accepted(name, out)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(validate.RULES)), v=VALUES)
def test_rules(name, v):
    _rules(name, v)


@settings(max_examples=200, deadline=None)
@given(v=TEXT)
def test_text(v):
    _rules("prompt", v)


@settings(max_examples=200, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(validate.RULES) + ["ckpt", "json"]), VALUES, max_size=6))
def test_flags(values):
    args = Namespace(**values)
    try:
        validate.flags(args)
    except ValueError as e:
        one_line(e)
        assert str(e).startswith("--")  # names the flag as typed
        return
    for name, v in vars(args).items():
        if name in validate.RULES and v is not None:
            check_accepted(name, v)


def half(valid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` half the time, a random (mostly bad) value otherwise: whole rows are often valid too."""
    return st.booleans().flatmap(lambda ok: valid if ok else VALUES)


ROW = st.fixed_dictionaries(
    {"id": half(st.integers(-5, 5) | TEXT), "prompt": half(TEXT)},
    optional={"max_new_tokens": half(st.integers(1, 64)), "temperature": half(st.floats(0, 2)),
              "top_k": half(st.integers(0, 50)), "top_p": half(st.floats(0.01, 1))})
ROWS = ROW | ROW.map(lambda r: {**r, "extra": 1}) | VALUES


@settings(max_examples=400, deadline=None)
@given(obj=ROWS)
def test_rows(obj):
    line = json.dumps(obj, allow_nan=True)  # NaN / Infinity as Python's json reads and writes them
    try:
        row = parse_line(line, 1)
    except ValueError as e:
        one_line(e)
        return
    assert row.prompt.encode("utf-8") and json.dumps(row.id, ensure_ascii=False).encode("utf-8")
    Sampling(**{k: row.settings[k] for k in ("temperature", "top_k", "top_p") if k in row.settings})
    assert 1 <= row.settings.get("max_new_tokens", 1) <= validate.MAX_TOKENS


def test_one_bad_row_is_that_rows_error(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = ['{"id": 1, "prompt": "ok"}', '{"id": 2, "prompt": "\\ud800"}', "[" * 100_000, '{"id": 3, "prompt": "\xff"}']
    path.write_bytes("\n".join(rows).encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    good, errors = read_rows(path)
    assert [r.id for r in good] == [1]
    assert [(n, m.split(" (")[0]) for n, m in errors] == [(2, "'prompt' is not valid Unicode"), (3, "invalid JSON"),
                                                         (4, "not valid UTF-8")]


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.binary(max_size=40) | ROWS.map(lambda o: json.dumps(o).encode()), max_size=6))
def test_read_rows_never_fails_on_content(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("rows") / "in.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    rows, errors = read_rows(path)  # one bad row is that row's error, never the whole job's
    for _, msg in errors:
        assert msg and "\n" not in msg
    assert len(rows) + len(errors) <= len(lines)


@settings(max_examples=200, deadline=None)
@given(d=st.fixed_dictionaries({"mask": st.one_of(st.just({"attn": [1], "mlp": []}), VALUES)},
                               optional={"threshold": VALUES, "max_draft": VALUES, "use_ssd": VALUES,
                                         "ngram_adaptive": VALUES, "model_id": VALUES}))
def test_profiles(d):
    try:
        prof = Profile.from_json(d)
    except ValueError as e:
        one_line(e)
        return
    assert 0.0 <= prof.threshold <= 1.0 and 1 <= prof.max_draft <= 64
    assert isinstance(prof.use_ssd, bool) and prof.ngram_adaptive in (d.get("ngram_adaptive"), False)


FIELDS = sorted(validate.CONFIG_INTS) + ["norm_eps", "rope_theta", "bos_id", "eos_ids", "dtype", "tie_embeddings"]


EDGES = [-1, 0, 1, 2, 3, 4, 8, 63, 64, 255, 256, 2**40, 0.5, 1e-5, 1e12, math.inf, math.nan, "float16", None, [], [3]]


def _config(field: str, v: object) -> None:
    d = {**PRESETS["tiny"].to_json(), field: v}
    try:
        cfg = Config.from_json(d)
    except ValueError as e:
        one_line(e)
        return
    assert cfg.n_layers >= 0 and cfg.head_dim >= 2 and cfg.n_heads % cfg.n_kv_heads == 0
    assert all(0 <= i < cfg.vocab_size for i in cfg.eos_ids) and cfg.max_seq_len <= validate.MAX_TOKENS


@pytest.mark.parametrize("field", FIELDS)
def test_config_edges(field):
    for v in EDGES:
        _config(field, v)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), v=VALUES | st.lists(st.integers(-1, 300), max_size=3))
def test_configs(field, v):
    _config(field, v)


@pytest.mark.parametrize("temperature", [math.inf, math.nan, -1.0, 1e9])
def test_sampling_rejects_nonfinite_or_absurd_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be"):
        Sampling(temperature)
