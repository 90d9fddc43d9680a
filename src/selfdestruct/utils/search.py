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
- One search per sweep directory at a time (a lock file), and ``search.json`` in the sweep directory: every trial
  with its state, value and parameters, for the report.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from optuna.trial import TrialState

from selfdestruct.utils.io import write_json_atomic

log = logging.getLogger("selfdestruct.search")
logging.getLogger("alembic").setLevel(logging.WARNING)  # the SQLite storage's migrations log every plugin at INFO
SEARCH_FILE = "search.json"
LOCK_FILE = ".search.lock"
INTERRUPTED = "interrupted"  # user attribute of a trial a killed search left running


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
                       "interrupted": bool(t.user_attrs.get(INTERRUPTED, False)), "job_dir": str(t.number)})
    return {"study_name": study.study_name, "direction": study.direction.name.lower(), "budget": budget,
            "counted": sum(counted(t) for t in study.get_trials(deepcopy=False)), "sweep_dir": str(sweep_dir),
            "trials": trials}


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    """The plugin's sweeper with a total budget, interrupted-trial handling and conditional parameters."""

    def __init__(self, *, conditional_params: Mapping[str, Mapping[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget = self.n_trials
        self.conditional = parse_conditional(conditional_params)
        if self.conditional:
            if self.custom_search_space_extender is not None:
                raise ValueError("hydra.sweeper: give conditional_params or custom_search_space, not both")
            self.custom_search_space_extender = self._suggest_conditional

    def _suggest_conditional(self, config: Any, trial: optuna.trial.Trial) -> None:
        for (name, value), distributions in self.conditional.items():
            if name in trial.params and str(trial.params[name]) == value:
                for param, distribution in distributions.items():
                    trial._suggest(param, distribution)  # the plugin suggests its own parameters the same way

    def _load_study(self) -> optuna.Study:
        return optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=None,
                                   directions=self._get_directions(), load_if_exists=True)

    def sweep(self, arguments: list[str]) -> None:
        if not self.storage or not self.study_name:
            raise ValueError("hydra.sweeper.storage and hydra.sweeper.study_name must be set: the study is resumed "
                             "from them")
        sweep_dir = Path(self.config.hydra.sweep.dir)
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
                try:
                    super().sweep(arguments)
                except ValueError:  # the plugin asks for the best trial, which needs one complete trial
                    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                        raise
                    log.warning("no trial of study %s completed", self.study_name)
            write_json_atomic(sweep_dir / SEARCH_FILE, study_summary(self._load_study(), self.budget, sweep_dir))
        log.info("search: %s", sweep_dir / SEARCH_FILE)

