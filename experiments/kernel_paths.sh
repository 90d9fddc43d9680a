#!/usr/bin/env bash
# The README's results: the --basic quickstart for each seed on each CPU kernel path, two runs at a time, one torch
# thread each, fresh caches, then experiments/readme_results.py writes experiments/results.md and README's block.
#   bash experiments/kernel_paths.sh OUT "SEEDS" "PATHS"      e.g.  bash experiments/kernel_paths.sh runs "0 2" "native avx2"
# PATHS: native (the machine's default), avx2 (ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2, as on an AVX2-only processor),
# portable (SELFDESTRUCT_REPRODUCIBLE=1: ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE; about 3x slower).
set -euo pipefail
out=${1:?output directory}; seeds=${2:-"0 1 2"}; paths=${3:-"native avx2"}
cd "$(dirname "$0")/.."
run() {  # run NAME SEED ENV...
  local name=$1 seed=$2; shift 2
  env OMP_NUM_THREADS=1 WANDB_MODE=disabled SELFDESTRUCT_CACHE="$out/$name/cache" "$@" \
    python experiments/quickstart.py --basic --out "$out/$name/qs" --seed "$seed" trainer.progress_bar=false \
    > "$out/$name.log" 2>&1
}
mkdir -p "$out"
jobs=()
for seed in $seeds; do
  for path in $paths; do
    case $path in
      native) run "native_s$seed" "$seed" & ;;
      avx2) run "avx2_s$seed" "$seed" ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 & ;;
      portable) run "portable_s$seed" "$seed" SELFDESTRUCT_REPRODUCIBLE=1 & ;;
      *) echo "unknown path $path (native | avx2 | portable)" >&2; exit 2 ;;
    esac
    jobs+=($!)
    if [ ${#jobs[@]} -ge 2 ]; then wait "${jobs[0]}"; jobs=("${jobs[@]:1}"); fi
  done
done
wait
echo "runs in $out; write the README block with:"
echo "  python experiments/readme_results.py --basic $out/*/qs --out experiments/results.md --readme README.md"
