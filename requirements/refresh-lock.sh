#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve the newest versions setup.cfg allows in a fresh virtual environment,
# then freeze every package. Run from the repository root:  bash requirements/refresh-lock.sh
# Commit the new lock together with re-measured numbers (README's results are tied to the lock they came from).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a CUDA build
"$venv/bin/pip" install -q -e ".[test]"
{
  echo "# Every Python package of the tested environment, pinned. Install with"
  echo "#   pip install -r requirements/lock.txt -e \".[test]\""
  echo "# Refresh with: bash requirements/refresh-lock.sh   ($(date -u +%F), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'))"
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/'
} > requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
