"""The CPU kernels: right products and attention for every shape class, the same bits at any row count, fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.active(), reason="no C++ compiler: the kernel is not built")


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def uses_kernel(fn, *args, target: str = "jaxspec_matmul") -> bool:  # noqa: ANN001
    return target in jax.jit(fn).lower(*args).as_text()


# (R, K, Ns): one weight or several per call; ragged K (panel tails) and N (vector tails); big enough to be split
# over threads (K * N >= 65536) or not.
SHAPES = [(1, 1, [1]), (1, 7, [9]), (3, 64, [16, 100]), (2, 576, [576, 192, 192]), (5, 1536, [576]),
          (7, 1000, [130]), (13, 576, [1536, 1536]), (32, 300, [257]), (1, 8, [65536 // 8 + 8]), (2, 1, [70000])]


@pytest.mark.parametrize("R,K,Ns", SHAPES)
def test_nn_matches_float64_products(R: int, K: int, Ns: list[int]) -> None:
    rng = np.random.default_rng(R * 1000 + K)
    x, ws = rand(rng, R, K), [rand(rng, K, n) for n in Ns]
    assert uses_kernel(lambda x, *ws: cpu_kernels.matmul(x, *ws), x, *ws)
    got = jax.jit(lambda x, *ws: cpu_kernels.matmul(x, *ws))(x, *ws)
    for y, w in zip(got, ws, strict=True):
        ref = x.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4 * np.sqrt(K))


@pytest.mark.parametrize("R,K,N", [(1, 576, 49152 // 8), (4, 576, 1001), (9, 64, 3), (2, 13, 40)])
def test_nt_matches_float64_products(R: int, K: int, N: int) -> None:
    rng = np.random.default_rng(R + K + N)
    x, w = rand(rng, R, K), rand(rng, N, K)
    assert uses_kernel(cpu_kernels.matmul_t, x, w)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_kernels.matmul_t)(x, w)), ref, rtol=1e-4,
                               atol=1e-4 * np.sqrt(K))


@pytest.mark.parametrize("K,N", [(576, 1536), (1536, 576), (100, 1000)])
def test_any_row_count_gives_the_same_bits(K: int, N: int) -> None:
    """What makes a T-token verify compute exactly T decode steps' products: row i of a 13-row product equals the
    1-row product of row i, bit for bit (XLA's dots do not promise this)."""
    rng = np.random.default_rng(K)
    x, w, e = rand(rng, 13, K), rand(rng, K, N), rand(rng, N, K)
    nn = jax.jit(lambda x, w: cpu_kernels.matmul(x, w)[0])
    nt = jax.jit(cpu_kernels.matmul_t)
    many_nn, many_nt = np.asarray(nn(x, w)), np.asarray(nt(x, e))
    for rows in ([0], [5, 6], [1, 2, 3, 4, 7]):
        np.testing.assert_array_equal(np.asarray(nn(x[rows], w)), many_nn[rows])
        np.testing.assert_array_equal(np.asarray(nt(x[rows], e)), many_nt[rows])


def test_falls_back_to_xla_dots() -> None:
    """Many rows (prefill), other dtypes, or the kernel switched off: plain dots, same results."""
    rng = np.random.default_rng(0)
    w = rand(rng, 64, 32)
    f = lambda x, w: cpu_kernels.matmul(x, w)[0]  # noqa: E731
    assert not uses_kernel(f, rand(rng, cpu_kernels.MAX_ROWS + 1, 64), w)
    assert not uses_kernel(f, rand(rng, 2, 64).astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    x = rand(rng, 2, 64)
    with cpu_kernels.enabled(False):
        assert cpu_kernels.state() == "xla" and not uses_kernel(f, x, w)
        off = np.asarray(jax.jit(f)(x, w))
    assert cpu_kernels.state() == "kernel"
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, w)), off, rtol=1e-5, atol=1e-5)


