"""Loss spikes at the end of a training stage: when the weights a stage ends with were reached from a point far off
its training path (the way ``ctrap_tuned`` failed held-out seed 13, experiments/nowin/README.md).

A step's loss is measured at the weights the step starts from. The last ``LAST`` steps are compared with the
``WINDOW`` steps before them: a loss more than ``THRESHOLD`` median absolute deviations above their median is a
spike. The threshold was set on the 66 CTRAP and SEAM defend runs of experiments/nowin on the AMD machine: three
ended above it (robust distances 85, 23 and 15: CTRAP on seed 13, whose released model kept 0.74 x SFT's utility,
and one-radius CTRAP on seeds 11, 0.91 x, and 1, unharmed), every other at 7.7 or below.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

LAST, WINDOW, THRESHOLD = 3, 100, 10.0
MIN_STEPS = LAST + 20  # fewer steps: too few to judge


def _reference(losses: Sequence[float]) -> tuple[float, float] | None:
    """Median and median absolute deviation of the WINDOW losses before the last LAST (None: too few, no spread)."""
    if len(losses) < MIN_STEPS:
        return None
    before = list(losses[-WINDOW - LAST : -LAST])
    center = statistics.median(before)
    spread = statistics.median(abs(x - center) for x in before)
    return (center, spread) if spread > 0 else None


def _distance(loss: float, ref: tuple[float, float]) -> float:
    """How many median absolute deviations ``loss`` lies above the reference's median."""
    center, spread = ref
    return (loss - center) / spread if math.isfinite(loss) else math.inf


def late_spike(losses: Sequence[float]) -> str | None:
    """A description of the spike among the last LAST losses, or None when there is none (or too few steps)."""
    ref = _reference(losses)
    if ref is None:
        return None
    worst = max(losses[-LAST:])
    distance = _distance(worst, ref)
    if distance <= THRESHOLD:
        return None
    return (f"the loss of the last {LAST} steps reaches {worst:.4g} against a median of {ref[0]:.4g} over the "
            f"{min(WINDOW, len(losses) - LAST)} steps before ({distance:.0f} median absolute deviations above it)")


def calm_step(losses: Sequence[float], candidates: Sequence[int]) -> int | None:
    """The latest step index in ``candidates`` whose loss is not a spike (None: every one is, or no reference)."""
    ref = _reference(losses)
    if ref is None:
        return None
    return next((i for i in sorted(candidates, reverse=True) if _distance(losses[i], ref) <= THRESHOLD), None)
