"""Hydra sweeps as one MLflow parent run with every job a nested child run, and a report.

Registered in ``conf/config.yaml`` (Hydra's callback API, ``hydra.callbacks``)::

    hydra:
      callbacks:
        mlflow_sweep:
          _target_: pipeline.app.sweep.MlflowSweepCallback

What happens, by Hydra event (``hydra.experimental.callback.Callback``):

``on_multirun_start`` (the launching process, before the sweeper and launcher exist)
    Resolve the tracking store, create it and the experiment once, start the parent run
    (named after the sweep; params: the base config with each swept key holding its sweep
    spec; tags: the overrides, the swept keys and their values). The ids are kept on the
    callback as a :class:`SweepContext`. Jobs started at once never race to create the store
    or the experiment, and never look the experiment up by name.
``on_job_start`` (the job's own process: the same one for the basic launcher, a joblib
    worker, a submitit job, a Ray worker)
    Hydra hands every launcher the callback (pickled, with its context), so the job sees
    the context here and publishes it for :func:`pipeline.app.job.main` (:func:`current_context`),
    which nests the job's run under the parent, in the parent's experiment.
``on_job_end`` (the job's process)
    A job that raised (a bad value caught by validation, divergence, any exception) is
    recorded as a FAILED child with tag ``failure_reason`` and its traceback as an artifact,
    logged, and handed back to the sweeper as a completed job returning None: the other jobs
    run, the sweep's report is made, and an Optuna trial is marked failed (None is not a
    number) rather than ending the study.
``on_multirun_end`` (the launching process)
    Build the report from MLflow (:mod:`pipeline.viz.report`): summary table, heatmaps, decision
    boundaries; attach it to the parent, tag the best run on parent and child, end the
    parent (FAILED if any job failed), print the table, and exit with status 1 if any job
    failed.

Hydra is imported by ``train.py`` and the edge's modules only (this one, :mod:`pipeline.app.cli`,
:mod:`pipeline.app.config`, :mod:`pipeline.app.process`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.app import process

# pipeline.viz.report (pandas, matplotlib) is imported only when a sweep needs it: Hydra builds
# this callback for single runs too, which must fail fast on a bad config.

log = logging.getLogger(__name__)

#: Exit status of a sweep in which at least one job failed (Hydra's own for errors).
EXIT_JOB_FAILED = 1
#: Longest tag value the parent gets for ``sweep.params`` before it moves to an artifact.
_MAX_TAG = 5000


@dataclass(frozen=True)
class SweepContext:
    """What a job of a tracked sweep needs: where to log, and under which parent.

    Plain strings, so it pickles to any launcher's workers with the callback.
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    name: str
    sweep_dir: str


_current: SweepContext | None = None


def current_context() -> SweepContext | None:
    """The sweep the running job belongs to (set by ``on_job_start``), or None."""
    return _current


def launching_context() -> SweepContext | None:
    """The sweep this process is launching (its parent run), or None: for the sweeper."""
    return _launching.context if _launching is not None else None


def _set_current(context: SweepContext | None) -> None:
    global _current
    _current = context


# ------------------------------------------------------------------- what is swept


