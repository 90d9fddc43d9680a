"""The trap probe (pipeline/probe.py) and the defense stage's retraining of a shallow trap."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose_config

from selfdestruct.defend import defend
from selfdestruct.errors import FieldError
from selfdestruct.pipeline.probe import ProbeConfig, mean_response_ce, retrain_seed, trap_probe

BASE = ["model=micro", "trainer.progress_bar=false", "eval.max_examples=4", "eval.max_new_tokens=8",
        "defense=seam", "defense.params.num_samples=8", "trainer.max_steps=2", "seed=3"]
SMALL = "{lrs: [1e-2, 3e-2], steps: 3, batch_size: 4, num_benign: 8"


def test_probe_config_is_checked_field_by_field():
    assert ProbeConfig(lrs=[1e-4]).lrs == (1e-4,)
    for bad, field in (({"lrs": []}, "lrs"), ({"lrs": [0.0]}, "lrs"), ({"steps": 0}, "steps"),
                       ({"min_score": -1.0}, "min_score"), ({"retrains": 1}, "retrains")):
        with pytest.raises(FieldError, match=field):
            ProbeConfig(**bad)
    assert [retrain_seed(7, k) for k in range(3)] == [7, 1007, 2007]


def test_probe_fine_tunes_a_copy_and_puts_the_weights_back(tmp_path):
    from selfdestruct import cli_common as cc
    from selfdestruct.models.io import load_model_dir
    from selfdestruct.pipeline.streams import benign_tasks

    cfg = compose_config("defend", [o for o in BASE if not o.startswith("defense")], tmp_path)  # sft
    defend(cfg)
    model, tokenizer = load_model_dir(tmp_path / "model")
    bundle, fmt = cc.data_bundle(cfg), cc.prompt_format(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    probe = ProbeConfig(lrs=(1e-2, 3e-2), steps=3, batch_size=4, num_benign=8)
    benign = benign_tasks(bundle.align)
    result = trap_probe(model, tokenizer, bundle.defense_harmful, benign, fmt, probe, seed=0)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # exactly back
    assert set(result["after"]) == {1e-2, 3e-2}
    assert result["score"] == pytest.approx(sum(result["after"].values()) / 2)  # the median of two
    assert all(ce != result["before"] for ce in result["after"].values())  # the fine-tunes moved the benign loss
    again = trap_probe(model, tokenizer, bundle.defense_harmful, benign, fmt, probe, seed=0)
    assert again == result  # deterministic given its seed
    from selfdestruct.pipeline.probe import _batches
    measured = _batches(benign[:8], tokenizer, fmt, 96, 32, torch.device("cpu"))
    assert mean_response_ce(model, measured) == pytest.approx(result["before"])


@pytest.mark.parametrize("min_score,trainings", [(0.0, 1), (1e9, 2)])
def test_a_shallow_trap_is_trained_again_and_the_better_probed_model_released(min_score, trainings, tmp_path):
    cfg = compose_config("defend", [*BASE, f"defense.probe={SMALL}, min_score: {min_score}, retrains: 1}}"],
                         tmp_path)
    defend(cfg)
    provenance = json.loads((tmp_path / "model" / "selfdestruct.json").read_text())
    probes = provenance["probe"]
    assert [p["attempt"] for p in probes] == list(range(trainings))
    assert [p["data_order"] for p in probes] == [3, 1003][:trainings]
    released = [p for p in probes if p["released"]]
    assert len(released) == 1 and released[0]["score"] == max(p["score"] for p in probes)
    assert provenance["key"]["probe"]["retrains"] == 1
    if trainings == 2:  # the second training is another data order of the defense: another released candidate
        assert probes[0]["score"] != probes[1]["score"]
