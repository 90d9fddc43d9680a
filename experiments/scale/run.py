"""Does the paper-default mechanism appear with scale? (issue 9 item 6: an investigation, no target)

    python experiments/scale/run.py --out outputs/scale                               # tiny, small, medium x 3 seeds
    python experiments/scale/run.py --out outputs/scale --sizes tiny --seeds 0 --jobs 2 --deadline-s 3600
    python experiments/scale/run.py --out outputs/scale --summary-only               # the table from what exists

For each model size (conf/model) and seed: the SFT-aligned model and the paper-default SEAM and CTRAP
(conf/defense/seam.yaml, ctrap.yaml), each trained for as many optimiser steps as its paper ran (below), then the
3 x 3 ``attack_grid`` against each, the geometry of each released model on held-out data
(experiments/nowin/geometry.py) and a benign fine-tune of it (``attack=benign``). The table (OUT/summary.md,
OUT/summary.json) gives per size, defense and seed: no-win count (and how many of those cells collapsed),
pre-attack utility, held-out cos(g_a, g_b), the share of the collapse token in the answers to harmful prompts after
the attacks (mean over the grid's cells and the largest cell), and the benign task's accuracy and the utility after
the benign fine-tune.

Train length matched to the papers' optimiser steps (the synthetic world's defense pool holds 600 prompts):
- SEAM published: 8000 prompts, batch 4, 1 epoch = 2000 steps; here 600 / 4 = 150 steps an epoch, 13 epochs = 1950.
- CTRAP published: 4999 harmful examples, batch 10, 20 epochs = 10000 steps; here 120 steps an epoch (the retain
  stream, the longest), 83 epochs = 9960.
Pre-training and alignment learning rates are scaled by 128 / hidden_size (the tiny model's values at its width,
the usual width scaling), so that the wider models train stably with the same number of steps.

Jobs run as subprocesses, ``--jobs`` at once (one per GPU process or CPU core); a (size, seed)'s defenses start
once its SFT model exists. ``--deadline-s``: no stage starts after it, and running ones are stopped at it, so a
bounded machine lease still returns a table of what finished (an unfinished grid is marked so).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from selfdestruct import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
SIZES = ("micro", "tiny", "small", "medium")  # conf/model options built from config
MATCHED = {  # defense -> overrides that match the paper's number of optimiser steps (module docstring)
    "sft": [],
    "seam": ["defense.optim.epochs=13"],
    "ctrap": ["defense.optim.epochs=83", "defense.params.measure_lookahead=false"],
}


def conf(group: str, option: str = "default") -> dict:
    return yaml.safe_load((Path(CONF_DIR) / group / f"{option}.yaml").read_text())


def size_overrides(size: str) -> list[str]:
    """The model option and the pre-training and alignment learning rates scaled by the tiny model's width over its."""
    scale = conf("model", "tiny")["hidden_size"] / conf("model", size)["hidden_size"]
    return [f"model={size}", f"pretrain.lr={conf('pretrain')['lr'] * scale:g}",
            f"align.lr={conf('align')['lr'] * scale:g}"]


