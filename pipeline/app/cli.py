"""The command line: ``python train.py`` hands its Hydra entry point and argv here.

:func:`job` is what Hydra calls with each composed config (one run, or each job of a
sweep); :func:`run` wraps Hydra's own call so that errors come out as one line and
signals as shell exit statuses:

- a bad config prints ``config error: <key>=<value>: <what is allowed>`` and exits 2;
- a run that fails (divergence, an unreachable tracking store) prints
  ``error: <reason>`` and exits 1;
- Ctrl-C and SIGTERM end the run KILLED and exit with 130 and 143.

Set ``HYDRA_FULL_ERROR=1`` for the full traceback. How the process itself is tuned
(garbage collector, exit) is :mod:`pipeline.app.process`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from pipeline.app import process
from pipeline.app.config import as_config_error, validate

#: Exit status for a configuration error (argparse's convention for usage errors).
EXIT_CONFIG_ERROR = 2
#: Exit status for a run that failed (diverged, tracking store unreachable); Ctrl-C and
#: SIGTERM exit with 128 + the signal number (130, 143) as shells do.
EXIT_RUN_FAILED = 1

#: True once a single (not multirun) job has run in this process.
_single_run = False


def single_run() -> bool:
    """Whether this process ran one job (``python train.py`` without ``-m``)."""
    return _single_run


def job(cfg: Any) -> float | None:
    """Validate one composed config (a Hydra ``DictConfig``) and run its training job;
    return its objective (the final test loss, or None), which Hydra sweepers optimise.

    In a tracked sweep (:class:`pipeline.app.sweep.MlflowSweepCallback` started a parent
    run before any job) the job's run is nested under that parent, in the parent's
    experiment and store, and tagged with Hydra's job number. The context reaches the job
    through the callback, which every launcher hands to its workers, so no environment
    variable has to cross machines.

    Errors are raised, never turned into ``SystemExit`` here: in a multirun one bad job
    must not end the sweep.
    """
    global _single_run
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = hc is not None and hc.mode.name == "MULTIRUN"
    _single_run = not multirun
    if multirun:
        from pipeline.app import sweep

        if sweep.launcher_interrupted():
            return None  # Ctrl-C reached the sweep: start no other job
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)

    overrides: list[str] = []
    output_dir = None
    parallel = False
    job_num = None
    if hc is not None:
        overrides = list(hc.overrides.task)
        output_dir = hc.runtime.output_dir
        launcher = str(hc.launcher.get("_target_", ""))
        parallel = multirun and "basic" not in launcher.lower()
        job_num = hc.job.get("num")
    context = sweep.current_context() if multirun else None
    kwargs: dict[str, Any] = {}
    if context is not None and plain["tracking"]["kind"] != "none":
        # The store the parent was created in, whatever this worker's environment says.
        if plain["tracking"]["kind"] == "local" or context.tracking_uri.startswith("http"):
            plain["tracking"]["uri"] = context.tracking_uri
        kwargs = {"parent_run_id": context.parent_run_id,
                  "experiment_id": context.experiment_id,
                  "tags": {"sweep.job": str(job_num), "sweep.name": context.name}}
    tracking = plain["tracking"]
    if tracking["kind"] == "server":
        # An unreachable server fails in seconds, before the job's imports below (the
        # job checks again: it may be called without this edge).
        from pipeline.tracking import stores

        stores.check_reachable(stores.resolve_tracking_uri("server", tracking.get("uri")))
    # Imported only now: a bad config or server fails fast without loading MLflow.
    process.ready_for_a_job(tracked=tracking["kind"] != "none")
    from pipeline.app.job import process_age, run

    if multirun and hc.sweeper.get("trial") is not None:
        # A trial of an Optuna search (pipeline.app.search): report to its pruner.
        from pipeline.app.search import store_uri, trial_reporter

        reporter = trial_reporter(hc.sweeper, store_uri(plain["tracking"]))
        if reporter is not None:
            kwargs["callbacks"] = [reporter]
    if not multirun:  # in a sweep, a worker's age says nothing about this job
        kwargs["startup_seconds"] = process_age()
    try:
        result = run(plain, overrides=overrides, output_dir=output_dir, parallel=parallel,
                     **kwargs)
    except SystemExit as exc:
        if not multirun:
            raise
        # Hydra lets SystemExit through and ends the whole sweep: make it this job's error.
        raise RuntimeError(f"the job called sys.exit({exc.code!r})") from exc
    except KeyboardInterrupt:
        if multirun and sweep.launcher_interrupted():
            # The run is ended KILLED; the launching process, which passed the signal on,
            # ends the sweep once every running job has ended its run.
            return None
        raise
    if output_dir:
        (Path(output_dir) / "result.json").write_text(json.dumps(
            {"status": result.status, "run_id": result.run_id, "metrics": result.metrics},
            default=float, indent=1))
    return result.objective


def _run_error(exc: BaseException) -> str | None:
    """One line for an error whose message says everything (no traceback needed): a run
    that failed and is recorded FAILED (divergence), or an unreachable tracking store.

    Looked up in ``sys.modules``: if the exception came from there, the module is loaded.
    """
    kinds = [
        getattr(sys.modules.get("pipeline.app.job"), "RunFailed", None),
        getattr(sys.modules.get("pipeline.tracking.stores"), "TrackingUnavailable", None),
    ]
    if any(kind is not None and isinstance(exc, kind) for kind in kinds):
        return " ".join(str(exc).split())
    return None


class _HoldJobErrorLine:
    """A stderr proxy that holds back Hydra's "Error executing job with overrides" line.

    Hydra writes that line just before re-raising a job's exception. For a configuration
    error the one-line message says everything, so the line is dropped; for any other
    error it is written out (before the traceback) as usual.
    """

    PREFIX = "Error executing job with overrides:"

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._held: list[str] = []

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX):
            self._held.append(text)
            return len(text)
        if self._held and text.strip():
            self.release()
        return self._stream.write(text)

    def release(self) -> None:
        held, self._held = self._held, []
        for text in held:
            self._stream.write(text)

    def discard(self) -> None:
        self._held = []

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, flush, encoding...
        return getattr(self._stream, name)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training job (composing, between the jobs of a sweep, while its
    report is made): handled like Ctrl-C, so exit hooks end open runs KILLED. (Left to
    the default action, SIGTERM ends the process at once and runs stay RUNNING forever.)
    Inside a job :mod:`pipeline.app.job` installs its own handler."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def run(hydra_main: Callable[[], Any], argv: list[str] | None = None) -> int:
    """Call ``hydra_main`` (``train.py``'s ``@hydra.main`` function, which reads
    ``sys.argv``), printing configuration errors as one line instead of a traceback;
    return the exit status.

    Hydra prints its own multi-line report (and exits 1) for errors unless
    ``HYDRA_FULL_ERROR=1``; we set it for the call so the exception reaches us, and
    format configuration errors ourselves (exit status 2). Other exceptions propagate
    unchanged, and ``HYDRA_FULL_ERROR=1`` set by the user shows every traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    stderr = sys.stderr
    proxy = _HoldJobErrorLine(stderr)
    sys.stderr = proxy
    previous_sigterm = None
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        hydra_main()
    except KeyboardInterrupt as exc:
        # Ctrl-C or SIGTERM: the run is already recorded KILLED with what it reached
        # (pipeline.app.job); exit like a shell does for a signal, without a traceback.
        proxy.discard()
        if user_wants_traceback:
            raise
        signum = getattr(exc, "signum", signal.SIGINT)
        name = str(exc) or "SIGINT (Ctrl-C)"
        sweep = sys.modules.get("pipeline.app.sweep")
        if sweep is not None:  # a sweep launched here: end its runs still RUNNING
            sweep.interrupted(name)
        print(f"interrupted by {name}; exiting", file=stderr)
        return 128 + int(signum)
    except Exception as exc:
        err = as_config_error(exc, argv)
        if err is None:
            reason = _run_error(exc)
            if reason is None or user_wants_traceback:
                proxy.release()
                raise
            proxy.discard()
            print(f"error: {reason}", file=stderr)
            return EXIT_RUN_FAILED
        if user_wants_traceback:
            proxy.release()
            raise
        proxy.discard()
        print(f"config error: {err}", file=stderr)
        return EXIT_CONFIG_ERROR
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        sys.stderr = stderr
        proxy.release()
        if not user_wants_traceback:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return 0
