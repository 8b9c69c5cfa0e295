"""The ``hydra/sweeper=optuna`` config, its samplers and its pruners, in Hydra's ConfigStore.

Options are chosen like any Hydra config group::

    python train.py +sweep=optuna hydra/sweeper/sampler=random hydra/sweeper/pruner=median

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module without
registering it in ``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    multivariate: bool = False


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    n_startup_trials: int = 1
    # A categorical parameter (hidden_sizes) is drawn by an independent sampler; CMA-ES
    # says so on every trial unless told not to.
    warn_independent_sampling: bool = False


@dataclass
class GridSamplerConf:
    # The grid is the search space itself (every choice and range), filled in at the start
    # of the sweep: hence partial.
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class NoPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    """Stop a trial whose loss at an epoch is worse than the median of earlier trials there."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that always run to the end, to learn the median from
    n_warmup_steps: int = 0  # epochs before a trial may be pruned
    interval_steps: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    """Asynchronous successive halving: keep the best 1/reduction_factor at each rung."""

    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # epochs before the first rung ("auto": from the first trial)
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.backprop_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])

    sampler: Any = MISSING
    pruner: Any = MISSING
    # minimize or maximize what the task function returns (train.py: the final test loss).
    direction: str = "minimize"
    # The study: re-running with the same name and storage resumes it (adds n_trials).
    study_name: str = "backprop"
    # "auto": a journal file beside the MLflow store (optuna.journal next to mlflow.db);
    # null: in memory (no resuming, no pruning across processes); an RDB URL
    # (sqlite:///x.db, postgresql://...) or a path to a journal file.
    storage: str | None = "auto"
    n_trials: int = 20  # trials this command adds to the study
    n_jobs: int = 2  # trials asked per batch, run side by side by a parallel launcher
    # Fraction of a batch's trials that may fail before the search stops (a diverging
    # learning rate is a normal outcome of a search).
    max_failure_rate: float = 0.0
    # Epochs between the reports of a trial's loss to the pruner.
    report_every: int = 10
    # The search space, in Hydra's sweep syntax: choice(...), range(...), interval(a, b),
    # tag(log, interval(a, b)); a plain value fixes a key for every trial.
    params: dict[str, str] | None = None
    # Set by the sweeper on each trial's job (its trial number); not for users.
    trial: int | None = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf,
             provider="backprop_optuna_sweeper")
    for name, node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf),
                       ("cmaes", CmaEsSamplerConf), ("grid", GridSamplerConf)):
        cs.store(group="hydra/sweeper/sampler", name=name, node=node,
                 provider="backprop_optuna_sweeper")
    for name, node in (("none", NoPrunerConf), ("median", MedianPrunerConf),
                       ("successive_halving", SuccessiveHalvingPrunerConf)):
        cs.store(group="hydra/sweeper/pruner", name=name, node=node,
                 provider="backprop_optuna_sweeper")


register()
