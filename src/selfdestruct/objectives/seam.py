"""SEAM's objective (SPEC §3): L = L_ul + α·L_up + β·L_sd, and the gradient one optimiser step applies.

- L_ul: gradient ascent on the harmful batch through a log barrier, over the final logits and the logit lens of
  every hidden state (the published arithmetic: L+2 cross-entropies divided by L+1).
- L_up: cross-entropy of the refusals to the same harmful prompts.
- L_sd = cos(g_a, g_b), g_a the attacker's gradient (harmful batch) and g_b the benign gradient. Its gradient
  needs Hessian-vector products; SEAM replaces them by finite differences of gradients ("forward", the paper's
  one-sided scheme, error O(ε)); "central" differences cost two more gradient evaluations for O(ε²); "exact"
  differentiates cos(g_a, g_b) by double backward (small models only, eager attention).
- ``coupling="sign"`` (beyond the paper): L_sd = cos(sign g_a, g_b). An AdamW attacker's first steps move every
  coordinate by about lr·sign(g_a), so the benign loss changes by about −lr·g_b·sign(g_a): this is the cosine that
  decides whether such a step hurts the benign task. sign g_a is piecewise constant, so only H_b is left in the
  gradient: ∇L_sd = H_b(ŝ − c·ĝ_b)/‖g_b‖ with ŝ = sign g_a/‖sign g_a‖, one finite difference.

The functions accumulate into ``p.grad`` like ``loss.backward()`` would, so a caller zeroes the gradients,
calls :func:`seam_step`, and steps its optimiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from selfdestruct.errors import check_choice, check_number
from selfdestruct.objectives.common import (
    IGNORE_INDEX,
    LOW_PRECISION,
    NonFiniteGradientError,
    ReduceFn,
    TensorList,
    TokenSelection,
    add_gradient,
    add_to_grads,
    average_grads,
    check_finite,
    displaced,
    dot,
    eager_attention,
    forward,
    gradient,
    norm,
    pooled,
    rows,
    rows_ce,
    scaled,
    select_labels,
    shift_,
    snapshot,
    stashed_grads,
    trainable_parameters,
    value,
)

Batch = dict[str, torch.Tensor]
ESTIMATORS = ("forward", "central", "exact")
COUPLINGS = ("gradient", "sign")
BENIGN_DATA = ("tasks", "general", "both")


@dataclass(frozen=True)
class SeamParams:
    """SEAM's hyper-parameters and data sizes: ``params`` of ``conf/defense/seam.yaml``, where each value's source is.

    The one declaration of every SEAM setting: the config is checked against it, the stage passes it whole to the
    shared defense module, which passes it to :func:`seam_step`.
    """

    alpha: float = 1.0  # α, weight of L_up
    beta: float = 0.01  # β, weight of L_sd = cos(g_a, g_b)
    eps: float = 1e-3  # ε, finite-difference radius of the Hessian-free estimate
    estimator: str = "forward"  # forward | central | exact
    coupling: str = "gradient"  # gradient: L_sd = cos(g_a, g_b) (paper) | sign: cos(sign g_a, g_b) (beyond the paper)
    official_masking: bool = False  # the published loss masks instead of the response-token labels
    benign_weight: float = 0.0  # γ, benign cross-entropy added to utility preservation (beyond the paper)
    benign_data: str = "tasks"  # D_bgn: tasks (paper: instruction/answer pairs) | general (plain text) | both
    num_samples: int | None = None  # harmful/refusal pairs; None = the whole defense pool
    num_benign: int | None = None  # benign examples; None = as many as num_samples (the official code)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "benign_weight"):
            check_number(self, name)
        check_number(self, "eps", low=0.0, low_open=True)
        check_choice(self, "estimator", ESTIMATORS)
        check_choice(self, "coupling", COUPLINGS)
        check_choice(self, "benign_data", BENIGN_DATA)
        check_number(self, "num_samples", low=1, integer=True, optional=True)
        check_number(self, "num_benign", low=1, integer=True, optional=True)


# --------------------------------------------------------------------------------------------------------------
# Which tokens each loss sees
# --------------------------------------------------------------------------------------------------------------


def official_mask(harmful_ids: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """Positions where the paired harmful and refusal sequences differ (the published code's loss mask).

    The pair must be aligned position by position (same prompt, same padded width), otherwise the mask is
    meaningless; a shape mismatch is refused.
    """
    if harmful_ids.shape != refusal_ids.shape:
        raise ValueError(
            f"official_masking compares the harmful and refusal batches position by position: shapes "
            f"{tuple(harmful_ids.shape)} and {tuple(refusal_ids.shape)} differ (pad both to the same width)"
        )
    return harmful_ids != refusal_ids


def official_selection(labels: torch.Tensor, mask: torch.Tensor) -> TokenSelection:
    """The published masked cross-entropy as a row selection.

    Labels are multiplied by the mask and label id 0 is ignored (so masked positions, and any real token 0,
    drop out); the logits at position t are multiplied by mask[t], so a kept target whose predecessor is a
    shared position is scored against all-zero logits (a constant log V with no gradient), as published.
    The published labels are a copy of input_ids; with -100 on prompt and padding, as here, the selection is
    the same whenever the pair shares its prompt and the padding id is 0.
    """
    masked = labels * mask.to(labels.dtype)
    shifted = masked[:, 1:]
    keep = (shifted != 0) & (shifted != IGNORE_INDEX)
    b, t = torch.nonzero(keep, as_tuple=True)
    return TokenSelection(batch_idx=b, pos_idx=t, targets=shifted[b, t], row_scale=mask[:, :-1][b, t].float())


def plain_selection(batch: Batch) -> TokenSelection:
    """Every non-padding token as a target: the published code's benign loss (prompt tokens included)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return select_labels(labels)


@dataclass(frozen=True)
class SeamSelections:
    """The token selection of the harmful (D_adv), refusal (D_aln) and benign (D_bgn) batch."""

    harmful: TokenSelection
    refusal: TokenSelection | None
    benign: TokenSelection


def seam_selections(
    harmful: Batch, benign: Batch, refusal: Batch | None = None, official_masking: bool = False
) -> SeamSelections:
    """SPEC's response-token labels by default; the published masking with ``official_masking=True``."""
    if not official_masking:
        return SeamSelections(
            harmful=select_labels(harmful["labels"]),
            refusal=None if refusal is None else select_labels(refusal["labels"]),
            benign=select_labels(benign["labels"]),
        )
    if refusal is None:
        raise ValueError("official_masking needs the refusal batch paired with the harmful batch")
    mask = official_mask(harmful["input_ids"], refusal["input_ids"])
    return SeamSelections(
        harmful=official_selection(harmful["labels"], mask),
        refusal=official_selection(refusal["labels"], mask),
        benign=plain_selection(benign),
    )


# --------------------------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------------------------


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's last normalisation layer, applied to every hidden state by the logit lens (through peft's
    LoRA wrapper too)."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = plain.base_model
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"cannot find the final norm of {type(model).__name__}; the logit lens needs it")


