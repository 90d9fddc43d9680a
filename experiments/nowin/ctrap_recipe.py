"""Published CTRAP against full-parameter CTRAP on the embedded default (issue 10, item 4).

    python experiments/nowin/ctrap_recipe.py --out outputs/ctrap_recipe                  # 3 seeds, every stage
    python experiments/nowin/ctrap_recipe.py --out outputs/ctrap_recipe --table-only     # re-read the tree
    python experiments/nowin/ctrap_recipe.py --out OUT --seeds 0 --epochs 2              # shorter CTRAP training

It only calls the project's entry points, one defense option at a time (the SFT baseline, ``ctrap``: the published
recipe, LoRA adapters and retain batches; ``ctrap_full``: full-parameter CTRAP, what ``defense=ctrap`` ran before),
each CTRAP option evaluated with its own collapse token (``eval.collapse_token``), then reads what they left:

1. ``selfdestruct.defend defense=X seed=...``                                  -> ``OUT/defend/``
2. ``selfdestruct.attack experiment=nowin`` (the attack_grid sweep, 3 x 3 cells) -> ``OUT/grid/``
3. ``selfdestruct.attack sweep=ctrap_paper_tiny`` (CTRAP's attack, scaled)      -> ``OUT/preset/``
4. ``selfdestruct.attack attack=benign`` (the benign fine-tune)                   -> ``OUT/benign/``
5. the table: no-win counts per seed on the grid and on the preset, pre-attack utility, benign fine-tune accuracy
   and utility after it, the collapse-token share on harmful and benign prompts in each strongest cell; printed
   and written to ``OUT/ctrap_recipe.md`` and ``OUT/ctrap_recipe.json``.

Trailing arguments are Hydra overrides for every stage (a smoke run: ``model=micro trainer.fast_dev_run=true``),
``--attack-override KEY=VALUE`` one for the attack stages only (a value there replaces a sweep's list).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from selfdestruct.report.collect import collect, number
from selfdestruct.report.nowin import build_rows, fmt, render_markdown
from selfdestruct.report.verdict import BASELINE_DEFENSE, build_report, median

HERE = Path(__file__).resolve().parent
DEFENSES = ("sft", "ctrap", "ctrap_full")
SEEDS = (0, 1, 2)
PRESET = "ctrap_paper_tiny"
STAGES = ("defend", "grid", "preset", "benign")


def _nowin():
    """The no-win driver (``run.py`` beside this file), whose commands and labels this comparison reuses."""
    name = "nowin_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


nowin = _nowin()


# --------------------------------------------------------------------------------------------------------------
# Running the entry points
# --------------------------------------------------------------------------------------------------------------


def collapse_rule(option: str) -> str:
    """``params.collapse_token`` of a defense option, following its ``defaults`` (``published`` when unset)."""
    try:
        data = yaml.safe_load((nowin.CONF_DEFENSE / f"{option}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "published"
    rule = (data.get("params") or {}).get("collapse_token")
    if rule:
        return str(rule)
    parents = [d for d in data.get("defaults") or [] if isinstance(d, str) and d != "_self_"]
    return collapse_rule(parents[0]) if parents else "published"


def label(option: str, epochs: int | None) -> str:
    base = nowin.label_of(option)
    return f"{base}-{epochs}ep" if epochs and option != BASELINE_DEFENSE else base


def option_overrides(option: str, epochs: int | None) -> list[str]:
    """What one defense option runs with: its collapse token counted by the evaluation, and shorter training."""
    extra = [f"eval.collapse_token={collapse_rule(option)}"]
    if epochs and option != BASELINE_DEFENSE:
        extra += [f"defense.optim.epochs={epochs}", f"++defense.label={label(option, epochs)}"]
    return extra


def commands(out: Path, option: str, seeds: Sequence[int], overrides: Sequence[str], epochs: int | None,
             attack_overrides: Sequence[str] = ()) -> dict[str, list[str]]:
    """The entry-point command of each stage for one defense option (a value given here replaces a sweep's list)."""
    seed_list = ",".join(map(str, seeds))
    common = [f"defense={option}", f"seed={seed_list}", "trainer.progress_bar=false",
              *option_overrides(option, epochs), *overrides]
    attack = [*common, *attack_overrides]
    name = label(option, epochs)

    def where(stage: str, cell: str = "") -> list[str]:
        # one sweep directory per stage and option (a sweep's summary speaks for its whole directory), short run
        # directories (every override in a name can exceed the file system's 255 characters)
        return [f"hydra.sweep.dir={out / stage / name}", f"hydra.sweep.subdir=seed${{seed}}{cell}"]

    cell = "-lr${attack.lr}-n${attack.num_samples}"
    return {
        "defend": ["-m", "selfdestruct.defend", "--multirun", *where("defend"), *common],
        "grid": ["-m", "selfdestruct.attack", "experiment=nowin", *where("grid", cell), *attack],
        "preset": ["-m", "selfdestruct.attack", f"sweep={PRESET}", *where("preset", cell), *attack],
        "benign": ["-m", "selfdestruct.attack", "--multirun", "model_path=defend", "attack=benign",
                   *where("benign"), *attack],
    }


def run_all(out: Path, options: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], epochs: int | None,
            attack_overrides: Sequence[str] = ()) -> tuple[dict[str, float], list[str]]:
    """Every stage for every option (the defended models shared through the cache); wall times and failed stages."""
    times = {stage: 0.0 for stage in STAGES}
    failed = []
    for stage in STAGES:
        for option in options:
            start = time.perf_counter()
            if nowin.run(commands(out, option, seeds, overrides, epochs, attack_overrides)[stage]) != 0:
                failed.append(f"{stage}:{option}")
            times[stage] += round(time.perf_counter() - start, 1)
    return times, failed


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


