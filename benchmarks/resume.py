"""kill -9 at a random point of each stage, then the same command again: identical results, and what resuming saves.

    python benchmarks/resume.py --out outputs/resume_bench                      # the embedded default, every stage
    python benchmarks/resume.py --out outputs/resume_bench --stages align,attack --seed 3 model=micro

For each stage the command that builds it runs three times, from the same cache (the earlier stages built, this
one not; what the uninterrupted run adds is set aside before the next run): uninterrupted; killed (SIGKILL to its process group) at a random moment of the stage, a
uniform 10-90 % of the uninterrupted stage's duration after the stage's work began (``--seed`` seeds the draw; when
the stage ends before that moment, the run is set aside and tried again with half the delay); and the
same command again, which resumes from the stage's last checkpoint (``--checkpoint-every``, 25 steps). It prints
one JSON row per stage: the kill moment, the checkpoint the run resumed from, the resumed and the uninterrupted
run's wall time and their ratio (measured side by side on the same machine), and whether ``metrics.json``'s numbers
and the saved weights equal the uninterrupted run's byte for byte.

Stages (the demo's defenses): ``pretrain`` and ``align`` (``defend defense=sft``), ``seam`` and ``ctrap``
(``defend defense=seam_tuned`` / ``ctrap_tuned``), ``attack`` (``attack`` on the SFT model, the grid's strongest
cell). Extra arguments are Hydra overrides for every command. One torch thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from selfdestruct.pipeline.training import read_csv_rows
from selfdestruct.utils.run_metrics import METRICS_FILE

ATTACK = ["attack.lr=5e-4", "attack.num_samples=1000", "attack.epochs=2"]  # the attack grid's strongest cell


@dataclass
class Stage:
    name: str
    entry: str  # selfdestruct.<entry>
    overrides: list[str]
    kind: str  # the cache kind it builds ("run": the run directory's checkpoints)
    keys: tuple[str, ...]  # metrics.json keys that must match


STAGES = {
    "pretrain": Stage("pretrain", "defend", ["defense=sft"], "base", ("pre", "aligned")),
    "align": Stage("align", "defend", ["defense=sft"], "align", ("pre", "aligned")),
    "seam": Stage("seam", "defend", ["defense=seam_tuned"], "defend", ("pre", "aligned")),
    "ctrap": Stage("ctrap", "defend", ["defense=ctrap_tuned"], "defend", ("pre", "aligned")),
    "attack": Stage("attack", "attack", [*ATTACK, "save_model=true"], "run", ("pre", "post")),
}
ORDER = ("base", "align", "defend")  # the cache kinds, earliest first


def command(stage: Stage, cache: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", f"selfdestruct.{stage.entry}", *stage.overrides, *extra, f"paths.cache_dir={cache}",
            "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]


def entries(cache: Path) -> set[Path]:
    """Everything in the cache: each kind's entries, locks and work directories."""
    return {p for kind in cache.iterdir() if kind.is_dir() for p in kind.iterdir()} if cache.is_dir() else set()


def set_aside(cache: Path, keep: set[Path], dest: Path) -> None:
    """Move the cache's entries not in ``keep`` into ``dest``. (One cache serves every run: its keys name the parent
    entries by path, so a copy of a cache would not be hit.)"""
    for path in sorted(entries(cache) - keep):
        target = dest / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def in_progress(stage: Stage, cache: Path, run_dir: Path) -> bool:
    """Whether the stage's own work has started and not finished (its work directory exists, no entry yet)."""
    if stage.kind == "run":
        return (run_dir / "csv").is_dir() and not (run_dir / "metrics.json").exists()
    return any((cache / stage.kind).glob(".*.work"))


def launch(cmd: list[str], env: dict[str, str], log: Path, stage: Stage, cache: Path, run_dir: Path,
           kill_after: float | None = None) -> dict:
    """Run ``cmd``, noting when the stage's work starts and ends; SIGKILL its process group ``kill_after`` s into
    the stage (measured from the moment its work directory appears, in this very run)."""
    start = time.monotonic()
    span: list[float] = []
    with log.open("a") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while proc.poll() is None:
            now = time.monotonic() - start
            if in_progress(stage, cache, run_dir):
                span = [span[0] if span else now, now]
                if kill_after is not None and now - span[0] >= kill_after:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return {"seconds": now, "killed_in_stage": True, "span": span}
            time.sleep(0.05)
    if proc.returncode != 0 and kill_after is None:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}: see {log}")
    return {"seconds": time.monotonic() - start, "killed_in_stage": False, "span": span}


