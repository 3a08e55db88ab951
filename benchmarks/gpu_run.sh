#!/usr/bin/env bash
# The GPU benchmark as one command on this workplace's GPU machine (see benchmarks/README.md): install the carried
# wheels, then run benchmarks/likelihood_gpu.py within a deadline, writing its table and JSON under $OUT.
#   here:  bash benchmarks/gpu_wheels.sh
#   there: run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
# With the first argument "overhead" it runs benchmarks/overhead.py on the GPU instead (per-call overhead against
# k-diffusion / diffusers / torchdiffeq, and compile_sampler's eager, cuda_graph and compile modes; wall clock with
# device synchronisation), writing $OUT/overhead_gpu.json (rewritten after every row) and $OUT/overhead_gpu.log:
#   there: run(command="bash benchmarks/gpu_run.sh overhead", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -c "import torch, diffusers, torchdiffeq; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
if [ "${1:-}" = "overhead" ]; then
    shift
    timeout "${DEADLINE:-540}" python3 benchmarks/overhead.py --device cuda --clock wall --batch 1 1024 --repeats 7 \
        --compiled eager cuda_graph compile --json "$OUT/overhead_gpu.json" "$@" 2>&1 | tee "$OUT/overhead_gpu.log"
    exit 0
fi
python3 benchmarks/likelihood_gpu.py --deadline "${DEADLINE:-520}" --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
