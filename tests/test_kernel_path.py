"""``SELFDESTRUCT_REPRODUCIBLE``: each mode sets its kernel path before torch loads, an unknown value is an error, and
the ``threads`` mode trains the same weights on 1 and on 2 threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import load_script

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
