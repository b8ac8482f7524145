"""``atomic_write``: whole new content or the old file, never a partial one, and no temporary files left behind;
``tree_files``: a tree's files with sizes and mtimes, in path order."""

import os

import pytest

from jaxspec.files import atomic_write, tree_files


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


def test_tree_files_lists_every_file_in_path_order(tmp_path):
    for rel, data in {"b": b"12", "a/z": b"", "a/b/c": b"123", "a.txt": b"1", "a-b/x": b"1234"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "link-to-a").symlink_to(tmp_path / "a")  # a link to a directory is not followed (as os.walk)
    (tmp_path / "link-to-b").symlink_to(tmp_path / "b")  # a link to a file is listed as the file
    got = tree_files(tmp_path)
    assert [(p, size) for p, size, _ in got] == [("a/b/c", 3), ("a/z", 0), ("a-b/x", 4), ("a.txt", 1), ("b", 2),
                                                  ("link-to-b", 2)]
    assert got[0][2] == (tmp_path / "a/b/c").stat().st_mtime_ns
