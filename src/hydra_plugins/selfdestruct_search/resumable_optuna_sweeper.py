"""``hydra/sweeper=selfdestruct_optuna``: the Optuna sweeper plugin with a total, resumable budget.

Its options are the plugin's (``hydra/sweeper=optuna``: sampler, direction, storage, study_name, n_trials, n_jobs,
max_failure_rate, params) plus ``conditional_params`` and ``warm_start``; what it adds is described in
:mod:`selfdestruct.utils.search`.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig


@dataclass
class ResumableOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.selfdestruct_search.resumable_optuna_sweeper.ResumableOptunaSweeper"
    # {"key=choice": {param: sweep}}: params searched only in trials whose `key` took `choice`
    conditional_params: Optional[Dict[str, Dict[str, str]]] = None
    # [[override, ...], ...]: attacks run first (trials 0, 1, ...), each the job these overrides compose
    warm_start: Optional[List[Any]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="selfdestruct_optuna", node=ResumableOptunaSweeperConf,
                             provider="selfdestruct")


class ResumableOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[Any], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, search_space: Optional[DictConfig],
                 custom_search_space: Optional[str], params: Optional[DictConfig],
                 conditional_params: Optional[DictConfig] = None, warm_start: Optional[Any] = None) -> None:
        from selfdestruct.utils.search import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(
            sampler=sampler, direction=direction, storage=storage, study_name=study_name, n_trials=n_trials,
            n_jobs=n_jobs, max_failure_rate=max_failure_rate, search_space=search_space,
            custom_search_space=custom_search_space, params=params, conditional_params=conditional_params,
            warm_start=warm_start)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)
