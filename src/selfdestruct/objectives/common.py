"""Building blocks shared by the SEAM and CTRAP objectives.

Everything here works on any Hugging Face causal LM and on batches ``{"input_ids", "attention_mask", "labels"}``
(right padding, labels unshifted, -100 on prompt and padding). Gradients are handled as lists of tensors, one
per trainable parameter, so no flat copy of the model is ever made.

Memory discipline: the objectives add a gradient into ``p.grad`` by calling ``backward`` on a scaled loss
whenever the parameters are fp32/fp64, so no transient gradient buffer is allocated; low-precision models take
an explicit fp32 path (see :func:`add_gradient`), because a difference of two nearby gradients computed in
bf16/fp16 loses every significant digit.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOW_PRECISION = (torch.float16, torch.bfloat16)

TensorList = list[torch.Tensor]
ReduceFn = Callable[[TensorList], None]


ADAPTERS = ("lora", "full")


@dataclass(frozen=True)
class AdapterParams:
    """Which parameters a defense trains: LoRA adapters (merged into the weights when the model is saved) or all.

    The base of the parameter dataclass of every defense that offers both; the defaults are the published CTRAP
    code's, which trains its method and every baseline with these adapters (train.py: r 32, lora_alpha 4, dropout
    0, q/k/v projections).
    """

    adapter: str = "lora"  # lora | full
    lora_rank: int = 32
    lora_alpha: int = 4
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

    def __post_init__(self) -> None:
        from selfdestruct.errors import check_choice, check_number

        check_choice(self, "adapter", ADAPTERS)
        check_number(self, "lora_rank", low=1, integer=True)
        check_number(self, "lora_alpha", low=0.0, low_open=True)
        check_number(self, "lora_dropout", low=0.0, high=0.99)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))


class NonFiniteGradientError(ValueError):
    """A gradient, a gradient estimate or a loss became NaN/inf: the step must stop before the model is saved."""


# --------------------------------------------------------------------------------------------------------------
# Parameters and gradient lists
# --------------------------------------------------------------------------------------------------------------


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the objectives differentiate and perturb (tied weights appear once)."""
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(grads: Sequence[torch.Tensor]) -> TensorList:
    """Detached gradients kept in at least fp32: differences of nearby gradients need the extra digits."""
    return [g.detach().float() if g.dtype in LOW_PRECISION else g.detach() for g in grads]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product of two gradient lists, summed in float64 across parameters."""
    return float(sum(torch.dot(x.reshape(-1), y.reshape(-1)).double() for x, y in zip(a, b, strict=True)))


def norm(a: Sequence[torch.Tensor]) -> float:
    """Euclidean norm of a gradient list."""
    return dot(a, a) ** 0.5


@contextmanager
def stashed_grads(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Set every ``.grad`` aside (to None) for the duration of the block and put it back afterwards.

    Lets a function compute one term alone with the same accumulate-into-``.grad`` code path as the full step.
    """
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def add_to_grads(params: Sequence[torch.nn.Parameter], tensors: Sequence[torch.Tensor], alpha: float) -> None:
    """``p.grad += alpha * t`` in place (creating ``p.grad`` if missing)."""
    with torch.no_grad():
        for p, t in zip(params, tensors, strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(t.to(p.grad.dtype) if t.dtype != p.grad.dtype else t, alpha=alpha)


def add_gradient(
    loss: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
    coef: float,
    minus: Sequence[torch.Tensor] | None = None,
    retain_graph: bool = False,
) -> None:
    """Accumulate ``coef * (∇loss − minus)`` into ``p.grad``, ``minus`` being an earlier gradient snapshot.

    fp32/fp64 parameters: one ``backward`` on ``coef * loss`` writes straight into ``.grad`` (no gradient buffer),
    then the snapshot is subtracted in place. Low-precision parameters: the new gradient is taken with
    ``autograd.grad`` and differenced against the fp32 snapshot in fp32 before it touches ``.grad``.
    """
    low = any(p.dtype in LOW_PRECISION for p in params)
    if not low:
        (loss * coef).backward(inputs=list(params), retain_graph=retain_graph)
        if minus is not None:
            add_to_grads(params, minus, -coef)
        return
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            d = torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
            if minus is not None:
                d.sub_(minus[i])
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(d.mul_(coef).to(p.grad.dtype))


def gradient(
    loss: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool = False, create_graph: bool = False
) -> TensorList:
    """∇loss as a list aligned with ``params`` (zeros for parameters the loss does not reach)."""
    grads = torch.autograd.grad(
        loss, list(params), retain_graph=retain_graph or create_graph, create_graph=create_graph, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def check_finite(what: str, params: Sequence[torch.nn.Parameter], **context: float) -> None:
    """Raise :class:`NonFiniteGradientError` if any ``.grad`` holds NaN/inf.

    NaN and inf propagate through a sum, so one summing pass over the gradients (in fp32, where a finite
    gradient cannot overflow) replaces ``isfinite(...).all()``, which costs several passes per parameter.
    """
    sums = [p.grad.float().sum() for p in params if p.grad is not None]
    bad = bool(sums) and not math.isfinite(float(torch.stack(sums).sum()))
    if bad or any(not _finite(v) for v in context.values()):
        detail = ", ".join(f"{k}={v:.4g}" for k, v in context.items())
        raise NonFiniteGradientError(f"{what}: non-finite gradient ({detail}); stopping before the model is saved")


# --------------------------------------------------------------------------------------------------------------
# Data parallelism
# --------------------------------------------------------------------------------------------------------------
#
# Every rank holds its own slice of each batch; the step must equal the single-process step on the
# concatenated batch. Averaging per-rank gradients is not enough for that, for two reasons:
# - a cross-entropy is a mean over the batch's labelled tokens, and ranks rarely hold equally many, so the plain
#   mean of per-rank means weights the tokens of the shorter slice more. Each rank therefore scales its loss by
#   w_r = n_r / mean_r(n) (its token count over the mean count): the mean over ranks of w_r·∇CE_r is then
#   Σ_r n_r ∇CE_r / Σ_r n_r, the gradient of the CE over all tokens, exactly.
# - a nonlinear function of a mean (SEAM's L_ul = −log(S/(L+1) + 1)) needs the pooled S before its derivative
#   is applied to each rank's ∇S.
# Both need a few numbers averaged across ranks besides the gradient lists: :class:`AllReduceMean` does both.


class AllReduceMean:
    """Average across the ranks of the default process group, in place: the reduction of the objectives.

    Calling it on a list of tensors averages each tensor (gradients); :meth:`mean_values` averages a few numbers
    (token counts, losses) in one float64 all-reduce. The all-reduce hands every rank the same sum, so ranks that
    start identical stay bit-identical (checked with gloo in tests/test_ddp_equivalence.py).
    """

    def __call__(self, tensors: TensorList) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world)

    def mean_values(self, values: Sequence[float], device: torch.device) -> list[float]:
        buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        self([buf])
        return buf.tolist()


all_reduce_mean = AllReduceMean()


def pooled(
    reduce_fn: ReduceFn | None, device: torch.device, terms: Sequence[tuple[int, float]]
) -> list[tuple[float, float]] | None:
    """Pool per-rank token means across ranks: for each (n_r, v_r), ``(w_r, v)`` with w_r = n_r / mean_r(n) the
    weight that makes rank gradients average to the all-token gradient, and v = Σ_r n_r·v_r / Σ_r n_r the value
    on the concatenated batch. One reduction of 2·len(terms) numbers.

    ``None`` without ``reduce_fn`` or when ``reduce_fn`` has no ``mean_values`` (a plain callable that averages
    gradient lists only): the caller then keeps every rank's own means, exact only for one process.
    """
    mean_values = getattr(reduce_fn, "mean_values", None)
    if mean_values is None:
        return None
    # a rank without labelled tokens has a NaN mean but contributes nothing (its gradient, through no row, is 0)
    flat = [x for n, v in terms for x in (float(n), float(n) * float(v) if n else 0.0)]
    means = mean_values(flat, device)
    out = []
    for i, (n, _) in enumerate(terms):
        mean_n, mean_nv = means[2 * i], means[2 * i + 1]
        # no labelled token on any rank: the single-process CE is NaN too; keep NaN so the step stops everywhere
        out.append((n / mean_n, mean_nv / mean_n) if mean_n > 0 else (float("nan"), float("nan")))
    return out


def average_grads(reduce_fn: ReduceFn | None, params: Sequence[torch.nn.Parameter]) -> None:
    """The one average of a step's gradient across data-parallel ranks (none without ``reduce_fn``).

    Lightning's DDP reducer is not armed in manual optimisation, so this is the only gradient average of a step.
    """
    if reduce_fn is not None:
        reduce_fn([p.grad for p in params if p.grad is not None])


def scaled(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight``·loss (a rank's token weight); the loss itself for weight 1, so one process computes exactly
    what it computed without data parallelism."""
    return loss if weight == 1.0 else loss * weight


def value(x: torch.Tensor) -> float:
    """A scalar tensor's value for the stats (detached: no autograd warning, no graph kept alive)."""
    return float(x.detach())


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# --------------------------------------------------------------------------------------------------------------
# Perturb and restore
# --------------------------------------------------------------------------------------------------------------


def run_concurrently(tasks: Sequence[Callable[[], object]]) -> list:
    """Call every task, the first in this thread and each other in a thread of its own; their results in order.

    For independent branches (CTRAP's radii within one step, the red team's cells): each branch runs the same
    operations on the same values as it would alone, so what it computes does not depend on the concurrency. Waits
    for every task; the first exception (in task order) is raised after all have finished."""
    if len(tasks) <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="branch") as pool:
        futures = [pool.submit(task) for task in tasks[1:]]
        try:
            first = tasks[0]()
        finally:
            others = [(f.exception(), f) for f in futures]  # waits for every branch before anything is raised
    for error, _ in others:
        if error is not None:
            raise error
    return [first, *(f.result() for _, f in others)]


@contextmanager
def displaced(params: Sequence[torch.nn.Parameter]) -> Iterator[Callable[[], None]]:
    """Save the parameters, let the block move them, and copy the saved values back bit-for-bit.

    Yields ``restore`` so that several perturbations can share one saved copy. Restoring by copy (never by
    subtracting the step again) is what makes the weights bitwise identical afterwards; the saved copy is the
    one extra parameter-sized buffer a perturbation costs. The weights are restored even if the block raises.
    """
    saved = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    try:
        yield restore
    finally:
        restore()
        del saved


def shift_(params: Sequence[torch.nn.Parameter], tensors: Sequence[torch.Tensor], alpha: float) -> None:
    """``p += alpha * t`` in place, without building a graph."""
    with torch.no_grad():
        for p, t in zip(params, tensors, strict=True):
            p.add_(t.to(p.dtype) if t.dtype != p.dtype else t, alpha=alpha)


# --------------------------------------------------------------------------------------------------------------
# Response-token cross-entropy
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSelection:
    """Which logit rows enter a cross-entropy, and their targets.

    ``batch_idx``/``pos_idx`` index the predicting positions t (whose target is the token at t+1), ``targets``
    are those tokens, and ``row_scale`` (or None) multiplies each selected logit row (the official SEAM code
    zeroes logits at positions where the harmful and the refusal sequences agree). Selecting rows before the
    LM head is exact for a per-position head and saves the logit-lens projections of prompt and padding.
    """

    batch_idx: torch.Tensor
    pos_idx: torch.Tensor
    targets: torch.Tensor
    row_scale: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.targets.numel())


def select_labels(labels: torch.Tensor) -> TokenSelection:
    """Shifted selection of every position whose next-token label is not -100 (HF causal-LM convention)."""
    shifted = labels[:, 1:]
    b, t = torch.nonzero(shifted != IGNORE_INDEX, as_tuple=True)
    return TokenSelection(batch_idx=b, pos_idx=t, targets=shifted[b, t])


def rows(x: torch.Tensor, sel: TokenSelection) -> torch.Tensor:
    """The selected rows of a ``[batch, seq, ...]`` tensor: ``[n_selected, ...]``."""
    return x[sel.batch_idx, sel.pos_idx]


def rows_ce(logit_rows: torch.Tensor, sel: TokenSelection) -> torch.Tensor:
    """Mean cross-entropy of selected logit rows (low-precision logits are upcast to fp32 first)."""
    if logit_rows.dtype in LOW_PRECISION:
        logit_rows = logit_rows.float()
    if sel.row_scale is not None:
        logit_rows = logit_rows * sel.row_scale.to(logit_rows.dtype).unsqueeze(-1)
    return F.cross_entropy(logit_rows, sel.targets)


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], hidden_states: bool = False):
    """One forward pass without labels (the loss is computed here) and without a KV cache."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        output_hidden_states=hidden_states,
        use_cache=False,
    )


def response_ce(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], sel: TokenSelection | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's labelled (response) tokens, or over ``sel``."""
    sel = select_labels(batch["labels"]) if sel is None else sel
    return rows_ce(rows(forward(model, batch).logits, sel), sel)