def swept_params(config: DictConfig) -> list:
    """The keys a multirun sweeps, in Hydra's order, with their values where enumerable.

    Like Hydra's basic sweeper: ``hydra.sweeper.params`` first, then the command line; a
    later override of the same key wins but keeps the key's first position. Choice and range
    sweeps list their values; interval sweeps (Optuna) keep only their spec.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.viz import report as rep

    items = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {})
             .items() if v is not None]
    items += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    parser = OverridesParser.create()
    last: dict[str, Any] = {}
    for item, override in zip(items, parser.parse_overrides(items), strict=True):
        last[override.key_or_group] = (item.split("=", 1)[1], override)
    out = []
    for key, (spec, override) in last.items():
        if not override.is_sweep_override():
            continue
        values = None
        if override.is_choice_sweep() or override.is_range_sweep():
            try:
                values = [_plain(v) for v in override.sweep_iterator()]
            except Exception:  # glob sweeps and the like: keep the spec only
                values = None
        out.append(rep.SweptParam(key=key, spec=spec, values=values))
    return out


def _task_dict(config: DictConfig, resolve: bool = True) -> dict[str, Any]:
    """The task's config as plain values, without the ``hydra`` node (whose job fields are
    not resolvable outside a job)."""
    return {
        str(k): OmegaConf.to_container(config[k], resolve=resolve)
        if OmegaConf.is_config(config[k]) else config[k]
        for k in config if k != "hydra"
    }


def _plain(value: Any) -> Any:
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_PLUGINS = (  # substring of a sweeper's or launcher's _target_ -> the name users type
    ("basic_sweeper", "basic"), ("basic_launcher", "basic"), ("optuna", "optuna"),
    ("joblib", "joblib"), ("SlurmLauncher", "submitit_slurm"),
    ("LocalLauncher", "submitit_local"), ("ray", "ray"), ("nevergrad", "nevergrad"),
    ("ax_sweeper", "ax"),
)


def _short(target: Any) -> str:
    """``hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper`` -> ``optuna``."""
    text = str(target or "")
    return next((name for part, name in _PLUGINS if part in text), text or "unknown")


def sweep_name(config: DictConfig, params: list) -> str:
    """``sweep-width_x_lr-20240101-120000``: the preset's name, or the swept keys."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    label = choices.get("sweep") if hasattr(choices, "get") else None
    if not label:
        label = "_x_".join(p.key.lstrip("+~").rsplit(".", 1)[-1] for p in params) or "sweep"
    return f"sweep-{label}-{time.strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------ callback


