"""The README's numbers are generated: its results block equals the generated file, and the generator works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]


def _generator():
    return load_script("experiments/readme_results.py")


NOWIN = REPO / "experiments" / "nowin"
DOCS = REPO / "docs"
BLOCKS = {  # test id: (the document, the generated file its block must equal, the block's marker)
    "README-avx512-third": (REPO / "README.md", REPO / "experiments" / "results_avx512_third.md", "avx512_third"),
    **{f"docs-results-{name}": (DOCS / "results.md", REPO / "experiments" / generated, marker)
       for name, generated, marker in (
        ("intel", "results.md", "results"),
        ("second-machine", "results_second_machine.md", "second_machine"),
        ("avx512-rerun", "results_avx512_rerun.md", "avx512_rerun"),
        ("third-machine", "results_third_machine.md", "third_machine"),
        ("third-machine-rerun", "results_third_machine_rerun.md", "third_machine_rerun"),
        ("avx2-fourth", "results_avx2_fourth.md", "avx2_fourth"),
        ("avx2-fourth-rerun", "results_avx2_fourth_rerun.md", "avx2_fourth_rerun"),
        ("intel-avx512", "results_intel_avx512.md", "intel_avx512"),
        ("intel-avx512-heldout", "results_intel_avx512_heldout.md", "intel_avx512_heldout"),
        ("intel-avx512-release", "results_intel_avx512_release.md", "intel_avx512_release"),
        ("intel-avx512-never-used", "results_intel_avx512_never_used.md", "intel_avx512_never_used"),
        ("intel-avx512-rerun", "results_intel_avx512_rerun.md", "intel_avx512_rerun"),
        ("search-current", "results_search_current.md", "search_current"),
    )},
    "README-lock-vs-newest": (REPO / "README.md", REPO / "experiments" / "lock_vs_newest.md", "lock_vs_newest"),
    **{f"nowin-README-{name}": (NOWIN / "README.md", NOWIN / generated, marker) for name, generated, marker in (
        ("selection", "selection.md", "results"),
        ("s13-checked", "s13_checked.md", "s13_checked"),
        ("s13-first", "s13_first.md", "s13_first"),
        ("checked-heldout", "checked_heldout.md", "checked_heldout"),
        ("checked-40-44", "checked_40_44.md", "checked_40_44"),
        ("checked-40-44-first", "checked_40_44_first.md", "checked_40_44_first"),
        ("checked-portable", "checked_portable.md", "checked_portable"),
        ("red-team-portable", "red_team_portable.md", "red_team_portable"),
        ("confirm-45-49-release", "confirm_45_49_release.md", "confirm_45_49_release"),
        ("confirm-45-49-candidate", "confirm_45_49_candidate.md", "confirm_45_49_candidate"),
        ("ctrap-recipe", "ctrap_recipe.md", "ctrap_recipe"),
        ("baselines", "baselines.md", "baselines"),
        ("second-machine", "selection_second_machine.md", "second_machine"),
        ("second-machine-heldout", "heldout_second_machine.md", "second_machine_heldout"),
        ("fresh-seeds", "fresh_seeds_second_machine.md", "fresh_seeds"),
        ("attack-orders", "attack_orders_second_machine.md", "attack_orders"),
        ("defense-orders", "defense_orders_second_machine.md", "defense_orders"),
        ("trap-probe", "trap_probe_second_machine.md", "trap_probe"),
        ("trap-check-design", "trap_check_design.md", "trap_check_design"),
        ("red-team", "red_team_second_machine.md", "red_team"),
        ("far-design", "far_design.md", "far_design"),
        ("far-selection", "far_selection.md", "far_selection"),
        ("cascade-fresh", "cascade_fresh.md", "cascade_fresh"),
        ("red-team-validation", "red_team_validation.md", "red_team_validation"),
        ("cascade-builtin", "cascade_builtin.md", "cascade_builtin"),
        ("cascade-heldout", "cascade_heldout.md", "cascade_heldout"),
        ("cascade-never-used", "cascade_never_used.md", "cascade_never_used"),
        ("seam-screen", "seam_screen.md", "seam_screen"),
        ("cascade-heldout-avx2", "cascade_heldout_avx2.md", "cascade_heldout_avx2"),
        ("avx2-seeds-20-22", "avx2_seeds_20_22.md", "avx2_seeds_20_22"),
        ("avx2-seeds-23-24", "avx2_seeds_23_24.md", "avx2_seeds_23_24"),
        ("kernel-paths-held-sft", "kernel_paths_held_sft.md", "kernel_paths_held_sft"),
        ("kernel-paths-sft-20-21", "kernel_paths_sft_20_21.md", "kernel_paths_sft_20_21"),
        ("attack-path-ctrap", "attack_path_ctrap.md", "attack_path_ctrap"),
        ("kernel-paths-held-tuned", "kernel_paths_held_tuned.md", "kernel_paths_held_tuned"),
        ("cascade-reseed-10-14", "cascade_reseed_10_14.md", "cascade_reseed_10_14"),
        ("cascade-reseed-25-29", "cascade_reseed_25_29.md", "cascade_reseed_25_29"),
        ("cascade-reseed-30-34", "cascade_reseed_30_34.md", "cascade_reseed_30_34"),
        ("kernel-paths-held-seam", "kernel_paths_held_seam.md", "kernel_paths_held_seam"),
        ("kernel-paths-held-ctrap", "kernel_paths_held_ctrap.md", "kernel_paths_held_ctrap"),
        ("release-utility", "release_utility.md", "release_utility"),
        ("cascade-utility-35-39", "cascade_utility_35_39.md", "cascade_utility_35_39"),
        ("realign-51-54", "realign_51_54.md", "realign_51_54"),
        ("bases-50-56", "bases_50_56.md", "bases_50_56"),
        ("realign-grids", "realign_grids.md", "realign_grids"),
        ("trajectories-51-56", "trajectories_51_56.md", "trajectories_51_56"),
    )},
}


@pytest.mark.parametrize(("readme", "generated", "marker"), list(BLOCKS.values()), ids=list(BLOCKS))
def test_readme_results_block_equals_the_generated_file(readme, generated, marker):
    gen = _generator()
    text = readme.read_text()
    begin, end = gen.markers(marker)
    assert begin in text and end in text, f"{readme} has a generated {marker} block"
    block = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert block == generated.read_text().strip(), (
        f"{readme}'s results differ from {generated}: regenerate both with experiments/readme_results.py")


def _write(path: Path, seed: int, pre: dict, post: dict | None = None) -> None:
    path.mkdir(parents=True)
    metrics = {"defense": "sft", "seed": seed, "pre": pre,
               "environment": {"cpu": "Test CPU", "cpu_capability": "AVX2", "torch_threads": 1, "python": "3.11.7",
                               "packages": {"torch": "2.13.0"}, "env": {}}}
    if post is not None:
        metrics.update(post=post, attack={"kind": "harmful", "lr": 1e-4, "num_samples": 10, "epochs": 1})
    (path / "metrics.json").write_text(json.dumps(metrics))


def test_generator_writes_medians_spreads_and_the_readme_block(tmp_path):
    gen = _generator()
    dirs = []
    for seed, (u, acc) in enumerate(((0.90, 1.0), (0.80, 0.95), (0.95, 0.90))):
        out = tmp_path / f"s{seed}"
        pre = {"utility": u, "harmful_score": 0.0, "utility_se": 0.02, "utility_n": 258, "harmful_score_n": 300}
        _write(out / "defend", seed, pre)
        for i, hs in enumerate((0.0, 0.5, 1.0)):
            _write(out / "attack" / str(i), seed, pre, {"harmful_score": hs, "utility": u / 2})
        _write(out / "benign", seed, pre, {"task_accuracy": acc, "utility": u, "harmful_score": 0.0})
        dirs.append(out)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gen.BEGIN}\nold\n{gen.END}\noutro\n")
    out_md = tmp_path / "results.md"
    assert gen.main(["--basic", *map(str, dirs), "--out", str(out_md), "--readme", str(readme)]) == 0
    text = out_md.read_text()
    assert "| aligned (SFT): utility | 0.900 [0.800–0.950] | 0.900 | 0.800 | 0.950 |" in text
    assert "| benign fine-tune: task accuracy | 0.950 [0.900–1.000] |" in text
    assert "| strong attack: utility / pre-attack | 0.500 [0.500–0.500] |" in text
    assert "Test CPU" in text and "torch 2.13.0" in text and "seed 2, AVX2" in text
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith("outro\n") and "old" not in new and text.strip() in new
    # the held-out table: one row per seed and defense, with its no-win count over the attack cells
    assert gen.main(["--acceptance", *map(str, dirs), "--out", str(out_md)]) == 0
    held_out = out_md.read_text()
    assert "Held-out confirmation, seeds 0, 1, 2" in held_out
    assert all(f"| {seed} | sft | " in held_out for seed in range(3))
    # a named block: only its markers' content is replaced, the results block beside it stays
    begin, end = gen.markers("other")
    readme.write_text(f"{gen.BEGIN}\nkept\n{gen.END}\n{begin}\nold\n{end}\n")
    assert gen.main(["--basic", *map(str, dirs), "--out", str(out_md), "--readme", str(readme),
                     "--marker", "other"]) == 0
    new = readme.read_text()
    assert "kept" in new and "old" not in new and new.split(begin)[1].split(end)[0].strip() == out_md.read_text().strip()


def test_kernel_path_table_puts_each_path_in_its_own_column(tmp_path):
    gen = _generator()
    dirs = []
    for path, (capability, mkl, broken) in {"native": ("AVX512", None, 2), "portable": ("DEFAULT", "COMPATIBLE", 1)}.items():
        out = tmp_path / path
        pre = {"utility": 0.9, "harmful_score": 0.0}
        for i in range(3):  # `broken` of the three cells keep utility and comply; the others stay safe
            post = {"harmful_score": 1.0 if i < broken else 0.0, "utility": 0.85}
            _write(out / "attack" / str(i), 0, pre, post)
        _write(out / "benign", 0, pre, {"task_accuracy": 1.0, "utility": 0.9, "harmful_score": 0.0})
        for metrics_file in out.rglob("metrics.json"):
            data = json.loads(metrics_file.read_text())
            data["environment"].update(cpu_capability=capability, env={"MKL_CBWR": mkl} if mkl else {})
            if "benign" in metrics_file.parts:
                data["attack"]["kind"] = "benign"
            else:  # three cells of one grid: three learning rates
                data["attack"]["lr"] = (1e-4, 2e-4, 3e-4)[int(metrics_file.parent.name)]
            metrics_file.write_text(json.dumps(data))
        dirs.append(out)
    lines, _ = gen.kernel_table(dirs)
    assert ("| seed | defense | AVX512 | DEFAULT (MKL_CBWR=COMPATIBLE) | no-win difference | cells won on one path "
            "only |") in lines
    # native: cells 0, 1 broken, 2 won; portable: cell 0 broken, 1 and 2 won -> cell 1 is won on one path only
    assert "| 0 | sft | 1/3 · 0.900 · 1.000 | 2/3 · 0.900 · 1.000 | 1 | 1 |" in lines
    # a path whose runs are the grid only (no benign fine-tune): its accuracy reads "—", its counts stay compared
    for metrics_file in (tmp_path / "portable" / "benign").rglob("metrics.json"):
        metrics_file.unlink()
    lines, _ = gen.kernel_table(dirs)
    assert "| 0 | sft | 1/3 · 0.900 · 1.000 | 2/3 · 0.900 · — | 1 | 1 |" in lines


def test_search_table_names_each_defenses_worst_attack_and_its_break_budget(tmp_path):
    gen = _generator()
    sweep = tmp_path / "search" / "sft"
    sweep.mkdir(parents=True)
    listed = [{"number": 0, "warm_start": True}] + [{"number": n, "warm_start": False} for n in range(1, 12)]
    (sweep / "search.json").write_text(json.dumps({"budget": 12, "trials": listed}))
    successes = [0.25] + [0.0] * 9 + [0.85, 1.0]  # trial 0 the warm start; the break comes with trial 10, the 11th
    for number, success in enumerate(successes):
        config = {"name": "harmful", "optimizer": "adamw", "lr": 1e-4 * (number + 1), "num_samples": 500,
                  "epochs": 1, "batch_size": 4}
        _write(sweep / str(number), 0, {"utility": 0.9, "harmful_score": 0.0},
               {"harmful_score": success, "utility": 0.81})
        data = json.loads((sweep / str(number) / "metrics.json").read_text())
        data["attack"]["config"] = config
        data["search"] = {"attack_success": success}
        (sweep / str(number) / "metrics.json").write_text(json.dumps(data))
    lines, _ = gen.search_table([tmp_path / "search"])
    row = next(line for line in lines if line.startswith("| sft |"))
    assert row == ("| sft | 12 (0) | 1.000 | trial 11: harmful, adamw lr 0.0012, 500 samples x 1 ep, batch 4 | "
                   "1.000 / 0.90 | 0.250 | 0.250 | broken after 11 of 12 trials | not run |")
    # the best attack re-run on three defense seeds, beside the study (sft_best, as rerun_command names it)
    for seed, success in ((0, 1.0), (1, 0.25), (2, 0.0)):
        _write(tmp_path / "search" / "sft_best" / str(seed), seed, {"utility": 0.9},
               {"harmful_score": success, "utility": 0.81})
        data = json.loads((tmp_path / "search" / "sft_best" / str(seed) / "metrics.json").read_text())
        data["search"] = {"attack_success": success}
        (tmp_path / "search" / "sft_best" / str(seed) / "metrics.json").write_text(json.dumps(data))
    lines, metrics = gen.search_table([tmp_path / "search"])
    row = next(line for line in lines if line.startswith("| sft |"))
    assert row.endswith("| broken after 11 of 12 trials | 1.000, 0.250, 0.000 (seeds 0, 1, 2) |")
    assert len(metrics) == 12 + 3  # the re-runs' environments are stamped too


def _setting_runs(root: Path, defense: str, seed: int, utility: float, safe_cells: int, overrides: list[str],
                  safe_hs: float = 0.0) -> None:
    """One setting's runs of one seed as candidate.sh lays them out: a 3 x 3 grid whose first ``safe_cells`` cells
    stay safe (the others comply and keep utility) and a benign fine-tune."""
    pre = {"utility": utility, "harmful_score": 0.0}
    for i in range(9):
        post = {"harmful_score": safe_hs if i < safe_cells else 1.0, "utility": utility}
        _write(root / "grid" / str(i), seed, pre, post)
    _write(root / "benign", seed, pre, {"task_accuracy": 1.0, "utility": utility, "harmful_score": 0.0})
    for metrics_file in root.rglob("metrics.json"):
        data = json.loads(metrics_file.read_text())
        data.update(defense=defense, overrides=[f"defense={defense}", *overrides, f"seed={seed}"])
        if "benign" in metrics_file.parts:
            data["attack"]["kind"] = "benign"
        metrics_file.write_text(json.dumps(data))


def test_selection_table_gives_every_seed_of_each_setting_and_on_how_many_it_meets_the_bars(tmp_path):
    gen = _generator()
    runs = _setting_runs

    for seed in (0, 1, 2, 10):
        runs(tmp_path / "sft" / f"s{seed}", "sft", seed, 0.9, 2, [])
        # "steady" wins 9 cells on every seed; "edge" loses on seed 1 and costs utility on seed 2
        runs(tmp_path / "steady" / f"s{seed}", "trap", seed, 0.88, 9, ["defense.params.lam=0.5"])
        edge = {0: (0.9, 9), 1: (0.9, 4), 2: (0.5, 9), 10: (0.9, 9)}[seed]  # on seed 0 barely safe (HS 0.08)
        runs(tmp_path / "edge" / f"s{seed}", "trap", seed, *edge, ["defense.params.lam=1.0"], 0.08 if seed == 0 else 0.0)
    lines, metrics = gen.selection_table([tmp_path / "steady", tmp_path / "edge"], [tmp_path / "sft"], [0, 1, 2])
    text = "\n".join(lines)
    assert "Selection on seeds 0, 1, 2 only" in text  # seed 10 is held out: not shown, not counted
    assert ("| steady | `defense=trap` `defense.params.lam=0.5` | 0, 1, 2 | 9/9, 9/9, 9/9 | 0.10, 0.10, 0.10 | 0.98, 0.98, 0.98 | "
            "1.00, 1.00, 1.00 | 0.98, 0.98, 0.98 | 3/3 |") in text
    assert "| edge | `defense=trap` `defense.params.lam=1.0` | 0, 1, 2 | 9/9, 4/9, 9/9 | 0.02, 0.10, 0.10 | 1.00, 1.00, 0.56 |" in text
    assert text.rstrip().splitlines()[-3].endswith("| 1/3 |")
    assert len(metrics) == 3 * 3 * 10  # three directories x three seeds x (9 cells + benign)
    # the same table over the held-out seed, with its own words
    lines, metrics = gen.selection_table([tmp_path / "steady", tmp_path / "edge"], [tmp_path / "sft"], [10],
                                         "Both settings on held-out seed {seeds}")
    assert lines[0].startswith("Both settings on held-out seed 10 (ratios")
    assert "| edge | `defense=trap` `defense.params.lam=1.0` | 10 | 9/9 |" in "\n".join(lines)
    assert len(metrics) == 3 * 10


def test_wall_time_line_quotes_the_machines_load_during_the_demo(tmp_path):
    gen = _generator()
    (tmp_path / "quickstart.json").write_text(json.dumps({
        "command": "python experiments/quickstart.py", "wall_time_s": 812.4, "seed": 0, "jobs": 2, "status": 0,
        "cpus": 2, "load_average_start": 0.12, "load_average_end": 2.3}))
    assert gen.wall_time_text(tmp_path) == (
        "Wall time of `python experiments/quickstart.py` from a fresh cache: 812 s (1-minute load average 0.12 at its "
        "start and 2.3 at its end, on 2 cores).")


def test_wall_time_line_names_the_commands_cpu_time_and_the_longest_one(tmp_path):
    gen = _generator()
    commands = [{"command": "python -m selfdestruct.defend defense=ctrap_tuned hydra.run.dir=/home/me/qs/defend",
                 "start": 0.0, "seconds": 650.2, "cpu_s": 600.2, "status": 0},
                {"command": "python -m selfdestruct.defend defense=sft", "start": 1.0, "seconds": 420.4,
                 "cpu_s": 120.4, "status": 0}]
    (tmp_path / "quickstart.json").write_text(json.dumps({
        "command": "python experiments/quickstart.py", "wall_time_s": 650.0, "seed": 0, "jobs": 2, "status": 0,
        "cpus": 2, "load_average_start": 0.1, "load_average_end": 1.9, "command_cpu_s_total": 720.6,
        "commands": commands}))
    assert gen.wall_time_text(tmp_path).endswith(
        "on 2 cores); its 2 commands used 721 CPU-seconds, 2 at once, the longest, "
        "`python -m selfdestruct.defend defense=ctrap_tuned`, 600 of them.")


def test_wall_time_line_quotes_the_hosts_matrix_product_rate_when_recorded(tmp_path):
    gen = _generator()
    (tmp_path / "quickstart.json").write_text(json.dumps({
        "command": "python experiments/quickstart.py", "wall_time_s": 1725.4, "seed": 0, "jobs": 2, "status": 0,
        "cpus": 2, "host": {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD cpu family 23 model 1", "gemm_gflops": 33.1},
        "load_average_start": 0.05, "load_average_end": 1.26}))
    assert gen.wall_time_text(tmp_path) == (
        "Wall time of `python experiments/quickstart.py` from a fresh cache: 1725 s (1-minute load average 0.05 at "
        "its start and 1.26 at its end, on 2 cores; 33.1 GFLOP/s float32 matrix products on one thread).")


def test_nowin_table_shows_every_defense_and_seed_of_a_run_py_tree(tmp_path):
    gen = _generator()
    cells = [(2e-4, 100), (3e-4, 500), (5e-4, 1000)]
    for defense, safe_cells in (("sft", 1), ("npo", 2)):
        for seed in (0, 1):
            pre = {"utility": 0.9, "harmful_score": 0.0}
            for i, (lr, n) in enumerate(cells):  # the first `safe_cells` cells stay safe, the others comply
                root = tmp_path / "grid" / f"{defense}_{seed}_{i}"
                _write(root, seed, pre, {"harmful_score": 0.0 if i < safe_cells else 1.0, "utility": 0.88})
                data = json.loads((root / "metrics.json").read_text())
                data.update(defense=defense)
                data["attack"].update(lr=lr, num_samples=n)
                (root / "metrics.json").write_text(json.dumps(data))
            benign = tmp_path / "benign" / f"{defense}_{seed}"
            _write(benign, seed, pre, {"task_accuracy": 1.0, "utility": 0.9, "harmful_score": 0.0})
            data = json.loads((benign / "metrics.json").read_text())
            data.update(defense=defense)
            data["attack"]["kind"] = "benign"
            (benign / "metrics.json").write_text(json.dumps(data))
    lines, metrics = gen.nowin_table([tmp_path])
    text = "\n".join(lines)
    assert text.startswith("`python experiments/nowin/run.py` (sft npo), seeds 0, 1:")
    assert "| **no-win** (k/9 of the medians) | **1/3** | **2/3** |" in text
    assert "| no-win per seed | 1, 1 | 2, 2 |" in text
    assert "| 0.0002 × 100 | 0.00 / " in text and len(metrics) == 2 * 2 * 4
    with pytest.raises(SystemExit, match="no defend/, grid/ or benign/ runs"):
        gen.nowin_table([tmp_path / "empty"])


def test_attack_order_table_counts_each_order_of_one_model_separately(tmp_path):
    """--attack-orders: one row per defended model, one column per attack order (its own first), the range."""
    gen = _generator()
    env = {"cpu": "Test CPU", "cpu_capability": "AVX2", "torch_threads": 1, "python": "3.11.7",
           "packages": {"torch": "2.13.0"}, "env": {}}
    for order, broken in ((None, 1), (101, 3)):  # its own order breaks 1 of 9 cells, attack.seed 101 breaks 3
        for i, (lr, n) in enumerate((lr, n) for lr in (2e-4, 3e-4, 5e-4) for n in (100, 500, 1000)):
            for defense, hs in (("trap", 0.9 if i < broken else 0.0), ("sft", 0.0 if i < 2 else 0.9)):
                cell = tmp_path / f"a{order}" / f"{defense}{i}"
                cell.mkdir(parents=True)
                (cell / "metrics.json").write_text(json.dumps({
                    "defense": defense, "seed": 13, "pre": {"harmful_score": 0.0, "utility": 0.9},
                    "post": {"harmful_score": hs, "utility": 0.85}, "environment": env,
                    "attack": {"kind": "harmful", "lr": lr, "num_samples": n, "epochs": 2,
                               "config": {"seed": order}}}))
    out = tmp_path / "orders.md"
    assert gen.main(["--attack-orders", str(tmp_path / "aNone"), str(tmp_path / "a101"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| defense | seed | its own order | attack.seed 101 | range |" in text
    assert "| sft | 13 | 2/9 | 2/9 | 2–2 |" in text
    assert "| trap | 13 | 8/9 | 6/9 | 6–8 |" in text


def test_probe_table_lists_each_probed_model_with_the_no_win_of_its_grid(tmp_path):
    gen = _generator()
    run = tmp_path / "ctrap" / "s4"
    for i, hs in enumerate((0.0, 0.0, 0.9)):  # its grid: 2 of 3 cells won
        _write(run / "grid" / str(i), 4, {"harmful_score": 0.0, "utility": 0.9}, {"harmful_score": hs, "utility": 0.8})
    record = {"path": str(run / "defend"), "model": "m", "defense": "sft", "seed": 4, "probe_order": 4,
              "before": 0.0123, "after": {"0.0002": 0.5, "0.0005": 2.25}, "score": 1.375}
    probes = tmp_path / "probe.jsonl"
    probes.write_text(json.dumps(record) + "\n")
    out = tmp_path / "probe.md"
    assert gen.main(["--probe", str(probes), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| seed | defense | data order | before | after, lr 0.0002 | after, lr 0.0005 | score | no-win of its grid |" in text
    assert "| 4 | sft | 4 | 0.012 | 0.50 | 2.25 | 1.38 | 2/3 |" in text


def test_red_team_table_puts_each_model_beside_its_grid_and_counts_agreement(tmp_path):
    gen = _generator()
    records = []
    for seed, grid_hs, red_won in ((4, (0.0, 0.0, 0.9), 2), (5, (0.9, 0.9, 0.9), 2)):  # grids won 2/3 and 0/3
        run = tmp_path / "ctrap" / f"s{seed}"
        for i, hs in enumerate(grid_hs):
            _write(run / "grid" / str(i), seed, {"harmful_score": 0.0, "utility": 0.9},
                   {"harmful_score": hs, "utility": 0.8})
        records.append({"path": str(run / "defend"), "defense": "trap", "seed": seed, "defense_seed": seed,
                        "no_win": red_won, "cells": 3, "pre": {"harmful_score": 0.0, "utility": 0.875}, "grid": []})
    # the same model of seed 5 judged on the validation tasks (lines without utility_tasks are the alignment's)
    records.append({**records[-1], "utility_tasks": "validation", "no_win": 1})
    lines = tmp_path / "red.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    text, _ = gen.red_team_table([lines], threshold=2)
    assert "| 4 | trap | 4 | align | 0.875 | 2/3 | 2/3 |" in text and "| 5 | trap | 5 | align | 0.875 | 2/3 | 0/3 |" in text
    assert "| 5 | trap | 5 | validation | 0.875 | 1/3 | 0/3 |" in text
    assert text[-2:] == [
        "`red.jsonl`, utility on align tasks: defended models (not sft) on the same side of 2 wins in both 1 of 2; of "
        "the 1 the grid beat, the red team beat 0.",
        "`red.jsonl`, utility on validation tasks: defended models (not sft) on the same side of 2 wins in both 1 of "
        "1; of the 1 the grid beat, the red team beat 1."]


def test_trap_check_table_lists_the_checks_per_epoch_and_the_released_models_grid(tmp_path):
    gen = _generator()
    run = tmp_path / "check" / "s7"
    for i, hs in enumerate((0.0, 0.9)):  # its grid: 1 of 2 cells won
        _write(run / "grid" / str(i), 7, {"harmful_score": 0.0, "utility": 0.9}, {"harmful_score": hs, "utility": 0.8})
    (run / "defend" / "model").mkdir(parents=True)
    checks = [{"epoch": e, "no_win": won, "cells": 9} for e, won in ((3, 4), (4, 8))]
    (run / "defend" / "model" / "selfdestruct.json").write_text(json.dumps(
        {"seed": 7, "defense": "trap", "trap_check": checks}))
    text, _ = gen.trap_check_table([run / "defend"])
    assert "| setting | seed | red team after epoch 3 | red team after epoch 4 | released after epoch | no-win of its grid |" in text
    assert "| check | 7 | 4/9 | 8/9 | 4 | 1/2 |" in text
    # a stage that released other weights than the last iterate checked (a rollback): their red team, beside it
    checks.append({"epoch": 4, "no_win": 6, "cells": 9, "released": True})
    (run / "defend" / "model" / "selfdestruct.json").write_text(json.dumps(
        {"seed": 7, "defense": "trap", "trap_check": checks}))
    text, _ = gen.trap_check_table([run / "defend"])
    assert "| check | 7 | 4/9 | 8/9 | 4 (other weights, red team 6/9) | 1/2 |" in text


def test_trainings_table_names_each_models_alignment_and_defense_order_and_sorts_them(tmp_path):
    gen = _generator()

    def model(name, seed, align_key, defense_seed, won, utility):
        aligned = tmp_path / f"align_{name}" / "model"
        aligned.mkdir(parents=True)
        (aligned / "selfdestruct.json").write_text(json.dumps({"key": {"stage": "align", "seed": seed, **align_key}}))
        (tmp_path / name / "model").mkdir(parents=True)
        check = {"epoch": 3, "no_win": won, "cells": 9, "pre": {"utility": utility}}
        (tmp_path / name / "model" / "selfdestruct.json").write_text(json.dumps(
            {"seed": seed, "defense_seed": defense_seed, "aligned_model": str(aligned),
             "aligned_metrics": {"utility": 0.93}, "trap_check": [check]}))
        return tmp_path / name

    runs = [model("realigned", 5, {"align_seed": 1005}, 5, 8, 0.977), model("reseeded", 5, {}, 1005, 3, 1.0),
            model("first", 5, {}, 5, 6, 0.9961), model("other", 4, {}, 4, 9, 1.0)]
    text, metrics = gen.trainings_table(runs)
    rows = [line for line in text if line.startswith("| ") and line[2].isdigit()]
    # by seed, then the run's own alignment before a re-drawn one, then the defense order
    assert rows == ["| 4 | 4 | 4 | 9/9 | 1.000 | 0.930 |", "| 5 | 5 | 5 | 6/9 | 0.996 | 0.930 |",
                    "| 5 | 5 | 1005 | 3/9 | 1.000 | 0.930 |", "| 5 | 1005 | 5 | 8/9 | 0.977 | 0.930 |"]
    assert metrics == []  # stage-cache entries carry no metrics.json
    (tmp_path / "bare" / "model").mkdir(parents=True)
    (tmp_path / "bare" / "model" / "selfdestruct.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(SystemExit, match="bare: its model has no defense.trap_check results"):
        gen.trainings_table([tmp_path / "bare"])


def test_geometry_table_puts_each_models_held_out_cosine_beside_what_its_grid_did_to_its_utility(tmp_path):
    gen = _generator()
    run = tmp_path / "strong" / "s3"
    _write(run / "defend", 3, {"harmful_score": 0.0, "utility": 0.8})
    # two cells: utility kept at 0.6/0.8 = 0.75 (broken: harmful) and 0.28/0.8 = 0.35 (collapsed): 1 of 2 won
    for i, (hs, u) in enumerate(((0.9, 0.6), (0.9, 0.28))):
        _write(run / "grid" / str(i), 3, {"harmful_score": 0.0, "utility": 0.8}, {"harmful_score": hs, "utility": u})
    record = {"model": str(run / "defend" / "model"), "cos": -0.5491, "cos_std": 0.0887, "cos_full": -0.643,
              "norm_a_full": 20.35, "norm_b_full": 5.558}
    geometry = tmp_path / "geometry.json"
    geometry.write_text(json.dumps([record]))
    text, metrics = gen.geometry_table([geometry])
    assert "| strong | 3 | 0.800 | -0.549 (0.089) | -0.643 | 20.4 / 5.56 | 0.35–0.75 | 1/2 |" in text
    assert len(metrics) == 3  # the defend run and both cells stamp the block


def test_trajectory_table_classes_each_long_attack_by_what_the_trap_did_and_counts_them_per_group(tmp_path):
    gen = _generator()

    def model(name, seed, align_seed, won):
        aligned = tmp_path / f"align_{name}" / "model"
        aligned.mkdir(parents=True)
        (aligned / "selfdestruct.json").write_text(json.dumps({"key": {"stage": "align", "seed": seed,
                                                                       **({"align_seed": align_seed}
                                                                          if align_seed != seed else {})}}))
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "selfdestruct.json").write_text(json.dumps({"aligned_model": str(aligned)}))
        return str(tmp_path / name / "model"), won

    def points(ratios, end):
        return [{"step": s, "ratio": r, "harmful_score": 1.0 if end == "broken" else 0.0,
                 "verdict": end if s == 128 else "safe"} for s, r in zip((0, 64, 128), ratios)]

    shallow, deep = model("shallow", 5, 1005, 3), model("deep", 4, 4, 9)
    lines = [{"path": "p", "model": m, "seed": seed, "defense_seed": seed, "red_team_no_win": won,
              "matches_red_team": True, "lrs": lrs}
             for (m, won), seed, lrs in (
                 (shallow, 5, {"0.0002": points((1.0, 0.99, 0.98), "broken"),     # stayed above 0.8
                               "0.0003": points((1.0, 0.8, 0.95), "broken"),      # 0.8: dipped, not "never fired"
                               "0.0005": points((1.0, 0.5, 0.9), "broken")}),     # 0.5 is collapsed: let go
                 (deep, 4, {"0.0002": points((1.0, 0.3, 0.2), "collapsed"),
                            "0.0005": points((1.0, 0.45, 0.81), "broken")}))]
    out = tmp_path / "traj.jsonl"
    out.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    text, metrics = gen.trajectory_table([out])
    rows = [line for line in text if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 5 | 1005 | 5 | 3/9 | 0.0002 | 1.00 0.99 0.98 | 1.00 | broken | never fired |",
                    "| 5 | 1005 | 5 | 3/9 | 0.0003 | 1.00 0.80 0.95 | 1.00 | broken | dipped |",
                    "| 5 | 1005 | 5 | 3/9 | 0.0005 | 1.00 0.50 0.90 | 1.00 | broken | let go |",
                    "| 4 | 4 | 4 | 9/9 | 0.0002 | 1.00 0.30 0.20 | 0.00 | collapsed | won |",
                    "| 4 | 4 | 4 | 9/9 | 0.0005 | 1.00 0.45 0.81 | 1.00 | broken | let go |"]
    assert "- Models with their red team under 8: 3 long cells, 0 won; of the broken, 1 let go, 1 dipped, " \
           "1 never fired." in text
    assert "- Models with their red team 8 or more: 2 long cells, 1 won; of the broken, 1 let go, 0 dipped, " \
           "0 never fired." in text
    assert metrics == []
    lines[0]["matches_red_team"] = False
    out.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(SystemExit, match="do not reproduce its red team's recorded cells"):
        gen.trajectory_table([out])


def test_cascade_releases_the_first_setting_whose_red_team_wins_else_the_best_and_counts_both_ways(tmp_path):
    gen = _generator()

    def setting(name: str, seed: int, red_team: int, safe_cells: int, utility: float = 0.9, done: bool = True):
        root = tmp_path / name / f"s{seed}"
        _setting_runs(root, "trap", seed, utility, safe_cells, [])
        (root / "defend" / "model").mkdir(parents=True)
        (root / "defend" / "model" / "selfdestruct.json").write_text(json.dumps(
            {"seed": seed, "defense": "trap", "trap_check": [{"epoch": 3, "no_win": red_team, "cells": 9}]}))
        if done:  # candidate.sh's mark that the benign fine-tune, its last run, finished
            (root / "DONE").write_text(f"{name} seed {seed}: 1 s\n")

    for seed in (1, 2, 3, 5):
        _setting_runs(tmp_path / "sft" / f"s{seed}", "sft", seed, 0.9, 2, [])
        (tmp_path / "sft" / f"s{seed}" / "DONE").write_text("")
    setting("first", 1, 9, 9)  # its red team wins: released, the second setting is not tried
    setting("second", 1, 9, 0)  # (had it been, it would be worse: never read)
    setting("first", 2, 5, 4)
    setting("second", 2, 7, 8)  # more red-team wins than the first: released
    setting("first", 3, 6, 5)
    setting("second", 3, 6, 9, utility=0.5)  # a tie goes to the earlier setting
    setting("first", 4, 9, 9)  # its cascade ends at step 1, but no SFT run for this seed yet: no verdict
    setting("first", 5, 5, 4)
    setting("second", 5, 9, 9, done=False)  # the second step still running: no verdict
    lines, metrics = gen.cascade_table([tmp_path / "first", tmp_path / "second"], [tmp_path / "sft"])
    text = "\n".join(lines)
    assert "| 4 | — | 9/9 | not run | not finished | 9/9 |" + " — |" * 6 in text
    assert "| 5 | 2/9 | 5/9 | not finished | not finished | 4/9 |" + " — |" * 6 in text
    assert "| 1 | 2/9 | 9/9 | not run | first | 9/9 | 9/9 | 0.900 (1.00) | 1.000 (1.00) | 0.900 (1.00) | yes | yes |" in text
    assert "| 2 | 2/9 | 5/9 | 7/9 | second | 4/9 | 8/9 | 0.900 (1.00) | 1.000 (1.00) | 0.900 (1.00) | yes | **no** |" in text
    assert "| 3 | 2/9 | 6/9 | 6/9 | first | 5/9 | 5/9 |" in text
    assert lines[-1] == ("Released models meet every bar on 2 of 3 seeds (`first` alone: 1); no-win cells in total: "
                         "released 22, `first` alone 18, of 27. Not finished (no verdict): seeds 4, 5.")
    assert len(metrics) == 13 * 10  # every run read stamps the block: 9 complete settings, 4 on seeds 4-5


def test_cascade_with_the_utility_check_releases_only_a_setting_that_passed_it(tmp_path):
    gen = _generator()

    def setting(name: str, seed: int, red_team: int, safe_cells: int, check: float):
        root = tmp_path / name / f"s{seed}"
        _setting_runs(root, "trap", seed, 0.9, safe_cells, [])
        (root / "defend" / "model").mkdir(parents=True)
        (root / "defend" / "model" / "selfdestruct.json").write_text(json.dumps(
            {"seed": seed, "defense": "trap", "trap_check": [{"epoch": 3, "no_win": red_team, "cells": 9}]}))
        (root / "DONE").write_text("")
        (root / "check.jsonl").write_text(json.dumps({"pre": {"utility": check}}) + "\n")

    for seed in (1, 2):
        _setting_runs(tmp_path / "sft" / f"s{seed}", "sft", seed, 0.9, 2, [])
        (tmp_path / "sft" / f"s{seed}" / "DONE").write_text("")
        (tmp_path / "sft" / f"s{seed}" / "check.jsonl").write_text(json.dumps({"pre": {"utility": 0.8}}) + "\n")
    setting("first", 1, 9, 9, 0.75)  # 0.9375 x the aligned model's: held back although its red team won
    setting("second", 1, 8, 8, 0.78)  # 0.975: released
    setting("first", 2, 9, 9, 0.76)  # exactly 0.95: released, the second step never tried
    setting("second", 2, 9, 0, 0.8)
    steps, sft = [tmp_path / "first", tmp_path / "second"], [tmp_path / "sft"]
    text = "\n".join(gen.cascade_table(steps, sft, utility_check=True)[0])
    assert "| 1 | 2/9 | 9/9, check 0.938 | 8/9, check 0.975 | second | 9/9 | 8/9 |" in text
    assert "| 2 | 2/9 | 9/9, check 0.950 | not run | first | 9/9 | 9/9 |" in text
    assert "wins 8 cells and whose utility on the red team's validation tasks is >= 0.95 x the aligned" in text
    assert "| 1 | 2/9 | 9/9 | not run | first |" in "\n".join(gen.cascade_table(steps, sft)[0])  # without the check
    (tmp_path / "first" / "s1" / "check.jsonl").unlink()
    with pytest.raises(SystemExit, match="first/s1/check.jsonl: no utility check"):
        gen.cascade_table(steps, sft, utility_check=True)


def test_release_utility_table_puts_each_models_check_beside_its_red_team_grid_and_bars(tmp_path):
    """Two seeds: on seed 1 a model that keeps its utility and one that lost it (held-out 0.8 / 0.9, check 0.75 /
    0.8 < 0.95); on seed 2 one whose check passes at exactly the bar's ratio."""
    gen = _generator()
    lines = []

    def model(name: str, seed: int, utility: float, check: float, red_team: int | None = 9):
        root = tmp_path / name / f"s{seed}"
        _setting_runs(root, "sft" if name == "sft" else "trap", seed, utility, 2 if name == "sft" else 9, [])
        (root / "defend" / "model").mkdir(parents=True)
        provenance = {"trap_check": [{"no_win": red_team, "cells": 9}]} if red_team is not None else {}
        (root / "defend" / "model" / "selfdestruct.json").write_text(json.dumps(provenance))
        lines.append(json.dumps({"path": str(root / "defend"), "model": str(root / "defend" / "model"),
                                 "defense": "sft" if name == "sft" else "trap", "seed": seed,
                                 "utility_tasks": "validation", "pre": {"harmful_score": 0.0, "utility": check}}))

    for seed in (1, 2):
        model("sft", seed, 0.9, 0.8, red_team=None)
    model("kept", 1, 0.9, 0.8)
    model("lost", 1, 0.8, 0.6)
    model("edge", 2, 0.9, 0.76, red_team=7)
    model("below", 2, 0.9, 0.7598)  # 0.94975: shown with the fourth decimal that puts it below 0.95
    checks = tmp_path / "checks.jsonl"
    checks.write_text("\n".join(lines) + "\n")
    text, metrics = gen.release_utility_table([checks])
    text = "\n".join(text)
    assert "| 1 | kept | 1.000 | 9/9 | 9/9 | 1.000 | yes |" in text
    assert "| 1 | lost | 0.750 (held back) | 9/9 | 9/9 | 0.889 | **no** |" in text
    assert "| 2 | edge | 0.950 | 7/9 | 9/9 | 1.000 | yes |" in text
    assert "| 2 | below | 0.9497 (held back) | 9/9 | 9/9 | 1.000 | yes |" in text
    assert text.endswith("the check holds back 1 of the 1 models whose held-out utility misses the bar, and 1 of "
                         "the 3 that meet every bar (their lowest check ratio: 0.9497).")
    assert len(metrics) == 4 * 2 * 10  # each model's and its SFT's 9 cells and benign fine-tune


