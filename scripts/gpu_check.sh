#!/usr/bin/env bash
# The GPU path in one command (make gpu-check), for a CUDA machine with Python and a CUDA torch already there (no
# network needed; torchao is optional: without it the int8/int4 rows are skipped). Runs the CUDA tests, the
# random-weights benchmark of a 7B shape and, when the embedded default model is converted, its AR and S3D speed
# compiled with CUDA graphs. Everything goes to runs/gpu-check.txt (or $1).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOG=${1:-runs/gpu-check.txt}
mkdir -p "$(dirname "$LOG")"
export PYTHONUNBUFFERED=1
status=0
step() {  # step TITLE COMMAND...: runs it, logs it, remembers a failure
    echo -e "\n## $1\n\n\$ ${*:2}" | tee -a "$LOG"
    "${@:2}" 2>&1 | tee -a "$LOG" || status=1
}
: >"$LOG"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    { echo "gpu-check: no CUDA device visible to $PY" >&2; exit 2; }
step "machine" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step "torch" "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
# in parallel where pytest-xdist is installed: each test compiles its own steps, so the suite is compile-bound
XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n ${GPU_CHECK_WORKERS:-6}")
step "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_cuda.py
FORMATS=${GPU_CHECK_FORMATS:-bfloat16}  # int8 int4 too: several minutes more of compiling on a 7B shape
step "7B shape, random weights" "$PY" bench.py --random_weights llama-7b --formats $FORMATS --gammas 4 \
    --json runs/gpu-random-weights.json
if [ -f checkpoints/SmolLM2-135M-Instruct/model.safetensors ]; then
    step "default model: decode, ours eager and compiled (CUDA graphs) against transformers" \
        "$PY" bench.py --decode --dtypes bfloat16 --repeats 3
    step "default model: S3D with the shipped heads against AR, compiled" \
        "$PY" generate.py --compile --s3d heads/smollm2-135m-instruct.safetensors --compare_ar --max_new_tokens 256
else
    echo -e "\n(the default model is not converted here: scripts/convert_gguf.py --default, then run again)" | tee -a "$LOG"
fi
echo -e "\ngpu-check: $([ $status = 0 ] && echo passed || echo FAILED), log in $LOG" | tee -a "$LOG"
exit $status
