"""What the defender-side measurements of experiments/nowin (trap_probe.py, red_team.py) share: the command line
(saved models in, one JSON line per model out), the project's default config and data, and where a path's model is."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch


def model_dir(path: Path) -> Path:
    """A defend run stands for its model/, a grid cell for the model its metrics.json names; anything else is the
    model directory itself."""
    if (path / "model").is_dir():  # a defend run keeps its model beside its metrics.json
        return path / "model"
    if (path / "metrics.json").is_file():
        return Path(json.loads((path / "metrics.json").read_text())["model_path"])
    return path


def for_each_model(description: str, argv: list[str] | None, measure: Callable[..., dict],
                   extend: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse ``PATH ... [--out FILE]`` (and the options ``extend`` adds to the parser); for each path, load its model
    and print (and append to FILE) the JSON line ``{"path", "model", "defense", "seed", "defense_seed",
    **measure(...)}``. ``measure(model, tokenizer, cfg, bundle, fmt, seed, path, args)`` gets the project's default
    config, its data, the model's defense seed (its data order, from the provenance) and the parsed command line.
    One torch thread."""
    from hydra import compose, initialize_config_dir

    from selfdestruct import CONF_DIR, cli_config
    from selfdestruct.models.io import load_model_dir, read_provenance

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="defend", overrides=["trainer.progress_bar=false"])
    bundle, fmt = cli_config.data_bundle(cfg), cli_config.prompt_format(cfg)
    for path in args.paths:
        model_path = model_dir(path)
        model, tokenizer = load_model_dir(model_path)
        provenance = read_provenance(model_path)
        seed = int(provenance.get("defense_seed", provenance.get("seed", 0)))
        line = json.dumps({"path": str(path), "model": str(model_path), "defense": provenance.get("defense"),
                           "seed": provenance.get("seed"), "defense_seed": seed,
                           **measure(model, tokenizer, cfg, bundle, fmt, seed, path, args)})
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
    return 0
