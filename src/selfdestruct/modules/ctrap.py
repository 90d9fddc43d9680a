"""CTRAP's module (SPEC §4): the shared defense module plus what CTRAP keeps across steps.

The mathematics lives in :mod:`selfdestruct.objectives.ctrap`. CTRAP needs a module of its own for two things
the shared step does not give: the collapse token e (from the tokenizer) and what options beyond the paper keep
across steps: the running second moment of the harmful gradient (the Adam-shaped look-ahead) and the recent harmful
batches with the displacement of a simulated fine-tune on them (the attack-path trap, ``attack_steps``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping

import torch

from selfdestruct.modules.defense import Batch, DefenseModule, data_parallel_reduce
from selfdestruct.objectives.ctrap import (CtrapParams, SecondMoment, attack_displacement, collapse_token_id,
                                          ctrap_step, make_replicas)
from selfdestruct.pipeline.config import OptimConfig

log = logging.getLogger(__name__)


class CTRAPModule(DefenseModule):
    """ℓ(θ; D_align) + λ·ℓ_col(θ − a·g_h; D_gen); batches ``retain`` and ``harmful`` (published) or ``align``,
    ``harmful`` and ``general``.

    Logged every step: ``defense/loss_align``, ``defense/loss_harmful`` (at θ), ``defense/loss_collapse`` (at the
    look-ahead point θ'), ``defense/norm_h`` and, with ``measure_lookahead``, ``defense/loss_harmful_lookahead``
    (the harmful loss at θ': one extra forward pass without gradient, about a ninth of the step's cost).
    The collapse token e is ``token_id``, or found with ``tokenizer`` as ``params`` say.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, params: CtrapParams, *, tokenizer=None,
                 token_id: int | None = None) -> None:
        super().__init__(model, optim, params)
        if token_id is None:
            token_id = collapse_token_id(tokenizer, params.collapse_word, rule=params.collapse_token)
            log.info("CTRAP collapse token: id %d = %r", token_id, tokenizer.decode([token_id]))
        self.token_id = int(token_id)
        # Only the Adam-shaped look-ahead keeps state across steps (one parameter-sized buffer).
        self.second_moment = SecondMoment(beta2=params.adam_beta2) if params.lookahead == "adam" else None
        # Copies of the model on which further radii run concurrently (use_branch_threads); a plain list, so they
        # are neither submodules nor in checkpoints; they follow the model to its device at the first step.
        self.replicas: list[torch.nn.Module] = []
        # attack_steps > 0: the harmful batches of the last attack_steps steps and the displacement Δ of the last
        # simulated fine-tune on them (refreshed every attack_refresh steps; both saved with the checkpoints)
        self.attack_batches: deque[Batch] = deque(maxlen=max(1, params.attack_steps))
        self.displacement: list[torch.Tensor] | None = None

    def use_branch_threads(self, threads: int) -> int:
        """Several radii: one thread per contiguous run of radii, each on its own copy of the model (checked and
        made here, before any work); the step stays bit-for-bit the sequential one."""
        self.replicas = make_replicas(self.model, self.defense_params, threads)
        return 1 + len(self.replicas)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for replica in self.replicas:  # the concurrent radii run in the model's mode
            replica.train()

    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.second_moment is not None:  # lookahead=adam: the running E[g_h²] and its step count
            state["second_moment"] = {"v": self.second_moment.v, "step": self.second_moment.step}
        if self.displacement is not None:
            state["attack_path"] = {"displacement": [d.cpu() for d in self.displacement],
                                    "batches": [{k: v.cpu() for k, v in b.items()} for b in self.attack_batches]}
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        saved = state.get("second_moment")
        if self.second_moment is not None and saved is not None:
            params = self.trainable_parameters()
            self.second_moment.v = None if saved["v"] is None else [v.to(p.device) for v, p in zip(saved["v"], params)]
            self.second_moment.step = int(saved["step"])
        path = state.get("attack_path")
        if path is not None:
            device = next(self.model.parameters()).device
            self.displacement = [d.to(device) for d in path["displacement"]]
            self.attack_batches.clear()
            self.attack_batches.extend({k: v.to(device) for k, v in b.items()} for b in path["batches"])

    def defense_step(self, batch: Mapping[str, Batch]) -> dict[str, float]:
        # Published recipe: one retain batch (refusals ⊕ helpful) carries both the alignment and the collapse loss.
        align, general = (batch["retain"], batch["retain"]) if "retain" in batch else (batch["align"], batch["general"])
        device = next(self.model.parameters()).device
        self.replicas = [r if next(r.parameters()).device == device else r.to(device) for r in self.replicas]
        return ctrap_step(self.model, align, batch["harmful"], general, self.defense_params, token_id=self.token_id,
                          second_moment=self.second_moment, reduce_fn=data_parallel_reduce(), replicas=self.replicas,
                          displacement=self.attack_path(batch["harmful"]))

    def attack_path(self, harmful: Batch) -> list[torch.Tensor] | None:
        """``attack_steps`` > 0: Δ of a simulated AdamW fine-tune on the recent harmful batches, recomputed at the
        first step and every ``attack_refresh`` steps after it (None when the option is off)."""
        p = self.defense_params
        if p.attack_steps == 0:
            return None
        self.attack_batches.append({k: v.detach() for k, v in harmful.items()})
        if self.displacement is None or len(self.losses) % p.attack_refresh == 0:
            self.displacement = attack_displacement(self.model, list(self.attack_batches), p.attack_steps,
                                                    p.attack_lr)
        return self.displacement
