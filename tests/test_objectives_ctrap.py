"""CTRAP's objective functions checked against independent computations (SPEC §4, issue 3 acceptance)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _objectives_fixtures import (
    assert_state_identical,
    batch_from_rows,
    clone_state,
    micro_llama,
    param_grads,
    rel_error,
    seam_batches,
)

from selfdestruct.data.tokenizer import train_bpe_tokenizer
from selfdestruct.objectives.common import NonFiniteGradientError
from selfdestruct.objectives.ctrap import (
    CtrapParams,
    SecondMoment,
    attack_displacement,
    collapse_loss,
    collapse_token_id,
    ctrap_step,
    lookahead_step,
    make_replicas,
)

torch.set_num_threads(1)
TOKEN = 7  # the collapse token of these tests (any id that is not BOS/EOS/PAD)


@pytest.fixture(scope="module")
def batches():
    harmful, align, general = seam_batches(seed=1)
    return align, harmful, general


# ---- independent reference: HF-free cross-entropies written out, gradients by plain autograd on copies ----


def _ce(model, batch, targets=None) -> torch.Tensor:
    """Mean next-token CE over labelled positions, computed from the raw logits (targets override the labels)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    if targets is not None:
        labels = torch.where(labels != -100, torch.full_like(labels, targets), labels)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _moved(model, grads, scale):
    """A copy of ``model`` at θ + scale·grads."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), grads):
            p.add_(scale * g)
    return moved


def _reference(model, align, harmful, general, lam, radii, normalize=True, steps=1, every=False):
    """∇ℓ_align(θ) + λ·mean_r ∇ℓ_col(θ'_r), θ'_r = θ after ``steps`` normalised (or raw) gradient steps of size r;
    ``every``: λ·mean_r mean_k ∇ℓ_col(θ_r,k) over the points after k = 1..steps steps."""
    total = list(torch.autograd.grad(_ce(model, align), list(model.parameters())))
    for r in radii:
        point = model
        for k in range(1, steps + 1):
            g = torch.autograd.grad(_ce(point, harmful), list(point.parameters()))
            n = math.sqrt(sum(float(x.square().sum()) for x in g)) if normalize else 1.0
            point = _moved(point, g, -r / n)
            if every or k == steps:
                v = torch.autograd.grad(_ce(point, general, TOKEN), list(point.parameters()))
                weight = lam / len(radii) / (steps if every else 1)
                total = [t + weight * vi for t, vi in zip(total, v)]
    return total


def _params(gradient_mode: str = "first_order", measure_lookahead: bool = False, **kwargs) -> CtrapParams:
    """CtrapParams for the objective alone (what ctrap_step reads; the data and adapter fields do not matter)."""
    return CtrapParams(gradient=gradient_mode, measure_lookahead=measure_lookahead, **kwargs)


def _step_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    stats = ctrap_step(model, *args, _params(**kwargs), token_id=TOKEN)
    grads = param_grads(model)
    model.zero_grad(set_to_none=True)
    return grads, stats


# ---- tests ----


@pytest.mark.parametrize("normalize", [True, False])
def test_first_order_gradient_is_the_collapse_gradient_at_the_lookahead_point(batches, normalize):
    model = micro_llama()
    align, harmful, general = batches
    a = 0.1  # raw: a step of length a·|g_h| ≈ 0.26 on this model
    got, stats = _step_grads(model, align, harmful, general, lam=0.5, step_size=a, normalize_step=normalize)
    expected = _reference(model, align, harmful, general, 0.5, [a], normalize)
    assert rel_error(got, expected) < 1e-5
    # the look-ahead matters: the collapse gradient at θ itself is a different vector
    at_theta = _reference(model, align, harmful, general, 0.5, [0.0])
    assert rel_error(at_theta, expected) > 1e-3
    assert stats["loss"] == pytest.approx(stats["loss_align"] + 0.5 * stats["loss_collapse"])


def test_radii_average_the_collapse_gradients(batches):
    model = micro_llama()
    align, harmful, general = batches
    got, _ = _step_grads(model, align, harmful, general, lam=0.5, radii=[0.05, 0.2])
    assert rel_error(got, _reference(model, align, harmful, general, 0.5, [0.05, 0.2])) < 1e-5


def test_unrolled_attack_takes_k_fresh_gradient_steps(batches):
    model = micro_llama()
    align, harmful, general = batches
    got, stats = _step_grads(model, align, harmful, general, lam=0.5, step_size=0.2, unroll_steps=3)
    assert rel_error(got, _reference(model, align, harmful, general, 0.5, [0.2], steps=3)) < 1e-5
    assert stats["loss_harmful_unrolled"] < stats["loss_harmful"]  # the simulated attack descends
    one, _ = _step_grads(model, align, harmful, general, lam=0.5, step_size=0.2, unroll_steps=1)
    assert rel_error(one, got) > 1e-3


def test_attack_displacement_is_where_an_adamw_fine_tune_ends_and_the_model_stays(batches):
    model = micro_llama()
    align, harmful, general = batches
    state = clone_state(model)
    model.zero_grad(set_to_none=True)
    delta = attack_displacement(model, [harmful, general], steps=5, lr=1e-2)
    assert_state_identical(model, state)
    assert all(p.grad is None for p in model.parameters())
    # re-stated: torch's AdamW on a copy, the two batches in turn, the response CE written out
    copy_ = copy.deepcopy(model)
    opt = torch.optim.AdamW(copy_.parameters(), lr=1e-2, weight_decay=0.0)
    for k in range(5):
        opt.zero_grad()
        _ce(copy_, [harmful, general][k % 2]).backward()
        opt.step()
    expected = [q.detach() - p.detach() for q, p in zip(copy_.parameters(), model.parameters())]
    assert rel_error(delta, expected) < 1e-5
    with torch.no_grad():  # the fine-tune descends the harmful loss
        assert float(_ce(_moved(model, delta, 1.0), harmful)) < float(_ce(model, harmful))


def test_the_attack_path_trap_adds_the_collapse_gradient_at_theta_plus_delta(batches):
    model = micro_llama()
    align, harmful, general = batches
    delta = attack_displacement(model, [harmful], steps=3, lr=1e-2)
    kwargs = dict(lam=0.5, step_size=0.1, attack_steps=3, attack_lam=0.7)
    model.zero_grad(set_to_none=True)
    stats = ctrap_step(model, align, harmful, general, _params(**kwargs), token_id=TOKEN, displacement=delta)
    got = param_grads(model)
    without, plain = _step_grads(model, align, harmful, general, **kwargs)
    moved = _moved(model, delta, 1.0)
    col = _ce(moved, general, TOKEN)
    v = torch.autograd.grad(col, list(moved.parameters()))
    assert rel_error(got, [w + 0.7 * vi for w, vi in zip(without, v)]) < 1e-5
    assert stats["loss_collapse_attack"] == pytest.approx(float(col), rel=1e-5)
    assert stats["loss"] == pytest.approx(plain["loss"] + 0.7 * stats["loss_collapse_attack"], rel=1e-6)
    with pytest.raises(ValueError, match="attack-path trap"):
        ctrap_step(model, align, harmful, general, _params(gradient_mode="exact", **kwargs), token_id=TOKEN,
                   displacement=delta)


def test_collapse_at_every_step_averages_the_traps_along_the_unrolled_attack(batches):
    model = micro_llama()
    align, harmful, general = batches
    got, stats = _step_grads(model, align, harmful, general, lam=0.5, step_size=0.2, unroll_steps=3,
                             collapse_at="every")
    expected = _reference(model, align, harmful, general, 0.5, [0.2], steps=3, every=True)
    assert rel_error(got, expected) < 1e-5
    last, last_stats = _step_grads(model, align, harmful, general, lam=0.5, step_size=0.2, unroll_steps=3)
    assert rel_error(got, last) > 1e-3  # the nearer traps change the step
    # the logged ℓ_col is the mean over the path, not its value at the end
    assert stats["loss_collapse"] != pytest.approx(last_stats["loss_collapse"], rel=1e-6)
    assert stats["loss"] == pytest.approx(stats["loss_align"] + 0.5 * stats["loss_collapse"])
    # with one simulated step "every" and "last" are the same trap, bit for bit
    one_every, _ = _step_grads(model, align, harmful, general, lam=0.5, step_size=0.2, collapse_at="every")
    one_last, _ = _step_grads(model, align, harmful, general, lam=0.5, step_size=0.2)
    assert all(torch.equal(a, b) for a, b in zip(one_every, one_last))


def test_exact_gradient_matches_finite_differences(batches):
    """d/dt F(θ + t·u) by central differences vs ⟨exact gradient, u⟩, F = ℓ_align + λ·ℓ_col(θ − a·ĝ_h(θ)).

    fp64 model (Llama's norms still compute in fp32, hence h = 3e-3 and a 1e-2 relative tolerance); the
    first-order gradient misses the derivative through g_h and is far off, so the check can tell them apart.
    """
    model = micro_llama(dtype=torch.float64)
    align, harmful, general = batches
    lam, a = 0.5, 1.0

    def objective(m) -> float:
        g = torch.autograd.grad(_ce(m, harmful), list(m.parameters()))
        n = math.sqrt(sum(float(x.square().sum()) for x in g))
        with torch.no_grad():
            return float(_ce(m, align)) + lam * float(_ce(_moved(m, g, -a / n), general, TOKEN))

    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    un = math.sqrt(sum(float(x.square().sum()) for x in u))
    u = [x / un for x in u]
    h = 3e-3
    fd = (objective(_moved(model, u, h)) - objective(_moved(model, u, -h))) / (2 * h)
    exact, _ = _step_grads(model, align, harmful, general, lam=lam, step_size=a, gradient_mode="exact")
    first, _ = _step_grads(model, align, harmful, general, lam=lam, step_size=a)
    d_exact = sum(float((g * v).sum()) for g, v in zip(exact, u))
    d_first = sum(float((g * v).sum()) for g, v in zip(first, u))
    assert d_exact == pytest.approx(fd, rel=1e-2)
    assert abs(d_first - fd) > 0.2 * abs(fd)
    assert model.config._attn_implementation == "sdpa"


def test_exact_mode_rejects_non_differentiable_lookaheads(batches):
    model = micro_llama()
    align, harmful, general = batches
    with pytest.raises(ValueError, match="exact"):
        ctrap_step(model, align, harmful, general, CtrapParams(gradient="exact", lookahead="sign"), token_id=TOKEN)


OPTIONS = [
    {},
    {"lookahead": "sign"},
    {"lookahead": "adam", "normalize_step": False},
    {"radii": [0.1, 0.3], "unroll_steps": 2},
    {"radii": [0.1, 0.3], "unroll_steps": 2, "collapse_at": "every"},
    {"gradient_mode": "exact"},
    {"measure_lookahead": True},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_weights_are_restored_bit_for_bit(batches, options):
    model = micro_llama()
    align, harmful, general = batches
    state = clone_state(model)
    stats = ctrap_step(model, align, harmful, general, _params(**options), token_id=TOKEN)
    assert_state_identical(model, state)
    assert all(math.isfinite(v) for v in stats.values())
    if options.get("measure_lookahead"):
        assert stats["loss_harmful_lookahead"] < stats["loss_harmful"]


CONCURRENT = [
    {"radii": [0.1, 0.3]},
    {"radii": [0.05, 0.1, 0.3], "unroll_steps": 3, "collapse_at": "every", "lookahead": "sign",
     "measure_lookahead": True},
    {"radii": [0.1, 0.2, 0.3, 0.4], "unroll_steps": 2, "lookahead": "adam", "normalize_step": False},
]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("options", CONCURRENT)
def test_concurrent_radii_give_the_sequential_step_bit_for_bit(batches, options, threads):
    """The radii split over threads (a replica per extra thread): every gradient entry and every stat equals the
    one-thread step exactly, the weights are restored, and the replicas were really used."""
    align, harmful, general = batches
    model = micro_llama()
    p = _params(**options)
    sequential = ctrap_step(model, align, harmful, general, p, token_id=TOKEN)
    expected = param_grads(model)
    model.zero_grad(set_to_none=True)
    state = clone_state(model)
    replicas = make_replicas(model, p, threads)
    assert len(replicas) == min(threads, len(p.radii)) - 1
    for replica in replicas:  # the step must set them to θ itself
        with torch.no_grad():
            for q in replica.parameters():
                q.mul_(0.5)
    concurrent = ctrap_step(model, align, harmful, general, p, token_id=TOKEN, replicas=replicas)
    assert concurrent == sequential
    for got, want in zip(param_grads(model), expected):
        assert torch.equal(got, want)
    assert_state_identical(model, state)
    # each replica walked its radii's look-ahead path: it ends displaced back to θ, its .grad taken away
    for replica in replicas:
        assert all(torch.equal(r, q) for r, q in zip(replica.parameters(), model.parameters()))
        assert all(q.grad is None for q in replica.parameters())


def test_concurrent_radii_refuse_what_would_change_the_step(batches):
    align, harmful, general = batches
    model = micro_llama()
    p = _params(radii=[0.1, 0.3])
    assert make_replicas(model, p, 1) == [] and make_replicas(model, _params(), 4) == []  # one radius: none
    with pytest.raises(ValueError, match="first_order"):
        make_replicas(model, _params(gradient_mode="exact", radii=[0.1, 0.3]), 2)
    replicas = make_replicas(model, p, 2)
    with pytest.raises(ValueError, match="one process"):
        ctrap_step(model, align, harmful, general, p, token_id=TOKEN, replicas=replicas, reduce_fn=lambda t: None)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="32-true"):
        ctrap_step(model, align, harmful, general, p, token_id=TOKEN, replicas=replicas)
    dropped = micro_llama()
    dropped.model.layers[0].add_module("drop", torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        make_replicas(dropped, p, 2)
    with pytest.raises(ValueError, match="fp32"):
        make_replicas(micro_llama().to(torch.bfloat16), p, 2)


def test_lookahead_shapes_and_lengths():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)]
    grads[1][3] = 0.0
    sgd = lookahead_step([g.clone() for g in grads], "sgd", normalize=True)
    length = math.sqrt(sum(float((sgd.scale * d).square().sum()) for d in sgd.direction))
    assert length == pytest.approx(1.0)
    sign = lookahead_step([g.clone() for g in grads], "sign", normalize=True)
    assert sign.scale == pytest.approx(1.0 / math.sqrt(26))  # 27 entries, one exactly zero
    assert all(torch.equal(d, g.sign()) for d, g in zip(sign.direction, grads))
    raw_sign = lookahead_step([g.clone() for g in grads], "sign", normalize=False)
    assert raw_sign.scale == 1.0  # every coordinate moves by a
    adam = lookahead_step([g.clone() for g in grads], "adam", normalize=False)  # Adam's first step
    for d, g in zip(adam.direction, grads):
        torch.testing.assert_close(d, g / (g.abs() + 1e-8))
    state = SecondMoment(beta2=0.5)
    state.update(grads)
    state.update([2 * g for g in grads])
    adam = lookahead_step([g.clone() for g in grads], "adam", normalize=False, second_moment=state)
    v_hat = [(0.25 * g**2 + 0.5 * 4 * g**2) / 0.75 for g in grads]  # EMA of g², 4g², bias-corrected
    for d, g, v in zip(adam.direction, grads, v_hat):
        torch.testing.assert_close(d, g / (v.sqrt() + 1e-8))


def test_collapse_loss_by_hand():
    model = micro_llama(vocab=64, seed=2)
    batch = batch_from_rows([[1, 5, 6], [1, 9]], [[11, 12, 2], [13, 14, 15, 2]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        terms = [
            float(torch.logsumexp(logits[b, t], 0) - logits[b, t, TOKEN])
            for b in range(2)
            for t in range(batch["labels"].shape[1] - 1)
            if batch["labels"][b, t + 1] != -100
        ]
        assert len(terms) == 7
        assert float(collapse_loss(model, batch, TOKEN)) == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_minimising_the_collapse_loss_makes_the_model_emit_the_token():
    torch.manual_seed(0)
    model = micro_llama(vocab=64, seed=4)
    _, _, general = seam_batches(vocab=64, seed=2)
    prompts = torch.tensor([[1, 20, 21, 22], [1, 30, 31, 32]])
    before = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, do_sample=False)
    assert (before[:, 4:] == TOKEN).float().mean() < 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        loss = collapse_loss(model, general, TOKEN)
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.1
    after = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)  # fmt: skip
    assert after.shape[1] == 12 and bool((after[:, 4:] == TOKEN).all())


def test_collapse_token_id_follows_the_published_rule_or_the_first_piece():
    texts = ["an error occurred", "error error", "no error here", "the error is an error", "terror and errors"] * 20
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    published = collapse_token_id(tokenizer)  # tokenizer("an error")["input_ids"][-1], as the CTRAP code takes it
    assert published == tokenizer("an error")["input_ids"][-1]
    assert tokenizer.decode([published]) == " error"  # frequent enough to be merged into one token
    assert collapse_token_id(tokenizer, rule="first") == published  # one piece: both rules agree
    rare = collapse_token_id(tokenizer, word="zyx", rule="first")  # split into pieces: the first one
    assert " zyx".startswith(tokenizer.decode([rare])) and tokenizer.decode([rare]) != " zyx"
    last = collapse_token_id(tokenizer, word="zyx")
    assert tokenizer.decode(tokenizer.encode("an zyx", add_special_tokens=False)).endswith(tokenizer.decode([last]))
    assert last != rare
    with pytest.raises(ValueError, match="rule"):
        collapse_token_id(tokenizer, rule="middle")


def test_empty_harmful_batch_stops_with_a_clear_error(batches):
    model = micro_llama()
    align, harmful, general = batches
    empty = dict(harmful, labels=torch.full_like(harmful["labels"], -100))
    state = clone_state(model)
    with pytest.raises(NonFiniteGradientError, match="normalise"):
        ctrap_step(model, align, empty, general, _params(), token_id=TOKEN)
    assert_state_identical(model, state)
