"""``optim.ema_decay``: a stage releases the exponential moving average of its iterates instead of the last one.

Checked against an independent re-statement of the average over the iterates a real fit produced, in every stage
that trains (pre-training and alignment, defenses, attacks), across a checkpoint, and in the cache keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from selfdestruct.errors import FieldError
from selfdestruct.modules.base import make_optimizer
from selfdestruct.modules.defense import DefenseModule
from selfdestruct.modules.sft import SFTModule
from selfdestruct.pipeline import stages
from selfdestruct.pipeline.config import OptimConfig


class _Toy(torch.nn.Module):
    """A 'language model' whose loss pulls its weights towards the batch's mean token id, plus a frozen part."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, input_ids, attention_mask, labels):
        target = input_ids.float().mean()
        return SimpleNamespace(loss=((self.w - target) ** 2).sum())


class _Iterates(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen.append(module.model.w.detach().clone())


def _fit(ema_decay: float | None, steps: int = 6) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    batches = [{"train": {"input_ids": torch.full((2, 4), float(k % 3 + 1)).long(),
                          "attention_mask": torch.ones(2, 4), "labels": torch.ones(2, 4).long()}}
               for k in range(steps)]
    module = SFTModule(_Toy(), OptimConfig(lr=0.3, ema_decay=ema_decay))
    iterates = _Iterates()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[iterates], accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module.model, iterates.seen


def test_the_released_weights_are_the_moving_average_of_the_iterates():
    model, iterates = _fit(ema_decay=0.8)
    assert len(iterates) == 6 and not torch.equal(iterates[-1], iterates[-2])  # the weights moved at every step
    expected = iterates[0]
    for w in iterates[1:]:
        expected = 0.8 * expected + 0.2 * w  # w̄ ← d·w̄ + (1 − d)·w, w̄ = w after the first step
    assert torch.allclose(model.w.detach(), expected, atol=1e-7)
    assert not torch.allclose(model.w.detach(), iterates[-1], atol=1e-3)  # not the last iterate
    assert torch.equal(model.frozen, torch.ones(2))  # what does not train is left alone

    plain, plain_iterates = _fit(ema_decay=None)
    assert torch.equal(plain.w.detach(), plain_iterates[-1])  # off: the last iterate, as before the option
    assert all(torch.equal(a, b) for a, b in zip(iterates, plain_iterates))  # the average never feeds back


def test_the_average_survives_a_checkpoint():
    module = SFTModule(_Toy(), OptimConfig(lr=0.1, ema_decay=0.5))
    module.model.w.data = torch.tensor([1.0, 2.0, 3.0])
    module.update_ema()
    module.model.w.data = torch.tensor([3.0, 2.0, 1.0])
    module.update_ema()
    state = module.extra_state()
    resumed = SFTModule(_Toy(), OptimConfig(lr=0.1, ema_decay=0.5))
    resumed.load_extra_state(state)
    resumed.on_train_end()
    assert torch.equal(resumed.model.w.detach(), torch.tensor([2.0, 2.0, 2.0]))
    assert SFTModule(_Toy(), OptimConfig(lr=0.1)).extra_state() == {}  # off: checkpoints carry nothing new


def test_every_training_stage_hands_its_whole_optimiser_config_to_the_module(monkeypatch):
    """The modules keep the stage's OptimConfig (or AttackConfig) whole, so a field such as ema_decay reaches every
    stage without being copied at each call site."""
    optim = OptimConfig(lr=1e-3, ema_decay=0.9)
    assert stages._sft_module(_Toy(), optim, "align").optim is optim  # pre-training and alignment
    assert DefenseModule(_Toy(), optim, params=None).optim is optim  # every defense (CTRAP and NPO subclass it)

    built = {}
    real = stages.AttackModule

    class Stop(Exception):
        pass

    def capture(model, attack):
        built["module"] = real(model, attack)
        raise Stop

    monkeypatch.setattr(stages, "AttackModule", capture)
    attack = stages.AttackConfig(lr=1e-4, ema_decay=0.95, optimizer="sgd", momentum=0.5, data="benign")
    with pytest.raises(Stop):
        stages.run_attack(_Toy(), None, [], attack, None, [], None, 0, None)
    module = built["module"]
    assert module.optim is attack and module.optim.ema_decay == 0.95
    assert (module.optimizer_name, module.momentum, module.kind) == ("sgd", 0.5, "benign")
    optimiser = make_optimizer(module.optimizer_name, module.trainable_parameters(), attack.lr, attack.weight_decay,
                               module.momentum)
    assert isinstance(optimiser, torch.optim.SGD) and optimiser.defaults["momentum"] == 0.5


def test_cache_keys_are_unchanged_while_the_option_is_off_and_bad_values_name_the_field():
    off = OptimConfig(lr=1e-3).cache_key()
    assert "ema_decay" not in off and off["lr"] == 1e-3 and off["max_length"] == 96
    assert OptimConfig(lr=1e-3, ema_decay=0.99).cache_key()["ema_decay"] == 0.99
    for bad in (0.0, 1.0, 1.5, -0.1, "high"):
        with pytest.raises(FieldError, match="ema_decay"):
            OptimConfig(lr=1e-3, ema_decay=bad)
