"""Generate text with a LLaMA-family checkpoint: autoregressive (``ar``) or speculative (``ssd``) decoding, drafting
by n-gram lookup in the context (``ngram``), by the model with skipped sublayers (``skip``), or both (``hybrid``).

    python scripts/generate.py --prompt "Hi"                      # smollm2-135m, fetched on first use
    python scripts/generate.py --prompt "..." --mode ssd --drafter ngram --ngram-k 8 --compare
    python scripts/generate.py --ckpt llama2-70b --chat --prompt "..." --mode ssd --skip-profile llama-2-70b
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jaxspec.cli import exit_on_interrupt, import_jax, imports_done, imports_start  # noqa: E402

exit_on_interrupt()  # Ctrl-C during the slow imports below: exit 130, no traceback
imports_start()  # no garbage collection while the modules below load
import_jax()  # without etils.epath: 50-70 ms less of every command

import jax  # noqa: E402

from jaxspec import aot, cli, distributed, phrases, validate  # noqa: E402
from jaxspec.batch import run_batch_job  # noqa: E402
from jaxspec.checkpoint import CheckpointError, cache_dir, fast_cache_dir, load, resolve  # noqa: E402
from jaxspec.config import SkipMask  # noqa: E402
from jaxspec.decode import Decoder, Result, generate, host, result_stats, row_tokens  # noqa: E402
from jaxspec.draft_model import PRECISIONS, DraftSpec, with_draft  # noqa: E402
from jaxspec.profile import DEFAULT, Profile, find_profile, load_profile  # noqa: E402
from jaxspec.sampling import Sampling  # noqa: E402
from jaxspec.sharding import MeshDecoder, make_mesh, param_sharding_fn  # noqa: E402
from jaxspec.speculative import DRAFTERS, SpecDecoder  # noqa: E402
from jaxspec.tokenizer import StreamDecoder  # noqa: E402
from jaxspec.validate import layers  # noqa: E402

imports_done()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m", help="registered name or checkpoint directory")
    ap.add_argument("--prompt", help="one prompt (or --input for a batch job)")
    ap.add_argument("--input", help="batch job: JSONL of {\"id\", \"prompt\"} (+ optional max_new_tokens, temperature, "
                                    "top_k, top_p per row)")
    ap.add_argument("--output", help="batch job: JSONL results, one line per id, appended; rerun to resume")
    ap.add_argument("--batch-size", type=int, default=8, help="batch job: rows per batch")
    ap.add_argument("--on-error", choices=["skip", "reject"], default="skip",
                    help="batch job: skip malformed input lines (reported by line number) or refuse to start")
    ap.add_argument("--mesh", help="DATAxMODEL device mesh, e.g. 1x8 (default: one device)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    ap.add_argument("--interactive", action="store_true", help="multi-turn chat in the terminal; the model, compiled "
                    "functions and the conversation's KV cache stay warm between turns (/reset, /stats, /exit)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--mode", choices=["ar", "ssd"], help="default: the checkpoint profile's choice; without a profile "
                    "profile.DEFAULT (n-gram drafting, measured no slower than AR where nothing repeats)")
    ap.add_argument("--drafter", choices=DRAFTERS, help="ssd draft source: skip (needs a mask or profile), ngram "
                    "(prompt lookup), hybrid (n-gram where the context has a match, else skip); default: the profile's")
    ap.add_argument("--ngram-min", type=int, help="shortest n-gram matched (default 2 or the profile's)")
    ap.add_argument("--ngram-max", type=int, help="longest n-gram matched, tried first (default 4 or the profile's)")
    ap.add_argument("--ngram-k", type=int, help="most tokens an n-gram match proposes (default: the profile's, else 4)")
    ap.add_argument("--ngram-adaptive", action=argparse.BooleanOptionalAction, help="propose k/2 tokens, k after a "
                    "proposal with k/2 accepted (default: the profile's choice)")
    ap.add_argument("--phrases", help="phrase table (tools/make_phrases.py) the n-gram drafter also looks up where "
                    "the context has no match (default: the profile's, if its search adopted one)")
    ap.add_argument("--no-phrases", action="store_true", help="no phrase table, even the profile's")
    ap.add_argument("--skip-profile", help="profile JSON or preset name (default: the checkpoint's own)")
    ap.add_argument("--skip-attn", help="comma-separated attention sublayers the draft skips")
    ap.add_argument("--skip-mlp", help="comma-separated MLP sublayers the draft skips")
    ap.add_argument("--max-draft", type=int, help="most tokens drafted per cycle (default 12 or the profile's)")
    ap.add_argument("--threshold", type=float, help="initial draft-exit threshold θ (default 0.6 or the profile's)")
    ap.add_argument("--fixed-threshold", action="store_true", help="keep θ fixed instead of adapting it")
    ap.add_argument("--draft-precision", choices=PRECISIONS, help="ssd: the draft's own weight precision (int8: a "
                    "per-channel copy, ~1/4 of the float32 layer weights; default float32 or the profile's)")
    ap.add_argument("--draft-head", type=int, help="ssd: the draft's head covers only this many most frequent tokens "
                    "(the profile's ranking, else token id order); 0 = the whole vocabulary")
    ap.add_argument("--compare", action="store_true", help="run ar then ssd on the prompt and report both")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default float32 (bfloat16 is for GPU/TPU; "
                    "refused on CPU, where it decodes several times slower)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (last line of stdout)")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def pick_profile(args: argparse.Namespace, cfg, ckpt_dir: Path) -> Profile | None:  # noqa: ANN001
    """The skip profile to use: explicit flags, an explicit profile, the checkpoint's own, or the project's shipped
    one for this model (``profile.find_profile``); None if none (the caller then uses ``DEFAULT``)."""
    if args.skip_attn or args.skip_mlp:
        mask = SkipMask(layers(args.skip_attn, "--skip-attn"), layers(args.skip_mlp, "--skip-mlp"))
        return Profile(mask=mask.validate(cfg.n_layers))
    if args.skip_profile:
        return load_profile(args.skip_profile, cfg)
    return find_profile(ckpt_dir, cfg)


def draft_choice(args: argparse.Namespace, prof: Profile) -> tuple[DraftSpec | None, list[int] | None]:
    """The cheap draft (flags over the profile's ``draft`` entry, a ``DraftSpec.to_json``) and the profile's token
    ranking (``draft_vocab``: token ids, most frequent first); None: the checkpoint's own weights and head."""
    saved = DraftSpec.from_json(prof.info.get("draft") or {})
    spec = DraftSpec(args.draft_precision or saved.precision,
                     saved.head if args.draft_head is None else args.draft_head, saved.min_rows)
    if spec.is_full:
        return None, None
    return spec, prof.info.get("draft_vocab")


def text_of(tok, ids: list[int], eos: tuple[int, ...]) -> str:  # noqa: ANN001
    """Decoded text of new tokens, without the end-of-sequence token that stopped generation."""
    return tok.decode(ids[:-1] if ids and ids[-1] in eos else ids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed.initialize()  # multi-host from the environment; a no-op on one host
    if args.interactive and (args.prompt or args.input or args.compare or args.mesh):
        raise ValueError("--interactive reads prompts from the terminal: no --prompt, --input, --compare or --mesh")
    if not args.interactive and (args.prompt is None) == (args.input is None):
        raise ValueError("give --prompt or --input (a batch job)")
    if (args.input is None) != (args.output is None):
        raise ValueError("--input and --output go together")
    validate.flags(args)
    if args.input is None and not args.prompt and not args.interactive:
        raise ValueError("empty prompt")
    if args.dtype == "bfloat16" and jax.default_backend() == "cpu":
        raise ValueError("--dtype bfloat16 decodes 5-9x slower than float32 on CPU (XLA:CPU's bfloat16 path); use "
                         "float32 there, with --draft-precision int8 for a cheaper speculative draft")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    # Compiled decode loops persist across runs (XLA's compilation cache), so only the first run pays to compile.
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    # Everything, however quick to compile: prefill buckets and small helpers also cost XLA:CPU time on a cold start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # And the prefill and decode executables themselves (no tracing on warm runs), loading the latest run's ones in
    # the background while the weights load.
    aot.enable(cache_dir() / "aot", prefetch=True)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.verbose else (lambda *a: None)

    ckpt_dir = resolve(args.ckpt)
    mesh = make_mesh(args.mesh) if args.mesh else None
    t_load = time.perf_counter()
    cfg, params, tok = load(args.ckpt, dtype=args.dtype, shardings=param_sharding_fn(mesh) if mesh else None,
                            fast_cache=None if mesh else fast_cache_dir())  # memory-mapped after the 1st run
    jax.block_until_ready(params)
    load_s = round(time.perf_counter() - t_load, 4)
    if tok is None:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no tokenizer")
    # Choosing the decoder: explicit flags, else the checkpoint's profile, else the measured default (profile.DEFAULT).
    prof = pick_profile(args, cfg, ckpt_dir)
    drafter = args.drafter or (prof.drafter if prof is not None else DEFAULT.drafter)
    if args.drafter and args.mode == "ar":
        raise ValueError("--drafter selects a speculative draft source: use it with --mode ssd (or no --mode)")
    mode = args.mode or ("ssd" if args.drafter else (prof or DEFAULT).use_ssd and "ssd" or "ar")
    if args.mode is None and not args.drafter and not (prof or DEFAULT).use_ssd:
        log(f"ar: {'the profile' if prof else 'the default'} found no drafter faster than AR on its device")
    if (mode == "ssd" or args.compare) and drafter != "ngram" and (prof is None or not prof.has_self_draft):
        raise ValueError(f"the {drafter} drafter needs a skip mask: --skip-attn/--skip-mlp, --skip-profile, or a "
                         "profile beside the checkpoint (python scripts/search_skip.py); or use --drafter ngram")
    if drafter == "ngram" and (args.draft_precision or args.draft_head):
        raise ValueError("--draft-precision and --draft-head shape model drafts: use them with --drafter skip or "
                         "hybrid, not ngram")
    eos = tuple(tok.eos_ids) or cfg.eos_ids
    ar = Decoder(cfg, sampling, eos)
    base = (prof or DEFAULT).for_drafter(drafter)  # --drafter skip: the profile's best self-draft
    ngram = [a if a is not None else b for a, b in zip((args.ngram_min, args.ngram_max, args.ngram_k), base.ngram,
                                                       strict=True)]
    spec, ranking = draft_choice(args, base) if drafter != "ngram" else (None, None)
    ssd = SpecDecoder(cfg, sampling, eos, skip=base.mask if drafter != "ngram" else SkipMask(),
                      max_draft=args.max_draft or base.max_draft, adaptive=not args.fixed_threshold, drafter=drafter,
                      ngram_min=ngram[0], ngram_max=ngram[1], ngram_k=ngram[2],  # checks the settings (ValueError)
                      adaptive_k=base.ngram_adaptive if args.ngram_adaptive is None else args.ngram_adaptive,
                      draft_spec=spec)
    log(f"drafter {drafter}: skip mask {ssd.skip}, n-gram {ngram[0]}..{ngram[1]} tokens, k="
        f"{f'{ngram[2] // 2}..' if ssd.adaptive_k else ''}{ngram[2]}")
    if args.phrases and (args.no_phrases or drafter == "skip" or mesh is not None
                         or (mode == "ar" and not args.compare)):
        raise ValueError("--phrases adds drafts to the n-gram lookup on one device: use it with --drafter ngram or "
                         "hybrid, without --mode ar, --no-phrases or --mesh")
    table = None if args.no_phrases or drafter == "skip" or mesh is not None else args.phrases or base.phrases
    if table and (mode == "ssd" or args.compare):
        params = params.replace(phrases=phrases.load(table, cfg.vocab_size))
        log(f"phrase table: {table}")
    if spec is not None:
        params = with_draft(params, cfg, spec, ranking)
        log(f"draft: {spec}")
    theta = args.threshold if args.threshold is not None else base.threshold
    if args.interactive:
        from jaxspec.chat import ChatSession, repl
        dec = ssd if mode == "ssd" else ar
        return repl(ChatSession(dec, params, tok, args.max_new_tokens, seed=args.seed,
                                **({"theta": theta} if dec.mode == "ssd" else {})))
    if args.input:
        dec = ssd if mode == "ssd" else ar
        summary = run_batch_job(args.input, args.output, lambda s: dataclasses.replace(dec, sampling=s), params, tok,
                                args.batch_size, args.max_new_tokens, default_sampling=sampling, mesh=mesh,
                                chat=args.chat, seed=args.seed, init={"theta": theta}, on_error=args.on_error)
        print(json.dumps(summary), file=sys.stderr)
        return 0
    if mesh is not None:
        ar = MeshDecoder.wrap(ar, mesh)
        ssd = MeshDecoder.wrap(ssd, mesh)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = tok.encode(text)

    def run(decoder: Decoder, stream: bool, show: bool = True) -> Result:
        """Generate, streamed (an update every ~0.1 s, printed as it comes when ``show``) or in one call."""
        kw = {"theta": theta} if decoder.mode == "ssd" else {}
        out, fed = StreamDecoder(tok), [0]

        def on_update(state) -> None:  # noqa: ANN001 - decode.State
            ids = row_tokens(state, 0, fed[0])
            fed[0] += len(ids)
            if host(state.done)[0] and ids and ids[-1] in eos:
                ids = ids[:-1]  # the end-of-sequence token that stopped generation is not printed
            sys.stdout.write(out.put(ids))
            sys.stdout.flush()

        res = generate(decoder, params, [ids], args.max_new_tokens, seed=args.seed,
                       on_update=on_update if stream and show else None, steps_per_call=64 if stream else 1 << 30,
                       update_s=0.1 if stream else 0.0, **kw)
        if stream and show:
            sys.stdout.write(out.flush() + "\n")
            sys.stdout.flush()
        return res

    if args.compare:
        # Both timed alike: AR streamed in paced calls as the SSD answer is, only not printed.
        r_ar, r_ssd = run(ar, not args.json, show=False), run(ssd, not args.json)
        stats = {"mode": "ssd", "drafter": drafter, **result_stats(r_ssd),
                 "ar_tokens_per_s": round(r_ar.tokens_per_s, 2), "ssd_tokens_per_s": round(r_ssd.tokens_per_s, 2),
                 "speedup": round(r_ssd.tokens_per_s / r_ar.tokens_per_s, 3)}
        if sampling.greedy:
            stats["identical"] = r_ar.tokens == r_ssd.tokens
        res = r_ssd
    else:
        res = run(ssd if mode == "ssd" else ar, not args.json)
        stats = {"mode": mode, **({"drafter": drafter} if mode == "ssd" else {}), **result_stats(res)}
    stats["load_s"] = load_s
    if args.json:
        print(json.dumps({"text": text_of(tok, res.tokens[0], eos), "token_ids": res.tokens[0], "stats": stats}))
    else:
        print(" ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    return 0


def entry() -> None:
    """Console script ``jaxspec-generate`` (and ``python scripts/generate.py``)."""
    cli.exit(cli.run(main))


if __name__ == "__main__":
    entry()