def ensure_hidden_state_capture(model: torch.nn.Module) -> None:
    """Make ``output_hidden_states=True`` work on a model unpickled in a fresh process (Lightning's ``ddp_spawn``).

    transformers ≥ 5 collects hidden states with hooks configured from a per-class registry that
    ``PreTrainedModel.__init__`` fills; a spawned worker receives the model by unpickling, ``__init__`` never runs
    there, and the model silently returns ``hidden_states=None``. Registering the classes again fixes it (a no-op
    in the process that built the model, and with transformers versions without the registry).
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:
        return
    if registry.get(model):
        return
    for module in model.modules():
        flags = getattr(module, "_can_record_outputs", None)
        if flags and not registry.get(module):
            registry[module] = flags


@dataclass
class UnlearningTerms:
    """L_ul and its parts from one forward pass; ``attack_ce`` is the first term of S and the loss of g_a."""

    loss: torch.Tensor
    s: torch.Tensor
    attack_ce: torch.Tensor
    num_hidden_states: int


def unlearning_terms(model: torch.nn.Module, harmful: Batch, sel: TokenSelection | None = None) -> UnlearningTerms:
    """L_ul = −log(S/(L+1) + 1), S = CE(final logits) + Σ over all L+1 hidden states h of CE(head(norm(h))).

    The last hidden state of HF Llama is already normed and is normed again, as the published code does;
    S has L+2 terms over L+1. One forward pass; ``attack_ce`` shares its graph, so g_a costs one more backward.
    """
    sel = select_labels(harmful["labels"]) if sel is None else sel
    ensure_hidden_state_capture(model)
    out = forward(model, harmful, hidden_states=True)
    if out.hidden_states is None:
        raise ValueError(f"{type(model).__name__} returned no hidden states; L_ul needs the logit lens of each one")
    attack_ce = rows_ce(rows(out.logits, sel), sel)
    head = model.get_output_embeddings()
    lens_norm = final_norm(model)
    s = attack_ce
    for h in out.hidden_states:
        s = s + rows_ce(head(lens_norm(rows(h, sel)).to(head.weight.dtype)), sel)
    n = len(out.hidden_states)
    return UnlearningTerms(loss=-torch.log(s / n + 1.0), s=s, attack_ce=attack_ce, num_hidden_states=n)


def unlearning_loss(model: torch.nn.Module, harmful: Batch, sel: TokenSelection | None = None) -> torch.Tensor:
    """L_ul alone (see :func:`unlearning_terms`)."""
    return unlearning_terms(model, harmful, sel).loss


def masked_ce(model: torch.nn.Module, batch: Batch, sel: TokenSelection) -> torch.Tensor:
    """Cross-entropy of ``batch`` over a given selection: L_up (refusals), the g_a and g_b losses."""
    return rows_ce(rows(forward(model, batch).logits, sel), sel)


def cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """cos(a, b) of two gradient lists as a differentiable scalar (exact mode)."""
    ab = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    aa = sum((x * x).sum() for x in a)
    bb = sum((y * y).sum() for y in b)
    return ab / (aa.sqrt() * bb.sqrt())


def signs(grads: Sequence[torch.Tensor]) -> TensorList:
    """sign g of a gradient list, a constant (no graph): the direction of an AdamW attacker's first steps."""
    return [torch.sign(g.detach()) for g in grads]


