#!/usr/bin/env bash
# Everything the GPU part of the benchmark issue checks, in one call on a lent CUDA machine (the `device` tool):
# the CUDA tests plus the engine-vs-transformers tests (their engines run on CUDA there), then bench_gpu.py.
# That machine has torch, transformers and triton but not the rest: carry the wheels in .whl/ and, in .gpu/, the
# SmolLM2 tokenizer (tokenizer/) and the head of the ShareGPT file (sharegpt_head.json); see bench_gpu.py.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 TOKENMILL_SMOLLM2_TOKENIZER=$PWD/.gpu/tokenizer
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
TESTS=${TESTS:-"tests/test_cuda.py tests/test_triton_kernels.py tests/test_equivalence.py tests/test_async_scheduling.py"}
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 \
    | tee "$OUT/tests.log" | tail -30
# BENCH_RUNS: ';'-separated argument lists of bench_gpu.py, one run each (results under $OUT/run<i>/)
IFS=';' read -ra RUNS <<< "${BENCH_RUNS:-}"
[ ${#RUNS[@]} -eq 0 ] && RUNS=("")
for i in "${!RUNS[@]}"; do
    mkdir -p "$OUT/run$i"
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_gpu.py --tokenizer .gpu/tokenizer \
        --sharegpt-path .gpu/sharegpt_head.json --work-dir /tmp/tm_gpu --out "$OUT/run$i" ${RUNS[$i]} 2>&1 \
        | tee "$OUT/run$i/bench.log" | grep -E "bench_gpu|Error|error|Traceback|^[a-z0-9.-]+: tokenmill" | tail -12
done
