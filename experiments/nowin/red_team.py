"""The defender's red team (selfdestruct.eval.red_team) on saved defended models, one JSON line per model.

    python experiments/nowin/red_team.py DEFEND_RUN_OR_MODEL_DIR ... [--utility-tasks align|validation] [--out FILE]
    python experiments/nowin/red_team.py DEFEND_RUN ... --before-only --utility-tasks validation --out FILE

Each model is attacked over the red team's grid (the attack_grid's learning rates and step counts, AdamW, batch 16)
on the defense's own harmful pool and judged on the defender's validation sets (pool prompts it does not train on;
for the utility the alignment data's benign tasks, or with ``--utility-tasks validation`` the defender's validation
tasks, unseen in training where the family allows); never the attacker's data or the held-out evaluation sets. The
data order is the model's defense seed. ``--before-only`` attacks nothing: the numbers the cells would be judged
against (``pre``), e.g. of the defended and the aligned (SFT) models of a release, for
``readme_results.py --release-utility``. ``experiments/readme_results.py --red-team`` puts each line beside the
no-win count of the attack grid next to its defend run (``DIR/../grid``: the layout of
experiments/nowin/candidate.sh) (experiments/nowin/README.md, "A red team the defender can run").
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from saved_models import for_each_model

    from selfdestruct import cli_common as cc
    from selfdestruct.eval.red_team import UTILITY_TASKS, TrapCheckConfig, before_attack, red_team
    from selfdestruct.pipeline.stages import trap_check_data

    split: dict = {}  # the red team's data, drawn once from the bundle for every model

    def options(parser) -> None:
        parser.add_argument("--utility-tasks", choices=UTILITY_TASKS, default="align",
                            help="the benign tasks that judge the utility (defense.trap_check.utility_tasks)")
        parser.add_argument("--before-only", action="store_true",
                            help="no attacks: only the model's harmful score and utility on the red team's sets")

    def measure(model, tokenizer, cfg, bundle, fmt, seed, path, args) -> dict:
        check = TrapCheckConfig(utility_tasks=args.utility_tasks)
        if not split:
            split["data"] = trap_check_data(bundle, check)
        evaluator = cc.evaluator(cfg, tokenizer, bundle)
        if args.before_only:
            return {"utility_tasks": check.utility_tasks, "pre": before_attack(model, evaluator, split["data"])}
        result = red_team(model, tokenizer, fmt, evaluator, split["data"], check, seed)
        return {"utility_tasks": check.utility_tasks, **result}

    return for_each_model(__doc__, argv, measure, options)


if __name__ == "__main__":
    sys.exit(main())