def test_derivatives_go_through_xla_dots() -> None:
    rng = np.random.default_rng(1)
    x, w, e = rand(rng, 3, 16), rand(rng, 16, 8), rand(rng, 5, 16)

    def loss(x, w, e):  # noqa: ANN001, ANN202
        return (cpu_kernels.matmul(x, w)[0] ** 2).sum() + (cpu_kernels.matmul_t(x, e) ** 2).sum()

    def ref(x, w, e):  # noqa: ANN001, ANN202
        return ((x @ w) ** 2).sum() + ((x @ e.T) ** 2).sum()

    for got, want in zip(jax.grad(loss, (0, 1, 2))(x, w, e), jax.grad(ref, (0, 1, 2))(x, w, e), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,T,KV,G,D,S", [(1, 1, 3, 3, 64, 256), (2, 5, 3, 3, 64, 256), (1, 9, 2, 2, 16, 37),
                                          (3, 2, 1, 4, 8, 5), (1, 32, 2, 1, 24, 70), (2, 12, 3, 3, 64, 300)])
def test_attention_matches_the_jnp_core_and_each_query_alone(B: int, T: int, KV: int, G: int, D: int, S: int) -> None:
    """Positions anywhere in the window (first and last slot included; with 12 queries, each side of the kernel's
    key-chunk edges, 64 or 128 keys apart); a query's output does not depend on the other queries of its chunk, bit
    for bit; the kernel reads the layer it is given of the stacked cache (here the middle one of three)."""
    from jaxspec.model import attend, attend_jnp

    rng = np.random.default_rng(B * T * S)
    q, k, v = rand(rng, B, T, KV, G, D), rand(rng, 3, B, S, KV, D), rand(rng, 3, B, S, KV, D)
    pos = rng.integers(0, S, (B, T)).astype(np.int32)
    pos[0, 0], pos[-1, -1] = 0, S - 1
    if T >= 12:
        pos[0, 1:11] = [62, 63, 64, 127, 128, 129, 191, 255, 256, 257]
    layer = np.int32(1)
    assert uses_kernel(attend, q, k, v, pos, layer, target="jaxspec_attend")
    got = np.asarray(jax.jit(attend)(q, k, v, pos, layer))
    np.testing.assert_allclose(got, np.asarray(jax.jit(attend_jnp)(q, k[1], v[1], pos)), rtol=2e-5, atol=2e-6)
    for t in range(T):
        np.testing.assert_array_equal(np.asarray(jax.jit(attend)(q[:, t : t + 1], k, v, pos[:, t : t + 1], layer)),
                                      got[:, t : t + 1])


