#!/usr/bin/env bash
# The one command a GPU session runs first: about 4 minutes at most (245 s of part timeouts) (each part has its own timeout,
# and a part that fails or times out does not stop the others), then a summary block to paste
# into bench/RESULTS.md. Needs torch (CUDA), triton, transformers, numpy, safetensors, tokenizers
# and pytest: it imports only the engine and the kernels (no gateway, no network, no pip install).
# Usage: bash scripts/gpu_check.sh [OUTDIR]   (OUTDIR defaults to ./gpu_check_out)
set -u
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
: > "$OUT/parts.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
# one Triton cache for every part, empty at the start: the start-up part measures a cold compile and
# fills it, and the parts after it load what they share from it
export TRITON_CACHE_DIR="$PWD/$OUT/triton_cache"
case "$OUT" in /*) TRITON_CACHE_DIR="$OUT/triton_cache" ;; esac
rm -rf "$TRITON_CACHE_DIR"
unset TRITON_INTERPRET  # the kernels choose compiled/interpreted by device; do not let a stray one confuse a reader

# part NAME SECONDS CMD...: run with a timeout, output to OUT/NAME.txt (and its tail here)
part() {
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (at most ${limit} s): $*"
  start=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - start ))" >> "$OUT/parts.txt"
  grep -v -E "Loading|Writing|it/s\]|Warning|warnings.warn" "$OUT/$name.txt" | tail -n 30
  [ $rc -eq 0 ] || echo "=== $name: exit status $rc (124 = timed out); full output in $OUT/$name.txt"
}

part env 10 "$PY" -c "
import platform, shutil, sysconfig, os, torch, numpy
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f'not importable ({e})'
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA'
print(f'{gpu}: torch {torch.__version__}, triton {tv}, numpy {numpy.__version__}, Python {platform.python_version()}')
print(f'gcc {shutil.which(\"gcc\")}, g++ {shutil.which(\"g++\")}, Python.h {os.path.isfile(os.path.join(sysconfig.get_paths()[\"include\"], \"Python.h\"))}, {os.cpu_count()} CPUs')
"
part startup 55 "$PY" -m bench.gpu_startup --device cuda --timeout 25 --json "$OUT/startup.json"
# One process on purpose: the interpreter tests (CPU tensors) and the compiled ones (CUDA tensors)
# side by side, as a full-suite run on a GPU host mixes them (the first GPU run failed so).
part tests 110 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py
part bench_engine 30 "$PY" -m bench.engine --device cuda --batches 1 32 128 --steps 16 --rounds 1 \
  --json "$OUT/bench_engine.json"
part bench_adapters 40 "$PY" -m bench.adapters --device cuda --skip-peft --counts 1 100 --spreads 1 10 \
  --samples 4 --rounds 1
"$PY" scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
