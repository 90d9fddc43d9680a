"""Composing the project's Hydra configs in-process, as the entry points would, for tests; loading the project's
scripts (experiments/, benchmarks/) as modules."""

from __future__ import annotations

import _thread
import importlib.util
import sys
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from selfdestruct import CONF_DIR as _CONF_DIR

CONF_DIR = Path(_CONF_DIR)
REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """The script at ``relative`` (to the repository root) as a fresh module, registered under its file name (the
    dataclasses of a script look their module up)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compose_config(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """The config ``python -m selfdestruct.<config_name> <overrides>`` would run with, writing to ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*overrides, f"hydra.run.dir={run_dir}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def config_options(group: str) -> list[str]:
    """Every option of a config group, by file name."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@contextmanager
def ctrl_c_noted() -> Iterator[threading.Event]:
    """Python's own Ctrl-C handler for the duration, and an event set once the main thread has run it."""
    seen = threading.Event()

    def on_sigint(signum, frame):
        seen.set()
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def press_ctrl_c(seen: threading.Event) -> None:
    """From a worker thread, while its command runs: once the main thread waits on the workers, Ctrl-C as a user
    would press it; return (the command then ends) only after the main thread has taken it."""
    time.sleep(0.3)
    _thread.interrupt_main()
    assert seen.wait(10), "the main thread did not take Ctrl-C while a command ran"
    time.sleep(0.5)
