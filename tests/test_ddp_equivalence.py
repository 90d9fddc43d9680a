"""SEAM and CTRAP under data parallelism (SPEC §3, issue 5): 2 CPU processes over gloo, each holding half of a
batch, against 1 process holding the whole batch.

What must hold after N optimiser steps (AdamW in fp64; SGD in fp32/bf16, see ``_optimizer``):
- both ranks hold bit-identical weights (every rank perturbs and steps identically);
- the weights equal those of one process stepping on the concatenated batch, within round-off, also when the
  two ranks hold different numbers of labelled tokens (the token-weighted reduction of common.pooled).

The objectives are driven directly with ``reduce_fn=all_reduce_mean`` (deterministic, no Lightning in the way);
one more test goes through ``pl.Trainer(strategy="ddp_spawn")`` with SEAM's defense module and also checks that
DDP's own gradient hooks never fire (the objectives' reduction is the only one).

Errors are relative, ‖x_2proc − x_1proc‖ / ‖x_1proc‖, on the weight change Δθ = θ_N − θ_0 and on the first
step's gradient. The two runs differ only in summation order (per-rank sums, then the all-reduce), amplified by
1/ε = 1e3 in SEAM's finite difference. Measured: fp64 gradient ≤ 2e-16, Δθ after 3 AdamW steps ≤ 1e-10
(AdamW's per-entry normalisation amplifies round-off in entries with tiny gradients); fp32 gradient ≤ 4e-5,
the round-off floor of a finite difference at ε = 1e-3 (SPEC §3). The bounds (1e-12 / 1e-7 fp64, 1e-3 fp32)
leave margins of ≥ 20×. The same fp64 run with a reducer that only averages gradient lists (per-rank means
and per-rank S: the reduction before this test existed) misses by ~0.7, which the negative control checks,
so the bounds do discriminate.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _objectives_fixtures import batch_from_rows, micro_llama, rel_error
from torch.utils.data import DataLoader

from selfdestruct.modules.defense import DefenseModule
from selfdestruct.objectives.common import all_reduce_mean
from selfdestruct.objectives.ctrap import CtrapParams, SecondMoment, ctrap_step
from selfdestruct.objectives.seam import SeamParams, seam_step
from selfdestruct.pipeline.config import OptimConfig

torch.set_num_threads(1)  # also runs in every spawned worker, which imports this module

WORLD = 2
STEPS = 3
LR = 1e-3
WIDTH = 16  # every batch padded to one width, so 1 and 2 processes see the same attention shapes
JOIN_TIMEOUT_S = 150
PG_TIMEOUT = timedelta(seconds=60)  # a collective waiting for a dead peer fails instead of hanging
COLLAPSE_TOKEN = 7

# response lengths of the B=2 rows held by rank 0 and rank 1
UNEQUAL = ([2, 3], [7, 9])
EQUAL = ([6, 5], [5, 6])

# name: (objective, dtype, response lengths, options)
CASES = {
    "seam_fp64_unequal": ("seam", torch.float64, UNEQUAL, dict(beta=0.5, benign_weight=0.3)),
    "seam_fp32_official": ("seam", torch.float32, EQUAL, dict(beta=0.5, official_masking=True)),
    "seam_bf16_unequal": ("seam", torch.bfloat16, UNEQUAL, dict(beta=0.5, eps=0.1)),
    "seam_fp64_plain_reducer": ("seam", torch.float64, UNEQUAL, dict(beta=0.5, benign_weight=0.3)),
    "seam_fp64_sign": ("seam", torch.float64, UNEQUAL, dict(beta=0.5, coupling="sign")),
    "ctrap_fp64_unequal": ("ctrap", torch.float64, UNEQUAL, dict()),
    "ctrap_fp32_unroll_adam": ("ctrap", torch.float32, UNEQUAL, dict(unroll_steps=2, lookahead="adam")),
}
# bounds on the relative error of the weight change after STEPS steps and of the first step's gradient
TOL = {torch.float64: 1e-7, torch.float32: 1e-3}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-3, torch.bfloat16: 5e-2}


# --------------------------------------------------------------------------------------------------------------
# Data: the same rows, split over two ranks or concatenated
# --------------------------------------------------------------------------------------------------------------


def _stream(seed: int, lengths: tuple[list[int], list[int]], prompt_len: int = 4) -> list[tuple[list, list]]:
    """Per rank, (prompts, responses) of its rows; token ids in [3, 256)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rank_lengths in lengths:
        prompts = [[1, *torch.randint(3, 256, (prompt_len,), generator=gen).tolist()] for _ in rank_lengths]
        responses = [[*torch.randint(3, 256, (n - 1,), generator=gen).tolist(), 2] for n in rank_lengths]
        out.append((prompts, responses))
    return out