def result(run_dir: Path, keys: tuple[str, ...]) -> dict:
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    weights = hashlib.sha256((run_dir / "model" / "model.safetensors").read_bytes()).hexdigest()
    return {**{k: metrics[k] for k in keys}, "weights": weights}


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of the run's CSV training log (the attack's; a defense stage logs into its cache entry)."""
    return sorted(int(float(r["step"])) for r in read_csv_rows(run_dir / "csv" / "metrics.csv") if r.get("step"))


def resumed_step(log: Path) -> str | None:
    lines = [line for line in log.read_text().splitlines() if "resuming from" in line]
    return lines[-1].split("resuming from", 1)[1].strip() if lines else None


def bench(stage: Stage, cache: Path, out: Path, extra: list[str], env: dict[str, str], rng: random.Random) -> dict:
    if stage.entry == "attack":
        extra = [*extra, f"model_path={out / 'align' / 'fresh' / 'model'}"]
    root = out / stage.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if stage.kind in ORDER:  # this stage and the later ones (and evaluations of their models) are built afresh
        later = ORDER[ORDER.index(stage.kind):]
        set_aside(cache, {p for p in entries(cache) if p.parent.name not in (*later, "eval")}, root / "later_cache")
    before = entries(cache)
    fresh = launch(command(stage, cache, root / "fresh", extra), env, root / "fresh.log", stage, cache, root / "fresh")
    set_aside(cache, before, root / "fresh_cache")  # the killed run starts from the cache the fresh one found
    if len(fresh["span"]) != 2:
        raise SystemExit(f"{stage.name}: the uninterrupted run never showed its stage at work (see {root}/fresh.log)")
    first, last = fresh["span"]
    kill_after = (last - first) * rng.uniform(0.1, 0.9)
    cmd = command(stage, cache, root / "killed", extra)
    for attempt in range(1, 4):  # a run faster than the uninterrupted one may end the stage before the kill moment
        killed = launch(cmd, env, root / "killed.log", stage, cache, root / "killed", kill_after=kill_after)
        if killed["killed_in_stage"]:
            break
        set_aside(cache, before, root / f"unkilled_cache{attempt}")
        shutil.rmtree(root / "killed")
        kill_after /= 2
    resumed = launch(cmd, env, root / "resumed.log", stage, cache, root / "killed")
    same = result(root / "killed", stage.keys) == result(root / "fresh", stage.keys)
    row = {"stage": stage.name, "stage_s": round(last - first, 1), "killed_after_s": round(kill_after, 1),
           "attempts": attempt,
           "killed_in_stage": killed["killed_in_stage"], "resumed_from": resumed_step(root / "resumed.log"),
           "uninterrupted_s": round(fresh["seconds"], 1), "resumed_s": round(resumed["seconds"], 1),
           "resumed_over_uninterrupted": round(resumed["seconds"] / fresh["seconds"], 3), "identical": same}
    if stage.kind == "run":  # the training log of the resumed run covers every step once, as the uninterrupted one's
        row["same_log_steps"] = logged_steps(root / "killed") == logged_steps(root / "fresh")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random kill moments")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=25,
                        help="trainer.checkpoint_every_n_steps (default 25 rather than the config's 100, so that the "
                             "150-step SEAM and the 126-step attack have checkpoints to resume from wherever killed)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every command")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    if set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {', '.join(sorted(set(stages) - set(STAGES)))}; choose from {', '.join(STAGES)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    rng = random.Random(args.seed)
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    overrides = [f"trainer.checkpoint_every_n_steps={args.checkpoint_every}", *args.overrides]
    rows = []
    for name in STAGES:  # in pipeline order: each stage starts from the cache the earlier ones built
        if name not in stages and not (name == "align" and "attack" in stages):
            continue
        row = bench(STAGES[name], cache, out, overrides, env, rng)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "resume.json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
