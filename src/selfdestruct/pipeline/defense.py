"""The defense stage (SPEC §1, stage 3): a registered defense applied to the aligned model.

:func:`parse_params` turns ``defense.params`` of ``conf/defense/<name>.yaml`` into the defense's parameter
dataclass (once, when the config is checked); :func:`apply_defense` draws the defense's data streams
(:mod:`selfdestruct.pipeline.streams`), checks their sizes against the configuration before training starts,
builds the module its registry entry (:mod:`selfdestruct.defenses`) names, trains, and returns the defended model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from selfdestruct.data.formatting import PromptFormat
from selfdestruct.data.sources import DataBundle
from selfdestruct.defenses import DEFENSES
from selfdestruct.errors import UserError, build_config
from selfdestruct.modules.attack import merged, wrap_lora
from selfdestruct.modules.defense import DefenseModule
from selfdestruct.objectives.common import AdapterParams, eager_attention
from selfdestruct.pipeline.streams import DefenseData, DefenseDataModule, Encoding, check_sizes
from selfdestruct.pipeline.training import OptimConfig, StageContext, fit

__all__ = ["DefenseDataModule", "apply_defense", "build_defense", "parse_params"]
log = logging.getLogger(__name__)


def parse_params(name: str, params: Mapping[str, Any] | Any | None):
    """``defense.params`` as the defense's dataclass (None for a defense that trains nothing); an unknown key is an
    error naming it (nothing is ignored). An instance of the dataclass is returned as it is."""
    if name not in DEFENSES:
        raise UserError(f"defense={name!r}: expected one of {', '.join(DEFENSES)}")
    cls = DEFENSES[name].params
    if cls is not None and isinstance(params, cls):
        return params
    values = _plain(params or {})
    if cls is None:
        if values:
            raise UserError(f"defense.params.{sorted(values)[0]}: defense={name} takes no parameters")
        return None
    return build_config(cls, values, "defense.params")


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(params, DictConfig):
            return OmegaConf.to_container(params, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return dict(params)


def build_defense(model: torch.nn.Module, tokenizer, bundle: DataBundle, name: str, params: Any,
                  optim: OptimConfig, fmt: PromptFormat, seed: int) -> tuple[DefenseModule, DefenseData, bool]:
    """The module and the streams of defense ``name``, and whether it runs in an exact (double-backward) mode."""
    p = parse_params(name, params)
    if p is None:
        raise ValueError(f"defense={name} trains nothing: there is no module to build")
    entry = DEFENSES[name]
    data = entry.streams(bundle, p, Encoding(tokenizer, optim.max_length, fmt, seed))
    if isinstance(p, AdapterParams) and p.adapter == "lora":
        model = wrap_lora(model, p.lora_rank, p.lora_alpha, p.lora_dropout, list(p.lora_targets))
    if entry.module is not None:
        module = entry.module(model, optim, p, tokenizer=tokenizer)
    else:
        module = DefenseModule(model, optim, p, entry.objective, entry.roles)
    return module, data, entry.exact(p)


def apply_defense(model: torch.nn.Module, tokenizer, ctx: StageContext, name: str, params: Any,
                  optim: OptimConfig | None, ckpt_dir: Path | None = None, ckpt_key: Any = None) -> torch.nn.Module:
    """Defend ``model`` with ``name`` (sft: returned as is) on ``ctx``'s data; returns the defended plain HF model.

    ``params`` is the parameter dataclass (or the raw ``defense.params`` mapping, parsed here). The defense logs
    every step (``log_every_n_steps=1``); exact modes run the whole fit with eager attention. A non-finite
    gradient raises :class:`~selfdestruct.objectives.common.NonFiniteGradientError` out of this function, so the
    caller never saves a broken model.
    With ``ckpt_dir`` the fit checkpoints there and resumes (see :func:`~selfdestruct.pipeline.training.fit`).
    """
    p = parse_params(name, params)
    if p is None:  # sft: the aligned model is the released model
        return model
    if optim is None:
        raise UserError(f"defense={name} needs defense.optim (learning rate, epochs, batch size)")
    pl.seed_everything(ctx.seed, workers=True, verbose=False)
    module, data, exact = build_defense(model, tokenizer, ctx.bundle, name, p, optim, ctx.fmt, ctx.seed)
    if ctx.trainer.branch_threads > 1:
        try:
            used = module.use_branch_threads(ctx.trainer.branch_threads)
        except ValueError as err:
            raise UserError(f"trainer.branch_threads={ctx.trainer.branch_threads} with defense={name}: {err}") from err
        log.info("trainer.branch_threads=%d: %s runs each step on %d thread%s%s", ctx.trainer.branch_threads, name,
                 used, "" if used == 1 else "s", " (no independent branches)" if used == 1 else "")
    check_sizes(data, ctx.loggers)
    datamodule = DefenseDataModule(data.streams, batch_size=optim.batch_size, pad_id=tokenizer.pad_token_id,
                                   seed=ctx.seed)
    stage_cfg = dataclasses.replace(ctx.trainer, log_every_n_steps=1)
    with eager_attention(module.model) if exact else nullcontext():
        trainer = fit(module, datamodule, stage_cfg, optim.epochs, ctx.loggers, ctx.run_dir, ckpt_dir=ckpt_dir,
                      ckpt_key=ckpt_key)
    last = module.history[-1] if module.history else {}
    log.info("%s: %d optimiser steps; last step %s", name, trainer.global_step,
             ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    return merged(module.model)
