"""NPO's module: the shared defense module plus the frozen reference model NPO's unlearning term compares with."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from selfdestruct.modules.defense import Batch, DefenseModule, data_parallel_reduce
from selfdestruct.objectives.npo import NpoParams, npo_step
from selfdestruct.pipeline.config import OptimConfig


class NPOModule(DefenseModule):
    """ℓ(θ; D_align) − ρ·mean log σ(log p̄_ref − log p̄_θ) on ``align`` and ``harmful`` batches.

    The reference is a frozen copy of the model as the defense receives it (the aligned model), as in the CTRAP
    code; it is a submodule, so it follows the model to its device.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, params: NpoParams, *, tokenizer=None) -> None:
        super().__init__(model, optim, params)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def defense_step(self, batch: Mapping[str, Batch]) -> dict[str, float]:
        return npo_step(self.model, batch["align"], batch["harmful"], self.defense_params, reference=self.reference,
                        reduce_fn=data_parallel_reduce())
