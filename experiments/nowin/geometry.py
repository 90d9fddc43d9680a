"""Gradient geometry of a released model on HELD-OUT data: cos(g_a, g_b), ‖g_a‖, ‖g_b‖.

    python experiments/nowin/geometry.py MODEL_DIR [MODEL_DIR ...] [--batch-size 16] [--pairs 16] [--json OUT]

g_a is the attacker's gradient, ∇ CE of the compliant (harmful) responses to the synthetic world's held-out
harmful prompts (split ``eval_harmful``, never seen by the defense or the attack); g_b is the benign gradient,
∇ CE of the answers to the held-out benign tasks (split ``eval_benign``). SEAM minimises cos(g_a, g_b) on its
training batches; this script checks whether the coupling generalises to prompts it never trained on.

Two numbers per model:
- ``cos``: the mean over ``--pairs`` random (harmful batch, benign batch) pairs of ``--batch-size`` examples
  (default 16, the attacker's batch size): what an attacker's mini-batch step sees;
- ``cos_full``: the cosine of the full-split gradients (64 harmful vs 120 benign examples), the expected
  directions without mini-batch noise.

It prints one JSON object per model (and writes them all as a list with ``--json``). Deterministic: the batches
are drawn from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from selfdestruct.data.formatting import DEFAULT_TEMPLATE, PromptFormat, collate, encode_example
from selfdestruct.data.records import Example
from selfdestruct.data.synthetic import SyntheticWorld, WorldConfig
from selfdestruct.models.io import load_model_dir
from selfdestruct.objectives.common import dot, gradient, norm, response_ce, snapshot, trainable_parameters

MAX_LENGTH = 96  # the defense's and the attack's max_length


def held_out(world_seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(harmful prompts with their compliant responses, benign tasks with their answers), both held out."""
    world = SyntheticWorld(WorldConfig(seed=world_seed))
    return list(world.split("eval_harmful")), list(world.split("eval_benign"))


def batch_gradient(model: torch.nn.Module, tokenizer, examples: Sequence[Example],
                   fmt: PromptFormat) -> list[torch.Tensor]:
    """∇ of the mean response-token cross-entropy of ``examples`` (one batch), detached, fp32."""
    batch = collate([encode_example(tokenizer, ex, MAX_LENGTH, fmt) for ex in examples], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    params = trainable_parameters(model)
    return snapshot(gradient(response_ce(model, batch), params))


def cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    na, nb = norm(a), norm(b)
    return dot(a, b) / (na * nb), na, nb


def measure(model_dir: str | Path, batch_size: int = 16, pairs: int = 16, seed: int = 0, world_seed: int = 0,
            template: str = DEFAULT_TEMPLATE, device: str = "cpu") -> dict[str, float | str | int]:
    """cos(g_a, g_b) of the model in ``model_dir`` on held-out batches (see the module docstring)."""
    torch.manual_seed(seed)
    model, tokenizer = load_model_dir(model_dir)
    model.to(device)
    model.eval()  # no dropout in the tiny Llama, but be explicit: gradients of the deterministic model
    fmt = PromptFormat(template)
    harmful, benign = held_out(world_seed)
    rng = random.Random(f"geometry-{seed}")
    per_pair, norms_a, norms_b = [], [], []
    for _ in range(pairs):
        ga = batch_gradient(model, tokenizer, rng.sample(harmful, batch_size), fmt)
        gb = batch_gradient(model, tokenizer, rng.sample(benign, batch_size), fmt)
        c, na, nb = cosine(ga, gb)
        per_pair.append(c)
        norms_a.append(na)
        norms_b.append(nb)
    full, na_full, nb_full = cosine(batch_gradient(model, tokenizer, harmful, fmt),
                                    batch_gradient(model, tokenizer, benign, fmt))
    return {
        "model": str(model_dir),
        "cos": statistics.fmean(per_pair),
        "cos_std": statistics.pstdev(per_pair),
        "cos_full": full,
        "norm_a": statistics.fmean(norms_a),
        "norm_b": statistics.fmean(norms_b),
        "norm_a_full": na_full,
        "norm_b_full": nb_full,
        "batch_size": batch_size,
        "pairs": pairs,
        "num_harmful": len(harmful),
        "num_benign": len(benign),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model directories (HF format, e.g. <defend run>/model)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per held-out batch (attacker: 16)")
    parser.add_argument("--pairs", type=int, default=16, help="random (harmful, benign) batch pairs averaged")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch draw")
    parser.add_argument("--world-seed", type=int, default=0, help="data.world_seed of the synthetic world")
    parser.add_argument("--json", type=Path, help="also write the results here as a JSON list")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one) | cpu | cuda[:N]")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    results = []
    for model_dir in args.models:
        result = measure(model_dir, args.batch_size, args.pairs, args.seed, args.world_seed, device=device)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
