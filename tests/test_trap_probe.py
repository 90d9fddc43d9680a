"""experiments/nowin/trap_probe.py: the defender-side probe whose scores experiments/nowin/README.md reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import compose_config

from selfdestruct.commands.defend import defend

REPO = Path(__file__).resolve().parents[1]


def _probe_module():
    spec = importlib.util.spec_from_file_location("trap_probe", REPO / "experiments" / "nowin" / "trap_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_fine_tunes_a_copy_measures_the_benign_loss_and_puts_the_weights_back(tmp_path):
    from selfdestruct import cli_config
    from selfdestruct.models.io import load_model_dir
    from selfdestruct.pipeline.streams import benign_tasks

    probe = _probe_module()
    cfg = compose_config("defend", ["model=micro", "trainer.progress_bar=false", "eval.max_examples=4",
                                    "eval.max_new_tokens=8", "trainer.max_steps=2"], tmp_path)
    defend(cfg)
    model, tokenizer = load_model_dir(tmp_path / "model")
    bundle, fmt = cli_config.data_bundle(cfg), cli_config.prompt_format(cfg)
    benign = benign_tasks(bundle.align)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(lrs=(1e-2, 3e-2), steps=3, batch=4, num_benign=8)
    result = probe.trap_probe(model, tokenizer, bundle.defense_harmful, benign, fmt, 0, **kwargs)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # exactly back
    assert set(result["after"]) == {1e-2, 3e-2}
    assert result["score"] == pytest.approx(sum(result["after"].values()) / 2)  # the median of two
    assert all(ce != result["before"] for ce in result["after"].values())  # the fine-tunes moved the benign loss
    assert probe.trap_probe(model, tokenizer, bundle.defense_harmful, benign, fmt, 0, **kwargs) == result
    assert probe.mean_response_ce(model, tokenizer, benign[:8], fmt) == result["before"]
    batch = probe._batches(benign[:8], tokenizer, fmt, 8, torch.device("cpu"))[0]  # re-stated: the model's own loss
    with torch.no_grad():
        assert float(model(**batch).loss) == pytest.approx(result["before"], rel=1e-5)
