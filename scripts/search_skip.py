"""``python scripts/search_skip.py`` runs ``jaxspec-search-skip``; the code is ``jaxspec/cli/search_skip.py``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a clone that is not pip-installed
from jaxspec.cli.search_skip import entry  # noqa: E402

if __name__ == "__main__":
    entry()
