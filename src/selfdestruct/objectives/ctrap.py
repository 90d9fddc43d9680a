"""CTRAP's objective (SPEC §4): ℓ(θ; D_align) + λ·ℓ_col(θ − a·g_h; D_gen), with g_h = ∇ℓ(θ; D_adv).

The inner step simulates one harmful fine-tuning update; the outer term plants a "collapse basin" there, where
the model predicts one constant token e everywhere. The default gradient is first order: ∇ℓ_col evaluated at
θ' = θ − a·g_h/‖g_h‖ is used as the gradient at θ (three gradient evaluations per step); "exact" also
differentiates through g_h by double backward (small models only).

Options beyond the paper, all off by default: a look-ahead shaped like the attacker's optimiser (``lookahead``),
several step sizes (``radii``), a short unrolled attack (``unroll_steps``) and a trap where a simulated AdamW
fine-tune ends (``attack_steps``, :func:`attack_displacement`). The published-code facts and the
motivation for them are in SPEC §4 and issue 3.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selfdestruct.errors import FieldError, check_choice, check_number
from selfdestruct.objectives.common import (
    AdapterParams,
    NonFiniteGradientError,
    ReduceFn,
    TensorList,
    add_gradient,
    add_to_grads,
    average_grads,
    check_finite,
    displaced,
    eager_attention,
    gradient,
    norm,
    pooled,
    response_ce,
    run_concurrently,
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
COLLAPSE_AT = ("last", "every")
CTRAP_DATA = ("retain", "align_general")


@dataclass(frozen=True)
class CtrapParams(AdapterParams):
    """CTRAP's hyper-parameters and data sizes: ``params`` of ``conf/defense/ctrap.yaml``, where each value's source
    is. The one declaration of every CTRAP setting, passed whole from the config to the module to
    :func:`ctrap_step`. The adapter fields (LoRA by default, as published) are :class:`AdapterParams`'."""

    lam: float = 0.1  # λ, weight of the collapse loss at the look-ahead point
    step_size: float = 0.1  # a, length of the simulated harmful step
    normalize_step: bool = True  # θ − a·g_h/(‖g_h‖ + 1e-7) (published) | θ − a·g_h
    gradient: str = "first_order"  # first_order (published) | exact (double backward)
    lookahead: str = "sgd"  # sgd (published) | sign | adam
    radii: list[float] | None = None  # several step sizes whose collapse gradients are averaged; None = [step_size]
    unroll_steps: int = 1  # simulated attack steps (published: 1)
    collapse_at: str = "last"  # last: ℓ_col where the unrolled attack ends (published) | every: mean over its steps
    adam_beta2: float = 0.999  # decay of the running E[g_h²] of lookahead=adam
    collapse_word: str = "error"
    collapse_token: str = "published"  # published: last token of "an error" | first: first token of " error"
    measure_lookahead: bool = True  # also log the harmful loss at θ' (one forward pass, not part of the objective)
    data: str = "retain"  # retain (published) | align_general (beyond the paper)
    num_samples: int | None = None  # harmful examples; None = the whole defense pool
    num_align: int | None = None  # retain: refusal/helpful pairs; align_general: alignment examples; None = all
    num_general: int | None = None  # align_general only: examples for the collapse loss; None = all
    # A trap where a real attack ends (beyond the paper; 0 = off): every attack_refresh steps, attack_steps AdamW
    # steps at attack_lr on the harmful batches of the last attack_steps defense steps give the displacement Δ of
    # an attacker's fine-tune; each step then adds attack_lam·∇ℓ_col(θ + Δ; D_gen) (first order, Δ held fixed).
    attack_steps: int = 0
    attack_lr: float = 3e-4
    attack_refresh: int = 20
    attack_lam: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"gradient": GRADIENTS, "lookahead": LOOKAHEADS, "data": CTRAP_DATA,
                   "collapse_token": COLLAPSE_RULES, "collapse_at": COLLAPSE_AT}
        for key, allowed in choices.items():
            check_choice(self, key, allowed)
        check_number(self, "lam")
        check_number(self, "step_size", low=0.0, low_open=True)
        check_number(self, "unroll_steps", low=1, integer=True)
        check_number(self, "attack_steps", low=0, integer=True)
        check_number(self, "attack_lr", low=0.0, low_open=True)
        check_number(self, "attack_refresh", low=1, integer=True)
        check_number(self, "attack_lam")
        check_number(self, "adam_beta2", low=0.0, high=1.0, low_open=True)
        for name in ("num_samples", "num_align", "num_general"):
            check_number(self, name, low=1, integer=True, optional=True)
        if self.radii is not None and (not self.radii or not all(isinstance(r, (int, float)) and r > 0
                                                                 for r in self.radii)):
            raise FieldError("radii", self.radii, "expected null or a non-empty list of positive step sizes")
        if self.data == "retain" and self.num_general is not None:
            raise FieldError("num_general", self.num_general, "with data=retain the collapse loss is planted on the "
                             "retain batch itself (set num_align, or data=align_general)")


