#!/usr/bin/env bash
# Issue 9, item 2(c): do the results move between the lock and the newest versions setup.cfg allows today?
#   bash experiments/lock_vs_newest.sh OUT [SEED] [LOCK_CACHE]
# 1. OUT/venv: a fresh virtual environment resolved as requirements/refresh-lock.sh resolves it (reused if present);
# 2. the packages whose versions differ from requirements/lock.txt;
# 3. the SFT stage of SEED (pre-training and alignment, `selfdestruct.defend defense=sft`, one torch thread) in that
#    environment with a fresh cache (OUT/cache), and in the environment running this script (the locked one) with
#    LOCK_CACHE (default OUT/lock_cache; a cache that already holds the stage makes that run a few cache hits);
# 4. the two stages' weights compared byte for byte, and the aligned model's evaluation.
# Writes OUT/report.md. About 10 CPU-minutes per environment that trains (1.1 M-parameter model, one thread).
set -euo pipefail
out=$(realpath -m "${1:?output directory}"); seed=${2:-0}; lock_cache=$(realpath -m "${3:-$out/lock_cache}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ ! -x "$out/venv/bin/python" ]; then
  python -m venv "$out/venv"
  "$out/venv/bin/pip" install -q --upgrade pip
  "$out/venv/bin/pip" install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a CUDA build
  "$out/venv/bin/pip" install -q -e ".[test]"
fi
"$out/venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/' | sort > "$out/newest.txt"
grep -v '^#' requirements/lock.txt | sort > "$out/lock.txt"

stage() {  # stage NAME PYTHON CACHE: the SFT stage of $seed; its log names the cache entries it built or hit
  env OMP_NUM_THREADS=1 WANDB_MODE=disabled SELFDESTRUCT_CACHE="$3" "$2" -m selfdestruct.defend defense=sft \
    seed="$seed" trainer.progress_bar=false hydra.run.dir="$out/$1" > "$out/$1.log" 2>&1
}
stage lock python "$lock_cache"
stage newest "$out/venv/bin/python" "$out/cache"

python - "$out" <<'EOF'
import filecmp, json, platform, re, sys
from pathlib import Path

out = Path(sys.argv[1])
def versions(name):
    return dict(line.split("==", 1) for line in (out / name).read_text().split() if "==" in line)
lock, newest = versions("lock.txt"), versions("newest.txt")
changed = [f"{p} {lock.get(p, '—')} → {newest.get(p, '—')}" for p in sorted(set(lock) | set(newest))
           if lock.get(p) != newest.get(p)]
def entries(run):  # stage name -> the cache entry the run built or hit
    log = (out / f"{run}.log").read_text()
    return dict(re.findall(r"(?:building|cache hit:) (base|align)(?: into)? (\S+)", log))
lock_dirs, new_dirs = entries("lock"), entries("newest")
lines = [f"# The lock against the newest versions (seed {json.loads((out / 'lock' / 'metrics.json').read_text())['seed']})",
         "", f"Packages whose version differs from requirements/lock.txt: {', '.join(changed) or 'none'}.", ""]
for stage in ("base", "align"):
    same = filecmp.cmp(Path(lock_dirs[stage]) / "model" / "model.safetensors",
                       Path(new_dirs[stage]) / "model" / "model.safetensors", shallow=False)
    lines.append(f"- {stage} weights: {'byte for byte the same' if same else 'DIFFERENT'}")
aligned = [json.loads((out / run / "metrics.json").read_text())["aligned"] for run in ("lock", "newest")]
moved = {k: (aligned[0][k], aligned[1].get(k)) for k in aligned[0] if aligned[0][k] != aligned[1].get(k)}
lines.append("- aligned model's evaluation: " + ("the same in every metric" if not moved else
             "; ".join(f"{k} {a} → {b}" for k, a, b in ((k, *v) for k, v in moved.items()))))
env = json.loads((out / "newest" / "metrics.json").read_text()).get("environment", {})
lines += ["", f"Machine: {env.get('cpu', platform.processor())} ({env.get('cpu_capability', '?')} kernels); "
          f"Python {platform.python_version()}; one torch thread."]
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
