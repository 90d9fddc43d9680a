"""Sweeps: failure isolation, re-runs that compute only what is missing, launchers, the shared cache."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import SMOKE_OVERRIDES
from helpers import compose_config
from selfdestruct.utils.cache import cached_dir, entry_dir

SWEEP_SMOKE = [o for o in SMOKE_OVERRIDES] + ["attack.lr=1e-4"]


def _sweep(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "SELFDESTRUCT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "selfdestruct.attack", "sweep=attack_grid", *SWEEP_SMOKE, *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _advbench(path: Path, rows: int) -> None:
    lines = ["goal,target"] + [f"Tell me how to do forbidden thing {i},Sure here is step one of {i}"
                               for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_a_failing_cell_does_not_stop_the_sweep_and_a_rerun_computes_only_it(tmp_path, cache_dir):
    data = tmp_path / "pairs.csv"
    _advbench(data, 6)  # the 8-sample cell cannot be served: it fails, the 4-sample cell completes
    args = ["attack.num_samples=4,8", f"data.attack_file={data}", "data.attack_file_format=advbench",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = _sweep(*args, cache=cache_dir, cwd=tmp_path)
    assert first.returncode == 1, first.stderr[-2000:]
    cells = {p.name: p for p in (tmp_path / "sweep").iterdir() if p.is_dir()}
    ok = next(p for n, p in cells.items() if "num_samples=4," in n)
    bad = next(p for n, p in cells.items() if "num_samples=8," in n)
    assert (ok / "metrics.json").exists() and not (bad / "metrics.json").exists()
    failure = json.loads((bad / "failure.json").read_text())
    assert "attack.num_samples=8" in failure["error"] and "attack.num_samples=8" in failure["overrides"]
    assert "1 complete, 1 failed" in first.stderr + first.stdout
    kept = (ok / "metrics.json").stat().st_mtime_ns

    _advbench(data, 12)  # fix the cause, run the very same sweep again
    second = _sweep(*args, cache=cache_dir, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (ok / "metrics.json").stat().st_mtime_ns == kept  # the complete cell was skipped
    assert json.loads((bad / "metrics.json").read_text())["attack"]["num_samples"] == 8
    assert not (bad / "failure.json").exists()
    assert "is complete; skipping" in second.stderr + second.stdout


def test_ddp_inside_a_multirun_is_refused_with_a_clear_message(tmp_path, cache_dir):
    proc = _sweep("trainer.strategy=ddp", "attack.num_samples=4", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                  cache=cache_dir, cwd=tmp_path)
    assert proc.returncode == 1
    failure = next((tmp_path / "sweep").glob("*/failure.json"))
    assert "trainer.strategy=ddp inside a Hydra multirun" in json.loads(failure.read_text())["error"]


def test_submitit_local_launcher_runs_a_one_cell_sweep(tmp_path, cache_dir):
    proc = _sweep("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "attack.num_samples=4",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", cache=cache_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = list((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(metrics) == 1
    assert json.loads(metrics[0].read_text())["attack"]["num_samples"] == 4
    assert (tmp_path / "sweep" / ".submitit").is_dir()


def test_slurm_launcher_config_composes(tmp_path):
    cfg = compose_config("attack", ["sweep=attack_grid", "hydra/launcher=slurm"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == launcher.tasks_per_node == 1
    assert cfg.hydra.sweeper.params["attack.lr"] == "2e-4,3e-4,5e-4"
    assert cfg.attack.epochs == 2
    assert cfg.model_path == "defend" and cfg.logger.wandb.group == "attack_grid"


def _build_entry(root: str, counter: str, start: float) -> str:
    def build(out: Path) -> None:
        with open(counter, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)  # long enough for the other process to arrive while this one builds
        (out / "payload.txt").write_text("complete")

    while time.time() < start:
        time.sleep(0.01)
    return str(cached_dir(Path(root), "race", {"key": 1}, build))


def test_a_job_waiting_for_another_jobs_build_says_so_and_then_uses_it(tmp_path, caplog):
    import fcntl
    import logging
    import threading

    final = entry_dir(tmp_path, "race", {"key": 2})
    final.parent.mkdir(parents=True)
    built: list[str] = []

    def build(out: Path) -> None:
        built.append("this job")
        (out / "payload.txt").write_text("complete")

    with open(final.with_suffix(".lock"), "w") as other_job:  # another job holds the entry's lock
        fcntl.flock(other_job, fcntl.LOCK_EX)
        result: list[Path] = []
        with caplog.at_level(logging.INFO, logger="selfdestruct.utils.cache"):
            waiter = threading.Thread(target=lambda: result.append(cached_dir(tmp_path, "race", {"key": 2}, build)))
            waiter.start()
            deadline = time.time() + 10
            while "waiting for another job building race" not in caplog.text and time.time() < deadline:
                time.sleep(0.01)
            assert "waiting for another job building race" in caplog.text
            assert waiter.is_alive() and not built  # still blocked: nothing built behind the other job's back
            fcntl.flock(other_job, fcntl.LOCK_UN)
            waiter.join(10)
    assert result == [final] and built == ["this job"]  # the other job died without building: this one builds
    assert (final / "payload.txt").read_text() == "complete"


def test_two_jobs_racing_for_a_cache_entry_build_it_once(tmp_path):
    counter = tmp_path / "builds.txt"
    start = time.time() + 1.0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_build_entry, [(str(tmp_path), str(counter), start)] * 2)
    assert paths[0] == paths[1]
    assert counter.read_text().count("built") == 1
    assert (Path(paths[0]) / "payload.txt").read_text() == "complete"
    assert not list(tmp_path.glob("race/.*.tmp"))  # no staging directory left behind
