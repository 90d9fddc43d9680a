#!/bin/bash
# The re-seeding release (experiments/nowin/README.md, "Re-drawing the defense seed") on one seed, with every step
# judged by the attack grid:
#   bash experiments/nowin/reseed.sh OUT SEED
# Step 1: ctrap_tuned with a measuring trap check (defense.trap_check={from_epoch:3}: the red team after the last
# epoch, the weights unchanged) into OUT/ctrap_tuned_tc/sSEED. Step k+1 (k = 1, 2), only while no earlier step's red
# team won 8 of 9 cells: the same with defense.seed=SEED+1000k (the defense stage's data order; the aligned model is
# the same) into OUT/ctrap_tuned_reseed{k}/sSEED. Each step is a candidate.sh run (defend, the 3 x 3 attack grid and
# the benign fine-tune, which the defender would not run: they are here to judge the release). The built-in
# `experiment=nowin_reseed` trains and releases the same models without the grids. What is released (the first step
# to reach 8, else the one whose red team won most, the earlier on a tie), against SFT runs of the same seeds:
#   python experiments/readme_results.py --cascade OUT/ctrap_tuned_tc OUT/ctrap_tuned_reseed1 OUT/ctrap_tuned_reseed2 \
#     --cascade-sft OUT/sft
set -euo pipefail
out=$1; seed=$2
here=$(dirname "$0")
red() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['trap_check'][-1]['no_win'])" \
  "$out/$1/s$seed/defend/model/selfdestruct.json"; }
bash "$here/candidate.sh" "$out" ctrap_tuned_tc "$seed" ctrap_tuned 'defense.trap_check={from_epoch:3}'
best=$(red ctrap_tuned_tc)
for k in 1 2; do
  if [ "$best" -ge 8 ]; then break; fi
  bash "$here/candidate.sh" "$out" "ctrap_tuned_reseed$k" "$seed" ctrap_tuned 'defense.trap_check={from_epoch:3}' \
    "defense.seed=$(( seed + 1000 * k ))"
  now=$(red "ctrap_tuned_reseed$k")
  if [ "$now" -gt "$best" ]; then best=$now; fi
done
echo "seed $seed: best red team $best of 9" | tee -a "$out/reseed.log"
