"""CTRAP's objective (SPEC §4): ℓ(θ; D_align) + λ·ℓ_col(θ − a·g_h; D_gen), with g_h = ∇ℓ(θ; D_adv).

The inner step simulates one harmful fine-tuning update; the outer term plants a "collapse basin" there, where
the model predicts one constant token e everywhere. The default gradient is first order: ∇ℓ_col evaluated at
θ' = θ − a·g_h/‖g_h‖ is used as the gradient at θ (three gradient evaluations per step); "exact" also
differentiates through g_h by double backward (small models only).

Options beyond the paper, all off by default: a look-ahead shaped like the attacker's optimiser (``lookahead``),
several step sizes (``radii``) and a short unrolled attack (``unroll_steps``). The published-code facts and the
motivation for them are in SPEC §4 and issue 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selfdestruct.objectives.common import (
    NonFiniteGradientError,
    ReduceFn,
    TensorList,
    add_gradient,
    add_to_grads,
    check_finite,
    displaced,
    eager_attention,
    gradient,
    norm,
    pooled,
    response_ce,
    scaled,
    select_labels,
    shift_,
    token_ce,
    trainable_parameters,
    value,
)

Batch = dict[str, torch.Tensor]
LOOKAHEADS = ("sgd", "sign", "adam")
NORM_EPS = 1e-7  # θ' = θ − a·g_h/(‖g_h‖ + 1e-7), as in the published code
GRADIENTS = ("first_order", "exact")
COLLAPSE_RULES = ("published", "first")


def collapse_token_id(tokenizer, word: str = "error", rule: str = "published") -> int:
    """CTRAP's collapse target e for ``word`` (default "error").

    - "published": the last token of ``tokenizer("an " + word)``, as the published code takes it: the token of the
      word as it appears after another word ("▁error" for SentencePiece, " error" or its last piece for a
      byte-level BPE that splits it).
    - "first": the first token of " " + word, the token a generation starts the word with (" er" when a
      byte-level BPE splits " error" into " er" + "ror").
    """
    if rule not in COLLAPSE_RULES:
        raise ValueError(f"collapse token rule {rule!r}: expected one of {COLLAPSE_RULES}")
    text = f"an {word}" if rule == "published" else f" {word}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer encodes {text!r} to no token")
    return int(ids[-1] if rule == "published" else ids[0])


def collapse_loss(model: torch.nn.Module, batch: Batch, token_id: int) -> torch.Tensor:
    """ℓ_col: mean over the batch's labelled positions t of −log p(e | x ∘ y_<t)."""
    return token_ce(model, batch, token_id)


# --------------------------------------------------------------------------------------------------------------
# The simulated attack step
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SecondMoment:
    """Running mean of g_h² kept by the caller across steps, for ``lookahead="adam"`` (one parameter-sized buffer).

    Without it the Adam-like step uses the current g_h² alone, i.e. Adam's first update g/(|g| + δ) ≈ sign(g).
    """

    beta2: float = 0.999
    v: TensorList | None = None
    step: int = 0

    def update(self, grads: Sequence[torch.Tensor]) -> None:
        self.step += 1
        if self.v is None:
            self.v = [g.detach().float().square() * (1.0 - self.beta2) for g in grads]
            return
        for v, g in zip(self.v, grads, strict=True):
            v.mul_(self.beta2).addcmul_(g.float(), g.float(), value=1.0 - self.beta2)

    def rms(self, i: int) -> torch.Tensor:
        """Bias-corrected sqrt(E[g²]) of parameter i."""
        return (self.v[i] / (1.0 - self.beta2**self.step)).sqrt()


@dataclass
class Lookahead:
    """The simulated attacker step θ' = θ − a·scale·d, with d one tensor per parameter."""

    direction: TensorList
    scale: float


