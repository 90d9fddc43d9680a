"""README command 1 against its recorded runs (experiments/recorded_demos.py): the records are the generated demo
tables, a demo equal to one is named, otherwise the nearest and the cells that differ."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import load_script
from test_readme_results import BLOCKS
from test_report import write_cell



def _module():
    return load_script("experiments/recorded_demos.py")


def fake_demo(out: Path, harmful_scores: list[float]) -> None:
    """A demo's output tree for SFT alone (seed 0): attack cells with these post-attack harmful scores, one benign
    fine-tune."""
    pre, aligned = {"utility": 0.9, "harmful_score": 0.0}, {"utility": 0.9, "harmful_score": 0.0}
    for i, hs in enumerate(harmful_scores):
        write_cell(out / "grid" / "sft" / str(i), "sft", 2e-4, 100 * (i + 1), 0, pre,
                   {"utility": 0.85, "harmful_score": hs}, aligned=aligned)
    write_cell(out / "benign" / "sft", "sft", 3e-4, 2000, 0, pre, {"utility": 0.9, "task_accuracy": 0.95,
                                                                   "harmful_score": 0.0}, aligned=aligned, kind="benign")
    (out / "defend").mkdir(parents=True)


def test_the_records_are_the_generated_demo_tables_and_the_readmes_is_among_them():
    rd = _module()
    recorded = {r["file"].name: r for r in rd.records()}
    assert len(recorded) >= 7 and "results_avx512_third.md" in recorded and "results_intel_avx512.md" in recorded
    for record in recorded.values():
        assert set(record["table"]) == {"defense", "sft", "ctrap-tuned", "seam-tuned"}
        assert record["table"]["defense"][0].startswith("no-win") and len(record["table"]["sft"]) == 4
        assert record["machine"] != "machine not stated"
    readme, generated, marker = BLOCKS["README-avx512-third"]
    block = readme.read_text().split(f"<!-- {marker}:begin -->")[1]
    assert rd.demo_table(block) == recorded[generated.name]["table"]  # the README's printout is one of them
    intel = recorded["results_intel_avx512.md"]
    assert intel["table"]["ctrap-tuned"] == ["4/9 (1 seed)", "0.864", "0.984", "0.973"]
    assert intel["machine"].startswith("Intel(R) Xeon(R) Processor") and intel["machine"].endswith("2026-12-04")


def test_an_equal_table_names_every_equal_record_and_a_changed_cell_is_the_difference():
    rd = _module()
    recorded = rd.records()
    readme = next(r for r in recorded if r["file"].name == "results_avx512_third.md")
    mine = {k: list(v) for k, v in readme["table"].items()}
    same = rd.compare(mine, recorded)
    assert readme in same["equal"] and same["nearest"] is None
    assert all(r["table"] == mine for r in same["equal"])
    mine["ctrap-tuned"][0] = "5/9 (1 seed)"
    mine["sft"][1] = "0.111"  # a utility no record has
    other = rd.compare(mine, recorded)
    assert other["equal"] == [] and other["nearest"]["table"]["ctrap-tuned"][0] != "5/9 (1 seed)"
    assert len(other["differences"]) == len(rd.differences(mine, other["nearest"]["table"]))
    assert min(len(rd.differences(mine, r["table"])) for r in recorded) == len(other["differences"])
    assert rd.differences(mine, readme["table"]) == ["sft pre-attack utility: 0.111 here, 0.903 there",
                                                     "ctrap-tuned no-win: 5/9 (1 seed) here, 9/9 (1 seed) there"]
    del mine["seam-tuned"]
    assert rd.differences(mine, readme["table"])[-1] == "seam-tuned: not run here"


def test_the_script_tables_a_demo_directory_and_compares_it_with_the_records_it_is_given(tmp_path, capsys):
    rd = _module()
    fake_demo(tmp_path / "demo", [0.0, 0.0, 1.0])  # 2 of 3 cells safe
    records = tmp_path / "records"
    records.mkdir()
    assert rd.main([str(tmp_path / "demo"), "--records", str(records)]) == 0
    assert "recorded runs of this demo: none found" in capsys.readouterr().out
    table = (tmp_path / "demo" / "report" / "demo_table.md").read_text()
    assert "| sft | 2/3 (1 seed) | 0.900 | 0.950 | 1.000 |" in table
    (records / "results_same.md").write_text(table)
    (records / "results_other.md").write_text(table.replace("| sft | 2/3 (1 seed) |", "| sft | 1/3 (1 seed) |"))
    assert rd.main([str(tmp_path / "demo"), "--records", str(records), "--json", str(tmp_path / "c.json")]) == 0
    assert "the same table digit for digit as results_same.md" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["equal"] == [str(records / "results_same.md")]
    (records / "results_same.md").unlink()
    assert rd.main([str(tmp_path / "demo"), "--records", str(records)]) == 0
    said = capsys.readouterr().out
    assert "none printed this table. Nearest: results_other.md" in said
    assert "1 cell differs: sft no-win: 2/3 (1 seed) here, 1/3 (1 seed) there" in said
    assert rd.main([str(tmp_path / "missing")]) == 1  # no demo there: an error, not a comparison