class MlflowSweepCallback(Callback):
    """One MLflow parent run per Hydra multirun; see the module docstring.

    Parameters
    ----------
    report : bool
        Build and attach the report at the end of the sweep.
    boundaries : bool
        Include the decision-boundary panels (downloads every child's model).
    best_metric, best_mode : str
        What "best run" means (default: lowest final test loss, the task's objective).
    fail_exit : bool
        Exit with status 1 at the end of a sweep in which a job failed.
    """

    def __init__(self, report: bool = True, boundaries: bool = True,
                 best_metric: str = "val/loss", best_mode: str = "min",
                 fail_exit: bool = True) -> None:
        self.report = report
        self.boundaries = boundaries
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.fail_exit = fail_exit
        self.context: SweepContext | None = None
        self._parent = None  # RunTracker of the parent: launching process only
        self._started = 0.0
        self._sweep_dir: str | None = None
        self._guard: _InterruptGuard | None = None  # launching process, joblib only

    def __getstate__(self) -> dict[str, Any]:
        # Launchers pickle the callback to their workers: the context goes, the parent's
        # tracker (a client and an exit hook) stays in the launching process.
        state = dict(self.__dict__)
        state["_parent"] = None
        state["_guard"] = None
        return state

    # ------------------------------------------------------------------ multirun

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _launching
        _launching = self
        self._started = time.perf_counter()
        self._sweep_dir = str(OmegaConf.select(config, "hydra.sweep.dir"))
        self.context = None
        with contextlib.suppress(OSError):  # left by an interrupted sweep in the same folder
            Path(self._sweep_dir, INTERRUPTED_MARK).unlink(missing_ok=True)
        node = OmegaConf.select(config, "hydra.launcher")
        launcher = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        in_workers = launcher.get("_target_") == process.JOBLIB_LAUNCHER
        process.prewarm_joblib_workers(launcher)
        self._guard = _InterruptGuard.install(self._sweep_dir) if in_workers else None
        trk = OmegaConf.select(config, "tracking")
        tracked = trk is not None and trk.get("kind", "none") != "none"
        try:
            if tracked:
                self._start_tracked(config, in_workers)
            else:
                log.info("sweep: tracking is off (tracking=none); no parent run")
            if launcher.get("_target_") == process.BASIC_LAUNCHER and process.paused():
                # The jobs run in this process: import what they need before the heap is
                # frozen, which the first job would otherwise do with collection on.
                process.import_job_modules(tracked)
        finally:
            # train.py paused collection for the imports (pipeline.app.process); a sweep
            # that runs for hours must collect what its jobs leave behind.
            process.settle()

    def _start_tracked(self, config: DictConfig, in_workers: bool) -> None:
        try:
            self.context = self._start_parent(config)
        except Exception as e:
            # Before any job: a sweep that cannot be tracked stops here, clearly.
            print(f"sweep: cannot start the sweep's MLflow parent run: {e}", file=sys.stderr)
            raise SystemExit(EXIT_JOB_FAILED) from e
        if in_workers and self.report:
            # This process waits idle while joblib's workers run the jobs: import what the
            # report draws with meanwhile (with the basic launcher the jobs import it here).
            threading.Thread(target=_import_report_modules, name="report-imports",
                             daemon=True).start()

    def _start_parent(self, config: DictConfig) -> SweepContext:
        from pipeline.app.config import project_root
        from pipeline.app.job import git_commit
        from pipeline.tracking import tracker as tracking
        from pipeline.viz import report as rep

        trk = config.tracking
        uri = tracking.resolve_tracking_uri(str(trk.kind), trk.get("uri"))
        tracking.check_reachable(uri)
        experiment_id = tracking.prepare_experiment(uri, str(trk.experiment))
        params = swept_params(config)
        name = sweep_name(config, params)
        base = _task_dict(config)
        flat = tracking.flatten_config(base)
        for p in params:  # the parent holds the sweep, not the base values it replaces
            flat[p.key.lstrip("+~")] = p.spec
        params_json = json.dumps([p.to_dict() for p in params], default=str)
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        tags = {
            rep.TAG_ROLE: "parent",
            rep.TAG_NAME: name,
            rep.TAG_PARAMS: params_json if len(params_json) <= _MAX_TAG
            else "(see sweep/params.json)",
            rep.TAG_SWEEPER: _short(OmegaConf.select(config, "hydra.sweeper._target_")),
            "sweep.launcher": _short(OmegaConf.select(config, "hydra.launcher._target_")),
            "sweep.dir": self._sweep_dir,
            "overrides": " ".join(overrides) or "(defaults)",
        }
        commit = git_commit(project_root())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        spool = Path(self._sweep_dir) / "spool"
        parent = tracking.RunTracker(uri, spool_root=spool)
        parent.start(experiment_id, name, params=flat, tags=tags)
        parent.log_dict({"params": [p.to_dict() for p in params], "overrides": overrides},
                        "sweep/params.json")
        self._parent = parent
        print(f"sweep {name}: MLflow parent run {parent.run_id} in experiment {experiment_id} "
              f"({uri})", flush=True)
        return SweepContext(tracking_uri=uri, experiment_id=str(experiment_id),
                            parent_run_id=parent.run_id, name=name,
                            sweep_dir=self._sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _launching
        _launching = None
        if self._guard is not None:
            self._guard.restore()
        seconds = time.perf_counter() - self._started
        # Every job is done: let joblib's workers exit (each tears its interpreter down,
        # about a second with MLflow loaded) while this process builds the report.
        process.close_joblib_workers(
            str(OmegaConf.select(config, "hydra.launcher._target_") or ""))
        if self.context is None:
            failed = _failed_from_files(self._sweep_dir)
            self._finish(failed, seconds)
            return
        report = None
        try:
            report = self._report()
            failed = [(f"#{r['job']} {r['run_name']}", r["failure_reason"] or r["status"])
                      for _, r in report.failed.iterrows()]
            n_jobs = len(report.table)
        except Exception as e:  # the report is a bonus; the parent must still end
            log.exception("sweep report failed")
            print(f"sweep: could not build the report: {e}", file=sys.stderr)
            failed, n_jobs = _failed_children(self.context)
        missing = _expected_jobs(config) - n_jobs
        if missing > 0:  # jobs that never reached MLflow (store down in the worker?)
            failed.append((f"{missing} job(s)", "left no run in MLflow; see the jobs' logs in "
                           f"{self._sweep_dir}"))
        parent = self._parent
        if parent is not None:
            parent.log_metrics({"sweep/seconds": seconds})
            if failed:
                parent.end("FAILED", f"{len(failed)} of {max(n_jobs, len(failed))} jobs "
                           "failed: " + "; ".join(f"{j}: {r}" for j, r in failed)[:2000])
            else:
                parent.end("FINISHED")
        if report is not None:
            print(f"\nsweep {self.context.name}: {len(report.table)} jobs, {len(failed)} failed, "
                  f"{seconds:.1f} s")
            print(report.summary())
            from pipeline.tracking import tracker as tracking

            print(f"report: artifacts sweep/ of parent run {self.context.parent_run_id}; "
                  f"rebuild with: python -m pipeline.report --experiment "
                  f"{_quote(str(config.tracking.experiment))} --sweep "
                  f"{self.context.parent_run_id}")
            print(f"view it: {tracking.ui_command(self.context.tracking_uri)}", flush=True)
        self._finish(failed, seconds, printed=report is not None)

    def _report(self):
        from pipeline.viz import report as reporting

        ctx = self.context
        assert ctx is not None
        _close_orphans(ctx)
        result = reporting.build_report(
            ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id,
            best_metric=self.best_metric, best_mode=self.best_mode,
            boundaries=self.report and self.boundaries,
        )
        if self.report:
            reporting.log_report(ctx.tracking_uri, ctx.parent_run_id, result, tracker=self._parent)
            try:  # a copy next to Hydra's outputs, for a quick look without the UI
                result.save(Path(ctx.sweep_dir) / "report")
            except OSError as e:
                log.warning("could not save the report in %s: %s", ctx.sweep_dir, e)
        return result

    def _finish(self, failed: list[tuple[str, str]], seconds: float,
                printed: bool = False) -> None:
        if not failed:
            return
        lines = "\n".join(f"  {job}: {reason}" for job, reason in failed)
        print(f"sweep: {len(failed)} job(s) failed (the others ran and are recorded):\n{lines}",
              file=sys.stderr, flush=True)
        if self.fail_exit:
            raise SystemExit(EXIT_JOB_FAILED)

    # ------------------------------------------------------------------------ jobs

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _job_sweep_dir
        _job_sweep_dir = self._sweep_dir
        _set_current(self.context)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return  # a single run: errors propagate as usual
        if job_return.status != JobStatus.FAILED:
            return
        # The stored exception itself: reading .return_value would re-raise it (and print
        # Hydra's "Error executing job" line).
        error = job_return._return_value
        reason = _reason(error)
        num = OmegaConf.select(config, "hydra.job.num")
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        from pipeline.app.config import ConfigError

        expected = isinstance(error, ConfigError) or _is_divergence(error)
        # Joblib and submitit workers keep a job's traceback to themselves: say it here (the
        # job's log) and on the child run; expected failures need no traceback.
        log.error("job #%s (%s) failed: %s%s", num, " ".join(overrides), reason,
                  "" if expected else "\n" + text)
        run_id = None
        if self.context is not None:
            try:
                run_id = _record_failure(self.context, config, num, overrides, reason, text)
            except Exception as e:  # the store is down too: the job's log has it all
                log.error("job #%s: could not record the failure in MLflow: %s", num, e)
        out = OmegaConf.select(config, "hydra.runtime.output_dir")
        if out:
            try:
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / "result.json").write_text(json.dumps(
                    {"status": "FAILED", "run_id": run_id, "reason": reason}, indent=1))
            except OSError:
                pass
        # Handled: the sweeper goes on with the other jobs, and on_multirun_end (which
        # Hydra skips when a job's error is re-raised) makes the report and the exit status.
        job_return.status = JobStatus.COMPLETED
        job_return.return_value = None


