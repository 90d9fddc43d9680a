"""The study behind ``sweep=attack_search``: the Optuna sweeper plugin, made resumable to a total budget.

The plugin (``hydra-optuna-sweeper``) asks the study for trials, launches them through Hydra's launcher and tells
the study each job's return value; a job that returns no number is told as a failed trial. This layer adds what a
long search needs on top of it:

- ``hydra.sweeper.n_trials`` is the study's total budget: a search started again (killed, or finished and asked for
  more) runs only the trials still missing, e.g. 2 after 10 when asked for 12.
- A trial left ``RUNNING`` by a killed search is marked failed with the user attribute ``interrupted`` and does not
  count against the budget (its configuration was never measured), so its place is taken by a new trial.
- Job numbers continue the study's trial numbers, so trial ``k`` always runs in ``<sweep dir>/k``.
- A resumed study reseeds the sampler with its seed plus the number of trials so far: a fresh sampler would draw
  the very start-up trials it drew the first time, and the study would measure them twice.
- ``conditional_params``: parameters searched only in trials that took one choice (LoRA's rank and alpha when
  ``attack=lora``), with their bounds in the sweep config like every other parameter.
- ``warm_start``: attacks the study runs first, before its sampler proposes anything, each given as the overrides
  that compose it (``[intensity=strong]``: the lab's strong fixed attack). Their searched keys' values are read from
  the composed job config, checked against the search space before any trial runs, and enqueued; a resumed study
  enqueues only those it has not run yet. So the worst case a search reports is never weaker than these attacks.
- One search per sweep directory at a time (a lock file), and ``search.json`` in the sweep directory: every trial
  with its state, value, parameters and whether it was a warm start, for the report.
"""

from __future__ import annotations

import fcntl
import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from selfdestruct.utils.io import write_json_atomic

log = logging.getLogger("selfdestruct.search")
logging.getLogger("alembic").setLevel(logging.WARNING)  # the SQLite storage's migrations log every plugin at INFO
SEARCH_FILE = "search.json"
LOCK_FILE = ".search.lock"
INTERRUPTED = "interrupted"  # user attribute of a trial a killed search left running
ENQUEUED = "fixed_params"  # system attribute Optuna gives an enqueued trial (its fixed parameters)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts against the budget: finished (complete, pruned or failed), not interrupted."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED, False)


def mark_interrupted(study: optuna.Study) -> list[int]:
    """Mark the trials a killed search left ``RUNNING`` (or ``WAITING``) as failed and interrupted."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for frozen in stale:
        optuna.trial.Trial(study, frozen._trial_id).set_user_attr(INTERRUPTED, True)
        study.tell(frozen.number, state=TrialState.FAIL)
    return [t.number for t in stale]


def parse_conditional(conditional: Mapping[str, Mapping[str, str]] | None) -> dict[tuple[str, str], dict]:
    """``{"attack=lora": {"attack.lora.rank": "int(interval(4, 64))"}}`` -> ``{("attack", "lora"): {name: dist}}``."""
    parsed: dict[tuple[str, str], dict] = {}
    for condition, params in (conditional or {}).items():
        name, sep, value = str(condition).partition("=")
        if not sep or not name or not value:
            raise ValueError(f"hydra.sweeper.conditional_params: {condition!r} is not of the form key=choice")
        distributions, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
        if fixed:
            raise ValueError(f"hydra.sweeper.conditional_params.{condition}: {sorted(fixed)[0]} is not a sweep "
                             "(use choice(...), interval(...) or range(...))")
        parsed[(name.strip(), value.strip())] = distributions
    return parsed


def _as_list(value: Any) -> list | None:
    """``value`` as a Python list when it is a list (YAML or Python), else None."""
    return list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None


def parse_warm_start(warm_start: Any) -> list[list[str]]:
    """``hydra.sweeper.warm_start``: a list whose entries are override lists (or one override string each)."""
    if warm_start is None:
        return []
    entries = _as_list(warm_start)
    if entries is None:
        raise ValueError(f"hydra.sweeper.warm_start must be a list of override lists, got {warm_start!r}")
    parsed = []
    for i, entry in enumerate(entries):
        overrides = [entry] if isinstance(entry, str) else _as_list(entry)
        if overrides is None or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ValueError(f"hydra.sweeper.warm_start[{i}] must be a list of key=value overrides, got {entry!r}")
        parsed.append(overrides)
    return parsed


def condition_met(params: Mapping[str, Any], key: str, choice: str) -> bool:
    """Whether the parameters chosen so far meet a conditional parameter's condition ``key=choice``."""
    return key in params and str(params[key]) == choice


