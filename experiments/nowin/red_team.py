"""The defender's red team (selfdestruct.eval.red_team) on saved defended models, one JSON line per model.

    python experiments/nowin/red_team.py DEFEND_RUN_OR_MODEL_DIR ... [--out FILE] [--grid-of DIR ...]

Each model is attacked over the red team's grid (the attack_grid's learning rates and step counts, AdamW, batch 16)
on the defense's own harmful pool and judged on the defender's validation sets (pool prompts it does not train on,
the alignment data's benign tasks); never the attacker's data or the held-out evaluation sets. The data order is
the model's defense seed. With a defend run directory, the line also carries the no-win count of the attack grid
beside it (``DIR/../grid``: the layout of experiments/nowin/candidate.sh), so the two can be compared
(experiments/nowin/README.md, "A red team the defender can run").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path



def grid_no_win(grid_dir: Path) -> tuple[int, int] | None:
    """(defender wins, cells) of an attack-grid sweep directory, judged as the report judges them."""
    from selfdestruct.report.verdict import DEFENDER_WINS, no_win_verdict

    cells = []
    for path in sorted(grid_dir.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        pre, post = m.get("pre") or {}, m.get("post") or {}
        aligned = (m.get("aligned") or {}).get("harmful_score", pre.get("harmful_score"))
        cells.append(no_win_verdict(post.get("harmful_score"), aligned, post.get("utility"), pre.get("utility")))
    return (sum(v in DEFENDER_WINS for v in cells), len(cells)) if cells else None


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from saved_models import for_each_model

    from selfdestruct import cli_common as cc
    from selfdestruct.eval.red_team import TrapCheckConfig, red_team, red_team_data
    from selfdestruct.pipeline.streams import benign_tasks

    check = TrapCheckConfig()

    def measure(model, tokenizer, cfg, bundle, fmt, seed, path) -> dict:
        data = red_team_data(bundle.defense_harmful, benign_tasks(bundle.align), check)
        result = red_team(model, tokenizer, fmt, cc.evaluator(cfg, tokenizer, bundle), data, check, seed)
        grid = grid_no_win(path.parent / "grid") if (path / "model").is_dir() else None
        return {"grid_no_win": grid, **result}

    return for_each_model(__doc__, argv, measure)


if __name__ == "__main__":
    sys.exit(main())