def _batch(stream: list[tuple[list, list]], rank: int | None, prompts_from=None) -> dict:
    """Rank ``rank``'s rows, or every row (``None``); ``prompts_from`` pairs a stream with another's prompts."""
    ranks = range(WORLD) if rank is None else [rank]
    prompts = [p for r in ranks for p in (prompts_from or stream)[r][0]]
    responses = [x for r in ranks for x in stream[r][1]]
    return batch_from_rows(prompts, responses, WIDTH)


def _batches(case: str, rank: int | None) -> tuple[dict, dict, dict]:
    kind, _, lengths, _ = CASES[case]
    shorter = tuple([max(2, n - 1) for n in rl] for rl in lengths)
    first, second, third = _stream(10, lengths), _stream(11, shorter), _stream(12, lengths[::-1])
    if kind == "seam":  # harmful, refusal (same prompts as harmful), benign
        return _batch(first, rank), _batch(second, rank, prompts_from=first), _batch(third, rank)
    return _batch(second, rank), _batch(first, rank), _batch(third, rank)  # align, harmful, general


# --------------------------------------------------------------------------------------------------------------
# N steps of one case
# --------------------------------------------------------------------------------------------------------------


def _plain_reduce(tensors):
    """Averages gradient lists only (no ``mean_values``): per-rank token means and per-rank S."""
    all_reduce_mean(tensors)


def _optimizer(model: torch.nn.Module, dtype: torch.dtype) -> torch.optim.Optimizer:
    """AdamW in fp64; plain SGD otherwise, because AdamW divides each entry by its own magnitude: an entry whose
    gradient is at fp32 round-off (~1e-7 here, the floor of a finite difference at ε = 1e-3) gets a full ±lr
    step whose sign is noise, in one process as in two, so fp32 AdamW trajectories agree only to ~1e-2."""
    if dtype == torch.float64:
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    return torch.optim.SGD(model.parameters(), lr=LR)


