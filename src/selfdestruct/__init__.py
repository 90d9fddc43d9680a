"""selfdestruct: make a safety-aligned language model self-destructive, then attack it at every intensity.

``SELFDESTRUCT_REPRODUCIBLE=1`` (opt-in) fixes the CPU kernel path before torch is imported, for bit-exact
reruns across x86 machines: torch's portable kernels (``ATEN_CPU_CAPABILITY=default``) and MKL's conditional
numerical reproducibility (``MKL_CBWR=COMPATIBLE``). Its cost on the embedded default is measured by
``benchmarks/kernel_path.py``. Values already set in the environment win.
"""

import os as _os

if _os.environ.get("SELFDESTRUCT_REPRODUCIBLE", "").lower() in ("1", "true", "yes"):
    _os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
    _os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

__version__ = "0.1.0"
