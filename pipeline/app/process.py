"""How the ``train.py`` process (and a joblib sweep's workers) are tuned: all of it here.

Nothing in the library depends on this module; it only makes the command start, run
and exit faster. Each mechanism stays because ``benchmarks/bench_run.py`` shows that it
pays for itself on an idle two-core machine and with one core busy (see
``benchmarks/README.md``); each can be switched off for that comparison:

- **The garbage collector paused while the process imports** (``BACKPROP_GC_PAUSE=0``
  turns it off). A run imports Hydra, scikit-learn, matplotlib and MLflow: a few hundred
  thousand objects that live as long as the process. The heap's growth during those
  imports triggers full collections again and again, each traversing all of them.
  :func:`start` stops automatic collection; :func:`settle`, once the imports are done,
  moves everything alive out of the collector's reach (``gc.freeze``) and turns
  collection back on, so it only sees the objects the run itself creates.
- **No interpreter teardown** (``BACKPROP_FAST_EXIT=0``): :func:`exit` leaves with
  ``os._exit`` once exit hooks have run and the output is flushed, instead of tearing down
  every loaded module (a second or so with MLflow and matplotlib loaded). Only when
  nothing is left that needs the normal shutdown (see :func:`exit`).
- **A joblib sweep's workers forked warm** (``BACKPROP_PREWARM=0``): the workers start
  as soon as the sweep does, forked from a fork server that imported what jobs need once
  (:func:`prewarm_joblib_workers`), instead of each importing it all before its first job.

A tracking-service process (MLflow in a child process while the run trains) and MLflow's
asynchronous logging were measured the same way and did not pay (the tracker already
sends a default run's metrics in one batch); neither is used.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def _enabled(switch: str) -> bool:
    return os.environ.get(switch) != "0"


# ------------------------------------------------------------------- garbage collector

_paused = False


def start() -> None:
    """Stop automatic collection while the process imports what it needs (first thing
    ``train.py`` does)."""
    global _paused
    if _enabled("BACKPROP_GC_PAUSE"):
        _paused = True
        gc.disable()


def settle() -> None:
    """Freeze what is alive now and turn collection back on (once, after :func:`start`).

    Does nothing in a process that did not call :func:`start`: an interactive session
    keeps its collector as it is.
    """
    global _paused
    if not _paused:
        return
    _paused = False
    gc.freeze()
    gc.enable()


def paused() -> bool:
    """Whether :func:`start` is in effect."""
    return _paused


def import_job_modules(tracked: bool = True) -> None:
    """Import what every job needs: scikit-learn's generators, matplotlib (Agg), the job
    and its plots, and MLflow's SQL store when the jobs are tracked (then :func:`settle`
    leaves them out of the collector's reach)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from PIL import Image

    import pipeline.app.job  # noqa: F401
    import pipeline.viz.plots  # noqa: F401
    from pipeline.data.datasets import make_dataset

    Image.init()  # Pillow's image plugins, which the first GIF written loads

    make_dataset("moons", n_samples=20)  # loads sklearn.datasets
    if tracked:
        from pipeline.tracking import tracker as tracking

        tracking.warm_up()


def ready_for_a_job(tracked: bool) -> None:
    """Before a job in this process: its imports done, the heap settled (when paused)."""
    if _paused:
        import_job_modules(tracked)
        settle()


# ------------------------------------------------------------------------- fast exit

#: Set by :func:`close_joblib_workers` at the end of a sweep launched here.
_finished_sweep: dict[str, Any] = {}


def exit(status: int, single_run: bool) -> None:
    """Leave the process with ``status``.

    Skips the interpreter's teardown of every loaded module (exit hooks, the tracker's,
    logging's and joblib's, still run and the output is flushed) after a single run, an
    interrupt, or a sweep whose launcher left nothing running (basic, or joblib once its
    workers have exited). Otherwise (submitit's pools, which must shut down the normal
    way) it is ``sys.exit``.
    """
    if _enabled("BACKPROP_FAST_EXIT") and (status > 128 or single_run or sweep_closed()):
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def close_joblib_workers(launcher: str) -> threading.Thread | None:
    """At the end of a sweep: shut joblib's reusable loky executor down in a background
    thread (its workers exit while this process makes the report) and record, for
    :func:`exit`, whether ``launcher`` (Hydra's ``_target_``) is one known to leave
    nothing behind. Returns the shutdown thread, or None when there is no executor."""
    _finished_sweep.clear()
    _finished_sweep["known_launcher"] = launcher in (BASIC_LAUNCHER, JOBLIB_LAUNCHER)
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    if executor is None or getattr(getattr(executor, "_flags", None), "shutdown", False):
        return None  # none, or already shut down
    thread = threading.Thread(target=executor.shutdown, kwargs={"wait": True},
                              name="joblib-shutdown", daemon=True)
    thread.start()
    _finished_sweep["closing"] = thread
    return thread


