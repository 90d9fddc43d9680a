#!/usr/bin/env bash
# The scale study on a GPU machine lent for a bounded time, whose disk may not outlive the lease:
#   bash experiments/scale/bounded_gpu.sh RESULTS ARCHIVE --sizes medium --defenses sft seam --jobs 6 --deadline-s 480
# 1. CUDA MPS when the machine has it and this runs as root (kernels of the study's processes run side by side:
#    1.48 x the steps per second of plain sharing, benchmarks/gpu_sharing.py); stopped again at the end.
# 2. experiments/scale/run.py --out RESULTS with the other arguments. Run again with the same RESULTS on the same
#    machine, it resumes: defense stages from their last.ckpt (every 100 steps), grids skip their finished cells.
# 3. ARCHIVE (.tar.gz): RESULTS without weights, checkpoints or the stage cache (metrics, logs, summary; a few MB),
#    the part to take home; `run.py --out RESULTS --summary-only` rebuilds the table from it.
set -u
results=$1 archive=$2
shift 2
mps=""
if command -v nvidia-cuda-mps-control >/dev/null && [ "$(id -u)" = 0 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/selfdestruct-mps CUDA_MPS_LOG_DIRECTORY=/tmp/selfdestruct-mps
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY"
  if nvidia-cuda-mps-control -d; then mps=on; echo "CUDA MPS on"; else unset CUDA_MPS_PIPE_DIRECTORY; fi
fi
python3 experiments/scale/run.py --out "$results" "$@"
rc=$?
[ -n "$mps" ] && echo quit | nvidia-cuda-mps-control
mkdir -p "$(dirname "$archive")"
tar czf "$archive" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.bin' --exclude='*.pt' \
  --exclude="$(basename "$results")/cache" -C "$(dirname "$results")" "$(basename "$results")"
ls -la "$archive"
exit $rc
