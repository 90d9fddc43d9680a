"""experiments/nowin/trajectory.py: the red team's longest attack measured step by step must be the red team's own
attack, so that its points at a cell's step count are that cell."""

from __future__ import annotations

import copy

import pytest
import torch
from _objectives_fixtures import micro_llama
from helpers import load_script
from test_trap_check import FMT, SMALL, _bundle, tokenizer  # noqa: F401 (tokenizer is a fixture)

from selfdestruct.eval.red_team import TrapCheckConfig, on_validation_sets, red_team, red_team_data
from selfdestruct.pipeline.streams import benign_tasks
from selfdestruct.report.verdict import no_win_verdict


class WeightsJudge:
    """An evaluator whose two numbers are functions of the exact weights (and of the sets it judges on), so equal
    numbers mean equal weights: a stand-in for generation, which a random micro model makes degenerate."""

    def __init__(self):
        self.sets, self.show_progress, self.tokenizer = None, True, None

    @torch.no_grad()
    def __call__(self, model, stage):
        total = sum(float(p.double().abs().sum()) for p in model.parameters()) * (1 + len(self.sets.harmful))
        return {"harmful_score": (total * 7) % 1.0, "utility": 0.5 + (total % 1.0) / 2}, None


def test_points_at_a_cells_step_count_are_that_red_team_cell_and_the_model_is_untouched(tokenizer):  # noqa: F811
    traj = load_script("experiments/nowin/trajectory.py")
    b = _bundle()
    cfg = TrapCheckConfig(**SMALL)  # cells: [4 samples x 1 epoch, 8 x 2] at lr 1e-3 and 1e-2
    data = red_team_data(b.defense_harmful, benign_tasks(b.align), cfg)
    model = micro_llama(vocab=len(tokenizer))
    before = [p.detach().clone() for p in model.parameters()]
    recorded = red_team(model, tokenizer, FMT, WeightsJudge(), data, cfg, seed=3)
    judge = on_validation_sets(WeightsJudge(), data)
    points = {lr: traj.trajectory(model, tokenizer, FMT, judge, data, cfg, 3, lr, [0, 1, 2, 4], samples=8, epochs=2)
              for lr in cfg.lrs}
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for lr, pts in points.items():
        assert [p["step"] for p in pts] == [0, 1, 2, 4]  # the 8 x 2 cell: ceil(8 / 4) x 2 = 4 steps
        start = pts[0]
        assert (start["harmful_score"], start["utility"]) == (recorded["pre"]["harmful_score"],
                                                               recorded["pre"]["utility"])
        cell = next(c for c in recorded["grid"] if c["lr"] == lr and c["samples"] == 8)
        assert (pts[-1]["harmful_score"], pts[-1]["utility"]) == (cell["harmful_score"], cell["utility"])
        for p in pts:  # each point judged as a cell is, against the model's own pre-attack numbers
            assert p["verdict"] == no_win_verdict(p["harmful_score"], start["harmful_score"], p["utility"],
                                                  start["utility"])
            assert p["ratio"] == pytest.approx(p["utility"] / start["utility"])
    for pts in points.values():  # every step moved the weights, so every point is another number
        assert len({p["utility"] for p in pts}) == len(pts)
    assert points[1e-3][-1]["utility"] != points[1e-2][-1]["utility"]  # the learning rate is the one asked for
    assert traj.matches(points, recorded["grid"], samples=8) is True
    wrong = copy.deepcopy(recorded["grid"])
    next(c for c in wrong if c["samples"] == 8)["utility"] += 0.01
    assert traj.matches(points, wrong, samples=8) is False
    assert traj.matches(points, recorded["grid"], samples=500) is None  # nothing to compare
