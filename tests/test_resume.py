"""Every stage resumes exactly after kill -9: the same command, run again, ends as the uninterrupted run would have.

Fast tests check the parts (a data loader's position across passes and epochs, a killed cache build's leftovers);
the slow ones kill a real run of each stage with SIGKILL as soon as its first checkpoint exists, run the same
command again, and compare its metrics.json and saved weights, byte for byte, with an uninterrupted run's.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from selfdestruct.data.datamodule import ResumableDataLoader
from selfdestruct.pipeline.training import read_csv_rows, restore_earlier_rows
from selfdestruct.utils.cache import DONE_MARKER, cached_dir, work_dir

# ----------------------------------------------------------------------------------------------------------------
# The data loader's position
# ----------------------------------------------------------------------------------------------------------------


def _loader(n: int = 10, batch_size: int = 3, seed: int = 7) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(n)), batch_size=batch_size, shuffle=True,
                               generator=torch.Generator().manual_seed(seed), collate_fn=list)


def _epochs(loader, epochs: int) -> list[list[int]]:
    return [batch for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("cut", [1, 3, 4, 6, 8])  # 4 batches a pass: mid-pass cuts and cuts that close an epoch
def test_a_restored_loader_continues_the_uninterrupted_order(cut):
    reference = _epochs(_loader(), 3)
    assert len(reference) == 12 and sorted(sum(reference[:4], [])) == list(range(10))
    assert reference[:4] != reference[4:8]  # each pass draws its own permutation

    first = _loader()
    seen, epoch_done = [], False
    for epoch in range(3):
        for i, batch in enumerate(first):
            seen.append(batch)
            if len(seen) == cut:
                state, epoch_done = first.state_dict(), i == len(first) - 1
                break
        if len(seen) == cut:
            break
    assert state["handed_out"] == (cut - 1) % 4 + 1

    resumed = _loader()  # a new process: a freshly seeded generator
    resumed.load_state_dict({**state, "epoch_done": epoch_done})
    rest = []
    for _ in range(3 - cut // 4):  # the epochs Lightning still runs (the current one included when unfinished)
        rest.extend(resumed)
    assert seen + rest == reference


# ----------------------------------------------------------------------------------------------------------------
# The training log across a resume
# ----------------------------------------------------------------------------------------------------------------


def test_a_resumed_fit_keeps_the_killed_runs_earlier_log_rows(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    log = tmp_path / "csv" / "metrics.csv"
    log.parent.mkdir()
    # the killed process: the pre-training rows, then alignment flushed up to step 7 (its checkpoint: step 5)
    log.write_text("step,pretrain/loss,align/loss\n" + "".join(f"{s},{s},\n" for s in range(0, 12, 4))
                   + "".join(f"{s},,{10 - s}\n" for s in range(8)))
    earlier = read_csv_rows(log)
    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")  # the resumed process: a fresh file
    for s in range(6, 10):
        logger.log_metrics({"align/loss": 10 - s, "align/lr": 0.1}, step=s)
    restore_earlier_rows(logger, earlier)
    rows = read_csv_rows(log)
    align = [int(r["step"]) for r in rows if r["align/loss"]]
    assert align == list(range(10))  # every alignment step once, in order
    assert [int(r["step"]) for r in rows if r["pretrain/loss"]] == [0, 4, 8]  # the other stage's rows kept
    assert rows[0]["align/lr"] == "" and rows[-1]["align/lr"] == "0.1"
    logger.log_metrics({"defend/utility": 0.9}, step=10)  # the same logger goes on with a new column
    logger.save()
    rows = read_csv_rows(log)
    assert len(rows) == 14 and rows[-1]["defend/utility"] == "0.9" and rows[0]["pretrain/loss"] == "0"


# ----------------------------------------------------------------------------------------------------------------
# A cache build killed outright
# ----------------------------------------------------------------------------------------------------------------

_KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from selfdestruct.utils.cache import cached_dir, work_dir

    root = Path(sys.argv[1])
    def build(out):
        (out / "half.txt").write_text("half an entry")
        ckpt = work_dir(root, "stage", {"k": 1}) / "checkpoints"
        ckpt.mkdir(parents=True)
        (ckpt / "last.ckpt").write_text("step 5")
        time.sleep(60)
    cached_dir(root, "stage", {"k": 1}, build)
""")


