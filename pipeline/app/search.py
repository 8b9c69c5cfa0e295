"""Hyper-parameter search with Optuna: the study, its trials as Hydra jobs, and pruning.

Two sides, in two kinds of process:

- **The search** (:func:`run_search`, called by the ``hydra/sweeper=optuna`` plugin in the
  launching process): read the search space from ``hydra.sweeper.params`` in Hydra's sweep
  syntax, open the study (persistent by default, so the same command resumes it), then
  ask for ``n_jobs`` trials at a time, launch them as jobs through the configured launcher
  (basic, joblib, submitit...) and tell Optuna each result: COMPLETE with the job's
  objective, PRUNED when the job stopped on the pruner's word, FAIL when it failed or
  returned no finite number. At the end: the best trial, ``optimization_results.yaml``,
  and Optuna's own figures logged on the sweep's parent run.
- **A trial** (:func:`trial_reporter`, in the job's process, a joblib worker or a cluster
  node): every ``report_every`` epochs the job reports its loss to the study and asks the
  pruner whether to go on; a trial told to stop ends its training there, finishes its run
  normally with the tags ``sweep.trial_state=pruned`` and ``sweep.pruned_epoch``, and
  leaves ``pruned_at_epoch`` on the trial for the search to read.

The objective is the final validation loss, as the task function returns it, and pruning
uses the validation loss too: the test split is reported, never selected on. A search
needs a validation split (``dataset.val_fraction > 0``) and refuses to start without one.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from pipeline.engine.loop import StopTraining
from pipeline.paths import project_root

log = logging.getLogger(__name__)

#: The metric reported to the pruner and returned as the objective: the validation loss,
#: so that the test split stays an honest estimate of the best trial.
OBJECTIVE = "val/loss"
#: Trial attribute a pruned job leaves for the search: the epoch it stopped at.
PRUNED_ATTR = "pruned_at_epoch"
#: Name of the journal file of the default storage, beside the MLflow store.
JOURNAL_NAME = "optuna.journal"
#: The sweeper's class, as Hydra's config names it (how a job knows it is a trial).
SWEEPER_TARGET = "hydra_plugins.backprop_optuna_sweeper.optuna_sweeper.OptunaSweeper"

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- storage


def storage_location(setting: str | None, tracking_uri: str | None) -> str | None:
    """Where the study lives: None (in memory), an RDB URL, or a journal file's path.

    ``auto`` puts a journal file beside the MLflow store: next to ``mlflow.db`` for an
    SQLite store, else at the project root. A journal file is Optuna's storage for several
    processes on one machine or a shared file system (it locks the file for each write);
    SQLite would also work here, but its locks are the weaker choice for parallel workers.
    """
    if setting is None or str(setting).lower() in ("", "none", "null", "memory"):
        return None
    setting = str(setting)
    if setting != "auto":
        return setting if "://" in setting else str(Path(setting).expanduser().resolve())
    folder = project_root()
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
        if db and db != ":memory:":
            folder = Path(db).resolve().parent
    return str(folder / JOURNAL_NAME)


def open_storage(location: str | None) -> optuna.storages.BaseStorage | None:
    """The Optuna storage of a :func:`storage_location` (None: a new in-memory study)."""
    if location is None:
        return None
    if "://" in location:
        return optuna.storages.RDBStorage(location)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(location).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(location))


def dashboard_command(location: str | None) -> str | None:
    """The ``optuna-dashboard`` command that opens the study's storage."""
    # optuna-dashboard tells a journal file from an SQLite file by its first bytes.
    return None if location is None else f"optuna-dashboard {location}"


# ------------------------------------------------------------------------ search space


