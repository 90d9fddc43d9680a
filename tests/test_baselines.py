"""The baseline defenses (RepNoise, Vaccine, NPO, Booster): one step of each against the published arithmetic.

Each reference below restates a published training step from the raw Hugging Face outputs of a float64 micro Llama
(logits, hidden states, forward hooks on the layers) with plain autograd, independently of the objective's code;
the step's accumulated gradient must match it to a relative error of 1e-6. The composition test runs the four
configs through ``python -m selfdestruct.defend`` as a Hydra multirun.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _objectives_fixtures import micro_llama, param_grads, rel_error, seam_batches
from conftest import SMOKE_OVERRIDES

from selfdestruct.defenses import DEFENSES
from selfdestruct.objectives.booster import BoosterParams, booster_step
from selfdestruct.objectives.npo import NpoParams, npo_step
from selfdestruct.objectives.repnoise import RepNoiseParams, repnoise_step
from selfdestruct.objectives.vaccine import VaccineParams, vaccine_step

torch.set_num_threads(1)
TOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model():
    return micro_llama(seed=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def batches():
    harmful, refusal, align = seam_batches(seed=6)
    return harmful, refusal, align


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, from full logits."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _step_gradient(step, model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    stats = step(model, *args, **kwargs)
    grads = param_grads(model)
    model.zero_grad(set_to_none=True)
    return grads, stats


# ---- RepNoise -------------------------------------------------------------------------------------------------


def _mmd_by_pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RepNoise's MMD² written pair by pair: five Gaussian kernels, bandwidths 2^(i-2)·(mean off-diagonal squared
    distance, held constant), E[k(x,x')] + E[k(y,y')] − 2·E[k(x,y)]."""
    z = torch.cat([x, y])
    n = z.shape[0]
    dist = torch.stack([torch.stack([(z[i] - z[j]).square().sum() for j in range(n)]) for i in range(n)])
    base = float(dist.detach().sum()) / (n * n - n) / 4.0
    kernel = sum(torch.exp(-dist / (base * 2.0**i)) for i in range(5))
    b = x.shape[0]
    return kernel[:b, :b].mean() + kernel[b:, b:].mean() - kernel[:b, b:].mean() - kernel[b:, :b].mean()


def _repnoise_reference(model, harmful, refusal, alpha: float, beta: float) -> torch.Tensor:
    """CE(refusal) + β·mean_l MMD²(h_l·m, N(0,I)·m) − α·log((CE(final) + Σ_h CE(lm_head(norm(h))))/(L+1) + 1)."""
    layers = model.model.layers
    mlp_out: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, _i, out: mlp_out.append(out)) for layer in layers]
    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    for h in hooks:
        h.remove()
    stack = _ce(out.logits, harmful["labels"])
    for hidden in out.hidden_states:
        stack = stack + _ce(model.lm_head(model.model.norm(hidden)), harmful["labels"])
    barrier = torch.log(stack / len(out.hidden_states) + 1.0)
    mask = (harmful["labels"] != -100).to(torch.float64).unsqueeze(-1)
    noise = sum(_mmd_by_pairs((h * mask).flatten(1), (torch.randn_like(h) * mask).flatten(1)) for h in mlp_out)
    noise = noise / len(layers)
    harmless = _ce(_logits(model, refusal), refusal["labels"])
    return harmless + beta * noise - alpha * barrier


def test_repnoise_step_is_the_published_arithmetic(model, batches):
    harmful, refusal, _ = batches
    p = RepNoiseParams(alpha=1.5, beta=0.3)  # β large enough that the noise term is visible in the gradient
    torch.manual_seed(11)
    got, stats = _step_gradient(repnoise_step, model, harmful, refusal, p)
    torch.manual_seed(11)
    loss = _repnoise_reference(model, harmful, refusal, p.alpha, p.beta)
    want = torch.autograd.grad(loss, list(model.parameters()))
    assert rel_error(got, want) <= TOL
    assert stats["loss"] == pytest.approx(float(loss), rel=TOL)
    # the noise term matters: without it the gradient moves by far more than the tolerance
    torch.manual_seed(11)
    no_noise, _ = _step_gradient(repnoise_step, model, harmful, refusal, RepNoiseParams(alpha=1.5, beta=0.0))
    assert rel_error(no_noise, want) > 1e3 * TOL and stats["loss_noise"] > 0


# ---- Vaccine --------------------------------------------------------------------------------------------------


def _vaccine_reference(model, align, rho: float) -> list[torch.Tensor]:
    """Pass 1: g_l = ∂CE/∂(attention output of layer l); ε_l = ρ·g_l/(sqrt(Σ_l ‖g_l‖²) + 1e-7). Pass 2: the
    same batch with ε_l added to each attention output; its parameter gradient is the step."""
    attention = [layer.self_attn for layer in model.model.layers]
    seen: list[torch.Tensor] = []
    hooks = [a.register_forward_hook(lambda _m, _i, out: seen.append(out[0])) for a in attention]
    clean = _ce(_logits(model, align), align["labels"])
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(clean, seen)
    length = torch.sqrt(sum(g.square().sum() for g in grads))
    eps = [rho * g / (length + 1e-7) for g in grads]
    hooks = [a.register_forward_hook(lambda _m, _i, out, e=e: (out[0] + e, *out[1:])) for a, e in zip(attention, eps)]
    perturbed = _ce(_logits(model, align), align["labels"])
    for h in hooks:
        h.remove()
    return list(torch.autograd.grad(perturbed, list(model.parameters())))


