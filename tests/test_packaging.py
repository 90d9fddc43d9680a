"""The package carries its configs: a built wheel holds every Hydra config file, and ``--help`` lists the groups
from outside the repository (what a non-editable ``pip install .`` relies on)."""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from selfdestruct import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def test_repository_conf_is_the_package_conf():
    assert (REPO / "conf").resolve() == Path(CONF_DIR).resolve()
    assert Path(CONF_DIR).is_relative_to(REPO / "src" / "selfdestruct")


def test_package_data_declares_every_config():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["selfdestruct"].split(",")]
    package = REPO / "src" / "selfdestruct"
    declared = {path for pattern in patterns for path in package.glob(pattern)}
    configs = set(Path(CONF_DIR).rglob("*.yaml"))
    assert len(configs) >= 40 and configs <= {p.resolve() for p in declared} | declared


def _can_build_wheels_offline() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the ``wheel`` package (no download here)."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())
    return version >= (70, 1) or (version >= (61, 0) and importlib.util.find_spec("wheel") is not None)


@pytest.mark.skipif(not _can_build_wheels_offline(), reason="building a wheel offline needs setuptools >= 70.1 "
                    "(or an older one with the wheel package)")
def test_wheel_holds_every_config_and_the_search_plugin(tmp_path):
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("selfdestruct-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"selfdestruct/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in Path(CONF_DIR).rglob("*.yaml")}
    assert len(configs) >= 40
    assert configs <= names, sorted(configs - names)
    assert "hydra_plugins/selfdestruct_search/resumable_optuna_sweeper.py" in names


def test_help_lists_the_config_groups_from_any_directory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "selfdestruct.defend", "--help"], check=True, capture_output=True,
                         text=True, cwd=tmp_path, env=env).stdout
    header, listing = out.split("== Configuration groups ==")
    assert header.startswith("python -m selfdestruct.defend: ") and "defense=ctrap_tuned" in header  # the usage
    groups = dict(line.split(": ", 1) for line in listing.split("== Config ==")[0].splitlines() if ": " in line)
    assert set(groups) >= {"defense", "attack", "model", "sweep", "trainer", "intensity"}
    defenses = {p.stem for p in (Path(CONF_DIR) / "defense").glob("*.yaml")}
    assert set(groups["defense"].split(", ")) == defenses


HEAVY = ("torch", "pytorch_lightning", "transformers", "torchmetrics")


@pytest.mark.parametrize("entry", ["attack", "defend", "evaluate"])
def test_entry_points_compose_the_config_before_importing_torch(entry, tmp_path):
    """``--cfg job`` (and so ``--help`` and a mistyped key, which Hydra answers at the same point) imports none of
    torch, Lightning, transformers or torchmetrics: the entry module is light and the work is imported
    after composition (every test that runs a job goes through ``selfdestruct.commands``)."""
    probe = ("import runpy, sys\n"
             f"sys.argv = ['{entry}', '--cfg', 'job']\n"
             "try:\n"
             f"    runpy.run_module('selfdestruct.{entry}', run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout
    assert "seed:" in out  # the composed config was printed
    assert out.splitlines()[-1] == "HEAVY []"
