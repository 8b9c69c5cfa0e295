"""The Hydra Sweeper plugin: Hydra's side of the search (setup, then one ``sweep`` call).

The search itself (search space, study, trials, pruning, figures) is
:mod:`pipeline.app.search`, imported when the sweep starts so that Hydra's plugin scan at
every start-up does not pay for Optuna.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

import hydra_plugins.backprop_optuna_sweeper.config  # noqa: F401 (registers the configs)


class OptunaSweeper(Sweeper):
    """``hydra/sweeper=optuna``: ask Optuna for trials, launch them, tell it the results."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.launcher = None
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from pipeline.app.search import run_search

        assert self.launcher is not None and self.config is not None
        return run_search(self.launcher, self.config, arguments, **self.settings)
