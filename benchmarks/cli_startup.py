"""How soon an entry point answers before any work: ``--help``, ``--cfg job`` and a mistyped key against the import
of the work's libraries (torch, Lightning, transformers), measured side by side in one run.

The entry modules (``selfdestruct/attack.py`` and its siblings) import only Hydra; the work
(``selfdestruct/commands/``) is imported once the config is composed. So a question Hydra answers costs the first
column, while any job pays the last one too. Each command runs ``--repeats`` times, interleaved; medians.

    python benchmarks/cli_startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "attack --help": [sys.executable, "-m", "selfdestruct.attack", "--help"],
    "defend --cfg job": [sys.executable, "-m", "selfdestruct.defend", "--cfg", "job"],
    "attack, a mistyped key": [sys.executable, "-m", "selfdestruct.attack", "model_path=x", "attack.learning_rate=1"],
    "import the work (commands.attack)": [sys.executable, "-c", "import selfdestruct.commands.attack"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=False)
            times[name].append(time.perf_counter() - start)
    work = statistics.median(times["import the work (commands.attack)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:38s} {median:6.2f} s  ({median / work:.2f} x the import of the work)")


if __name__ == "__main__":
    main()
