#!/usr/bin/env bash
# The GPU checks of the operators in one go, for a machine with an NVIDIA GPU, nvcc and PyTorch
# (for instance a lent device machine, whose time is short): build the CUDA kernels, run the CUDA
# tests (tests/test_ops.py's, which need the GPU, and the emulation's, which do not), then time the
# operators on the GPU. Every step's output also goes to OUT (default gpu_check/), and a failed
# step does not stop the later ones: each is worth having on its own.
#
#     bash benchmarks/gpu_check.sh [OUT]
#
# Installs this checkout in editable mode without dependencies or network (pip --no-index), so the
# machine's own torch is used; CUDA_HOME defaults to /usr/local/cuda.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
export DYNROBUST_CACHE_DIR=${DYNROBUST_CACHE_DIR:-$(mktemp -d)}
python=${PYTHON:-python3}
status=0

step() {  # step NAME COMMAND...: run it, log it to OUT/NAME.log, remember a failure
    local name=$1
    shift
    echo "== $name: $*" | tee "$out/$name.log"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    [ "$rc" = 0 ] || status=1
}

step gpu nvidia-smi
step install "$python" -m pip install -q --no-deps --no-build-isolation --no-index -e .
step build "$python" -m robustbench_dyn ops build --cuda
step tests "$python" -m pytest -q -rs tests/test_ops.py tests/test_cuda_emulation.py -k "cuda"
step bench "$python" benchmarks/bench_ops.py --device cuda --repeats 20
exit $status