# -------------------------------------------------------------------------- helpers


def _reason(error: BaseException) -> str:
    from pipeline.app.config import ConfigError

    if isinstance(error, ConfigError):
        return f"config error: {error}"
    text = " ".join(str(error).split())
    name = type(error).__name__
    if name == "RunFailed":  # already "loss became inf at epoch 3; try a smaller ..."
        return text
    return f"{name}: {text}" if text else name


def _is_divergence(error: BaseException) -> bool:
    from pipeline.engine.loop import DivergenceError

    return isinstance(error, DivergenceError) or isinstance(error.__cause__, DivergenceError)


def _record_failure(ctx: SweepContext, config: DictConfig, num: Any, overrides: list[str],
                    reason: str, text: str) -> str:
    """Mark the job's child run FAILED (creating it if the job failed before it started)."""
    from pipeline.tracking import tracker as tracking
    from pipeline.viz import report as rep

    found = tracking.search_runs(
        ctx.tracking_uri, [ctx.experiment_id],
        f"tags.{rep.PARENT_TAG} = '{ctx.parent_run_id}' and tags.`{rep.TAG_JOB}` = '{num}'")
    if not found.empty:
        run_id = str(found.iloc[0]["run_id"])
        child = tracking.RunTracker.attach(ctx.tracking_uri, run_id)
        child.log_text(text, "error/traceback.txt")
        child.end("FAILED", reason)
        return run_id
    try:
        task = _task_dict(config)
    except Exception:  # an interpolation that does not resolve may be the error itself
        task = _task_dict(config, resolve=False)
    try:
        from pipeline.app.config import run_name

        name = run_name(config)
    except Exception:
        name = f"job-{num}"
    child = tracking.RunTracker(ctx.tracking_uri,
                                spool_root=Path(ctx.sweep_dir) / "spool")
    child.start(ctx.experiment_id, name, params=task,
                tags={"overrides": " ".join(overrides) or "(defaults)", rep.TAG_JOB: str(num),
                      rep.TAG_NAME: ctx.name},
                parent_run_id=ctx.parent_run_id)
    child.log_text(text, "error/traceback.txt")
    child.end("FAILED", reason)
    return child.run_id


