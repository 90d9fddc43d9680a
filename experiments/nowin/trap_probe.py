"""Probe the traps of saved defended models with the defender's data only, one JSON line per model.

    python experiments/nowin/trap_probe.py DEFEND_RUN_OR_MODEL_DIR ... [--out FILE]

For each model: AdamW fine-tunes of a copy on the defense's harmful pool (``DataBundle.defense_harmful``, never the
attacker's data), ``STEPS`` steps of ``BATCH`` examples at each learning rate of ``LRS``, then the mean
response-token cross-entropy on the first ``NUM_BENIGN`` benign tasks of the alignment data; the score is the
median of those cross-entropies over the learning rates. The data order is the model's defense seed (its
provenance). A defend run directory stands for its model/, a grid cell for the model its metrics.json names.
experiments/nowin/README.md ("What decides a shallow trap") reports how well the score predicts the no-win count.
"""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

import torch

LRS = (2e-4, 3e-4, 5e-4)
STEPS, BATCH, NUM_BENIGN, MAX_LENGTH = 60, 16, 256, 96


def _batches(examples, tokenizer, fmt, size: int, device) -> list[dict[str, torch.Tensor]]:
    from selfdestruct.data.formatting import collate, encode_example

    features = [encode_example(tokenizer, ex, MAX_LENGTH, fmt, None) for ex in examples]
    return [{k: v.to(device) for k, v in collate(features[i:i + size], tokenizer.pad_token_id).items()}
            for i in range(0, len(features), size)]


def mean_response_ce(model: torch.nn.Module, tokenizer, examples, fmt) -> float:
    """Cross-entropy per labelled token over ``examples`` (the evaluator's token_nll, divided by its count)."""
    from selfdestruct.eval.evaluator import token_nll

    total, count = token_nll(model, tokenizer, examples, fmt, MAX_LENGTH, 32)
    return total / count


def trap_probe(model: torch.nn.Module, tokenizer, harmful, benign, fmt, seed: int, lrs=LRS, steps: int = STEPS,
               batch: int = BATCH, num_benign: int = NUM_BENIGN) -> dict:
    """``{"before": ce, "after": {lr: ce}, "score": median of after}`` (nats per token); the weights are put back
    exactly afterwards."""
    device = next(model.parameters()).device
    order = list(harmful)
    random.Random(seed).shuffle(order)
    train = _batches(order, tokenizer, fmt, batch, device)
    measured = list(benign)[:num_benign]
    model.eval()
    before = mean_response_ce(model, tokenizer, measured, fmt)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after = {}
    try:
        for lr in lrs:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
            model.train()
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                model(**train[step % len(train)]).loss.backward()
                optimizer.step()
            model.eval()
            after[float(lr)] = mean_response_ce(model, tokenizer, measured, fmt)
            model.load_state_dict(start)
    finally:
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
    return {"before": before, "after": after, "score": statistics.median(after.values())}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from saved_models import for_each_model

    from selfdestruct.pipeline.streams import benign_tasks

    def measure(model, tokenizer, cfg, bundle, fmt, seed, path, args) -> dict:
        result = trap_probe(model, tokenizer, bundle.defense_harmful, benign_tasks(bundle.align), fmt, seed)
        return {"probe_order": seed, **result}

    return for_each_model(__doc__, argv, measure)


if __name__ == "__main__":
    sys.exit(main())
