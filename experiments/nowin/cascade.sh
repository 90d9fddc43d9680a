#!/bin/bash
# The cascade a defender runs before releasing a ctrap_tuned model (experiments/nowin/README.md, "A cascade released
# by its red team"), on one seed:
#   bash experiments/nowin/cascade.sh OUT SEED
# Step 1: ctrap_tuned with a measuring trap check (defense.trap_check={from_epoch:3}: the red team after the last
# epoch, the weights unchanged). If its red team wins fewer than 8 of 9 cells, step 2: the same with the farther
# pair of trap radii [0.002, 0.006] ("R6"). Release step 2's model if its red team won more cells than step 1's,
# else step 1's. Each step is a candidate.sh run (defend, the 3 x 3 attack grid and the benign fine-tune, which the
# defender would not run; they are here to judge the cascade) into OUT/ctrap_tuned_tc/sSEED and
# OUT/ctrap_tuned_r6/sSEED; the choice is appended to OUT/cascade.log. Then, against SFT runs of the same seeds:
#   python experiments/readme_results.py --cascade OUT/ctrap_tuned_tc OUT/ctrap_tuned_r6 --cascade-sft SFT --out F
set -euo pipefail
out=$1; seed=$2
here=$(dirname "$0")
red() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['trap_check'][-1]['no_win'])" \
  "$out/$1/s$seed/defend/model/selfdestruct.json"; }
bash "$here/candidate.sh" "$out" ctrap_tuned_tc "$seed" ctrap_tuned 'defense.trap_check={from_epoch:3}'
first=$(red ctrap_tuned_tc)
released=ctrap_tuned_tc
if [ "$first" -lt 8 ]; then
  bash "$here/candidate.sh" "$out" ctrap_tuned_r6 "$seed" ctrap_tuned 'defense.trap_check={from_epoch:3}' \
    'defense.params.radii=[0.002,0.006]'
  if [ "$(red ctrap_tuned_r6)" -gt "$first" ]; then released=ctrap_tuned_r6; fi
fi
echo "seed $seed: red team $first of 9 for ctrap_tuned_tc; released $released" | tee -a "$out/cascade.log"