def sweep_closed(timeout: float = 60.0) -> bool:
    """Whether a sweep ended here and left no worker or pool thread behind (waiting up to
    ``timeout`` s for joblib's workers to exit)."""
    if not _finished_sweep.get("known_launcher"):
        return False
    closing = _finished_sweep.get("closing")
    if closing is not None:
        closing.join(timeout)
        if closing.is_alive():
            return False
    return True


# -------------------------------------------------------------- joblib's warm workers


def joblib_worker_pids() -> list[int]:
    """The pids of the worker processes of this process's reusable loky executor."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    processes = getattr(executor, "_processes", None) or {}
    return [int(pid) for pid in list(processes)]


def warm_worker() -> int:
    """Import what a job needs (numpy, scikit-learn, matplotlib, MLflow and its SQL store,
    MLflow's package map for the first model: about 3.5 s) in a joblib worker before the
    first job arrives; returns the worker's pid."""
    global _paused
    _paused = True
    gc.disable()
    try:
        import_job_modules(tracked=True)
        from pipeline.tracking import tracker as tracking

        tracking.warm_up_model_logging()
    finally:
        settle()
    return os.getpid()


def prepare_fork_server() -> None:
    """Run once in the fork server the workers are forked from
    (``pipeline.app.worker_preload`` calls it; multiprocessing preloads modules by name).

    A failure here must not take the fork server down (no worker could start then): the
    workers import what they need themselves, as they would without the warm-up.
    """
    if hasattr(os, "setpgid"):
        # The workers forked from here inherit this process group, out of the terminal's:
        # a Ctrl-C reaches the launching process alone, which passes it on to the workers
        # and waits for their runs to end (pipeline.app.sweep). If this process and its
        # workers got it at once, joblib would kill the workers while they end their runs.
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    try:
        warm_worker()
    except Exception as error:  # depends on a broken environment
        log.debug("fork server warm-up failed: %s", error)


def _fork_workers_from_a_warm_server() -> bool:
    """Have loky start this process's workers from a fork server that imported what jobs
    need once, rather than as fresh interpreters that each import it all (about 2.5 s of
    CPU per worker, which on two cores is as much CPU as two default jobs, spent while
    this process starts the sweep).

    Only where loky offers ``forkserver`` (POSIX) and only when nothing chose loky's start
    method before (a user's ``set_start_method`` is left alone). Returns whether the fork
    server is in use. The server ignores Ctrl-C (it is multiprocessing's own) and exits
    when this process does.
    """
    try:
        import multiprocessing

        from joblib.externals.loky.backend import context as loky_context
    except ImportError:
        return False
    if loky_context.get_start_method() is not None:
        return loky_context.get_start_method() == "forkserver"
    if "forkserver" not in loky_context.START_METHODS:
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["pipeline.app.worker_preload"])
    loky_context.set_start_method("forkserver")
    return True


def prewarm_joblib_workers(launcher: dict[str, Any]) -> threading.Thread | None:
    """Start the joblib launcher's worker processes now, warm, while this process creates
    the sweep's parent run.

    ``launcher`` is Hydra's resolved ``hydra.launcher`` node. Hydra's joblib launcher
    starts its loky workers only when it submits the first jobs, and each then spends
    seconds importing before its first job: on a short sweep that is most of what
    parallelism saves. joblib keeps one reusable loky executor per process, so workers
    started here with the launcher's own settings are the ones its jobs run in. Returns
    the thread that waits for the warm-up (None for other launchers, or when switched
    off).
    """
    if launcher.get("_target_") != JOBLIB_LAUNCHER or not _enabled("BACKPROP_PREWARM"):
        return None
    try:
        from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
        from joblib import Parallel, delayed, effective_n_jobs
    except ImportError:
        return None
    settings = dict(launcher)
    settings.pop("_target_", None)
    # Exactly what the launcher passes to Parallel, so that joblib reuses these workers.
    settings["backend"] = "loky"
    process_joblib_cfg(settings)
    settings["verbose"] = 0
    n_workers = effective_n_jobs(settings.get("n_jobs"))
    _fork_workers_from_a_warm_server()

    def warm() -> None:
        try:
            warmed = Parallel(**settings)(delayed(warm_worker)() for _ in range(n_workers))
        except Exception as e:  # a failed warm-up only costs the time it would have saved
            log.debug("joblib warm-up failed: %s", e)
            return
        # Workers forked warm finish the task at once, so one of them may run all of
        # them: the executor's own list says which workers exist (loky starts them all).
        thread.pids = sorted(set(joblib_worker_pids()) | set(warmed))

    thread = threading.Thread(target=warm, name="joblib-warm-up", daemon=True)
    thread.pids = []  # the workers' pids, once the warm-up is done
    thread.start()
    return thread
