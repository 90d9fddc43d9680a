"""selfdestruct: make a safety-aligned language model self-destructive, then attack it at every intensity.

``SELFDESTRUCT_REPRODUCIBLE`` (opt-in) fixes the CPU kernel path before torch is imported
(:mod:`selfdestruct.utils.kernel_path`). ``=1`` (or ``portable``): torch's portable kernels
(``ATEN_CPU_CAPABILITY=default``) and MKL's conditional numerical reproducibility (``MKL_CBWR=COMPATIBLE``), so that
the numbers do not depend on the processor's SIMD level; measured, that is not enough for bit-exact reruns across
processor vendors (an Intel Xeon and an AMD EPYC differ; docs/results.md, "The same commands on a second machine").
``=threads``: this processor's own kernels with MKL's strict reproducibility (``MKL_CBWR=AUTO,STRICT``), so that the
weights do not depend on the thread count (on an Intel Xeon the default path's do). The cost of each is measured by
``benchmarks/kernel_path.py``. Values already set in the environment win; any other value is an error.
"""

import os as _os
from pathlib import Path as _Path

from selfdestruct.utils import kernel_path as _kernel_path

for _name, _value in _kernel_path.settings(_os.environ.get(_kernel_path.VARIABLE)).items():
    _os.environ.setdefault(_name, _value)

__version__ = "0.1.0"

# The Hydra config tree ships inside the package (``conf/`` at the repository root links here), so a non-editable
# install runs every entry point from any directory.
CONF_DIR = str(_Path(__file__).resolve().parent / "conf")