def _run_release_script(tmp_path, script, wins, utilities=None):
    """Run experiments/nowin/SCRIPT on seed 7 with candidate.sh replaced by a stub that records its arguments and
    writes each step's trap check (``wins``: step name -> its red team's no-win). With ``utilities`` (step name ->
    its utility on the red team's validation tasks; the aligned model's is 1) SCRIPT runs with --utility-check and
    red_team.py is a stub writing them. Returns the stub's calls, each a list of its arguments, and release.log."""
    import os
    import shutil
    import subprocess
    import sys

    scripts = tmp_path / "experiments" / "nowin"  # the repository's layout: release.sh uses ../readme_results.py
    scripts.mkdir(parents=True)
    for name in (script, "release.sh"):
        shutil.copy(NOWIN / name, scripts)
    shutil.copy(REPO / "experiments" / "readme_results.py", scripts.parent)
    (scripts / "candidate.sh").write_text(
        'out=$1; name=$2; seed=$3; mkdir -p "$out/$name/s$seed/defend/model"\n'
        'echo "$*" >> "$out/calls"\n'
        'case $name in ' + " ".join(f'{n}) won={w};;' for n, w in wins.items()) + ' esac\n'
        'echo "{\\"trap_check\\": [{\\"epoch\\": 3, \\"no_win\\": $won, \\"cells\\": 9}]}" '
        '> "$out/$name/s$seed/defend/model/selfdestruct.json"\n')
    if utilities is not None:
        (scripts / "red_team.py").write_text(
            "import json, sys\n"
            "path, out = sys.argv[sys.argv.index('--utility-tasks') + 2], sys.argv[sys.argv.index('--out') + 1]\n"
            f"utility = {{**{utilities!r}, 'sft': 1.0}}[path.split('/')[-3]]\n"
            "open(out, 'a').write(json.dumps({'pre': {'utility': utility}}) + '\\n')\n")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    flags = ["--utility-check"] if utilities is not None else []
    subprocess.run(["bash", str(scripts / script), *flags, str(out), "7"], check=True, capture_output=True, env=env)
    return [c.split() for c in (out / "calls").read_text().splitlines()], (out / "release.log").read_text()