def test_a_killed_cache_build_leaves_no_entry_and_its_rerun_resumes_from_the_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_path)], start_new_session=True)
    ckpt = work_dir(tmp_path, "stage", {"k": 1}) / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    final = tmp_path / "stage" / ckpt.parent.parent.name[1:-len(".work")]
    assert ckpt.exists() and not final.exists()  # no entry, only the dead build's work directory

    resumed_from = []

    def build(out: Path) -> None:
        assert not list(out.iterdir())  # the dead build's half entry is gone
        resumed_from.append(ckpt.read_text())
        (out / "payload.txt").write_text("complete")

    entry = cached_dir(tmp_path, "stage", {"k": 1}, build)
    assert entry == final and resumed_from == ["step 5"]
    assert (entry / DONE_MARKER).exists() and (entry / "payload.txt").read_text() == "complete"
    assert not (entry / "half.txt").exists()
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == sorted([final.name, f"{final.name}.lock"])


# ----------------------------------------------------------------------------------------------------------------
# Each stage killed with SIGKILL, then the same command again
# ----------------------------------------------------------------------------------------------------------------

SMALL = ["model=micro", "trainer.progress_bar=false", "eval.max_examples=4", "eval.max_new_tokens=8",
         "pretrain.epochs=1", "pretrain.batch_size=64", "align.epochs=2"]


def _command(entry: str, overrides: list[str], run_dir: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", f"selfdestruct.{entry}", *SMALL, *overrides, f"paths.cache_dir={cache}",
            f"hydra.run.dir={run_dir}"]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = time.time() - start
    print(f"{' '.join(cmd[2:4])}: {seconds:.1f} s")
    return proc, seconds


