#!/usr/bin/env bash
# Issue 13's GPU checks, prepared as ONE call for a session that is lent a GPU machine
# (the `device` tool: run(command="bash bench/gpu.sh", timeout_s=600); about 6-8 minutes).
# That machine's python3 has JAX (CUDA), torch, numpy, matplotlib, pytest and hypothesis;
# gradflow runs from this checkout (PYTHONPATH), nothing is installed. Writes into $OUT
# (bench/results/gpu/ when OUT is unset): nvidia-smi.txt, tests.log, results.json/.md, bench.log.
#   1. correctness on the GPU: every matmul of a map at the stack's precision (the HLO), then
#      the lean and stack tests (fast paths equal autodiff, float32 and float64) with JAX's
#      own matmuls at float32 too (JAX_DEFAULT_MATMUL_PRECISION, so the tests' references are
#      exact: on a GPU JAX's default is TensorFloat-32);
#   2. the bench: LSTM 16 x 1000 x 256 hidden map, layer vs wavefront order, lean vs autodiff,
#      float32 vs the GPU's TF32 mode (with its error), vs torch on the same GPU (section
#      `accelerator`); then layer vs wavefront at 16 x 64 x 128 (section `wavefront`).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false MPLBACKEND=Agg
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch',
torch.__version__, torch.cuda.is_available())" 2>&1 | tee "$out/versions.txt"
{
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_matmul_precision.py 2>&1
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout 180 python3 -m pytest -q -x \
        -p no:cacheprovider tests/test_lean.py tests/test_stack.py 2>&1
} | tail -n 60 > "$out/tests.log"
tail -n 3 "$out/tests.log"
timeout 300 python3 -m bench --only accelerator,wavefront --repeats 5 --out "$out" \
    > "$out/bench.log" 2>&1
tail -n 30 "$out/results.md" 2>/dev/null || tail -n 30 "$out/bench.log"