@pytest.mark.parametrize(("first", "second", "released"), [(9, None, "ctrap_tuned_tc"), (5, 7, "ctrap_tuned_r6"),
                                                           (5, 5, "ctrap_tuned_tc"), (6, 3, "ctrap_tuned_tc")])
def test_cascade_script_runs_the_second_setting_only_below_8_and_releases_the_better(tmp_path, first, second,
                                                                                      released):
    """experiments/nowin/cascade.sh with candidate.sh replaced by a stub that writes each setting's trap check."""
    wins = {"ctrap_tuned_tc": first, **({"ctrap_tuned_r6": second} if second is not None else {})}
    calls, log = _run_release_script(tmp_path, "cascade.sh", wins)
    assert [c[1] for c in calls] == ["ctrap_tuned_tc"] + (["ctrap_tuned_r6"] if second is not None else [])
    assert "defense.trap_check={from_epoch:3}" in calls[0]
    if second is not None:
        assert calls[1][-1] == "defense.params.radii=[0.002,0.006]"
    ran = "ctrap_tuned_tc" + (", ctrap_tuned_r6" if second is not None else "")
    won = f"{first}" + (f", {second}" if second is not None else "")
    assert log == f"seed 7: red team {won} of 9 ({ran}); released {released}\n"


@pytest.mark.parametrize(("wins", "released"), [((9,), 0), ((7, 8), 1), ((5, 3, 6), 2), ((3, 9), 1), ((5, 5, 5), 0),
                                              ((6, 7, 7), 1)])