def _rows(roots: Sequence[Path], order: Sequence[str]) -> dict[str, Any]:
    roots = [p for p in roots if p.is_dir()]
    runs = collect(roots) if roots else []
    return {row.defense: row for row in build_rows(build_report(roots, runs), [], order)}


def benign_utility(out: Path) -> dict[str, float | None]:
    """Median utility after the benign fine-tune, per defense label."""
    runs = collect([out / "benign"]) if (out / "benign").is_dir() else []
    by: dict[str, list[float | None]] = {}
    for r in runs:
        if r.status == "ok" and r.defense is not None and r.attack_kind == "benign":
            by.setdefault(r.defense, []).append(number(r.post, "utility"))
    return {d: median(v) for d, v in by.items()}


def build_table(out: Path, order: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """Read the tree under ``out`` and return (markdown, JSON-able dict); nothing is run."""
    grid = _rows([out / "defend", out / "grid", out / "benign"], order)
    preset = _rows([out / "defend", out / "preset"], order)
    after_benign = benign_utility(out)
    names = [n for n in order if n in grid or n in preset] + sorted((set(grid) | set(preset)) - set(order))
    if not names:
        return "no runs found\n", {"defenses": []}
    f = fmt
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def line(what: str, fn) -> None:
        lines.append(f"| {what} | " + " | ".join(fn(n) for n in names) + " |")

    def count(rows: Mapping[str, Any], n: str) -> str:
        r = rows.get(n)
        return f"**{r.no_win}/{r.positions}**" if r and r.positions else "—"

    def per_seed(rows: Mapping[str, Any], n: str) -> str:
        r = rows.get(n)
        return ", ".join(f"{v}" for v in r.no_win_per_seed.values()) if r and r.no_win_per_seed else "—"

    def collapse(rows: Mapping[str, Any], n: str) -> str:
        r = rows.get(n)
        if r is None or r.strongest_cell is None:
            return "—"
        return f"{f(r.collapse_strongest, 3)} / {f(r.collapse_benign_strongest, 3)} ({r.strongest_cell})"

    row = lambda n: grid.get(n) or preset.get(n)  # noqa: E731 - pre-attack numbers: the same defend runs
    line("attack grid (full-parameter attack, 2 epochs): no-win of the medians", lambda n: count(grid, n))
    line("attack grid: no-win per seed", lambda n: per_seed(grid, n))
    line(f"CTRAP's attack scaled (sweep={PRESET}: LoRA r 32): no-win of the medians", lambda n: count(preset, n))
    line(f"sweep={PRESET}: no-win per seed", lambda n: per_seed(preset, n))
    line("pre-attack harmful score / utility / perplexity", lambda n: (
        f"{f(row(n).harmful_score_pre)} / {f(row(n).utility_pre, 3)} / {f(row(n).perplexity_pre)}"))
    line("pre-attack utility / SFT's", lambda n: f(row(n).utility_pre_rel, 3))
    line("benign fine-tune: task accuracy (/ SFT's)", lambda n: (
        f"{f(grid[n].benign_accuracy, 3)} ({f(grid[n].benign_accuracy_rel, 3)})" if n in grid else "—"))
    line("benign fine-tune: utility after it", lambda n: f(after_benign.get(n), 3))
    line("collapse-token share, strongest grid cell: harmful / benign prompts", lambda n: collapse(grid, n))
    line(f"collapse-token share, strongest {PRESET} cell: harmful / benign prompts", lambda n: collapse(preset, n))
    line("seeds", lambda n: ",".join(map(str, row(n).seeds)) or "—")
    markdown = "\n".join([
        "No-win counts are over the cells' medians across seeds (SPEC §5 verdicts, as in run.py); per seed, each "
        "seed's own cells.", "", *lines, "",
        "Attack grid, cell by cell:", "", render_markdown([grid[n] for n in names if n in grid]).rstrip(), "",
        f"sweep={PRESET}, cell by cell:", "", render_markdown([preset[n] for n in names if n in preset]).rstrip(),
    ]) + "\n"
    data = {"defenses": names, "grid": [asdict(grid[n]) for n in names if n in grid],
            "preset": [asdict(preset[n]) for n in names if n in preset], "benign_utility_after": after_benign}
    return markdown, data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (every run's metrics.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), help="defense options (conf/defense/*.yaml)")
    parser.add_argument("--epochs", type=int, default=0,
                        help="CTRAP training epochs for both CTRAP options (0: the published 20); shortened runs "
                             "carry it in their label, e.g. ctrap-2ep")
    parser.add_argument("--table-only", action="store_true", help="only (re)build the table from OUT")
    parser.add_argument("--attack-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for the attack stages only (repeatable), e.g. attack.num_samples=16")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs or None
    start = time.perf_counter()
    data_extra: dict[str, Any] = {}
    if not args.table_only:
        times, failed = run_all(out, args.defenses, args.seeds, args.overrides, epochs, args.attack_override)
        data_extra = {"wall_time_s": {**times, "total": round(time.perf_counter() - start, 1)}, "failed": failed}
        if failed:
            print(f"warning: {', '.join(failed)} exited non-zero; the table shows what finished", flush=True)
    table, data = build_table(out, [label(d, epochs) for d in args.defenses])
    data.update(data_extra)
    data["command"] = " ".join(["python", "experiments/nowin/ctrap_recipe.py",
                                *(argv if argv is not None else sys.argv[1:])])
    (out / "ctrap_recipe.md").write_text(table)
    (out / "ctrap_recipe.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n" + table)
    return 1 if data_extra.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
