"""selfdestruct: make a safety-aligned language model self-destructive, then attack it at every intensity.

``SELFDESTRUCT_REPRODUCIBLE=1`` (opt-in) fixes the CPU kernel path before torch is imported: torch's portable
kernels (``ATEN_CPU_CAPABILITY=default``) and MKL's conditional numerical reproducibility
(``MKL_CBWR=COMPATIBLE``), so that the numbers do not depend on the processor's SIMD level. Measured, that is not
enough for bit-exact reruns across processor vendors (an Intel Xeon and an AMD EPYC differ; docs/results.md, "The same
commands on a second machine"). Its cost on the embedded default is measured by ``benchmarks/kernel_path.py``.
Values already set in the environment win.
"""

import os as _os
from pathlib import Path as _Path

if _os.environ.get("SELFDESTRUCT_REPRODUCIBLE", "").lower() in ("1", "true", "yes"):
    _os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
    _os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

__version__ = "0.1.0"

# The Hydra config tree ships inside the package (``conf/`` at the repository root links here), so a non-editable
# install runs every entry point from any directory.
CONF_DIR = str(_Path(__file__).resolve().parent / "conf")