def test_vaccine_step_is_the_published_arithmetic(model, batches):
    _, _, align = batches
    got, stats = _step_gradient(vaccine_step, model, align, VaccineParams(rho=2.0))
    want = _vaccine_reference(model, align, 2.0)
    assert rel_error(got, want) <= TOL
    clean = list(torch.autograd.grad(_ce(_logits(model, align), align["labels"]), list(model.parameters())))
    assert rel_error(clean, want) > 1e3 * TOL  # the perturbation changes the step
    assert stats["loss"] > stats["loss_clean"]  # ε points up the alignment loss


# ---- NPO ------------------------------------------------------------------------------------------------------


def _mean_response_logp(model, batch) -> torch.Tensor:
    """Per example: the mean over its response tokens of log softmax(logits)[next token]."""
    logp = _logits(model, batch)[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    rows = []
    for i in range(labels.shape[0]):
        positions = (labels[i] != -100).nonzero().flatten()
        rows.append(torch.stack([logp[i, t, labels[i, t]] for t in positions]).mean())
    return torch.stack(rows)


def test_npo_step_is_the_published_arithmetic(model, batches):
    harmful, _, align = batches
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the model has moved away from its reference, as after a few defense steps
        for q in model.parameters():
            q.add_(0.02 * torch.randn_like(q))
    rho = 0.3
    got, stats = _step_gradient(npo_step, model, align, harmful, NpoParams(rho=rho), reference=reference)
    log_ratio = _mean_response_logp(model, harmful) - _mean_response_logp(reference, harmful).detach()
    loss = _ce(_logits(model, align), align["labels"]) - rho * torch.log(torch.sigmoid(-log_ratio)).mean()
    want = torch.autograd.grad(loss, list(model.parameters()))
    assert rel_error(got, want) <= TOL
    assert stats["loss"] == pytest.approx(float(loss), rel=TOL)
    assert all(q.grad is None for q in reference.parameters())  # the reference stays frozen


# ---- Booster --------------------------------------------------------------------------------------------------


def test_booster_step_is_the_published_arithmetic(model, batches):
    """∇ℓ(θ; retain) + λ·(∇ℓ(θ; D_h) − ∇ℓ(θ'; D_h)), θ' = θ − α·g_h/(‖g_h‖ + 1e-7), on a moved copy."""
    harmful, _, retain = batches
    lam, alpha = 5.0, 0.1
    params = list(model.parameters())
    g_h = torch.autograd.grad(_ce(_logits(model, harmful), harmful["labels"]), params)
    length = math.sqrt(sum(float(g.square().sum()) for g in g_h)) + 1e-7
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for q, g in zip(moved.parameters(), g_h):
            q.sub_(alpha * g / length)
    g_after = torch.autograd.grad(_ce(_logits(moved, harmful), harmful["labels"]), list(moved.parameters()))
    g_retain = torch.autograd.grad(_ce(_logits(model, retain), retain["labels"]), params)
    want = [r + lam * (a - b) for r, a, b in zip(g_retain, g_h, g_after)]
    state = [q.detach().clone() for q in params]
    got, stats = _step_gradient(booster_step, model, retain, harmful, BoosterParams(lam=lam, alpha=alpha))
    assert rel_error(got, want) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(state, model.parameters()))  # weights restored bit for bit
    assert stats["loss_harmful_lookahead"] < stats["loss_harmful"]  # the simulated step lowers the harmful loss
    assert stats["loss"] == pytest.approx(stats["loss_align"] + lam * (stats["loss_harmful"]
                                                                        - stats["loss_harmful_lookahead"]))


# ---- every baseline: registered, with a config whose every parameter is written out ---------------------------


@pytest.mark.parametrize("name", ["repnoise", "vaccine", "npo", "booster"])
def test_baseline_defaults_are_the_dataclass_defaults(name, tmp_path):
    from helpers import compose_config

    from selfdestruct.pipeline.defense import parse_params

    cfg = compose_config("defend", [f"defense={name}"], tmp_path)
    cls = DEFENSES[name].params
    assert set(cfg.defense.params) == {f.name for f in __import__("dataclasses").fields(cls)}
    assert parse_params(name, cfg.defense.params) == cls()  # the YAML and the dataclass cannot disagree
    lines = (ROOT / "conf" / "defense" / f"{name}.yaml").read_text().splitlines()
    assert all("#" in line for line in lines if line.strip() and not line.rstrip().endswith(":")
               and not line.startswith("name:"))


# ---- the entry point runs them all ----------------------------------------------------------------------------


def test_defend_multirun_over_the_baselines(tmp_path):
    """``python -m selfdestruct.defend -m defense=...`` on the micro model, one batch per stage."""
    names = ["repnoise", "vaccine", "booster", "npo"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               SELFDESTRUCT_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "selfdestruct.defend", "-m", f"defense={','.join(names)}", *SMOKE_OVERRIDES,
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    metrics = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("metrics.json"))]
    assert sorted(m["defense"] for m in metrics) == sorted(names)
    assert all(math.isfinite(m["pre"]["utility"]) for m in metrics)
