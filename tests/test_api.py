"""The public API: ``import jaxspec`` stays cheap (no JAX until a name is used), every exported name resolves, and the
README's Python example runs as written, so it cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_exports_resolve_lazily():
    code = ("import sys, jaxspec; assert 'jax' not in sys.modules, 'import jaxspec initialised JAX'; "
            "missing = [n for n in jaxspec.__all__ if getattr(jaxspec, n, None) is None]; assert not missing, missing")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_example_runs(smollm2, capsys):
    """``smollm2`` makes sure the checkpoint exists (and marks the test ``network``); the example loads it itself."""
    example = re.search(r"<!-- api-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert example, "README.md lost its <!-- api-example --> block"
    exec(compile(example.group(1), str(README), "exec"), {})
    assert capsys.readouterr().out.strip()