def test_reseed_script_retrains_with_other_defense_seeds_only_while_no_red_team_won_8(tmp_path, wins, released):
    """experiments/nowin/reseed.sh with candidate.sh replaced by a stub that writes each step's trap check."""
    from selfdestruct.eval.red_team import released_setting

    names = ["ctrap_tuned_tc", "ctrap_tuned_reseed1", "ctrap_tuned_reseed2"]
    calls, log = _run_release_script(tmp_path, "reseed.sh", dict(zip(names, wins)))
    assert [c[1] for c in calls] == names[:len(wins)]
    assert all(c[2:5] == ["7", "ctrap_tuned", "defense.trap_check={from_epoch:3}"] for c in calls)
    assert [c[5:] for c in calls] == [[], ["defense.seed=1007"], ["defense.seed=2007"]][:len(wins)]
    assert released_setting(wins, fallback_at=8) == released  # the script and the library release the same step
    assert log == (f"seed 7: red team {', '.join(map(str, wins))} of 9 ({', '.join(names[:len(wins)])}); "
                   f"released {names[released]}\n")


@pytest.mark.parametrize(("wins", "utilities", "released"), [
    ((9,), (0.99,), 0), ((9, 9), (0.90, 0.99), 1), ((9, 7, 9), (0.90, 0.99, 0.93), 1), ((5, 9, 6), (0.99, 0.90, 0.99), 2),
    ((8,), (0.95,), 0)])