def search_space(arguments: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Split sweep overrides into Optuna distributions and fixed overrides.

    ``choice(a, b)`` and a shuffled ``range`` become categorical; ``range(a, b, step=s)``
    the same values as Hydra's range (integers, or stepped floats); ``interval(a, b)`` a
    uniform float and ``tag(log, interval(a, b))`` a log-uniform one. A plain ``key=value``
    is the same for every trial.
    """
    distributions: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(override.input_line or f"{key}={override.get_value_element_as_str()}")
            continue
        distributions[key] = _distribution(override)
    return distributions, fixed


def _distribution(override: Override) -> BaseDistribution:
    value = override.value()
    key = override.get_key_element()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())  # Hydra's range excludes its stop
        kind = FloatDistribution if any(isinstance(v, float) for v in values) else IntDistribution
        return kind(values[0], values[-1], step=value.step)
    if override.is_interval_sweep():  # Hydra's intervals are always of floats
        return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
    raise ValueError(f"hydra.sweeper.params.{key}={override.input_line}: use choice(...), "
                     "range(...), interval(a, b) or tag(log, interval(a, b))")


def grid_of(distributions: Mapping[str, BaseDistribution]) -> dict[str, list]:
    """Every value of a discrete search space, for the grid sampler."""
    grid = {}
    for key, dist in distributions.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, (IntDistribution, FloatDistribution)) and dist.step is not None:
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[key] = [dist.low + i * dist.step for i in range(count)]
        else:
            raise ValueError(f"hydra.sweeper.params.{key}: the grid sampler needs choice(...) "
                             "or range(...), not an interval")
    return grid


def _override(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


# ---------------------------------------------------------------------------- the search


def run_search(launcher: Any, config: DictConfig, arguments: Sequence[str], *, sampler: Any,
               pruner: Any, direction: str, study_name: str, storage: str | None,
               n_trials: int, n_jobs: int, max_failure_rate: float, report_every: int,
               params: Mapping[str, str] | None, trial: int | None = None) -> dict:
    """Run ``n_trials`` more trials of the study; returns the summary it writes."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"hydra.sweeper.direction={direction!r}: minimize or maximize")
    if not 0.0 <= max_failure_rate <= 1.0:
        raise ValueError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: between 0 and 1")
    for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs),
                       ("report_every", report_every)):
        if value < 1:
            raise ValueError(f"hydra.sweeper.{key}={value}: must be >= 1")
    if not (config.get("dataset") or {}).get("val_fraction"):
        raise ValueError("dataset.val_fraction=0: a search selects on the validation loss; "
                         "set dataset.val_fraction > 0 (it never selects on the test split)")
    space_args = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    distributions, fixed = search_space(space_args)
    if isinstance(sampler, Callable) and not isinstance(sampler, optuna.samplers.BaseSampler):
        grid = grid_of(distributions)  # the grid sampler, still waiting for its grid
        sampler = sampler(grid)
        n_trials = min(n_trials, math.prod(len(v) for v in grid.values()))

    location = storage_location(storage, store_uri(config.get("tracking") or {}))
    study = optuna.create_study(study_name=study_name, storage=open_storage(location),
                                sampler=sampler, pruner=pruner, direction=direction,
                                load_if_exists=True)
    before = len(study.trials)
    where = location or "memory (not kept: hydra.sweeper.storage=null)"
    print(f"search: study {study_name!r} in {where}: {before} trials so far, adding {n_trials} "
          f"({type(sampler).__name__}, {type(pruner).__name__})", flush=True)
    if location is None and not isinstance(pruner, optuna.pruners.NopPruner):
        print("search: an in-memory study cannot prune trials run in other processes; "
              "set hydra.sweeper.storage", file=sys.stderr)

    job_idx, failures, done = 0, 0, 0
    while done < n_trials:
        batch = [study.ask(distributions) for _ in range(min(n_jobs, n_trials - done))]
        overrides = [
            tuple(_override(k, v) for k, v in t.params.items()) + tuple(fixed)
            + (f"hydra.sweeper.trial={t.number}",)
            for t in batch
        ]
        returns = launcher.launch(overrides, initial_job_idx=job_idx)
        job_idx += len(returns)
        stored = {t.number: t for t in study.get_trials(deepcopy=False)}
        batch_failures = 0
        for asked, ret in zip(batch, returns, strict=True):
            state, value = _outcome(ret, stored.get(asked.number))
            _tell(study, asked, state, value)
            batch_failures += state == TrialState.FAIL
        failures += batch_failures
        done += len(batch)
        if batch_failures / len(batch) > max_failure_rate:
            raise RuntimeError(
                f"search stopped: {batch_failures} of {len(batch)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={max_failure_rate} (set it to 1.0 to go on "
                "whatever fails)")

    summary = _summary(study, location, before)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
    _print_summary(summary)
    _log_figures(study)
    return summary


def store_uri(trk: Mapping[str, Any]) -> str | None:
    """The MLflow store of a ``tracking`` config section (the study's storage sits beside)."""
    from pipeline.tracking.stores import resolve_tracking_uri

    kind = str(trk.get("kind", "local"))
    return resolve_tracking_uri("local" if kind == "none" else kind, trk.get("uri"))


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState,
          value: float | None) -> None:
    try:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state,
                   skip_if_finished=True)
    except RuntimeError as exc:
        # The grid sampler calls study.stop() once its grid is used up, which Optuna allows
        # only inside study.optimize(); the trial's result is stored all the same.
        if not (isinstance(study.sampler, optuna.samplers.GridSampler) and "stop" in str(exc)):
            raise


def _outcome(ret: Any, stored: optuna.trial.FrozenTrial | None) -> tuple[TrialState, float | None]:
    if ret.status != JobStatus.COMPLETED:
        return TrialState.FAIL, None
    if stored is not None and PRUNED_ATTR in stored.user_attrs:
        return TrialState.PRUNED, None
    value = ret.return_value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None
    return (TrialState.COMPLETE, value) if math.isfinite(value) else (TrialState.FAIL, None)


