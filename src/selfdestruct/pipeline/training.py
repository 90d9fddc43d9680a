"""Running one Lightning fit for a stage, with the same trainer settings everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import Logger

from selfdestruct.errors import check_choice, check_number
from selfdestruct.modules.base import SCHEDULES


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings of one training stage (``conf/pretrain``, ``conf/align``, ``conf/attack``...)."""

    lr: float
    epochs: int = 1
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    max_grad_norm: float | None = None
    max_length: int = 96

    def __post_init__(self) -> None:
        check_optim_fields(self)


def check_optim_fields(cfg) -> None:
    """The optimiser fields every training stage shares, checked before any work (FieldError names the field)."""
    check_number(cfg, "lr", low=0.0, low_open=True)
    check_number(cfg, "epochs", low=1, integer=True)
    check_number(cfg, "batch_size", low=1, integer=True)
    check_number(cfg, "weight_decay", low=0.0)
    check_number(cfg, "warmup_ratio", low=0.0, high=1.0)
    check_choice(cfg, "schedule", SCHEDULES)
    check_number(cfg, "max_grad_norm", low=0.0, low_open=True, optional=True)
    check_number(cfg, "max_length", low=2, integer=True)


@dataclass(frozen=True)
class TrainerConfig:
    """Options passed to ``pl.Trainer`` (``conf/trainer``); the stage decides epochs and loggers."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 5
    progress_bar: bool = True
    deterministic: bool = False
    fast_dev_run: bool = False
    max_steps: int = -1
    checkpoint_every_n_steps: int = 100
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_number(self, "log_every_n_steps", low=1, integer=True)
        check_number(self, "max_steps", low=-1, integer=True)
        check_number(self, "checkpoint_every_n_steps", low=0, integer=True)


def fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, trainer_cfg: TrainerConfig, epochs: int,
        loggers: list[Logger], root_dir: Path, ckpt_dir: Path | None = None) -> pl.Trainer:
    """Fit ``module`` for ``epochs`` epochs; returns the trainer (its ``global_step`` is the step count).

    With ``ckpt_dir``, ``last.ckpt`` is saved there every ``checkpoint_every_n_steps`` steps and a fit that
    finds one resumes from it (a requeued or restarted job loses at most that many steps).
    """
    callbacks: list[pl.Callback] = [RichProgressBar(leave=False)] if trainer_cfg.progress_bar else []
    resume_from = None
    if ckpt_dir is not None and trainer_cfg.checkpoint_every_n_steps > 0 and not trainer_cfg.fast_dev_run:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                                         every_n_train_steps=trainer_cfg.checkpoint_every_n_steps))
        if (ckpt_dir / "last.ckpt").exists():
            resume_from = str(ckpt_dir / "last.ckpt")
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    return trainer
