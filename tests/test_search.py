"""Skip-mask search: the proxy against real SSD runs, the noise handling of real timings, the optimizer, a whole
search on the tiny model, profiles (round trip, wrong model refused), calibration data and the CLI's errors."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tinymodel

from jaxspec import data
from jaxspec.config import PRESETS, SkipMask
from jaxspec.decode import Decoder, Result, generate
from jaxspec.draft_model import DraftSpec, draft_forward, with_draft
from jaxspec.profile import (
    ADOPT_MARGIN,
    DEFAULT,
    PUBLISHED_MASKS,
    Profile,
    adopt,
    find_profile,
    load_profile,
    model_id,
    save_profile,
)
from jaxspec.search import (
    Candidate,
    Proxy,
    SearchOptions,
    calibrate,
    mask_to_x,
    measure,
    optimize,
    robust_speedup,
    search,
    simulate,
    starting_points,
    x_to_mask,
)
from jaxspec.speculative import SpecDecoder, SpecStats, update_threshold

CFG = tinymodel.CFG
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [tinymodel.progression(a, s, n) for a, s, n in [(5, 1, 10), (9, 2, 20), (30, 3, 7), (100, 4, 15), (7, 1, 3)]]


@pytest.fixture(scope="module")
def params():
    return tinymodel.trained()


@pytest.fixture(scope="module")
def calib(params):
    return calibrate(params, CFG, PROMPTS, 20, CFG.eos_ids)


def test_proxy_full_model_agrees_and_prefix_reuse_is_exact(params, calib):
    reuse, fresh = Proxy(params, CFG, calib, rows=2), Proxy(params, CFG, calib, rows=2, keep=0)
    agree, _ = reuse(SkipMask())
    assert agree[0][calib.valid].all()  # the draft without skipping is the full model
    for mask in (SkipMask(attn=(1,)), SkipMask(attn=(1, 3)), SkipMask(attn=(1,), mlp=(2, 3))):
        (a1, c1), (a2, c2) = reuse(mask), fresh(mask)
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_allclose(c1, c2, rtol=1e-5)
    assert reuse.layers_run < fresh.layers_run


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_proxy_of_a_cheap_draft_matches_its_real_first_drafts(params, calib, precision):
    """At every continuation position the proxy's draft (copy at ``precision``, narrow heads) predicts what the real
    draft copy predicts from the full model's cache there: teacher forcing through ``draft_forward``."""
    ranking = np.random.default_rng(0).permutation(CFG.vocab_size)
    heads = (0, CFG.vocab_size // 2)
    mask = SkipMask(attn=(2,))
    agree, conf = Proxy(params, CFG, calib, rows=5, precision=precision, heads=heads, ranking=ranking)(mask)
    assert agree.shape == (2, *calib.targets.shape)
    q_tok, q_pos = calib.query_tokens, calib.query_pos
    for j, w in enumerate(heads):
        spec = DraftSpec(precision, w)
        cheap = with_draft(params, CFG, spec, ranking)
        cache = calib.cache.replace(lengths=jnp.asarray(q_pos[:, 0]))
        hits = total = 0
        for c in range(calib.targets.shape[1]):  # one draft step per position, full-model context before it
            logits, _ = draft_forward(cheap, CFG, jnp.asarray(q_tok[:, c: c + 1]), cache.replace(
                lengths=jnp.asarray(q_pos[:, c])), mask, spec)
            top = np.asarray(jnp.argmax(logits[:, -1], -1))
            ok = calib.valid[:, c]
            hits += int(((top == calib.targets[:, c]) == agree[j][:, c])[ok].sum())
            total += int(ok.sum())
        assert hits >= 0.97 * total, (precision, w, hits, total)  # float rounding may flip a near tie


@pytest.mark.parametrize("max_draft", [1, 3])
def test_simulation_replays_real_ssd(params, calib, max_draft):
    """With one draft per cycle the draft always sees the full model's KV, so the replay is exact; with more it
    sees its own KV for earlier drafts, and the replay is close."""
    mask = SkipMask(attn=(1, 3), mlp=(1, 3))
    agree, conf = Proxy(params, CFG, calib, rows=5)(mask)
    sim = simulate(agree[0], conf[0], calib.lengths, max_draft, 0.6)
    real = {k: [] for k in ("verify_calls", "drafted", "accepted")}
    for p in PROMPTS:
        r = generate(SpecDecoder(CFG, eos_ids=CFG.eos_ids, skip=mask, max_draft=max_draft), params, [p], 20)
        for k in real:
            real[k].append(r.stats.summary(0)[k])
    got = {"verify_calls": sim.cycles, "drafted": sim.drafted, "accepted": sim.accepted}
    for k, v in real.items():
        if max_draft == 1:
            assert got[k].tolist() == v, k
        else:
            assert abs(got[k].sum() - sum(v)) <= 0.1 * sum(v) + 2, (k, got[k].tolist(), v)


def test_threshold_rule_on_numpy_matches_the_decoder():
    """The simulator replays ``update_threshold`` with NumPy (float64): same values as the on-device float32 run."""
    rng = np.random.default_rng(0)
    theta, m = rng.random(50), rng.random(50)
    n_draft = rng.integers(0, 6, 50)
    n_acc = np.minimum(rng.integers(0, 6, 50), n_draft)
    ours = update_threshold(theta, m, n_acc, n_draft, 5, xp=np)
    assert all(isinstance(a, np.ndarray) for a in ours)
    ref = update_threshold(jnp.asarray(theta, jnp.float32), jnp.asarray(m, jnp.float32), jnp.asarray(n_acc),
                           jnp.asarray(n_draft), 5)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5)


