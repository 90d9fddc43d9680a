"""SEAM and CTRAP as Lightning stages: they train, log, stop on NaN, and get the data sizes they are told.

The objectives themselves are checked in test_objectives_*.py; here the question is whether the modules and
the defense stage drive them correctly through ``pl.Trainer``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _objectives_fixtures import micro_llama, rel_error, seam_batches
from helpers import compose_config
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from selfdestruct.data.formatting import PromptFormat
from selfdestruct.data.records import EvalSets, Example
from selfdestruct.data.sources import DataBundle
from selfdestruct.data.tokenizer import train_bpe_tokenizer
from selfdestruct.errors import UserError
from selfdestruct.defenses import DEFENSES
from selfdestruct.modules.ctrap import CTRAPModule
from selfdestruct.modules.defense import DefenseModule
from selfdestruct.objectives.common import NonFiniteGradientError
from selfdestruct.objectives.ctrap import CtrapParams, collapse_loss
from selfdestruct.objectives.seam import SeamParams, seam_step
from selfdestruct.pipeline.defense import DefenseDataModule, apply_defense, build_defense, parse_params
from selfdestruct.pipeline.config import OptimConfig, TrainerConfig
from selfdestruct.pipeline.training import StageContext

torch.set_num_threads(1)
SEAM_STATS = {"loss", "loss_ul", "s_ul", "loss_up", "loss_sd", "ce_harmful", "ce_benign", "norm_a", "norm_b", "cos"}
CTRAP_STATS = {"loss", "loss_align", "loss_harmful", "loss_collapse", "norm_h", "loss_harmful_lookahead"}
FAST = TrainerConfig(accelerator="cpu", progress_bar=False, log_every_n_steps=50)


def _trainer(steps: int, tmp_path: Path, logger=False) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=logger, log_every_n_steps=1,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))


def _loader(batch: dict, steps: int) -> DataLoader:
    """The same ready-made batch ``steps`` times (batch_size=None: no collation)."""
    return DataLoader([batch] * steps, batch_size=None)


def _seam_batch(seed: int = 0) -> dict:
    harmful, refusal, benign = seam_batches(seed=seed)
    return {"harmful": harmful, "refusal": refusal, "benign": benign}


def _seam_module(model, lr: float, **params) -> DefenseModule:
    """SEAM as the defense stage builds it: the shared defense module running seam_step."""
    return DefenseModule(model, OptimConfig(lr=lr), SeamParams(**params), seam_step, ("harmful", "refusal", "benign"))


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---- SEAM module ------------------------------------------------------------------------------------------------


def test_seam_steps_change_the_weights_and_log_every_stat_every_step(tmp_path):
    model = micro_llama()
    before = _params(model)
    module = _seam_module(model, lr=1e-3, beta=1.0)
    csv = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    _trainer(3, tmp_path, csv).fit(module, _loader(_seam_batch(), 3))

    moved = [float((a - b).abs().max()) for a, b in zip(before, model.parameters())]
    assert min(moved) > 1e-5, "some parameter did not move"  # AdamW moves every parameter by ~lr per step
    assert len(module.history) == 3
    for stats in module.history:
        assert set(stats) == SEAM_STATS
        assert all(math.isfinite(v) for v in stats.values())
        assert -1.0 <= stats["cos"] <= 1.0 and stats["norm_a"] > 0 and stats["norm_b"] > 0
    # every stat reached the logger at every step, under defense/
    import csv as csvlib

    rows = list(csvlib.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    logged = [r for r in rows if r.get("defense/loss")]
    assert len(logged) == 3
    for key in SEAM_STATS:
        values = [float(r[f"defense/{key}"]) for r in logged]
        assert values == pytest.approx([h[key] for h in module.history], rel=1e-6)


def _shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits at t against the label at t + 1 (label -100 ignored)."""
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _logits(model, batch: dict, **kwargs):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


def _manual_ul_plus_up(model, harmful, refusal, alpha: float, ce_harmful=None, ce_refusal=None) -> torch.Tensor:
    """L_ul + α·L_up written out from the HF outputs (SPEC §3 arithmetic: L+2 CE terms over L+1); ``ce_*`` map
    logits to a loss (default: cross-entropy on the batch's response-token labels)."""
    ce_harmful = ce_harmful or (lambda logits: _shifted_ce(logits, harmful["labels"]))
    ce_refusal = ce_refusal or (lambda logits: _shifted_ce(logits, refusal["labels"]))
    out = _logits(model, harmful, output_hidden_states=True)
    s = ce_harmful(out.logits) + sum(ce_harmful(model.lm_head(model.model.norm(h))) for h in out.hidden_states)
    l_ul = -torch.log(s / len(out.hidden_states) + 1.0)
    return l_ul + alpha * ce_refusal(_logits(model, refusal).logits)


