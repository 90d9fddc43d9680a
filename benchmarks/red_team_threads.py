"""The defender's red team (``defense.trap_check``) on several threads against one thread: wall time and equality.

On a saved defended model (a defend run or its ``model/`` directory), the red team's default grid (9 cells: three
learning rates x three attack lengths, each a fine-tuned copy judged on the defender's validation sets) runs once on
one thread and once with its cells on ``--threads`` threads (``trainer.branch_threads``, which the defend stage
passes to the check), side by side in one process; the two results must be equal cell for cell, and the ratio of
the wall times is printed. Torch runs one intra-op thread, as in the quickstart's jobs; an otherwise idle machine
with at least ``--threads`` cores is assumed (else the ratio measures sharing).

    python benchmarks/red_team_threads.py OUT/defend/ctrap_tuned
    python benchmarks/red_team_threads.py MODEL_DIR --threads 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from selfdestruct import CONF_DIR, cli_config
from selfdestruct import cli_common as cc
from selfdestruct.eval.red_team import TrapCheckConfig, red_team
from selfdestruct.models.io import load_model_dir, read_provenance
from selfdestruct.pipeline.stages import trap_check_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a defend run directory or a saved model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating pairs of runs; the medians are compared")
    args = parser.parse_args(argv)
    if args.threads < 2:
        parser.error(f"--threads={args.threads}: compare one thread with at least two")
    torch.set_num_threads(1)
    path = args.model / "model" if (args.model / "model").is_dir() else args.model
    model, tokenizer = load_model_dir(path)
    provenance = read_provenance(path)  # the data order the trap check used: the defense seed, else the run's
    seed = int(provenance.get("defense_seed", provenance.get("seed", 0)))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="defend", overrides=["trainer.progress_bar=false"])
    bundle, fmt, check = cli_config.data_bundle(cfg), cli_config.prompt_format(cfg), TrapCheckConfig()
    data = trap_check_data(bundle, check)
    evaluator = cc.evaluator(cfg, tokenizer, bundle)
    times: dict[int, list[float]] = {1: [], args.threads: []}
    results: dict[int, dict] = {}
    for _ in range(args.repeats):
        for threads in (1, args.threads):
            start = time.perf_counter()
            results[threads] = red_team(model, tokenizer, fmt, evaluator, data, check, seed, threads=threads)
            times[threads].append(time.perf_counter() - start)
    equal = results[1] == results[args.threads]
    one, many = (sorted(t)[len(t) // 2] for t in (times[1], times[args.threads]))
    print(json.dumps({"model": str(path), "cells": results[1]["cells"], "no_win": results[1]["no_win"],
                      "seconds_1_thread": round(one, 1), f"seconds_{args.threads}_threads": round(many, 1),
                      "speedup": round(one / many, 2), "equal": equal}))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
