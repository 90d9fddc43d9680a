"""GPU paths (bf16 on CUDA): skipped cleanly on machines without a GPU, as in CI."""

from __future__ import annotations

import pytest
import torch

from _objectives_fixtures import micro_llama, seam_batches
from selfdestruct.objectives.ctrap import CtrapParams, ctrap_step
from selfdestruct.objectives.seam import SeamParams, seam_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _on_cuda(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


def test_seam_step_on_bf16_cuda_restores_weights_and_gives_finite_fp32_stats():
    model = micro_llama(dtype=torch.bfloat16).cuda()
    before = [p.detach().clone() for p in model.parameters()]
    harmful, refusal, benign = (_on_cuda(b) for b in seam_batches())
    stats = seam_step(model, harmful, refusal, benign, SeamParams(beta=1.0, eps=1e-2))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # perturbations undone exactly
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())
    assert -1.0 <= stats["cos"] <= 1.0 and stats["norm_a"] > 0 and stats["norm_b"] > 0


def test_ctrap_step_on_bf16_cuda_restores_weights():
    model = micro_llama(dtype=torch.bfloat16).cuda()
    before = [p.detach().clone() for p in model.parameters()]
    harmful, align, general = (_on_cuda(b) for b in seam_batches(seed=1))
    stats = ctrap_step(model, align, harmful, general, CtrapParams(measure_lookahead=False), token_id=5)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert stats["loss_collapse"] > 0


def test_evaluation_runs_on_the_gpu_and_leaves_the_model_where_it_was():
    from test_evaluator_counts import _DeviceSpy, _sets
    from selfdestruct.eval.judges import KeywordJudge

    spy = _DeviceSpy(tokenizer=None, sets=_sets(), judge=KeywordJudge(), show_progress=False, device="cuda")
    spy.seen = []
    model = torch.nn.Linear(1, 1)
    result, _ = spy(model, "post")
    assert spy.seen == ["cuda", "cuda"] and next(model.parameters()).device.type == "cpu"
    assert result["utility"] == pytest.approx(0.5)
