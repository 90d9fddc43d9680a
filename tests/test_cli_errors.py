"""Bad input gives one clear error line naming the key or path, no traceback, and no metrics.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(module: str, *args: str, run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args, f"hydra.run.dir={run_dir}"], capture_output=True,
                          text=True, env=env, timeout=300)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def _assert_failed_cleanly(proc, run_dir: Path, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.json").exists()
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_unknown_config_option(tmp_path):
    proc = _run("selfdestruct.attack", "model_path=/nowhere", "attack.learning_rate=1e-3", run_dir=tmp_path)
    _assert_failed_cleanly(proc, tmp_path, "attack.learning_rate")
    # Hydra's own message: its first line names the key.
    assert "attack.learning_rate" in proc.stderr.strip().splitlines()[0]


def test_missing_model_path(tmp_path):
    proc = _run("selfdestruct.attack", run_dir=tmp_path)
    _assert_failed_cleanly(proc, tmp_path, "model_path is required")
    assert proc.returncode == 2 and len(_error_lines(proc)) == 1


def test_model_path_that_does_not_exist(tmp_path):
    proc = _run("selfdestruct.attack", f"model_path={tmp_path / 'nope'}", run_dir=tmp_path)
    _assert_failed_cleanly(proc, tmp_path, f"model_path={tmp_path / 'nope'}: no such directory")
    assert len(_error_lines(proc)) == 1


def test_num_samples_larger_than_the_pool(tmp_path):
    proc = _run("selfdestruct.attack", f"model_path={tmp_path}", "attack.num_samples=100000", run_dir=tmp_path)
    _assert_failed_cleanly(proc, tmp_path, "attack.num_samples=100000 but only 2400 examples are available")
    assert len(_error_lines(proc)) == 1


@pytest.mark.parametrize("content,where", [
    ('{"prompt": "a", "response": "b", "category": {}, "is_safe": false}\n{"prompt": "c"\n', ":2:"),
    ('{"prompt": "a", "response": "b", "category": {}, "is_safe": "no"}\n', ":1:"),
])
def test_malformed_data_file(tmp_path, content, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    proc = _run("selfdestruct.attack", f"model_path={tmp_path}", f"data.attack_file={bad}", run_dir=tmp_path)
    _assert_failed_cleanly(proc, tmp_path, f"{bad}{where}")
    assert len(_error_lines(proc)) == 1


def test_an_unknown_eval_device_is_refused_before_any_work(tmp_path):
    proc = _run("selfdestruct.defend", "model=micro", "eval.device=tpu", run_dir=tmp_path)
    _assert_failed_cleanly(proc, tmp_path, "eval.device=tpu")
    assert not (tmp_path / "csv").exists()  # no stage started
