"""``SELFDESTRUCT_REPRODUCIBLE``: each mode sets its kernel path before torch loads, an unknown value is an error, and
the ``threads`` mode trains the same weights on 1 and on 2 threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, load_script

from selfdestruct.utils import kernel_path

BENCHMARK = load_script("benchmarks/kernel_path.py")


def run_child(threads: int, **env: str) -> dict:
    """A few training steps of the embedded default's architecture in a fresh process (``benchmarks/kernel_path.py``'s
    child: the kernel path is fixed when a process first dispatches), with only ``env`` choosing its kernel path."""
    return BENCHMARK.child(2, threads, env)


@pytest.mark.parametrize("value, expected", [
    (None, {}), ("", {}), ("0", {}), ("no", {}),
    ("1", {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}),
    ("True", {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}),
    ("portable", {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}),
    (" threads ", {"MKL_CBWR": "AUTO,STRICT"}),
])
def test_each_spelling_names_its_kernel_variables(value, expected):
    assert kernel_path.settings(value) == expected


@pytest.mark.parametrize("value", ["2", "strict", "portabel"])
def test_an_unknown_value_is_an_error_naming_the_variable_and_the_choices(value):
    with pytest.raises(ValueError, match=rf"SELFDESTRUCT_REPRODUCIBLE='{value}' is not a kernel path.*threads"):
        kernel_path.settings(value)


def test_the_package_sets_the_mode_before_torch_loads_and_a_users_own_value_wins():
    portable = run_child(1, SELFDESTRUCT_REPRODUCIBLE="1", MKL_CBWR="AVX2")
    assert portable["kernel_env"] == {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "default"}
    assert portable["capability"] == "DEFAULT"  # torch read the portable path: it was set before torch was imported
    bad = subprocess.run([sys.executable, "-c", "import selfdestruct"], capture_output=True, text=True,
                         env={**os.environ, "SELFDESTRUCT_REPRODUCIBLE": "yes please"})
    assert bad.returncode != 0 and "SELFDESTRUCT_REPRODUCIBLE='yes please' is not a kernel path" in bad.stderr


def test_the_threads_mode_trains_the_same_weights_on_one_and_two_threads():
    # Without the mode, an Intel Xeon (family 6 model 167, AVX-512) gives other weights on 2 threads than on 1 here.
    one, two = (run_child(t, SELFDESTRUCT_REPRODUCIBLE="threads") for t in (1, 2))
    assert one["kernel_env"] == {"MKL_CBWR": "AUTO,STRICT", "ATEN_CPU_CAPABILITY": None}
    assert one["weights"] == two["weights"]


@pytest.mark.parametrize("differs", [False, True])
def test_the_invariance_script_compares_each_stages_weights_of_one_and_two_threads_byte_for_byte(tmp_path, differs):
    """experiments/thread_invariance.sh with ``python -m`` replaced by a stub that writes a stage's weights (bytes
    that carry the thread count when ``differs``) and the run's metrics.json; ``python -c`` is the real one."""
    stub = tmp_path / "bin"
    stub.mkdir()
    weights = '"$OMP_NUM_THREADS"' if differs else "same"
    (stub / "python").write_text(f"""#!/bin/bash
if [ "$1" != "-m" ]; then exec {sys.executable} "$@"; fi
for stage in base align; do
  mkdir -p "$SELFDESTRUCT_CACHE/$stage/key$OMP_NUM_THREADS/model"
  echo "$stage {weights}" > "$SELFDESTRUCT_CACHE/$stage/key$OMP_NUM_THREADS/model/model.safetensors"
done
run=${{@: -1}}; mkdir -p "${{run#hydra.run.dir=}}"
echo '{{"pre": {{"utility": 0.9'$OMP_NUM_THREADS'}}, "environment": {{"torch_threads": '$OMP_NUM_THREADS', '\\
'"env": {{"MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "'$OMP_NUM_THREADS'"}}}}}}' \\
  > "${{run#hydra.run.dir=}}/metrics.json"
""")
    (stub / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ.get('PATH', '')}",
           "SELFDESTRUCT_REPRODUCIBLE": "threads"}
    done = subprocess.run(["bash", str(REPO / "experiments" / "thread_invariance.sh"), str(tmp_path / "out"), "3"],
                          capture_output=True, text=True, env=env, check=True)
    said = (tmp_path / "out" / "invariance.txt").read_text()
    assert said == done.stdout
    verdict = "other weights at 2 threads than at 1" if differs else "the same weights at 1 and 2 threads"
    assert said.splitlines()[0] == "seed 3, SELFDESTRUCT_REPRODUCIBLE=threads"
    assert [line.split(" (")[0] for line in said.splitlines()[1:3]] == [f"base: {verdict}", f"align: {verdict}"]
    assert said.splitlines()[3:] == ["aligned utility at 1 thread(s): 0.910 (torch threads 1; MKL_CBWR=AUTO,STRICT)",
                                     "aligned utility at 2 thread(s): 0.920 (torch threads 2; MKL_CBWR=AUTO,STRICT)"]
