#!/usr/bin/env bash
# Issue 13's GPU checks, prepared as ONE call for a session that is lent a GPU machine
# (the `device` tool: run(command="bash bench/gpu.sh", timeout_s=600); 255 s on an H200 on
# 2026-12-04, its results in bench/results/gpu/, the next run's under $OUT).
# That machine's python3 has JAX (CUDA), torch, numpy, matplotlib, pytest and hypothesis;
# gradflow runs from this checkout (PYTHONPATH), nothing is installed. Writes into $OUT
# (bench/results/gpu/ when OUT is unset): nvidia-smi.txt, versions.txt, tests.log, cli.log,
# heatmap_lstm_L16.png, bench.log, results.json/.md (8 files: what one device call returns).
# Arguments go to `python -m bench` (`bash bench/gpu.sh --quick`: a dry run anywhere, seconds).
#   1. correctness on the GPU: every matmul of a map at the stack's precision (the HLO), then
#      the lean and stack tests (every fast path equals autodiff, float32 and float64; the
#      stack, wavefront by default there, equals a Python loop) with JAX's
#      own matmuls at float32 too (JAX_DEFAULT_MATMUL_PRECISION, so the tests' references are
#      exact: on a GPU JAX's default is TensorFloat-32);
#   2. the README's main command (`gradflow heatmap --cell lstm --layers 16`, PNG into $OUT);
#   3. the bench: LSTM 16 x 1000 x 256 hidden map, layer vs wavefront order, lean vs autodiff,
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
status=0  # every step runs (each within its time: 40 + 240 + 25 + 290 s at most, so the whole
step() {  # fits one 600 s call); the exit status says whether one failed or ran out of time
    local limit=$1 log=$2; shift 2
    timeout "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "[gpu.sh] stopped after ${limit} s: $*" | tee -a "$log"
    [ $rc -eq 0 ] || status=1
}
step 40 "$out/tests.log" python3 -m pytest -q -p no:cacheprovider tests/test_matmul_precision.py
JAX_DEFAULT_MATMUL_PRECISION=highest step 240 "$out/tests.log" \
    python3 -m pytest -q -p no:cacheprovider tests/test_lean.py tests/test_stack.py
grep -E "passed|failed|error" "$out/tests.log" | tail -n 5
# the README's main command, on the GPU (order="auto" runs the wavefront there), into $out
step 25 "$out/cli.log" python3 -m gradflow heatmap --cell lstm --layers 16 \
    --out "$out/heatmap_lstm_L16.png" --no-data
tail -n 3 "$out/cli.log"
step 290 "$out/bench.log" python3 -m bench --only accelerator,wavefront --repeats 5 \
    --out "$out" "$@"
grep -q '"errors": {}' "$out/results.json" 2>/dev/null || status=1
tail -n 30 "$out/results.md" 2>/dev/null || tail -n 30 "$out/bench.log"
exit $status
