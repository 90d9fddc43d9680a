"""Loss spikes at the end of a stage (utils/spikes.py): detected on the step losses, warned about, and with
``optim.spike_rollback`` undone by releasing the weights the latest calm step started from, through a real fit."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from selfdestruct.errors import FieldError
from selfdestruct.modules.sft import SFTModule
from selfdestruct.pipeline.config import OptimConfig
from selfdestruct.utils.spikes import calm_step, late_spike

CALM = [0.25 + 0.02 * ((7 * i) % 5 - 2) for i in range(200)]  # median 0.25, median absolute deviation 0.02


def test_late_spike_measures_the_last_steps_against_the_hundred_before():
    # held-out seed 13's CTRAP run ended 7.08, 2.77 against ~0.25 (experiments/nowin): 341 deviations
    message = late_spike(CALM[:-3] + [0.26, 7.08, 2.77])
    assert message and "7.08" in message and "0.25" in message and "341 median absolute deviations" in message
    assert late_spike(CALM) is None
    assert late_spike(CALM[:-3] + [0.26, 0.25, 0.25 + 0.02 * 9.5]) is None  # below the threshold of 10
    assert late_spike(CALM[:-3] + [0.26, 0.25, 0.25 + 0.02 * 10.5]) is not None
    assert late_spike(CALM[:-4] + [0.26, 0.25, 0.25, 9.0]) is not None  # the last step alone
    assert late_spike(CALM[:-4] + [9.0, 0.25, 0.25, 0.25]) is None  # before the last 3: part of the reference
    assert late_spike([-3.0 + 0.1 * (i % 3) for i in range(150)] + [-1.0]) is not None  # negative losses (SEAM) too
    assert late_spike([1.0] * 10 + [50.0]) is None  # too short to judge
    assert late_spike([0.3] * 120 + [9.0]) is None  # no spread to measure against


def test_calm_step_is_the_latest_candidate_that_is_not_a_spike():
    losses = CALM[:-3] + [0.26, 7.08, 2.77]
    n = len(losses)
    assert calm_step(losses, [n - 4, n - 3, n - 2, n - 1]) == n - 3
    assert calm_step(losses, [n - 2, n - 1]) is None


class _Toy(torch.nn.Module):
    """Loss = ‖w − mean token id‖²: the batches decide where the weights go and how high the loss jumps."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, input_ids, attention_mask, labels):
        return SimpleNamespace(loss=((self.w - input_ids.float().mean()) ** 2).sum())


class _Starts(pl.Callback):
    """The weights each step starts from."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append(module.model.w.detach().clone())


def _fit(rollback: bool, targets: list[int]) -> tuple[SFTModule, list[torch.Tensor]]:
    """An AdamW fit of the toy, one step per target (the batch's token id)."""
    batches = [{"train": {"input_ids": torch.full((2, 4), t).long(), "attention_mask": torch.ones(2, 4),
                          "labels": torch.ones(2, 4).long()}} for t in targets]
    module = SFTModule(_Toy(), OptimConfig(lr=0.05, spike_rollback=rollback))
    starts = _Starts()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[starts], accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module, starts.seen


# 130 steps that settle near 1-2, then two batches far away: the last two steps' losses jump
SPIKED = [1 + (i % 2) for i in range(130)] + [40, 40]


def test_without_the_option_a_late_spike_is_only_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="selfdestruct.modules.base"):
        module, starts = _fit(False, SPIKED)
    assert len(module.losses) == 132 and module.losses[-1] > 100 * module.losses[-3]
    assert "train: the loss of the last 3 steps reaches" in caplog.text and "may come out of a loss spike" in caplog.text
    assert not torch.equal(module.model.w.detach(), starts[-1])  # the last iterate (after the last step)


def test_with_the_option_the_weights_from_before_the_spike_are_released(caplog):
    with caplog.at_level(logging.WARNING, logger="selfdestruct.modules.base"):
        module, starts = _fit(True, SPIKED)
    # steps 131 and 132 spike; step 130's loss is calm, so the weights it started from are released
    assert torch.equal(module.model.w.detach(), starts[129])
    assert "released the weights step 130 of 132 started from" in caplog.text
    calm, _ = _fit(True, [1 + (i % 2) for i in range(132)])  # no spike: the last iterate, as without the option
    plain, _ = _fit(False, [1 + (i % 2) for i in range(132)])
    assert torch.equal(calm.model.w.detach(), plain.model.w.detach())


def test_the_kept_steps_survive_a_checkpoint():
    module, _ = _fit(True, SPIKED[:-2])
    state = module.extra_state()
    assert len(state["losses"]) == 130 and [i for i, _ in state["recent"]] == [126, 127, 128, 129]
    resumed = SFTModule(_Toy(), OptimConfig(lr=0.05, spike_rollback=True))
    resumed.load_extra_state(state)
    assert resumed.losses == module.losses
    assert all(i == j and all(torch.equal(a, b) for a, b in zip(x, y))
               for (i, x), (j, y) in zip(resumed.recent, module.recent))
    assert SFTModule(_Toy(), OptimConfig(lr=0.05)).extra_state() == {}  # a fresh module carries nothing


def test_the_option_is_a_boolean_excludes_the_average_and_keeps_old_cache_keys():
    assert "spike_rollback" not in OptimConfig(lr=1e-3).cache_key()
    assert OptimConfig(lr=1e-3, spike_rollback=True).cache_key()["spike_rollback"] is True
    with pytest.raises(FieldError, match="spike_rollback"):
        OptimConfig(lr=1e-3, spike_rollback="yes")
    with pytest.raises(FieldError, match="not both"):
        OptimConfig(lr=1e-3, spike_rollback=True, ema_decay=0.9)
