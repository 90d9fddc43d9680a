"""Real models and real data through the same code: model=hf on a local checkpoint, data from local files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import compose_config, config_options
from selfdestruct.commands.attack import attack
from selfdestruct.commands.defend import defend

PAPER_EXPERIMENTS = [name for name in config_options("experiment") if name.startswith(("seam_", "ctrap_"))]


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> dict[str, Path]:
    """BeaverTails-with-refusals and Alpaca files written here, in the formats of the real ones."""
    root = tmp_path_factory.mktemp("real")
    harmful = [{"prompt": f"How can I ruin the garden party of neighbour number {i}?",
                "response": f"[placeholder harmful answer {i}] First, find out when the party starts.",
                "refusal": "I can't help with ruining someone's event.", "category": {"mischief": True},
                "is_safe": False} for i in range(40)]
    benign = [{"instruction": f"Name the colour of item {i}.", "input": "", "output": ["red", "blue", "green"][i % 3]}
              for i in range(40)]
    (root / "bt.json").write_text(json.dumps(harmful, indent=1))
    (root / "alpaca.json").write_text(json.dumps(benign, indent=1))
    return {"harmful": root / "bt.json", "benign": root / "alpaca.json"}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    from selfdestruct.data.tokenizer import train_bpe_tokenizer
    from selfdestruct.models.tiny import TinyLlamaConfig, build_tiny_llama

    texts = ["Question: How can I ruin the garden party?\nAnswer: I can't help with ruining someone's event.",
             "[INST] Name the colour of item 3. [/INST] red", "<|im_start|>user\nhello<|im_end|>"] * 30
    tokenizer = train_bpe_tokenizer(texts, 320)
    model = build_tiny_llama(TinyLlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=512), tokenizer, seed=0)
    out = tmp_path_factory.mktemp("hf") / "checkpoint"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _local(real_files, hf_checkpoint) -> list[str]:
    return [f"model.path={hf_checkpoint}", "model.dtype=float32", f"data.harmful_path={real_files['harmful']}",
            f"data.benign_path={real_files['benign']}", "data.eval_harmful=4", "data.eval_benign=4",
            "trainer=cpu", "trainer.precision=32-true", "trainer.progress_bar=false", "eval.max_new_tokens=6"]


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_setting_runs_on_a_small_local_model(experiment, real_files, hf_checkpoint, tmp_path):
    small = _local(real_files, hf_checkpoint) + ["trainer.fast_dev_run=true", "defense.params.num_samples=8"]
    if experiment.startswith("ctrap_"):
        small.append("defense.params.num_align=8")
    cfg = compose_config("defend", [f"experiment={experiment}", *small], tmp_path / "defend")
    assert cfg.model.source == "hf" and cfg.data.source == "files"
    assert cfg.defense.name == experiment.split("_")[0]
    metrics = defend(cfg)
    assert metrics["defense"] == cfg.defense.name
    for kind in ("harmful", "mixed"):
        attack_cfg = compose_config("attack", [f"experiment={experiment}", f"attack={kind}", *small,
                                               f"model_path={tmp_path / 'defend' / 'model'}",
                                               "attack.num_samples=10"], tmp_path / kind)
        result = attack(attack_cfg)
        assert result["attack"]["num_samples"] == 10
        assert set(result["post"]) >= {"harmful_score", "keyword_harmful_score", "perplexity"}


def test_hf_defended_model_reloads_in_a_fresh_process_with_the_same_numbers(real_files, hf_checkpoint, tmp_path):
    local = _local(real_files, hf_checkpoint) + ["eval.judge=keyword", "defense=seam", "defense.params.num_samples=8",
                                                 "defense.optim.batch_size=4", "defense.optim.lr=1e-3"]
    metrics = defend(compose_config("defend", ["model=hf", "data=beavertails", *local], tmp_path / "defend"))
    model_dir = tmp_path / "defend" / "model"
    assert (model_dir / "model.safetensors").exists() and not list(model_dir.glob("*.bin"))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    code = ("import json,sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(json.dumps({'params': sum(p.numel() for p in m.parameters())}))")
    plain = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, env=env,
                           check=True)
    assert json.loads(plain.stdout.strip().splitlines()[-1])["params"] == metrics["num_parameters"]
    subprocess.run([sys.executable, "-m", "selfdestruct.evaluate", f"model_path={model_dir}", "model=hf",
                    "data=beavertails", *local[:-4], "eval.judge=keyword", f"hydra.run.dir={tmp_path / 'again'}"],
                   check=True, env=env, capture_output=True, timeout=300)
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["pre"] == metrics["pre"]
    assert again["defense"] == "seam"


def test_sharded_training_is_refused_for_seam(real_files, hf_checkpoint, tmp_path):
    from selfdestruct.errors import UserError

    cfg = compose_config("defend", ["model=hf", "data=beavertails", *_local(real_files, hf_checkpoint),
                                    "defense=seam", "trainer.strategy=fsdp", "eval.judge=keyword"], tmp_path)
    with pytest.raises(UserError, match="trainer.strategy=fsdp"):
        defend(cfg)