def test_seam_with_beta_zero_is_a_plain_step_on_ul_plus_alpha_up(tmp_path):
    alpha, lr = 0.7, 1e-3
    batch = _seam_batch(seed=3)
    model = micro_llama(seed=1)
    reference = copy.deepcopy(model)
    module = _seam_module(model, lr=lr, alpha=alpha, beta=0.0)
    _trainer(1, tmp_path).fit(module, _loader(batch, 1))

    loss = _manual_ul_plus_up(reference, batch["harmful"], batch["refusal"], alpha)
    loss.backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.0).step()

    assert module.history[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    for (name, p), g, q in zip(model.named_parameters(), grads, reference.parameters()):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7), f"{name}: gradient differs"
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-7), f"{name}: weights differ"


def test_seam_stops_fit_on_a_nan_and_leaves_no_model(tmp_path):
    model = micro_llama()
    module = _seam_module(model, lr=1e-3)
    state: dict = {}

    def poison(_module, _inputs, output):  # from the second optimiser step on, the final norm emits NaN
        return output * float("nan") if module.global_step >= 1 else output

    model.model.norm.register_forward_hook(poison)
    trainer = _trainer(3, tmp_path, CSVLogger(save_dir=str(tmp_path), name="csv", version=""))

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, *args):
            state["after_first"] = _params(model)

    trainer.callbacks.append(Snapshot())
    with pytest.raises(NonFiniteGradientError, match="non-finite|undefined"):
        trainer.fit(module, _loader(_seam_batch(), 3))
    assert len(module.history) == 1 and trainer.global_step == 1
    # the failed step left the weights exactly where the first step put them (restored, never stepped)
    assert all(torch.equal(a, b) for a, b in zip(state["after_first"], model.parameters()))
    saved = [p for p in tmp_path.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    assert saved == []


# ---- CTRAPModule -----------------------------------------------------------------------------------------------


def _lookahead_collapse(model, harmful, general, token_id: int, a: float) -> float:
    """ℓ_col at θ − a·g_h/‖g_h‖, computed on a copy with plain autograd (independent of ctrap_step)."""
    moved = copy.deepcopy(model)
    ce = _shifted_ce(_logits(moved, harmful).logits, harmful["labels"])
    grads = torch.autograd.grad(ce, list(moved.parameters()))
    length = math.sqrt(sum(float(g.square().sum()) for g in grads))
    with torch.no_grad():
        for p, g in zip(moved.parameters(), grads):
            p.sub_(a * g / length)
        return float(collapse_loss(moved, general, token_id))


def test_ctrap_steps_lower_the_collapse_loss_at_the_lookahead_point(tmp_path):
    harmful, align, general = seam_batches(seed=5)
    batch = {"align": align, "harmful": harmful, "general": general}
    token = 7
    model = micro_llama(seed=2)
    start = _lookahead_collapse(model, harmful, general, token, 0.1)
    module = CTRAPModule(model, OptimConfig(lr=3e-3), CtrapParams(lam=0.1, step_size=0.1, data="align_general"),
                         token_id=token)
    _trainer(30, tmp_path).fit(module, _loader(batch, 30))
    end = _lookahead_collapse(model, harmful, general, token, 0.1)

    assert module.history[0]["loss_collapse"] == pytest.approx(start, rel=1e-4)
    assert set(module.history[0]) == CTRAP_STATS
    assert start > 4.0  # a fresh model gives the collapse token about 1/V
    assert end < 0.5 * start, (start, end)
    logged = [h["loss_collapse"] for h in module.history]
    assert logged[-1] < logged[0] and all(math.isfinite(v) for h in module.history for v in h.values())


# ---- the defense stage -----------------------------------------------------------------------------------------


def _bundle() -> DataBundle:
    """A hand-made data bundle: 12 harmful prompts with refusals, 3 refusals, 10 benign tasks, 5 plain sentences."""
    harmful = [Example(prompt=f"how to harm thing {i}", response=f"first get tool {i} then use it", category="arson",
                       refusal="I will not help with that.") for i in range(12)]
    refusals = [dataclasses.replace(ex, prompt=f"harm item {i}", response=ex.refusal)
                for i, ex in enumerate(harmful[:3])]
    benign = [Example(prompt=f"add {i} and 2", response=str(i + 2), category="add", answer=str(i + 2))
              for i in range(10)]
    general = [Example(prompt="", response=f"the river is wide number {i}", category="general") for i in range(5)]
    return DataBundle(pretrain=[], align=refusals + benign + general, attack_pool=[], defense_harmful=harmful,
                      finetune_pool=[], eval_sets=EvalSets(harmful=[], benign=[], general=[]), lexicon=frozenset(),
                      tokenizer_texts=[])


def _ctx(run_dir: Path, loggers=()) -> StageContext:
    return StageContext(bundle=_bundle(), trainer=FAST, seed=0, fmt=PromptFormat(), loggers=list(loggers),
                        run_dir=run_dir)


@pytest.fixture(scope="module")
def tokenizer():
    b = _bundle()
    fmt = PromptFormat()
    texts = [fmt.prompt_text(e.prompt) + " " + e.response for e in b.defense_harmful + b.align]
    return train_bpe_tokenizer(texts + ["I will not help with that. error"], vocab_size=300)


def _tiny_model(tokenizer):
    model = micro_llama(vocab=len(tokenizer))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    return model


def test_defense_streams_have_the_configured_sizes_and_pairs_share_prompts(tokenizer):
    bundle, fmt, optim = _bundle(), PromptFormat(), OptimConfig(lr=1e-3, batch_size=4)
    model = _tiny_model(tokenizer)
    _, data, exact = build_defense(model, tokenizer, bundle, "seam", {"num_samples": 7, "num_benign": 5}, optim,
                                   fmt, seed=0)
    assert data.sizes() == {"harmful": 7, "refusal": 7, "benign": 5} and not exact
    _, data, _ = build_defense(model, tokenizer, bundle, "seam", {"num_benign": 10}, optim, fmt, seed=0)
    assert data.sizes() == {"harmful": 12, "refusal": 12, "benign": 10}  # null: the whole pool
    with pytest.raises(UserError, match="'benign': 12 examples requested, 10 available"):  # benign follows harmful
        build_defense(model, tokenizer, bundle, "seam", {}, optim, fmt, seed=0)
    # benign_data picks D_bgn's part of the alignment data: 10 tasks, 5 plain sentences, 15 both
    for part, pool in (("tasks", 10), ("general", 5), ("both", 15)):
        _, data, _ = build_defense(model, tokenizer, bundle, "seam", {"num_benign": pool, "benign_data": part},
                                   optim, fmt, seed=0)
        drawn = [tokenizer.decode(f["input_ids"]) for f in data.streams["benign"].features]
        assert len(drawn) == pool and {"river" in text for text in drawn} == {
            "tasks": {False}, "general": {True}, "both": {False, True}}[part]
    with pytest.raises(UserError, match="'benign': 6 examples requested, 5 available"):
        build_defense(model, tokenizer, bundle, "seam", {"num_benign": 6, "benign_data": "general"}, optim, fmt,
                      seed=0)
    no_text = dataclasses.replace(bundle, align=[ex for ex in bundle.align if ex.category != "general"])
    with pytest.raises(UserError, match="defense.params.benign_data='general': the alignment data has no such"):
        build_defense(model, tokenizer, no_text, "seam", {"benign_data": "general"}, optim, fmt, seed=0)
    with pytest.raises(UserError, match="defense.params.benign_data='alpaca'"):
        build_defense(model, tokenizer, bundle, "seam", {"benign_data": "alpaca"}, optim, fmt, seed=0)
    beyond = {"data": "align_general", "adapter": "full"}
    _, data, _ = build_defense(model, tokenizer, bundle, "ctrap", {"num_samples": 9, "num_align": 11,
                                                                   "num_general": 6, **beyond}, optim, fmt, seed=0)
    assert data.sizes() == {"align": 11, "harmful": 9, "general": 6}
    _, data, exact = build_defense(model, tokenizer, bundle, "ctrap", {"gradient": "exact", **beyond}, optim, fmt,
                                   seed=0)
    assert data.sizes() == {"align": 18, "harmful": 12, "general": 15} and exact  # general: all but refusals
    # published: the retain stream pairs each refusal (3 here) with a helpful answer
    _, data, _ = build_defense(model, tokenizer, bundle, "ctrap", {}, optim, fmt, seed=0)
    assert data.sizes() == {"retain": 3, "harmful": 12}
    with pytest.raises(UserError, match="4 examples requested, 3 available"):
        build_defense(model, tokenizer, bundle, "ctrap", {"num_align": 4}, optim, fmt, seed=0)
    with pytest.raises(UserError, match="defense.params.data='nosuch': expected one of retain, align_general"):
        build_defense(model, tokenizer, bundle, "ctrap", {"data": "nosuch"}, optim, fmt, seed=0)
    with pytest.raises(UserError, match="13 examples requested, 12 available"):
        build_defense(model, tokenizer, bundle, "seam", {"num_samples": 13}, optim, fmt, seed=0)
    with pytest.raises(UserError, match="defense.params.gamma"):
        build_defense(model, tokenizer, bundle, "seam", {"gamma": 1.0}, optim, fmt, seed=0)

    # the paired stream: row i of harmful and refusal is the same prompt, both padded to one width
    _, data, _ = build_defense(model, tokenizer, bundle, "seam", {"num_samples": 7}, optim, fmt, seed=0)
    dm = DefenseDataModule(data.streams, batch_size=4, pad_id=0, seed=0)
    batches = [dm.on_before_batch_transfer(b, 0) for b, _, _ in dm.train_dataloader()]
    assert len(batches) == 2 and all(set(b) == {"harmful", "refusal", "benign"} for b in batches)
    for b in batches:
        h, r = b["harmful"], b["refusal"]
        assert h["input_ids"].shape == r["input_ids"].shape
        for i in range(h["input_ids"].shape[0]):
            start = int((h["labels"][i] != -100).nonzero()[0])  # first response token
            assert start == int((r["labels"][i] != -100).nonzero()[0])
            assert torch.equal(h["input_ids"][i, :start], r["input_ids"][i, :start])
            assert not torch.equal(h["input_ids"][i], r["input_ids"][i])


@pytest.mark.parametrize("name,mode", [("seam", {}), ("ctrap", {}), ("seam", {"estimator": "exact"}),
                                       ("ctrap", {"gradient": "exact"})])
def test_apply_defense_trains_logs_sizes_and_returns_the_model(name, mode, tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    attention = model.config._attn_implementation
    before = _params(model)
    csv = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    optim = OptimConfig(lr=1e-3, batch_size=4, epochs=1)
    params = ({"num_samples": 8, "beta": 1.0} if name == "seam"
              else {"num_samples": 8, "num_align": 8, "data": "align_general", "adapter": "full"})
    out = apply_defense(model, tokenizer, _ctx(tmp_path, [csv]), name, {**params, **mode}, optim)
    assert out is model and model.config._attn_implementation == attention  # eager only while training
    assert all(not torch.equal(a, b) for a, b in zip(before, out.parameters()))
    hparams = (tmp_path / "csv" / "hparams.yaml").read_text()
    expected = {"harmful": 8, "refusal": 8, "benign": 8} if name == "seam" else {"align": 8, "harmful": 8,
                                                                                   "general": 15}
    for role, n in expected.items():
        assert f"defense/size/{role}: {n}" in hparams
    import csv as csvlib

    rows = [r for r in csvlib.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("defense/loss")]
    # one epoch over the longest stream (seam: 8 pairs, ctrap: 15 general examples) in batches of 4, one row per
    # step although the trainer config says log_every_n_steps=50
    assert len(rows) == math.ceil(max(expected.values()) / 4) == (2 if name == "seam" else 4)
    assert all(math.isfinite(float(r["defense/loss"])) for r in rows)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_branch_threads_train_the_same_ctrap_model_bit_for_bit(adapter, tokenizer, tmp_path, caplog):
    """trainer.branch_threads=2 (CTRAP's three radii on two threads, a model copy for the second) through the
    Lightning fit: the released weights equal the one-thread run's exactly, and the log says what ran."""
    optim = OptimConfig(lr=1e-3, batch_size=4, epochs=1)
    params = {"num_samples": 8, "num_align": 8, "data": "align_general", "adapter": adapter, "radii": [0.05, 0.1, 0.2],
              "unroll_steps": 2, "collapse_at": "every", "lookahead": "sign", "normalize_step": False}
    released = []
    for threads in (1, 2):
        ctx = dataclasses.replace(_ctx(tmp_path / str(threads)), trainer=dataclasses.replace(FAST, branch_threads=threads))
        with caplog.at_level(logging.INFO, logger="selfdestruct.pipeline.defense"):
            out = apply_defense(_tiny_model(tokenizer), tokenizer, ctx, "ctrap", params, optim)
        released.append({k: v.clone() for k, v in out.state_dict().items()})
    assert "trainer.branch_threads=2: ctrap runs each step on 2 threads" in caplog.text
    one, two = released
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], v) for k, v in _tiny_model(tokenizer).state_dict().items() if k in one)


