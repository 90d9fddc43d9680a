"""How much of a training step on CPU is matrix products, and how fast this host does them.

The embedded default's demo time differs several-fold between hosts. This prints what decides it: the host's
float32 matrix-multiply rate on one thread (``selfdestruct.utils.provenance.gemm_gflops``, the number the
quickstart prints first and records in quickstart.json) and the share of the CPU time of an SFT step and of a
``conf/defense/ctrap_tuned`` step (the demo's costliest stage) spent in matrix products (``aten::mm``,
``aten::addmm``, ``aten::bmm``, ``aten::matmul``'s own time), from torch.profiler on the embedded default's shape,
a training batch and one torch thread (as in the demo's jobs). When that share is large and the rate is near the
core's arithmetic peak (FLOP per cycle × clock), the host is slow because of its arithmetic, not the code.

    python benchmarks/matmul_share.py
    python benchmarks/matmul_share.py --steps 3
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from ctrap_branch_threads import COLLAPSE_TOKEN, batch, build, tuned_params
from selfdestruct.objectives.ctrap import ctrap_step
from selfdestruct.utils.provenance import cpu_id, cpu_model, gemm_gflops

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")


def sft_step(model: torch.nn.Module, i: int) -> None:
    model(**batch(3 * i)).loss.backward()


def ctrap_tuned_step(model: torch.nn.Module, i: int, params) -> None:
    ctrap_step(model, batch(3 * i), batch(3 * i + 1), batch(3 * i + 2), params, token_id=COLLAPSE_TOKEN, replicas=[])


def matmul_share(step, steps: int) -> dict:
    """Profile ``steps`` calls of ``step(model, i)`` after one warm-up; the products' share of the self CPU time."""
    model = build()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def one(i: int) -> None:
        optimiser.zero_grad(set_to_none=True)
        step(model, i)
        optimiser.step()

    one(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, steps + 1):
            one(i)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS)
    return {"matmul_share": round(products / total, 3), "step_s": round(total / 1e6 / steps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = tuned_params()
    print(json.dumps({
        "cpu": cpu_model(), "cpu_id": cpu_id(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gemm_gflops_one_thread": round(gemm_gflops(), 1),
        "sft": matmul_share(sft_step, args.steps),
        "ctrap_tuned": matmul_share(lambda m, i: ctrap_tuned_step(m, i, params), args.steps),
        "steps": args.steps,
    }, indent=1))


if __name__ == "__main__":
    main()
