"""Persisted executables (``jaxspec.aot``): warm runs decode token-identically, keys separate what differs, and a
damaged cache file falls back to compiling."""

import json

import jax
import jax.numpy as jnp
import pytest
import tinymodel

from jaxspec import aot
from jaxspec.config import SkipMask
from jaxspec.decode import Decoder, _prefill_layer, generate, prefill
from jaxspec.sampling import Sampling
from jaxspec.speculative import SpecDecoder

CFG = tinymodel.CFG
PROMPT = tinymodel.progression(10, 3, 9)


@pytest.fixture(scope="module")
def params():
    return tinymodel.trained()


@pytest.fixture
def cache(tmp_path):
    aot.enable(tmp_path)
    yield tmp_path
    aot.enable(None)


@pytest.fixture
def loads(monkeypatch):
    """How many executables came from disk (not compiled) since the fixture was made."""
    hits = []
    real = aot._load

    def spy(k):
        exe = real(k)
        hits.append(exe is not None)
        return exe

    monkeypatch.setattr(aot, "_load", spy)
    return hits


DECODERS = [Decoder(CFG, eos_ids=(0,)),
            SpecDecoder(CFG, eos_ids=(0,), skip=SkipMask(attn=(1,), mlp=(2,)), max_draft=4, drafter="hybrid")]


@pytest.mark.parametrize("dec", DECODERS, ids=["ar", "ssd-hybrid"])
def test_warm_run_is_token_identical(params, cache, loads, dec):
    aot.enable(None)
    plain = generate(dec, params, [PROMPT], 14)  # plain jit
    aot.enable(cache)
    cold = generate(dec, params, [PROMPT], 14)
    files = sorted(cache.glob("*.bin"))
    assert len(files) == 7  # a prefill bucket's embedding, layer, final norm, last-row pick; first token; loop; copy
    assert not any(loads)
    aot.enable(cache)  # a new process: nothing in memory, everything on disk
    loads.clear()
    warm = generate(dec, params, [PROMPT], 14)
    assert loads == [True] * 7
    assert sorted(cache.glob("*.bin")) == files
    assert cold.tokens == warm.tokens == plain.tokens


def test_keys_separate_decoders_shapes_and_configs(params, cache):
    dec = Decoder(CFG, eos_ids=(0,))
    state = prefill(params, dec, [PROMPT], 8)
    steps = jnp.int32(1)
    base = aot.key(Decoder.run, (dec, params, state, steps), (0,))
    assert base == aot.key(Decoder.run, (Decoder(CFG, eos_ids=(0,)), params, state, steps), (0,))
    others = [
        aot.key(Decoder.run, (Decoder(CFG, eos_ids=(0, 1)), params, state, steps), (0,)),
        aot.key(Decoder.run, (Decoder(CFG, Sampling(temperature=0.7), (0,)), params, state, steps), (0,)),
        aot.key(Decoder.run, (SpecDecoder(CFG, eos_ids=(0,), drafter="ngram"), params, state, steps), (0,)),
        aot.key(Decoder.run, (dec, params, prefill(params, dec, [PROMPT, PROMPT], 8), steps), (0,)),  # batch 2
        aot.key(Decoder.run, (dec, params, prefill(params, dec, [PROMPT], 9), steps), (0,)),  # longer output
    ]
    assert base not in others and len(set(others)) == len(others)
    c = prefill(params, dec, [PROMPT], 8).cache
    x, layer = jnp.zeros((1, 16, CFG.dim)), params.layers[0]
    i = jnp.int32(0)
    pre = [aot.key(_prefill_layer, (layer, cfg, x, c.k, c.v, i, c.lengths), (1,))
           for cfg in (CFG, CFG.replace(rope_theta=CFG.rope_theta * 2), CFG.replace(norm_eps=1e-6))]
    assert len(set(pre)) == 3
    assert aot.key(_prefill_layer, (layer, CFG, x[:, :8], c.k, c.v, i, c.lengths), (1,)) not in pre
    # Python scalars are not arrays: such a call is not cached (plain jit)
    assert aot.key(Decoder.run, (dec, params, state, 1), (0,)) is None
    # The params' remembered part of a key (the same object every call) is the part of that object only: other
    # params of other shapes or dtypes get their own key, and equal ones the same key
    assert aot.key(Decoder.run, (dec, params, state, steps), (0,)) == base  # remembered by now
    wider = params.replace(embed=jnp.zeros((params.embed.shape[0], CFG.dim), jnp.bfloat16))
    assert aot.key(Decoder.run, (dec, wider, state, steps), (0,)) not in [base, *others]
    assert aot.key(Decoder.run, (dec, jax.tree.map(lambda a: a + 0, params), state, steps), (0,)) == base


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_entry_falls_back_and_is_rewritten(params, cache, loads, damage):
    dec = Decoder(CFG, eos_ids=(0,))
    cold = generate(dec, params, [PROMPT], 10)
    for f in cache.glob("*.bin"):
        data = f.read_bytes()
        if damage == "truncate":
            f.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            f.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
        else:
            f.write_bytes(b"not an executable")
    aot.enable(cache)
    loads.clear()
    assert generate(dec, params, [PROMPT], 10).tokens == cold.tokens
    assert loads == [False] * 7
    aot.enable(cache)  # rewritten: the next process loads them
    loads.clear()
    assert generate(dec, params, [PROMPT], 10).tokens == cold.tokens
    assert loads == [True] * 7


