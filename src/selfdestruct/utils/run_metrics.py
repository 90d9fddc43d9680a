"""``metrics.json``, the one schema: what every entry point writes last in its run directory, and the report reads.

A defend or evaluate run has ``pre`` and no ``attack``; an attack run adds ``attack``, ``post`` and ``search``.
Metric dictionaries (``pre``, ``post``, ``aligned``) map names to numbers (:mod:`selfdestruct.eval.evaluator`).
Files written by older versions, with fewer keys, still read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfdestruct.utils.io import write_json_atomic

METRICS_FILE = "metrics.json"
FAILURE_FILE = "failure.json"


class SchemaError(ValueError):
    """A metrics.json that the report cannot use; the message says which key."""


@dataclass
class AttackRecord:
    """What the attack was: its config option (``kind``), the grid coordinates, and every field of its config."""

    kind: str  # the conf/attack option: harmful | lora | mixed | benign
    lr: float
    num_samples: int
    epochs: int | None = None
    poison_ratio: float | None = None  # share of harmful pairs (mixed attacks only)
    config: dict[str, Any] = field(default_factory=dict)  # AttackConfig, every field

    @classmethod
    def from_json(cls, data: Any) -> AttackRecord:
        if not isinstance(data, Mapping):
            raise SchemaError("metrics.json 'attack' is not an object")
        lr, samples = as_float(data.get("lr")), as_float(data.get("num_samples"))
        for key, value in (("lr", lr), ("num_samples", samples)):
            if value is None:
                raise SchemaError(f"metrics.json misses 'attack.{key}'")
        config = data.get("config")
        return cls(kind=str(data.get("kind") or "harmful"), lr=lr, num_samples=as_int(samples),
                   epochs=as_int(data.get("epochs")), poison_ratio=as_float(data.get("poison_ratio")),
                   config=dict(config) if isinstance(config, Mapping) else {})


@dataclass
class RunMetrics:
    """One run's results and how they were made."""

    defense: str  # the defense's name (its config's ``name``/``label``)
    seed: int | None
    pre: dict[str, float]  # the model before any attack (the defended model)
    attack: AttackRecord | None = None
    post: dict[str, float] | None = None  # after the attack
    search: dict[str, Any] | None = None  # the attacker's success (conf/objective), for sweep=attack_search
    aligned: dict[str, float] = field(default_factory=dict)  # the aligned model, before the defense
    num_parameters: int | None = None
    model_path: str | None = None  # the model the run evaluated (defend: its saved copy)
    overrides: list[str] | None = None  # the job's identity overrides (a re-run with others recomputes)
    environment: dict[str, Any] = field(default_factory=dict)  # provenance: versions, threads, CPU/GPU
    red_team: dict[str, Any] | None = None  # the defended model's last red-team check (defense.trap_check), from
    #   its provenance (red_team_record): no_win, cells, epoch, utility, harmful_score, defense_seed; None: unchecked
    made_in: list[dict[str, Any]] | None = None  # the stages that trained the weights the run started from (base,
    #   align, defend), each where it ran (provenance.stage_record): cached stages may come from another process

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if self.attack is not None and self.attack.poison_ratio is None:
            del data["attack"]["poison_ratio"]
        return data

    def write(self, run_dir: Path) -> dict[str, Any]:
        """Write ``run_dir/metrics.json`` atomically (the run's last act); returns what was written."""
        data = self.to_json()
        write_json_atomic(run_dir / METRICS_FILE, data)
        return data

    @classmethod
    def from_json(cls, data: Any) -> RunMetrics:
        """Parse a metrics.json object; :class:`SchemaError` names the first missing or malformed key."""
        if not isinstance(data, Mapping):
            raise SchemaError("metrics.json is not a JSON object")
        if not isinstance(data.get("defense"), str):
            raise SchemaError("metrics.json misses 'defense'")
        if not isinstance(data.get("pre"), Mapping):
            raise SchemaError("metrics.json misses the 'pre' metrics")
        attack = None if data.get("attack") is None else AttackRecord.from_json(data["attack"])
        if attack is not None and not isinstance(data.get("post"), Mapping):
            raise SchemaError("metrics.json misses the 'post' metrics")

        def section(key: str) -> dict | None:
            value = data.get(key)
            return dict(value) if isinstance(value, Mapping) else None

        overrides = data.get("overrides")
        return cls(defense=data["defense"], seed=as_int(data.get("seed")), pre=dict(data["pre"]),
                   attack=attack, post=section("post") if attack else None, search=section("search"),
                   aligned=section("aligned") or {}, num_parameters=as_int(data.get("num_parameters")),
                   model_path=data["model_path"] if isinstance(data.get("model_path"), str) else None,
                   overrides=[str(o) for o in overrides] if isinstance(overrides, list) else None,
                   environment=section("environment") or {}, red_team=section("red_team"),
                   made_in=[dict(r) for r in data["made_in"] if isinstance(r, Mapping)]
                   if isinstance(data.get("made_in"), list) else None)


def red_team_record(provenance: Mapping[str, Any]) -> dict[str, Any] | None:
    """What ``metrics.json`` keeps of a defended model's red team (``defense.trap_check``, in the model's
    provenance): its last check, the released weights' (no-win, cells, the epoch, the model's own utility and
    harmful score on the red team's validation sets) and the defense seed that trained it (with
    ``trap_check.reseed``: which try was released). None for a model no red team checked."""
    checks = provenance.get("trap_check")
    if not checks:
        return None
    last = checks[-1]
    return {"no_win": last["no_win"], "cells": last["cells"], "epoch": last["epoch"],
            "utility": last["pre"]["utility"], "harmful_score": last["pre"]["harmful_score"],
            "defense_seed": provenance.get("defense_seed")}


def as_float(value: Any) -> float | None:
    """A JSON value as a float (numbers and numeric strings), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def as_int(value: Any) -> int | None:
    """A JSON value as an int when it is a whole finite number, else None."""
    number = as_float(value)
    if number is None or not math.isfinite(number) or number != int(number):
        return None
    return int(number)
