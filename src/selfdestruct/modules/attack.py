"""The fine-tuning attacker: full-parameter or LoRA updates on harmful (or, as a control, benign) pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from selfdestruct.modules.base import CausalLMModule

if TYPE_CHECKING:  # pipeline.stages builds this module
    from selfdestruct.pipeline.config import AttackConfig


def wrap_lora(model: torch.nn.Module, rank: int, alpha: int, dropout: float, target_modules: list[str]):
    """Freeze ``model`` and add LoRA adapters (peft) on ``target_modules``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model: LoRA adapters (peft) merged into the weights they adapt, anything else as is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


class AttackModule(CausalLMModule):
    """Descends the attack data's cross-entropy; with LoRA, only the adapters move and are merged on export."""

    def __init__(self, model: torch.nn.Module, attack: AttackConfig) -> None:
        """``attack``: the whole attack config (optimiser settings, the torch optimiser, LoRA, which data)."""
        if attack.lora:
            model = wrap_lora(model, **attack.lora)
        super().__init__(model, attack, log_prefix="attack", optimizer=attack.optimizer,
                         momentum=attack.sgd_momentum)
        self.kind = attack.data

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch["train"])
        self.step_with_loss(loss)
        self.log(f"attack/{self.kind}_loss", loss.detach(), on_step=True, prog_bar=True)
        return loss.detach()

    def export_model(self) -> torch.nn.Module:
        """The attacked model as a plain HF model (LoRA adapters merged into the weights)."""
        return merged(self.model)
