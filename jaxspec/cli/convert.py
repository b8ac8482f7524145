"""Convert a Hugging Face LLaMA directory or a GGUF file into a jaxspec (orbax) checkpoint.

    python scripts/convert.py --hf ~/models/Llama-2-70b-hf --name llama2-70b
    python scripts/convert.py --gguf model.gguf --name my-model --out /data/ckpt/my-model --dtype bfloat16

The checkpoint goes to ``checkpoints/<NAME>/`` (or ``--out``), written atomically. A registered NAME also
checks the source against its config preset.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

from jaxspec.cli import exit_on_interrupt, import_jax  # noqa: E402

exit_on_interrupt()  # Ctrl-C during the slow imports below: exit 130, no traceback
import_jax()  # without etils.epath: 50-70 ms less of every command

from jaxspec import cli  # noqa: E402
from jaxspec.checkpoint import DTYPES, CheckpointError, checkpoint_size, checkpoints_root, convert_checkpoint, registry  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + safetensors/.bin)")
    src.add_argument("--gguf", metavar="FILE", help="GGUF file (llama architecture)")
    ap.add_argument("--name", required=True, help="checkpoint name (registered names are checked against presets)")
    ap.add_argument("--out", metavar="DIR", help="output directory (default: checkpoints/NAME)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="stored dtype (default float32)")
    ap.add_argument("--preset", help="config preset: checked against the source, or the config if it has none")
    args = ap.parse_args(argv)
    preset = args.preset or registry().get(args.name, {}).get("preset")
    if args.out is None and (Path(args.name).name != args.name or args.name in ("", ".", "..")):
        raise ValueError(f"--name {args.name!r} is not a plain name: give --out for a directory elsewhere")
    out = Path(args.out or checkpoints_root() / args.name)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)  # an unwritable location fails now, not after reading
    try:
        path = convert_checkpoint(out, hf=args.hf, gguf=args.gguf, dtype=args.dtype, preset=preset,
                                  meta={"name": args.name})
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"wrote {path} ({checkpoint_size(path) / 2**20:.1f} MiB; peak RSS {rss:.0f} MiB)")
    return 0


def entry() -> None:
    """Console script ``jaxspec-convert`` (and ``python scripts/convert.py``)."""
    cli.exit(cli.run(main))


if __name__ == "__main__":
    entry()
