"""Draft ceiling by replay: how many tokens copy-based drafts could accept per cycle, on the model's own greedy outputs.

    python benchmarks/replay_drafts.py --per-task 8 --max-new-tokens 128 --outputs /tmp/ar_outputs.json

Generates (or reads back from ``--outputs``) AR greedy continuations of the ``bench_tasks`` prompts plus the model's
teacher-forced top-k next tokens at every position, then replays greedy verification on the host (NumPy): a cycle
proposes from the context so far (prompt + accepted output), the full model accepts the longest agreeing prefix and
adds one token. Greedy acceptance depends only on the proposal and the AR output, so the replay is exact for chains.

Drafters replayed: the on-device n-gram lookup (most recent occurrence; n_min..n_max, k), with ``--phrases FILE``
also followed by a phrase table's entry where the context has no match (``jaxspec/phrases.py``), best-of-m (the m most
recent occurrences of the longest matching suffix, verified as a tree of m chains), a recycled-successor table
(Token Recycling, arXiv 2408.08696: each token's top-w next tokens from the model's latest logits after it, a chain of
top-1 or a tree), and the copy oracle (the longest continuation copied from anywhere in the context, capped at k).
Predicted speedup = tokens emitted / sum of cycle costs, a cycle verifying T tokens costing ``--costs`` (AR steps,
from ``bench_tasks.py --verify-cost``; linear in between).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

Seq = list[int]


def outputs(path: Path | None, per_task: int, max_new: int, topk: int) -> dict[str, list[dict]]:
    """{task: [{"prompt", "out", "top"}]}: AR greedy outputs and the model's top-``topk`` next tokens at every
    position of prompt + output (one teacher-forced forward pass each). Read from / written to ``path``."""
    if path is not None and path.exists():
        return json.loads(path.read_text())
    import jax.numpy as jnp

    from benchmarks.bench_tasks import task_prompts
    from jaxspec.checkpoint import load
    from jaxspec.decode import Decoder, generate
    from jaxspec.model import KVCache, forward

    cfg, params, tok = load("smollm2-135m")
    eos = tuple(tok.eos_ids) or cfg.eos_ids
    res: dict[str, list[dict]] = {}
    for task, prompts in task_prompts(tok, per_task).items():
        res[task] = []
        for p in prompts:
            out = generate(Decoder(cfg, eos_ids=eos), params, [p], max_new).tokens[0]
            seq = p + out
            cap = -(-len(seq) // 256) * 256
            logits, _ = forward(params, cfg, jnp.asarray([seq + [0] * (cap - len(seq))]), KVCache.create(cfg, 1, cap))
            top = np.argsort(-np.asarray(logits[0, : len(seq)]), axis=-1)[:, :topk]
            res[task].append({"prompt": p, "out": out, "top": top.tolist()})
    if path is not None:
        path.write_text(json.dumps(res))
    return res


def ngram_occurrences(ctx: np.ndarray, n_min: int, n_max: int, m: int) -> list[int]:
    """End positions (most recent first, at most ``m``) of earlier occurrences of the longest suffix of ``ctx`` of
    length n_max..n_min that has one with a token after it."""
    L = len(ctx)
    for n in range(n_max, n_min - 1, -1):
        if n > L - 1:
            continue
        win = np.lib.stride_tricks.sliding_window_view(ctx[: L - 1], n)  # win[s] = ctx[s : s + n], ends s + n - 1
        ends = np.nonzero((win == ctx[L - n:]).all(axis=1))[0] + n - 1
        if len(ends):
            return ends[::-1][:m].tolist()
    return []


def agree(prop: Seq, target: np.ndarray) -> int:
    n = 0
    while n < len(prop) and n < len(target) and prop[n] == target[n]:
        n += 1
    return n


def replay(item: dict, propose) -> tuple[int, list[int]]:  # noqa: ANN001
    """Greedy replay of one output: returns (tokens emitted, verify widths T of every cycle). ``propose(ctx, i)``
    gives a list of candidate chains (a tree's paths; the widths counts their distinct tree nodes + 1)."""
    prompt, out = np.asarray(item["prompt"]), np.asarray(item["out"])
    i, widths = min(1, len(out)), []  # the first token comes with the prefill, as on device: no cycle
    while i < len(out):
        ctx = np.concatenate([prompt, out[:i]])
        chains = [c[: len(out) - i - 1] for c in propose(ctx, len(prompt) + i)]
        nodes = {tuple(c[: j + 1]) for c in chains for j in range(len(c))}
        acc = max((agree(c, out[i:]) for c in chains), default=0)
        widths.append(len(nodes) + 1)
        i += acc + 1
    return len(out), widths


def ngram(n_min: int, n_max: int, k: int, m: int = 1):  # noqa: ANN201
    def propose(ctx: np.ndarray, pos: int) -> list[Seq]:
        return [ctx[e + 1: e + 1 + k].tolist() for e in ngram_occurrences(ctx, n_min, n_max, m)]
    return propose


def with_phrases(n_min: int, n_max: int, k: int, tables: list) -> object:
    """The n-gram lookup, else the first phrase table (longest n) holding the context's last n tokens: the host
    twin of ``phrases.lookup``."""
    from jaxspec.phrases import slot

    context = ngram(n_min, n_max, k)

    def propose(ctx: np.ndarray, pos: int) -> list[Seq]:
        got = context(ctx, pos)
        for t in [] if got else tables:
            n, size = t.keys.shape[1], t.keys.shape[0]
            s = int(slot(ctx[-n:], size)) if len(ctx) >= n else -1
            if s >= 0 and t.counts[s] and t.keys[s].tolist() == ctx[-n:].tolist():
                return [t.conts[s, : min(int(t.counts[s]), k)].tolist()]
        return got
    return propose


def oracle(k: int, target: dict):  # noqa: ANN001, ANN201
    """The best chain of up to k tokens copied from anywhere in the context (needs the future: an upper bound)."""
    full = np.concatenate([np.asarray(target["prompt"]), np.asarray(target["out"])])

    def propose(ctx: np.ndarray, pos: int) -> list[Seq]:
        want = full[pos: pos + k]
        best, at = 0, -1
        for s in range(len(ctx)):
            n = agree(ctx[s: s + k].tolist(), want)
            if n > best:
                best, at = n, s
        return [ctx[at: at + best].tolist()] if best else []
    return propose


def recycled(k: int, width: int, target: dict, tree: bool):  # noqa: ANN001, ANN201
    """Token Recycling's successor table: for each token, the model's top-``width`` next tokens at its latest
    occurrence in the context (the verify logits there; teacher-forced here, which equals them on accepted tokens).
    Chain: follow top-1 for k tokens. Tree: top-``width`` at the first hop, then top-1 chains (width * k nodes)."""
    top = np.asarray(target["top"])

    def propose(ctx: np.ndarray, pos: int) -> list[Seq]:
        table: dict[int, np.ndarray] = {}
        for j in range(len(ctx) - 1):  # successors known before this cycle (the last token's logits come from verify)
            table[int(ctx[j])] = top[j]
        cur = int(ctx[-1])
        if cur not in table:
            return []
        firsts = table[cur][: width if tree else 1]
        chains = []
        for f in firsts:
            c, t = [int(f)], int(f)
            while len(c) < k and t in table:
                t = int(table[t][0])
                c.append(t)
            chains.append(c)
        return chains
    return propose


def cost(widths: list[int], costs: dict[int, float], k: int) -> float:
    """Summed cycle costs: each width rounded up to the verify length the device compiles for k (1, 2, 4, 8, ...
    below k + 1, then k + 1: ``SpecDecoder.verify_sizes`` of a hybrid or adaptive-k decoder; a plain n-gram decoder
    compiles only 1 and k + 1), costs interpolated (extrapolated past the last) there."""
    sizes = [t for t in (1, 2, 4, 8, 16, 32) if t < k + 1] + [k + 1]
    ts = sorted(costs)
    slope = (costs[ts[-1]] - costs[ts[-2]]) / (ts[-1] - ts[-2])

    def c(t: int) -> float:
        return float(np.interp(t, ts, [costs[x] for x in ts])) + max(t - ts[-1], 0) * slope
    return sum(c(next(s for s in sizes if s >= w)) for w in widths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--outputs", type=Path, help="JSON cache of the AR outputs (read if present, else written)")
    ap.add_argument("--phrases", type=Path, help="also n-gram settings with this phrase table (tools/make_phrases.py)")
    ap.add_argument("--costs", default="1:1.0,2:1.02,4:1.1,8:1.22,13:1.40",
                    help="cycle cost per compiled verify width T, in AR steps: T:cost,... (default: the isolated "
                    "forward(T) costs; give the in-cycle ones from bench_tasks.py --verify-cost)")
    args = ap.parse_args()
    costs = {int(a): float(b) for a, b in (x.split(":") for x in args.costs.split(","))}
    data = outputs(args.outputs, args.per_task, args.max_new_tokens, 8)
    tables = []
    if args.phrases is not None:
        with np.load(args.phrases) as z:
            tables = [SimpleNamespace(**{f: z[f"{f}{i}"] for f in ("keys", "conts", "counts")})
                      for i in range(len(z.files) // 3)]
        tables.sort(key=lambda t: -t.keys.shape[1])
    rows: dict[str, dict[str, tuple[float, float]]] = {}

    def settings(item: dict) -> dict:
        s = {f"ngram {lo}..4 k={k}": ngram(lo, 4, k) for lo in (1, 2, 3) for k in (2, 4, 8, 16)}
        s.update({f"ngram {n}..{n} k=4": ngram(n, n, 4) for n in (1, 2, 3, 4)})
        s.update({f"ngram {lo}..16 k=8": ngram(lo, 16, 8) for lo in (1, 2)})  # longest match wins, up to 16
        s.update({f"ngram 2..4 k={k} best-of-{m}": ngram(2, 4, k, m) for k in (4, 8) for m in (2, 4)})
        s.update({f"recycled chain k={k}": recycled(k, 1, item, False) for k in (2, 4, 8)})
        s.update({f"recycled tree 4x{k}": recycled(k, 4, item, True) for k in (2, 4)})
        if tables:
            s.update({f"ngram {lo}..4 k={k} + phrases": with_phrases(lo, 4, k, tables)
                      for lo in (1, 2) for k in (4, 8)})
        s.update({f"copy oracle k={k}": oracle(k, item) for k in (4, 8, 16)})
        return s

    def k_of(name: str) -> int:  # the compiled verify sizes follow the proposal cap (a tree: its node count)
        if "tree" in name:
            w, k = name.split()[-1].split("x")
            return int(w) * int(k)
        k = int(name.split("k=")[1].split()[0])
        return k * int(name.split("best-of-")[1]) if "best-of" in name else k

    for task, items in data.items():
        tot: dict[str, list[float]] = {}
        for item in items:
            for name, prop in settings(item).items():
                n, widths = replay(item, prop)
                t = tot.setdefault(name, [0, 0, 0.0])
                t[0] += n
                t[1] += len(widths)
                t[2] += cost(widths, costs, k_of(name))
        rows[task] = {name: (t[0] / t[1], t[0] / t[2]) for name, t in tot.items()}
    tasks = list(rows)
    print(f"{args.per_task} prompts per task, {args.max_new_tokens} new tokens (AR greedy, smollm2-135m); cell: "
          f"tokens per cycle / predicted speedup (cycle costs {args.costs})\n")
    print("| drafter | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for name in rows[tasks[0]]:
        print(f"| {name} | " + " | ".join(f"{rows[t][name][0]:.2f} / **{rows[t][name][1]:.2f}x**" for t in tasks)
              + " |")


if __name__ == "__main__":
    main()
