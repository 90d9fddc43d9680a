"""Booster's objective (arXiv 2409.01586): ℓ(θ; D_align) + λ·[ℓ(θ; D_h) − ℓ(θ − α·g_h/‖g_h‖; D_h)].

The second term is the harmful loss reduction that one simulated, normalised harmful step would achieve;
minimising it attenuates that reduction, so a real harmful fine-tuning step gains less. Its gradient is taken
first order, as the published code does: λ·(∇ℓ(θ; D_h) − ∇ℓ(θ'; D_h)), the gradient at the look-ahead point θ'
used as the gradient at θ. Three gradient evaluations per step; the simulated step is CTRAP's (which reuses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfdestruct.errors import check_number
from selfdestruct.objectives.common import (
    AdapterParams,
    ReduceFn,
    add_gradient,
    add_to_grads,
    average_grads,
    check_finite,
    displaced,
    gradient,
    norm,
    response_ce,
    shift_,
    trainable_parameters,
    value,
)
from selfdestruct.objectives.ctrap import lookahead_step

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BoosterParams(AdapterParams):
    """Booster's hyper-parameters and data sizes: ``params`` of ``conf/defense/booster.yaml`` (sources there)."""

    lam: float = 5.0  # λ, weight of the harmful loss reduction
    alpha: float = 0.1  # α, length of the simulated harmful step
    num_samples: int | None = None  # harmful examples; None = the whole defense pool
    num_align: int | None = None  # refusal/helpful pairs of the retain stream; None = every refusal

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "lam")
        check_number(self, "alpha", low=0.0, low_open=True)
        for name in ("num_samples", "num_align"):
            check_number(self, name, low=1, integer=True, optional=True)


def booster_step(model: torch.nn.Module, retain: Batch, harmful: Batch, p: BoosterParams = BoosterParams(), *,
                 reduce_fn: ReduceFn | None = None) -> dict[str, float]:
    """Accumulate ∇ℓ(θ; retain) + λ·(∇ℓ(θ; D_h) − ∇ℓ(θ'; D_h)) into ``.grad``, θ' = θ − α·g_h/(‖g_h‖ + 1e-7).

    ``reduce_fn`` (data parallelism) averages g_h before the simulated step, so every rank reaches the same θ',
    and ``.grad`` at the end (per-rank means: exact for equal token counts). The weights are restored
    bit-for-bit. Stats: loss, loss_align, loss_harmful (at θ), loss_harmful_lookahead (at θ'), norm_h.
    """
    params = trainable_parameters(model)
    harmful_loss = response_ce(model, harmful)
    g_h = gradient(harmful_loss, params)
    if reduce_fn is not None:
        reduce_fn(g_h)
    norm_h = norm(g_h)
    add_to_grads(params, g_h, p.lam)  # +λ·∇ℓ(θ; D_h)
    step = lookahead_step(g_h, "sgd", normalize=True)  # g_h/(‖g_h‖ + 1e-7)
    with displaced(params):
        shift_(params, step.direction, -p.alpha * step.scale)
        after = response_ce(model, harmful)
        add_gradient(after, params, -p.lam)  # −λ·∇ℓ(θ'; D_h)
    del g_h, step
    align_loss = response_ce(model, retain)
    add_gradient(align_loss, params, 1.0)  # +∇ℓ(θ; D_align)
    average_grads(reduce_fn, params)
    loss_align, loss_harmful, loss_after = value(align_loss), value(harmful_loss), value(after)
    stats = {"loss": loss_align + p.lam * (loss_harmful - loss_after), "loss_align": loss_align,
             "loss_harmful": loss_harmful, "loss_harmful_lookahead": loss_after, "norm_h": norm_h}
    check_finite("Booster", params, **stats)
    return stats
