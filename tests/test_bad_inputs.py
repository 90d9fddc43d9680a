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

from selfdestruct.commands import attack as attack_entry
from selfdestruct.commands import defend as defend_entry
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
    (["attack.seed=-1"], "attack.seed=-1: expected an integer >= 0"),
    (["attack.seed=1.5"], "attack.seed=1.5"),
    (["attack=mixed", "attack.poison_ratio=1.5"], "attack.poison_ratio=1.5"),
    (["attack=mixed", "attack.poison_ratio=-0.1"], "attack.poison_ratio=-0.1"),
    # settings the chosen attack would not read: refused, not silently ignored
    (["attack.poison_ratio=0.2"], "attack.poison_ratio=0.2: only a mixed attack reads it (attack=mixed); with "
                                  "data=harmful it would do nothing"),
    (["attack=lora", "attack.poison_ratio=0.5"], "attack.poison_ratio=0.5: only a mixed attack reads it"),
    (["attack.data=mixed"], "attack.poison_ratio=None: a mixed attack needs the share of harmful pairs"),
    (["attack.momentum=0.5"], "attack.momentum=0.5: only optimizer=sgd reads it (adamw runs with torch's default "
                              "betas)"),
    (["attack.optimizer=adam", "attack.momentum=0.0"], "attack.momentum=0.0: only optimizer=sgd reads it (adam"),
    (["attack=lora", "attack.lora.rank=0"], "attack.lora.rank=0: expected an integer >= 1"),
    (["attack=lora", "attack.lora.alpha=-2"], "attack.lora.alpha=-2"),
    (["attack=lora", "attack.lora.dropout=1.0"], "attack.lora.dropout=1.0"),
    (["attack=lora", "attack.lora.target_modules=[]"], "attack.lora.target_modules"),
    (["+attack.epoch=3"], "attack.epoch: unknown option (known: batch_size"),  # Hydra's "use +" advice, taken
    (["+eval.max_new_token=8"], "+eval.max_new_token: no setting of this command reads eval.max_new_token"),
    (["defense=ctrap", "+defense.params.lamda=1"], "defense.params.lamda: unknown option (known: adam_beta2"),
    (["defense=seam", "defense.params.eps=0"], "defense.params.eps=0: expected a finite number > 0"),
    (["defense=seam", "defense.params.beta=nan"], "defense.params.beta=nan"),
    (["defense=seam", "defense.params.estimator=backward"], "defense.params.estimator='backward'"),
    (["defense=seam", "defense.params.coupling=adam"], "defense.params.coupling='adam'"),
    (["defense=seam", "defense.params.num_samples=0"], "defense.params.num_samples=0"),
    (["defense=seam", "defense.optim.lr=-1e-4"], "defense.optim.lr=-0.0001"),
    (["defense=ctrap", "defense.params.gradient=nosuch"], "defense.params.gradient='nosuch'"),
    (["defense=ctrap", "defense.params.step_size=0"], "defense.params.step_size=0"),
    (["defense=ctrap", "defense.params.unroll_steps=0"], "defense.params.unroll_steps=0"),
    (["defense=ctrap", "defense.params.collapse_at=middle"], "defense.params.collapse_at"),
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
    (["defense=seam", "defense.seed=-1"], "defense.seed=-1: expected an integer >= 0 or null"),
    (["defense=ctrap", "defense.seed=1.5"], "defense.seed=1.5"),
    (["+defense.seed=3"], "defense.seed=3: defense=sft trains nothing"),
    (["align.seed=-1"], "align.seed=-1: expected an integer >= 0 or null"),
    (["align.seed=true"], "align.seed=True"),
    (["model=hf", "model.path=/nowhere", "align.seed=3"], "align.seed=3: model.align is false, so there is no "
                                                           "alignment stage to seed"),
    (["+defense.optim.lr=1e-5"], "defense.optim: defense=sft trains nothing"),
    (["defense=seam", "~defense.optim.lr"], "defense.optim.lr is required (missing from the config)"),
    (["pretrain.schedule=step"], "pretrain.schedule='step'"),
    (["defense=ctrap", "defense.trap_check={stop_at:10}"], "defense.trap_check.stop_at=10"),
    (["defense=ctrap", "defense.params.attack_refresh=0"], "defense.params.attack_refresh=0"),
    (["defense=ctrap", "defense.trap_check={batchsize:8}"], "defense.trap_check.batchsize: unknown option"),
    (["defense=ctrap", "defense.trap_check={utility_tasks:eval}"], "defense.trap_check.utility_tasks='eval'"),
    (["defense=ctrap_tuned", "defense.trap_check={fallback:[{radius:0.006}]}"],
     "defense.trap_check.fallback[0]: defense.params.radius"),
    (["defense=ctrap_tuned", "defense.trap_check={num_eval_harmful:101}"],
     "defense.trap_check.attacks=[[100, 2], [500, 2], [500, 4]]: the red team trains on 500 pairs"),
    (["+defense.trap_check={}"], "defense.trap_check: defense=sft trains nothing"),
    (["trainer.branch_threads=0"], "trainer.branch_threads=0"),
    # a key added with `+` that nothing reads is refused (else the run would go on without the setting)
    (["+eval.max_new_token=8"], "+eval.max_new_token: no setting of this command reads eval.max_new_token, so it "
                                "would change nothing (known keys of eval: batch_size, chat,"),
    (["+sede=3"], "+sede: no setting of this command reads sede, so it would change nothing"),
    (["++eval.max_new_token=8"], "error: ++eval.max_new_token: no setting of this command reads eval.max_new_token"),
    (["+attack.lr=1e-4"], "+attack.lr: no setting of this command reads attack.lr"),
    (["+logger.wandb.entiti=me"], "+logger.wandb.entiti: no setting of this command reads logger.wandb.entiti"),
    (["+data.harmful_pth=x.json"], "+data.harmful_pth: no setting of this command reads data.harmful_pth"),
    (["+model.hidden_sise=64"], "model.hidden_sise: unknown option (known: hidden_size,"),
    # a config group added with `+` that the command does not list: nothing of it would be read
    (["+attack=lora"], "+attack=lora: the defend command reads no attack config, so it would change nothing "
                       "(its config groups: paths, data, model, pretrain, align, defense, trainer, logger, eval, "
                       "experiment)"),
    (["+intensity=strong"], "+intensity=strong: the defend command reads no intensity config"),
    (["defense=ctrap_tuned", "trainer.branch_threads=2", "trainer.precision=bf16-mixed"],
     "trainer.branch_threads=2 runs a step's branches as threads of one process in fp32"),
    (["defense=ctrap_tuned", "trainer.branch_threads=2", "trainer.devices=2"], "needs trainer.precision=32-true"),
]


