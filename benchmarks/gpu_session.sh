#!/usr/bin/env bash
# One GPU session's checks, in the order that matters, each under its own time limit so that one
# failure does not cost the others (steps 1-3 took 334 s on one H100; step 4 has not run on a GPU
# yet; nothing downloaded):
#   1. the smoke regression check on CUDA (the digits smoke suite, packaged teacher: a GPU float path);
#   2. recover speed (benchmarks/gpu_recover.py, shortened: 10 timed steps);
#   3. the one-GPU phases of benchmarks/multi_gpu_check.py (distil + evaluate, then a 2-worker suite);
#   4. the panel students' post-train step on the GPU (benchmarks/panel_step_cost.py: online KD, stored
#      KD, hard labels): what a converged digits panel would cost there (docs/digits-narrow-panel.md).
# Run from a checkout (no install needed: PYTHONPATH is the checkout); logs go to $1 (default ./gpu-logs).
#     bash benchmarks/gpu_session.sh /tmp/gpu-logs
# Continual suites need avalanche-lib, which a bare GPU image may lack: they are not part of this script.
set -u -o pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
logs="${1:-$root/gpu-logs}"
mkdir -p "$logs"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
cd "$root" || exit 2
status=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log, remember a failure
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs/env.log"
"$python" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)" | tee -a "$logs/env.log"
step smoke-check 150 "$python" -m cdabench.cli check --suite smoke --device cuda --quiet \
    --cache-dir /tmp/cdabench-smoke-cache --out /tmp/cdabench-smoke-runs
step gpu-recover 210 "$python" benchmarks/gpu_recover.py --warmup 3 --steps 10
step multi-gpu-1 210 "$python" benchmarks/multi_gpu_check.py --gpus 1 --out /tmp/cdabench-gpu-check
step panel-step-cost 120 "$python" benchmarks/panel_step_cost.py --device cuda
exit $status