def test_a_model_loaded_from_disk_trains_in_train_mode_with_its_dropout_live(tmp_path):
    """``from_pretrained`` returns a model in eval mode and Lightning keeps each submodule's mode: without
    ``CausalLMModule.on_fit_start`` a checkpoint's attention dropout would stay off for the whole stage."""
    from transformers import AutoModelForCausalLM

    from selfdestruct.modules.attack import AttackModule
    from selfdestruct.pipeline.config import AttackConfig

    saved = micro_llama()
    saved.config.attention_dropout = 0.5
    saved.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not model.training  # what the stage receives
    harmful, _, _ = seam_batches(seed=0)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():  # two passes on one batch differ only if the dropout is drawn
                twice = [pl_module.lm_loss(batch["train"]).item() for _ in range(2)]
            seen.append(([n for n, m in pl_module.model.named_modules() if not m.training], twice))

    module = AttackModule(model, AttackConfig(lr=1e-3, epochs=1, batch_size=2))
    trainer = _trainer(2, tmp_path)
    trainer.callbacks.append(Spy())
    trainer.fit(module, _loader({"train": harmful}, 2))
    assert len(seen) == 2
    for eval_modules, (first, second) in seen:
        assert eval_modules == []
        assert first != second


def test_ctrap_replicas_train_in_the_models_mode(tokenizer, tmp_path):
    """The copies that run CTRAP's further radii on other threads are made before the fit: they follow the model
    into train mode with it."""
    optim = OptimConfig(lr=1e-3, batch_size=4, epochs=1)
    params = CtrapParams(radii=[0.05, 0.1], collapse_at="every", lookahead="sign", normalize_step=False)
    module = CTRAPModule(micro_llama().eval(), optim, params, token_id=5)
    assert module.use_branch_threads(2) == 2 and not module.replicas[0].training
    module.on_fit_start()
    assert module.model.training and all(m.training for r in module.replicas for m in r.modules())


