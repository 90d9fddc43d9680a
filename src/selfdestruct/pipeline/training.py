"""Running one Lightning fit for a stage, with the same trainer settings everywhere."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger

from selfdestruct.data.formatting import PromptFormat
from selfdestruct.data.sources import DataBundle
from selfdestruct.pipeline.config import TrainerConfig
from selfdestruct.models.io import LoadOptions
from selfdestruct.utils.io import write_json_atomic

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "last.ckpt"


class _NoAdvert(logging.Filter):
    """Drops the advertisement for a cloud logger that Lightning logs at every Trainer's construction (the red team
    builds dozens of trainers a run), so the stage logs keep what this run did."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdvert())
CHECKPOINT_KEY = "key.json"


@dataclass(frozen=True)
class StageContext:
    """What the training stages of one job share, built once by the entry point and passed whole."""

    bundle: DataBundle  # every data stream of the job
    trainer: TrainerConfig
    seed: int
    fmt: PromptFormat  # how prompts and responses are laid out
    cache_root: Path | None = None  # where stages are cached (None: uncached)
    data_key: dict[str, Any] = field(default_factory=dict)  # the data's identity in cache keys
    loggers: list[Logger] = field(default_factory=list)  # the job's loggers (each stage adds its own CSV log)
    run_dir: Path | None = None  # the job's output directory
    load: LoadOptions = LoadOptions()  # how checkpoints are loaded
    eval_key: dict[str, Any] = field(default_factory=dict)  # what identifies the job's evaluation (its settings,
    #   data and numerical environment) in the keys of cached evaluations (cli_common.evaluation_key)


class RNGState(pl.Callback):
    """Saves the process's random number generators with every checkpoint and sets them back before the first
    step of a resumed fit, so anything random in a step (dropout, sampling) continues as it would have."""

    def __init__(self) -> None:
        self._to_restore: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain tensors and numbers only: checkpoints load with torch.load(weights_only=True)
        state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                           int(has_gauss), float(gauss)], "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state, self._to_restore = self._to_restore, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class FlushLogs(pl.Callback):
    """Writes the loggers' buffered rows to disk right after each checkpoint, so a run killed after it loses no log
    row of the steps up to it (the resumed run logs the steps after it). Lightning hands a step's metrics to the
    loggers only after the step's checkpoint is saved, hence the flush at the start of the next step."""

    def __init__(self) -> None:
        self._saved = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._saved = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._saved:
            self._saved = False
            for logger in trainer.loggers:
                logger.save()


def resume_point(ckpt_dir: Path, key: Any) -> str | None:
    """``ckpt_dir/last.ckpt`` if it was written by a fit of this very ``key``; checkpoints of another
    configuration (the same run directory re-used with other settings) are removed, never resumed."""
    marker = ckpt_dir / CHECKPOINT_KEY
    wanted = json.loads(json.dumps(key, sort_keys=True, default=str))
    if ckpt_dir.exists():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            found = None
        if found != wanted:
            if any(ckpt_dir.iterdir()):
                log.warning("%s holds checkpoints of another configuration: starting from zero", ckpt_dir)
            shutil.rmtree(ckpt_dir)
    write_json_atomic(marker, wanted)
    last = ckpt_dir / LAST_CHECKPOINT
    if last.exists():
        log.info("resuming from %s", last)
        return str(last)
    return None


def saved_loader_states(path: str) -> list[dict]:
    """The training loaders' positions Lightning saved in a checkpoint (memory-mapped: the weights stay on disk),
    each marked ``epoch_done`` when the checkpoint was taken at the last batch of an epoch."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epoch_done = bool(loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", False))
    return [{**state, "epoch_done": epoch_done} for state in loop.get("state_dict", {}).get("combined_loader", [])]


def fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, trainer_cfg: TrainerConfig, epochs: int,
        loggers: list[Logger], root_dir: Path, ckpt_dir: Path | None = None, ckpt_key: Any = None,
        callbacks: list[pl.Callback] | tuple = ()) -> pl.Trainer:
    """Fit ``module`` for ``epochs`` epochs; returns the trainer (its ``global_step`` is the step count).

    With ``ckpt_dir``, ``last.ckpt`` is saved there every ``checkpoint_every_n_steps`` steps and a fit of the same
    ``ckpt_key`` that finds one resumes from it exactly: weights, optimiser, schedule, the position of every data
    stream (:class:`~selfdestruct.data.datamodule.ResumableDataLoader`), the random generators and the module's own
    state (``CausalLMModule.extra_state``) all come back, so a run killed at any point ends as the uninterrupted
    run would have. ``callbacks``: the stage's own (saved with the checkpoints and restored with them).
    """
    callbacks = [*([RichProgressBar(leave=False)] if trainer_cfg.progress_bar else []), *callbacks]
    resume_from = None
    if ckpt_dir is not None and trainer_cfg.checkpoint_every_n_steps > 0 and not trainer_cfg.fast_dev_run:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                                         every_n_train_steps=trainer_cfg.checkpoint_every_n_steps))
        callbacks += [RNGState(), FlushLogs()]
        # the saved state is the one after the step, with the loop counters of after the step: what resuming needs
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        resume_from = resume_point(Path(ckpt_dir), ckpt_key)
        if resume_from is not None and hasattr(datamodule, "resume_positions"):
            datamodule.resume_positions(saved_loader_states(resume_from))
    trainer = pl.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        max_epochs=epochs,
        max_steps=trainer_cfg.max_steps,
        fast_dev_run=trainer_cfg.fast_dev_run,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        deterministic=trainer_cfg.deterministic,
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_model_summary=False,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(root_dir),
        num_sanity_val_steps=0,
        **trainer_cfg.extra,
    )
    # CSV logs an earlier process wrote (this process has not opened them yet: Lightning will start them afresh)
    csv_loggers = [logger for logger in loggers if isinstance(logger, CSVLogger) and logger._experiment is None
                   ] if resume_from else []
    earlier = [read_csv_rows(csv_file(logger)) for logger in csv_loggers]
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    for logger, rows in zip(csv_loggers, earlier):  # Lightning's CSV logger starts its file afresh on a new run
        restore_earlier_rows(logger, rows)
    return trainer


def csv_file(logger: CSVLogger) -> Path:
    return Path(logger.log_dir) / "metrics.csv"


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def _logged(row: dict[str, str]) -> tuple[str, set[str]]:
    """A log row's step and the metrics it holds."""
    return row.get("step") or "", {k for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")}


def restore_earlier_rows(logger: CSVLogger, earlier: list[dict[str, str]]) -> None:
    """After a resumed fit: the interrupted run's rows go back in front of the resumed run's, except those the
    resumed run logged again (the same step and metric: the steps after the checkpoint), so the log covers the
    whole training with no step twice. The logger, which may go on logging (later stages, the summary), learns
    the columns of the rows put back."""
    logger.save()  # rows still buffered go to the file first
    path = csv_file(logger)
    rows = read_csv_rows(path)
    again: dict[str, set[str]] = {}
    for row in rows:
        step, keys = _logged(row)
        again.setdefault(step, set()).update(keys)
    kept = [row for row, (step, keys) in zip(earlier, map(_logged, earlier)) if not keys & again.get(step, set())]
    if not kept:
        return
    header = list(dict.fromkeys(key for r in (*kept, *rows) for key in r))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows([*kept, *rows])
    os.replace(tmp, path)
    logger.experiment.metrics_keys = header  # appends now follow the file's header
