"""SEAM as a Lightning stage (SPEC §3): one call of :func:`seam_step` per optimiser step, every stat logged.

The module adds nothing to the mathematics, which lives in :mod:`selfdestruct.objectives.seam`; it owns the
optimiser, the data-parallel reduction and the logging. A :class:`NonFiniteGradientError` raised by the objective
is never caught here: it leaves ``trainer.fit`` (Lightning re-raises after notifying callbacks and loggers), so
the stage that called ``fit`` never reaches the point where it saves the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from selfdestruct.modules.base import CausalLMModule
from selfdestruct.objectives.common import ReduceFn, all_reduce_mean
from selfdestruct.objectives.seam import ESTIMATORS, seam_step

Batch = dict[str, torch.Tensor]

__all__ = ["Batch", "DefenseModule", "SEAMModule", "all_reduce_mean", "data_parallel_reduce"]


def data_parallel_reduce() -> ReduceFn | None:
    """:data:`all_reduce_mean` when several processes train together, else ``None`` (no communication).

    It is the only gradient average of a step. Under Lightning's DDP strategy with manual optimisation the DDP
    reducer is never armed: Lightning turns ``require_backward_grad_sync`` off around ``training_step`` and arms
    the reducer only in ``manual_backward``, which these modules never call (the objectives run their own
    ``backward``/``autograd.grad``), so DDP's hooks average nothing and gradients are averaged exactly once.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return all_reduce_mean
    return None


class DefenseModule(CausalLMModule):
    """What SEAM and CTRAP share: per-step logging of the objective's stats under ``defense/``.

    Every stat is logged at every step (the defense stage runs the trainer with ``log_every_n_steps=1``) and kept
    in ``history``, a few floats per step, so the caller can report how the geometry evolved without re-reading
    the logs.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, warmup_ratio: float = 0.0,
                 schedule: str = "constant", max_grad_norm: float | None = None) -> None:
        super().__init__(model, lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, schedule=schedule,
                         max_grad_norm=max_grad_norm, log_prefix="defense")
        self.history: list[dict[str, float]] = []

    def extra_state(self) -> dict:
        return {**super().extra_state(), "history": [dict(h) for h in self.history]}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.history = [dict(h) for h in state.get("history", [])]

    def log_stats(self, stats: Mapping[str, float]) -> None:
        self.history.append(dict(stats))
        for key, val in stats.items():
            self.log(f"{self.log_prefix}/{key}", float(val), on_step=True, on_epoch=False,
                     prog_bar=key == "loss")


class SEAMModule(DefenseModule):
    """L_ul + α·L_up + β·L_sd with the Hessian-free (or exact) gradient of L_sd; batches ``harmful``, ``refusal``,
    ``benign``.

    ``harmful`` and ``refusal`` hold the same prompts in the same rows (with ``official_masking`` also the same
    padded width), which is what :func:`selfdestruct.pipeline.defense.seam_streams` provides.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        *,
        alpha: float = 1.0,
        beta: float = 0.01,
        eps: float = 1e-3,
        estimator: str = "forward",
        official_masking: bool = False,
        benign_weight: float = 0.0,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        schedule: str = "constant",
        max_grad_norm: float | None = None,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: expected one of {ESTIMATORS}")
        super().__init__(model, lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, schedule=schedule,
                         max_grad_norm=max_grad_norm)
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.estimator = estimator
        self.official_masking = official_masking
        self.benign_weight = benign_weight

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> torch.Tensor:
        self.optimizers().zero_grad(set_to_none=True)
        stats = seam_step(
            self.model, batch["harmful"], batch["refusal"], batch["benign"],
            alpha=self.alpha, beta=self.beta, eps=self.eps, estimator=self.estimator,
            official_masking=self.official_masking, benign_weight=self.benign_weight,
            reduce_fn=data_parallel_reduce(),
        )
        self.finish_step()
        self.log_stats(stats)
        return torch.tensor(stats["loss"])
