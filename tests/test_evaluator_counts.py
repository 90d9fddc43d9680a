"""The evaluator's counting, with generation stubbed out: which answers the collapse-token shares are taken over."""

from __future__ import annotations

import pytest
import torch

from selfdestruct.data.records import EvalSets, Example
from selfdestruct.eval.evaluator import Evaluator
from selfdestruct.eval.judges import KeywordJudge

E = 7  # the collapse token


class _Stub(Evaluator):
    """Harmful prompts get a compliant answer without e; benign prompts get [e, e, e, 5] (3 of 4 tokens are e)."""

    def generate(self, model, prompts):
        if prompts and prompts[0].startswith("harm"):
            return ["Sure. Step 1: do it."] * len(prompts), [[1, 2, 3, 4]] * len(prompts)
        return ["5"] * len(prompts), [[E, E, E, 5]] * len(prompts)

    def token_nll(self, model, examples):
        return 2.0 * len(examples), len(examples)


def _sets() -> EvalSets:
    harmful = [Example(prompt=f"harm {i}", response="x") for i in range(4)]
    benign = [Example(prompt=f"add {i}", response="5", answer="5" if i < 2 else "6") for i in range(4)]
    return EvalSets(harmful=harmful, benign=benign, general=[Example(prompt="p", response="r")])


def test_collapse_token_shares_are_counted_on_harmful_and_benign_answers_apart():
    model = torch.nn.Linear(1, 1)
    result, _ = _Stub(tokenizer=None, sets=_sets(), judge=KeywordJudge(), collapse_token_id=E,
                      show_progress=False)(model, "post")
    assert result["collapse_token_rate"] == 0.0
    assert result["collapse_token_rate_benign"] == pytest.approx(0.75)
    assert result["utility"] == pytest.approx(0.5)
    assert result["perplexity"] == pytest.approx(torch.e**2)


def test_without_a_collapse_token_neither_share_is_reported():
    result, _ = _Stub(tokenizer=None, sets=_sets(), judge=KeywordJudge(), show_progress=False)(torch.nn.Linear(1, 1),
                                                                                           "post")
    assert "collapse_token_rate" not in result and "collapse_token_rate_benign" not in result


class _DeviceSpy(_Stub):
    """Records the device of the model's parameters when it generates."""

    seen: list

    def generate(self, model, prompts):
        self.seen.append(next(model.parameters()).device.type)
        return super().generate(model, prompts)


def test_the_model_is_evaluated_where_eval_device_says_and_left_where_it_was():
    spy = _DeviceSpy(tokenizer=None, sets=_sets(), judge=KeywordJudge(), show_progress=False, device="cpu")
    spy.seen = []
    model = torch.nn.Linear(1, 1)
    spy(model, "post")
    assert spy.seen == ["cpu", "cpu"] and next(model.parameters()).device.type == "cpu"


def _eval_cfg(device: str, accelerator: str = "auto"):
    from omegaconf import OmegaConf

    return OmegaConf.create({"eval": {"device": device}, "trainer": {"accelerator": accelerator}})


@pytest.mark.parametrize(("device", "accelerator", "cuda", "expected"), [
    ("auto", "auto", False, "cpu"), ("auto", "auto", True, "cuda"), ("auto", "gpu", True, "cuda"),
    ("auto", "cpu", True, "cpu"), ("cpu", "gpu", True, "cpu"), ("cuda:1", "auto", True, "cuda:1"),
])
def test_eval_device_auto_follows_the_trainer_and_the_machine(monkeypatch, device, accelerator, cuda, expected):
    from selfdestruct.cli_common import eval_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert eval_device(_eval_cfg(device, accelerator)) == expected


@pytest.mark.parametrize(("device", "message"), [("tpu", "expected auto, cpu, cuda"), ("cuda", "not available")])
def test_a_bad_eval_device_is_refused_naming_the_key(monkeypatch, device, message):
    from selfdestruct.cli_common import eval_device
    from selfdestruct.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=f"eval.device={device}.*{message}"):
        eval_device(_eval_cfg(device))
