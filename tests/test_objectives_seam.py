"""SEAM's objective functions checked against independent computations (SPEC §3, issue 3 acceptance)."""

from __future__ import annotations

import math

import pytest
import torch
from _objectives_fixtures import (
    assert_state_identical,
    batch_from_rows,
    clone_state,
    micro_llama,
    param_grads,
    rel_error,
    seam_batches,
)

from selfdestruct.objectives.common import NonFiniteGradientError, add_gradient, select_labels
from selfdestruct.objectives.seam import (
    masked_ce,
    official_mask,
    official_selection,
    plain_selection,
    sd_gradient,
    SeamParams,
    seam_selections,
    seam_step,
    unlearning_terms,
)

torch.set_num_threads(1)

# Estimator accuracy. The micro model is freshly initialised: its gradients are not tiny (|g_a|, |g_b| ≈ 2.6,
# |grad cos| ≈ 1.5), so relative errors are meaningful in fp32. Measured on it (fp32): forward 8.2e-2 at
# eps=1e-1, 8.2e-3 at 1e-2, 9.3e-4 at 1e-3, then 4e-3 at 1e-4 (round-off ~ 1e-7/eps takes over); central 1.1e-2
# at 1e-1, 1.1e-4 at 1e-2. An fp64 model does not remove the floor entirely: Llama's RMSNorm and rotary tables
# compute in fp32 whatever the model dtype. The slopes are fitted over eps in [1e-2, 1e-1], where the
# truncation error dominates.
EPS_FIT = (1e-2, 3e-2, 1e-1)


@pytest.fixture(scope="module")
def setup():
    model = micro_llama()
    harmful, refusal, benign = seam_batches()
    exact, stats = sd_gradient(model, harmful, benign, SeamParams(estimator="exact"))
    return model, harmful, refusal, benign, exact, stats


