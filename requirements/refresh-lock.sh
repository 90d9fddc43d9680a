#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve the newest versions setup.cfg allows in a fresh virtual environment,
# then freeze every package. Run from the repository root:  bash requirements/refresh-lock.sh
# Commit the new lock together with re-measured numbers (README's results are tied to the lock they came from).
# Optional: bash requirements/refresh-lock.sh FILE VENV writes the freeze to FILE instead, building the environment
# in VENV (reused when it exists); experiments/lock_vs_newest.sh uses this to compare the newest set with the lock.
set -euo pipefail
lock=$(realpath -m "${1:-$(dirname "$0")/lock.txt}")
venv=${2:+$(realpath -m "$2")}
cd "$(dirname "$0")/.."
venv=${venv:-"$(mktemp -d)/venv"}
if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a CUDA build
  "$venv/bin/pip" install -q -e ".[test]"
fi
{
  echo "# Every Python package of the tested environment, pinned. Install with"
  echo "#   pip install -r requirements/lock.txt -e \".[test]\""
  echo "# Refresh with: bash requirements/refresh-lock.sh   ($(date -u +%F), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'))"
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/'
} > "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") packages)"
