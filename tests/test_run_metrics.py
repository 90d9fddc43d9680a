"""metrics.json has one schema: what the entry points write is what the report reads, older files included."""

from __future__ import annotations

import json

import pytest

from selfdestruct.report.collect import load_run
from selfdestruct.utils.run_metrics import METRICS_FILE, AttackRecord, RunMetrics, SchemaError


def _attack_metrics(**attack) -> RunMetrics:
    record = AttackRecord(kind="mixed", lr=3e-4, num_samples=500, epochs=2, poison_ratio=0.25,
                          config={"lr": 3e-4, "data": "mixed"}, **attack)
    return RunMetrics(defense="sft", seed=0, pre={"utility": 0.9}, attack=record, post={"utility": 0.8},
                      search={"attack_success": 0.5}, aligned={"utility": 0.91}, model_path="/m",
                      overrides=["seed=0"], environment={"torch": "2.13.0"})


def test_written_file_reads_back_equal_and_the_report_sees_it(tmp_path):
    metrics = _attack_metrics()
    written = metrics.write(tmp_path)
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == written
    assert RunMetrics.from_json(written) == metrics
    run = load_run(tmp_path)
    assert (run.status, run.stage, run.attack_kind, run.lr, run.num_samples, run.epochs) == \
        ("ok", "attack", "mixed", 3e-4, 500, 2)
    assert run.post == {"utility": 0.8} and run.search == {"attack_success": 0.5}


def test_optional_fields_are_left_out_not_written_as_null(tmp_path):
    defend = RunMetrics(defense="seam", seed=0, pre={"utility": 0.9}).to_json()
    assert set(defend) == {"defense", "seed", "pre", "aligned", "environment"}
    record = AttackRecord(kind="harmful", lr=1e-4, num_samples=100)
    data = RunMetrics(defense="sft", seed=1, pre={}, attack=record, post={}).to_json()
    assert "poison_ratio" not in data["attack"] and data["attack"]["epochs"] is None


def test_an_older_file_without_config_or_epochs_still_reads():
    old = {"defense": "sft", "seed": 0, "pre": {"utility": 0.9}, "post": {"utility": 0.1},
           "attack": {"kind": "harmful", "lr": "0.0003", "num_samples": 1000}}
    metrics = RunMetrics.from_json(old)
    assert metrics.attack == AttackRecord(kind="harmful", lr=3e-4, num_samples=1000)
    assert metrics.search is None and metrics.environment == {}


@pytest.mark.parametrize("data,message", [
    ([], "not a JSON object"),
    ({"pre": {}}, "misses 'defense'"),
    ({"defense": "sft"}, "misses the 'pre' metrics"),
    ({"defense": "sft", "pre": {}, "attack": 3}, "'attack' is not an object"),
    ({"defense": "sft", "pre": {}, "attack": {"num_samples": 10}, "post": {}}, "misses 'attack.lr'"),
    ({"defense": "sft", "pre": {}, "attack": {"lr": 1e-4, "num_samples": 10}}, "misses the 'post' metrics"),
])
def test_unusable_files_name_the_key(data, message):
    with pytest.raises(SchemaError, match=message):
        RunMetrics.from_json(data)