def _slope(eps: tuple[float, ...], errors: list[float]) -> float:
    xs, ys = [math.log(e) for e in eps], [math.log(r) for r in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def test_exact_gradient_is_not_degenerate(setup):
    _, _, _, _, exact, stats = setup
    assert stats["norm_a"] > 0.5 and stats["norm_b"] > 0.5
    assert math.sqrt(sum(float(g.square().sum()) for g in exact)) > 0.1


def test_forward_estimate_within_one_percent_at_eps_1e_3(setup):
    model, harmful, _, benign, exact, _ = setup
    est, _ = sd_gradient(model, harmful, benign, SeamParams(eps=1e-3, estimator="forward"))
    assert rel_error(est, exact) < 1e-2


def test_forward_error_is_first_order_in_eps(setup):
    model, harmful, _, benign, exact, _ = setup
    errors = [rel_error(sd_gradient(model, harmful, benign, SeamParams(eps=e))[0], exact) for e in EPS_FIT]
    assert 0.8 <= _slope(EPS_FIT, errors) <= 1.2, errors


def test_central_error_is_second_order_in_eps(setup):
    model, harmful, _, benign, exact, _ = setup
    errors = [rel_error(sd_gradient(model, harmful, benign, SeamParams(eps=e, estimator="central"))[0], exact)
              for e in EPS_FIT]
    assert _slope(EPS_FIT, errors) >= 1.6, errors
    forward = rel_error(sd_gradient(model, harmful, benign, SeamParams(eps=1e-2, estimator="forward"))[0], exact)
    assert errors[0] < forward / 10


def test_estimate_leaves_parameters_bit_identical_and_grads_untouched(setup):
    model, harmful, refusal, benign, _, _ = setup
    state = clone_state(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    for scheme in ("forward", "central", "exact"):
        sd_gradient(model, harmful, benign, SeamParams(eps=1e-1, estimator=scheme))
    assert_state_identical(model, state)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    for scheme in ("forward", "central"):
        model.zero_grad(set_to_none=True)
        seam_step(model, harmful, refusal, benign, SeamParams(beta=1.0, eps=1e-1, estimator=scheme))
        assert_state_identical(model, state)
    model.zero_grad(set_to_none=True)


def _sign_coupling_reference(model, harmful, benign):
    """∇cos(sign g_a, g_b) written out on its own: sign g_a a constant, g_b differentiated twice (eager attention)."""
    params = list(model.parameters())
    model.config._attn_implementation = "eager"
    try:
        ce_a = model(**harmful, use_cache=False).loss
        s = [torch.sign(g) for g in torch.autograd.grad(ce_a, params)]
        g_b = torch.autograd.grad(model(**benign, use_cache=False).loss, params, create_graph=True)
        sb = sum((x * y).sum() for x, y in zip(s, g_b))
        cos = sb / (math.sqrt(sum(float(x.square().sum()) for x in s)) * sum((y * y).sum() for y in g_b).sqrt())
        return [g.detach() for g in torch.autograd.grad(cos, params)], float(cos)
    finally:
        model.config._attn_implementation = "sdpa"


def test_sign_coupling_gradient_matches_its_independent_statement(setup):
    """coupling=sign: L_sd = cos(sign g_a, g_b); only H_b is left in its gradient, one finite difference."""
    model, harmful, refusal, benign, exact_gradient_coupling, _ = setup
    reference, cos = _sign_coupling_reference(model, harmful, benign)
    exact, stats = sd_gradient(model, harmful, benign, SeamParams(estimator="exact", coupling="sign"))
    assert rel_error(exact, reference) < 1e-5
    assert stats["cos"] == pytest.approx(cos, rel=1e-5)
    est, _ = sd_gradient(model, harmful, benign, SeamParams(eps=1e-3, estimator="forward", coupling="sign"))
    assert rel_error(est, reference) < 1e-2
    assert rel_error(reference, exact_gradient_coupling) > 0.1  # a different objective from the paper's cosine
    # in a step: loss_sd is the sign cosine, cos stays cos(g_a, g_b), the step adds beta times the estimate
    alpha, beta, eps = 0.7, 0.5, 1e-3
    ul_up, _ = _ul_up_gradients(model, harmful, refusal, alpha)
    est, _ = sd_gradient(model, harmful, benign, SeamParams(eps=eps, coupling="sign"))
    state = clone_state(model)
    stats = seam_step(model, harmful, refusal, benign, SeamParams(alpha=alpha, beta=beta, eps=eps, coupling="sign"))
    assert_state_identical(model, state)
    assert rel_error(param_grads(model), [u + beta * e for u, e in zip(ul_up, est)]) < 1e-4
    assert stats["loss_sd"] == pytest.approx(cos, rel=1e-5)
    assert abs(stats["cos"] - cos) > 1e-3
    assert stats["loss"] == pytest.approx(stats["loss_ul"] + alpha * stats["loss_up"] + beta * stats["loss_sd"])
    model.zero_grad(set_to_none=True)


def _ul_up_gradients(model, harmful, refusal, alpha, official=False):
    """∇L_ul + α∇L_up computed on their own, in the order seam_step accumulates them."""
    sels = seam_selections(harmful, harmful, refusal, official)  # the benign selection is not used here
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    unlearning_terms(model, harmful, sels.harmful).loss.backward()
    (alpha * masked_ce(model, refusal, sels.refusal)).backward()
    grads = param_grads(model)
    model.zero_grad(set_to_none=True)
    return grads, params


@pytest.mark.parametrize("official", [False, True])
def test_beta_zero_removes_the_coupling_term_exactly(setup, official):
    model, harmful, refusal, benign, _, _ = setup
    expected, _ = _ul_up_gradients(model, harmful, refusal, alpha=0.7, official=official)
    model.zero_grad(set_to_none=True)
    seam_step(model, harmful, refusal, benign, SeamParams(alpha=0.7, beta=0.0, official_masking=official))
    got = param_grads(model)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    # and the coupling term is really there when beta != 0
    model.zero_grad(set_to_none=True)
    seam_step(model, harmful, refusal, benign, SeamParams(alpha=0.7, beta=0.1, official_masking=official))
    assert rel_error(param_grads(model), expected) > 1e-3
    model.zero_grad(set_to_none=True)


def test_ul_up_gradient_matches_hugging_face_loss(setup):
    """Independent of this package's CE code: HF's own loss for L_up, and autograd on L_ul."""
    model, harmful, refusal, _, _, _ = setup
    expected, params = _ul_up_gradients(model, harmful, refusal, alpha=0.7)
    l_ul = unlearning_terms(model, harmful).loss
    l_up = model(**refusal, use_cache=False).loss
    reference = [a + 0.7 * b for a, b in zip(torch.autograd.grad(l_ul, params), torch.autograd.grad(l_up, params))]
    assert rel_error(expected, reference) < 1e-5


@pytest.mark.parametrize("estimator", ["forward", "exact"])
def test_step_gradient_is_the_sum_of_its_terms(setup, estimator):
    model, harmful, refusal, benign, _, _ = setup
    alpha, beta, gamma, eps = 0.7, 0.5, 0.3, 1e-3
    ul_up, _ = _ul_up_gradients(model, harmful, refusal, alpha)
    sd, coupling = sd_gradient(model, harmful, benign, SeamParams(eps=eps, estimator=estimator))
    sel = select_labels(benign["labels"])
    g_b = torch.autograd.grad(masked_ce(model, benign, sel), list(model.parameters()))
    expected = [u + beta * s + gamma * b for u, s, b in zip(ul_up, sd, g_b)]
    model.zero_grad(set_to_none=True)
    stats = seam_step(model, harmful, refusal, benign,
                      SeamParams(alpha=alpha, beta=beta, eps=eps, estimator=estimator, benign_weight=gamma))
    assert rel_error(param_grads(model), expected) < 1e-4
    assert stats["cos"] == pytest.approx(coupling["cos"], rel=1e-6)
    assert stats["norm_a"] == pytest.approx(coupling["norm_a"], rel=1e-6)
    assert stats["loss"] == pytest.approx(
        stats["loss_ul"] + alpha * stats["loss_up"] + beta * stats["cos"] + gamma * stats["ce_benign"]
    )
    assert model.config._attn_implementation == "sdpa"  # exact mode switched to eager and back
    model.zero_grad(set_to_none=True)


def test_unlearning_loss_matches_hand_computation():
    """S and L_ul rebuilt from the raw layer outputs with explicit loops over tokens."""
    model = micro_llama(vocab=64, seed=3)
    harmful, _, _ = seam_batches(vocab=64, seed=5, n=2)
    with torch.no_grad():  # a non-trivial final norm weight, so that norming twice differs from norming once
        model.model.norm.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
        model.lm_head.weight.mul_(20.0)  # logits of order 1, far from the uniform distribution
    captured: list[torch.Tensor] = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: captured.append(o))]
    hooks += [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in model.model.layers]
    with torch.no_grad():
        logits = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"]).logits
        for h in hooks:
            h.remove()
        emb, layer1, layer2 = captured
        norm, head, labels = model.model.norm, model.lm_head, harmful["labels"]

        def ce_by_hand(lg: torch.Tensor) -> float:
            total, count = 0.0, 0
            for b in range(labels.shape[0]):
                for t in range(labels.shape[1] - 1):
                    y = int(labels[b, t + 1])
                    if y != -100:
                        row = lg[b, t].double()
                        total += float(torch.logsumexp(row, 0) - row[y])
                        count += 1
            return total / count

        # HF's hidden_states are (embeddings, layer 1 output, norm(layer 2 output)); each gets norm + head again.
        lens = [ce_by_hand(head(norm(h))) for h in (emb, layer1, norm(layer2))]
        s = ce_by_hand(logits) + sum(lens)
        expected = -math.log(s / 3 + 1)
        once = ce_by_hand(logits) + lens[0] + lens[1] + ce_by_hand(head(norm(layer2)))
        terms = unlearning_terms(model, harmful)
    assert terms.num_hidden_states == 3
    assert float(terms.s) == pytest.approx(s, rel=1e-5)
    assert float(terms.loss) == pytest.approx(expected, rel=1e-5)
    assert float(terms.attack_ce) == pytest.approx(ce_by_hand(logits), rel=1e-5)
    assert abs(once - s) > 100 * 1e-5 * s  # the double norm is visible at the tolerance used above


