"""A defender's probe of its own trap (beyond the papers): how far a short harmful fine-tune drives the released
model's loss on benign tasks, measured with the defender's data only.

The probe fine-tunes a copy of the weights with AdamW on the defense's harmful pool (``DataBundle.defense_harmful``,
never the attacker's data) for ``steps`` steps at each learning rate of ``lrs``, and measures the mean response-token
cross-entropy on the alignment data's benign tasks before and after. Its score is the median over the learning
rates of the cross-entropy after: a deep trap drives it far up (on the embedded default, 2-9 nats), a shallow one
leaves it near its start (0.3-0.6). With ``min_score`` and ``retrains`` the defense stage trains the defense again, in
another data order, when the released model scores below ``min_score``, and releases the better-probed model.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selfdestruct.data.formatting import PromptFormat, collate, encode_example
from selfdestruct.data.records import Example
from selfdestruct.errors import FieldError, check_number


@dataclass(frozen=True)
class ProbeConfig:
    """``defense.probe``: the trap probe of the released model, and whether a shallow trap is trained again."""

    lrs: tuple[float, ...] = (2e-4, 3e-4, 5e-4)  # AdamW learning rates of the probing fine-tunes (one each)
    steps: int = 60  # optimiser steps of each probing fine-tune
    batch_size: int = 16  # harmful examples per probing step
    num_benign: int = 256  # benign task examples whose cross-entropy is measured
    min_score: float | None = None  # retrain when the score (nats) is below this; None: measure and record only
    retrains: int = 0  # at most this many more trainings of the defense, each in its own data order

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(self.lrs))
        if not self.lrs:
            raise FieldError("lrs", list(self.lrs), "expected at least one learning rate")
        for lr in self.lrs:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise FieldError("lrs", list(self.lrs), "expected learning rates > 0")
        check_number(self, "steps", low=1, integer=True)
        check_number(self, "batch_size", low=1, integer=True)
        check_number(self, "num_benign", low=1, integer=True)
        check_number(self, "min_score", low=0.0, optional=True)
        check_number(self, "retrains", low=0, integer=True)
        if self.retrains and self.min_score is None:
            raise FieldError("retrains", self.retrains, "retraining needs min_score (the score below which it runs)")


def retrain_seed(seed: int, attempt: int) -> int:
    """The data-order seed of the defense's ``attempt``-th retraining (0: the defense's own seed)."""
    return seed + 1000 * attempt


def _batches(examples: Sequence[Example], tokenizer, fmt: PromptFormat, max_length: int, size: int,
             device: torch.device) -> list[dict[str, torch.Tensor]]:
    features = [encode_example(tokenizer, ex, max_length, fmt, None) for ex in examples]
    return [{k: v.to(device) for k, v in collate(features[i:i + size], tokenizer.pad_token_id).items()}
            for i in range(0, len(features), size)]


@torch.no_grad()
def mean_response_ce(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Cross-entropy per labelled token over ``batches`` (each batch weighted by its labelled tokens)."""
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total / tokens


def trap_probe(model: torch.nn.Module, tokenizer, harmful: Sequence[Example], benign: Sequence[Example],
               fmt: PromptFormat, probe: ProbeConfig, seed: int, max_length: int = 96) -> dict:
    """Probe ``model``'s trap (see the module's docstring); the weights are put back exactly afterwards.

    Returns ``{"before": ce, "after": {lr: ce}, "score": median of after}`` in nats per token."""
    if not harmful or not benign:
        raise ValueError("the trap probe needs the defense's harmful examples and benign task examples")
    device = next(model.parameters()).device
    order = list(harmful)
    random.Random(seed).shuffle(order)
    steps = _batches(order, tokenizer, fmt, max_length, probe.batch_size, device)
    measured = _batches(list(benign)[:probe.num_benign], tokenizer, fmt, max_length, 32, device)
    was_training = model.training
    model.eval()
    before = mean_response_ce(model, measured)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after = {}
    try:
        for lr in probe.lrs:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            model.train()
            for step in range(probe.steps):
                optimizer.zero_grad(set_to_none=True)
                model(**steps[step % len(steps)]).loss.backward()
                optimizer.step()
            model.eval()
            after[float(lr)] = mean_response_ce(model, measured)
            model.load_state_dict(start)
    finally:
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"before": before, "after": after, "score": statistics.median(after.values())}