def _close_orphans(ctx: SweepContext,
                   reason: str = "the job ended without ending its run (worker killed?)"
                   ) -> int:
    """Children still RUNNING once every job has returned were abandoned (a worker killed
    hard): end them KILLED so that nothing stays RUNNING forever. Returns how many."""
    from pipeline.tracking import tracker as tracking
    from pipeline.viz import report as rep

    runs = tracking.search_runs(ctx.tracking_uri, [ctx.experiment_id],
                                f"tags.{rep.PARENT_TAG} = '{ctx.parent_run_id}' "
                                "and attributes.status = 'RUNNING'")
    for run_id in runs.get("run_id", []):
        child = tracking.RunTracker.attach(ctx.tracking_uri, str(run_id))
        child.end("KILLED", reason)
    return len(runs)


#: The callback of the sweep this process launches, while it runs (for :func:`interrupted`).
_launching: MlflowSweepCallback | None = None


def interrupted(signal_name: str) -> None:
    """End the sweep this process launches after Ctrl-C or SIGTERM stopped it.

    Hydra calls no callback then. Jobs in this process (the basic launcher) have ended
    their own runs KILLED already; joblib kills its workers as soon as the interrupt
    reaches it, so the runs they were training are ended KILLED here, with what they had
    sent. Then the parent. Never raises: the process is on its way out.
    """
    global _launching
    callback, _launching = _launching, None
    if callback is not None and callback._guard is not None:
        callback._guard.restore()
    if callback is None or callback.context is None:
        return
    reason = f"the sweep was interrupted ({signal_name}) while the job ran"
    try:
        _close_orphans(callback.context, reason)
    except Exception as e:
        log.warning("sweep: could not end the interrupted jobs' runs: %s", e)
    parent = callback._parent
    if parent is not None and parent.active:
        try:
            parent.end("KILLED", f"interrupted ({signal_name})")
        except Exception as e:
            log.warning("sweep: could not end the parent run: %s", e)


def _failed_children(ctx: SweepContext) -> tuple[list[tuple[str, str]], int]:
    """(failed jobs, number of jobs) straight from the children's statuses."""
    from pipeline.tracking import tracker as tracking
    from pipeline.viz import report as rep

    runs = tracking.search_runs(ctx.tracking_uri, [ctx.experiment_id],
                                f"tags.{rep.PARENT_TAG} = '{ctx.parent_run_id}'")
    failed = []
    for _, r in runs.iterrows():
        if r["status"] != rep.OK_STATUS:
            reason = r.get("tags.failure_reason")
            failed.append((str(r.get("tags.mlflow.runName")),
                           reason if isinstance(reason, str) else r["status"]))
    return failed, len(runs)


def _expected_jobs(config: DictConfig) -> int:
    """How many jobs the basic sweeper launches (the product of the value counts); 0 when
    not known in advance (other sweepers)."""
    if _short(OmegaConf.select(config, "hydra.sweeper._target_")) != "basic":
        return 0
    n = 1
    for p in swept_params(config):
        if p.values is None:
            return 0
        n *= len(p.values)
    return n