def test_real_timing_excludes_warmup_and_outliers():
    """Fake decode runs: the warm-up runs are very slow, and one round's SSD runs stall; neither moves the figures."""
    calls = []

    def fake(decoder, params, prompts, max_new, **kw) -> Result:
        calls.append(decoder.mode)
        n = len(calls)
        rate = 100.0 if decoder.mode == "ar" else 150.0  # tokens/s: SSD is 1.5x
        secs = 10 / rate * (50 if n <= 2 else 1)  # the two warm-up runs
        if 6 < n <= 10 and decoder.mode == "ssd":  # round 2 of 3: the SSD runs stall 3x
            secs *= 3
        stats = None
        if decoder.mode == "ssd":
            c = np.asarray
            stats = SpecStats.create(1, 10).replace(drafted_model=c([4]), accepted_model=c([3]), verify_calls=c([2]))
        return Result([[1] * 10], [3], 0.01, secs, 5.0, stats)

    ar, t = measure(None, CFG, [[1, 2, 3], [4, 5, 6]], 10, (0,), [Candidate("c", SkipMask(attn=(1,)))], 3, run=fake)
    assert len(calls) == 2 + 3 * 2 * 2
    assert t.speedup == pytest.approx(1.5) and ar.tokens_per_s == pytest.approx(100.0)
    assert t.tokens_per_s == pytest.approx(150.0) and t.lossless and t.acceptance_rate == pytest.approx(0.75)
    assert robust_speedup([100, 100, 20], [150, 150, 90]) == pytest.approx(1.5)


def test_masks_and_starting_points():
    for n in (4, 30, 40, 80):
        starts = starting_points(n)
        assert starts["none"] == SkipMask()
        for m in starts.values():
            m.validate(n)
            assert x_to_mask(mask_to_x(m, n)) == m
    assert "preset:llama-2-70b" in starting_points(80) and "preset:llama-2-13b" in starting_points(40)
    assert not any(k.startswith("preset:") for k in starting_points(30))


