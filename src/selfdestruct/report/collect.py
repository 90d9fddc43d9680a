"""Find the runs of one or more sweeps on disk and read them into plain records.

A sweep is only trusted through the files each run leaves behind: ``metrics.json`` (written last,
atomically) means the run finished; a Hydra run directory without it means the run failed or never
finished. Reading must never crash on a bad file, because a report that dies on one broken cell hides
all the good ones.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfdestruct.utils.run_metrics import FAILURE_FILE, METRICS_FILE, RunMetrics, SchemaError, as_float, as_int

log = logging.getLogger(__name__)

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
# Written by sweep=attack_search into its sweep directory (selfdestruct.utils.search; not imported: it needs optuna).
SEARCH_FILE = "search.json"
# Written beside a saved model by selfdestruct.models.io (not imported: that module pulls in torch).
PROVENANCE_FILE = "selfdestruct.json"
# Preferred training-log columns for the attack curve, best first.
CURVE_COLUMNS = ("attack/harmful_loss", "attack/harmful_loss_step", "attack/harmful_loss_epoch")
FALLBACK_CURVE_COLUMNS = ("train/loss", "train/loss_step", "train/loss_epoch")


@dataclass
class Run:
    """One run directory: an attack cell, or a defense (``defend``) run that has no attack."""

    path: Path
    status: str  # "ok" | "failed" (no metrics.json) | "invalid" (a metrics.json that cannot be used)
    stage: str  # "attack" | "defend"
    defense: str | None = None
    attack_kind: str | None = None
    lr: float | None = None
    num_samples: int | None = None
    epochs: int | None = None
    seed: int | None = None
    pre: dict[str, Any] = field(default_factory=dict)
    post: dict[str, Any] = field(default_factory=dict)
    aligned: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    curve_name: str | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # metrics.json "environment" (provenance)
    made_in: list[dict[str, Any]] = field(default_factory=list)  # metrics.json "made_in": where its weights were made
    attack_config: dict[str, Any] = field(default_factory=dict)  # metrics.json "attack.config": every attack field
    search: dict[str, Any] = field(default_factory=dict)  # metrics.json "search": the attacker's success
    model_path: str | None = None  # metrics.json "model_path": the model the run started from
    job_overrides: list[str] | None = None  # metrics.json "overrides": the ones that define what the job computes
    search_trial: int | None = None  # the trial number when the run is a trial of sweep=attack_search
    red_team: dict[str, Any] = field(default_factory=dict)  # metrics.json "red_team": the model's defense.trap_check

    @property
    def attack_seed(self) -> int | None:
        """The seed that ordered the attack's batches: ``attack.seed`` when the run set one, else the run's seed."""
        value = self.attack_config.get("seed")
        return self.seed if value is None else as_int(value)

    @property
    def grid(self) -> tuple[str | None, int | None]:
        """Which grid an attack cell belongs to: the defended model it attacked and the attack's batch order."""
        return self.model_path, self.attack_seed


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's content, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def number(mapping: Mapping[str, Any] | None, key: str) -> float | None:
    """A numeric metric, or None when absent or not a number (bools are not numbers here)."""
    if not mapping:
        return None
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def find_run_dirs(roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Every directory under ``roots`` that holds a ``metrics.json`` or a Hydra ``.hydra/config.yaml``."""
    found: dict[Path, None] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            log.warning("not a directory, skipped: %s", root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if METRICS_FILE in filenames or (here / HYDRA_CONFIG).is_file():
                found.setdefault(here.resolve(), None)
            # Hidden folders (.hydra, staging dirs) and checkpoints never hold runs of their own.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
    return list(found)


def _read_yaml(path: Path) -> Any:
    """The parsed file, or None when it is absent (optional) or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        log.warning("unreadable %s: %s", path, exc)
        return None


def _parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["+attack.lr=0.01", "defense=seam"]`` -> ``{"attack.lr": "0.01", "defense": "seam"}``."""
    parsed: dict[str, str] = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            continue
        key, value = item.split("=", 1)
        parsed[key.lstrip("+~").strip()] = value.strip().strip("'\"")
    return parsed


def _name_of(node: Any) -> str | None:
    """A config group may be a plain string or a mapping with a ``name``/``kind``."""
    if isinstance(node, str):
        return node
    if isinstance(node, Mapping):
        for key in ("name", "kind", "_name_"):
            if isinstance(node.get(key), str):
                return node[key]
    return None


def _defense_of_model(model_dir: Path) -> str | None:
    """The defense recorded in a defended model's provenance file (an attack config names only its model)."""
    try:
        provenance = json.loads((model_dir / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    defense = provenance.get("defense") if isinstance(provenance, Mapping) else None
    return defense if isinstance(defense, str) else None


def _describe_from_hydra(run: Run) -> None:
    """Fill a run's coordinates from its Hydra files, so a failed cell lands on the right grid spot."""
    hydra_dir = run.path / ".hydra"
    cfg = _read_yaml(hydra_dir / "config.yaml")
    cfg = cfg if isinstance(cfg, Mapping) else {}
    hydra_cfg = _read_yaml(hydra_dir / "hydra.yaml")
    choices: Mapping[str, Any] = {}
    job_name = ""
    if isinstance(hydra_cfg, Mapping) and isinstance(hydra_cfg.get("hydra"), Mapping):
        runtime = hydra_cfg["hydra"].get("runtime") or {}
        choices = (runtime.get("choices") or {}) if isinstance(runtime, Mapping) else {}
        job = hydra_cfg["hydra"].get("job") or {}
        job_name = str(job.get("name", "")) if isinstance(job, Mapping) else ""
    if not run.overrides:
        listed = _read_yaml(hydra_dir / "overrides.yaml")
        if isinstance(listed, list):
            run.overrides = [str(item) for item in listed]
    given = _parse_overrides(run.overrides)

    attack = cfg.get("attack") if isinstance(cfg.get("attack"), Mapping) else {}
    run.defense = run.defense or given.get("defense") or given.get("defense.name") or _name_of(cfg.get("defense"))
    if run.defense is None and isinstance(choices, Mapping):
        run.defense = _name_of(choices.get("defense"))
    if run.defense is None and isinstance(cfg.get("model_path"), str):
        run.defense = _defense_of_model(Path(cfg["model_path"]))
    run.attack_kind = (run.attack_kind or given.get("attack.kind") or given.get("attack.name") or given.get("attack")
                       or _name_of(attack))
    if run.lr is None:
        run.lr = as_float(given.get("attack.lr", attack.get("lr")))
    if run.num_samples is None:
        run.num_samples = as_int(given.get("attack.num_samples", attack.get("num_samples")))
    if run.epochs is None:
        run.epochs = as_int(given.get("attack.epochs", attack.get("epochs")))
    if run.seed is None:
        run.seed = as_int(given.get("seed", cfg.get("seed")))

    stage = str(cfg.get("stage") or job_name or "")
    has_attack = run.lr is not None or run.num_samples is not None or "attack" in given
    run.stage = "defend" if ("defend" in stage and "attack" not in stage) or not has_attack else "attack"
    if run.stage == "attack" and run.attack_kind is None:
        run.attack_kind = "harmful"


def _read_failure(run: Run) -> None:
    path = run.path / FAILURE_FILE
    if not path.is_file():
        run.error = "no metrics.json (the run crashed, was killed or is still running)"
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        run.error = f"unreadable failure.json: {exc}"
        return
    if isinstance(data, Mapping):
        message = str(data.get("error") or "").strip()
        run.error = message.splitlines()[0] if message else "failed (no error message)"
        if isinstance(data.get("overrides"), list):
            run.overrides = [str(item) for item in data["overrides"]]


def _fill_from_metrics(run: Run, metrics: RunMetrics) -> None:
    run.defense, run.seed, run.environment = metrics.defense, metrics.seed, metrics.environment
    run.pre, run.aligned = metrics.pre, metrics.aligned
    run.model_path, run.job_overrides = metrics.model_path, metrics.overrides
    run.red_team = metrics.red_team or {}
    run.made_in = metrics.made_in or []
    if metrics.attack is None:
        run.stage = "defend"
        return
    attack = metrics.attack
    run.stage = "attack"
    run.attack_kind, run.lr, run.num_samples, run.epochs = attack.kind, attack.lr, attack.num_samples, attack.epochs
    run.post, run.attack_config, run.search = metrics.post or {}, attack.config, metrics.search or {}


def _metrics_csvs(run_dir: Path) -> list[Path]:
    csv_dir = run_dir / "csv"
    if not csv_dir.is_dir():
        return []
    return sorted(csv_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)


def read_curve(run_dir: Path) -> tuple[str | None, list[tuple[float, float]]]:
    """The harmful-loss trajectory from the run's Lightning CSV log (newest log file wins).

    Lightning writes one row per logging call with empty cells for the metrics it did not log then,
    so rows without a value for the chosen column are skipped.
    """
    for path in reversed(_metrics_csvs(run_dir)):
        try:
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            log.warning("unreadable training log %s: %s", path, exc)
            continue
        columns = list(rows[0].keys()) if rows else []
        chosen = next((c for c in CURVE_COLUMNS if c in columns), None)
        chosen = chosen or next((c for c in columns if c and "harmful_loss" in c), None)
        chosen = chosen or next((c for c in FALLBACK_CURVE_COLUMNS if c in columns), None)
        if chosen is None:
            continue
        points: list[tuple[float, float]] = []
        for index, row in enumerate(rows):
            value = as_float(row.get(chosen) or None)
            if value is None or not math.isfinite(value):
                continue
            step = as_float(row.get("step") or None)
            points.append((step if step is not None else float(index), value))
        if points:
            return chosen, points
    return None, []


def load_run(run_dir: Path) -> Run:
    """Read one run directory; problems become the run's status and error, never an exception."""
    run = Run(path=run_dir, status="ok", stage="attack")
    if run_dir.name.isdigit() and (run_dir.parent / SEARCH_FILE).is_file():
        run.search_trial = int(run_dir.name)
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        try:
            metrics, problem = RunMetrics.from_json(json.loads(metrics_path.read_text())), None
        except SchemaError as exc:
            problem = str(exc)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = f"metrics.json is not valid JSON: {exc}"
        if problem is None:
            _fill_from_metrics(run, metrics)
        else:
            run.status, run.error = "invalid", problem
            log.warning("invalid run %s: %s", run_dir, problem)
    else:
        run.status = "failed"
        _read_failure(run)
        log.info("failed run %s: %s", run_dir, run.error)
    if run.status != "ok" and (run_dir / HYDRA_CONFIG).is_file():
        _describe_from_hydra(run)
    elif run.status != "ok":
        run.stage = "unknown"  # an unusable metrics.json and no Hydra files: nothing says what it was
    if run.stage == "attack" and run.attack_kind != "benign":
        run.curve_name, run.curve = read_curve(run_dir)
    return run


def collect(roots: Iterable[str | os.PathLike]) -> list[Run]:
    """All runs under ``roots`` (searched recursively), in a stable order."""
    runs = [load_run(path) for path in find_run_dirs(roots)]
    log.info("found %d runs", len(runs))
    return sorted(runs, key=sort_key)


def sort_key(run: Run) -> tuple:
    """Defense runs first, then by defense, attack kind, lr, samples, seed, path."""
    return (
        run.stage != "defend",
        run.defense or "~",
        run.attack_kind or "",
        run.lr if run.lr is not None else math.inf,
        run.num_samples if run.num_samples is not None else math.inf,
        run.seed if run.seed is not None else -1,
        str(run.path),
    )
