"""Recreate ``tests/fixtures/llama2_vocab/`` from the llama-cpp-python sdist on PyPI.

The sdist vendors llama.cpp, whose ``models/`` folder holds ``ggml-vocab-llama-spm.gguf`` (the LLaMA-2 sentencepiece
vocabulary in GGUF, no weights) with reference tokenizations made by HF's tokenizer (``.inp``/``.out``). Usage::

    python tools/make_tokenizer_fixtures.py [--sdist path/to/llama_cpp_python-0.3.36.tar.gz]

Without ``--sdist`` it runs ``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llama2_vocab"
# member of the sdist -> fixture file name, sha256 of the content
FILES = {
    "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf": (
        "ggml-vocab-llama-spm.gguf",
        "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    ),
    "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp": (
        "ggml-vocab-llama-spm.gguf.inp",
        "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    ),
    "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.out": (
        "ggml-vocab-llama-spm.gguf.out",
        "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
    ),
    "vendor/llama.cpp/LICENSE": ("LICENSE-llama.cpp", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="llama_cpp_python sdist (.tar.gz); downloaded if omitted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={VERSION}",
                "-d",
                tmp,
            ]
            subprocess.run(cmd, check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        OUT.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member, (name, sha) in FILES.items():
                f = tar.extractfile(f"llama_cpp_python-{VERSION}/{member}")
                assert f is not None, member
                data = f.read()
                if sha is not None and hashlib.sha256(data).hexdigest() != sha:
                    raise SystemExit(f"{member}: sha256 mismatch")
                (OUT / name).write_bytes(data)
                print(f"{OUT / name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