def test_gp_beats_random_on_a_synthetic_objective():
    """Five helpful sublayers among 24; every other skipped sublayer hurts. Equal budgets, same starts."""
    good = np.zeros(24, bool)
    good[[3, 7, 11, 15, 19]] = True

    def best(method: str) -> float:
        ys = []
        optimize(lambda x: ys.append(-(1 + 0.1 * (x & good).sum() - 0.15 * (x & ~good).sum())) or ys[-1],
                 24, 30, [np.zeros(24, int)], method, n_initial=6, seed=0)
        return -min(ys)

    assert best("gp") > best("random")


@pytest.fixture(scope="module")
def searched(params):
    """A whole search of the tiny model over masks × {float32, int8} × {whole head, 40 tokens}, with n-gram and
    hybrid timed beside the self-drafts."""
    opts = SearchOptions(budget=6, max_new=16, drafts=(3,), thetas=(0.6,), n_initial=2, top=1, real_prompts=2,
                         repeats=1, precisions=("float32", "int8"), heads=(0, 40), ngram=((2, 4, 4),),
                         ngram_adaptive=((2, 4, 8),))
    return search(params, CFG, PROMPTS, CFG.eos_ids, opts, progress=False)


def test_search_tiny_model_writes_a_valid_profile(searched, tmp_path):
    res = searched
    prof, info = res.profile, res.profile.info
    assert prof.model_id == model_id(CFG)
    assert len(res.trace) == 6 and {t["source"] for t in res.trace[:3]} >= {"none", "every-other-middle"}
    assert all(set(t["variants"]) == {"float32/0", "float32/40", "int8/0", "int8/40"} for t in res.trace)
    assert info["budget"] == 6 and info["device"]["platform"] == "cpu" and "objective" in info
    cost = info["cost_model"]
    assert set(cost["layers"]) == {"float32", "int8"} and set(cost["head"]["int8"]) == {"0", "40"}
    drafters = [c["drafter"] for c in info["candidates"]]
    assert drafters[0] == "skip" and {"ngram", "hybrid"} <= set(drafters)  # AR first, then every drafter
    assert [c["ngram"] for c in info["candidates"] if c["ngram_adaptive"]] == [[2, 4, 8]]  # and adaptive k
    assert all(c["lossless"] for c in info["candidates"])  # greedy output identical to AR, cheap drafts included
    # Adopted only when every round beat AR by ADOPT_MARGIN (and output matched); else AR, whatever won.
    lows = [min(c["speedups"]) for c in info["candidates"][1:]]
    assert prof.use_ssd == (max(lows) >= 1 + ADOPT_MARGIN) and ("note" in info) == (not prof.use_ssd)
    # The best self-draft is recorded whether or not it beat AR.
    selfs = [c for c in info["candidates"][1:] if c["drafter"] == "skip"]
    sd = prof.self_draft
    assert sd["speedup"] == max(c["speedup"] for c in selfs) and sd["drafter"] == "skip"
    assert sd["draft"]["precision"] in ("float32", "int8") and sd["draft"]["head"] in (0, 40)
    assert 0.0 <= res.report["compile_share"] <= 1.0 and len(info["draft_vocab"]) == 40
    # Round trip through JSON, then refused for another model.
    path = tmp_path / "skip_profile.json"
    save_profile(path, prof)
    back = load_profile(path, CFG)
    assert back.to_json() == json.loads(json.dumps(prof.to_json()))
    save_profile(path, dataclasses.replace(prof, ngram_adaptive=not prof.ngram_adaptive))
    assert load_profile(path, CFG).ngram_adaptive != back.ngram_adaptive == prof.ngram_adaptive
    skip = back.for_drafter("skip")
    assert skip.info["draft"] == sd["draft"] and skip.mask == SkipMask.from_json(sd["mask"])
    with pytest.raises(ValueError, match="another model"):
        load_profile(path, PRESETS["tiny-tied"])
    with pytest.raises(ValueError, match="40-layer"):
        load_profile(next(iter(PUBLISHED_MASKS)), CFG)
    bad = {**prof.to_json(), "self_draft": {**sd, "max_draft": 0}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'self_draft': 'max_draft' must be in 1..64"):
        load_profile(path, CFG)


@pytest.mark.parametrize("precision, head", [("int8", 40), ("float32", 40), ("int8", 0)])
def test_searched_self_draft_is_lossless(params, searched, precision, head):
    """The profile's self-draft, with a searched precision and head forced, decodes greedily exactly as AR."""
    prof = dataclasses.replace(searched.profile, drafter="ngram", self_draft={
        **searched.profile.self_draft, "draft": {"precision": precision, "head": head}})
    use = prof.for_drafter("skip")
    spec = DraftSpec.from_json(use.info["draft"])
    assert (spec.precision, spec.head, use.drafter) == (precision, head, "skip")
    cheap = with_draft(params, CFG, spec, np.asarray(use.info["draft_vocab"]))
    ssd = SpecDecoder(CFG, eos_ids=CFG.eos_ids, skip=use.mask, max_draft=use.max_draft, draft_spec=spec)
    ar = generate(Decoder(CFG, eos_ids=CFG.eos_ids), params, PROMPTS, 24)
    assert generate(ssd, cheap, PROMPTS, 24, theta=use.threshold).tokens == ar.tokens


def test_profile_lookup_order(tmp_path):
    """The checkpoint's own profile, else the shipped one for its model id, else None (generate: DEFAULT)."""
    shipped, ckpt = tmp_path / "shipped", tmp_path / "ckpt"
    shipped.mkdir()
    ckpt.mkdir()
    assert find_profile(ckpt, CFG, shipped) is None and DEFAULT.drafter == "ngram"
    save_profile(shipped / "other.json", Profile(mask=SkipMask(attn=(0,)), model_id=model_id(PRESETS["tiny-tied"])))
    assert find_profile(ckpt, CFG, shipped) is None  # another model's shipped profile is not used
    save_profile(shipped / "tiny.json", Profile(mask=SkipMask(attn=(1,)), model_id=model_id(CFG), drafter="ngram",
                                                self_draft={"mask": {"attn": [1], "mlp": []}, "threshold": 0.5,
                                                            "max_draft": 3, "speedup": 0.9}))
    got = find_profile(ckpt, CFG, shipped)
    assert got.drafter == "ngram" and got.for_drafter("skip").max_draft == 3
    assert got.for_drafter("ngram") is got and got.for_drafter("hybrid").mask == SkipMask(attn=(1,))
    save_profile(ckpt / "skip_profile.json", Profile(mask=SkipMask(mlp=(2,)), model_id=model_id(CFG)))
    assert find_profile(ckpt, CFG, shipped).mask == SkipMask(mlp=(2,))


def test_adoption_needs_every_round_3_percent_above_ar():
    assert adopt([10, 10, 10], [10.6, 10.5, 10.4])
    assert not adopt([10, 10, 10], [12, 12, 10.2])  # one round only +2%: a tie within noise keeps AR
    assert not adopt([10], [10.06])  # the 1.006x "speedup" a budget-12 search once adopted


def test_builtin_calibration_set_is_small_and_labelled():
    rows = data.calibration("builtin")
    assert len(rows) == 24 and data.BUILTIN.stat().st_size < 16_000
    assert {r["task"] for r in rows} == set(data.TASKS)
    code = [int(r["id"].split("/")[1]) for r in rows if r["task"] == "code"]
    assert all(i % 2 == 0 for i in code)  # even HumanEval indices only: odd ones are for evaluation
    assert (data.BUILTIN.parent / "NOTICE.md").is_file()


def test_calibration_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    with pytest.raises(data.DataError, match="line"):
        data.read_jsonl(bad)
    with pytest.raises(data.DataError, match="not found"):
        data.calibration(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "tiny", "--budget", "0"], "--budget must be in 1..100000"),
    (["--ckpt", "tiny", "--calib", "/nonexistent.jsonl"], "not found"),
    (["--ckpt", "no-such-model"], "unknown checkpoint"),
])
def test_cli_errors(argv, message):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "search_skip.py"), *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
