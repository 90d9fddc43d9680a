"""The full demo's plan (experiments/quickstart.py): one chain per defense, chains run concurrently, a defense's
grid and benign fine-tune run side by side once it is defended, a failed command stops only what needs its output.
Commands are recorded instead of run, so nothing trains here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ctrl_c_noted, load_script, press_ctrl_c

from selfdestruct.utils import kernel_path

REPO = Path(__file__).resolve().parents[1]


def _quickstart():
    return load_script("experiments/quickstart.py")


def _entry(args: list[str]) -> str:
    return args[1] + (" grid" if "sweep=attack_grid" in args else " benign" if "attack=benign" in args else "")


def test_a_chain_defends_then_attacks_the_grid_then_fine_tunes_benignly_under_its_own_directories(tmp_path):
    qs = _quickstart()
    commands = qs.chain(tmp_path, "ctrap_tuned", ["seed=3", "trainer.progress_bar=false"], jobs=2)
    assert [_entry(c) for c in commands] == ["selfdestruct.defend", "selfdestruct.attack grid",
                                             "selfdestruct.attack benign"]
    dirs = [next(a for a in c if a.startswith("hydra.")) for c in commands]
    assert dirs == [f"hydra.run.dir={tmp_path / 'defend' / 'ctrap_tuned'}",
                    f"hydra.sweep.dir={tmp_path / 'grid' / 'ctrap_tuned'}",
                    f"hydra.run.dir={tmp_path / 'benign' / 'ctrap_tuned'}"]
    for c in commands:
        assert "defense=ctrap_tuned" in c and c[-2:] == ["seed=3", "trainer.progress_bar=false"]
    assert "model_path=defend" in commands[2]  # the benign fine-tune starts from the defended model
    # the defense's independent branches on the jobs' threads (the same step bit for bit); the attacks have none
    assert "trainer.branch_threads=2" in commands[0] and not any("branch_threads" in a for c in commands[1:] for a in c)
    assert "trainer.branch_threads=1" in qs.chain(tmp_path, "sft", [], jobs=1)[0]


def test_chains_run_concurrently_and_a_failed_one_stops_only_itself(tmp_path, monkeypatch):
    qs = _quickstart()
    calls: list[tuple[str, str]] = []
    lock, both_started = threading.Lock(), threading.Barrier(2, timeout=10)

    def fake_run(args, check=True, env=None, log=None):
        if args[1] == "selfdestruct.report":
            (tmp_path / "report").mkdir()
            (tmp_path / "report" / "summary.md").write_text("summary")
            return 0
        defense = next(a for a in args if a.startswith("defense=")).split("=")[1]
        if not calls:  # first, alone: the shared stages on 2 threads, outside the compared directories
            assert env is not None and env["OMP_NUM_THREADS"] == "2"
            assert args[1:3] == ["selfdestruct.defend", "defense=sft"]
            assert f"hydra.run.dir={tmp_path / 'shared_stages'}" in args
            assert log == tmp_path / "logs" / "shared_stages.log"
            calls.append(("shared", "stages"))
            return 0
        assert env is not None and env["OMP_NUM_THREADS"] == "1"
        kind = "defend" if args[1] == "selfdestruct.defend" else _entry(args).split()[1]
        assert log == tmp_path / "logs" / f"{kind}_{defense}.log"  # its output: a file of its own
        if args[1] == "selfdestruct.defend" and defense in ("ctrap_tuned", "seam_tuned"):
            both_started.wait()  # the first two chains' defenses run at the same time, or this times out
        with lock:
            calls.append((defense, _entry(args)))
        return 1 if (defense, args[1]) == ("seam_tuned", "selfdestruct.defend") else 0

    monkeypatch.setattr(qs, "run", fake_run)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    status = qs.full(tmp_path, ["ctrap_tuned", "seam_tuned", "sft"], ["seed=0"], jobs=2)
    assert status == 1
    assert calls[0] == ("shared", "stages")
    per_defense = {d: [e for dd, e in calls if dd == d] for d in ("ctrap_tuned", "seam_tuned", "sft")}
    full_chain = ["selfdestruct.defend", "selfdestruct.attack grid", "selfdestruct.attack benign"]
    assert per_defense == {"ctrap_tuned": full_chain, "seam_tuned": ["selfdestruct.defend"], "sft": full_chain}


def test_a_defended_models_grid_and_benign_fine_tune_share_the_workers_and_the_first_chain_goes_first():
    qs = _quickstart()
    chains = [[["a", "defend"], ["a", "grid"], ["a", "benign"]], [["b", "defend"], ["b", "grid"], ["b", "benign"]]]
    started: list[str] = []
    lock, b_done = threading.Lock(), threading.Event()
    together = threading.Barrier(2, timeout=10)

    def runner(args):
        with lock:
            started.append(" ".join(args))
        if args == ["a", "defend"]:
            assert b_done.wait(timeout=10)  # the slow defense: chain b runs whole on the other worker meanwhile
        if args[0] == "a" and args[1] != "defend":
            together.wait()  # a's grid and benign fine-tune run at the same time, or this times out
        if args == ["b", "benign"]:
            b_done.set()
        return 1 if args == ["a", "grid"] else 0

    assert qs.run_plan(chains, 2, runner) == [1, 0]  # a's grid failed; its benign fine-tune ran all the same
    assert started[:2] == ["a defend", "b defend"] and started[2:4] == ["b grid", "b benign"]
    assert sorted(started[4:]) == ["a benign", "a grid"]


TWO_CHAINS = [[["a", "defend"], ["a", "grid"]], [["b", "defend"], ["b", "grid"]]]


def _recorder(started: list[str], first_defense=lambda: 0):
    """A runner that records each command; "a defend" runs ``first_defense`` (its status), the others succeed."""
    def runner(args):
        started.append(" ".join(args))
        return first_defense() if args == ["a", "defend"] else 0
    return runner


def test_one_job_runs_the_chains_one_after_another_in_order():
    qs, started = _quickstart(), []
    assert qs.run_plan(TWO_CHAINS, 1, _recorder(started)) == [0, 0]
    assert started == ["a defend", "a grid", "b defend", "b grid"]


def test_each_command_is_timed_for_the_demos_timeline():
    qs = _quickstart()
    assert qs.run(["-c", "import time; time.sleep(0.5)"]) == 0
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    assert qs.run(["-c", busy]) == 0
    assert qs.run(["-c", "raise SystemExit(3)"], check=False) == 3
    with pytest.raises(subprocess.CalledProcessError):
        qs.run(["-c", "raise SystemExit(4)"])
    sleeping, spinning, failed, raised = qs.TIMELINE
    assert sleeping["command"].endswith("time.sleep(0.5)") and sleeping["seconds"] >= 0.5 and sleeping["status"] == 0
    assert failed["status"] == 3 and raised["status"] == 4
    assert failed["start"] >= spinning["start"] + spinning["seconds"] - 0.05
    if hasattr(os, "wait4"):  # CPU time: sleeping uses little of it, spinning at least its 0.5 s
        assert sleeping["cpu_s"] < sleeping["seconds"] - 0.3 and spinning["cpu_s"] >= 0.5


def test_the_host_probe_names_the_processor_and_its_matrix_product_rate_and_a_failed_one_is_none(monkeypatch):
    from selfdestruct.utils.provenance import cpu_id, cpu_model

    qs = _quickstart()
    machine = qs.host()  # in a child process, so that the launcher never imports torch
    assert machine["cpu"] == cpu_model() and machine["cpu_id"] == cpu_id() and machine["gemm_gflops"] > 0
    monkeypatch.setattr(qs, "HOST_PROBE", "raise SystemExit(3)")
    assert qs.host() is None


def test_the_demo_records_and_prints_the_host_before_any_command(tmp_path, monkeypatch, capsys):
    qs, events = _quickstart(), []
    machine = {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD cpu family 23 model 1 stepping 2", "gemm_gflops": 33.1}
    monkeypatch.setattr(qs, "host", lambda: events.append("host") or machine)
    monkeypatch.setattr(qs, "full", lambda *a, **k: events.append("full") or 0)
    monkeypatch.setattr(qs, "compare_with_records", lambda out: events.append(("records", out)) or 0)
    for name in (kernel_path.VARIABLE, *kernel_path.MODE_VARIABLES):
        monkeypatch.delenv(name, raising=False)  # the machine's default kernel path, as the records ran
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--out", str(tmp_path)])
    assert qs.main() == 0
    assert events == ["host", "full", ("records", tmp_path.resolve())]  # the default demo: against the records
    assert json.loads((tmp_path / "quickstart.json").read_text())["host"] == machine
    assert ("host: AMD EPYC (AuthenticAMD cpu family 23 model 1 stepping 2), "
            f"{os.cpu_count()} CPUs, float32 matrix products at 33.1 GFLOP/s on one thread") in capsys.readouterr().out
    not_recorded = [(["--seed", "1"], {}), (["--defenses", "sft"], {}), (["trainer.max_steps=3"], {}),
                    ([], {"SELFDESTRUCT_REPRODUCIBLE": "1"}), ([], {"MKL_CBWR": "AUTO"})]
    for args, env in not_recorded:  # not what the records ran: no comparison, and a line that says why
        events.clear()
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            m.setattr(sys, "argv", ["quickstart.py", "--out", str(tmp_path), *args])
            assert qs.main() == 0 and events == ["host", "full"]
        assert "compared only for the default demo" in capsys.readouterr().out
    monkeypatch.setenv("SELFDESTRUCT_REPRODUCIBLE", "0")  # off: the default path, compared
    assert qs.default_kernel_path()


def test_a_logged_command_writes_its_output_to_its_log_and_says_in_one_line_how_it_ended(tmp_path, capsys):
    qs = _quickstart()
    ok, bad = tmp_path / "logs" / "grid_sft.log", tmp_path / "logs" / "defend_sft.log"
    assert qs.run(["-c", "print('st' + 'ep 1'); import sys; print('warn', file=sys.stderr)"], log=ok) == 0
    lines = "\n".join(f"print('line {i}')" for i in range(qs.LOG_TAIL + 5))
    assert qs.run(["-c", lines + "\nraise SystemExit(5)"], check=False, log=bad) == 5
    printed = capsys.readouterr().out
    assert ok.read_text().split() == ["step", "1", "warn"] and "step 1" not in printed
    assert re.search(r"\n  done in \d+ s: grid_sft\n", printed)
    assert re.search(r"\n  FAILED \(exit 5\) in \d+ s: defend_sft\n", printed)
    shown = [line for line in printed.splitlines() if line.startswith("  | line ")]  # the log's last lines only
    assert shown == [f"  | line {i}" for i in range(5, qs.LOG_TAIL + 5)]


def test_full_runs_log_under_out_logs_unless_verbose(tmp_path, monkeypatch):
    qs, logs = _quickstart(), []

    def fake_run(args, check=True, env=None, log=None):
        if args[1] == "selfdestruct.report":
            (tmp_path / "report").mkdir(exist_ok=True)
            (tmp_path / "report" / "summary.md").write_text("summary")
        logs.append(log)
        return 0

    monkeypatch.setattr(qs, "run", fake_run)
    assert qs.full(tmp_path, ["sft"], [], jobs=1) == 0
    assert logs == [tmp_path / "logs" / f"{k}_sft.log" for k in ("defend", "grid", "benign")] + [None]
    logs.clear()
    assert qs.full(tmp_path, ["sft"], [], jobs=1, verbose=True) == 0
    assert logs == [None] * 4


def test_ctrl_c_starts_no_new_command():
    qs, started = _quickstart(), []

    def interrupted_then_succeeds():
        press_ctrl_c(seen)  # the main thread, waiting on the workers, takes it while this command runs
        return 0

    with ctrl_c_noted() as seen:
        with pytest.raises(KeyboardInterrupt):
            qs.run_plan(TWO_CHAINS, 1, _recorder(started, interrupted_then_succeeds))
        time.sleep(1.5)  # the worker finishes "a defend" and would take the next ready command now
    assert started == ["a defend"]


def test_a_command_that_raises_counts_as_failed_and_the_worker_goes_on():
    qs, started = _quickstart(), []

    def raises():
        raise OSError("python not found")

    assert qs.run_plan(TWO_CHAINS, 1, _recorder(started, raises)) == [1, 0]
    assert started == ["a defend", "b defend", "b grid"]