def _failed_from_files(sweep_dir: str | None) -> list[tuple[str, str]]:
    """Failed jobs of an untracked sweep, from the ``result.json`` each job leaves."""
    from pipeline.viz import report as rep

    if not sweep_dir or not Path(sweep_dir).is_dir():
        return []
    failed = []
    for path in sorted(Path(sweep_dir).glob("*/result.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("status") not in (rep.OK_STATUS, None):
            failed.append((f"#{path.parent.name}", data.get("reason") or data["status"]))
    return failed


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


__all__ = ["MlflowSweepCallback", "SweepContext", "current_context", "swept_params"]


def _import_report_modules() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import pipeline.tracking.model_files  # noqa: F401
        import pipeline.viz.plots  # noqa: F401
    except Exception as e:  # the report imports them again and says what fails
        log.debug("sweep: report imports failed: %s", e)


#: File in the sweep directory that tells workers not to start another job.
INTERRUPTED_MARK = ".interrupted"
#: The sweep directory of the job running in this process (set by ``on_job_start``).
_job_sweep_dir: str | None = None


def launcher_interrupted() -> bool:
    """In a sweep's job: whether the launching process was interrupted and is waiting for
    the running jobs to end their runs (:class:`_InterruptGuard`). Such a job returns
    quietly instead of raising: joblib kills every worker as soon as one job raises,
    including those still ending their runs."""
    return bool(_job_sweep_dir) and os.path.exists(
        os.path.join(str(_job_sweep_dir), INTERRUPTED_MARK))


class _InterruptGuard:
    """Ctrl-C and SIGTERM in the process that launches a joblib sweep.

    Left alone, the interrupt reaches joblib, which kills its workers on the spot: the
    runs they train lose every metric not sent yet (up to ``flush_every_s`` of them) and
    stay RUNNING until :func:`interrupted` ends them. Instead the first signal marks the
    sweep interrupted (no worker starts another job), passes the signal on to workers
    that did not get it (those forked from our fork server lead their own process group,
    out of the terminal's reach), and waits up to ``grace_s`` for the jobs' runs to end
    the way an interrupted run ends (KILLED, with its metrics and plots); then it raises
    :class:`pipeline.app.job.Interrupted` and joblib stops the rest. A second signal raises
    at once (and reaches the workers, which then stop at once too).
    """

    def __init__(self, sweep_dir: str | None, grace_s: float = 15.0) -> None:
        self.sweep_dir = sweep_dir
        self.grace_s = grace_s
        self.signalled = False
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls, sweep_dir: str | None) -> _InterruptGuard | None:
        """Handle SIGINT and SIGTERM from now on (POSIX, main thread; else None)."""
        import signal

        if os.name != "posix" or threading.current_thread() is not threading.main_thread():
            return None
        guard = cls(sweep_dir)
        for signum in (signal.SIGINT, signal.SIGTERM):
            guard._previous[signum] = signal.signal(signum, guard._handle)
        return guard

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        import signal

        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        from pipeline.app.job import Interrupted

        if self.signalled:
            self._forward(signum)
            raise Interrupted(signum)
        self.signalled = True
        if self.sweep_dir:
            try:
                Path(self.sweep_dir, INTERRUPTED_MARK).touch()
            except OSError:
                pass
        self._forward(signum)
        context = _launching.context if _launching is not None else None
        if context is not None:
            print("interrupted: waiting for the running jobs to end their runs "
                  "(again to stop at once)", file=sys.stderr, flush=True)
            self._wait_for_jobs(context)
        raise Interrupted(signum)

    def _forward(self, signum: int) -> None:
        own_group = os.getpgrp()
        for pid in process.joblib_worker_pids():
            try:
                if os.getpgid(pid) != own_group:  # else the terminal reached it already
                    os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def _wait_for_jobs(self, context: SweepContext) -> None:
        from pipeline.tracking import tracker as tracking
        from pipeline.viz import report as rep

        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            try:
                running = tracking.search_runs(
                    context.tracking_uri, [context.experiment_id],
                    f"tags.{rep.PARENT_TAG} = '{context.parent_run_id}' "
                    "and attributes.status = 'RUNNING'")
            except Exception:  # the store is gone: nothing to wait for
                return
            if running.empty:
                return
            time.sleep(0.2)
