"""RepNoise's objective (representation noising, arXiv 2405.14577).

L = ℓ(θ; D_harmless) + β·L_noise − α·log(S/(L+1) + 1)

- ℓ(θ; D_harmless): cross-entropy of the refusals paired with the harmful prompts (retain the safe behaviour);
- L_noise: the mean over decoder layers of MMD²(h_l, N(0, I)), h_l the feed-forward output of layer l on the
  harmful batch at its response positions: pushes harmful representations toward Gaussian noise;
- −α·log(S/(L+1) + 1): gradient ascent on the harmful responses through a log barrier over the final logits and
  the logit lens of every hidden state, the same term as SEAM's L_ul (which took it from RepNoise), so it is
  :func:`selfdestruct.objectives.seam.unlearning_terms` times α.

The MMD is the published one: a sum of five Gaussian kernels whose bandwidths are 2^(i−2) times the mean pairwise
squared distance of the pooled sample (held constant), each example's masked representation one flat vector.
The noise is drawn with ``torch.randn_like`` from the global generator (Lightning seeds it per run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selfdestruct.errors import check_number
from selfdestruct.objectives.common import (
    IGNORE_INDEX,
    AdapterParams,
    ReduceFn,
    add_gradient,
    average_grads,
    captured_outputs,
    check_finite,
    modules_named,
    response_ce,
    trainable_parameters,
    value,
)
from selfdestruct.objectives.seam import unlearning_terms

Batch = dict[str, torch.Tensor]
KERNEL_MUL = 2.0  # ratio of successive kernel bandwidths (published MMD_loss)
KERNEL_NUM = 5  # number of Gaussian kernels (published MMD_loss)


@dataclass(frozen=True)
class RepNoiseParams(AdapterParams):
    """RepNoise's hyper-parameters and data sizes: ``params`` of ``conf/defense/repnoise.yaml`` (sources there)."""

    alpha: float = 10.0  # α, weight of the gradient-ascent (log barrier) term
    beta: float = 0.001  # β, weight of the noise (MMD) term
    num_samples: int | None = None  # harmful/refusal pairs; None = the whole defense pool

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "alpha", low=0.0)
        check_number(self, "beta", low=0.0)
        check_number(self, "num_samples", low=1, integer=True, optional=True)


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMD² of two equally large samples (one row per example) under the published sum of Gaussian kernels."""
    z = torch.cat([x, y])
    n, b = z.shape[0], x.shape[0]
    dist = (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).sum(-1)
    bandwidth = dist.detach().sum() / (n * n - n) / KERNEL_MUL ** (KERNEL_NUM // 2)
    k = sum(torch.exp(-dist / (bandwidth * KERNEL_MUL**i)) for i in range(KERNEL_NUM))
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def noise_loss(activations: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of MMD²(masked h_l, masked N(0, I)); ``mask`` [batch, seq] selects the positions."""
    total = 0.0
    for h in activations:
        m = mask.unsqueeze(-1).to(h.dtype)
        hidden = h * m
        noise = torch.randn_like(hidden) * m
        total = total + mmd(hidden.reshape(hidden.shape[0], -1), noise.reshape(noise.shape[0], -1))
    return total / len(activations)


def repnoise_step(model: torch.nn.Module, harmful: Batch, refusal: Batch, p: RepNoiseParams = RepNoiseParams(), *,
                  reduce_fn: ReduceFn | None = None) -> dict[str, float]:
    """Accumulate ∇[ℓ(θ; refusal) + β·L_noise(harmful) − α·log(S/(L+1) + 1)] into ``.grad``; return the stats.

    Two forward passes (harmful with hidden states, refusal), one backward. ``reduce_fn`` averages ``.grad``
    across data-parallel ranks at the end (per-rank losses: exact for one process). Stats: loss, loss_harmless,
    loss_noise, loss_ul (−log(S/(L+1) + 1)), s_ul.
    """
    params = trainable_parameters(model)
    with captured_outputs(modules_named(model, "MLP")) as activations:
        ul = unlearning_terms(model, harmful)
    noise = noise_loss(activations, harmful["labels"] != IGNORE_INDEX)
    harmless = response_ce(model, refusal)
    loss = harmless + p.beta * noise + p.alpha * ul.loss
    add_gradient(loss, params, 1.0)
    average_grads(reduce_fn, params)
    stats = {"loss": value(loss), "loss_harmless": value(harmless), "loss_noise": value(noise),
             "loss_ul": value(ul.loss), "s_ul": value(ul.s)}
    check_finite("RepNoise", params, **stats)
    return stats
