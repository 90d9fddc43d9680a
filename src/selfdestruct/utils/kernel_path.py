"""``SELFDESTRUCT_REPRODUCIBLE``: opt-in CPU kernel paths, set in the environment before torch is imported.

Read by ``selfdestruct/__init__.py`` (so every entry point and test applies it before torch loads); this module
imports nothing heavy. Values already set in the environment win over a mode's. The cost and the thread-count
invariance of each mode are measured side by side by ``benchmarks/kernel_path.py``.
"""

from __future__ import annotations

VARIABLE = "SELFDESTRUCT_REPRODUCIBLE"

# Each mode's environment. "portable": torch's portable kernels and MKL's SSE2 code path without its approximate
# reciprocals (the same numbers on every x86 processor that MKL runs that branch on, measured equal on an AVX-512
# and an AVX2 EPYC, not between an Intel Xeon and an AMD EPYC). "threads": this processor's own kernels, with MKL's
# strict conditional numerical reproducibility (static scheduling, reductions that do not depend on the thread
# count), so that a stage made on 2 threads and one made on 1 thread hold the same weights.
MODES: dict[str, dict[str, str]] = {
    "portable": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
    "threads": {"MKL_CBWR": "AUTO,STRICT"},
}
MODE_VARIABLES = tuple(sorted({name for variables in MODES.values() for name in variables}))  # what a mode may set
_SPELLINGS = {"1": "portable", "true": "portable", "yes": "portable", "portable": "portable", "threads": "threads",
              "": None, "0": None, "false": None, "no": None}


def mode(value: str | None) -> str | None:
    """The mode ``SELFDESTRUCT_REPRODUCIBLE=value`` names (None: the machine's default path). An unknown value is an
    error, not the default path: a reproducibility switch that silently does nothing is worse than none."""
    key = (value or "").strip().lower()
    if key not in _SPELLINGS:
        raise ValueError(f"{VARIABLE}={value!r} is not a kernel path: expected 1 (or portable: torch's portable "
                         "kernels and MKL_CBWR=COMPATIBLE), threads (this processor's kernels, MKL_CBWR=AUTO,STRICT: "
                         "the same weights at any thread count), or 0 / unset (the machine's default path)")
    return _SPELLINGS[key]


def settings(value: str | None) -> dict[str, str]:
    """The environment variables ``SELFDESTRUCT_REPRODUCIBLE=value`` sets (empty for the default path)."""
    name = mode(value)
    return dict(MODES[name]) if name else {}