ATTACK_PATH_FIELDS = ("attack_steps", "attack_lr", "attack_refresh", "attack_lam")


def ctrap_key_params(params: dict) -> dict:
    """``defense.params`` as the defense stage's cache key sees them: the attack-path fields left out while
    ``attack_steps`` is 0 (off), so that the entries cached before the option existed keep their keys."""
    if params.get("attack_steps", 0):
        return dict(params)
    return {k: v for k, v in params.items() if k not in ATTACK_PATH_FIELDS}


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


def attack_displacement(model: torch.nn.Module, batches: Sequence[Batch], steps: int, lr: float) -> TensorList:
    """Δ = θ_K − θ after K = ``steps`` AdamW steps (weight decay 0, as the attack stage) at ``lr`` on the response
    cross-entropy of ``batches``, taken in turn; the trainable parameters and their ``.grad`` are put back exactly.
    The simulated attacker of ``CtrapParams.attack_steps``: where a real fine-tune of the model ends."""
    params = trainable_parameters(model)
    saved_grads = [q.grad for q in params]
    start = [q.detach().clone() for q in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    try:
        for k in range(steps):
            for q in params:
                q.grad = None
            response_ce(model, batches[k % len(batches)]).backward()
            optimizer.step()
        with torch.no_grad():
            return [q.detach() - s for q, s in zip(params, start)]
    finally:
        with torch.no_grad():
            for q, s, g in zip(params, start, saved_grads):
                q.copy_(s)
                q.grad = g


# --------------------------------------------------------------------------------------------------------------
# One CTRAP step
# --------------------------------------------------------------------------------------------------------------


def ctrap_step(
    model: torch.nn.Module,
    align: Batch,
    harmful: Batch,
    general: Batch,
    p: CtrapParams = CtrapParams(),
    *,
    token_id: int,
    second_moment: SecondMoment | None = None,
    reduce_fn: ReduceFn | None = None,
    replicas: Sequence[torch.nn.Module] = (),
    displacement: TensorList | None = None,
) -> dict[str, float]:
    """Accumulate ∇ℓ(θ; D_align) + λ·∇_θ ℓ_col(θ'; D_gen) into ``p.grad``; return the step's stats.

    θ' is reached from θ by ``unroll_steps`` simulated attack steps of size a on the harmful batch (1 = the
    paper); with ``radii`` the collapse gradients of several sizes a are averaged (default: [step_size]);
    ``collapse_at="every"`` plants ℓ_col after each simulated step and averages over the steps (a trap along the
    whole simulated path instead of at its end).
    first_order uses ∇ℓ_col(θ') as the gradient at θ; exact adds −a·∇_θ⟨∇ℓ_col(θ'), d(θ)⟩ by double backward
    (lookahead "sgd", one step, single process). Extra memory: g_h and one saved copy of the weights,
    restored bit-for-bit. ``measure_lookahead`` also measures the harmful loss at θ' (one more forward pass).
    ``token_id`` is the collapse token e (:func:`collapse_token_id`), ``second_moment`` the running E[g_h²] of
    lookahead "adam", kept by the caller across steps.
    ``reduce_fn`` averages tensors across data-parallel ranks in place (applied to each harmful gradient that
    defines a step, and to ``.grad`` at the end). With :data:`selfdestruct.objectives.common.all_reduce_mean`
    (anything with a ``mean_values`` method) each rank also weights its three CEs by its share of the tokens and
    the stats are pooled, so the step equals the single-process step on the concatenated batch even when the
    ranks hold unequal numbers of labelled tokens. Raises :class:`NonFiniteGradientError` on NaN/inf.
    ``replicas``: copies of ``model`` (:func:`make_replicas`) on which the radii run concurrently, one thread per
    model; the step is bit-for-bit the sequential one (first-order, one process, fp32, no dropout).

    Stats: loss (ℓ_align + λ·ℓ_col), loss_align, loss_harmful (ℓ(θ; D_adv), whose gradient defines the step),
    loss_collapse (ℓ_col at θ', mean over radii and, with collapse_at="every", over the steps), norm_h (‖g_h‖);
    with ``measure_lookahead`` loss_harmful_lookahead (ℓ(θ'; D_adv)); with ``unroll_steps`` > 1
    loss_harmful_unrolled (the harmful loss where the last simulated step starts); with ``displacement`` (Δ of
    :func:`attack_displacement`, ``attack_steps`` > 0) loss_collapse_attack (ℓ_col at θ + Δ), and loss adds
    attack_lam times it.
    """
    _check_mode(p, reduce_fn, replicas)
    if displacement is not None and (reduce_fn is not None or p.gradient == "exact"):
        raise ValueError("the attack-path trap (attack_steps) supports gradient='first_order' in one process only")
    params = trainable_parameters(model)
    counts = [select_labels(b["labels"]).count for b in (harmful, general, align)]
    weights = _token_weights(reduce_fn, params, counts)
    harmful_loss, norm_h, step = _simulated_attack_step(model, params, harmful, p, second_moment, reduce_fn,
                                                        weights.harmful)
    trace = _add_collapse_gradients(model, params, harmful, general, step, p, token_id, second_moment, reduce_fn,
                                    weights, replicas)
    del step
    if p.gradient == "exact":  # −λ·∇_θ ⟨pull, d(θ)⟩ with pull held constant: the part of the chain rule through g_h
        _add_exact_correction(model, params, harmful, trace.pull, p)
    attack_collapse = None
    if displacement is not None:  # attack_lam·∇ℓ_col(θ + Δ; D_gen), taken as the gradient at θ
        with displaced(params):
            shift_(params, displacement, 1.0)
            attack_collapse = _plant_trap(model, params, general, token_id, p.attack_lam, weights.collapse, None, 0.0)
    align_loss = response_ce(model, align)
    add_gradient(align_loss, params, weights.align)
    average_grads(reduce_fn, params)
    stats = _ctrap_stats(value(align_loss), value(harmful_loss), norm_h, trace, counts, p, reduce_fn, params)
    if attack_collapse is not None:
        stats["loss"] += p.attack_lam * attack_collapse
        stats["loss_collapse_attack"] = attack_collapse
    check_finite("CTRAP", params, **stats)
    return stats


def _check_mode(p: CtrapParams, reduce_fn: ReduceFn | None, replicas: Sequence[torch.nn.Module] = ()) -> None:
    if p.gradient == "exact" and (p.lookahead != "sgd" or p.unroll_steps != 1 or reduce_fn is not None):
        raise ValueError("gradient='exact' supports lookahead='sgd', unroll_steps=1 and one process only")
    if replicas and (p.gradient == "exact" or reduce_fn is not None):
        raise ValueError("concurrent radii (replicas) support gradient='first_order' in one process only")
    if replicas and any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        raise ValueError("concurrent radii need precision 32-true: autocast is per thread, the branches would "
                         "run without it")


def make_replicas(model: torch.nn.Module, p: CtrapParams, threads: int) -> list[torch.nn.Module]:
    """Copies of ``model`` for running CTRAP's radii on ``threads`` threads (one fewer than the threads used, at
    most one per radius beyond the first); [] when there is nothing to run concurrently. Refuses what would make
    the concurrent step differ from the sequential one: random dropout, parameters other than fp32 (autocast is
    refused by :func:`ctrap_step`)."""
    n = min(threads, len(p.radii or [p.step_size])) - 1
    if n <= 0:
        return []
    if p.gradient == "exact":
        raise ValueError("concurrent radii need gradient='first_order' (the exact gradient sums one pull over radii)")
    dropout = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    dropout += ["attention_dropout"] if getattr(getattr(model, "config", None), "attention_dropout", 0) else []
    if dropout:
        raise ValueError(f"concurrent radii need a model without random dropout (found: {', '.join(dropout[:3])}): "
                         "the branches would draw their masks in a different order than one thread does")
    if any(q.dtype != torch.float32 for q in trainable_parameters(model)):
        raise ValueError("concurrent radii need fp32 trainable parameters (precision 32-true)")
    return [copy.deepcopy(model) for _ in range(n)]


@dataclass(frozen=True)
class _Weights:
    """This rank's token weights of the harmful, collapse and alignment CEs (1 without data parallelism).

    Each CE is a mean over this rank's tokens; scaling it by the rank's token share makes the rank average of the
    gradients the gradient over all tokens (see common.pooled)."""

    harmful: float = 1.0
    collapse: float = 1.0
    align: float = 1.0


def _token_weights(reduce_fn: ReduceFn | None, params, counts: list[int]) -> _Weights:
    device = params[0].device if params else torch.device("cpu")
    pool = pooled(reduce_fn, device, [(n, 0.0) for n in counts])
    return _Weights() if pool is None else _Weights(*(w for w, _ in pool))


def _simulated_attack_step(model, params, harmful: Batch, p: CtrapParams, second_moment: SecondMoment | None,
                           reduce_fn: ReduceFn | None, w_h: float) -> tuple[torch.Tensor, float, Lookahead]:
    """ℓ(θ; D_adv), ‖g_h‖ and the simulated attacker's step. g_h is averaged across ranks before it is normalised
    and stepped along, so every rank reaches the same θ'."""
    harmful_loss = response_ce(model, harmful)
    grads = gradient(scaled(harmful_loss, w_h), params)
    if reduce_fn is not None:
        reduce_fn(grads)
    norm_h = norm(grads)
    if second_moment is not None and p.lookahead == "adam":
        second_moment.update(grads)
    return harmful_loss, norm_h, lookahead_step(grads, p.lookahead, p.normalize_step, second_moment)


@dataclass
class _CollapseTrace:
    """What the look-ahead points gave: ℓ_col, the harmful loss at θ' and where the last step started (per radius),
    and, for the exact gradient, pull = Σ_r (r/R)·∇ℓ_col(θ'_r)."""

    collapse: list[float]
    after: list[float]
    trail: list[float]
    pull: TensorList | None


def _add_collapse_gradients(model, params, harmful: Batch, general: Batch, step: Lookahead, p: CtrapParams,
                            token_id: int, second_moment: SecondMoment | None, reduce_fn: ReduceFn | None,
                            weights: _Weights, replicas: Sequence[torch.nn.Module] = ()) -> _CollapseTrace:
    """λ/R · Σ_r ∇ℓ_col(θ'_r; D_gen) into ``.grad``, θ'_r reached with step size r; the weights are restored.

    With ``collapse_at="every"`` the term of radius r is the mean over the simulated steps k = 1..K of
    ∇ℓ_col(θ_r,k), θ_r,k the point after k steps. With ``replicas`` the radii are split into contiguous runs, the
    first run on ``model``, each other on a replica (set to θ here) in a thread of its own; their gradients are
    added to ``.grad`` in the order of the radii, so ``.grad`` and the trace equal the sequential ones bit for bit.
    """
    radii = [p.step_size] if p.radii is None else [float(r) for r in p.radii]
    every = p.collapse_at == "every"
    weight = p.lam / len(radii) / (p.unroll_steps if every else 1)
    pull = [torch.zeros_like(q) for q in params] if p.gradient == "exact" else None
    runs = _contiguous(radii, 1 + len(replicas))
    copies = [_set_to(replica, params) for replica in replicas[: len(runs) - 1]]

    def branch(i: int) -> tuple[_CollapseTrace, list[TensorList]]:
        m, ps = (model, params) if i == 0 else (replicas[i - 1], copies[i - 1])
        part, kept = _CollapseTrace([], [], [], pull), None if i == 0 else []
        with displaced(ps) as restore:
            for radius in runs[i]:
                _radius_branch(m, ps, harmful, general, step, radius, p, token_id, second_moment, reduce_fn,
                               weights, weight, radius / len(radii), part, kept)
                restore()
        return part, kept

    trace = _CollapseTrace([], [], [], pull)
    for part, kept in run_concurrently([lambda i=i: branch(i) for i in range(len(runs))]):
        trace.collapse += part.collapse
        trace.after += part.after
        trace.trail += part.trail
        for grads in kept or ():
            _accumulate(params, grads)
    return trace


def _radius_branch(model, params, harmful: Batch, general: Batch, step: Lookahead, radius: float, p: CtrapParams,
                   token_id: int, second_moment: SecondMoment | None, reduce_fn: ReduceFn | None, weights: _Weights,
                   weight: float, pull_weight: float, trace: _CollapseTrace, kept: list[TensorList] | None) -> None:
    """Radius r's collapse gradients: into ``.grad``, or (``kept`` a list) each one appended to ``kept`` as taken
    from a fresh ``.grad``; ℓ_col's mean, and the measured harmful losses, go into ``trace``."""
    shift_(params, step.direction, -radius * step.scale)
    every = p.collapse_at == "every"
    collapse = []
    for depth in range(1, p.unroll_steps + 1):
        last = depth == p.unroll_steps
        if depth > 1:
            _attack_step(model, params, harmful, radius, p, second_moment, reduce_fn, weights.harmful,
                         trace if last else None)
        if last and p.measure_lookahead:
            with torch.no_grad():
                trace.after.append(value(response_ce(model, harmful)))
        if every or last:
            collapse.append(_plant_trap(model, params, general, token_id, weight, weights.collapse, trace.pull,
                                        pull_weight))
            if kept is not None:
                kept.append([q.grad for q in params])
                for q in params:
                    q.grad = None
    trace.collapse.append(sum(collapse) / len(collapse))


def _contiguous(items: list, parts: int) -> list[list]:
    """``items`` in at most ``parts`` contiguous runs of (nearly) equal length, in order."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def _set_to(replica: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Copy θ into the replica's trainable parameters (its frozen ones equal the model's); returns them."""
    copies = trainable_parameters(replica)
    if len(copies) != len(params) or any(c.shape != q.shape or c.dtype != q.dtype or c.device != q.device
                                         for c, q in zip(copies, params)):
        raise ValueError("a CTRAP replica must be a copy of the model (same trainable parameters, dtypes, device)")
    with torch.no_grad():
        for c, q in zip(copies, params):
            c.copy_(q)
            c.grad = None
    return copies


def _accumulate(params: Sequence[torch.nn.Parameter], grads: TensorList) -> None:
    """``.grad += g`` as backward accumulates (``.grad = g`` when there is none yet)."""
    with torch.no_grad():
        for q, g in zip(params, grads, strict=True):
            if g is None:
                continue
            if q.grad is None:
                q.grad = g
            else:
                q.grad.add_(g)


def _plant_trap(model, params, general: Batch, token_id: int, weight: float, w_col: float,
                pull: TensorList | None, pull_weight: float) -> float:
    """weight·∇ℓ_col(θ; D_gen) at the current point into ``.grad``; returns ℓ_col. For the exact gradient
    (``pull`` given) ∇ℓ_col also goes into ``pull`` with ``pull_weight``."""
    col = collapse_loss(model, general, token_id)
    if pull is None:
        add_gradient(col, params, weight * w_col)
        return value(col)
    v = gradient(col, params)
    add_to_grads(params, v, weight)
    for acc, vi in zip(pull, v):
        acc.add_(vi, alpha=pull_weight)
    return value(col)


def _attack_step(model, params, harmful: Batch, radius: float, p: CtrapParams, second_moment: SecondMoment | None,
                 reduce_fn: ReduceFn | None, w_h: float, trace: _CollapseTrace | None) -> None:
    """One more simulated attack step (2..unroll_steps) on the harmful gradient where the previous one ended;
    ``trace`` (the last step) records the harmful loss where it starts."""
    loss_j = response_ce(model, harmful)
    if trace is not None:
        trace.trail.append(value(loss_j))
    g_j = gradient(scaled(loss_j, w_h), params)
    if reduce_fn is not None:
        reduce_fn(g_j)
    s_j = lookahead_step(g_j, p.lookahead, p.normalize_step, second_moment)
    shift_(params, s_j.direction, -radius * s_j.scale)
    del g_j, s_j


def _add_exact_correction(model, params, harmful: Batch, pull: TensorList, p: CtrapParams) -> None:
    """−λ·∇_θ⟨pull, d(θ)⟩, d = g_h (or g_h/‖g_h‖), by double backward with eager attention."""
    with eager_attention(model):
        g_h = gradient(response_ce(model, harmful), params, create_graph=True)
        inner = sum((a * g).sum() for a, g in zip(pull, g_h))
        if p.normalize_step:
            inner = inner / torch.sqrt(sum((g * g).sum() for g in g_h))
        add_gradient(inner, params, -p.lam)


def _ctrap_stats(loss_align: float, loss_harmful: float, norm_h: float, trace: _CollapseTrace, counts: list[int],
                 p: CtrapParams, reduce_fn: ReduceFn | None, params) -> dict[str, float]:
    """The step's stats; with a pooling ``reduce_fn`` every rank reports the values on the whole batch."""
    collapse, after, trail = trace.collapse, trace.after, trace.trail
    n_h, n_col, n_align = counts
    device = params[0].device if params else torch.device("cpu")
    pool = pooled(reduce_fn, device, [(n_align, loss_align), (n_h, loss_harmful)]
                  + [(n_col, c) for c in collapse] + [(n_h, a) for a in after] + [(n_h, t) for t in trail])
    if pool is not None:
        values = [v for _, v in pool]
        loss_align, loss_harmful = values[0], values[1]
        collapse, values = values[2 : 2 + len(collapse)], values[2 + len(collapse) :]
        after, trail = values[: len(after)], values[len(after) :]
    collapse_mean = sum(collapse) / len(collapse)
    stats = {
        "loss": loss_align + p.lam * collapse_mean,
        "loss_align": loss_align,
        "loss_harmful": loss_harmful,
        "loss_collapse": collapse_mean,
        "norm_h": norm_h,
    }
    if after:
        stats["loss_harmful_lookahead"] = sum(after) / len(after)
    if trail:
        stats["loss_harmful_unrolled"] = sum(trail) / len(trail)
    return stats