def _summary(study: optuna.Study, location: str | None, before: int) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    summary: dict[str, Any] = {
        "name": "optuna", "study_name": study.study_name, "storage": location,
        "trials": len(trials), "new_trials": len(trials) - before, **counts,
        "dashboard": dashboard_command(location),
    }
    if counts["complete"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    return summary


def _print_summary(summary: Mapping[str, Any]) -> None:
    print(f"search: {summary['trials']} trials in the study ({summary['new_trials']} new): "
          f"{summary['complete']} complete, {summary['pruned']} pruned, {summary['fail']} failed")
    if "best_trial" in summary:
        print(f"search: best trial #{summary['best_trial']}: {OBJECTIVE} "
              f"{summary['best_value']:.4g} with {summary['best_params']}")
    if summary["dashboard"]:
        print(f"search: watch it with: {summary['dashboard']}", flush=True)


def _log_figures(study: optuna.Study) -> None:
    """Optuna's history, importances, parallel coordinates and learning curves, on the parent."""
    from pipeline.app.sweep import launching_context

    context = launching_context()
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if context is None or len(trials) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    from pipeline.tracking.tracker import RunTracker

    figures: list[tuple[str, Callable[[], Any]]] = [
        ("history", lambda: views.plot_optimization_history(study)),
        ("parallel_coordinates", lambda: views.plot_parallel_coordinate(study)),
    ]
    if not isinstance(study.pruner, optuna.pruners.NopPruner):  # the curves it decided on
        figures.append(("intermediate_values", lambda: views.plot_intermediate_values(study)))
    if len({k for t in trials for k in t.params}) > 1:
        figures.append(("param_importances", lambda: views.plot_param_importances(study)))
    tracker = RunTracker.attach(context.tracking_uri, context.parent_run_id)
    try:
        for name, draw in figures:
            try:
                with warnings.catch_warnings():  # "experimental" since Optuna 2.2, every call
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    axes = draw()
            except (ValueError, RuntimeError) as exc:  # too few trials for this view
                log.info("optuna figure %s skipped: %s", name, exc)
                continue
            fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            tracker.log_figure(fig, f"sweep/optuna/{name}.png", dpi=100)
            plt.close(fig)
    finally:
        tracker.detach()


# ----------------------------------------------------------------------------- a trial


class TrialReporter:
    """A training callback that reports a trial's loss to its study and obeys the pruner.

    ``reporter(epoch, metrics)`` every ``every`` epochs: :meth:`optuna.Trial.report` of
    the objective metric, then :meth:`optuna.Trial.should_prune`; when pruned it records
    the epoch on the trial and raises :class:`StopTraining`, which ends training like an
    early stop (the run itself finishes normally, with :meth:`run_tags` saying why).
    """

    def __init__(self, trial: optuna.Trial, every: int, metric: str = OBJECTIVE) -> None:
        self.trial = trial
        self.every = every
        self.metric = metric
        self.pruned_epoch: int | None = None
        self._last = 0

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or epoch - self._last < self.every or not math.isfinite(value):
            return
        self._last = epoch
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.pruned_epoch = epoch
            self.trial.set_user_attr(PRUNED_ATTR, epoch)
            print(f"trial #{self.trial.number} pruned at epoch {epoch}: {self.metric} "
                  f"{value:.4f} is not promising beside the earlier trials", flush=True)
            raise StopTraining(f"pruned by Optuna at epoch {epoch}")

    def run_tags(self) -> dict[str, str]:
        tags = {"sweep.trial": str(self.trial.number),
                "sweep.trial_state": "complete" if self.pruned_epoch is None else "pruned"}
        if self.pruned_epoch is not None:
            tags["sweep.pruned_epoch"] = str(self.pruned_epoch)
        return tags


def trial_reporter(sweeper: Mapping[str, Any], tracking_uri: str | None) -> TrialReporter | None:
    """The reporter of the trial a job runs (``hydra.sweeper`` of the job's config), or None.

    None outside an Optuna search, and for a study in memory: another process cannot reach
    it (the basic launcher's jobs could, but they would then prune differently from the
    same search run in parallel).
    """
    if str(sweeper.get("_target_")) != SWEEPER_TARGET or sweeper.get("trial") is None:
        return None
    location = storage_location(sweeper.get("storage"), tracking_uri)
    if location is None:
        return None
    from hydra.utils import instantiate

    storage = open_storage(location)
    study = optuna.load_study(study_name=str(sweeper["study_name"]), storage=storage,
                              pruner=instantiate(sweeper["pruner"]))
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(sweeper["trial"]))
    return TrialReporter(optuna.trial.Trial(study, trial_id), int(sweeper["report_every"]))
