"""The few-row CPU matmul kernel: right products for every shape class, the same bits at any row count, fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import cpu_matmul

pytestmark = pytest.mark.skipif(not cpu_matmul.active(), reason="no C++ compiler: the kernel is not built")


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def uses_kernel(fn, *args) -> bool:  # noqa: ANN001
    return "jaxspec_matmul" in jax.jit(fn).lower(*args).as_text()


# (R, K, Ns): one weight or several per call; ragged K (panel tails) and N (vector tails); big enough to be split
# over threads (K * N >= 65536) or not.
SHAPES = [(1, 1, [1]), (1, 7, [9]), (3, 64, [16, 100]), (2, 576, [576, 192, 192]), (5, 1536, [576]),
          (7, 1000, [130]), (13, 576, [1536, 1536]), (32, 300, [257]), (1, 8, [65536 // 8 + 8]), (2, 1, [70000])]


@pytest.mark.parametrize("R,K,Ns", SHAPES)
def test_nn_matches_float64_products(R: int, K: int, Ns: list[int]) -> None:
    rng = np.random.default_rng(R * 1000 + K)
    x, ws = rand(rng, R, K), [rand(rng, K, n) for n in Ns]
    assert uses_kernel(lambda x, *ws: cpu_matmul.matmul(x, *ws), x, *ws)
    got = jax.jit(lambda x, *ws: cpu_matmul.matmul(x, *ws))(x, *ws)
    for y, w in zip(got, ws, strict=True):
        ref = x.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4 * np.sqrt(K))


@pytest.mark.parametrize("R,K,N", [(1, 576, 49152 // 8), (4, 576, 1001), (9, 64, 3), (2, 13, 40)])
def test_nt_matches_float64_products(R: int, K: int, N: int) -> None:
    rng = np.random.default_rng(R + K + N)
    x, w = rand(rng, R, K), rand(rng, N, K)
    assert uses_kernel(cpu_matmul.matmul_t, x, w)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_matmul.matmul_t)(x, w)), ref, rtol=1e-4,
                               atol=1e-4 * np.sqrt(K))


@pytest.mark.parametrize("K,N", [(576, 1536), (1536, 576), (100, 1000)])
def test_any_row_count_gives_the_same_bits(K: int, N: int) -> None:
    """What makes a T-token verify compute exactly T decode steps' products: row i of a 13-row product equals the
    1-row product of row i, bit for bit (XLA's dots do not promise this)."""
    rng = np.random.default_rng(K)
    x, w, e = rand(rng, 13, K), rand(rng, K, N), rand(rng, N, K)
    nn = jax.jit(lambda x, w: cpu_matmul.matmul(x, w)[0])
    nt = jax.jit(cpu_matmul.matmul_t)
    many_nn, many_nt = np.asarray(nn(x, w)), np.asarray(nt(x, e))
    for rows in ([0], [5, 6], [1, 2, 3, 4, 7]):
        np.testing.assert_array_equal(np.asarray(nn(x[rows], w)), many_nn[rows])
        np.testing.assert_array_equal(np.asarray(nt(x[rows], e)), many_nt[rows])


def test_falls_back_to_xla_dots() -> None:
    """Many rows (prefill), other dtypes, or the kernel switched off: plain dots, same results."""
    rng = np.random.default_rng(0)
    w = rand(rng, 64, 32)
    f = lambda x, w: cpu_matmul.matmul(x, w)[0]  # noqa: E731
    assert not uses_kernel(f, rand(rng, cpu_matmul.MAX_ROWS + 1, 64), w)
    assert not uses_kernel(f, rand(rng, 2, 64).astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    x = rand(rng, 2, 64)
    with cpu_matmul.enabled(False):
        assert cpu_matmul.state() == "xla" and not uses_kernel(f, x, w)
        off = np.asarray(jax.jit(f)(x, w))
    assert cpu_matmul.state() == "kernel"
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, w)), off, rtol=1e-5, atol=1e-5)


def test_derivatives_go_through_xla_dots() -> None:
    rng = np.random.default_rng(1)
    x, w, e = rand(rng, 3, 16), rand(rng, 16, 8), rand(rng, 5, 16)

    def loss(x, w, e):  # noqa: ANN001, ANN202
        return (cpu_matmul.matmul(x, w)[0] ** 2).sum() + (cpu_matmul.matmul_t(x, e) ** 2).sum()

    def ref(x, w, e):  # noqa: ANN001, ANN202
        return ((x @ w) ** 2).sum() + ((x @ e.T) ** 2).sum()

    for got, want in zip(jax.grad(loss, (0, 1, 2))(x, w, e), jax.grad(ref, (0, 1, 2))(x, w, e), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