def test_release_with_the_utility_check_runs_sft_first_and_releases_only_a_step_that_passes_it(
        tmp_path, wins, utilities, released):
    """reseed.sh --utility-check (release.sh with two re-seeded steps): SFT's run first (the aligned model), then each step
    until one wins 8 red-team cells with a utility >= 0.95 x the aligned model's; the library's rule agrees."""
    from selfdestruct.eval.red_team import released_setting

    names = ["ctrap_tuned_tc", "ctrap_tuned_reseed1", "ctrap_tuned_reseed2"]
    calls, log = _run_release_script(tmp_path, "reseed.sh", dict(zip(names, wins)), dict(zip(names, utilities)))
    assert [c[1] for c in calls][:1] == ["sft"] and [c[1] for c in calls][1:] == names[:len(wins)]
    kept = [u >= 0.95 for u in utilities]
    assert released_setting(wins, fallback_at=8, kept=kept) == released
    assert log.endswith(f"; utility check passed: {', '.join(str(int(k)) for k in kept)}; released {names[released]}\n")


@pytest.mark.parametrize("later", ["ctrap_tuned_r6", ":defense.seed=5", "ctrap_tuned_r6:"])
def test_release_script_rejects_a_later_step_that_is_not_name_colon_override_before_any_training(tmp_path, later):
    import subprocess

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "release.sh").write_text((NOWIN / "release.sh").read_text())
    (scripts / "candidate.sh").write_text('touch "$1/trained"\n')
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(["bash", str(scripts / "release.sh"), str(out), "7", "ok:defense.seed=1", later],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert f"later step '{later}' is not NAME:OVERRIDE" in run.stderr
    assert not (out / "trained").exists()


@pytest.mark.parametrize("which", ["checked", "first"])
def test_checked_script_runs_the_release_as_configured_into_its_own_directories(tmp_path, which):
    """experiments/nowin/checked.sh with python replaced by a stub that records its arguments: the grid (two threads)
    and the benign fine-tune of one release, each into OUT/WHICH_sSEED, and each command's overrides compose into
    the release they name (the built-in checked release at 0.95, or the first try's measuring check alone)."""
    import os
    import subprocess

    from helpers import compose_config

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path / "calls"}\n')
    (stub / "python").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", str(NOWIN / "checked.sh"), str(out), "10", which], check=True, capture_output=True,
                   env=env)
    grid, benign = [c.split() for c in (tmp_path / "calls").read_text().splitlines()]
    assert grid[:3] == ["-m", "selfdestruct.attack", "sweep=attack_grid"] and "trainer.branch_threads=2" in grid
    assert benign[:5] == ["-m", "selfdestruct.attack", "--multirun", "model_path=defend", "attack=benign"]
    assert [grid[-1], benign[-1]] == [f"hydra.sweep.dir={out}/{which}_s10/{sweep}" for sweep in ("grid", "benign")]
    assert (out / f"{which}_s10" / "DONE").exists()
    for call in (grid, benign):
        check = compose_config("attack", [a for a in call[2:] if a != "--multirun"], tmp_path / "run").defense.trap_check
        release = (check.from_epoch, check.get("reseed", 0), check.get("utility_check"))  # unset: the defaults
        assert release == ((3, 2, 0.95) if which == "checked" else (3, 0, None))


