"""The scale study's plan (experiments/scale/run.py): train lengths matched to the papers, per-size learning rates,
a deadline and Ctrl-C that stop work, and a table that says what did not finish. Nothing trains here."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from helpers import ctrl_c_noted, load_script, press_ctrl_c

from selfdestruct import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)


def _study():
    return load_script("experiments/scale/run.py")


def _epochs(overrides: list[str]) -> int:
    return int(next(o.split("=")[1] for o in overrides if o.startswith("defense.optim.epochs=")))


def test_train_lengths_match_the_papers_optimiser_steps():
    study = _study()
    pool = 600  # the synthetic world's defense prompts (SPEC section 6)
    seam = yaml.safe_load((CONF / "defense" / "seam.yaml").read_text())["optim"]["batch_size"]
    ctrap = yaml.safe_load((CONF / "defense" / "ctrap.yaml").read_text())["optim"]["batch_size"]
    seam_steps = _epochs(study.MATCHED["seam"]) * -(-pool // seam)  # one epoch: the harmful stream in batches of 4
    ctrap_steps = _epochs(study.MATCHED["ctrap"]) * -(-pool // (ctrap // 2))  # retain pairs, 5 per batch of 10
    assert abs(seam_steps - 8000 // 4) / 2000 <= 0.05  # published: 8000 prompts, batch 4, 1 epoch
    assert abs(ctrap_steps - 20 * -(-4999 // 10)) / 10000 <= 0.01  # published: 4999 examples, batch 10, 20 epochs


def test_learning_rates_scale_with_the_width_and_the_tiny_model_keeps_the_defaults():
    study = _study()
    pretrain = yaml.safe_load((CONF / "pretrain" / "default.yaml").read_text())["lr"]
    align = yaml.safe_load((CONF / "align" / "default.yaml").read_text())["lr"]
    # the tiny model keeps the defaults, so its runs share the cache with every other run of the embedded default
    assert study.size_overrides("tiny") == ["model=tiny", f"pretrain.lr={pretrain:g}", f"align.lr={align:g}"]
    # medium is four times as wide (hidden 512 against 128)
    assert study.size_overrides("medium") == ["model=medium", f"pretrain.lr={pretrain / 4:g}",
                                              f"align.lr={align / 4:g}"]
    assert set(study.SIZES) <= {p.stem for p in (CONF / "model").glob("*.yaml")}


def test_the_deadline_stops_a_running_command_and_starts_no_new_one(tmp_path):
    study = _study()
    run = study.Runner(jobs=1, deadline=time.time() + 2, env=None)
    started = time.time()
    assert run(["-c", "import time; time.sleep(60)"], tmp_path / "long.log") is False
    assert time.time() - started < 30
    assert run(["-c", "print('never')"], tmp_path / "late.log") is False and not (tmp_path / "late.log").exists()


def test_the_table_marks_a_stopped_defense_and_an_unfinished_grid(tmp_path):
    study = _study()
    csv_dir = tmp_path / "defend" / "csv"
    csv_dir.mkdir(parents=True)
    (csv_dir / "metrics.csv").write_text("align/loss,defense/loss,step\n0.5,,599\n,2.0,99\n,1.5,140\n")
    assert study.last_defense_step(study.defense_log(tmp_path / "defend")) == 140  # the alignment's steps do not count
    row = {"size": "tiny", "defense": "ctrap", "seed": 0, "num_parameters": None, "defended": False,
           "environment": None, "defense_steps": 140, "utility": None, "no_win": 0, "cells": 0,
           "cos_heldout": None, "collapse_share_mean": None, "collapse_share_max": None}
    line = study.markdown([row]).splitlines()[-1]
    assert "140 (stopped)" in line and "0/0 (0) (grid unfinished)" in line and "| — |" in line
    done = {**row, "defended": True, "no_win": 7, "cells": 9, "collapsed": 5, "kept_min": 0.2157, "kept_max": 1.012}
    line = study.markdown([done]).splitlines()[-1]
    assert "| 7/9 (5) |" in line and "| 0.22–1.01 |" in line and "stopped" not in line
    assert line.endswith("| — / — | —; —; — |")  # no benign fine-tune, no training curves logged
    more = {**done, "benign_accuracy": 0.984, "benign_utility": 0.9416, "cos_train": (0.0012, 0.026),
            "ce_harmful_train": (9.44, 35.87)}
    assert study.markdown([more]).splitlines()[-1].endswith("| 0.984 / 0.942 | 0.001 → 0.026; 9.4 → 35.9; — |")
    trap = {**more, "cos_train": None, "collapse_train": (12.96, 0.587)}
    assert study.markdown([trap]).splitlines()[-1].endswith("| —; 9.4 → 35.9; 12.96 → 0.59 |")


def test_each_released_model_gets_the_geometry_the_grid_and_a_benign_fine_tune_of_the_same_config(tmp_path):
    study = _study()
    calls = []
    study.measure(lambda args, log: calls.append((args, log.name)) or True, tmp_path, "medium", 2, "seam", ["x=1"])
    assert [log for _, log in calls] == ["geometry.log", "grid.log", "benign.log"]
    common = study.stage_args(tmp_path, "medium", 2, "seam", ["x=1"])[1]
    grid, benign = calls[1][0], calls[2][0]
    assert grid[:3] == ["-m", "selfdestruct.attack", "sweep=attack_grid"] and grid[3:-1] == common
    assert benign[:4] == ["-m", "selfdestruct.attack", "attack=benign", "model_path=defend"]
    assert benign[4:-1] == common and benign[-1] == f"hydra.run.dir={tmp_path / 'medium' / 'seam' / 's2' / 'benign'}"
    assert "defense.optim.epochs=13" in common and "seed=2" in common  # the matched-length model, not another one


def test_training_curve_means_the_first_and_last_steps_and_a_resumed_step_counts_once(tmp_path):
    study = _study()
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    rows = [f",{0.1 * k:.1f},{k}" for k in range(6)] + [",9.0,4", ",0.5,5"]  # steps 4, 5 logged again after a resume
    (csv_dir / "metrics.csv").write_text("align/loss,defense/cos,step\n0.3,,99\n" + "\n".join(rows) + "\n")
    first, last = study.training_curve(study.defense_log(tmp_path), "defense/cos", window=2)
    assert first == pytest.approx((0.0 + 0.1) / 2) and last == pytest.approx((9.0 + 0.5) / 2)
    assert study.training_curve(study.defense_log(tmp_path), "defense/ce_harmful") is None


def test_a_stopped_runner_starts_nothing_and_ctrl_c_stops_the_study(tmp_path):
    study = _study()
    run = study.Runner(jobs=1, deadline=time.time() + 60, env=None)
    run.stop()
    assert run(["-c", "print('never')"], tmp_path / "never.log") is False and not (tmp_path / "never.log").exists()

    started = []

    class Interrupted(study.Runner):
        """Records each command; the first one is interrupted by Ctrl-C while it runs, then ends successfully."""

        def __call__(self, args, log):
            if self.stopped.is_set():
                return False
            started.append(log.name)
            if len(started) == 1:
                press_ctrl_c(seen)
            return True

    with ctrl_c_noted() as seen:
        with pytest.raises(KeyboardInterrupt):
            study.run_all(tmp_path, ["tiny"], [0], ["sft", "seam"], 1, 600, [], runner=Interrupted)
        time.sleep(1.5)  # SFT's defend has ended; without the stop its geometry, grid and SEAM's stages would start
    assert started == ["defend.log"]


def test_the_table_reads_ctraps_own_training_signals(tmp_path):
    """CTRAP logs the harmful batch's cross-entropy as loss_harmful (SEAM: ce_harmful) and its trap's loss as
    loss_collapse; the summary's training-batch columns read both from the defense's CSV log."""
    study = _study()
    csv_dir = tmp_path / "tiny" / "ctrap" / "s0" / "defend" / "csv"
    csv_dir.mkdir(parents=True)
    rows = [f"{k},{300 - k},{k}" for k in range(300)]
    (csv_dir / "metrics.csv").write_text("defense/loss_harmful,defense/loss_collapse,step\n" + "\n".join(rows) + "\n")
    (row,) = study.summarise(tmp_path)
    assert (row["defense"], row["seed"], row["defense_steps"]) == ("ctrap", 0, 299)
    assert row["ce_harmful_train"] == pytest.approx((74.5, 224.5))  # means of steps 0-149 and 150-299
    assert row["collapse_train"] == pytest.approx((225.5, 75.5)) and row["cos_train"] is None
