"""What every entry point does around its work: output dir, resume/skip, clean failure, W&B finish.

In a single run, a ``UserError`` becomes one line on stderr and exit status 2. In a sweep (Hydra
multirun), a failing job must not take the others down: it leaves ``failure.json`` in its run directory
and returns; :class:`selfdestruct.utils.sweep.SweepReport` then reports every failure and exits non-zero.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from selfdestruct.errors import UserError
from selfdestruct.utils.io import write_json_atomic
from selfdestruct.utils.run_metrics import FAILURE_FILE, METRICS_FILE, RunMetrics, SchemaError

log = logging.getLogger("selfdestruct")


def finish_wandb(exit_code: int) -> None:
    """Close the W&B run of this job (also on failure), so offline runs are complete and syncable. A job that
    never imported wandb has no run to close (and a failed config check does not pay for the import)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def hydra_output_dir() -> Path:
    """The run's output directory as Hydra decided it (never the process's working directory)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# Overrides that do not change what a run computes (so a re-run with or without them may skip it).
_NEUTRAL_OVERRIDES = ("force=", "trainer.progress_bar=", "hydra/launcher=", "hydra.launcher.")


def identity_overrides() -> list[str]:
    """The job's overrides that define what it computes (stored in metrics.json, compared on re-runs)."""
    return sorted(o for o in job_overrides() if not o.startswith(_NEUTRAL_OVERRIDES))


def complete_metrics(run_dir: Path, required: tuple[str, ...]) -> dict | None:
    """The run's ``metrics.json`` if it parses, has every ``required`` key and was made by this very job.

    A re-run of a sweep skips complete cells; comparing the overrides guards against a grid that changed
    while the directory names (e.g. job numbers) stayed the same.
    """
    path = run_dir / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        RunMetrics.from_json(metrics)
    except SchemaError:
        return None
    if not all(k in metrics for k in required):
        return None
    if metrics.get("overrides") != identity_overrides():
        log.info("%s was made by other overrides: recomputing", path)
        return None
    return metrics


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text and not isinstance(err, UserError) else (
        text[0] if text else type(err).__name__)


# Storage problems the user fixes (space, quota, permissions, a read-only or wrong path): one line, not a traceback.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def storage_error(err: BaseException) -> UserError | None:
    """``err`` as a one-line :class:`UserError` naming the path when it is a storage problem, else None."""
    if not isinstance(err, OSError) or err.errno not in STORAGE_ERRNOS:
        return None
    where = f"{err.filename}: " if err.filename else ""
    hint = " (free some space, or point hydra.run.dir / paths.cache_dir elsewhere)" \
        if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return UserError(f"cannot write {where}{err.strerror or os.strerror(err.errno)}{hint}")


def check_writable(run_dir: Path) -> None:
    """The run directory accepts files, checked before any work (a file is created and removed)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".writable."):
            pass
    except OSError as err:
        raise UserError(f"hydra.run.dir={run_dir}: not writable ({err.strerror or err})") from None


def _record_failure(run_dir: Path, record: dict) -> None:
    try:
        write_json_atomic(run_dir / FAILURE_FILE, record)
    except OSError as err:  # the failure may be that nothing can be written there
        log.error("could not write %s: %s", run_dir / FAILURE_FILE, err)


def run_job(body: Callable[[], dict], run_dir: Path) -> dict | None:
    """Run ``body`` with the failure policy above; W&B is finished on every path.

    A storage problem (a full disk, an unwritable directory) is reported like bad input: one line naming the path.
    Results are written atomically, so such a failure never leaves a partial ``metrics.json``.
    """
    try:
        (run_dir / FAILURE_FILE).unlink(missing_ok=True)
        check_writable(run_dir)
        result = body()
    except KeyboardInterrupt:
        finish_wandb(exit_code=130)
        raise
    except BaseException as err:  # noqa: BLE001 - every failure is recorded, then handled below
        err = storage_error(err) or err
        is_user_error = isinstance(err, UserError)
        finish_wandb(exit_code=2 if is_user_error else 1)
        _record_failure(run_dir, {
            "error": _one_line(err), "overrides": job_overrides(),
            "traceback": None if is_user_error else traceback.format_exc(limit=8)})
        if in_sweep():
            log.error("job failed (%s); the sweep goes on: %s", run_dir, _one_line(err))
            if not is_user_error:
                log.error("%s", traceback.format_exc())
            return None
        if is_user_error:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise
    finish_wandb(exit_code=0)
    return result
