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

import argparse
import json
import sys
from pathlib import Path

import torch


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
    from hydra import compose, initialize_config_dir

    from selfdestruct import cli_common as cc
    from selfdestruct.eval.red_team import TrapCheckConfig, red_team, red_team_data
    from selfdestruct.models.io import load_model_dir, read_provenance
    from selfdestruct.pipeline.streams import benign_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=cc.CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="defend", overrides=["trainer.progress_bar=false"])
    bundle, fmt = cc.data_bundle(cfg), cc.prompt_format(cfg)
    check = TrapCheckConfig()
    data = red_team_data(bundle.defense_harmful, benign_tasks(bundle.align), check)
    for path in args.paths:
        model_path = path / "model" if (path / "model").is_dir() else path
        model, tokenizer = load_model_dir(model_path)
        provenance = read_provenance(model_path)
        seed = int(provenance.get("defense_seed", provenance.get("seed", 0)))
        result = red_team(model, tokenizer, fmt, cc.evaluator(cfg, tokenizer, bundle), data, check, seed)
        grid = grid_no_win(path.parent / "grid") if (path / "model").is_dir() else None
        line = json.dumps({"path": str(path), "defense": provenance.get("defense"), "seed": provenance.get("seed"),
                           "defense_seed": seed, "grid_no_win": grid, **result})
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
