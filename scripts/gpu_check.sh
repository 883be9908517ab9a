#!/usr/bin/env bash
# One call on a GPU host (under 8 minutes): the CUDA tests, then the GPU benchmarks.
# Usage: bash scripts/gpu_check.sh [OUTDIR]   (OUTDIR defaults to ./gpu_check_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
pip install -q -e ".[test]" --no-deps >/dev/null 2>&1 || true
# Two processes: tests/test_kernels.py sets TRITON_INTERPRET=1 for its CPU checks, and in one process
# that would make test_cuda.py's compiled-kernel checks run interpreted (the first GPU run failed so).
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"
timeout 90 python -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee -a "$OUT/tests.txt"
timeout 120 python -m bench.engine --device cuda --batches 1 8 32 64 128 --steps 32 --rounds 1 2>&1 | grep -v -E "Loading|Writing" | tee "$OUT/bench_engine.txt"
timeout 150 python -m bench.adapters --device cuda --skip-peft --samples 10 --rounds 1 2>&1 | grep -v -E "Loading|Writing" | tee "$OUT/bench_adapters.txt"