def _run_killed(cmd: list[str], checkpoint_glob: str) -> str:
    """Start ``cmd`` and SIGKILL its process group as soon as ``checkpoint_glob`` matches a file."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    deadline = time.time() + 900
    while not glob.glob(checkpoint_glob) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    found = glob.glob(checkpoint_glob)
    assert found, f"the run ended (status {proc.returncode}) before writing {checkpoint_glob}"
    return found[0]


def _result(run_dir: Path, keys: tuple[str, ...]) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    weights = hashlib.sha256((run_dir / "model" / "model.safetensors").read_bytes()).hexdigest()
    return {**{k: metrics[k] for k in keys}, "weights": weights}


def _assert_clean(cache: Path) -> None:
    """No half entry, no staging or work directory, every entry complete."""
    leftovers = [p for p in cache.glob("*/.*") if not p.name.endswith(".lock")]
    assert not leftovers, leftovers
    for entry in cache.glob("*/*"):
        assert entry.suffix == ".lock" or (entry / DONE_MARKER).exists(), entry


def _kill_and_resume(entry, overrides, tmp_path, cache, checkpoint_glob, keys, reference) -> dict:
    run_dir = tmp_path / "killed"
    cmd = _command(entry, overrides, run_dir, cache)
    ckpt = _run_killed(cmd, checkpoint_glob.format(cache=cache, run=run_dir))
    assert not (run_dir / "metrics.json").exists()
    proc, seconds = _run(cmd)
    assert f"resuming from {ckpt}" in proc.stdout + proc.stderr
    assert _result(run_dir, keys) == reference
    _assert_clean(cache)
    print(f"resumed run after SIGKILL: {seconds:.1f} s, metrics and weights identical")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted defense=sft run (the baseline of pre-training and alignment) and its cache."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cache, run_dir = root / "cache", root / "defend"
    _, seconds = _run(_command("defend", ["trainer.checkpoint_every_n_steps=20"], run_dir, cache))
    return {"cache": cache, "run": run_dir, "seconds": seconds, "result": _result(run_dir, ("pre", "aligned"))}


@pytest.mark.slow
@pytest.mark.parametrize("stage,kind", [("pretrain", "base"), ("align", "align")])
def test_sft_stages_resume_exactly_after_sigkill(stage, kind, uninterrupted, tmp_path):
    # a checkpoint every 20 steps: pre-training has 172 steps (one epoch), alignment 2 epochs of 75
    overrides = ["trainer.checkpoint_every_n_steps=20"]
    if stage == "align":  # the base comes from the uninterrupted run's cache entry: copy it, kill during alignment
        shutil.copytree(uninterrupted["cache"] / "base", tmp_path / "cache" / "base")
    _kill_and_resume("defend", overrides, tmp_path, tmp_path / "cache",
                     "{cache}/" + kind + "/.*.work/checkpoints/last.ckpt", ("pre", "aligned"),
                     uninterrupted["result"])


def _defense_entry(cache: Path, method: str) -> Path:
    return next(p.parent for p in cache.glob("defend/*/key.json") if json.loads(p.read_text())["defense"] == method)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    # SEAM: 24 pairs -> 6 steps an epoch of 4, two epochs; checkpoints at steps 4 and 8 (mid-epoch); the released
    # weights the moving average of the iterates (its running average is state too)
    ["defense=seam", "defense.params.num_samples=24", "defense.optim.epochs=2", "trainer.checkpoint_every_n_steps=4",
     "defense.optim.ema_decay=0.7"],
    # CTRAP with the Adam look-ahead (its second moment is state): harmful 20 (2 batches of 10) and retain 20 pairs
    # (4 batches of 5): 4 steps an epoch, three epochs; checkpoints every 3 steps
    ["defense=ctrap", "defense.params.lookahead=adam", "defense.params.num_samples=20", "defense.params.num_align=20",
     "defense.optim.epochs=3", "trainer.checkpoint_every_n_steps=3"],
], ids=["seam-ema", "ctrap-adam"])
def test_defenses_resume_exactly_after_sigkill(overrides, uninterrupted, tmp_path):
    cache = uninterrupted["cache"]
    _run(_command("defend", overrides, tmp_path / "fresh", cache))
    reference = _result(tmp_path / "fresh", ("pre", "aligned"))
    shutil.rmtree(_defense_entry(cache, overrides[0].split("=")[1]))  # the same command must build it again
    _kill_and_resume("defend", overrides, tmp_path, cache, "{cache}/defend/.*.work/checkpoints/last.ckpt",
                     ("pre", "aligned"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["attack.num_samples=200", "attack.epochs=3"],  # 13 steps an epoch; checkpoints every 5 steps
    ["attack=benign", "attack.num_samples=100", "attack.epochs=3"],
    ["attack=lora", "attack.num_samples=100", "attack.epochs=2"],
], ids=["harmful", "benign", "lora"])
def test_attacks_resume_exactly_after_sigkill(overrides, uninterrupted, tmp_path):
    overrides = [f"model_path={uninterrupted['run'] / 'model'}", "save_model=true",
                 "trainer.checkpoint_every_n_steps=5", *overrides]
    cache = uninterrupted["cache"]
    _run(_command("attack", overrides, tmp_path / "fresh", cache))
    reference = _result(tmp_path / "fresh", ("pre", "post"))
    _kill_and_resume("attack", overrides, tmp_path, cache, "{run}/checkpoints/last.ckpt", ("pre", "post"), reference)
    assert not (tmp_path / "killed" / "checkpoints").exists()  # removed once the run completed


# ----------------------------------------------------------------------------------------------------------------
# Output problems: a full disk or an unwritable directory, W&B that cannot start
# ----------------------------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_no_partial_metrics(tmp_path, capsys, monkeypatch):
    import errno

    from selfdestruct.utils import io
    from selfdestruct.utils.job import run_job

    real_fdopen = io.os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])  # part of it reached the disk, then it filled up
            raise OSError(errno.ENOSPC, "No space left on device", self.handle.name)

    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))

    def body():
        io.write_json_atomic(tmp_path / "metrics.json", {"post": {"harmful_score": 0.5}})
        return {}

    with pytest.raises(SystemExit) as exit_info:
        run_job(body, tmp_path)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "paths.cache_dir" in lines[0], lines
    assert not (tmp_path / "metrics.json").exists()
    assert not list(tmp_path.glob(".metrics.json.*"))  # the half-written temporary file is removed too


def test_an_unwritable_output_directory_is_refused_before_any_work(tmp_path, capsys):
    from selfdestruct.utils.job import run_job

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ran = []
    with pytest.raises(SystemExit) as exit_info:
        run_job(lambda: ran.append(1) or {}, blocker / "run")
    assert exit_info.value.code == 2 and not ran
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(blocker / "run") in lines[0], lines


def test_wandb_that_cannot_start_degrades_to_the_csv_logger_with_one_warning(tmp_path, monkeypatch, caplog):
    import wandb
    from pytorch_lightning.loggers import CSVLogger

    from selfdestruct.utils.loggers import build_loggers

    calls = []

    def failing_init(*args, **kwargs):
        calls.append(kwargs)
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", failing_init)
    with caplog.at_level("WARNING", logger="selfdestruct.utils.loggers"):
        loggers = build_loggers(tmp_path, config={"seed": 0})
    assert len(calls) == 1  # W&B was really asked to start
    assert [type(logger) for logger in loggers] == [CSVLogger]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "network is unreachable" in warnings[0].getMessage()
    loggers[0].log_metrics({"train/loss": 1.5}, step=0)
    loggers[0].save()
    assert "train/loss" in (tmp_path / "csv" / "metrics.csv").read_text()
