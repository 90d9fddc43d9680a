"""NPO as the CTRAP code's baseline: alignment loss plus negative preference optimisation on harmful data.

L = ℓ(θ; D_align) − ρ·mean_i log σ(−(log p̄_θ(y_i|x_i) − log p̄_ref(y_i|x_i)))

with log p̄ the mean log-probability of a harmful example's response tokens and ref the frozen model the defense
starts from. The unlearning term pushes the harmful responses below the reference's likelihood and saturates
once they are well below it (unlike plain gradient ascent). As in the CTRAP code: inverse temperature 1, no 2/β
factor, per-example means over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfdestruct.errors import check_number
from selfdestruct.objectives.common import (
    IGNORE_INDEX,
    LOW_PRECISION,
    AdapterParams,
    ReduceFn,
    add_gradient,
    average_grads,
    check_finite,
    forward,
    response_ce,
    trainable_parameters,
    value,
)

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NpoParams(AdapterParams):
    """NPO's hyper-parameters and data sizes: ``params`` of ``conf/defense/npo.yaml`` (sources there)."""

    rho: float = 0.3  # ρ, weight of the unlearning term
    num_samples: int | None = None  # harmful examples; None = the whole defense pool
    num_align: int | None = None  # alignment examples; None = all

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "rho", low=0.0)
        for name in ("num_samples", "num_align"):
            check_number(self, name, low=1, integer=True, optional=True)


def mean_logp(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per example, the mean log-probability of its labelled (response) tokens: a vector of batch size."""
    logits = forward(model, batch).logits[:, :-1]
    if logits.dtype in LOW_PRECISION:
        logits = logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)


def npo_step(model: torch.nn.Module, align: Batch, harmful: Batch, p: NpoParams = NpoParams(), *,
             reference: torch.nn.Module, reduce_fn: ReduceFn | None = None) -> dict[str, float]:
    """Accumulate ∇[ℓ(θ; align) − ρ·mean log σ(log p̄_ref − log p̄_θ)] into ``.grad``; return the stats.

    ``reference`` is the frozen model the defense started from (no gradient). ``reduce_fn`` averages ``.grad``
    across data-parallel ranks at the end (per-rank means). Stats: loss, loss_align, loss_npo (−mean log σ),
    logp_harmful (mean log p̄_θ of the harmful responses).
    """
    params = trainable_parameters(model)
    align_loss = response_ce(model, align)
    logp = mean_logp(model, harmful)
    with torch.no_grad():
        ref = mean_logp(reference, harmful)
    unlearn = -F.logsigmoid(ref - logp).mean()
    loss = align_loss + p.rho * unlearn
    add_gradient(loss, params, 1.0)
    average_grads(reduce_fn, params)
    stats = {"loss": value(loss), "loss_align": value(align_loss), "loss_npo": value(unlearn),
             "logp_harmful": float(logp.detach().mean())}
    check_finite("NPO", params, **stats)
    return stats
