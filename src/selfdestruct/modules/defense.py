"""The Lightning module every defense trains with: one call of the defense's objective step per optimiser step.

The mathematics lives in :mod:`selfdestruct.objectives`; the module owns the optimiser, the data-parallel
reduction and the logging. A defense brings a module of its own (a subclass overriding :meth:`defense_step`) only
when its step needs something this one does not give: state kept across steps, a frozen reference model.
A :class:`~selfdestruct.objectives.common.NonFiniteGradientError` raised by an objective is never caught here:
it leaves ``trainer.fit`` (Lightning re-raises after notifying callbacks and loggers), so the stage that called
``fit`` never reaches the point where it saves the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from selfdestruct.modules.base import CausalLMModule
from selfdestruct.objectives.common import ReduceFn, all_reduce_mean
from selfdestruct.pipeline.config import OptimConfig

Batch = dict[str, torch.Tensor]


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
    """Calls ``objective(model, *batches in roles order, params, reduce_fn=...)`` and logs its stats.

    Every stat is logged under ``defense/`` at every step (the defense stage runs the trainer with
    ``log_every_n_steps=1``) and kept in ``history``, a few floats per step, so the caller can report how the
    geometry evolved without re-reading the logs.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, params: Any,
                 objective: Callable[..., dict[str, float]] | None = None, roles: Sequence[str] = ()) -> None:
        super().__init__(model, optim, log_prefix="defense")
        self.defense_params = params
        self.objective = objective
        self.roles = tuple(roles)
        self.history: list[dict[str, float]] = []

    def use_branch_threads(self, threads: int) -> int:
        """Run the independent branches of each step on up to ``threads`` threads (``trainer.branch_threads``);
        returns how many the step will use: 1 here, the shared step has no branches."""
        return 1

    def defense_step(self, batch: Mapping[str, Batch]) -> dict[str, float]:
        """Accumulate the step's gradient into ``.grad`` and return its stats."""
        return self.objective(self.model, *(batch[r] for r in self.roles), self.defense_params,
                              reduce_fn=data_parallel_reduce())

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> torch.Tensor:
        self.optimizers().zero_grad(set_to_none=True)
        stats = self.defense_step(batch)
        self.finish_step(stats["loss"])
        self.log_stats(stats)
        return torch.tensor(stats["loss"])

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
