"""Every config field is checked before any work: a table of bad inputs, each one line naming its key, exit 2.

The entry points run in-process (composed exactly as the command line would compose them, through
``tests/helpers.py``) with ``model_path=defend``, so each bad value is caught before data loading, caching or
training; one row also runs as a real subprocess to check the exit status and the absence of a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import compose_config

from selfdestruct import attack as attack_entry
from selfdestruct import defend as defend_entry
from selfdestruct.utils.job import run_job

# (overrides, the text the one-line error must contain)
BAD_ATTACK = [
    (["attack.epochs=0"], "attack.epochs=0: expected an integer >= 1"),
    (["attack.epochs=1.5"], "attack.epochs=1.5"),
    (["attack.lr=-1"], "attack.lr=-1: expected a finite number > 0"),
    (["attack.lr=0"], "attack.lr=0"),
    (["attack.lr=abc"], "attack.lr='abc'"),
    (["attack.lr=nan"], "attack.lr=nan"),
    (["attack.lr=inf"], "attack.lr=inf"),
    (["attack.num_samples=0"], "attack.num_samples=0"),
    (["attack.num_samples=-5"], "attack.num_samples=-5"),
    (["attack.batch_size=0"], "attack.batch_size=0"),
    (["attack.weight_decay=-0.1"], "attack.weight_decay=-0.1"),
    (["attack.warmup_ratio=1.5"], "attack.warmup_ratio=1.5"),
    (["attack.schedule=linearish"], "attack.schedule='linearish': expected one of constant, cosine, linear"),
    (["attack.optimizer=rmsprop"], "attack.optimizer='rmsprop': expected one of adamw, adam, sgd"),
    (["attack.momentum=1.0"], "attack.momentum=1.0: expected a finite number >= 0 and <= 0.999"),
    (["objective.utility_floor=1.5"], "objective.utility_floor=1.5: expected a finite number >= 0 and <= 1"),
    (["attack.max_grad_norm=0"], "attack.max_grad_norm=0"),
    (["attack.max_length=1"], "attack.max_length=1"),
    (["attack.data=poison"], "attack.data='poison': expected one of harmful, benign, mixed"),
    (["attack=mixed", "attack.poison_ratio=1.5"], "attack.poison_ratio=1.5"),
    (["attack=mixed", "attack.poison_ratio=-0.1"], "attack.poison_ratio=-0.1"),
    (["attack=lora", "attack.lora.rank=0"], "attack.lora.rank=0: expected an integer >= 1"),
    (["attack=lora", "attack.lora.alpha=-2"], "attack.lora.alpha=-2"),
    (["attack=lora", "attack.lora.dropout=1.0"], "attack.lora.dropout=1.0"),
    (["attack=lora", "attack.lora.target_modules=[]"], "attack.lora.target_modules"),
    (["defense=seam", "defense.params.eps=0"], "defense.params.eps=0: expected a finite number > 0"),
    (["defense=seam", "defense.params.beta=nan"], "defense.params.beta=nan"),
    (["defense=seam", "defense.params.estimator=backward"], "defense.params.estimator='backward'"),
    (["defense=seam", "defense.params.num_samples=0"], "defense.params.num_samples=0"),
    (["defense=seam", "defense.optim.lr=-1e-4"], "defense.optim.lr=-0.0001"),
    (["defense=ctrap", "defense.params.gradient=nosuch"], "defense.params.gradient='nosuch'"),
    (["defense=ctrap", "defense.params.step_size=0"], "defense.params.step_size=0"),
    (["defense=ctrap", "defense.params.unroll_steps=0"], "defense.params.unroll_steps=0"),
    (["defense=ctrap", "defense.params.lora_rank=0"], "defense.params.lora_rank=0"),
    (["defense=ctrap", "defense.params.adapter=qlora"], "defense.params.adapter='qlora'"),
    (["defense=ctrap", "defense.params.data=everything"], "defense.params.data='everything'"),
    (["defense=ctrap", "defense.params.radii=[]"], "defense.params.radii=[]"),
    (["defense=ctrap", "defense.params.num_general=10"], "defense.params.num_general=10"),
    (["defense=ctrap", "defense.optim.epochs=0"], "defense.optim.epochs=0"),
    (["defense=repnoise", "defense.params.beta=-1"], "defense.params.beta=-1: expected a finite number >= 0"),
    (["defense=vaccine", "defense.params.rho=nan"], "defense.params.rho=nan"),
    (["defense=npo", "defense.params.adapter=qlora"], "defense.params.adapter='qlora'"),
    (["defense=npo", "defense.params.num_align=0"], "defense.params.num_align=0"),
    (["pretrain.lr=0"], "pretrain.lr=0"),
    (["align.epochs=0"], "align.epochs=0"),
    (["align.batch_size=-1"], "align.batch_size=-1"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    (["trainer.checkpoint_every_n_steps=-1"], "trainer.checkpoint_every_n_steps=-1"),
]
BAD_DEFEND = [
    (["defense=seam", "defense.params.alpha=inf"], "defense.params.alpha=inf"),
    (["defense=ctrap", "defense.params.lam=abc"], "defense.params.lam='abc'"),
    (["align.warmup_ratio=2"], "align.warmup_ratio=2"),
    (["pretrain.schedule=step"], "pretrain.schedule='step'"),
]


def _fails_before_work(entry, config: str, overrides: list[str], needle: str, tmp_path, capsys) -> None:
    cfg = compose_config(config, overrides, tmp_path)
    body = (lambda: entry.attack(cfg)) if config == "attack" else (lambda: entry.defend(cfg))
    with pytest.raises(SystemExit) as exit_info:
        run_job(body, tmp_path)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "metrics.json").exists()
    assert not any(tmp_path.rglob("*.safetensors")) and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("overrides,needle", BAD_ATTACK, ids=[" ".join(o) for o, _ in BAD_ATTACK])
def test_bad_attack_input_is_one_line_naming_the_key(overrides, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["model_path=defend", f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    _fails_before_work(attack_entry, "attack", overrides, needle, tmp_path, capsys)


@pytest.mark.parametrize("overrides,needle", BAD_DEFEND, ids=[" ".join(o) for o, _ in BAD_DEFEND])
def test_bad_defend_input_is_one_line_naming_the_key(overrides, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = [f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    _fails_before_work(defend_entry, "defend", overrides, needle, tmp_path, capsys)


def test_a_zero_epoch_attack_exits_2_from_the_command_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "selfdestruct.attack", "model_path=defend", "attack.epochs=0",
                           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: attack.epochs=0: expected an integer >= 1" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()
