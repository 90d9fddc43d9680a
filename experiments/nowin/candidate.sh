#!/bin/bash
# One defense setting on one seed, as the re-selection and confirmation of the tuned settings ran it (README.md here):
#   bash experiments/nowin/candidate.sh OUT NAME SEED DEFENSE [OVERRIDES...]
#   bash experiments/nowin/candidate.sh outputs/sel c_all_lam1 0 ctrap_tuned defense.params.lam=1.0 defense.params.num_align=null
# Defends, attacks over the 3 x 3 attack grid (sweep=attack_grid) and runs the benign fine-tune, one torch thread
# (run two at once on 2 cores), into OUT/NAME/sSEED/{defend,grid,benign}. Then, against SFT runs of the same seeds:
#   python -m selfdestruct.report.acceptance OUT/NAME/s*/grid OUT/NAME/s*/benign --sft OUT/sft/s*/grid OUT/sft/s*/benign
set -euo pipefail
out=$1; name=$2; seed=$3; defense=$4; shift 4
dir=$(realpath -m "$out/$name/s$seed")
mkdir -p "$dir"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(defense="$defense" seed="$seed" "$@" trainer.progress_bar=false)
start=$(date +%s)
python -m selfdestruct.defend "${common[@]}" hydra.run.dir="$dir/defend" > "$dir/defend.log" 2>&1
python -m selfdestruct.attack sweep=attack_grid "${common[@]}" hydra.sweep.dir="$dir/grid" > "$dir/grid.log" 2>&1
python -m selfdestruct.attack --multirun model_path=defend attack=benign "${common[@]}" hydra.sweep.dir="$dir/benign" \
  > "$dir/benign.log" 2>&1
echo "$name seed $seed: $(( $(date +%s) - start )) s" | tee "$dir/DONE"