def token_ce(model: torch.nn.Module, batch: dict[str, torch.Tensor], token_id: int) -> torch.Tensor:
    """Mean −log p(token_id | prefix) over the batch's labelled positions (CTRAP's collapse loss)."""
    sel = select_labels(batch["labels"])
    sel = TokenSelection(sel.batch_idx, sel.pos_idx, torch.full_like(sel.targets, token_id))
    return rows_ce(rows(forward(model, batch).logits, sel), sel)


# --------------------------------------------------------------------------------------------------------------
# Hidden activations: reading and perturbing the outputs of chosen modules
# --------------------------------------------------------------------------------------------------------------


def modules_named(model: torch.nn.Module, suffix: str) -> list[torch.nn.Module]:
    """The modules whose class name ends with ``suffix``, in forward order ("Attention": every decoder layer's
    self-attention, "MLP": every feed-forward block, for the Hugging Face decoder families)."""
    found = [m for m in model.modules() if type(m).__name__.endswith(suffix)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no module whose class name ends with {suffix!r}")
    return found


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def captured_outputs(modules: Sequence[torch.nn.Module]) -> Iterator[list]:
    """Collect each module's output (the hidden state, first of a tuple) of the forward passes run in the block;
    the list holds the last pass's outputs, still in the autograd graph."""
    outputs: list = [None] * len(modules)

    def hook(i):
        def store(_module, _inputs, output):
            outputs[i] = _first(output)

        return store

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def added_to_outputs(modules: Sequence[torch.nn.Module], deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add ``deltas[i]`` (held constant) to the hidden-state output of ``modules[i]`` in every forward pass of
    the block."""

    def hook(delta):
        def add(_module, _inputs, output):
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        return add

    handles = [m.register_forward_hook(hook(d)) for m, d in zip(modules, deltas, strict=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------
# Attention implementation for double backward
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch a Hugging Face model to eager attention for the block, then back.

    Double backward (exact modes) needs it: PyTorch's fused SDPA kernels have no second derivative on CPU.
    """
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = previous is not None and previous != "eager"
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)