def test_attention_derivatives_and_long_chunks_use_the_jnp_core() -> None:
    from jaxspec.model import attend, attend_jnp

    rng = np.random.default_rng(2)
    q, k, v = rand(rng, 1, 3, 2, 2, 8), rand(rng, 2, 1, 16, 2, 8), rand(rng, 2, 1, 16, 2, 8)
    pos = np.array([[4, 5, 6]], np.int32)
    got = jax.grad(lambda q, k, v: (attend(q, k, v, pos, 1) ** 2).sum(), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda q, k, v: (attend_jnp(q, k[1], v[1], pos) ** 2).sum(), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    T = cpu_kernels.MAX_ROWS + 1
    assert not uses_kernel(attend, rand(rng, 1, T, 2, 2, 8), rand(rng, 1, 1, 64, 2, 8), rand(rng, 1, 1, 64, 2, 8),
                           np.arange(T, dtype=np.int32)[None], np.int32(0), target="jaxspec_attend")


@pytest.mark.parametrize("n_in,shape", [(1, (576, 192)), (2, (9, 64, 576)), (1, (100, 37))])
def test_stacked_weights_give_each_layers_bits_in_place(n_in: int, shape: tuple[int, ...]) -> None:
    """``pack_layers``: the per-layer weights are views of the stacked one (no second copy), and a product with
    layer i of the stacked weights equals the product with layer i's own, bit for bit."""
    rng = np.random.default_rng(len(shape))
    ws = [rand(rng, *shape) for _ in range(3)]
    stacked, layers = cpu_kernels.pack_layers(ws, n_in)
    size = layers[0].data.nbytes
    assert [w.data.unsafe_buffer_pointer() - stacked.data.unsafe_buffer_pointer() for w in layers] == \
        [i * size for i in range(3)]
    x = rand(rng, 5, int(np.prod(shape[:n_in])))
    at = jax.jit(lambda x, i: cpu_kernels.matmul(x, stacked, layer=i)[0])
    assert "jaxspec_matmul_packed_at" in at.lower(x, np.int32(0)).as_text()
    for i, w in enumerate(layers):
        one = np.asarray(jax.jit(lambda x, w: cpu_kernels.matmul(x, w)[0])(x, w))
        np.testing.assert_array_equal(np.asarray(at(x, np.int32(i))), one)
        ref = x.astype(np.float64) @ ws[i].reshape(x.shape[1], -1).astype(np.float64)
        np.testing.assert_allclose(one, ref, rtol=1e-4, atol=1e-4 * np.sqrt(x.shape[1]))


def test_without_a_working_compiler_the_model_runs_on_xla(tmp_path) -> None:  # noqa: ANN001
    """A machine whose compiler fails (here: ``CXX=false``, and no kernel cached yet): one line on stderr, then
    the jnp code, with the same logits."""
    import os
    import subprocess
    import sys

    code = ("import jax, numpy as np\n"
            "from jaxspec import cpu_kernels\n"
            "from jaxspec.config import PRESETS\n"
            "from jaxspec.model import KVCache, forward, init_params\n"
            "cfg = PRESETS['tiny']\n"
            "p = init_params(cfg, jax.random.PRNGKey(0))\n"
            "out = forward(p, cfg, jax.numpy.array([[1, 2, 3]]), KVCache.create(cfg, 1, 8))[0]\n"
            "np.save(__import__('sys').argv[1], np.asarray(out))\n"
            "print(cpu_kernels.active())\n")
    env = dict(os.environ, CXX="false", JAXSPEC_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    out = tmp_path / "logits.npy"
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"] and "CPU kernels unavailable" in r.stderr
    from jaxspec.config import PRESETS
    from jaxspec.model import KVCache, forward, init_params

    cfg = PRESETS["tiny"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    with cpu_kernels.enabled(False):
        ref = forward(params, cfg, jnp.array([[1, 2, 3]]), KVCache.create(cfg, 1, 8))[0]
    np.testing.assert_allclose(np.load(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("R,K,Ns", SHAPES)
def test_packed_matches_float64_products(R: int, K: int, Ns: list[int]) -> None:
    rng = np.random.default_rng(R * 1000 + K + 1)
    x, ws = rand(rng, R, K), [rand(rng, K, n) for n in Ns]
    packed = [cpu_kernels.pack(w) for w in ws]
    assert all(np.array_equal(np.asarray(p.matrix()), w) for p, w in zip(packed, ws, strict=True))
    fn = jax.jit(lambda x, *ps: cpu_kernels.matmul(x, *ps))
    assert uses_kernel(fn, x, *packed, target="jaxspec_matmul_packed")
    for y, w in zip(fn(x, *packed), ws, strict=True):
        ref = x.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4 * np.sqrt(K))


@pytest.mark.parametrize("K,N", [(576, 1536), (1536, 576), (100, 1001)])
def test_packed_gives_the_same_bits_at_any_row_count(K: int, N: int) -> None:
    """Blocks of up to 10 rows, balanced: 13 rows are blocks of 7 and 6, and each row's bits are its 1-row bits."""
    rng = np.random.default_rng(K + 1)
    x, w = rand(rng, 13, K), cpu_kernels.pack(rand(rng, K, N))
    fn = jax.jit(lambda x, w: cpu_kernels.matmul(x, w)[0])
    many = np.asarray(fn(x, w))
    for rows in ([0], [5, 6], [1, 2, 3, 4, 7], list(range(11))):
        np.testing.assert_array_equal(np.asarray(fn(x[rows], w)), many[rows])


def test_packed_takes_a_short_prompts_chunk() -> None:
    """Up to ``MAX_PACKED_ROWS`` rows (a 33-48-token prompt chunk) the packed kernel runs, right to float64 products;
    the (K, N) kernel stops at ``MAX_ROWS``."""
    rng = np.random.default_rng(48)
    R = cpu_kernels.MAX_PACKED_ROWS
    assert R > cpu_kernels.MAX_ROWS
    x, w = rand(rng, R, 576), rand(rng, 576, 200)
    fn = jax.jit(lambda x, w: cpu_kernels.matmul(x, w)[0])
    assert uses_kernel(fn, x, cpu_kernels.pack(w), target="jaxspec_matmul_packed")
    assert not uses_kernel(fn, x, w)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(fn(x, cpu_kernels.pack(w))), ref, rtol=1e-4, atol=1e-4 * np.sqrt(576))


@pytest.mark.parametrize("n", [1, 31, 1_000_003])
def test_stream_sum_reads_every_element(n: int) -> None:
    """``roofline``'s plain read on the kernels' threads: each thread's share, tails included, summed once."""
    a = np.arange(n, dtype=np.float32) % 7
    assert cpu_kernels.stream_sum(a) == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-5)


def test_packed_weights_fall_back_and_differentiate_through_xla() -> None:
    rng = np.random.default_rng(3)
    x, w = rand(rng, cpu_kernels.MAX_PACKED_ROWS + 1, 64), rand(rng, 64, 40)
    p = cpu_kernels.pack(w.reshape(4, 16, 40), n_in=2)
    assert p.shape == (4, 16, 40) and p.data.shape[1] == 64
    fn = jax.jit(lambda x, p: cpu_kernels.matmul(x, p)[0])
    assert not uses_kernel(fn, x, p, target="jaxspec_matmul_packed")  # too many rows for the kernel
    np.testing.assert_allclose(np.asarray(fn(x, p)), x @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed and plain"):
        cpu_kernels.matmul(x[:2], p, w)
    dx = rand(rng, 2, 64)
    _, tangent = jax.jvp(lambda x: cpu_kernels.matmul(x, p)[0], (x[:2],), (dx,))
    np.testing.assert_allclose(np.asarray(tangent), dx @ w, rtol=1e-5, atol=1e-5)


def test_packed_model_decodes_losslessly() -> None:
    """A model with ``model.pack``'s weights: the packed kernel runs its decode steps and verifies, greedy n-gram
    drafting gives AR's tokens, and AR's tokens are the unpacked model's (same products, other summation order: on
    this small model no near-tie flips)."""
    from tinymodel import CFG, trained

    from jaxspec import model
    from jaxspec.decode import Decoder, generate
    from jaxspec.speculative import SpecDecoder

    params = trained(CFG, steps=60)
    packed = model.pack(params)
    assert packed.packed is not None and model.layers_for(packed, 9) is packed.packed.layers
    assert model.layers_for(packed, cpu_kernels.MAX_PACKED_ROWS) is packed.packed.layers  # short prompts' chunks too
    assert model.layers_for(packed, cpu_kernels.MAX_PACKED_ROWS + 1) is packed.layers
    step = jax.jit(lambda p, t, c: model.forward(p, CFG, t, c))
    _, cache = step(packed, np.arange(1, 8, dtype=np.int32)[None], model.KVCache.create(CFG, 1, 32))
    five = np.arange(8, 13, dtype=np.int32)[None]
    # The layers run as one loop over the stacked packed weights, with the unrolled layers' bits
    assert uses_kernel(lambda t: step(packed, t, cache), five, target="jaxspec_matmul_packed_at")
    unrolled = packed.replace(packed=packed.packed.replace(stacked=None))
    assert not uses_kernel(lambda t: step(unrolled, t, cache), five, target="jaxspec_matmul_packed_at")
    assert uses_kernel(lambda t: step(unrolled, t, cache), five, target="jaxspec_matmul_packed")
    for a, b in zip(jax.tree.leaves(step(packed, five, cache)), jax.tree.leaves(step(unrolled, five, cache)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 7, 8]]
    ar = generate(Decoder(CFG), packed, prompts, 24)
    spec = generate(SpecDecoder(CFG, drafter="ngram", ngram_k=8), packed, prompts, 24)
    assert spec.tokens == ar.tokens
    adaptive = SpecDecoder(CFG, drafter="ngram", ngram_k=8, adaptive_k=True)  # SmolLM2's default: verify widths 1, 5, 9
    assert generate(adaptive, packed, prompts, 24).tokens == ar.tokens
    assert generate(Decoder(CFG), params, prompts, 24).tokens == ar.tokens


def quantized(rng: np.random.Generator, qtype: str, *shape: int, n_in: int = 1) -> np.ndarray:
    from tinymodel import gguf_values

    w = rand(rng, *shape) * 0.05
    k = int(np.prod(shape[:n_in]))
    return gguf_values(w.reshape(k, -1), qtype).reshape(shape)


def exact_values(rng: np.random.Generator, values: str, K: int, n: int) -> np.ndarray:
    """A (K, n) float32 weight whose values are exactly GGUF blocks (``values`` Q4_1, Q8_0) or 2-byte floats (float16,
    bfloat16: with a value float16 cannot hold, so that bfloat16 is the storage found)."""
    if values.startswith("Q"):
        return quantized(rng, values, K, n)
    w = rand(rng, K, n).astype(values).astype(np.float32)
    if values == "bfloat16":
        w[0, 0] = np.float32(2.0**20)
    return w


GGUF_SHAPES = [(576, [576, 192, 192]), (64, [40]), (1536, [100])]
HALF_SHAPES = [(576, [576, 192, 192]), (40, [130]), (1536, [576]), (7, [9, 65536 // 7 + 8])]  # K % 32 != 0 too


@pytest.mark.parametrize("values,storage,K,Ns", [(v, s, K, Ns) for v, s in (("Q4_1", np.uint8), ("Q8_0", np.int8))
                                                 for K, Ns in GGUF_SHAPES]
                         + [(v, v, K, Ns) for v in ("float16", "bfloat16") for K, Ns in HALF_SHAPES])
def test_exact_packs_give_the_float32_packs_bits(values: str, storage: type, K: int, Ns: list[int]) -> None:
    """Weights that are exactly GGUF blocks pack as their codes (5-9 bits a weight), ones that are exactly float16
    (an HF checkpoint's) or bfloat16 values as those 2 bytes, and the kernel multiplies the same float32 values in
    the same order as the float32 pack: the same bits at every row count, ragged K and N, several weights per call
    and both sides of the threads' size included."""
    rng = np.random.default_rng(K + len(Ns))
    ws = [exact_values(rng, values, K, n) for n in Ns]
    q, f = [cpu_kernels.pack(w) for w in ws], [cpu_kernels.pack(w, exact=False) for w in ws]
    assert all(p.data.dtype == jnp.dtype(storage) and p.dtype == jnp.float32 for p in q)
    assert all(p.data.dtype == np.float32 for p in f)
    share = sum(p.data.nbytes for p in q) / sum(p.data.nbytes for p in f)
    assert share == 0.5 if values.endswith("float16") else share < 1 / 3
    assert all(np.array_equal(np.asarray(p.matrix()), w) for p, w in zip(q, ws, strict=True))
    fn = jax.jit(lambda x, *ps: cpu_kernels.matmul(x, *ps))
    for R in (1, 2, 3, 4, 5, 9, 13, cpu_kernels.MAX_PACKED_ROWS):
        x = rand(rng, R, K)
        assert uses_kernel(fn, x, *q, target="jaxspec_matmul_packed")
        for a, b in zip(fn(x, *q), fn(x, *f), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quantized_stacked_layers_mixed_formats_and_fallback() -> None:
    """Stacked quantized layers read layer i in place; a call with weights of two formats is split per format; a
    layer kind packs as blocks only if every layer is exactly blocks of one format; past the kernel's rows, XLA's
    dots on the dequantized matrix (and derivatives through them)."""
    rng = np.random.default_rng(7)
    ws = [quantized(rng, "Q4_1", 9, 64, 96, n_in=2) for _ in range(3)]
    stacked, layers = cpu_kernels.pack_layers(ws, n_in=2)
    fstacked, flayers = cpu_kernels.pack_layers(ws, n_in=2, exact=False)
    assert stacked.data.dtype == np.uint8 and stacked.data.shape[0] == 3
    assert [w.data.unsafe_buffer_pointer() - stacked.data.unsafe_buffer_pointer() for w in layers] == \
        [i * layers[0].data.nbytes for i in range(3)]
    x = rand(rng, 5, 9 * 64)
    at = jax.jit(lambda x, i, s: cpu_kernels.matmul(x, s, layer=i)[0])
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(at(x, np.int32(i), stacked)), np.asarray(at(x, np.int32(i),
                                                                                              fstacked)))
    mixed = [ws[0], rand(rng, 9, 64, 96)]  # one layer not exactly blocks: the kind stays float32
    assert cpu_kernels.pack_layers(mixed, n_in=2)[0].data.dtype == np.float32
    q8 = cpu_kernels.pack(quantized(rng, "Q8_0", 576, 40))
    plain = cpu_kernels.pack(rand(rng, 576, 24))
    x = rand(rng, 3, 576)
    both = jax.jit(lambda x, a, b: cpu_kernels.matmul(x, a, b))(x, q8, plain)
    for y, w in zip(both, (q8, plain), strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(lambda x, w: cpu_kernels.matmul(x, w)[0])(
            x, w)))
    p = layers[1]
    big = rand(rng, cpu_kernels.MAX_PACKED_ROWS + 1, 9 * 64)
    fn = jax.jit(lambda x, p: cpu_kernels.matmul(x, p)[0])
    assert not uses_kernel(fn, big, p, target="jaxspec_matmul_packed")
    w = ws[1].reshape(9 * 64, 96)
    np.testing.assert_allclose(np.asarray(fn(big, p)), big @ w, rtol=1e-5, atol=1e-5)
    dx = rand(rng, 2, 9 * 64)
    _, tangent = jax.jvp(lambda x: cpu_kernels.matmul(x, p)[0], (big[:2],), (dx,))
    np.testing.assert_allclose(np.asarray(tangent), dx @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("values,layers,head", [("gguf", np.uint8, np.int8), ("float16", np.float16, np.float16)])
def test_exact_model_decodes_as_the_float32_one(values: str, layers: type, head: type) -> None:
    """A model whose weights are GGUF values (Q4_1 layers, a Q8_0 head, as SmolLM2's) packs as blocks, one whose
    weights are float16 values (an HF float16 checkpoint converted to float32) as 2-byte tiles; either's decode steps
    and verifies give the float32 pack's logits and caches bit for bit, and greedy n-gram drafting AR's tokens."""
    from tinymodel import CFG, gguf_quantized, trained

    from jaxspec import model
    from jaxspec.decode import Decoder, generate
    from jaxspec.speculative import SpecDecoder

    params = trained(CFG, steps=60)
    params = gguf_quantized(params) if values == "gguf" else jax.tree.map(
        lambda a: a.astype(jnp.float16).astype(jnp.float32), params)
    q, f = model.pack(params), model.pack(params, exact=False)
    assert {getattr(q.packed.stacked, k).data.dtype for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")} \
        == {np.dtype(layers)} and q.packed.head.data.dtype == head
    assert f.packed.head.data.dtype == np.float32
    step = jax.jit(lambda p, t, c: model.forward(p, CFG, t, c))
    cache = model.KVCache.create(CFG, 1, 32)
    for tokens in (np.arange(1, 8, dtype=np.int32)[None], np.arange(8, 13, dtype=np.int32)[None],
                   np.array([[5]], np.int32)):
        a, b = step(q, tokens, cache), step(f, tokens, cache)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        cache = a[1]
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 7, 8]]
    ar = generate(Decoder(CFG), q, prompts, 24)
    assert ar.tokens == generate(Decoder(CFG), f, prompts, 24).tokens
    adaptive = SpecDecoder(CFG, drafter="ngram", ngram_k=8, adaptive_k=True)
    assert generate(adaptive, q, prompts, 24).tokens == ar.tokens


def test_half_storage_only_where_every_value_is_exact() -> None:
    """float16 is preferred where both hold a weight; subnormal float16 values widen exactly; one value one ulp off
    (or a -0.0 that a 2-byte copy would keep, but not a NaN) keeps a layer kind float32."""
    rng = np.random.default_rng(11)
    w = (rand(rng, 64, 40) * 1e-3).astype(np.float16).astype(np.float32)
    w[:4, 0] = np.array([6e-8, -6e-8, 3e-5, -0.0], np.float16).astype(np.float32)  # float16 subnormals, -0.0
    p = cpu_kernels.pack(w)
    assert p.data.dtype == np.float16 and np.array_equal(np.asarray(p.matrix()).view(np.uint32), w.view(np.uint32))
    x = rand(rng, 3, 64)
    fn = jax.jit(lambda x, p: cpu_kernels.matmul(x, p)[0])
    np.testing.assert_array_equal(np.asarray(fn(x, p)), np.asarray(fn(x, cpu_kernels.pack(w, exact=False))))
    off = w.copy()
    off[5, 7] = np.nextafter(off[5, 7], np.float32(1))
    assert cpu_kernels.pack(off).data.dtype == np.float32
    assert cpu_kernels.pack_layers([w, off])[0].data.dtype == np.float32  # every layer of a kind, or none
    stacked, layers = cpu_kernels.pack_layers([w, w * 2])
    assert stacked.data.dtype == np.float16 and layers[1].data.dtype == np.float16
    bad = w.copy()
    bad[0, 1] = np.nan
    assert cpu_kernels.pack(bad).data.dtype == np.float32
