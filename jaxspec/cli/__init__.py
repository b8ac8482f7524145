"""How every script ends: exit 0 (or the status ``main`` returns), one ``error: ...`` line and exit 2, 130 on Ctrl-C,
quietly when the reader of stdout goes away (``generate.py ... | head -c1``).

    if __name__ == "__main__":
        cli.exit(cli.run(main))

Standard library only (``plan.py`` runs it before jax may be imported). ``JAXSPEC_TRACEBACK=1`` re-raises instead,
for debugging.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn


def message(e: BaseException) -> str:
    """One line for an exception: its message's first line; the type too when it is not a user-input error."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        return f"{where}: {e.strerror}" if where != "" else e.strerror
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    expected = isinstance(e, ValueError | OSError) or type(e).__module__.startswith("jaxspec")
    return first if expected and first else f"{type(e).__name__}: {first}".rstrip(": ")


def _argparse_error(self: argparse.ArgumentParser, msg: str) -> NoReturn:
    raise ValueError(f"{msg} (see {self.prog} --help)")


def _unraisable(hook: Callable[[Any], None], quiet: list[bool]) -> Callable[[Any], None]:
    """Drop orbax/tensorstore's late 'Event loop is closed' callbacks (reads still pending when a restore failed),
    and anything at all once the one error line is out."""
    def filtered(u: Any) -> None:
        if quiet[0] or (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)):
            return
        hook(u)
    return filtered


def _stdout_gone() -> None:
    """The reader closed stdout: point it at /dev/null so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (e.g. captured by a test)
        pass


def _interruptible(handler: Any) -> None:
    """Install ``handler`` for SIGINT, unless SIGINT is ignored (a background job) or this is not the main thread."""
    try:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass


def exit_on_interrupt() -> None:
    """Called by scripts before their slow imports: Ctrl-C there exits with 130 at once (nothing to clean up yet)
    instead of a traceback from deep inside an import. ``run`` restores ``KeyboardInterrupt``."""
    _interruptible(lambda *_: os._exit(130))


def imports_start() -> None:
    """Pause the garbage collector while a command imports jax and jaxspec: the ~100k objects they create set off
    collections that scan them all (60 ms of a 0.63 s import here). ``imports_done`` resumes it."""
    gc.disable()


def imports_done() -> None:
    """Resume the collector, with every object alive now (modules, functions: they live as long as the process)
    moved out of its sight for good, so a full collection later scans only what the command makes (40-50 ms
    each otherwise)."""
    gc.freeze()
    gc.enable()


def import_jax() -> None:
    """Import jax without ``etils.epath``, which jax prefers to ``pathlib`` for its cache paths wherever it is
    installed (orbax brings it): importing it, testing helpers and all, took 50-70 ms of every command here
    (BENCHMARKS.md, "Short prompts"). jaxspec's paths are local; orbax imports ``etils.epath`` itself when a
    checkpoint is read or written through it. Meanwhile ``importlib.metadata.distributions`` lists jax's own
    distributions only (``jax_named``), then is restored."""
    if "jax" in sys.modules or "etils.epath" in sys.modules:
        return
    import importlib.metadata as md

    every = md.distributions

    def jax_named(**kw: Any) -> Iterator[md.Distribution]:
        """While jax imports, it reads the metadata of every installed distribution to find a ROCm plugin (~80 here):
        only jax's own (dist-info folders named jax*: plugins included) and those of unknown kind are listed."""
        for d in every(**kw):
            folder = getattr(d, "_path", None)
            if folder is None or folder.name.lower().startswith("jax"):
                yield d

    sys.modules["etils.epath"] = None  # type: ignore[assignment]  # ``from etils import epath`` raises ImportError
    md.distributions = jax_named  # type: ignore[assignment]
    try:
        import jax  # noqa: F401
    finally:
        del sys.modules["etils.epath"]
        md.distributions = every


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and map how it ends to an exit status (see the module docstring)."""
    _interruptible(signal.default_int_handler)
    if os.environ.get("JAXSPEC_TRACEBACK"):
        return main(argv) or 0
    quiet = [False]
    sys.unraisablehook = _unraisable(sys.unraisablehook, quiet)
    error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error  # type: ignore[method-assign]  # one line, not usage + error
    try:
        status = main(argv) or 0
        sys.stdout.flush()  # a closed pipe shows here at the latest
        return status
    except KeyboardInterrupt:
        quiet[0] = True
        return 130
    except BrokenPipeError:
        quiet[0] = True
        _stdout_gone()
        return 0
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        quiet[0] = True
        print(f"error: {message(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        argparse.ArgumentParser.error = error  # type: ignore[method-assign]


def exit(status: int) -> NoReturn:  # noqa: A001 - the name says what a script's last line does
    """End the process with ``status`` without the interpreter's teardown: threads joined, ``atexit`` handlers run
    (jax's among them), stdout and stderr flushed, then ``os._exit``. After a ``generate.py`` run the teardown
    (freeing JAX's executables and arrays module by module) takes 0.3-0.4 s here, a sixth of the whole command."""
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:  # not CPython: the ordinary way out
        sys.exit(status)
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # the reader went away, or the stream is closed
            stream.flush()
    os._exit(status)