def _run(case: str, rank: int | None, reduce_fn) -> dict:
    kind, dtype, _, options = CASES[case]
    torch.manual_seed(0)
    model = micro_llama(dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = _optimizer(model, dtype)
    a, b, c = _batches(case, rank)
    moment = SecondMoment() if options.get("lookahead") == "adam" else None
    history, first_grads = [], None
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        if kind == "seam":
            stats = seam_step(model, a, b, c, SeamParams(**{"eps": 1e-3, **options}), reduce_fn=reduce_fn)
        else:
            stats = ctrap_step(model, a, b, c, CtrapParams(lam=0.5, measure_lookahead=True, **options),
                               token_id=COLLAPSE_TOKEN, second_moment=moment, reduce_fn=reduce_fn)
        if first_grads is None:
            first_grads = [p.grad.detach().float().clone() for p in model.parameters()]
        optimizer.step()
        history.append(stats)
    after = [p.detach().clone() for p in model.parameters()]
    return {"before": before, "after": after, "grads": first_grads, "history": history}


def _worker(rank: int, port: int, out_dir: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
    try:
        for case in cases:
            reduce_fn = _plain_reduce if "plain_reducer" in case else all_reduce_mean
            torch.save(_run(case, rank, reduce_fn), Path(out_dir) / f"{case}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args: tuple, timeout_s: float) -> None:
    """``mp.spawn`` 2 processes; fail (never hang) if they have not all finished in ``timeout_s``."""
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"DDP workers still running after {timeout_s} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case on 2 ranks (one spawn for all of them) and on 1 process with the whole batch."""
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, (_free_port(), str(out), list(CASES)), JOIN_TIMEOUT_S)
    result = {}
    for case in CASES:
        ranks = [torch.load(out / f"{case}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
        result[case] = (ranks, _run(case, None, None))
    return result


def _delta_error(run: dict, ref: dict) -> float:
    """‖Δθ − Δθ_ref‖ / ‖Δθ_ref‖ over all parameters, Δθ = θ_N − θ_0."""
    return rel_error([a.double() - b.double() for a, b in zip(run["after"], run["before"])],
                     [a.double() - b.double() for a, b in zip(ref["after"], ref["before"])])


# --------------------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------------------


def _token_counts(case: str) -> list[int]:
    return [int((batch["labels"] != -100).sum()) for batch in _batches(case, 0)] + [
        int((batch["labels"] != -100).sum()) for batch in _batches(case, 1)]


@pytest.mark.parametrize("case", [c for c in CASES if "plain_reducer" not in c and "bf16" not in c])
def test_two_ranks_equal_one_process_on_the_whole_batch(runs, case):
    (rank0, rank1), single = runs[case]
    dtype = CASES[case][1]
    # identical weights on both ranks, bit for bit, after every step's perturbations and updates
    assert all(torch.equal(a, b) for a, b in zip(rank0["after"], rank1["after"]))
    assert all(torch.equal(a, b) for a, b in zip(rank0["before"], single["before"]))
    err = _delta_error(rank0, single)
    assert err < TOL[dtype], f"{case}: 2 ranks vs 1 process, relative weight-change error {err:.3g}"
    assert rel_error(rank0["grads"], single["grads"]) < GRAD_TOL[dtype]
    # the pooled stats are the whole batch's, on every rank
    for h0, h1, hs in zip(rank0["history"], rank1["history"], single["history"]):
        assert h0 == h1
        assert h0 == pytest.approx(hs, rel=1e-3 if dtype == torch.float32 else 1e-8)


def test_the_unequal_cases_really_have_unequal_token_counts():
    counts = _token_counts("seam_fp64_unequal")
    half = len(counts) // 2
    assert all(a != b for a, b in zip(counts[:half], counts[half:]))


def test_a_reducer_of_gradient_lists_only_is_not_exact(runs):
    """Negative control: per-rank means and per-rank S (the old reduction) miss by far more than the tolerance."""
    (rank0, rank1), single = runs["seam_fp64_plain_reducer"]
    assert all(torch.equal(a, b) for a, b in zip(rank0["after"], rank1["after"]))  # consistent, but wrong
    assert rel_error(rank0["grads"], single["grads"]) > 1e-2
    assert _delta_error(rank0, single) > 1e-2


def test_bf16_ranks_stay_identical_and_match_one_process(runs):
    """bf16 weights (fp32 gradient snapshots): ranks stay identical and the first gradient matches one process
    to bf16 round-off (measured 1.2e-2). ε = 0.1 because a bf16 weight cannot resolve the default ε = 1e-3 step
    on this model (3 % of the entries move, in one process as in two), which makes both runs noise."""
    (rank0, rank1), single = runs["seam_bf16_unequal"]
    assert all(torch.equal(a, b) for a, b in zip(rank0["after"], rank1["after"]))
    assert all(bool(torch.isfinite(g).all()) for g in rank0["grads"])
    assert rel_error(rank0["grads"], single["grads"]) < GRAD_TOL[torch.bfloat16]


# ---- Through Lightning -----------------------------------------------------------------------------------------

_DDP_HOOK_CALLS = [0]


def _counting_comm_hook(state, bucket):
    """DDP's gradient all-reduce, counted: it must never run (the objectives average the gradients)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    _DDP_HOOK_CALLS[0] += 1
    return allreduce_hook(state, bucket)


class _RecordingSEAM(DefenseModule):
    """The SEAM defense module that writes each rank's final weights, stats and DDP hook count to ``out_dir``."""

    def __init__(self, model, out_dir: str, lr: float, **params) -> None:
        super().__init__(model, OptimConfig(lr=lr), SeamParams(**params), seam_step, ("harmful", "refusal", "benign"))
        self.out_dir = out_dir

    def on_train_start(self) -> None:
        # Lightning registers ``ddp_comm_hook`` on CUDA only; register the counter on the DDP wrapper directly
        ddp = self.trainer.strategy.model
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        ddp.register_comm_hook(None, _counting_comm_hook)

    def on_train_end(self) -> None:
        torch.save({"params": [p.detach().clone() for p in self.model.parameters()], "history": self.history,
                    "hook_calls": _DDP_HOOK_CALLS[0]}, Path(self.out_dir) / f"rank{self.global_rank}.pt")


def test_lightning_ddp_spawn_keeps_ranks_identical_and_matches_one_process(tmp_path):
    from pytorch_lightning.strategies import DDPStrategy

    steps = 2
    case = "seam_fp64_unequal"
    rank_batches = [dict(zip(("harmful", "refusal", "benign"), _batches(case, r))) for r in range(WORLD)]
    # DistributedSampler (no shuffling) hands item i to rank i % 2: rank r sees its own slice at every step
    data = DataLoader([rank_batches[i % WORLD] for i in range(WORLD * steps)], batch_size=None)
    model = micro_llama(dtype=torch.float64)
    kwargs = dict(lr=LR, beta=0.5, benign_weight=0.3)
    module = _RecordingSEAM(model, str(tmp_path), **kwargs)
    strategy = DDPStrategy(start_method="spawn", timeout=PG_TIMEOUT)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, data)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["hook_calls"] == r1["hook_calls"] == 0, "DDP's own gradient all-reduce ran"
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert r0["history"] == r1["history"] and len(r0["history"]) == steps

    # one process, the whole batch, the same AdamW (the module's constant schedule is a factor 1)
    reference = micro_llama(dtype=torch.float64)
    before = [p.detach().clone() for p in reference.parameters()]
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.0)
    full = _batches(case, None)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        seam_step(reference, *full, SeamParams(beta=0.5, benign_weight=0.3))
        optimizer.step()
    err = _delta_error({"before": before, "after": r0["params"]},
                       {"before": before, "after": [p.detach() for p in reference.parameters()]})
    assert err < TOL[torch.float64], f"Lightning DDP vs 1 process: relative weight-change error {err:.3g}"
