"""A Hydra callback that reports a sweep's outcome and exits non-zero when any job failed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from selfdestruct.utils.run_metrics import FAILURE_FILE, METRICS_FILE

log = logging.getLogger("selfdestruct.sweep")


def sweep_status(sweep_dir: Path) -> dict[str, list[Path]]:
    """Job directories of a sweep sorted into complete, failed and incomplete (killed, or still running)."""
    status: dict[str, list[Path]] = {"complete": [], "failed": [], "incomplete": []}
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        job = hydra_dir.parent
        if job == sweep_dir:
            continue
        if (job / METRICS_FILE).exists() and not (job / FAILURE_FILE).exists():
            status["complete"].append(job)
        elif (job / FAILURE_FILE).exists():
            status["failed"].append(job)
        else:
            status["incomplete"].append(job)
    return status


class SweepReport(Callback):
    """After a multirun: one line per failed job, a count, and exit status 1 if anything failed.

    With ``exit_on_failure=false`` (sweep=attack_search, where a failed trial is one of the search's outcomes and
    the study records it) the failures are listed and the exit status stays 0.
    """

    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import json

        sweep_dir = Path(config.hydra.sweep.dir)
        status = sweep_status(sweep_dir)
        for job in status["failed"]:
            error = json.loads((job / FAILURE_FILE).read_text()).get("error", "?")
            log.error("FAILED %s: %s", job.relative_to(sweep_dir), error)
        for job in status["incomplete"]:
            log.error("INCOMPLETE %s (no metrics.json)", job.relative_to(sweep_dir))
        bad = len(status["failed"]) + len(status["incomplete"])
        log.info("sweep %s: %d complete, %d failed", sweep_dir, len(status["complete"]), bad)
        if bad and self.exit_on_failure:
            raise SystemExit(1)
