"""``blockquant``: GGUF-quantized weights are found from their float32 values exactly; anything else stays float32."""

import numpy as np
import pytest
from tinymodel import gguf_values

from jaxspec import blockquant


@pytest.mark.parametrize("qtype,fmt", [("Q4_1", "q4"), ("Q8_0", "q8")])
@pytest.mark.parametrize("K,N", [(64, 40), (576, 192)])
def test_gguf_blocks_are_found_exactly(qtype: str, fmt: str, K: int, N: int) -> None:
    w = gguf_values(np.random.default_rng(K + N).standard_normal((K, N)).astype(np.float32) * 0.05, qtype)
    b = blockquant.find(w)
    assert b is not None and b.fmt == fmt
    assert b.scale.shape == b.offset.shape == (K // blockquant.BLOCK, N) and b.codes.shape == (K, N)
    lo, hi = blockquant.FORMATS[fmt]
    assert lo <= b.codes.min() and b.codes.max() <= hi
    np.testing.assert_array_equal(blockquant.dequantize(b), w)  # every bit


def test_a_constant_block_and_zero_columns() -> None:
    w = gguf_values(np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32), "Q4_1")
    w[:32, 0] = 0.25  # a constant block: scale 0, offset the value
    w[:, 1] = 0.0
    b = blockquant.find(w, ("q4",))
    assert b is not None and b.scale[0, 0] == 0 and b.offset[0, 0] == np.float32(0.25)
    np.testing.assert_array_equal(blockquant.dequantize(b), w)


def test_weights_that_are_not_exactly_blocks_stay_float32() -> None:
    rng = np.random.default_rng(2)
    w = gguf_values(rng.standard_normal((64, 16)).astype(np.float32), "Q4_1")
    assert blockquant.find(w) is not None
    off = w.copy()
    off[37, 5] = np.nextafter(off[37, 5], np.float32(np.inf))  # one weight one ulp away: no block format holds it
    assert blockquant.find(off) is None
    assert blockquant.find(rng.standard_normal((64, 16)).astype(np.float32)) is None  # plain float32 weights
    assert blockquant.find(w[:48]) is None  # K not a multiple of the block
    assert blockquant.find(w.astype(np.float64)) is None
    bad = w.copy()
    bad[0, 0] = np.nan
    assert blockquant.find(bad) is None
    assert blockquant.find(w, ("q8",)) is None  # 4-bit affine blocks are not 8-bit scaled ones
