"""Quickstart on the embedded default: defend, attack at every intensity, compare on a dashboard.

    python experiments/quickstart.py --out outputs/quickstart            # the full demo (README)
    python experiments/quickstart.py --out outputs/basic --basic         # SFT + three attacks only

The full demo runs the project's own entry points exactly as a user would:

1. ``selfdestruct.defend`` for each defense (a Hydra multirun over ``defense=...``);
2. ``selfdestruct.attack sweep=attack_grid`` — every defense × the 3 × 3 grid of learning rate × number of
   harmful samples (each defended model is built once and shared through the cache);
3. a benign fine-tune of each defended model;

(the three run ``--jobs`` jobs at once through the joblib launcher, one torch thread each: two by default);
4. ``selfdestruct.report`` — tables and the offline HTML dashboard, whose path it prints.

``--basic`` aligns with SFT and attacks at ``intensity=weak,medium,strong`` plus a benign fine-tune,
then prints the before/after table. Both print their wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DEFENSES = ("sft", "seam_tuned", "ctrap_tuned")
COLUMNS = ("harmful_score", "refusal_rate", "utility", "perplexity", "task_accuracy")


def run(args: list[str], check: bool = True, env: dict | None = None) -> int:
    print("+ python " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, *args], check=check, env=env).returncode


def parallel(jobs: int) -> tuple[list[str], dict | None]:
    """Hydra overrides and environment for ``jobs`` local jobs at once (joblib), one torch thread each."""
    if jobs <= 1:
        return [], None
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return ["hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}"], env


def before_after_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| run | " + " | ".join(f"{c} pre → post" for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for name, m in rows:
        cells = []
        for c in COLUMNS:
            pre, post = m.get("pre", {}).get(c), m.get("post", {}).get(c)
            cells.append(f"{pre:.3g} → {post:.3g}" if post is not None else f"{pre:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def basic(out: Path, common: list[str]) -> None:
    run(["-m", "selfdestruct.defend", f"hydra.run.dir={out / 'defend'}", *common])
    model = out / "defend" / "model"
    run(["-m", "selfdestruct.attack", "--multirun", f"model_path={model}", "intensity=weak,medium,strong",
         f"hydra.sweep.dir={out / 'attack'}", "hydra.sweep.subdir=${hydra.job.num}", *common])
    run(["-m", "selfdestruct.attack", f"model_path={model}", "attack=benign", f"hydra.run.dir={out / 'benign'}",
         *common])
    rows = [("sft (defend)", json.loads((out / "defend" / "metrics.json").read_text()))]
    for i, name in enumerate(("weak", "medium", "strong")):
        rows.append((f"attack {name}", json.loads((out / "attack" / str(i) / "metrics.json").read_text())))
    rows.append(("benign fine-tune", json.loads((out / "benign" / "metrics.json").read_text())))
    print("\n" + before_after_table(rows))


def full(out: Path, defenses: list[str], common: list[str], jobs: int) -> int:
    choice = f"defense={','.join(defenses)}"
    launcher, env = parallel(jobs)
    failed = run(["-m", "selfdestruct.defend", "--multirun", choice, f"hydra.sweep.dir={out / 'defend'}", *launcher,
                  *common], check=False, env=env)
    failed |= run(["-m", "selfdestruct.attack", "sweep=attack_grid", choice, f"hydra.sweep.dir={out / 'grid'}",
                   *launcher, *common], check=False, env=env)
    failed |= run(["-m", "selfdestruct.attack", "--multirun", "model_path=defend", "attack=benign", choice,
                   f"hydra.sweep.dir={out / 'benign'}", *launcher, *common], check=False, env=env)
    run(["-m", "selfdestruct.report", str(out / "defend"), str(out / "grid"), str(out / "benign"),
         "--out", str(out / "report")])
    print("\n" + (out / "report" / "summary.md").read_text())
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--basic", action="store_true", help="SFT and three attack intensities only")
    parser.add_argument("--defenses", default=",".join(DEFAULT_DEFENSES),
                        help="comma-separated defense options (conf/defense/*.yaml) for the full demo")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="full demo: jobs run at once (joblib, one torch thread each; 1 = one after another)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args()
    out = args.out.resolve()
    common = [f"seed={args.seed}", *args.overrides]
    start = time.perf_counter()
    status = 0
    if args.basic:
        basic(out, common)
    else:
        status = full(out, args.defenses.split(","), common, args.jobs)
        print(f"dashboard: {out / 'report' / 'dashboard.html'}")
    seconds = time.perf_counter() - start
    print(f"quickstart wall time: {seconds:.0f} s; outputs in {out}")
    command = "python experiments/quickstart.py" + (" --basic" if args.basic else "")
    (out / "quickstart.json").write_text(json.dumps({"command": command, "wall_time_s": round(seconds, 1),
                                                     "seed": args.seed, "jobs": args.jobs, "status": status}))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