# --------------------------------------------------------------------------------------------------------------
# The gradient of L_sd
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coupling:
    """‖g_a‖, ‖g_b‖ and cos(g_a, g_b) of two gradient snapshots."""

    norm_a: float
    norm_b: float
    cos: float

    @staticmethod
    def of(ga: TensorList, gb: TensorList) -> Coupling:
        na, nb = norm(ga), norm(gb)
        cos = dot(ga, gb) / (na * nb) if na > 0 and nb > 0 else float("nan")
        return Coupling(na, nb, cos)

    def check(self) -> None:
        values = (self.norm_a, self.norm_b, self.cos)
        if not all(math.isfinite(v) for v in values) or self.norm_a == 0 or self.norm_b == 0:
            raise NonFiniteGradientError(
                f"SEAM: cos(g_a, g_b) is undefined (|g_a|={self.norm_a:.4g}, |g_b|={self.norm_b:.4g}, "
                f"cos={self.cos:.4g}); stopping before the model is saved"
            )


def add_sd_estimate(
    params: Sequence[torch.nn.Parameter],
    loss_a: Callable[[], torch.Tensor],
    loss_b: Callable[[], torch.Tensor],
    ga: TensorList,
    gb: TensorList,
    coupling: Coupling,
    eps: float,
    scheme: str = "forward",
    coef: float = 1.0,
    fixed_a: bool = False,
) -> None:
    """Accumulate ``coef`` × the Hessian-free estimate of ∇cos(g_a, g_b) into ``p.grad``.

    ∇cos = H_a(ĝ_b − c·ĝ_a)/‖g_a‖ + H_b(ĝ_a − c·ĝ_b)/‖g_b‖, each Hessian-vector product replaced by a difference
    of gradients along that direction (SPEC §3): "forward" uses (g(θ + εd) − g(θ))/ε with the snapshots
    ``ga``/``gb`` as g(θ); "central" uses (g(θ + εd) − g(θ − εd))/(2ε). The weights are restored bit-for-bit
    from one saved copy; ``loss_a``/``loss_b`` recompute the two losses at the current weights.
    ``fixed_a``: ``ga`` does not depend on the weights (sign g_a of ``coupling="sign"``), so the H_a term is
    dropped and ``loss_a`` is never called.

    Data parallelism: ``ga``/``gb`` are then the rank-averaged gradients, so every rank moves to the same
    points. The gradients there are rank-local: each rank adds k·(g_r(θ') − ḡ(θ)) to ``.grad`` and the caller's
    final average of ``.grad`` makes it k·(ḡ(θ') − ḡ(θ)), exactly, by linearity and without extra communication.
    The per-rank terms are O(1/ε) larger than their mean, so their rounding in ``.grad`` costs about as many
    digits as the difference itself does in fp32 (measured: 2 ranks vs 1 agree to 3e-5 in fp32, 1e-16 in fp64).
    With bf16 weights the perturbation itself is the weak point (at ε = 1e-3 most entries of a bf16 weight do
    not move at all), one process or several: keep fp32 master weights for SEAM.
    """
    if scheme not in ("forward", "central"):
        raise ValueError(f"scheme={scheme!r}: expected 'forward' or 'central'")
    na, nb, c = coupling.norm_a, coupling.norm_b, coupling.cos
    # (loss, its snapshot, its norm, direction as two weighted gradient lists)
    terms = (
        (loss_a, ga, na, ((gb, 1.0 / nb), (ga, -c / na))),
        (loss_b, gb, nb, ((ga, 1.0 / na), (gb, -c / nb))),
    )[1 if fixed_a else 0:]
    low = any(p.dtype in LOW_PRECISION for p in params)
    with displaced(params) as restore:
        for loss_fn, g0, n, direction in terms:
            k = coef / (eps * n)
            for vec, w in direction:
                shift_(params, vec, eps * w)
            if scheme == "forward":
                add_gradient(loss_fn(), params, k, minus=g0)
                restore()
                continue
            k = k / 2.0
            if low:  # difference the two gradients in fp32, not in the low-precision .grad
                plus = snapshot(gradient(loss_fn(), params))
            else:
                add_gradient(loss_fn(), params, k)
            restore()
            for vec, w in direction:
                shift_(params, vec, -eps * w)
            if low:
                add_gradient(loss_fn(), params, -k, minus=plus)
                del plus
            else:
                add_gradient(loss_fn(), params, -k)
            restore()