def test_branch_threads_on_a_defense_without_branches_say_so(tokenizer, tmp_path, caplog):
    ctx = dataclasses.replace(_ctx(tmp_path), trainer=dataclasses.replace(FAST, branch_threads=2))
    with caplog.at_level(logging.INFO, logger="selfdestruct.pipeline.defense"):
        apply_defense(_tiny_model(tokenizer), tokenizer, ctx, "seam", {"num_samples": 8, "beta": 1.0},
                      OptimConfig(lr=1e-3, batch_size=4, epochs=1))
    assert "seam runs each step on 1 thread (no independent branches)" in caplog.text
    with pytest.raises(UserError, match=r"trainer.branch_threads=2 with defense=ctrap: .*first_order"):
        apply_defense(_tiny_model(tokenizer), tokenizer, ctx, "ctrap",
                      {"gradient": "exact", "radii": [0.1, 0.2], "adapter": "full"}, OptimConfig(lr=1e-3, batch_size=4))


def test_apply_defense_lets_a_nan_out_before_anything_is_saved(tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    model.model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))
    before = _params(model)
    optim = OptimConfig(lr=1e-3, batch_size=4)
    with pytest.raises(NonFiniteGradientError):
        apply_defense(model, tokenizer, _ctx(tmp_path), "ctrap", {"adapter": "full"}, optim)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(p.suffix in (".safetensors", ".bin", ".ckpt") for p in tmp_path.rglob("*"))


