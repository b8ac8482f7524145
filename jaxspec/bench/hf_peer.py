"""HF transformers peer, run as a script by any Python with torch + transformers + gguf (no jaxspec import).

Reads one JSON object on stdin: ``gguf`` (path), ``prompts`` (token id lists), ``max_new`` (one per prompt),
``threads``, ``early_exit`` (layer for ``assistant_early_exit``), ``modes`` (optional subset). Prints one JSON object:
per mode (``hf``, ``hf-prompt-lookup``, ``hf-early-exit``) a list of {tokens, decode_s, ttft_s} per prompt, or
{"error": ...}. Greedy, torch CPU float32 (the GGUF is
dequantized), eager attention. ``ttft_s`` is the time to the first new token (a ``streamer`` sees it), ``decode_s``
the time from there to the last one, so it compares with jaxspec's ``decode_s``; its tokens exclude the first.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(int(job.get("threads", 2)))
    gdir, gname = os.path.split(os.path.abspath(job["gguf"]))
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    modes = {"hf": {}, "hf-prompt-lookup": {"prompt_lookup_num_tokens": 10},
             "hf-early-exit": {"assistant_early_exit": int(job["early_exit"])}}
    out: dict = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

    class Clock:
        """A ``streamer``: generate hands it the prompt, then new tokens as they come; it keeps the first's time."""

        def __init__(self) -> None:
            self.calls, self.first = 0, 0.0

        def put(self, value: object) -> None:
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def gen(ids: list[int], n: int, kw: dict) -> dict:
        """Greedy tokens, the time to the first one (prefill) and from there to the last one (decode)."""
        x, clock = torch.tensor([ids]), Clock()
        t = time.perf_counter()
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                               streamer=clock, **kw)
        end = time.perf_counter()
        first = clock.first or end
        return {"tokens": y[0, len(ids):].tolist(), "decode_s": max(end - first, 1e-9), "ttft_s": first - t}

    for name, kw in modes.items():
        if name not in job.get("modes", modes):
            continue
        try:
            gen(job["prompts"][0], 4, kw)  # warm-up
            out[name] = [gen(ids, int(n), kw) for ids, n in zip(job["prompts"], job["max_new"], strict=True)]
        except Exception as e:  # a mode this transformers version lacks: report it, run the others
            out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