def sd_gradient(
    model: torch.nn.Module,
    harmful: Batch,
    benign: Batch,
    p: SeamParams = SeamParams(),
    *,
    refusal: Batch | None = None,
) -> tuple[TensorList, dict[str, float]]:
    """∇L_sd = ∇cos(g_a, g_b) alone (estimated or exact), e.g. to check the estimator; ``.grad`` is untouched.

    Uses ``p.eps``, ``p.estimator``, ``p.coupling`` and ``p.official_masking``. Returns one tensor per trainable
    parameter and {"norm_a", "norm_b", "cos"} of the coupled pair (sign g_a and g_b for ``coupling="sign"``).
    """
    eps, estimator = p.eps, p.estimator
    _check_estimator(estimator, eps)
    params = trainable_parameters(model)
    sels = seam_selections(harmful, benign, refusal, p.official_masking)
    exact = estimator == "exact"
    with stashed_grads(params), eager_attention(model) if exact else nullcontext():
        ga = gradient(masked_ce(model, harmful, sels.harmful), params, create_graph=exact)
        gb = gradient(masked_ce(model, benign, sels.benign), params, create_graph=exact)
        if p.coupling == "sign":
            ga = signs(ga)
        coupling = Coupling.of(snapshot(ga), snapshot(gb))
        coupling.check()
        _add_coupling_gradient(model, params, harmful, benign, sels, ga, gb, coupling, eps, estimator, 1.0,
                               fixed_a=p.coupling == "sign")
        result = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    if not all(bool(torch.isfinite(r).all()) for r in result):
        raise NonFiniteGradientError(f"SEAM: the {estimator} estimate of grad cos(g_a, g_b) is not finite (eps={eps})")
    return result, {"norm_a": coupling.norm_a, "norm_b": coupling.norm_b, "cos": coupling.cos}


def _add_coupling_gradient(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    harmful: Batch,
    benign: Batch,
    sels: SeamSelections,
    ga: TensorList,
    gb: TensorList,
    coupling: Coupling,
    eps: float,
    estimator: str,
    coef: float,
    weights: tuple[float, float] = (1.0, 1.0),
    fixed_a: bool = False,
) -> None:
    """``coef``·∇cos(g_a, g_b) into ``.grad``: double backward through the graphs of ``ga``/``gb`` (exact),
    or the finite-difference estimate with ``ga``/``gb`` as the gradients at the current weights (``fixed_a``:
    ``ga`` is a constant, sign g_a).

    ``weights`` are this rank's token weights of the harmful and benign CE (data parallelism, see
    :func:`selfdestruct.objectives.common.pooled`), applied to the losses at the perturbed points as they were
    to ``ga``/``gb``."""
    if estimator == "exact":
        add_gradient(cosine(ga, gb), params, coef)
        return
    w_a, w_b = weights
    add_sd_estimate(
        params,
        lambda: scaled(masked_ce(model, harmful, sels.harmful), w_a),
        lambda: scaled(masked_ce(model, benign, sels.benign), w_b),
        snapshot(ga),
        snapshot(gb),
        coupling,
        eps,
        estimator,
        coef,
        fixed_a,
    )


