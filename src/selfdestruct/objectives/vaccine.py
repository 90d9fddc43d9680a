"""Vaccine's objective (perturbation-aware alignment, arXiv 2402.01109).

min_θ ℓ(θ; D_align) with every decoder layer's attention output h_l moved by ε_l in the worst direction of the
alignment loss, ε = ρ·∇_h ℓ / ‖∇_h ℓ‖ (one norm over all layers), so the aligned behaviour survives a shift of
the hidden embeddings like the one harmful fine-tuning causes. Two passes per step on the same batch: the first
finds ∇_h ℓ, the second adds ε (held constant) and gives the gradient the optimiser applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selfdestruct.errors import check_number
from selfdestruct.objectives.common import (
    AdapterParams,
    ReduceFn,
    add_gradient,
    added_to_outputs,
    average_grads,
    captured_outputs,
    check_finite,
    modules_named,
    response_ce,
    trainable_parameters,
    value,
)

Batch = dict[str, torch.Tensor]
NORM_EPS = 1e-7  # ε_l = ρ·g_l/(‖g‖ + 1e-7), as in the published code


@dataclass(frozen=True)
class VaccineParams(AdapterParams):
    """Vaccine's hyper-parameters and data sizes: ``params`` of ``conf/defense/vaccine.yaml`` (sources there)."""

    rho: float = 5.0  # ρ, length of the joint perturbation of the hidden embeddings
    num_align: int | None = None  # alignment examples; None = all

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "rho", low=0.0)
        check_number(self, "num_align", low=1, integer=True, optional=True)


def embedding_perturbation(loss: torch.Tensor, hidden: list[torch.Tensor], rho: float) -> tuple[list, float]:
    """ε_l = ρ·g_l/(‖g‖ + 1e-7) with g_l = ∂loss/∂h_l and ‖g‖ over all layers; returns (ε, ‖g‖)."""
    grads = torch.autograd.grad(loss, hidden)
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    return [(rho / (total + NORM_EPS)) * g.detach() for g in grads], total


def vaccine_step(model: torch.nn.Module, align: Batch, p: VaccineParams = VaccineParams(), *,
                 reduce_fn: ReduceFn | None = None) -> dict[str, float]:
    """Accumulate ∇_θ ℓ(θ; D_align | h_l + ε_l) into ``.grad``; return the stats.

    ``reduce_fn`` averages ``.grad`` across data-parallel ranks at the end (each rank perturbs its own
    examples' embeddings, ε normalised over the rank's own batch). Stats: loss (perturbed), loss_clean,
    norm_hidden_grad (‖∂ℓ/∂h‖).
    """
    params = trainable_parameters(model)
    layers = modules_named(model, "Attention")
    with captured_outputs(layers) as hidden:
        clean = response_ce(model, align)
    deltas, total = embedding_perturbation(clean, hidden, p.rho)
    with added_to_outputs(layers, deltas):
        loss = response_ce(model, align)
    add_gradient(loss, params, 1.0)
    average_grads(reduce_fn, params)
    stats = {"loss": value(loss), "loss_clean": value(clean), "norm_hidden_grad": total}
    check_finite("Vaccine", params, **stats)
    return stats
