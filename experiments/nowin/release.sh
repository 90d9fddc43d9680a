#!/bin/bash
# Release a ctrap_tuned model by its red team, on one seed: the procedure behind cascade.sh and reseed.sh.
#   bash experiments/nowin/release.sh OUT SEED [NAME:OVERRIDE ...]
# Step 1: ctrap_tuned with a measuring trap check (defense.trap_check={from_epoch:3}: the red team after the last
# epoch, the weights unchanged) into OUT/ctrap_tuned_tc/sSEED. Each later step NAME:OVERRIDE, in order and only while
# no earlier step's red team has won 8 of 9 cells: the same with OVERRIDE added, into OUT/NAME/sSEED. Released: the
# first step whose red team won 8, else the one that won most (the earlier on a tie), the rule of
# `eval.red_team.released_setting`. Each step is a candidate.sh run (defend, the 3 x 3 attack grid and the benign
# fine-tune, which a defender would not run: they are here to judge the release). One line per seed is appended to
# OUT/release.log; readme_results.py --cascade reads the released step from the runs, not from this log.
set -euo pipefail
usage="usage: bash experiments/nowin/release.sh OUT SEED [NAME:OVERRIDE ...]"
if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
out=$1; seed=$2; shift 2
for later in "$@"; do  # every later step checked before any training
  if [[ $later != ?*:?* ]]; then echo "release.sh: later step '$later' is not NAME:OVERRIDE; $usage" >&2; exit 2; fi
done
here=$(dirname "$0")
red() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['trap_check'][-1]['no_win'])" \
  "$out/$1/s$seed/defend/model/selfdestruct.json"; }
step() { bash "$here/candidate.sh" "$out" "$1" "$seed" ctrap_tuned 'defense.trap_check={from_epoch:3}' "${@:2}"; }
step ctrap_tuned_tc
released=ctrap_tuned_tc; best=$(red ctrap_tuned_tc); names=ctrap_tuned_tc; wins=$best
for later in "$@"; do
  if [ "$best" -ge 8 ]; then break; fi
  name=${later%%:*}
  step "$name" "${later#*:}"
  now=$(red "$name"); names="$names, $name"; wins="$wins, $now"
  if [ "$now" -gt "$best" ]; then best=$now; released=$name; fi
done
echo "seed $seed: red team $wins of 9 ($names); released $released" | tee -a "$out/release.log"