def test_official_masking_keeps_exactly_the_differing_positions():
    # row 0: responses differ at 4, 6, 7, 8 (and 9: padding vs a real token); position 5 agrees (token 21)
    # row 1: the harmful response holds a real token 0 at position 5, which the published code ignores
    harmful = torch.tensor([[1, 10, 11, 12, 20, 21, 22, 23, 2, 0], [1, 10, 11, 12, 40, 0, 41, 2, 0, 0]])
    refusal = torch.tensor([[1, 10, 11, 12, 30, 21, 32, 33, 34, 2], [1, 10, 11, 12, 50, 51, 52, 53, 2, 0]])
    h_labels = torch.tensor([[-100] * 4 + [20, 21, 22, 23, 2, -100], [-100] * 4 + [40, 0, 41, 2, -100, -100]])
    r_labels = torch.tensor([[-100] * 4 + [30, 21, 32, 33, 34, 2], [-100] * 4 + [50, 51, 52, 53, 2, -100]])
    mask = official_mask(harmful, refusal)
    assert mask.tolist() == [[False] * 4 + [True, False, True, True, True, True], [False] * 4 + [True] * 5 + [False]]
    sel = official_selection(h_labels, mask)
    got = list(zip(sel.batch_idx.tolist(), sel.pos_idx.tolist(), sel.targets.tolist(), sel.row_scale.tolist()))
    # (row, predicting position t, target at t+1, logit scale = mask[t])
    assert got == [(0, 3, 20, 0.0), (0, 5, 22, 0.0), (0, 6, 23, 1.0), (0, 7, 2, 1.0),
                   (1, 3, 40, 0.0), (1, 5, 41, 1.0), (1, 6, 2, 1.0)]  # fmt: skip
    sel_r = official_selection(r_labels, mask)
    assert list(zip(sel_r.batch_idx.tolist(), sel_r.pos_idx.tolist())) == [
        (0, 3), (0, 5), (0, 6), (0, 7), (0, 8), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7)
    ]  # fmt: skip

    # the masked cross-entropy: zeroed logit rows score log V, the others the model's CE
    model = micro_llama(vocab=64, seed=1)
    attention = torch.tensor([[1] * 9 + [0], [1] * 8 + [0, 0]])
    batch = {"input_ids": harmful, "attention_mask": attention, "labels": h_labels}
    with torch.no_grad():
        logits = model(input_ids=harmful, attention_mask=attention).logits.double()
        per_row = [
            math.log(64) if scale == 0 else float(torch.logsumexp(logits[b, t], 0) - logits[b, t, y])
            for b, t, y, scale in got
        ]
        assert float(masked_ce(model, batch, sel)) == pytest.approx(sum(per_row) / len(per_row), rel=1e-5)