def _check_estimator(estimator: str, eps: float) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: expected one of {ESTIMATORS}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps}: the finite-difference step must be a positive number")


# --------------------------------------------------------------------------------------------------------------
# One SEAM step
# --------------------------------------------------------------------------------------------------------------


def seam_step(
    model: torch.nn.Module,
    harmful: Batch,
    refusal: Batch,
    benign: Batch,
    p: SeamParams = SeamParams(),
    *,
    reduce_fn: ReduceFn | None = None,
) -> dict[str, float]:
    """Accumulate ∇L_ul + α∇L_up + β·(∇L_sd estimate) [+ γ∇CE(benign)] into ``p.grad``; return the step's stats.

    Cost (forward scheme): one harmful forward shared by L_ul and g_a (two backward passes), one refusal and one
    benign forward/backward, two gradient evaluations at perturbed weights. Extra memory: the snapshots g_a and
    g_b (at least fp32) and one saved copy of the weights; the weights are restored bit-for-bit.
    ``benign_weight`` γ (beyond the paper, 0 = off) adds γ·CE(benign) to the utility term, reusing g_b.
    ``reduce_fn`` (data parallelism) averages a list of tensors across ranks in place; it is applied to g_a and
    g_b before they define the perturbation, so every rank perturbs identically, and to ``.grad`` at the end.
    With :data:`selfdestruct.objectives.common.all_reduce_mean` (anything with a ``mean_values`` method) the step
    is the single-process step on the concatenated batch, unequal token counts included: every CE is weighted by
    the rank's share of the tokens, L_ul's derivative uses the pooled S, and the stats are pooled too, so every
    rank reports the same numbers. A plain callable only averages the gradient lists (per-rank means, per-rank S).
    With β = 0 the coupling gradient is skipped entirely (g_a, g_b and cos are still measured for the stats).
    Raises :class:`NonFiniteGradientError` if any term is NaN/inf; the weights are restored first.

    Stats: loss (the objective's value), loss_ul, s_ul (the S inside L_ul), loss_up, loss_sd (cos of the coupled
    pair: = cos, or cos(sign g_a, g_b) with ``coupling="sign"``),
    ce_harmful (the loss of g_a), ce_benign (the loss of g_b), norm_a, norm_b, cos.
    """
    _check_estimator(p.estimator, p.eps)
    exact = p.estimator == "exact"
    if exact and reduce_fn is not None:
        raise ValueError("estimator='exact' is single-process only (double backward through per-rank gradients)")
    params = trainable_parameters(model)
    sels = seam_selections(harmful, benign, refusal, p.official_masking)
    with eager_attention(model) if exact else nullcontext():
        ul, ga = _add_unlearning(model, params, harmful, sels, reduce_fn, exact)  # ∇L_ul, and g_a
        up = masked_ce(model, refusal, sels.refusal)
        if p.alpha != 0.0:
            add_gradient(up, params, p.alpha * ul.w_up)  # α∇L_up
        ce_b = masked_ce(model, benign, sels.benign)
        gb = gradient(scaled(ce_b, ul.w_b), params, create_graph=exact)  # g_b
        coupling, term = _add_coupling(model, params, harmful, benign, sels, ga, gb, p, reduce_fn,
                                       (ul.w_h, ul.w_b))
        del ga, gb
    average_grads(reduce_fn, params)
    stats = _seam_stats(ul, value(up), value(ce_b), coupling, term.cos, sels, p, reduce_fn, params)
    check_finite("SEAM", params, **{k: v for k, v in stats.items() if k != "loss_sd"})
    return stats


@dataclass
class _Unlearning:
    """L_ul's values on the whole batch (pooled across ranks) and this rank's token weights of the three CEs."""

    loss_ul: float
    s_ul: float
    ce_harmful: float
    w_h: float = 1.0
    w_up: float = 1.0
    w_b: float = 1.0


