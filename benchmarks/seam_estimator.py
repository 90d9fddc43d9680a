"""Accuracy of SEAM's Hessian-free estimate of ∇cos(g_a, g_b) against double backward, as ε shrinks.

For each scheme (forward: the paper's one-sided differences, O(ε); central: symmetric differences, O(ε²)), each
model dtype and each ε, prints one JSON line {"scheme", "dtype", "eps", "rel_error"} with
rel_error = ‖estimate − exact‖ / ‖exact‖ on a freshly initialised micro Llama (≈0.2 M parameters) and random
harmful/benign batches. Below ε ≈ 1e-3 float32 round-off (≈ 1e-7/ε) takes over; an fp64 Llama lowers it but
not to fp64 levels, because its RMSNorm and rotary tables compute in fp32.

    python benchmarks/seam_estimator.py [--seed 0] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfdestruct.objectives.seam import SeamParams, sd_gradient

EPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def micro_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    """Hidden 64, 2 layers, 4 heads, intermediate 176: the micro model of the tests."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def random_batch(vocab: int, gen: torch.Generator, rows: int = 4, prompt: int = 6, response: int = 10) -> dict:
    """Right-padded prompt/response rows of random tokens; loss on the response, one row shorter (padding)."""
    ids = torch.randint(3, vocab, (rows, prompt + response), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    ids[-1, -3:], labels[-1, -3:], mask[-1, -3:] = 0, -100, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rel_error(estimate: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(estimate, exact))
    den = sum(float(b.double().square().sum()) for b in exact)
    return math.sqrt(num / den)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the batches")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size of the micro Llama")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    harmful, benign = random_batch(args.vocab, gen), random_batch(args.vocab, gen)
    base = micro_llama(args.vocab, args.seed)
    print(f"# micro Llama, {sum(p.numel() for p in base.parameters())} parameters", file=sys.stderr)
    for dtype_name, dtype in DTYPES.items():
        model = base.to(dtype)
        exact, _ = sd_gradient(model, harmful, benign, SeamParams(estimator="exact"))
        for scheme in ("forward", "central"):
            for eps in EPS:
                estimate, _ = sd_gradient(model, harmful, benign, SeamParams(eps=eps, estimator=scheme))
                row = {"scheme": scheme, "dtype": dtype_name, "eps": eps, "rel_error": rel_error(estimate, exact)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