def test_official_benign_loss_covers_every_non_padding_token():
    benign = batch_from_rows([[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 2]])
    sel = plain_selection(benign)
    assert sel.count == int(benign["attention_mask"].sum()) - 2
    assert sel.targets.tolist() == [5, 6, 8, 9, 2, 7, 10, 2]


def test_official_masking_requires_aligned_pairs():
    harmful, refusal, benign = seam_batches()
    short = {k: v[:, :-1] for k, v in refusal.items()}
    with pytest.raises(ValueError, match="position by position"):
        seam_selections(harmful, benign, short, official_masking=True)


def test_non_finite_estimate_raises_and_restores_the_weights(setup):
    model, harmful, refusal, benign, _, _ = setup
    state = clone_state(model)
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        seam_step(model, harmful, refusal, benign, SeamParams(beta=0.01, eps=1e30))
    assert_state_identical(model, state)
    with pytest.raises(NonFiniteGradientError):
        sd_gradient(model, harmful, benign, SeamParams(eps=1e30, estimator="central"))
    assert_state_identical(model, state)
    model.zero_grad(set_to_none=True)


def test_nan_weights_stop_before_any_perturbation():
    model = micro_llama()
    harmful, refusal, benign = seam_batches()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="undefined"):
        seam_step(model, harmful, refusal, benign)


def test_low_precision_difference_is_taken_in_fp32():
    """bf16 weights: coef·(∇loss − snapshot) is formed in fp32; a bf16 .grad alone would lose it entirely."""
    model = micro_llama(vocab=64).to(torch.bfloat16)
    harmful, _, _ = seam_batches(vocab=64)
    params = list(model.parameters())
    sel = select_labels(harmful["labels"])
    grads = torch.autograd.grad(masked_ce(model, harmful, sel), params)
    snap = [g.float() - 1e-3 for g in grads]  # a nearby gradient, 1e-3 away in every entry
    add_gradient(masked_ce(model, harmful, sel), params, 1000.0, minus=snap)
    for p in params:
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), torch.ones_like(p.grad, dtype=torch.float32), rtol=0, atol=2e-2)


def test_bf16_step_restores_weights_and_stays_finite():
    model = micro_llama(vocab=64).to(torch.bfloat16)
    harmful, refusal, benign = seam_batches(vocab=64)
    state = clone_state(model)
    stats = seam_step(model, harmful, refusal, benign, SeamParams(beta=0.01, eps=1e-2, estimator="central"))
    assert_state_identical(model, state)
    assert all(math.isfinite(v) for v in stats.values())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_reduce_fn_sees_g_a_g_b_and_the_final_gradient(setup):
    """Data parallelism hook: called on g_a and g_b (before the perturbation) and on .grad; identity changes nothing."""
    model, harmful, refusal, benign, _, _ = setup
    model.zero_grad(set_to_none=True)
    seam_step(model, harmful, refusal, benign, SeamParams(beta=0.1))
    plain = param_grads(model)
    calls: list[list[torch.Tensor]] = []
    model.zero_grad(set_to_none=True)
    seam_step(model, harmful, refusal, benign, SeamParams(beta=0.1), reduce_fn=calls.append)
    n = len(list(model.parameters()))
    assert [len(c) for c in calls] == [n, n, n]
    assert all(c is p.grad for c, p in zip(calls[2], model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(param_grads(model), plain))
    # a reduce_fn that rescales g_b changes the perturbation, hence the gradient: it is really used
    model.zero_grad(set_to_none=True)
    halve_b = [0]

    def scale_second(ts):
        halve_b[0] += 1
        if halve_b[0] == 2:
            for t in ts:
                t.mul_(0.5)

    seam_step(model, harmful, refusal, benign, SeamParams(beta=0.1), reduce_fn=scale_second)
    assert rel_error(param_grads(model), plain) > 1e-6
    model.zero_grad(set_to_none=True)