def lookahead_step(
    grads: TensorList,
    kind: str = "sgd",
    normalize: bool = True,
    second_moment: SecondMoment | None = None,
    delta: float = 1e-8,
) -> Lookahead:
    """Shape the harmful gradient into the simulated attack's step direction (may overwrite ``grads`` in place).

    - "sgd" (paper): d = g_h. normalize → a·g_h/(‖g_h‖ + 1e-7), a step of length a (the published code);
      raw → a·g_h, the paper's equation.
    - "sign": d = sign(g_h). normalize → a·sign(g_h)/sqrt(nnz), the same length a as the normalised gradient
      step (nnz = number of non-zero entries, = numel when no entry is exactly 0); raw → a·sign(g_h), i.e. every
      coordinate moves by a, like signSGD or an early Adam update at learning rate a.
    - "adam": d = g_h/(sqrt(v̂) + δ), v̂ from ``second_moment`` (or g_h² alone). normalize → length a;
      raw → an Adam update (no momentum) at learning rate a.
    """
    if kind not in LOOKAHEADS:
        raise ValueError(f"lookahead={kind!r}: expected one of {LOOKAHEADS}")
    with torch.no_grad():
        if kind == "sign":
            nnz = 0
            for g in grads:
                g.sign_()
                nnz += int(torch.count_nonzero(g))
            length = math.sqrt(nnz)
        elif kind == "adam":
            for i, g in enumerate(grads):
                rms = g.abs() if second_moment is None or second_moment.v is None else second_moment.rms(i)
                g.div_(rms.to(g.dtype).add_(delta))
            length = norm(grads)
        else:
            length = norm(grads)
    if not normalize:
        return Lookahead(grads, 1.0)
    if not (length > 0 and math.isfinite(length)):
        raise NonFiniteGradientError(
            f"CTRAP: cannot normalise the simulated {kind} step (its length is {length:.4g}); "
            "is the harmful batch empty or the harmful gradient not finite?"
        )
    # the published code divides the gradient step by ‖g_h‖ + 1e-7; the other shapes are this project's own
    return Lookahead(grads, 1.0 / (length + NORM_EPS) if kind == "sgd" else 1.0 / length)


# --------------------------------------------------------------------------------------------------------------
# One CTRAP step
# --------------------------------------------------------------------------------------------------------------