def _add_unlearning(model, params, harmful: Batch, sels: SeamSelections, reduce_fn: ReduceFn | None,
                    exact: bool) -> tuple[_Unlearning, TensorList]:
    """Add ∇L_ul to ``.grad``; return L_ul's values and g_a = ∇CE(harmful), both from one forward pass.

    Data parallelism: L_ul is nonlinear in S, so the rank-average of per-rank ∇L_ul is not ∇L_ul of the whole
    batch. S is pooled over every rank's harmful tokens first, then dL_ul/dS = −1/(S + L+1) at the pooled S is
    applied to this rank's token-weighted ∇S; the final average of ``.grad`` completes the exact gradient.
    """
    device = params[0].device if params else torch.device("cpu")
    terms = unlearning_terms(model, harmful, sels.harmful)
    ul = _Unlearning(loss_ul=value(terms.loss), s_ul=value(terms.s), ce_harmful=value(terms.attack_ce))
    pool = pooled(reduce_fn, device, [(sels.harmful.count, ul.s_ul), (sels.harmful.count, ul.ce_harmful),
                                      (sels.refusal.count, 0.0), (sels.benign.count, 0.0)])
    if pool is not None:
        (ul.w_h, ul.s_ul), (_, ul.ce_harmful), (ul.w_up, _), (ul.w_b, _) = pool
        ul.loss_ul = -math.log(ul.s_ul / terms.num_hidden_states + 1.0)
    ga = gradient(scaled(terms.attack_ce, ul.w_h), params, retain_graph=True, create_graph=exact)
    if pool is None:
        add_gradient(terms.loss, params, 1.0, retain_graph=exact)
    else:
        add_gradient(terms.s, params, -ul.w_h / (ul.s_ul + terms.num_hidden_states))
    return ul, ga


def _add_coupling(model, params, harmful: Batch, benign: Batch, sels: SeamSelections, ga: TensorList,
                  gb: TensorList, p: SeamParams, reduce_fn: ReduceFn | None,
                  weights: tuple[float, float]) -> tuple[Coupling, Coupling]:
    """[γ·g_b +] β·∇L_sd into ``.grad``; return ‖g_a‖, ‖g_b‖ and cos of the rank-averaged g_a, g_b, and the same
    of the pair L_sd couples (the first again for ``coupling="gradient"``, sign g_a and g_b for "sign")."""
    exact = p.estimator == "exact"
    ga_s, gb_s = snapshot(ga), snapshot(gb)
    if p.benign_weight != 0.0:
        add_to_grads(params, gb_s, p.benign_weight)  # this rank's share; averaged with .grad at the end
    if reduce_fn is not None:
        # g_a and g_b define the cosine, the norms and the perturbation: global averages, identical everywhere
        reduce_fn(ga_s)
        reduce_fn(gb_s)
    coupling = Coupling.of(ga_s, gb_s)
    coupling.check()
    term = coupling
    if p.coupling == "sign":  # L_sd = cos(sign g_a, g_b): sign g_a is the same constant for exact and estimates
        ga_s = ga = signs(ga_s)
        term = Coupling.of(ga_s, gb_s)
        term.check()
    if p.beta != 0.0:
        if not exact:
            ga, gb = ga_s, gb_s  # drop the references to the raw autograd outputs
        _add_coupling_gradient(model, params, harmful, benign, sels, ga, gb, term, p.eps, p.estimator, p.beta,
                               weights, fixed_a=p.coupling == "sign")
    return coupling, term


def _seam_stats(ul: _Unlearning, loss_up: float, ce_benign: float, coupling: Coupling, loss_sd: float,
                sels: SeamSelections, p: SeamParams, reduce_fn: ReduceFn | None, params) -> dict[str, float]:
    """The step's stats, every rank's values pooled into the whole batch's when ``reduce_fn`` can pool."""
    device = params[0].device if params else torch.device("cpu")
    pool = pooled(reduce_fn, device, [(sels.refusal.count, loss_up), (sels.benign.count, ce_benign)])
    if pool is not None:
        (_, loss_up), (_, ce_benign) = pool
    return {
        "loss": ul.loss_ul + p.alpha * loss_up + p.beta * loss_sd + p.benign_weight * ce_benign,
        "loss_ul": ul.loss_ul,
        "s_ul": ul.s_ul,
        "loss_up": loss_up,
        "loss_sd": loss_sd,
        "ce_harmful": ul.ce_harmful,
        "ce_benign": ce_benign,
        "norm_a": coupling.norm_a,
        "norm_b": coupling.norm_b,
        "cos": coupling.cos,
    }
