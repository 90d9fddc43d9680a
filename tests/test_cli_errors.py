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


@pytest.mark.parametrize("module,args,needle", [
    ("selfdestruct.attack", ["model_path=/nowhere/model"], "model_path=/nowhere/model: no such directory"),
    ("selfdestruct.attack", ["model_path=defend", "attack.num_samples=100000"], "attack.num_samples=100000"),
    ("selfdestruct.attack", ["model_path=defend", "attack.epochs=0"], "attack.epochs=0"),
    ("selfdestruct.attack", ["model_path=defend", "pretrain.batch_size=0"], "pretrain.batch_size=0"),
    ("selfdestruct.defend", ["align.lr=0"], "align.lr=0"),
    ("selfdestruct.defend", ["+eval.max_new_token=8"], "+eval.max_new_token: no setting of this command reads"),
    ("selfdestruct.defend", ["+model.hidden_sise=64"], "model.hidden_sise: unknown option"),
    ("selfdestruct.defend", ["trainer.branch_threads=2", "trainer.precision=bf16-mixed"], "trainer.branch_threads=2"),
    ("selfdestruct.evaluate", ["model_path=/nowhere/model"], "model_path=/nowhere/model: no such directory"),
    ("selfdestruct.evaluate", ["model_path=/nowhere/model", "eval.device=tpu"], "eval.device=tpu"),
    ("selfdestruct.evaluate", ["model_path=/nowhere/model", "+defense=ctrap"],
     "+defense=ctrap: the evaluate command reads no defense config, so it would change nothing"),
])
def test_our_own_checks_answer_before_torch_is_imported(tmp_path, module, args, needle):
    """Values out of range, a missing model directory, too few examples: refused by the torch-free checks
    (``selfdestruct.cli_config``) before the ~10 s import of torch. A ``torch`` that cannot be imported is put
    first on the path: the run must still end with our one-line error, not an ImportError."""
    fake = tmp_path / "no_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch imported before the config checks')\n")
    path = os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": path}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", module, *args, f"hydra.run.dir={run_dir}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert "torch imported before" not in proc.stderr, proc.stderr
    _assert_failed_cleanly(proc, run_dir, needle)
    assert proc.returncode == 2 and len(_error_lines(proc)) == 1, proc.stderr


def test_a_failed_job_closes_the_wandb_run_it_started_and_imports_nothing_when_none(tmp_path, monkeypatch, capsys):
    """``run_job`` finishes the W&B run of a job on a failure path with the exit code of the failure; a job that
    never imported wandb (a config check that failed first) has nothing to close and imports nothing."""
    import types

    from selfdestruct.errors import UserError
    from selfdestruct.utils.job import run_job

    def fails():
        raise UserError("attack.lr is not set")

    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda exit_code: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(SystemExit) as exit_info:
        run_job(fails, tmp_path / "a")
    assert exit_info.value.code == 2 and finished == [2]

    monkeypatch.delitem(sys.modules, "wandb")
    with pytest.raises(SystemExit):
        run_job(fails, tmp_path / "b")
    assert "wandb" not in sys.modules and finished == [2]
    assert capsys.readouterr().err.count("error: attack.lr is not set") == 2