_RUN = """
import sys, jax
from jaxspec import aot
from jaxspec.config import PRESETS
from jaxspec.decode import Decoder, generate
from jaxspec.model import init_params
from jaxspec.speculative import SpecDecoder
d = sys.argv[1]
jax.config.update("jax_compilation_cache_dir", d + "/xla")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
cfg = PRESETS["tiny"]
params = init_params(cfg, jax.random.key(0))
aot.enable(d + "/" + sys.argv[2])
for dec in (Decoder(cfg, eos_ids=()), SpecDecoder(cfg, eos_ids=(), drafter="ngram")):
    print(generate(dec, params, [[5, 6, 7, 8, 5, 6, 7]], 12).tokens[0])
"""


def test_entry_written_after_xla_cache_hit_loads_in_a_new_process(tmp_path):
    """An executable that XLA's persistent compilation cache supplied re-serializes without some kernels, and only a
    *new process* finds out (regression: "Function bitcast_gather_fusion not found" on the second run after a jaxspec
    upgrade). Process 1 fills XLA's cache and its aot entries (the old version); process 2's aot entries are new (the
    upgrade changed the key) while XLA's cache has them; process 3 loads process 2's entries."""
    import subprocess
    import sys

    outs = [subprocess.run([sys.executable, "-c", _RUN, str(tmp_path), how], capture_output=True, text=True,
                           timeout=300) for how in ("old", "new", "new")]
    for o in outs:
        assert o.returncode == 0, o.stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout
    assert len(list((tmp_path / "new").glob("*.bin"))) == 10  # a prefill bucket (4); each decoder's first, loop, copy


def test_entries_load_onto_their_device_when_there_are_several(tmp_path):
    """With several devices (a multi-GPU host, or CPU devices forced by XLA_FLAGS) and no mesh, a loaded entry must
    run on the one device it was compiled for (regression: it loaded onto all and wanted every input split in two)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    outs = [subprocess.run([sys.executable, "-c", _RUN, str(tmp_path), "two"], capture_output=True, text=True,
                           timeout=300, env=env) for _ in range(2)]
    for o in outs:
        assert o.returncode == 0, o.stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout and outs[0].stdout.count("[") == 2


def test_prefetch_loads_the_latest_runs_executables(params, cache, loads):
    dec = Decoder(CFG, eos_ids=(0,))
    cold = generate(dec, params, [PROMPT], 10)
    loads.clear()  # before the prefetch threads start: they may finish a load before the next line
    aot.enable(cache, prefetch=True)  # the next process
    assert len(aot._pending) == 7
    assert generate(dec, params, [PROMPT], 10).tokens == cold.tokens
    assert loads == [True] * 7 and not aot._pending  # all loaded by the prefetch threads, all used
    recent = json.loads((cache / aot.RECENT).read_text())
    (cache / aot.RECENT).write_text(json.dumps({**recent, "environment": "another jaxspec"}))
    aot.enable(cache, prefetch=True)
    assert not aot._pending  # executables pickled by other code are not unpickled (their pytrees may have changed)
    (cache / aot.RECENT).write_text(json.dumps(recent["keys"]))  # the format before the environment was recorded
    aot.enable(cache, prefetch=True)
    assert not aot._pending
    (cache / aot.RECENT).write_text("{not json")
    aot.enable(cache, prefetch=True)
    assert not aot._pending
    assert generate(dec, params, [PROMPT], 10).tokens == cold.tokens


def test_trim_deletes_least_recently_used_entries_beyond_the_limit(cache):
    import os

    for i in range(4):
        p = cache / f"{i}.bin"
        p.write_bytes(bytes(100))
        os.utime(p, (1000 + i, 1000 + i))  # 0 is the least recently used
    (cache / aot.RECENT).write_text("[]")
    aot._trim(250)
    assert sorted(p.name for p in cache.glob("*.bin")) == ["2.bin", "3.bin"] and (cache / aot.RECENT).exists()


_PREFETCHED = """
import sys, jax
from jaxspec import aot
from jaxspec.config import PRESETS
from jaxspec.decode import generate
from jaxspec.model import init_params
from jaxspec.speculative import SpecDecoder
aot.enable(sys.argv[1], prefetch=True)
compiled = []
real = aot._compile
aot._compile = lambda fn, args: compiled.append(fn.__name__) or real(fn, args)
cfg = PRESETS["tiny"]
print(generate(SpecDecoder(cfg, eos_ids=(), drafter="ngram"), init_params(cfg, jax.random.key(0)),
               [[5, 6, 7, 8, 5, 6, 7]], 12).tokens[0], compiled)
"""


def test_a_new_process_prefetching_executables_that_call_the_cpu_kernels_compiles_nothing(tmp_path):
    """The prefetch threads deserialize before anything is traced; XLA refuses an executable whose FFI targets are
    not registered yet (regression: every warm ``generate.py`` run compiled its first-token function again, 0.7 s
    of its time to first token)."""
    import subprocess
    import sys

    from jaxspec import cpu_kernels

    outs = [subprocess.run([sys.executable, "-c", _PREFETCHED, str(tmp_path)], capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for o in outs:
        assert o.returncode == 0, o.stderr[-2000:]
    cold, warm = (o.stdout.strip().rsplit(" [", 1) for o in outs)
    assert cold[0] == warm[0] and cold[1] != "]"
    assert warm[1] == "]", f"the warm process compiled {warm[1]}"
    if cpu_kernels.active():  # the case this is about: the executables call the kernels
        assert any(b"jaxspec_matmul" in p.read_bytes() for p in tmp_path.glob("*.bin"))
