"""``python -m selfdestruct.report SWEEP_DIR [...] --out DIR``: tables, figures and one offline dashboard.

The report only reads what runs leave on disk (``metrics.json``, Hydra's ``.hydra/``, ``failure.json``
and the CSV training logs), so it works on sweeps copied from a cluster and on sweeps still running.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from selfdestruct.errors import UserError
from selfdestruct.utils.io import write_text_atomic
from selfdestruct.report.collect import Run, collect, load_run
from selfdestruct.report.dashboard import render_dashboard
from selfdestruct.report.figures import write_figures
from selfdestruct.report.tables import cells_csv, no_win_text, summary_markdown
from selfdestruct.report.verdict import HARMFUL_KINDS, Report, build_report, no_win_verdict

__all__ = ["Report", "Run", "build_report", "collect", "load_run", "main", "no_win_verdict", "write_report"]
log = logging.getLogger(__name__)


def write_report(roots: Sequence[str | os.PathLike], out: str | os.PathLike) -> Report:
    """Collect the runs under ``roots`` and write every output into ``out``; raises UserError when none is found."""
    roots = [Path(root) for root in roots]
    missing = [str(root) for root in roots if not root.is_dir()]
    if missing:  # a mistyped path must not quietly give a partial report
        raise UserError("no such sweep directory: " + ", ".join(missing))
    runs = collect(roots)
    if not runs:
        raise UserError("no run (metrics.json or .hydra/config.yaml) found under " + ", ".join(map(str, roots)))
    report = build_report(roots, runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "cells.csv", cells_csv(report.judged))
    write_text_atomic(out / "summary.md", summary_markdown(report))
    figures = write_figures(report, out)
    curves = figures["curves.png"].read_bytes() if "curves.png" in figures else None
    write_text_atomic(out / "dashboard.html", render_dashboard(report, curves))
    log.info("wrote %s", ", ".join(["cells.csv", "summary.md", "dashboard.html", *figures]))
    return report


def summary_line(report: Report) -> str:
    """One line: run counts and each defense's no-win count per harmful attack kind."""
    counts = report.attack_counts()
    line = (f"{sum(counts.values())} attack runs ({counts['failed']} failed, {counts['invalid']} invalid), "
            f"{len(report.defense_runs())} defense runs")
    for kind in (k for k in report.attack_kinds() if k in HARMFUL_KINDS):
        counts = ", ".join(f"{d} {no_win_text(report, d, kind)}" for d in report.defenses(kind))
        line += f"; no-win ({kind}): {counts}"
    return line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfdestruct.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="directories searched recursively for runs")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any run failed or is invalid")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every run found")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line error when no run is found)."""
    args = _parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = write_report(args.sweep_dirs, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in report.warnings().values():
        print(f"warning: {warning}", file=sys.stderr)
    print(summary_line(report))
    print(f"dashboard: {(Path(args.out) / 'dashboard.html').resolve()}")
    return 1 if args.strict and report.problems() else 0
