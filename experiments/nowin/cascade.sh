#!/bin/bash
# The cascade a defender runs before releasing a ctrap_tuned model (experiments/nowin/README.md, "A cascade released
# by its red team"), on one seed:
#   bash experiments/nowin/cascade.sh OUT SEED
# release.sh with one later step: if step 1's red team wins fewer than 8 of 9 cells, the same with the farther pair
# of trap radii [0.002, 0.006] ("R6") into OUT/ctrap_tuned_r6/sSEED; released: step 2 if its red team won more cells
# than step 1's, else step 1. Then, against SFT runs of the same seeds:
#   python experiments/readme_results.py --cascade OUT/ctrap_tuned_tc OUT/ctrap_tuned_r6 --cascade-sft SFT --out F
set -euo pipefail
exec bash "$(dirname "$0")/release.sh" "$1" "$2" 'ctrap_tuned_r6:defense.params.radii=[0.002,0.006]'
