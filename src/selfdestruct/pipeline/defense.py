"""The defense stage (SPEC §1, stage 3): a registered defense applied to the aligned model.

:func:`parse_params` turns ``defense.params`` of ``conf/defense/<name>.yaml`` into the defense's parameter
dataclass (once, when the config is checked); :func:`apply_defense` draws the defense's data streams
(:mod:`selfdestruct.pipeline.streams`), checks their sizes against the configuration before training starts,
builds the module its registry entry (:mod:`selfdestruct.defenses`) names, trains, and returns the defended model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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
from selfdestruct.eval.red_team import RedTeamData, TrapCheckConfig, red_team, weights_digest
from selfdestruct.modules.attack import merged, wrap_lora
from selfdestruct.modules.defense import DefenseModule
from selfdestruct.objectives.common import AdapterParams, eager_attention
from selfdestruct.pipeline.streams import DefenseData, DefenseDataModule, Encoding, check_sizes
from selfdestruct.pipeline.config import OptimConfig
from selfdestruct.pipeline.training import StageContext, fit

__all__ = ["DefenseDataModule", "TrapCheck", "apply_defense", "build_defense", "parse_params"]
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


class TrapCheck(pl.Callback):
    """``defense.trap_check``: the defender's red team (:func:`selfdestruct.eval.red_team.red_team`) on the model at
    the end of every defense epoch from ``from_epoch`` on. Each check is logged (``trap_check/no_win``,
    ``trap_check/utility``, ``trap_check/harmful_score``: the model's own numbers on the validation sets before the
    red team's attacks) and kept in :attr:`results`; with ``stop_at`` the defense ends at the first checked epoch end
    where the model wins at least that many of the red team's cells (no-win), and those weights are released. The
    checks neither consume the training's random numbers nor change its weights, so without ``stop_at`` the released
    model is the one the defense releases without the check. Where that is not the last iterate (``optim.ema_decay``, or
    ``optim.spike_rollback`` undoing a late spike), :meth:`judge_released` checks it too, so the last result is the
    released model's. A defense that ``stop_at`` ends before its last epoch releases the last iterate (the weights
    the check judged): the rollback keeps copies of the stage's last steps only. ``threads``
    (``trainer.branch_threads``): the red team's cells run on that many threads, with the same results."""

    def __init__(self, cfg: TrapCheckConfig, tokenizer, fmt: PromptFormat, evaluator, data: RedTeamData,
                 seed: int, threads: int = 1) -> None:
        self.cfg, self.tokenizer, self.fmt, self.evaluator, self.data, self.seed = (cfg, tokenizer, fmt, evaluator,
                                                                                    data, seed)
        self.threads = threads
        self.results: list[dict] = []

    def red_team(self, model: torch.nn.Module) -> dict:
        return red_team(model, self.tokenizer, self.fmt, self.evaluator, self.data, self.cfg, self.seed,
                        threads=self.threads)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch < self.cfg.from_epoch or any(r["epoch"] == epoch for r in self.results):
            return
        model = pl_module.model  # the red team attacks copies and leaves the model as it was
        if hasattr(model, "merge_and_unload"):  # LoRA: the adapters merged into a copy, as the defense releases it
            model = merged(copy.deepcopy(model))
        result = {"epoch": epoch, "step": trainer.global_step, "weights": weights_digest(model),
                  **self.red_team(model)}
        del model
        self.results.append(result)
        logged = {"trap_check/no_win": float(result["no_win"]), "trap_check/epoch": float(epoch),
                  **{f"trap_check/{k}": v for k, v in result["pre"].items()}}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        stop = self.cfg.stop_at is not None and result["no_win"] >= self.cfg.stop_at
        log.info("trap check after epoch %d: no-win in %d of the red team's %d cells (utility %.3f, harmful score "
                 "%.3f on the validation sets)%s", epoch, result["no_win"], result["cells"], result["pre"]["utility"],
                 result["pre"]["harmful_score"], f"; stop_at={self.cfg.stop_at}: the defense ends here" if stop else "")
        if stop:
            trainer.should_stop = True

    def judge_released(self, model: torch.nn.Module) -> None:
        """When the stage released other weights than the last iterate it checked (``optim.ema_decay``'s average,
        ``optim.spike_rollback``'s weights from before a late loss spike), judge those too, as the last result
        (``"released": true``): the last result is always the released model's."""
        digest = weights_digest(model) if self.results else None
        if digest is None or self.results[-1]["weights"] == digest:
            return
        last = self.results[-1]
        result = {"epoch": last["epoch"], "step": last["step"], "released": True, "weights": digest,
                  **self.red_team(model)}
        self.results.append(result)
        log.info("trap check of the released weights (not the last iterate checked after epoch %d): the red team "
                 "won %d of %d cells", last["epoch"], result["no_win"], result["cells"])

    def state_dict(self) -> dict[str, Any]:
        return {"results": json.dumps(self.results)}  # a string: checkpoints load with weights_only=True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = json.loads(state_dict.get("results", "[]"))


def apply_defense(model: torch.nn.Module, tokenizer, ctx: StageContext, name: str, params: Any,
                  optim: OptimConfig | None, ckpt_dir: Path | None = None, ckpt_key: Any = None,
                  trap_check: TrapCheck | None = None) -> torch.nn.Module:
    """Defend ``model`` with ``name`` (sft: returned as is) on ``ctx``'s data; returns the defended plain HF model.

    ``params`` is the parameter dataclass (or the raw ``defense.params`` mapping, parsed here). The defense logs
    every step (``log_every_n_steps=1``); exact modes run the whole fit with eager attention. A non-finite
    gradient raises :class:`~selfdestruct.objectives.common.NonFiniteGradientError` out of this function, so the
    caller never saves a broken model.
    With ``ckpt_dir`` the fit checkpoints there and resumes (see :func:`~selfdestruct.pipeline.training.fit`).
    ``trap_check``: the red team at epoch ends (:class:`TrapCheck`); its results are in its ``results`` afterwards.
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
                      ckpt_key=ckpt_key, callbacks=[trap_check] if trap_check else [])
    last = module.history[-1] if module.history else {}
    log.info("%s: %d optimiser steps; last step %s", name, trainer.global_step,
             ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    released = merged(module.model)
    if trap_check is not None:
        trap_check.judge_released(released)
    return released