class Runner:
    """Runs commands ``jobs`` at once, not past the deadline and none after :meth:`stop`; logs each to a file."""

    def __init__(self, jobs: int, deadline: float, env: dict) -> None:
        self.slots = threading.Semaphore(jobs)
        self.deadline = deadline
        self.env = env
        self.stopped = threading.Event()

    def stop(self) -> None:
        """Start no new command (Ctrl-C: the running ones get the interrupt themselves)."""
        self.stopped.set()

    def __call__(self, args: list[str], log: Path) -> bool:
        with self.slots:
            left = self.deadline - time.time()
            if left <= 0 or self.stopped.is_set():
                return False
            log.parent.mkdir(parents=True, exist_ok=True)
            name = "/".join(log.parts[-4:])
            print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
            with log.open("w") as out:
                try:
                    rc = subprocess.run([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env=self.env, timeout=left).returncode
                except subprocess.TimeoutExpired:
                    rc = "deadline"
            print(f"[{time.strftime('%H:%M:%S')}] {name}: rc={rc}", flush=True)
            return rc == 0


def stage_args(out: Path, size: str, seed: int, defense: str, extra: list[str]) -> tuple[Path, list[str]]:
    where = out / size / defense / f"s{seed}"
    return where, [*size_overrides(size), f"defense={defense}", f"seed={seed}", *MATCHED[defense], *extra,
                   "trainer.progress_bar=false"]


def defend(run: Runner, out: Path, size: str, seed: int, defense: str, extra: list[str]) -> bool:
    where, common = stage_args(out, size, seed, defense, extra)
    return run(["-m", "selfdestruct.defend", *common, f"hydra.run.dir={where / 'defend'}"], where / "defend.log")


def measure(run: Runner, out: Path, size: str, seed: int, defense: str, extra: list[str]) -> None:
    """The geometry of the released model, the attack grid against it, then a benign fine-tune of it."""
    where, common = stage_args(out, size, seed, defense, extra)
    run(["experiments/nowin/geometry.py", str(where / "defend" / "model"), "--pairs", "8",
         "--json", str(where / "geometry.json")], where / "geometry.log")
    run(["-m", "selfdestruct.attack", "sweep=attack_grid", *common, f"hydra.sweep.dir={where / 'grid'}"],
        where / "grid.log")
    # a legitimate user's fine-tune (attack=benign): a defense that collapses under it is no defense
    run(["-m", "selfdestruct.attack", "attack=benign", "model_path=defend", *common,
         f"hydra.run.dir={where / 'benign'}"], where / "benign.log")


def run_all(out: Path, sizes: list[str], seeds: list[int], defenses: list[str], jobs: int, deadline_s: float,
            extra: list[str], runner=Runner) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "SELFDESTRUCT_CACHE": os.environ.get("SELFDESTRUCT_CACHE", str(out / "cache"))}
    run = runner(jobs, time.time() + deadline_s, env)

    def per_seed(size: str, seed: int) -> None:
        # SFT first: it builds the pre-trained and aligned models every defense starts from
        if not defend(run, out, size, seed, "sft", extra):
            return
        others = [d for d in defenses if d != "sft"]
        todo = [threading.Thread(target=measure, args=(run, out, size, seed, "sft", extra))]
        todo += [threading.Thread(target=lambda d=d: defend(run, out, size, seed, d, extra)
                                  and measure(run, out, size, seed, d, extra)) for d in others]
        for t in todo:
            t.start()
        for t in todo:
            t.join()

    threads = [threading.Thread(target=per_seed, args=(size, seed)) for size in sizes for seed in seeds]
    try:
        for t in threads:  # started in order, so the first sizes take the first slots
            t.start()
            time.sleep(0.2)
        for t in threads:
            while t.is_alive():  # a timed join, so that Ctrl-C reaches this thread at once
                t.join(timeout=0.1)
    except KeyboardInterrupt:
        run.stop()
        raise


def defense_log(run_dir: Path) -> dict[str, dict[int, float]]:
    """The defense stage's CSV log of a defend run, read once: each ``defense/*`` stat's value per optimiser step (the
    alignment's steps are not in it). A resumed run logs its steps once per attempt: the last value logged counts."""
    log: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("csv/*.csv")):
        for row in csv.DictReader(path.open()):
            for key, value in row.items():
                if row.get("step") and key.startswith("defense/") and value:
                    log.setdefault(key, {})[int(row["step"])] = float(value)
    return log


def last_defense_step(log: dict[str, dict[int, float]]) -> int | None:
    """The last optimiser step the defense stage logged, or None (SFT trains no defense)."""
    return max((step for values in log.values() for step in values), default=None)


def training_curve(log: dict[str, dict[int, float]], *keys: str, window: int = 150) -> tuple[float, float] | None:
    """Mean of the first of ``keys`` that was logged (a defense stat, e.g. ``defense/cos``) over the first and the
    last ``window`` logged steps of the defense stage, or None where none of them was logged."""
    values = next((log[key] for key in keys if key in log), None)
    if not values:
        return None
    series = [values[k] for k in sorted(values)]
    return statistics.fmean(series[:window]), statistics.fmean(series[-window:])


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarise(out: Path) -> list[dict]:
    """One row per (size, defense, seed) from the run directories under ``out``."""
    from selfdestruct.report.collect import collect, number
    from selfdestruct.report.verdict import COLLAPSED, DEFENDER_WINS, build_report

    rows = []
    for size_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name in SIZES):
        runs = collect([size_dir])
        report = build_report([size_dir], runs)
        cells: dict[tuple[str, str], list] = {}  # (defense dir, seed dir) -> judged attack runs
        for item in report.judged:
            parts = item.run.path.relative_to(size_dir).parts
            if item.run.stage == "attack" and len(parts) > 3 and parts[2] == "grid":  # not the benign fine-tune
                cells.setdefault((parts[0], parts[1]), []).append(item)
        for defense_dir in sorted(p for p in size_dir.iterdir() if p.is_dir()):
            for seed_dir in sorted(defense_dir.glob("s*")):
                seed = int(seed_dir.name[1:])
                defend = json.loads((seed_dir / "defend" / "metrics.json").read_text()) \
                    if (seed_dir / "defend" / "metrics.json").exists() else {}
                geometry = json.loads((seed_dir / "geometry.json").read_text())[0] \
                    if (seed_dir / "geometry.json").exists() else {}
                benign = json.loads((seed_dir / "benign" / "metrics.json").read_text()).get("post", {}) \
                    if (seed_dir / "benign" / "metrics.json").exists() else {}
                log = defense_log(seed_dir / "defend")
                judged = cells.get((defense_dir.name, seed_dir.name), [])
                ok = [j for j in judged if j.run.status == "ok"]
                collapse = [v for j in ok if (v := number(j.run.post, "collapse_token_rate")) is not None]
                kept = [post / pre for j in ok if (post := number(j.run.post, "utility")) is not None
                        and (pre := number(j.run.pre, "utility"))]
                rows.append({
                    "size": size_dir.name, "defense": defense_dir.name, "seed": seed,
                    "num_parameters": defend.get("num_parameters"), "defended": bool(defend),
                    "environment": defend.get("environment"),
                    "defense_steps": last_defense_step(log),
                    "utility": number(defend.get("pre"), "utility"),
                    "harmful_score": number(defend.get("pre"), "harmful_score"),
                    "no_win": sum(j.verdict in DEFENDER_WINS for j in ok), "cells": len(ok),
                    "collapsed": sum(j.verdict == COLLAPSED for j in ok),
                    "kept_min": min(kept, default=None), "kept_max": max(kept, default=None),
                    "cos_heldout": geometry.get("cos"), "cos_heldout_full": geometry.get("cos_full"),
                    "collapse_share_mean": _mean(collapse), "collapse_share_max": max(collapse, default=None),
                    "benign_accuracy": number(benign, "task_accuracy"), "benign_utility": number(benign, "utility"),
                    "cos_train": training_curve(log, "defense/cos"),
                    # the harmful batch's cross-entropy at θ: SEAM logs it as ce_harmful (g_a's loss), CTRAP as
                    # loss_harmful (g_h's loss), the same quantity
                    "ce_harmful_train": training_curve(log, "defense/ce_harmful", "defense/loss_harmful"),
                    "collapse_train": training_curve(log, "defense/loss_collapse"),  # CTRAP's trap
                })
    return rows


