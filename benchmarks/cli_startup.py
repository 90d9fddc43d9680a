"""How soon a command answers before any work: ``--help``, ``--cfg job``, a mistyped key and the errors of our own
checks (a value out of range, a model directory that does not exist, more examples than the data has), against the
import of the work's libraries (torch, Lightning, transformers), measured side by side in one run.

The entry modules (``selfdestruct/attack.py`` and its siblings) import only Hydra; each command
(``selfdestruct/commands/``) checks its input with ``selfdestruct.cli_config``, which needs no torch, and imports
the work (``selfdestruct.cli_common`` and below) after that. So bad input costs the first columns, while any job
pays the last one too. Each command runs ``--repeats`` times, interleaved; medians.

    python benchmarks/cli_startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "attack --help": [sys.executable, "-m", "selfdestruct.attack", "--help"],
    "defend --cfg job": [sys.executable, "-m", "selfdestruct.defend", "--cfg", "job"],
    "attack, a mistyped key": [sys.executable, "-m", "selfdestruct.attack", "model_path=x", "attack.learning_rate=1"],
    "attack, attack.epochs=0": [sys.executable, "-m", "selfdestruct.attack", "model_path=defend", "attack.epochs=0"],
    "attack, no such model_path": [sys.executable, "-m", "selfdestruct.attack", "model_path=/nowhere/model"],
    "attack, attack.num_samples=100000": [sys.executable, "-m", "selfdestruct.attack", "model_path=defend",
                                          "attack.num_samples=100000"],
    "import the work (cli_common)": [sys.executable, "-c", "import selfdestruct.cli_common"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as scratch:  # the failed jobs' run directories (Hydra's outputs/) go here
        for _ in range(args.repeats):
            for name, command in COMMANDS.items():
                start = time.perf_counter()
                subprocess.run(command, capture_output=True, check=False, cwd=scratch)
                times[name].append(time.perf_counter() - start)
    work = statistics.median(times["import the work (cli_common)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:38s} {median:6.2f} s  ({median / work:.2f} x the import of the work)")


if __name__ == "__main__":
    main()