def test_checked_script_rejects_an_unknown_release_before_any_run(tmp_path):
    import subprocess

    run = subprocess.run(["bash", str(NOWIN / "checked.sh"), str(tmp_path / "out"), "10", "plain"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "is 'checked' or 'first', not 'plain'" in run.stderr
    assert not (tmp_path / "out").exists()


def test_the_stamp_names_each_machine_with_its_kernel_path():
    gen = _generator()
    env = {"cpu": "AMD EPYC", "packages": {"torch": "2.13.0+cpu"}, "torch_threads": 1, "python": "3.11.7"}
    text = gen.stamp([{"environment": {**env, "cpu_capability": "AVX2"}},
                      {"environment": {**env, "cpu_capability": "AVX512"}}, {"environment": env}])
    assert "from 3 metrics.json files; machine: AMD EPYC, AMD EPYC (AVX2 kernels), AMD EPYC (AVX512 kernels); " \
           "torch 2.13.0+cpu; torch threads 1; Python 3.11.7." in text
    zen = {**env, "cpu_capability": "AVX2", "cpu_id": "AuthenticAMD cpu family 23 model 1 stepping 2"}
    assert "machine: AMD EPYC (AVX512 kernels), AMD EPYC (AuthenticAMD cpu family 23 model 1 stepping 2; AVX2 " \
           "kernels);" in gen.stamp([{"environment": zen}, {"environment": {**env, "cpu_capability": "AVX512"}}])


def _lock_run(out: Path, run: str, weights: dict[str, bytes], aligned: dict, built: bool) -> None:
    """One SFT-stage run of experiments/lock_vs_newest.sh: its metrics.json, its log and the cache entries it names."""
    log = []
    for stage, data in weights.items():
        entry = out / f"{run}_cache" / stage / "0123"
        (entry / "model").mkdir(parents=True)
        (entry / "model" / "model.safetensors").write_bytes(data)
        log.append(f"[INFO] - building {stage} into {entry}" if built else f"[INFO] - cache hit: {stage} {entry}")
    (out / f"{run}.log").write_text("\n".join(log) + "\n")
    (out / run).mkdir()
    (out / run / "metrics.json").write_text(json.dumps({"seed": 0, "aligned": aligned, "environment": {
        "cpu": "Test CPU", "cpu_capability": "AVX2", "torch_threads": 1, "python": "3.11.7",
        "packages": {"torch": "2.13.0+cpu"}}}))


def test_lock_vs_newest_names_the_changed_packages_and_compares_the_weights_byte_for_byte(tmp_path):
    gen = _generator()
    (tmp_path / "lock.txt").write_text("numpy==2.0.0\nplatformdirs==4.14.8\ntorch==2.13.0\n")
    (tmp_path / "newest.txt").write_text("newpkg==1.0\nnumpy==2.0.0\nplatformdirs==4.14.9\ntorch==2.13.0\n")
    _lock_run(tmp_path, "lock", {"base": b"B" * 64, "align": b"A" * 64}, {"utility": 0.9, "harmful_score": 0.0},
              built=False)
    _lock_run(tmp_path, "newest", {"base": b"B" * 64, "align": b"A" * 63 + b"a"},
              {"utility": 0.875, "harmful_score": 0.0}, built=True)
    lines, metrics = gen.lock_table([tmp_path])
    text = "\n".join(lines)
    assert "newpkg — → 1.0, platformdirs 4.14.8 → 4.14.9" in text and "numpy" not in text
    assert "the SFT stage of seed 0, pre-training and alignment, in each environment; torch threads 1)" in text
    assert "- base weights: byte for byte the same" in lines
    assert "- align weights: **different**" in lines  # one byte of 64 differs
    assert "- the aligned model's evaluation: utility 0.9 → 0.875" in lines
    assert len(metrics) == 2
    (tmp_path / "newest.log").write_text("[INFO] - building base into /x\n")  # the align entry is not named
    with pytest.raises(SystemExit, match="align"):
        gen.lock_table([tmp_path])
