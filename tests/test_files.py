"""``atomic_write``: whole new content or the old file, never a partial one, and no temporary files left behind."""

import os

import pytest

from jaxspec.files import atomic_write


def test_atomic_write(tmp_path):
    path = tmp_path / "out.json"
    atomic_write(path, b"old")
    atomic_write(path, [b"new ", b"content"])
    assert path.read_bytes() == b"new content" and os.listdir(tmp_path) == ["out.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write(path, b"old")

    def chunks():
        yield b"partial"
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, chunks())
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.json"]