def describe_distribution(distribution: BaseDistribution) -> str:
    if isinstance(distribution, CategoricalDistribution):
        return f"choice{tuple(distribution.choices)}"
    low, high = getattr(distribution, "low", "?"), getattr(distribution, "high", "?")
    return f"{type(distribution).__name__}({low}, {high})"


def searched_value(config: DictConfig, name: str) -> Any:
    """The value of a searched key in a composed job config: a config group's choice (``attack``) or a value."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    if name in choices:
        return choices[name]
    return OmegaConf.select(config, name, throw_on_missing=True)


def warm_start_params(config: DictConfig, searched: Mapping[str, BaseDistribution],
                      conditional: Mapping[tuple[str, str], Mapping[str, BaseDistribution]], where: str
                      ) -> dict[str, Any]:
    """The searched keys' values in ``config`` (a composed job config), as the study's parameters; a value outside
    the search space is an error naming ``where`` and the key."""
    params: dict[str, Any] = {}

    def take(name: str, distribution: BaseDistribution) -> None:
        value = searched_value(config, name)
        if value is None and isinstance(distribution, CategoricalDistribution) and "null" in distribution.choices:
            value = "null"  # a searched choice('null', ...) stands for None
        try:
            inside = distribution._contains(distribution.to_internal_repr(value))
        except (ValueError, TypeError):
            inside = False
        if not inside:
            raise ValueError(f"{where}: its {name}={value} is outside the searched "
                             f"{describe_distribution(distribution)}; warm-start attacks must lie in the search "
                             "space (change the entry, or give hydra.sweeper.warm_start=[])")
        params[name] = value

    for name, distribution in searched.items():
        take(name, distribution)
    for (key, choice), distributions in conditional.items():
        if condition_met(params, key, choice):
            for name, distribution in distributions.items():
                take(name, distribution)
    return params


def enqueue_missing(study: optuna.Study, points: list[tuple[str, dict[str, Any]]], room: int) -> list[int]:
    """Enqueue the warm starts ``(text, params)`` the study has not run (counted trials), at most ``room`` of them;
    returns the trial numbers they will take."""
    done = [t.params for t in study.get_trials(deepcopy=False) if counted(t)]
    numbers = []
    for text, params in points:
        if len(numbers) >= room:
            break
        if any(all(p.get(k) == v for k, v in params.items()) for p in done):
            continue
        with warnings.catch_warnings():  # Optuna 2.10 calls enqueue_trial experimental; it is what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.enqueue_trial(params)
        numbers.append(len(study.get_trials(deepcopy=False)) - 1)
        log.info("warm start (%s): trial %d runs %s", text, numbers[-1],
                 " ".join(f"{k}={v}" for k, v in params.items()))
    return numbers


def reseed(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed ``sampler`` and its start-up sampler as if created with ``seed`` (Optuna 2.10's TPE and random samplers
    keep their generator in ``_rng``; ``reseed_rng`` would draw a seed at random)."""
    for part in (sampler, getattr(sampler, "_random_sampler", None)):
        if part is not None and hasattr(part, "_rng"):
            part._rng = np.random.RandomState(seed)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` or fail at once: two searches must never share one study."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another search is running in {path.parent} (lock {path.name})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def study_summary(study: optuna.Study, budget: int, sweep_dir: Path) -> dict[str, Any]:
    """What ``search.json`` holds: the study's trials in order, with the job directory of each."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
                       "interrupted": bool(t.user_attrs.get(INTERRUPTED, False)),
                       "warm_start": ENQUEUED in t.system_attrs, "job_dir": str(t.number)})
    return {"study_name": study.study_name, "direction": study.direction.name.lower(), "budget": budget,
            "counted": sum(counted(t) for t in study.get_trials(deepcopy=False)), "sweep_dir": str(sweep_dir),
            "trials": trials}


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    """The plugin's sweeper with a total budget, interrupted-trial handling, conditional parameters and warm
    starts."""

    def __init__(self, *, conditional_params: Mapping[str, Mapping[str, str]] | None = None,
                 warm_start: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget = self.n_trials
        self.conditional = parse_conditional(conditional_params)
        self.warm_start = parse_warm_start(warm_start)
        if self.conditional:
            if self.custom_search_space_extender is not None:
                raise ValueError("hydra.sweeper: give conditional_params or custom_search_space, not both")
            self.custom_search_space_extender = self._suggest_conditional

    def _suggest_conditional(self, config: Any, trial: optuna.trial.Trial) -> None:
        for (name, value), distributions in self.conditional.items():
            if condition_met(trial.params, name, value):
                for param, distribution in distributions.items():
                    trial._suggest(param, distribution)  # the plugin suggests its own parameters the same way

    def _warm_start_points(self, arguments: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """Each warm start's overrides (as text) and study parameters, composed the way its job will be."""
        if not self.warm_start:
            return []
        self._process_searchspace_config()
        searched, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        searched = {name: d for name, d in {**(self.search_space_distributions or {}), **searched}.items()
                    if name not in fixed}  # as the plugin builds its space (the deprecated search_space too)
        fixed_overrides = [f"{name}={value}" for name, value in fixed.items()]
        points = []
        for i, overrides in enumerate(self.warm_start):
            where = f"hydra.sweeper.warm_start[{i}] ({' '.join(overrides)})"
            try:
                config = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                            [*fixed_overrides, *overrides])
            except Exception as error:  # an unknown key or option: Hydra's message, with the entry named
                raise ValueError(f"{where} does not compose: {error}") from error
            points.append((" ".join(overrides), warm_start_params(config, searched, self.conditional, where)))
        return points

    def _load_study(self) -> optuna.Study:
        return optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=None,
                                   directions=self._get_directions(), load_if_exists=True)

    def sweep(self, arguments: list[str]) -> None:
        if not self.storage or not self.study_name:
            raise ValueError("hydra.sweeper.storage and hydra.sweeper.study_name must be set: the study is resumed "
                             "from them")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        warm = self._warm_start_points(arguments)  # checked before any work
        with exclusive(sweep_dir / LOCK_FILE):
            study = self._load_study()
            interrupted = mark_interrupted(study)
            if interrupted:
                log.warning("trials %s were left running by a killed search: marked failed (interrupted), not "
                            "counted", interrupted)
            done = sum(counted(t) for t in study.get_trials(deepcopy=False))
            missing = max(0, self.budget - done)
            log.info("study %s: %d of %d trials done, running %d", self.study_name, done, self.budget, missing)
            self.job_idx = len(study.get_trials(deepcopy=False))  # job k runs trial k
            seed = self.config.hydra.sweeper.get("sampler", {}).get("seed")
            if self.job_idx and seed is not None:
                reseed(self.sampler, int(seed) + self.job_idx)
            # Written first too, so the report knows this directory for a search while it runs or once killed.
            write_json_atomic(sweep_dir / SEARCH_FILE, study_summary(study, self.budget, sweep_dir))
            self.n_trials = missing
            if missing:
                enqueue_missing(study, warm, missing)
                try:
                    super().sweep(arguments)
                except ValueError:  # the plugin asks for the best trial, which needs one complete trial
                    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                        raise
                    log.warning("no trial of study %s completed", self.study_name)
            write_json_atomic(sweep_dir / SEARCH_FILE, study_summary(self._load_study(), self.budget, sweep_dir))
        log.info("search: %s", sweep_dir / SEARCH_FILE)

