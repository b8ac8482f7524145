"""``python scripts/benchmark.py`` runs ``jaxspec-benchmark``; the code is ``jaxspec/cli/benchmark.py``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a clone that is not pip-installed
from jaxspec.cli.benchmark import entry  # noqa: E402

if __name__ == "__main__":
    entry()
