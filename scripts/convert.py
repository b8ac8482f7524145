"""``python scripts/convert.py`` runs ``jaxspec-convert``; the code is ``jaxspec/cli/convert.py``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a clone that is not pip-installed
from jaxspec.cli.convert import entry  # noqa: E402

if __name__ == "__main__":
    entry()