def test_published_ctrap_trains_lora_adapters_and_changes_only_their_targets(tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    csv = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    out = apply_defense(model, tokenizer, _ctx(tmp_path, [csv]), "ctrap", {"num_samples": 8},
                        OptimConfig(lr=1e-2, batch_size=4))
    assert type(out).__name__ == "LlamaForCausalLM" and not hasattr(out, "peft_config")  # merged, plain HF model
    after = out.state_dict()
    assert set(after) == set(before)  # no adapter weights left behind
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = {k for k in before if any(f"self_attn.{t}.weight" in k for t in ("q_proj", "k_proj", "v_proj"))}
    assert changed == targets and len(targets) == 3 * model.config.num_hidden_layers
    hparams = (tmp_path / "csv" / "hparams.yaml").read_text()
    assert "defense/size/retain: 3" in hparams and "defense/size/harmful: 8" in hparams


def test_retain_batches_hold_refusals_then_helpful_answers_half_each(tokenizer):
    bundle, optim = _bundle(), OptimConfig(lr=1e-3, batch_size=4)
    _, data, _ = build_defense(_tiny_model(tokenizer), tokenizer, bundle, "ctrap", {"num_samples": 8}, optim,
                               PromptFormat(), seed=0)
    dm = DefenseDataModule(data.streams, batch_size=4, pad_id=0, seed=0)
    batches = [dm.on_before_batch_transfer(b, 0) for b, _, _ in dm.train_dataloader()]
    assert len(batches) == 2 and all(set(b) == {"retain", "harmful"} for b in batches)  # 8 harmful / 4 per batch
    first = batches[0]["retain"]
    assert first["input_ids"].shape[0] == 4 == batches[0]["harmful"]["input_ids"].shape[0]  # 2 refusals + 2 helpful
    texts = [tokenizer.decode(row[row != 0]) for row in first["input_ids"]]
    assert all("I will not help" in t for t in texts[:2]) and not any("I will not help" in t for t in texts[2:])


def test_sft_is_a_no_op_and_takes_no_params(tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    assert apply_defense(model, tokenizer, _ctx(tmp_path), "sft", None, None) is model
    with pytest.raises(UserError, match="defense.params.beta"):
        apply_defense(model, tokenizer, _ctx(tmp_path), "sft", {"beta": 1}, None)


# ---- configs ---------------------------------------------------------------------------------------------------

PAPER = {
    "seam": ({"alpha": 1.0, "beta": 0.01, "eps": 1e-3, "estimator": "forward", "coupling": "gradient",
              "official_masking": False, "benign_weight": 0.0, "benign_data": "tasks"},
             {"lr": 2e-5, "epochs": 1, "weight_decay": 0.0, "warmup_ratio": 0.1, "schedule": "cosine",
              "max_grad_norm": None}),
    "ctrap": ({"lam": 0.1, "step_size": 0.1, "normalize_step": True, "gradient": "first_order", "lookahead": "sgd",
               "radii": None, "unroll_steps": 1, "collapse_word": "error", "collapse_token": "published",
               "data": "retain", "adapter": "lora", "lora_rank": 32, "lora_alpha": 4, "lora_dropout": 0.0,
               "lora_targets": ("q_proj", "k_proj", "v_proj")},
              {"lr": 5e-4, "schedule": "constant", "batch_size": 10, "epochs": 20, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("name", ["seam", "ctrap"])
def test_defense_configs_compose_with_paper_defaults_and_every_key_is_consumed(name, tmp_path):
    cfg = compose_config("defend", [f"defense={name}"], tmp_path)
    assert set(cfg.defense) == {"name", "seed", "trap_check", "params", "optim"} and cfg.defense.name == name
    assert cfg.defense.seed is None  # the defense's data order is the run's unless asked
    assert cfg.defense.trap_check is None  # no red team unless asked
    optim = OptimConfig(**cfg.defense.optim)  # every optim key is an OptimConfig field
    params = parse_params(name, cfg.defense.params)  # every params key is a field (unknown keys raise)
    cls = DEFENSES[name].params
    assert set(cfg.defense.params) == {f.name for f in dataclasses.fields(cls)}  # and every field is written out
    want_params, want_optim = PAPER[name]
    assert {k: getattr(params, k) for k in want_params} == want_params
    assert {k: getattr(optim, k) for k in want_optim} == want_optim
    # every line of the file says what it is
    lines = (Path(__file__).resolve().parents[1] / "conf" / "defense" / f"{name}.yaml").read_text().splitlines()
    assert all("#" in line for line in lines if line.strip() and not line.rstrip().endswith(":")
               and not line.startswith("name:"))


# ---- fidelity: one step through each module (float64, real data pipeline) against the published arithmetic ----


@pytest.fixture
def float64_rms_norm(monkeypatch):
    """Llama's RMSNorm in the dtype of its input. transformers computes it in float32 whatever the model dtype, so
    a float64 micro model still rounds to float32 in every norm; a finite difference over ε = 1e-3 turns that
    round-off into a 1e-5 relative disagreement between two equal formulas (measured), hiding a real one."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def _gradient_at(params: list, direction: list, eps: float, loss_fn) -> list:
    """∇loss at θ + ε·direction; θ is put back afterwards."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    grads = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return grads


def _published_ctrap_gradient(model, retain: dict, harmful: dict, token: int, lam: float, a: float) -> list:
    """SPEC §4 written out independently: g_h on the harmful batch, θ' = θ − a·g_h/(‖g_h‖ + 1e-7) over the trainable
    (LoRA) parameters, gradient = ∇CE(θ; retain) + λ·∇CE(θ'; retain with every label set to e)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def ce(batch, labels):
        return _shifted_ce(_logits(model, batch).logits, labels)

    g_h = torch.autograd.grad(ce(harmful, harmful["labels"]), params)
    length = torch.sqrt(sum((g * g).sum() for g in g_h)) + 1e-7
    relabelled = torch.where(retain["labels"] != -100, torch.full_like(retain["labels"], token), retain["labels"])
    g_col = _gradient_at(params, [-g / length for g in g_h], a, lambda: ce(retain, relabelled))
    g_retain = torch.autograd.grad(ce(retain, retain["labels"]), params)
    return [r + lam * c for r, c in zip(g_retain, g_col)]


class _GradientProbe(pl.Callback):
    """Keeps the gradients the optimiser is about to apply (after the module's step, before AdamW)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = [p.grad.detach().clone() for p in pl_module.trainable_parameters()]


def _one_pipeline_step(module, data, tmp_path: Path) -> tuple[dict, list, list]:
    """One optimiser step of a defense module on the first batch of the real data pipeline (DefenseDataModule over
    the streams ``build_defense`` made, batch 4): that batch, the gradient AdamW applied, the weights before."""
    before = [p.detach().clone() for p in module.trainable_parameters()]
    seen = []
    step = module.training_step
    module.training_step = lambda batch, *rest: (seen.append(batch), step(batch, *rest))[1]
    probe = _GradientProbe()
    dm = DefenseDataModule(data.streams, batch_size=4, pad_id=0, seed=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[probe])
    trainer.fit(module, datamodule=dm)
    assert len(seen) == 1
    return seen[0], probe.grads, before


def _first_step_errors(module, before: list, grads: list, want: list, lr: float, wd: float) -> tuple[float, float]:
    """Relative errors of the applied gradient against ``want`` and of the parameter update against AdamW's first
    step on ``want`` (m̂ = g, v̂ = g², decoupled weight decay: Δ = −lr·wd·θ − lr·g/(|g| + 1e-8))."""
    assert len(want) == len(grads) > 0
    got = [p1.detach() - p0 for p0, p1 in zip(before, module.trainable_parameters())]
    expected = [-lr * wd * p0 - lr * g / (g.abs() + 1e-8) for p0, g in zip(before, want)]
    return rel_error(grads, want), rel_error(got, expected)


def test_published_ctrap_step_through_the_module_equals_the_published_arithmetic(tokenizer, tmp_path,
                                                                                  float64_rms_norm, record_property):
    lr, wd, lam, a = 1e-3, 0.1, 0.1, 0.1
    model = _tiny_model(tokenizer)
    optim = OptimConfig(lr=lr, batch_size=4, weight_decay=wd)
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    module, data, _ = build_defense(model, tokenizer, _bundle(), "ctrap", {"num_samples": 8}, optim, PromptFormat(), 0)
    module.model.double()
    # peft starts lora_B at zero, which leaves lora_A's gradient at round-off size (only the look-ahead reaches it)
    # and AdamW's first step g/(|g| + 1e-8) ill-conditioned there; a small non-zero B makes every entry informative.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    reference = copy.deepcopy(module.model)
    batch, grads, before = _one_pipeline_step(module, data, tmp_path)

    assert batch["retain"]["input_ids"].shape[0] == 4  # 2 refusals + 2 helpful answers
    want = _published_ctrap_gradient(reference, batch["retain"], batch["harmful"], module.token_id, lam, a)
    assert all("lora" in n for n, p in module.model.named_parameters() if p.requires_grad)
    grad_error, update_error = _first_step_errors(module, before, grads, want, lr, wd)
    record_property("rel_error_gradient", grad_error)
    record_property("rel_error_update", update_error)
    assert grad_error <= 1e-6 and update_error <= 1e-6, (grad_error, update_error)


# SEAM (SPEC §3; official trainer of ZJUWYH/seam, read for the facts)


def _published_masked_ce(logits: torch.Tensor, ids: torch.Tensor, differ: torch.Tensor) -> torch.Tensor:
    """The published SEAM masked cross-entropy: the labels are a copy of the input ids, the logits at t are
    multiplied by differ[t] and the label at t + 1 by differ[t + 1], and label id 0 is ignored."""
    labels = ids * differ.long()
    labels = labels.masked_fill(labels == 0, -100)
    return _shifted_ce(logits * differ.unsqueeze(-1).to(logits.dtype), labels)


def _published_seam_gradient(model, harmful: dict, refusal: dict, benign: dict, alpha: float, beta: float, eps: float,
                             official: bool) -> tuple[list, list]:
    """SPEC §3 written out independently: ∇(L_ul + α·L_up) + (β/ε)·[(g_a(θ_a) − g_a)/‖g_a‖ + (g_b(θ_b) − g_b)/‖g_b‖],
    θ_a = θ + ε(ĝ_b − c·ĝ_a), θ_b = θ + ε(ĝ_a − c·ĝ_b), c = ⟨g_a, g_b⟩/(‖g_a‖‖g_b‖ + 1e-8) as published (the
    project leaves the 1e-8 out: a relative difference of 1e-8/(‖g_a‖‖g_b‖), about 1e-10 in the test below).

    official: L_ul, L_up and g_a use the published masked CE over the positions where the paired harmful and
    refusal ids differ; g_b is the plain CE of every non-padding token. Otherwise every term is the CE of the
    response-token labels. Returns the whole gradient and its L_sd part."""
    params = list(model.parameters())
    if official:
        differ = harmful["input_ids"] != refusal["input_ids"]

        def ce_harmful(logits):
            return _published_masked_ce(logits, harmful["input_ids"], differ)

        def ce_refusal(logits):
            return _published_masked_ce(logits, refusal["input_ids"], differ)

        benign_labels = benign["input_ids"].masked_fill(benign["attention_mask"] == 0, -100)
    else:
        def ce_harmful(logits):
            return _shifted_ce(logits, harmful["labels"])

        def ce_refusal(logits):
            return _shifted_ce(logits, refusal["labels"])

        benign_labels = benign["labels"]

    def loss_a():
        return ce_harmful(_logits(model, harmful).logits)

    def loss_b():
        return _shifted_ce(_logits(model, benign).logits, benign_labels)

    g_main = torch.autograd.grad(_manual_ul_plus_up(model, harmful, refusal, alpha, ce_harmful, ce_refusal), params)
    g_a = torch.autograd.grad(loss_a(), params)
    g_b = torch.autograd.grad(loss_b(), params)
    n_a = torch.sqrt(sum((g * g).sum() for g in g_a))
    n_b = torch.sqrt(sum((g * g).sum() for g in g_b))
    c = sum((x * y).sum() for x, y in zip(g_a, g_b)) / (n_a * n_b + 1e-8)
    g_a_moved = _gradient_at(params, [y / n_b - c * x / n_a for x, y in zip(g_a, g_b)], eps, loss_a)
    g_b_moved = _gradient_at(params, [x / n_a - c * y / n_b for x, y in zip(g_a, g_b)], eps, loss_b)
    sd = [beta / eps * ((am - a) / n_a + (bm - b) / n_b) for am, a, bm, b in zip(g_a_moved, g_a, g_b_moved, g_b)]
    return [m + s for m, s in zip(g_main, sd)], sd


@pytest.mark.parametrize("official", [True, False], ids=["official_masking", "response_labels"])
def test_seam_step_through_the_module_equals_the_published_arithmetic(official, tokenizer, tmp_path, float64_rms_norm,
                                                                      record_property):
    lr, wd, alpha, beta, eps = 1e-3, 0.01, 1.0, 1.0, 1e-3  # β = 1 so the L_sd term weighs in the comparison
    model = _tiny_model(tokenizer)
    optim = OptimConfig(lr=lr, batch_size=4, weight_decay=wd)
    params = {"num_samples": 8, "alpha": alpha, "beta": beta, "eps": eps, "official_masking": official}
    module, data, _ = build_defense(model, tokenizer, _bundle(), "seam", params, optim, PromptFormat(), 0)
    module.model.double()
    reference = copy.deepcopy(module.model)
    batch, grads, before = _one_pipeline_step(module, data, tmp_path)

    harmful, refusal, benign = batch["harmful"], batch["refusal"], batch["benign"]
    assert harmful["input_ids"].shape[0] == refusal["input_ids"].shape[0] == benign["input_ids"].shape[0] == 4
    want, sd = _published_seam_gradient(reference, harmful, refusal, benign, alpha, beta, eps, official)
    grad_error, update_error = _first_step_errors(module, before, grads, want, lr, wd)
    record_property("rel_error_gradient", grad_error)
    record_property("rel_error_update", update_error)
    assert grad_error <= 1e-6 and update_error <= 1e-6, (grad_error, update_error)
    # the comparison can fail on L_sd: its estimate is a sizeable part of the gradient, and the masking decides it
    share = math.sqrt(sum(float((s**2).sum()) for s in sd) / sum(float((w**2).sum()) for w in want))
    record_property("sd_share", share)
    assert share > 0.05, share
    if official:
        plain, _ = _published_seam_gradient(copy.deepcopy(reference), harmful, refusal, benign, alpha, beta, eps,
                                            False)
        assert rel_error(plain, want) > 1e-2


@pytest.mark.parametrize("name,params,expected", [
    ("repnoise", {"num_samples": 7}, {"harmful": 7, "refusal": 7}),
    ("vaccine", {"num_align": 9}, {"align": 9}),
    ("npo", {"num_samples": 5, "num_align": 6}, {"align": 6, "harmful": 5}),
    ("npo", {}, {"align": 18, "harmful": 12}),  # null: the whole pools
])
def test_baseline_streams_have_the_configured_sizes_and_lora_by_default(name, params, expected, tokenizer):
    module, data, exact = build_defense(_tiny_model(tokenizer), tokenizer, _bundle(), name, params,
                                        OptimConfig(lr=1e-3, batch_size=4), PromptFormat(), seed=0)
    assert data.sizes() == data.expected == expected and not exact
    assert hasattr(module.model, "peft_config")  # the published baselines train LoRA adapters
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(UserError, match="defense.params.nosuch: unknown option"):
        build_defense(_tiny_model(tokenizer), tokenizer, _bundle(), name, {"nosuch": 1},
                      OptimConfig(lr=1e-3, batch_size=4), PromptFormat(), seed=0)


def test_the_attack_path_is_refreshed_every_attack_refresh_steps_on_the_recent_harmful_batches(tokenizer, tmp_path,
                                                                                               monkeypatch):
    """attack_steps=2, attack_refresh=3 over 8 steps: simulated fine-tunes at steps 0, 3 and 6, each on the last
    (at most 2) harmful batches the defense saw, and the trap's loss logged every step."""
    import selfdestruct.modules.ctrap as ctrap_module

    calls = []
    real = ctrap_module.attack_displacement

    def counting(model, batches, steps, lr):
        calls.append((len(batches), steps, lr))
        return real(model, batches, steps, lr)

    monkeypatch.setattr(ctrap_module, "attack_displacement", counting)
    params = {"num_samples": 8, "num_align": 8, "data": "align_general", "adapter": "full", "attack_steps": 2,
              "attack_refresh": 3, "attack_lr": 1e-3}
    csv = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    apply_defense(_tiny_model(tokenizer), tokenizer, _ctx(tmp_path, [csv]), "ctrap", params,
                  OptimConfig(lr=1e-3, batch_size=2, epochs=1))  # 15 general examples: 8 steps
    assert calls == [(1, 2, 1e-3), (2, 2, 1e-3), (2, 2, 1e-3)]
    import csv as csvlib

    rows = [r for r in csvlib.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("defense/loss")]
    assert len(rows) == 8 and all(math.isfinite(float(r["defense/loss_collapse_attack"])) for r in rows)


def test_the_attack_path_keys_stay_out_of_the_cache_key_while_the_option_is_off(tmp_path):
    """conf/defense/ctrap.yaml lists attack_steps and its three companions; while attack_steps is 0 the defense
    stage's cache key holds the params it held before the option existed, and any attack_* value changes it once
    attack_steps > 0."""
    from selfdestruct.objectives.ctrap import ATTACK_PATH_FIELDS, ctrap_key_params

    cfg = compose_config("defend", ["defense=ctrap_tuned"], tmp_path)
    params = dict(cfg.defense.params)
    assert set(ATTACK_PATH_FIELDS) <= set(params) and params["attack_steps"] == 0
    assert ctrap_key_params(params) == {k: v for k, v in params.items() if not k.startswith("attack_")}
    on = {**params, "attack_steps": 96}
    assert ctrap_key_params(on) == on and ctrap_key_params({**on, "attack_lam": 0.2}) != ctrap_key_params(on)
    assert DEFENSES["ctrap"].key_params(params) == ctrap_key_params(params)
    assert DEFENSES["seam"].key_params({"beta": 1.0}) == {"beta": 1.0}
