#!/bin/bash
# One defended model attacked over the 3 x 3 attack grid with the attack's own seed (attack.seed), to separate the
# attack's data-order noise from the defense's (README.md here, "How much is the attack's order"):
#   bash experiments/nowin/attack_orders.sh OUT NAME SEED DEFENSE ATTACK_SEED [OVERRIDES...]
#   bash experiments/nowin/attack_orders.sh outputs/orders ctrap_tuned 13 ctrap_tuned 101
# The defended model is the one `candidate.sh OUT NAME SEED DEFENSE` builds (the stage cache's, when it exists);
# the grid goes to OUT/NAME/sSEED/aATTACK_SEED/grid. Score each attack order as its own root:
#   python -m selfdestruct.report.acceptance OUT/NAME/s*/a101/grid --sft ...
set -euo pipefail
out=$1; name=$2; seed=$3; defense=$4; aseed=$5; shift 5
dir=$(realpath -m "$out/$name/s$seed/a$aseed")
mkdir -p "$dir"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
python -m selfdestruct.attack sweep=attack_grid defense="$defense" seed="$seed" attack.seed="$aseed" "$@" \
  trainer.progress_bar=false hydra.sweep.dir="$dir/grid" > "$dir/grid.log" 2>&1
echo "$name seed $seed attack.seed $aseed: $(( $(date +%s) - start )) s" | tee "$dir/DONE"