def ctrap_step(
    model: torch.nn.Module,
    align: Batch,
    harmful: Batch,
    general: Batch,
    *,
    token_id: int,
    lam: float = 0.1,
    step_size: float = 0.1,
    normalize_step: bool = True,
    gradient_mode: str = "first_order",
    lookahead: str = "sgd",
    radii: Sequence[float] | None = None,
    unroll_steps: int = 1,
    second_moment: SecondMoment | None = None,
    measure_lookahead: bool = False,
    reduce_fn: ReduceFn | None = None,
) -> dict[str, float]:
    """Accumulate ∇ℓ(θ; D_align) + λ·∇_θ ℓ_col(θ'; D_gen) into ``p.grad``; return the step's stats.

    θ' is reached from θ by ``unroll_steps`` simulated attack steps of size a on the harmful batch (1 = the
    paper); with ``radii`` the collapse gradients of several sizes a are averaged (default: [step_size]).
    first_order uses ∇ℓ_col(θ') as the gradient at θ; exact adds −a·∇_θ⟨∇ℓ_col(θ'), d(θ)⟩ by double backward
    (lookahead "sgd", one step, single process). Extra memory: g_h and one saved copy of the weights,
    restored bit-for-bit. ``measure_lookahead`` also measures the harmful loss at θ' (one more forward pass).
    ``reduce_fn`` averages tensors across data-parallel ranks in place (applied to each harmful gradient that
    defines a step, and to ``.grad`` at the end). With :data:`selfdestruct.objectives.common.all_reduce_mean`
    (anything with a ``mean_values`` method) each rank also weights its three CEs by its share of the tokens and
    the stats are pooled, so the step equals the single-process step on the concatenated batch even when the
    ranks hold unequal numbers of labelled tokens. Raises :class:`NonFiniteGradientError` on NaN/inf.

    Stats: loss (ℓ_align + λ·ℓ_col), loss_align, loss_harmful (ℓ(θ; D_adv), whose gradient defines the step),
    loss_collapse (ℓ_col at θ', mean over radii), norm_h (‖g_h‖); with ``measure_lookahead``
    loss_harmful_lookahead (ℓ(θ'; D_adv)); with ``unroll_steps`` > 1 loss_harmful_unrolled (the harmful loss
    where the last simulated step starts).
    """
    if gradient_mode not in GRADIENTS:
        raise ValueError(f"gradient_mode={gradient_mode!r}: expected one of {GRADIENTS}")
    if unroll_steps < 1:
        raise ValueError(f"unroll_steps={unroll_steps}: at least one simulated step")
    exact = gradient_mode == "exact"
    if exact and (lookahead != "sgd" or unroll_steps != 1 or reduce_fn is not None):
        raise ValueError("gradient_mode='exact' supports lookahead='sgd', unroll_steps=1 and one process only")
    radii = [step_size] if radii is None else [float(r) for r in radii]
    if not radii:
        raise ValueError("radii must name at least one step size")
    params = trainable_parameters(model)
    weight = lam / len(radii)
    device = params[0].device if params else torch.device("cpu")
    counts = [select_labels(b["labels"]).count for b in (harmful, general, align)]

    harmful_loss = response_ce(model, harmful)
    # Data parallelism: each CE is a mean over this rank's tokens; scaling it by the rank's token share makes the
    # rank average of the gradients the gradient over all tokens (see common.pooled). g_h is averaged before it is
    # normalised and stepped along, so every rank reaches the same θ'; ℓ_col(θ') and ℓ(D_align) are averaged with
    # .grad at the end (linear, no extra communication).
    pool = pooled(reduce_fn, device, [(n, 0.0) for n in counts])
    w_h, w_col, w_align = (1.0, 1.0, 1.0) if pool is None else (w for w, _ in pool)
    grads = gradient(scaled(harmful_loss, w_h), params)
    if reduce_fn is not None:
        reduce_fn(grads)
    norm_h = norm(grads)
    if second_moment is not None and lookahead == "adam":
        second_moment.update(grads)
    step = lookahead_step(grads, lookahead, normalize_step, second_moment)
    del grads

    collapse, after, trail = [], [], []
    pull = [torch.zeros_like(p) for p in params] if exact else None  # Σ_r (r/R)·∇ℓ_col(θ'_r)
    with displaced(params) as restore:
        for radius in radii:
            shift_(params, step.direction, -radius * step.scale)
            for j in range(1, unroll_steps):
                loss_j = response_ce(model, harmful)
                if j == unroll_steps - 1:
                    trail.append(value(loss_j))
                g_j = gradient(scaled(loss_j, w_h), params)
                if reduce_fn is not None:
                    reduce_fn(g_j)
                s_j = lookahead_step(g_j, lookahead, normalize_step, second_moment)
                shift_(params, s_j.direction, -radius * s_j.scale)
                del g_j, s_j
            if measure_lookahead:
                with torch.no_grad():
                    after.append(value(response_ce(model, harmful)))
            col = collapse_loss(model, general, token_id)
            collapse.append(value(col))
            if exact:
                v = gradient(col, params)
                add_to_grads(params, v, weight)
                for acc, vi in zip(pull, v):
                    acc.add_(vi, alpha=radius / len(radii))
                del v
            else:
                add_gradient(col, params, weight * w_col)
            restore()
    del step

    if exact:  # −λ·∇_θ ⟨pull, d(θ)⟩ with pull held constant: the part of the chain rule through g_h
        with eager_attention(model):
            g_h = gradient(response_ce(model, harmful), params, create_graph=True)
            inner = sum((a * g).sum() for a, g in zip(pull, g_h))
            if normalize_step:
                inner = inner / torch.sqrt(sum((g * g).sum() for g in g_h))
            add_gradient(inner, params, -lam)
        del pull, g_h, inner

    align_loss = response_ce(model, align)
    add_gradient(align_loss, params, w_align)
    if reduce_fn is not None:
        # the one average of the step's gradient (Lightning's DDP reducer is not armed in manual optimisation)
        reduce_fn([p.grad for p in params if p.grad is not None])

    loss_align, loss_harmful = value(align_loss), value(harmful_loss)
    n_h, n_col, n_align = counts
    pool = pooled(reduce_fn, device, [(n_align, loss_align), (n_h, loss_harmful)]
                  + [(n_col, c) for c in collapse] + [(n_h, a) for a in after] + [(n_h, t) for t in trail])
    if pool is not None:  # every rank reports the values on the whole batch
        values = [v for _, v in pool]
        loss_align, loss_harmful = values[0], values[1]
        collapse, values = values[2 : 2 + len(collapse)], values[2 + len(collapse) :]
        after, trail = values[: len(after)], values[len(after) :]
    collapse_mean = sum(collapse) / len(collapse)
    stats = {
        "loss": loss_align + lam * collapse_mean,
        "loss_align": loss_align,
        "loss_harmful": loss_harmful,
        "loss_collapse": collapse_mean,
        "norm_h": norm_h,
    }
    if after:
        stats["loss_harmful_lookahead"] = sum(after) / len(after)
    if trail:
        stats["loss_harmful_unrolled"] = sum(trail) / len(trail)
    check_finite("CTRAP", params, **stats)
    return stats