def _f(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _curve(pair, digits: int = 3) -> str:
    return "—" if not pair else f"{_f(pair[0], digits)} → {_f(pair[1], digits)}"


def markdown(rows: list[dict]) -> str:
    from selfdestruct.utils.provenance import describe

    made = sorted({describe(r["environment"]) for r in rows if r.get("environment")})
    seeds = len({r["seed"] for r in rows})
    lines = [f"Written by `python experiments/scale/run.py --summary-only` on {time.strftime('%Y-%m-%d')} from the "
             f"runs of {seeds} seeds; made with: {'; '.join(made) or 'unknown'}.", "",
             "| size | parameters | defense | seed | defense steps | no-win (of which collapsed) "
             "| utility (pre-attack) | utility after attack / pre (min–max cell) "
             "| held-out cos(g_a, g_b) | collapse-token share after attack (mean / max cell) "
             "| benign fine-tune: task accuracy / utility after "
             "| on its training batches, first → last 150 steps: cos(g_a, g_b); harmful CE; "
             "collapse CE at the look-ahead point |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        no_win = f"{r['no_win']}/{r['cells']} ({r.get('collapsed', 0)})" + ("" if r["cells"] == 9 else " (grid unfinished)")
        params = f"{r['num_parameters'] / 1e6:.1f} M" if r["num_parameters"] else "—"
        steps = "—" if r["defense_steps"] is None else str(r["defense_steps"])
        steps += "" if r["defended"] else " (stopped)"
        kept = "—" if r.get("kept_min") is None else f"{r['kept_min']:.2f}–{r['kept_max']:.2f}"
        lines.append(f"| {r['size']} | {params} | {r['defense']} | {r['seed']} | {steps} | {no_win} "
                     f"| {_f(r['utility'])} | {kept} "
                     f"| {_f(r['cos_heldout'])} "
                     f"| {_f(r['collapse_share_mean'])} / {_f(r['collapse_share_max'])} "
                     f"| {_f(r.get('benign_accuracy'))} / {_f(r.get('benign_utility'))} "
                     f"| {_curve(r.get('cos_train'))}; {_curve(r.get('ce_harmful_train'), 1)}; "
                     f"{_curve(r.get('collapse_train'), 2)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (runs, summary.md, summary.json)")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"], choices=SIZES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--defenses", nargs="+", default=["sft", "seam", "ctrap"], choices=sorted(MATCHED))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="commands at once")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="stop starting/running stages after")
    parser.add_argument("--summary-only", action="store_true", help="only write the table from existing runs")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage (e.g. trainer.max_steps=5)")
    args = parser.parse_args(argv)
    if "sft" not in args.defenses:
        parser.error("--defenses must include sft: its aligned model is every defense's starting point and reference")
    args.out = args.out.resolve()
    if not args.summary_only:
        run_all(args.out, args.sizes, args.seeds, args.defenses, args.jobs, args.deadline_s, args.overrides)
    rows = summarise(args.out)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "summary.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
