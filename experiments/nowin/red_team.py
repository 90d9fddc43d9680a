"""The defender's red team (selfdestruct.eval.red_team) on saved defended models, one JSON line per model.

    python experiments/nowin/red_team.py DEFEND_RUN_OR_MODEL_DIR ... [--out FILE]

Each model is attacked over the red team's grid (the attack_grid's learning rates and step counts, AdamW, batch 16)
on the defense's own harmful pool and judged on the defender's validation sets (pool prompts it does not train on,
the alignment data's benign tasks); never the attacker's data or the held-out evaluation sets. The data order is
the model's defense seed. ``experiments/readme_results.py --red-team`` puts each line beside the no-win count of the
attack grid next to its defend run (``DIR/../grid``: the layout of experiments/nowin/candidate.sh)
(experiments/nowin/README.md, "A red team the defender can run").
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from saved_models import for_each_model

    from selfdestruct import cli_common as cc
    from selfdestruct.eval.red_team import TrapCheckConfig, red_team, red_team_data
    from selfdestruct.pipeline.streams import benign_tasks

    check = TrapCheckConfig()
    split: dict = {}  # the red team's data, drawn once from the bundle for every model

    def measure(model, tokenizer, cfg, bundle, fmt, seed, path) -> dict:
        if not split:
            split["data"] = red_team_data(bundle.defense_harmful, benign_tasks(bundle.align), check)
        return red_team(model, tokenizer, fmt, cc.evaluator(cfg, tokenizer, bundle), split["data"], check, seed)

    return for_each_model(__doc__, argv, measure)


if __name__ == "__main__":
    sys.exit(main())
