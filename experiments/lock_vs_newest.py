"""The report of experiments/lock_vs_newest.sh: the lock against the newest versions, from its output directory.

    python experiments/lock_vs_newest.py OUT          # prints it
    python experiments/readme_results.py --lock-vs-newest OUT --out F [--readme R --marker M]   # a generated block

OUT holds ``lock.txt`` and ``newest.txt`` (``name==version`` lines), and the two SFT-stage runs ``lock`` and
``newest`` (their ``metrics.json``, and ``lock.log`` / ``newest.log`` naming the cache entries each built or hit).
"""

from __future__ import annotations

import filecmp
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

RUNS = ("lock", "newest")
STAGES = ("base", "align")


def versions(path: Path) -> dict[str, str]:
    return dict(line.split("==", 1) for line in path.read_text().split() if "==" in line)


def changed_packages(lock: dict[str, str], newest: dict[str, str]) -> list[str]:
    """``name old → new`` for each package whose version differs (``—``: absent on that side)."""
    return [f"{p} {lock.get(p, '—')} → {newest.get(p, '—')}" for p in sorted(set(lock) | set(newest))
            if lock.get(p) != newest.get(p)]


def cache_entries(log: Path) -> dict[str, Path]:
    """Stage name → the cache entry the run built ("building base into X") or hit ("cache hit: base X")."""
    found = re.findall(r"(?:building|cache hit:) (base|align)(?: into)? (\S+)", log.read_text())
    return {stage: Path(entry) for stage, entry in found}


def comparison(out: Path) -> tuple[list[str], list[dict]]:
    """The report's lines, and the two runs' metrics.json (for the generated block's stamp)."""
    metrics = {run: json.loads((out / run / "metrics.json").read_text()) for run in RUNS}
    entries = {run: cache_entries(out / f"{run}.log") for run in RUNS}
    for run in RUNS:
        missing = [s for s in STAGES if s not in entries[run]]
        if missing:
            raise SystemExit(f"error: {out / f'{run}.log'}: no cache entry named for {', '.join(missing)}")
    changed = changed_packages(versions(out / "lock.txt"), versions(out / "newest.txt"))
    threads = ", ".join(sorted({str(m.get("environment", {}).get("torch_threads", "?")) for m in metrics.values()}))
    lines = [f"The lock against the newest versions `setup.cfg` allows (that environment frozen on {frozen_on(out)}; "
             f"`bash experiments/lock_vs_newest.sh`; the SFT stage of seed {metrics['lock']['seed']}, pre-training "
             f"and alignment, in each environment; torch threads {threads}):", "",
             f"- packages whose version differs from `requirements/lock.txt`: {', '.join(changed) or 'none'}"]
    for stage in STAGES:
        same = filecmp.cmp(*(entries[run][stage] / "model" / "model.safetensors" for run in RUNS), shallow=False)
        lines.append(f"- {stage} weights: {'byte for byte the same' if same else '**different**'}")
    before, after = (metrics[run]["aligned"] for run in RUNS)
    moved = [f"{k} {before.get(k)} → {after.get(k)}" for k in sorted(set(before) | set(after))
             if before.get(k) != after.get(k)]
    lines.append("- the aligned model's evaluation: " + ("; ".join(moved) if moved else "the same in every metric"))
    return lines, list(metrics.values())


def frozen_on(out: Path) -> str:
    """The UTC date on which newest.txt (the newest environment's ``pip freeze``) was written."""
    return datetime.fromtimestamp((out / "newest.txt").stat().st_mtime, timezone.utc).strftime("%Y-%m-%d")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(comparison(Path(args[0]))[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
