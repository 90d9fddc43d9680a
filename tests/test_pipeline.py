"""End-to-end behaviour on the micro model: every config runs, attacks move weights, seeds reproduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from helpers import compose_config, config_options
from conftest import SMOKE_OVERRIDES
from selfdestruct.commands.attack import attack
from selfdestruct.commands.defend import defend

DEFEND_GROUPS = ("paths", "data", "model", "pretrain", "align", "defense", "trainer", "logger", "eval")
ATTACK_GROUPS = ("intensity", "attack")


def _skip_unavailable(group: str, option: str, tmp_path) -> None:
    if group != "trainer" or torch.cuda.is_available():
        return
    if compose_config("defend", [f"trainer={option}"], tmp_path).trainer.accelerator == "gpu":
        pytest.skip(f"trainer={option} needs CUDA devices")


@pytest.fixture(scope="session")
def defended(tmp_path_factory):
    """A smoke-test defended micro model (one batch per stage)."""
    run_dir = tmp_path_factory.mktemp("defend")
    defend(compose_config("defend", SMOKE_OVERRIDES, run_dir))
    return run_dir


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real"


@pytest.fixture(scope="session")
def local_hf_model(tmp_path_factory) -> Path:
    """A micro Llama saved as an ordinary Hugging Face checkpoint (what model=hf loads)."""
    from selfdestruct.data.tokenizer import train_bpe_tokenizer
    from selfdestruct.models.tiny import TinyLlamaConfig, build_tiny_llama

    tokenizer = train_bpe_tokenizer(["Question: How do I bake bread?\nAnswer: Mix flour and water."] * 50, 300)
    model = build_tiny_llama(TinyLlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
                             tokenizer, seed=0)
    out = tmp_path_factory.mktemp("hf") / "checkpoint"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def option_overrides(group: str, option: str, hf_dir: Path) -> list[str]:
    """What an option needs beyond itself to run here (its mandatory paths point at local fixtures)."""
    if (group, option) == ("data", "beavertails"):
        return [f"data.harmful_path={FIXTURES / 'beavertails_refusals.json'}",
                f"data.benign_path={FIXTURES / 'alpaca.json'}", "data.eval_harmful=2", "data.eval_benign=2",
                "eval.judge=keyword", "model=hf", f"model.path={hf_dir}", "model.dtype=float32"]
    if (group, option) == ("model", "hf"):
        return [f"model.path={hf_dir}", "model.dtype=float32"]
    return []


@pytest.mark.parametrize("group,option", [(g, o) for g in DEFEND_GROUPS for o in config_options(g)])
def test_every_defend_config_runs_one_step(group, option, tmp_path, local_hf_model):
    _skip_unavailable(group, option, tmp_path)
    overrides = [o for o in SMOKE_OVERRIDES if not o.startswith(f"{group}=")] + [f"{group}={option}"]
    overrides += option_overrides(group, option, local_hf_model)
    cfg = compose_config("defend", overrides, tmp_path)
    metrics = defend(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["pre"]) >= {"harmful_score", "utility", "perplexity", "refusal_rate", "distinct_2"}
    assert "post" not in saved and saved["defense"] == cfg.defense.get("label", cfg.defense.name)
    assert (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("group,option", [(g, o) for g in ATTACK_GROUPS for o in config_options(g)])
def test_every_attack_config_runs_one_step(group, option, defended, tmp_path):
    overrides = [*SMOKE_OVERRIDES, f"model_path={defended / 'model'}", f"{group}={option}"]
    cfg = compose_config("attack", [o for o in overrides if not o.startswith("model=")], tmp_path)
    metrics = attack(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    expected = {"kind": cfg.attack.name, "lr": cfg.attack.lr, "num_samples": cfg.attack.num_samples,
                "epochs": cfg.attack.epochs}
    if cfg.attack.data == "mixed":
        expected["poison_ratio"] = cfg.attack.poison_ratio
    config = saved["attack"].pop("config")  # every attack field, as the run used it
    assert saved["attack"] == expected
    assert {key: config[key] for key in cfg.attack} == OmegaConf.to_container(cfg.attack, resolve=True)
    assert set(saved) >= {"defense", "attack", "pre", "post", "seed", "search"}
    assert saved["pre"].keys() == saved["post"].keys()
    assert metrics["seed"] == 0


def _attack_overrides(defended, *extra):
    return [o for o in SMOKE_OVERRIDES if not o.startswith(("model=", "trainer.fast_dev_run"))] + [
        f"model_path={defended / 'model'}", "attack.num_samples=16", "attack.epochs=1", "attack.batch_size=8",
        "eval.max_examples=6", *extra]


@pytest.mark.parametrize("kind", ["harmful", "lora"])
def test_an_attack_changes_the_weights(kind, defended, tmp_path):
    cfg = compose_config("attack", _attack_overrides(defended, f"attack={kind}", "attack.lr=1e-2",
                                                     "save_model=true"), tmp_path)
    attack(cfg)
    before = load_file(str(defended / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert before.keys() == after.keys()  # LoRA adapters are merged: a plain Llama comes out
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the attack left every weight unchanged"
    if kind == "lora":  # adapters sit on the projections only: embeddings and norms stay put
        assert not any("embed_tokens" in k or "norm" in k for k in changed)
        assert any("q_proj" in k for k in changed)


def test_attack_seed_orders_the_batches_and_keeps_the_model(defended, tmp_path):
    """attack.seed=null and attack.seed equal to the run's seed are one attack; another attack.seed is another data
    order of the same defended model: other weights, the same pre-attack evaluation, recorded in metrics.json."""
    weights, saved = {}, {}
    for name, extra in (("null", []), ("same", ["attack.seed=3"]), ("other", ["attack.seed=4"])):
        cfg = compose_config("attack", _attack_overrides(defended, "seed=3", "attack.lr=3e-3", "save_model=true",
                                                         *extra), tmp_path / name)
        attack(cfg)
        weights[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
        saved[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert all(torch.equal(weights["null"][k], weights["same"][k]) for k in weights["null"])
    assert not all(torch.equal(weights["null"][k], weights["other"][k]) for k in weights["null"])
    assert [saved[n]["attack"]["config"]["seed"] for n in ("null", "same", "other")] == [None, 3, 4]
    assert {saved[n]["seed"] for n in saved} == {3}  # the run's seed: the defended model's
    assert saved["null"]["pre"] == saved["other"]["pre"]


def test_same_seed_gives_identical_metrics(defended, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose_config("attack", _attack_overrides(defended, "seed=0", "attack.lr=3e-3"), tmp_path / name)
        attack(cfg)
        runs.append((tmp_path / name / "metrics.json").read_text())
    assert runs[0] == runs[1]
    other = compose_config("attack", _attack_overrides(defended, "seed=1", "attack.lr=3e-3"), tmp_path / "c")
    attack(other)
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["post"] != json.loads(runs[0])["post"]


def test_realised_attack_size_is_the_configured_size(defended, tmp_path, caplog):
    cfg = compose_config("attack", _attack_overrides(defended, "attack.num_samples=24"), tmp_path)
    with caplog.at_level("INFO"):
        attack(cfg)
    assert "attack.num_samples: using 24 of 2400 examples" in caplog.text
    assert "stream train: 24 examples" in caplog.text


# ---- the published recipes and presets, as their commands run them (issue 10) -----------------------------------


@pytest.mark.parametrize("model", ["embedded", "hf"])
def test_defend_with_published_ctrap_changes_only_the_lora_targets(model, local_hf_model, tmp_path):
    """``python -m selfdestruct.defend defense=ctrap``: LoRA adapters on q/k/v, trained and merged into the saved
    model, so the released weights differ from the aligned ones (defense=sft: the aligned model itself) exactly
    in the q/k/v projections."""
    overrides = list(SMOKE_OVERRIDES)
    if model == "hf":
        overrides = [o for o in overrides if not o.startswith("model=")] + ["model=hf", *option_overrides(
            "model", "hf", local_hf_model)]
    runs = {}
    for defense in ("sft", "ctrap"):
        cfg = compose_config("defend", [*overrides, f"defense={defense}"], tmp_path / defense)
        assert defend(cfg)["defense"] == defense
        runs[defense] = load_file(str(tmp_path / defense / "model" / "model.safetensors"))
    aligned, defended = runs["sft"], runs["ctrap"]
    assert aligned.keys() == defended.keys()  # merged: no adapter weights in the released model
    changed = {k for k in aligned if not torch.equal(aligned[k], defended[k])}
    targets = {k for k in aligned if k.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight"))}
    layers = {k.split(".layers.")[1].split(".")[0] for k in aligned if ".layers." in k}
    assert len(layers) >= 2 and len(targets) == 3 * len(layers) and changed == targets


@pytest.mark.parametrize("sweep,cell,expected", [
    ("ctrap_paper", "attack.num_samples=100", {"kind": "lora", "lr": 1e-5, "num_samples": 100, "epochs": 20}),
    ("seam_paper", "attack.lr=2e-5", {"kind": "harmful", "lr": 2e-5, "num_samples": 1000, "epochs": 1}),
])
def test_paper_attack_sweeps_run_one_cell(sweep, cell, expected, defended, tmp_path, cache_dir):
    """``python -m selfdestruct.attack sweep=<paper preset> ...`` as a multirun, narrowed to one published cell
    (a command-line value of a swept key replaces its list); fast_dev_run keeps it to one batch. lm-eval is not
    installed here, so seam_paper's utility falls back to the embedded exact match (eval.lm_eval.tasks=[])."""
    smoke = [o for o in SMOKE_OVERRIDES if not o.startswith(("model=", "eval.max_new_tokens"))]
    args = [f"sweep={sweep}", *smoke, f"model_path={defended / 'model'}", cell,
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "eval.lm_eval.tasks=[]"]
    env = {**os.environ, "WANDB_MODE": "disabled", "SELFDESTRUCT_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "selfdestruct.attack", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [p.parent for p in (tmp_path / "sweep").rglob("metrics.json")]
    assert len(cells) == 1, cells
    metrics = json.loads((cells[0] / "metrics.json").read_text())
    assert {k: metrics["attack"].get(k) for k in expected} == expected
    composed = yaml.safe_load((cells[0] / ".hydra" / "config.yaml").read_text())
    attack_cfg = composed["attack"]
    if sweep == "ctrap_paper":  # a second LoRA on the merged defended model, as published
        assert (attack_cfg["batch_size"], attack_cfg["lora"]["rank"], attack_cfg["lora"]["alpha"],
                attack_cfg["lora"]["target_modules"]) == (10, 32, 4, ["q_proj", "k_proj", "v_proj"])
        assert composed["eval"]["max_new_tokens"] == 512
    else:
        assert (attack_cfg["batch_size"], attack_cfg["weight_decay"], attack_cfg["schedule"]) == (4, 0.01, "cosine")
        assert composed["eval"]["max_new_tokens"] == 50


def test_a_capped_run_never_fills_the_cache_entry_another_length_reads(tmp_path):
    from selfdestruct.pipeline.stages import length_key
    from selfdestruct.pipeline.config import TrainerConfig

    cache = tmp_path / "cache"
    base = ["model=micro", "trainer.progress_bar=false", "eval.max_examples=4", "eval.max_new_tokens=8",
            f"paths.cache_dir={cache}", "defense=seam", "defense.params.num_samples=8"]
    built = []
    for steps in (2, 3, 3):
        defend(compose_config("defend", [*base, f"trainer.max_steps={steps}"], tmp_path / f"run{len(built)}"))
        built.append({kind: len(list((cache / kind).glob("*/key.json"))) for kind in ("base", "align", "defend")})
    # 3 steps is another model than 2 steps at every stage; the same cap again is a cache hit
    assert built == [{"base": 1, "align": 1, "defend": 1}, {"base": 2, "align": 2, "defend": 2},
                     {"base": 2, "align": 2, "defend": 2}]
    steps = [json.loads(p.read_text()).get("max_steps") for p in sorted((cache / "align").glob("*/key.json"))]
    assert sorted(steps) == [2, 3]
    # an uncapped run's key is what it was before the cap was part of it, so existing caches stay valid
    assert length_key(TrainerConfig()) == {"fast_dev_run": False}


def test_defense_seed_trains_the_defense_in_its_own_order_on_one_aligned_model(tmp_path):
    """defense.seed=null and defense.seed equal to the run's seed are one defended model (one cache entry, whose key
    is what it was before the option existed); another defense.seed trains the defense of the same aligned model in
    another order: another cache entry, other released weights, recorded in the model's provenance."""
    cache = tmp_path / "cache"
    base = ["model=micro", "trainer.progress_bar=false", "eval.max_examples=4", "eval.max_new_tokens=8",
            f"paths.cache_dir={cache}", "defense=seam", "defense.params.num_samples=8", "trainer.max_steps=2",
            "seed=3"]
    weights, keys = {}, {}
    for name, extra in (("null", []), ("same", ["defense.seed=3"]), ("other", ["defense.seed=4"])):
        metrics = defend(compose_config("defend", [*base, *extra], tmp_path / name))
        weights[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
        provenance = json.loads((tmp_path / name / "model" / "selfdestruct.json").read_text())
        keys[name] = provenance["key"]
        assert provenance["defense_seed"] == (4 if name == "other" else 3) and metrics["seed"] == 3
    assert "defense_seed" not in keys["null"] and keys["same"]["defense_seed"] == 3
    assert all(torch.equal(weights["null"][k], weights["same"][k]) for k in weights["null"])
    assert not all(torch.equal(weights["null"][k], weights["other"][k]) for k in weights["null"])
    assert len(list((cache / "align").glob("*/key.json"))) == 1  # one aligned model under all three
    assert len(list((cache / "defend").glob("*/key.json"))) == 3


def test_align_seed_aligns_one_base_model_in_its_own_order(tmp_path):
    """align.seed=null and align.seed equal to the run's seed are one aligned model (one cache entry, whose key is
    what it was before the option existed); another align.seed aligns the same pre-trained base in another order:
    another aligned entry (its key and the model's provenance name the seed), other weights, the same base."""
    cache = tmp_path / "cache"
    base = ["model=micro", "trainer.progress_bar=false", "eval.max_examples=4", "eval.max_new_tokens=8",
            f"paths.cache_dir={cache}", "trainer.max_steps=2", "seed=3"]
    weights = {}
    for name, extra in (("null", []), ("same", ["align.seed=3"]), ("other", ["align.seed=4"])):
        defend(compose_config("defend", [*base, *extra], tmp_path / name))
        weights[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
    keys = sorted(json.loads(p.read_text()).get("align_seed", -1) for p in (cache / "align").glob("*/key.json"))
    assert keys == [-1, 4]  # the run's own seed, named or not, is one entry without the new key
    assert all(torch.equal(weights["null"][k], weights["same"][k]) for k in weights["null"])
    assert not all(torch.equal(weights["null"][k], weights["other"][k]) for k in weights["null"])
    assert len(list((cache / "base").glob("*/key.json"))) == 1  # one pre-trained base under all three
    seeds = {name: json.loads((tmp_path / name / "model" / "selfdestruct.json").read_text())["align_seed"]
             for name in weights}
    assert seeds == {"null": 3, "same": 3, "other": 4}  # the defended model names the alignment it started from


def test_stage_logs_keep_lightnings_cloud_logger_advert_out(caplog):
    import importlib
    import logging

    import pytorch_lightning as pl

    importlib.import_module("selfdestruct.pipeline.training")  # the stages' module installs the filter

    with caplog.at_level(logging.INFO):
        pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    assert "GPU available" in caplog.text  # Lightning's own start-up lines still reach the log
    assert "litlogger" not in caplog.text
