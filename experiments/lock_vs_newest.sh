#!/usr/bin/env bash
# Issue 9, item 2(c): do the results move between the lock and the newest versions setup.cfg allows today?
#   bash experiments/lock_vs_newest.sh OUT [SEED] [LOCK_CACHE]
# 1. OUT/venv: a fresh virtual environment resolved and frozen by requirements/refresh-lock.sh (reused if present);
# 2. the packages whose versions differ from requirements/lock.txt;
# 3. the SFT stage of SEED (pre-training and alignment, `selfdestruct.defend defense=sft`, one torch thread) in that
#    environment with a fresh cache (OUT/cache), and in the environment running this script (the locked one) with
#    LOCK_CACHE (default OUT/lock_cache; a cache that already holds the stage makes that run a few cache hits);
# 4. the two stages' weights compared byte for byte, and the aligned model's evaluation.
# The two stages run side by side (two cores; about 10 CPU-minutes each for the 1.1 M-parameter model, one thread).
# Prints the comparison (experiments/lock_vs_newest.py; readme_results.py --lock-vs-newest OUT makes it a generated
# block).
set -euo pipefail
out=$(realpath -m "${1:?output directory}"); seed=${2:-0}; lock_cache=$(realpath -m "${3:-$out/lock_cache}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
bash requirements/refresh-lock.sh "$out/newest.txt" "$out/venv"   # the newest set, frozen as a lock would be
cp requirements/lock.txt "$out/lock.txt"

stage() {  # stage NAME PYTHON CACHE: the SFT stage of $seed; its log names the cache entries it built or hit
  # (force=true: a rerun into the same OUT measures again, from the caches, instead of skipping the finished run)
  env OMP_NUM_THREADS=1 WANDB_MODE=disabled SELFDESTRUCT_CACHE="$3" "$2" -m selfdestruct.defend defense=sft \
    seed="$seed" force=true trainer.progress_bar=false hydra.run.dir="$out/$1" > "$out/$1.log" 2>&1
}
stage lock python "$lock_cache" & lock=$!              # the two environments side by side, one thread each
stage newest "$out/venv/bin/python" "$out/cache" & newest=$!
wait "$lock" || { echo "the locked environment's stage failed: $out/lock.log" >&2; exit 1; }
wait "$newest" || { echo "the newest environment's stage failed: $out/newest.log" >&2; exit 1; }

python experiments/lock_vs_newest.py "$out"