def _fails_before_work(entry, config: str, overrides: list[str], needle: str, tmp_path, capsys) -> str:
    cfg = compose_config(config, overrides, tmp_path)
    body = (lambda: entry.attack(cfg)) if config == "attack" else (lambda: entry.defend(cfg))
    with pytest.raises(SystemExit) as exit_info:
        run_job(body, tmp_path)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "metrics.json").exists()
    assert not any(tmp_path.rglob("*.safetensors")) and not (tmp_path / "cache").exists()
    return lines[0]


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


def test_an_added_key_the_attack_of_a_given_model_does_not_read_is_refused(tmp_path, capsys, monkeypatch):
    """With model_path=DIR nothing builds a defended model, so a defense setting would change nothing."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["model_path=/nowhere/model", f"paths.cache_dir={tmp_path / 'cache'}", "+defense.params.lam=1"]
    _fails_before_work(attack_entry, "attack", overrides, "+defense.params.lam: no setting of this command reads",
                       tmp_path, capsys)


@pytest.mark.parametrize("config,overrides", [
    ("defend", ["+eval.max_examples=4"]),  # declared null in conf/eval/default.yaml: Hydra's `+` may set it
    ("defend", ["+data.attack_file=x.jsonl"]),  # declared null in conf/data/synthetic.yaml
    ("defend", ["++eval.max_new_tokens=8"]),  # `++` on a declared key only changes it
    ("defend", ["defense=ctrap", "++defense.label=ctrap-paper-83ep"]),  # as experiments/nowin/run.py labels a run
    ("defend", ["defense=ctrap_tuned", "experiment=nowin_reseed", "+defense.trap_check.utility_tasks=validation"]),
    ("attack", ["model_path=defend", "defense=ctrap", "+defense.seed=3"]),
])
def test_added_keys_that_are_read_pass_the_check(config, overrides, tmp_path):
    from selfdestruct.cli_config import ATTACK_NODES, STAGE_NODES, check_added_keys

    cfg = compose_config(config, overrides, tmp_path)
    builds = STAGE_NODES if config == "defend" or cfg.model_path == "defend" else ()
    check_added_keys(cfg, ATTACK_NODES + builds if config == "attack" else builds)


def test_a_zero_epoch_attack_exits_2_from_the_command_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "selfdestruct.attack", "model_path=defend", "attack.epochs=0",
                           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: attack.epochs=0: expected an integer >= 1" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# Model files: each broken copy of a valid micro checkpoint is refused with one line naming the path and the problem
# ----------------------------------------------------------------------------------------------------------------


def _truncate(d):
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def _corrupt_header(d):
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))


def _pickle_only(d):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _no_tokenizer(d):
    for f in d.glob("tokenizer*"):
        f.unlink()


def _larger_tokenizer(d):
    from selfdestruct.data.tokenizer import train_bpe_tokenizer

    for f in d.glob("tokenizer*"):
        f.unlink()
    texts = [f"word{i} other{i * 7} thing{i * 13}" for i in range(400)]
    train_bpe_tokenizer(texts, 600).save_pretrained(d)


def _config_vocab(d):
    import json

    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 200
    (d / "config.json").write_text(json.dumps(config))


def _garbled_tokenizer(d):
    (d / "tokenizer.json").write_text("{ not json")


def _no_config(d):
    (d / "config.json").unlink()


# (how the copy is broken, the text the one-line error must contain besides the path)
BAD_MODEL_DIRS = [
    (_truncate, "model.safetensors is truncated"),
    (_corrupt_header, "model.safetensors is corrupt"),
    (_pickle_only, "weights in pickle format only (pytorch_model.bin)"),
    (_no_tokenizer, "no tokenizer"),
    (_larger_tokenizer, "the tokenizer has 600 tokens but the model's embedding has 300 rows"),
    (_config_vocab, "vocab_size=200 but the embedding in the safetensors weights has 300 rows"),
    (_garbled_tokenizer, "cannot load model"),
    (_no_config, "no config.json"),
]


@pytest.fixture(scope="module")
def valid_model_dir(tmp_path_factory):
    from selfdestruct.data.tokenizer import train_bpe_tokenizer
    from selfdestruct.models.tiny import TinyLlamaConfig, build_tiny_llama

    tokenizer = train_bpe_tokenizer(["Question: How do I bake bread?\nAnswer: Mix flour and water."] * 50, 300)
    model = build_tiny_llama(TinyLlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
                             tokenizer, seed=0)
    out = tmp_path_factory.mktemp("valid") / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _broken_copy(valid_model_dir, tmp_path_factory, breaker):
    import shutil

    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(valid_model_dir, broken)
    breaker(broken)
    return broken


@pytest.mark.parametrize("breaker,needle", BAD_MODEL_DIRS, ids=[b.__name__.strip("_") for b, _ in BAD_MODEL_DIRS])
def test_bad_model_dir_is_one_line_naming_path_and_problem(breaker, needle, valid_model_dir, tmp_path,
                                                           tmp_path_factory, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    broken = _broken_copy(valid_model_dir, tmp_path_factory, breaker)
    overrides = [f"model_path={broken}", f"paths.cache_dir={tmp_path / 'cache'}"]
    line = _fails_before_work(attack_entry, "attack", overrides, needle, tmp_path, capsys)
    assert str(broken) in line and "model_path" in line


def test_bad_model_dir_under_model_hf_is_refused_before_alignment(valid_model_dir, tmp_path, tmp_path_factory,
                                                                  capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    broken = _broken_copy(valid_model_dir, tmp_path_factory, _truncate)
    overrides = ["model=hf", f"model.path={broken}", f"paths.cache_dir={tmp_path / 'cache'}"]
    line = _fails_before_work(defend_entry, "defend", overrides, "model.safetensors is truncated", tmp_path, capsys)
    assert line.startswith("error: model.path: ") and str(broken) in line


def test_the_valid_model_dir_passes_the_same_checks(valid_model_dir):
    from selfdestruct.models.files import check_model_files
    from selfdestruct.models.io import load_model_dir

    check_model_files(valid_model_dir, "model_path")
    model, tokenizer = load_model_dir(valid_model_dir)
    assert model.get_input_embeddings().num_embeddings == 300 and len(tokenizer) <= 300
