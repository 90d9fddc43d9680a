"""The shared base of every training stage: a causal LM, an optimiser (AdamW unless the attack config chooses
Adam or SGD), a warm-up schedule, manual optimisation.

Manual optimisation because SEAM and CTRAP need several gradient evaluations per optimiser step;
the plain stages (pre-training, alignment, attacks) use the same path so all of them step alike.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import pytorch_lightning as pl
import torch

from selfdestruct.pipeline.config import OPTIMIZERS, SCHEDULES, SGD_MOMENTUM, OptimConfig
from selfdestruct.utils.spikes import LAST, calm_step, late_spike


log = logging.getLogger(__name__)



def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at each step: linear warm-up, then constant, cosine or linear decay
    (cosine and linear reach 0 at the last step)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """The torch optimiser called ``name`` (one of OPTIMIZERS); ``momentum`` is used by sgd only."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r}: expected one of {OPTIMIZERS}")


class CausalLMModule(pl.LightningModule):
    """Owns a Hugging Face causal LM and steps it by hand; subclasses define ``training_step``."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, log_prefix: str = "train",
                 optimizer: str = "adamw", momentum: float = SGD_MOMENTUM) -> None:
        """``optim``: the stage's optimiser settings, kept whole (learning rate, schedule, clipping, ``ema_decay``);
        ``optimizer`` and ``momentum``: the torch optimiser, which only an attack chooses (AttackConfig)."""
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.optim = optim
        self.log_prefix = log_prefix
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.ema: list[torch.Tensor] | None = None  # the running average of the trainable parameters (ema_decay)
        self.losses: list[float] = []  # every step's loss, at the weights the step started from
        # spike_rollback: (step index, the trainable parameters that step started from) of the last LAST + 1 steps
        self.recent: deque[tuple[int, list[torch.Tensor]]] = deque(maxlen=LAST + 1)
        self.total_steps: int | None = None  # the stage's optimiser steps (configure_optimizers)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = make_optimizer(self.optimizer_name, self.trainable_parameters(), self.optim.lr,
                                   self.optim.weight_decay, self.momentum)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.total_steps = total  # spike_rollback keeps the weights of the last LAST + 1 of them only
        warmup = int(self.optim.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.optim.schedule, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def extra_state(self) -> dict:
        """What the stage's end depends on beyond weights, optimiser and schedule (saved with every checkpoint)."""
        state: dict = {}
        if self.ema is not None:
            state["ema"] = [t.detach().cpu() for t in self.ema]
        if self.losses:
            state["losses"] = list(self.losses)
        if self.recent:
            state["recent"] = [(i, [t.cpu() for t in weights]) for i, weights in self.recent]
        return state

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` when a fit resumes from a checkpoint."""
        params = self.trainable_parameters()
        if self.optim.ema_decay is not None and state.get("ema") is not None:
            self.ema = [t.to(p.device) for t, p in zip(state["ema"], params)]
        self.losses = list(state.get("losses", []))
        self.recent.clear()
        for i, weights in state.get("recent", []):
            self.recent.append((i, [t.to(p.device) for t, p in zip(weights, params)]))

    def update_ema(self) -> None:
        """w̄ ← d·w̄ + (1 − d)·w over the trainable parameters after an optimiser step (w̄ = w after the first)."""
        params = [p.detach() for p in self.trainable_parameters()]
        if self.ema is None:
            self.ema = [p.clone() for p in params]
        else:
            torch._foreach_lerp_(self.ema, params, 1.0 - self.optim.ema_decay)

    def on_fit_start(self) -> None:
        """Train mode for the model being trained. A model loaded from disk (``from_pretrained``) or evaluated
        before the stage arrives in eval mode, and Lightning keeps each submodule's mode: its dropout (a real
        checkpoint's ``attention_dropout``, say) would silently stay off for the whole stage."""
        self.model.train()

    def on_train_end(self) -> None:
        """With ``ema_decay``, the stage releases the average: it replaces the trainable parameters. A loss spike
        in the last steps is warned about or, with ``spike_rollback``, undone (:meth:`release_before_spike`)."""
        if self.ema is not None:
            with torch.no_grad():
                for p, avg in zip(self.trainable_parameters(), self.ema):
                    p.copy_(avg)
        spike = late_spike(self.losses)
        if spike and self.optim.spike_rollback:
            self.release_before_spike(spike)
        elif spike:
            log.warning("%s: %s; the released weights may come out of a loss spike: check the model's utility "
                        "before reading what follows (optim.spike_rollback=true releases the weights from before "
                        "it)", self.log_prefix, spike)

    def release_before_spike(self, spike: str) -> None:
        """Put back the weights the latest calm one of the last LAST + 1 steps started from."""
        kept = dict(self.recent)
        step = calm_step(self.losses, list(kept))
        if step is None:
            log.warning("%s: %s, and so are the losses of all the last %d steps: the last iterate is released",
                        self.log_prefix, spike, len(kept))
            return
        with torch.no_grad():
            for p, saved in zip(self.trainable_parameters(), kept[step]):
                p.copy_(saved)
        log.warning("%s: %s; released the weights step %d of %d started from (loss %.4g) instead of the last "
                    "iterate (optim.spike_rollback)", self.log_prefix, spike, step + 1, len(self.losses),
                    self.losses[step])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["selfdestruct"] = self.extra_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_extra_state(checkpoint.get("selfdestruct", {}))

    def lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the batch's labelled (response) tokens."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    def step_with_loss(self, loss: torch.Tensor) -> None:
        """Backward, optional clipping, optimiser and scheduler step."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.finish_step(float(loss.detach()))

    def finish_step(self, loss: float) -> None:
        """Record the step's ``loss`` (measured at the current weights), clip (if configured), step the optimiser
        and the schedule; gradients must already be in ``.grad``."""
        self.losses.append(float(loss))
        near_end = self.total_steps is None or len(self.losses) > self.total_steps - self.recent.maxlen
        if self.optim.spike_rollback and near_end:  # a parameter copy, taken in the last LAST + 1 steps only
            self.recent.append((len(self.losses) - 1, [p.detach().clone() for p in self.trainable_parameters()]))
        optimizer = self.optimizers()
        if self.optim.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.optim.ema_decay is not None:
            self.update_ema()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log(f"{self.log_prefix}/lr", optimizer.param_groups[0]["lr"], on_step=True, prog_bar=False)
