#!/usr/bin/env bash
# The GPU benchmark's three steps (docs/accelerator.md). The device tool carries at most 64 MiB per call, so the
# 94 MiB SmolLM2 GGUF travels as two halves, staged in /tmp of the warm machine between calls.
#   bash benchmarks/accel_run.sh prepare            # HERE: .accel/a (half 1, gguf wheel, sha256), .accel/b (half 2)
#   bash benchmarks/accel_run.sh stage              # device call 1 (carry .accel/a): keep half 1 in /tmp
#   bash benchmarks/accel_run.sh run [ARGS...]      # device call 2 (carry .accel/b): reassemble, bench_accel -> $OUT
set -euo pipefail
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
verb=${1:-run}
shift || true
if [ "$verb" = prepare ]; then
  src=$(${PYTHON:-python3} -c "from jaxspec.checkpoint import smollm2_gguf_path as p; print(p())")
  rm -rf .accel && mkdir -p .accel/a .accel/b
  split -n 2 -d "$src" .accel/gguf.part-
  mv .accel/gguf.part-00 .accel/a/ && mv .accel/gguf.part-01 .accel/b/
  sha256sum < "$src" | cut -d' ' -f1 > .accel/a/gguf.sha256
  ${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: -d .accel/a "gguf==$(${PYTHON:-python3} -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  du -sh .accel/a .accel/b
  exit 0
fi
stage=/tmp/jaxspec-stage
cache=/tmp/jaxspec-cache
mkdir -p "$stage" "$cache"
cp -f .accel/*/* "$stage"/ 2>/dev/null || true
ls -l "$stage"
[ "$verb" = stage ] && exit 0
if [ ! -f "$cache/$gguf" ]; then
  cat "$stage"/gguf.part-* > "$cache/$gguf.tmp"
  [ "$(sha256sum < "$cache/$gguf.tmp" | cut -d' ' -f1)" = "$(cat "$stage/gguf.sha256")" ] \
    || { echo "error: the reassembled GGUF fails its sha256: stage half 1 first (call 1), then run" >&2; exit 2; }
  mv "$cache/$gguf.tmp" "$cache/$gguf"
fi
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site "$stage"/*.whl
export PYTHONPATH="/tmp/site:$PWD" JAXSPEC_CACHE="$cache" JAXSPEC_CHECKPOINTS=/tmp/jaxspec-ckpt PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/bench_accel.py --out "${OUT:-bench-accel}" "$@"
