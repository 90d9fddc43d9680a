"""The no-win experiment on the embedded default: every defense x the 3 x 3 attack grid x seeds.

    python experiments/nowin/run.py --out outputs/nowin                                  # all of it (~30 min, 2 cores)
    python experiments/nowin/run.py --out outputs/nowin --seeds 0 --defenses sft seam_tuned
    python experiments/nowin/run.py --out outputs/nowin --table-only                     # re-read the tree

It only calls the project's own entry points (as a user would), defense by defense, then reads what they left:
``selfdestruct.defend`` per seed (``OUT/defend/``); ``selfdestruct.attack experiment=nowin``, the 3 x 3 ``attack_grid``
(``OUT/grid/``, the defended models shared through the cache); ``selfdestruct.attack attack=benign`` (``OUT/benign/``);
``geometry.py``, cos(g_a, g_b) of every defended model on held-out batches (``OUT/geometry.json``); and
``selfdestruct.report`` (``OUT/report/``). The table (:mod:`selfdestruct.report.nowin`) is printed and written to
``OUT/nowin.md`` and ``OUT/nowin.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from selfdestruct import CONF_DIR
from selfdestruct.report.collect import collect, read_json
from selfdestruct.report.nowin import build_table, defended_model_dirs

ROOT = Path(__file__).resolve().parents[2]
CONF_DEFENSE = Path(CONF_DIR) / "defense"
GEOMETRY = Path(__file__).resolve().parent / "geometry.py"
DEFAULT_DEFENSES = ("sft", "seam", "ctrap", "seam_tuned", "ctrap_tuned")
DEFAULT_SEEDS = (0, 1, 2)
SUBDIR = "hydra.sweep.subdir=${hydra.job.override_dirname}"


def run(args: Sequence[str]) -> int:
    print("+ python " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, *args], cwd=ROOT, check=False).returncode


def label_of(option: str, ctrap_epochs: int | None = None) -> str:
    """The name reports use for a defense option: its config's ``label``, else its ``name``, else the option."""
    if option == "ctrap" and ctrap_epochs:
        return f"ctrap-paper-{ctrap_epochs}ep"
    path = CONF_DEFENSE / f"{option}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return option
    return str(data.get("label") or data.get("name") or option)


def paper_ctrap_overrides(epochs: int | None) -> list[str]:
    """CTRAP's paper recipe trains 20 epochs (~40 min per seed on 2 CPU cores): optionally fewer, under its own label."""
    return [] if epochs is None else [f"defense.optim.epochs={epochs}", f"++defense.label=ctrap-paper-{epochs}ep"]


def run_all(out: Path, defenses: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
            ctrap_epochs: int | None = None) -> dict[str, float]:
    """Stages 1-5, defense by defense; the wall time of each stage. A failing stage is reported, the next one runs."""
    seed_list = ",".join(map(str, seeds))
    times: dict[str, float] = defaultdict(float)
    failed: set[str] = set()

    def stage(name: str, *args: str) -> None:
        start = time.perf_counter()
        if run(args) != 0:
            failed.add(name)
        times[name] += round(time.perf_counter() - start, 1)

    for option in defenses:
        common = [f"defense={option}", "trainer.progress_bar=false", *overrides,
                  *(paper_ctrap_overrides(ctrap_epochs) if option == "ctrap" else [])]
        stage("defend", "-m", "selfdestruct.defend", "--multirun", f"seed={seed_list}",
              f"hydra.sweep.dir={out / 'defend'}", SUBDIR, *common)
        # experiment=nowin is the attack_grid sweep over defenses and seeds; these lists replace its own.
        stage("grid", "-m", "selfdestruct.attack", "experiment=nowin", f"hydra.sweeper.params.defense={option}",
              f"hydra.sweeper.params.seed='{seed_list}'", f"hydra.sweep.dir={out / 'grid'}", *common)
        stage("benign", "-m", "selfdestruct.attack", "--multirun", "model_path=defend", "attack=benign",
              f"seed={seed_list}", f"hydra.sweep.dir={out / 'benign'}", SUBDIR, *common)
    start = time.perf_counter()
    measure_geometry(out)
    times["geometry"] = round(time.perf_counter() - start, 1)
    stage("report", "-m", "selfdestruct.report", *(str(out / d) for d in ("defend", "grid", "benign")),
          "--out", str(out / "report"))
    if failed:
        print(f"warning: stage(s) {', '.join(sorted(failed))} exited non-zero; the table shows what finished")
    return dict(times)


def measure_geometry(out: Path) -> list[dict[str, Any]]:
    """cos(g_a, g_b) on held-out batches of every defended model found under ``out`` (kept in geometry.json)."""
    target = out / "geometry.json"
    runs = collect([p for p in (out / "grid", out / "benign") if p.is_dir()])
    dirs = defended_model_dirs(runs)
    done = {(g["defense"], g["seed"], g["model"]): g for g in read_json(target, [])}
    todo = sorted({path for key, path in dirs.items() if (*key, path) not in done})
    measured: dict[str, dict] = {}
    if todo:
        raw = out / "geometry_raw.json"
        if run([str(GEOMETRY), *todo, "--json", str(raw)]) == 0:
            measured = {g["model"]: g for g in read_json(raw, [])}
    results = []
    for (defense, seed), path in sorted(dirs.items(), key=lambda kv: (kv[0][0], kv[0][1] if kv[0][1] is not None else -1)):
        g = done.get((defense, seed, path)) or measured.get(path)
        if g is not None:
            results.append({**g, "defense": defense, "seed": seed, "model": path})
    target.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (every cell's metrics.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--defenses", nargs="+", default=list(DEFAULT_DEFENSES),
                        help="defense options (conf/defense/*.yaml)")
    parser.add_argument("--ctrap-paper-epochs", type=int, default=1,
                        help="epochs of the paper-default CTRAP (its recipe says 20, ~40 min per seed on 2 CPU "
                             "cores; 0 = the paper's); every other hyper-parameter stays the paper's")
    parser.add_argument("--table-only", action="store_true", help="only (re)build the table from OUT")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctrap_epochs = args.ctrap_paper_epochs or None
    start = time.perf_counter()
    times: dict[str, float] = {}
    if not args.table_only:
        times = run_all(out, args.defenses, args.seeds, args.overrides, ctrap_epochs)
    table, data = build_table(out, [label_of(d, ctrap_epochs) for d in args.defenses])
    wall = round(time.perf_counter() - start, 1)
    if not args.table_only:
        data["wall_time_s"] = {**times, "total": wall}
    data["command"] = " ".join(["python", "experiments/nowin/run.py", *(argv if argv is not None else sys.argv[1:])])
    (out / "nowin.md").write_text(table)
    (out / "nowin.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n" + table)
    print(f"table: {out / 'nowin.md'}; wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
