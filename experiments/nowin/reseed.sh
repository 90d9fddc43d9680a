#!/bin/bash
# The re-seeding release (experiments/nowin/README.md, "Re-drawing the defense seed") on one seed, with every step
# judged by the attack grid:
#   bash experiments/nowin/reseed.sh [--utility-check] OUT SEED
# release.sh with two later steps: while no earlier step has qualified (its red team won 8 of 9 cells; with
# --utility-check also its utility check, release.sh), the same with defense.seed=SEED+1000k (k = 1, 2: the defense
# stage's data order; the aligned model is the same) into OUT/ctrap_tuned_reseed{k}/sSEED. The built-in
# `experiment=nowin_reseed` trains and releases the same models as the plain procedure, without the grids. What is
# released, against SFT runs of the same seeds:
#   python experiments/readme_results.py --cascade OUT/ctrap_tuned_tc OUT/ctrap_tuned_reseed1 OUT/ctrap_tuned_reseed2 \
#     --cascade-sft OUT/sft [--cascade-utility-check]
set -euo pipefail
flags=()
if [ "${1:-}" = "--utility-check" ]; then flags=(--utility-check); shift; fi
out=$1; seed=$2
exec bash "$(dirname "$0")/release.sh" "${flags[@]}" "$out" "$seed" "ctrap_tuned_reseed1:defense.seed=$(( seed + 1000 ))" \
  "ctrap_tuned_reseed2:defense.seed=$(( seed + 2000 ))"
