"""Loggers of a job: a CSV log always, Weights & Biases offline by default and online with a key."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from selfdestruct.utils.job import finish_wandb

log = logging.getLogger(__name__)
WANDB_MODES = ("auto", "online", "offline", "disabled")


def resolve_wandb_mode(mode: str) -> str:
    """``WANDB_MODE`` in the environment wins; ``auto`` is online only when an API key is configured."""
    if mode not in WANDB_MODES:
        from selfdestruct.errors import UserError

        raise UserError(f"logger.wandb.mode={mode!r}: expected one of {WANDB_MODES}")
    env = os.environ.get("WANDB_MODE")
    if env:
        return "disabled" if env in ("disabled", "dryrun_disabled") else env
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def build_loggers(
    run_dir: Path,
    *,
    wandb_mode: str = "auto",
    project: str = "selfdestruct",
    entity: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    csv_subdir: str = "csv",
) -> list[Logger]:
    """A CSV logger under ``run_dir/csv_subdir`` and, unless disabled, a W&B logger writing to ``run_dir``.

    W&B is started here, not at the first logged step: if it cannot start (no network, a bad key, a full disk
    under ``run_dir/wandb``) the job goes on with the CSV log alone after one warning.
    """
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name=csv_subdir, version="")]
    mode = resolve_wandb_mode(wandb_mode)
    if mode != "disabled":
        try:
            wandb_logger = WandbLogger(
                project=project, entity=entity, group=group, job_type=job_type, tags=list(tags or []), name=name,
                save_dir=str(run_dir), offline=(mode == "offline"), log_model=False,
            )
            experiment = wandb_logger.experiment  # starts the run
            if config is not None:
                experiment.config.update(config, allow_val_change=True)
        except Exception as err:  # noqa: BLE001 - whatever stops W&B must not stop the run
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log.warning("W&B could not start (%s: %s); logging to %s only", type(err).__name__, first,
                        run_dir / csv_subdir / "metrics.csv")
            finish_wandb(exit_code=1)
            return loggers
        loggers.append(wandb_logger)
        log.info("W&B run in %s mode under %s", mode, run_dir / "wandb")
    return loggers


def log_summary(loggers: list[Logger], summary: dict[str, float]) -> None:
    """Put final numbers in the W&B run summary (and the CSV log) so dashboards can sort runs by them."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary)
        logger.log_metrics(summary)
        logger.save()
