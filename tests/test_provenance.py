"""Provenance: every metrics.json says where it was made, and the report warns when environments differ."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from selfdestruct.report import write_report
from selfdestruct.utils.provenance import cpu_id, environment, gemm_gflops, numerics_fingerprint

from test_report import write_cell

REPO = Path(__file__).resolve().parents[1]


def test_environment_records_versions_threads_processor_and_python():
    env = environment()
    assert env["python"] == platform.python_version()
    assert env["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert env["packages"]["pytorch-lightning"] and env["packages"]["transformers"]
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert env["gpus"] == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                           if torch.cuda.is_available() else [])
    json.dumps(env)  # JSON-ready


def test_fingerprint_changes_with_the_kernel_path_and_not_otherwise():
    env = environment()
    same = json.loads(json.dumps(env))
    other = {**same, "cpu_capability": "DEFAULT" if env["cpu_capability"] != "DEFAULT" else "AVX2"}
    assert numerics_fingerprint(env) == numerics_fingerprint(same)
    assert numerics_fingerprint(env) != numerics_fingerprint(other)
    assert numerics_fingerprint(None) == "unknown"


def test_cpu_id_names_the_first_processors_family_and_model_and_stays_out_of_the_fingerprint(tmp_path):
    one = "vendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nstepping\t: 2\n"
    (tmp_path / "cpuinfo").write_text(one + "\n" + one.replace("23", "25"))
    assert cpu_id(str(tmp_path / "cpuinfo")) == "AuthenticAMD cpu family 23 model 1 stepping 2"
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert cpu_id(str(tmp_path / "arm")) is None and cpu_id(str(tmp_path / "missing")) is None
    env = environment()
    assert env["cpu_id"] == cpu_id()
    assert numerics_fingerprint(env) == numerics_fingerprint({**env, "cpu_id": "GenuineIntel cpu family 6"})


def test_gemm_rate_is_the_products_arithmetic_over_its_time_on_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        state = torch.get_rng_state()
        rate = gemm_gflops(size=256, seconds=0.2)
        assert torch.get_num_threads() == 2 and torch.equal(torch.get_rng_state(), state)  # both left as they were
        torch.set_num_threads(1)  # the function's own setting, for the independent measurement
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        a @ b
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        independent = 2 * 256**3 * 20 / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(before)
    assert 0.2 < rate / independent < 5, (rate, independent)


def _cell(root: Path, name: str, env: dict | None) -> None:
    run = write_cell(root / name, "sft", 1e-4, 50, 0, {"harmful_score": 0.0, "utility": 0.9},
                     {"harmful_score": 0.9, "utility": 0.9}, aligned={"harmful_score": 0.0})
    metrics = json.loads((run / "metrics.json").read_text())
    if env is not None:
        metrics["environment"] = env
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_report_warns_only_when_environments_differ(tmp_path):
    env = environment()
    _cell(tmp_path / "same", "a", env)
    _cell(tmp_path / "same", "b", env)
    report = write_report([tmp_path / "same"], tmp_path / "out_same")
    assert report.environment_warning() is None
    assert "Warning" not in (tmp_path / "out_same" / "summary.md").read_text()

    _cell(tmp_path / "mixed", "a", env)
    _cell(tmp_path / "mixed", "b", {**env, "cpu_capability": "DEFAULT", "env": {"ATEN_CPU_CAPABILITY": "default"}})
    report = write_report([tmp_path / "mixed"], tmp_path / "out_mixed")
    warning = report.environment_warning()
    assert warning is not None and "ATEN_CPU_CAPABILITY=default" in warning and "1 runs" in warning
    assert "different environments" in (tmp_path / "out_mixed" / "summary.md").read_text()
    assert 'id="environment-warning"' in (tmp_path / "out_mixed" / "dashboard.html").read_text()


def test_lock_pins_every_package_and_the_install_paths_use_it():
    lines = [l for l in (REPO / "requirements" / "lock.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert lines and all("==" in l for l in lines), "every lock line pins one version"
    names = {l.split("==")[0].lower() for l in lines}
    assert {"torch", "pytorch-lightning", "transformers", "tokenizers", "peft", "hydra-core", "wandb"} <= names
    for path in ("README.md", "environment.yml", ".ci/run"):
        assert "requirements/lock.txt" in (REPO / path).read_text(), f"{path} installs from the lock"


def test_thread_count_variables_do_not_split_environments_that_run_the_same_threads():
    env = environment()
    # the machine's own kernel variables stay (some images set OPENBLAS_CORETYPE, say); only thread counts change
    base = {k: v for k, v in env["env"].items() if k not in ("MKL_NUM_THREADS", "OMP_NUM_THREADS")}
    with_vars = {**env, "env": {**base, "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}}
    assert numerics_fingerprint(with_vars) == numerics_fingerprint({**env, "env": base})
    other_cbwr = "AVX2" if base.get("MKL_CBWR") == "COMPATIBLE" else "COMPATIBLE"
    assert (numerics_fingerprint({**env, "env": {**base, "MKL_CBWR": other_cbwr}})
            != numerics_fingerprint({**env, "env": base}))


def test_metrics_record_where_each_stage_of_the_weights_ran_even_from_another_processs_cache(tmp_path):
    """A defend run's metrics.json lists the stages that made its weights (base, align, and the defense when it
    trains), each with the thread count it ran at: a cached alignment made at 2 threads and reused by a run at 1
    thread says 2, where the run's own environment says 1 (on some hosts that alone changes the weights)."""
    from selfdestruct.commands.defend import defend

    from helpers import compose_config

    cache = tmp_path / "cache"
    base = ["model=micro", "trainer.progress_bar=false", "eval.max_examples=4", "eval.max_new_tokens=8",
            f"paths.cache_dir={cache}", "trainer.max_steps=2"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        made_at_two = defend(compose_config("defend", [*base, "defense=sft"], tmp_path / "sft2"))
        torch.set_num_threads(1)
        seam = defend(compose_config("defend", [*base, "defense=seam", "defense.params.num_samples=8"],
                                     tmp_path / "seam1"))
    finally:
        torch.set_num_threads(before)
    assert [(r["stage"], r["torch_threads"]) for r in made_at_two["made_in"]] == [("base", 2), ("align", 2)]
    assert [(r["stage"], r["torch_threads"]) for r in seam["made_in"]] == [("base", 2), ("align", 2), ("defend", 1)]
    assert seam["environment"]["torch_threads"] == 1
    assert seam["made_in"][-1]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    saved = json.loads((tmp_path / "seam1" / "model" / "selfdestruct.json").read_text())
    assert saved["made_in"] == seam["made_in"]  # the model carries its lineage to the attacks on it


def _lineage(threads: dict[str, int]) -> list[dict]:
    env = environment()
    return [{"stage": stage, "torch_threads": n, "cpu": env["cpu"], "cpu_id": env["cpu_id"],
             "cpu_capability": env["cpu_capability"], "gpus": [], "env": {}} for stage, n in threads.items()]


def _cell_made_in(root: Path, name: str, made_in: list[dict]) -> None:
    _cell(root, name, environment())
    path = root / name / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "made_in": made_in}))


def test_report_warns_when_a_stage_behind_the_weights_ran_elsewhere_not_when_a_defense_adds_a_stage(tmp_path):
    # SFT's weights are the aligned model's; a trained defense adds its own stage: the same environments, no warning
    _cell_made_in(tmp_path / "same", "sft", _lineage({"base": 2, "align": 2}))
    _cell_made_in(tmp_path / "same", "ctrap", _lineage({"base": 2, "align": 2, "defend": 1}))
    assert write_report([tmp_path / "same"], tmp_path / "out_same").environment_warning() is None
    # one run's alignment was made at 1 thread, the other's at 2: named, with the count of runs of each
    _cell_made_in(tmp_path / "mixed", "a", _lineage({"base": 2, "align": 2}))
    _cell_made_in(tmp_path / "mixed", "b", _lineage({"base": 1, "align": 1}))
    warning = write_report([tmp_path / "mixed"], tmp_path / "out_mixed").environment_warning()
    assert warning is not None and "the align stage of their weights ran in different environments" in warning
    assert "1 runs on 2 threads" in warning and "1 runs on 1 threads" in warning
    assert "different environments" in (tmp_path / "out_mixed" / "summary.md").read_text()
