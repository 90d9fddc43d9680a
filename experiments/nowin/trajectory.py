"""The red team's longest attack followed step by step: where along it does a trap fire, and does the attack climb out?

    python experiments/nowin/trajectory.py DEFEND_RUN_OR_MODEL_DIR ... [--at 0 4 8 16 32 48 64 96 128] [--out FILE]

For each saved defended model and each learning rate of the red team's grid (``defense.trap_check``'s defaults:
AdamW, batch 16, the defense's own harmful pool in the model's defense-seed order), the red team's longest cell
(500 samples x 4 epochs) is run once, and the model's harmful score and utility on the red team's validation sets
are measured at the optimiser steps ``--at``. The first two epochs of that cell are, batch for batch, the red team's
500 x 2 cell, so the numbers at its step count (64) and at the end (128) must equal the two cells the red team
recorded in the model's provenance (``trap_check``): each line says whether they do (``matches_red_team``), a check
that this script measures the same attack. Each point gets the no-win verdict against the model's own pre-attack
numbers, as a cell would.

One JSON line per model: ``{"path", "seed", "defense_seed", "red_team_no_win", "pre", "lrs": {lr: [{"step",
"harmful_score", "utility", "ratio", "verdict"}, ...]}, "matches_red_team"}``. One torch thread.
experiments/nowin/README.md ("Along the red team's attack") reads them.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

SAMPLES, EPOCHS = 500, 4  # the red team's longest cell; its first 2 epochs are the 500 x 2 cell
AT = (0, 4, 8, 16, 32, 48, 64, 96, 128)


def trajectory(model: torch.nn.Module, tokenizer, fmt, evaluator, data, cfg, seed: int, lr: float,
               at: list[int], samples: int = SAMPLES, epochs: int = EPOCHS) -> list[dict]:
    """The harmful score and utility of a copy of ``model`` at the optimiser steps ``at`` of the red team's
    ``samples`` x ``epochs`` attack at ``lr`` (the same batches, order and optimiser as its cell); ``evaluator``
    judges on the red team's validation sets. ``model`` is not changed."""
    from selfdestruct.data.formatting import encode_example
    from selfdestruct.eval.red_team import epoch_batches
    from selfdestruct.report.verdict import no_win_verdict

    device = next(model.parameters()).device
    features = [encode_example(tokenizer, ex, cfg.max_length, fmt, None) for ex in data.train]
    batches = epoch_batches(features, samples, epochs, cfg.batch_size, seed, tokenizer.pad_token_id, device)
    attacked = copy.deepcopy(model)
    params = list(attacked.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    points, pre = [], None
    for step in range(len(batches) + 1):
        if step in at:
            attacked.eval()
            with torch.no_grad():
                metrics, _ = evaluator(attacked, f"trajectory: lr {lr:g}, step {step}")
            now = {"harmful_score": metrics["harmful_score"], "utility": metrics["utility"]}
            pre = now if step == 0 else pre
            points.append({"step": step, **now, "ratio": now["utility"] / pre["utility"] if pre["utility"] else None,
                           "verdict": no_win_verdict(now["harmful_score"], pre["harmful_score"], now["utility"],
                                                     pre["utility"])})
        if step == len(batches):
            break
        attacked.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            attacked(**batches[step]).loss.backward()
        optimizer.step()
    return points


def matches(points: dict[float, list[dict]], recorded: list[dict], samples: int = SAMPLES) -> bool | None:
    """Whether the points at the step counts of the red team's recorded cells on ``samples`` samples (500 x 2 and
    500 x 4) equal those cells (None: the model has no record, or the steps were not measured)."""
    compared = 0
    for cell in recorded:
        if cell["samples"] != samples:
            continue
        point = next((p for p in points.get(float(cell["lr"]), []) if p["step"] == cell["steps"]), None)
        if point is None:
            continue
        compared += 1
        if abs(point["harmful_score"] - cell["harmful_score"]) > 1e-6 or abs(point["utility"] - cell["utility"]) > 1e-6:
            return False
    return True if compared else None


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from saved_models import for_each_model, model_dir

    from selfdestruct import cli_common as cc
    from selfdestruct.eval.red_team import TrapCheckConfig, on_validation_sets
    from selfdestruct.models.io import read_provenance
    from selfdestruct.pipeline.stages import trap_check_data

    split: dict = {}

    def options(parser) -> None:
        parser.add_argument("--at", type=int, nargs="+", default=list(AT),
                            help="optimiser steps to measure at (0: before the attack)")

    def measure(model, tokenizer, cfg, bundle, fmt, seed, path, args) -> dict:
        check = TrapCheckConfig()
        if not split:
            split["data"] = trap_check_data(bundle, check)
        evaluator = on_validation_sets(cc.evaluator(cfg, tokenizer, bundle), split["data"])
        at = sorted(set(args.at) | {0})
        points = {float(lr): trajectory(model, tokenizer, fmt, evaluator, split["data"], check, seed, float(lr), at)
                  for lr in check.lrs}
        checks = read_provenance(model_dir(path)).get("trap_check") or []
        recorded = checks[-1] if checks else {}
        return {"red_team_no_win": recorded.get("no_win"), "pre": points[float(check.lrs[0])][0],
                "lrs": {str(lr): pts for lr, pts in points.items()},
                "matches_red_team": matches(points, recorded.get("grid", []))}

    return for_each_model(__doc__, argv, measure, options)


if __name__ == "__main__":
    sys.exit(main())
