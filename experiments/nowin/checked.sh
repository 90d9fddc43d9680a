#!/bin/bash
# ctrap_tuned released by the built-in checked release (experiment=nowin_reseed with defense.trap_check.utility_check
# at 0.95) on one seed, attacked over the 3 x 3 grid and fine-tuned on the benign task:
#   bash experiments/nowin/checked.sh OUT SEED          # into OUT/checked_sSEED/{grid,benign}
#   bash experiments/nowin/checked.sh OUT SEED first    # the first try alone (its cached entry), OUT/first_sSEED/...
# Against SFT's runs of the same seed (bash experiments/nowin/candidate.sh OUT sft SEED sft):
#   python -m selfdestruct.report.acceptance OUT/checked_sS/grid OUT/checked_sS/benign \
#     --sft OUT/sft/sS/grid OUT/sft/sS/benign
# One torch thread per command, two for the defense's look-ahead radii (as README command 1 runs ctrap_tuned).
set -euo pipefail
out=$1; seed=$2; which=${3:-checked}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case $which in
  checked) release=(experiment=nowin_reseed defense.trap_check.utility_check=0.95) ;;
  first) release=('defense.trap_check={from_epoch:3}') ;;
  *) echo "checked.sh: the third argument is 'checked' or 'first', not '$which'" >&2; exit 2 ;;
esac
dir=$(realpath -m "$out/${which}_s$seed")
mkdir -p "$dir"
common=(defense=ctrap_tuned "${release[@]}" seed="$seed" trainer.progress_bar=false)
start=$(date +%s)
python -m selfdestruct.attack sweep=attack_grid "${common[@]}" trainer.branch_threads=2 hydra.sweep.dir="$dir/grid" \
  > "$dir/grid.log" 2>&1
python -m selfdestruct.attack --multirun model_path=defend attack=benign "${common[@]}" hydra.sweep.dir="$dir/benign" \
  > "$dir/benign.log" 2>&1
echo "$which seed $seed: $(( $(date +%s) - start )) s" | tee "$dir/DONE"
