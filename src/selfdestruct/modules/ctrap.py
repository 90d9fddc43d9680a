"""CTRAP as a Lightning stage (SPEC §4): one call of :func:`ctrap_step` per optimiser step, every stat logged.

The mathematics lives in :mod:`selfdestruct.objectives.ctrap`. The module owns the optimiser, the data-parallel
reduction, the logging, and, for the Adam-shaped look-ahead (an option beyond the paper), the running second
moment of the harmful gradient across steps. A :class:`NonFiniteGradientError` leaves ``trainer.fit`` uncaught.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selfdestruct.modules.seam import Batch, DefenseModule, data_parallel_reduce
from selfdestruct.objectives.ctrap import GRADIENTS, LOOKAHEADS, SecondMoment, ctrap_step


class CTRAPModule(DefenseModule):
    """ℓ(θ; D_align) + λ·ℓ_col(θ − a·g_h; D_gen); batches ``align``, ``harmful``, ``general``.

    Logged every step: ``defense/loss_align``, ``defense/loss_harmful`` (at θ), ``defense/loss_collapse`` (at the
    look-ahead point θ'), ``defense/norm_h`` and, with ``measure_lookahead``, ``defense/loss_harmful_lookahead``
    (the harmful loss at θ': one extra forward pass without gradient, about a ninth of the step's cost).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        *,
        token_id: int,
        lam: float = 0.1,
        step_size: float = 0.1,
        normalize_step: bool = True,
        gradient_mode: str = "first_order",
        lookahead: str = "sgd",
        radii: Sequence[float] | None = None,
        unroll_steps: int = 1,
        adam_beta2: float = 0.999,
        measure_lookahead: bool = True,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        schedule: str = "constant",
        max_grad_norm: float | None = None,
    ) -> None:
        if gradient_mode not in GRADIENTS:
            raise ValueError(f"gradient_mode={gradient_mode!r}: expected one of {GRADIENTS}")
        if lookahead not in LOOKAHEADS:
            raise ValueError(f"lookahead={lookahead!r}: expected one of {LOOKAHEADS}")
        super().__init__(model, lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, schedule=schedule,
                         max_grad_norm=max_grad_norm)
        self.token_id = int(token_id)
        self.lam = lam
        self.step_size = step_size
        self.normalize_step = normalize_step
        self.gradient_mode = gradient_mode
        self.lookahead = lookahead
        self.radii = None if radii is None else [float(r) for r in radii]
        self.unroll_steps = unroll_steps
        self.measure_lookahead = measure_lookahead
        # Only the Adam-shaped look-ahead keeps state across steps (one parameter-sized buffer).
        self.second_moment = SecondMoment(beta2=adam_beta2) if lookahead == "adam" else None

    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.second_moment is not None:  # lookahead=adam: the running E[g_h²] and its step count
            state["second_moment"] = {"v": self.second_moment.v, "step": self.second_moment.step}
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        saved = state.get("second_moment")
        if self.second_moment is not None and saved is not None:
            params = self.trainable_parameters()
            self.second_moment.v = None if saved["v"] is None else [v.to(p.device) for v, p in zip(saved["v"], params)]
            self.second_moment.step = int(saved["step"])

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> torch.Tensor:
        self.optimizers().zero_grad(set_to_none=True)
        # Published recipe: one retain batch (refusals ⊕ helpful) carries both the alignment and the collapse loss.
        align, general = (batch["retain"], batch["retain"]) if "retain" in batch else (batch["align"], batch["general"])
        stats = ctrap_step(
            self.model, align, batch["harmful"], general,
            token_id=self.token_id, lam=self.lam, step_size=self.step_size, normalize_step=self.normalize_step,
            gradient_mode=self.gradient_mode, lookahead=self.lookahead, radii=self.radii,
            unroll_steps=self.unroll_steps, second_moment=self.second_moment,
            measure_lookahead=self.measure_lookahead, reduce_fn=data_parallel_reduce(),
        )
        self.finish_step()
        self.log_stats(stats)
        return torch.tensor(stats["loss"])
