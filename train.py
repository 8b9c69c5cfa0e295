"""Train one MLP (or a sweep of them) from the Hydra configs in ``conf/``.

    python train.py                                   # moons, 16x16 tanh, Adam
    python train.py dataset=spirals optimizer=sgd optimizer.lr=0.5
    python train.py +experiment=xor_2_2_1
    python train.py -m model.hidden_sizes='[4],[8],[16]' optimizer.lr=0.01,0.1
    python train.py +sweep=width_x_lr

A thin shell: the config is composed by Hydra, checked by ``pipeline.app.config.validate``
(before anything is trained or logged) and handed to ``pipeline.app.job``. A bad config
prints one line ``<key>=<value>: <what is allowed>`` on stderr and exits with status 2;
a run that fails (divergence, an unreachable tracking server) prints one line and exits
with 1; Ctrl-C and SIGTERM end the run KILLED and exit with 130 and 143. Set
``HYDRA_FULL_ERROR=1`` for the full traceback.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from typing import Any, TextIO

if __name__ == "__main__":
    # No garbage collection while the imports build the heap (pipeline.app.heap); the run
    # freezes it and turns collection back on when it starts training.
    from pipeline.app import heap

    heap.pause()
    # First of all: a single run's tracking service starts importing MLflow in its own
    # process while this one imports Hydra, composes the config and makes the data.
    from pipeline.tracking import service as tracking_service

    tracking_service.start_early(sys.argv[1:])

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.app.config import as_config_error, register_configs, validate  # noqa: E402

# The schemas must be in the ConfigStore before Hydra composes conf/config.yaml. Module
# level, so that launchers running jobs in other processes (joblib, submitit) get them
# when they unpickle main().
register_configs()

#: Exit status for a configuration error (argparse's convention for usage errors).
EXIT_CONFIG_ERROR = 2
#: Exit status for a run that failed (diverged, tracking store unreachable); Ctrl-C and
#: SIGTERM exit with 128 + the signal number (130, 143) as shells do.
EXIT_RUN_FAILED = 1


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


#: True once a single (not multirun) job has run in this process: only then may the
#: process skip the interpreter's teardown, which multirun launchers' pools rely on.
_single_run = False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Validate the composed config and run one training job; return its objective.

    The return value (the final test loss, or None) is what Hydra sweepers optimise.
    Errors are raised, never turned into ``SystemExit`` here: in a multirun one bad job
    must not end the sweep.
    """
    global _single_run
    from hydra.core.hydra_config import HydraConfig

    _single_run = HydraConfig.get().mode.name == "RUN"
    sweep = None if _single_run else sys.modules.get("pipeline.app.sweep")
    if sweep is not None and sweep.launcher_interrupted():
        return None  # Ctrl-C reached the sweep: start no other job
    validate(cfg)
    # Imported lazily: a bad config fails fast without loading numpy/MLflow, and config
    # errors are reported even if the app cannot be imported.
    from pipeline.app.job import main as app_main

    try:
        return app_main(cfg)
    except KeyboardInterrupt:
        if sweep is not None and sweep.launcher_interrupted():
            # The run is ended KILLED; the launching process, which passed the signal on,
            # ends the sweep once every running job has ended its run.
            return None
        raise


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


def cli(argv: list[str] | None = None) -> int:
    """Run :func:`main`, printing configuration errors as one line instead of a traceback.

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
        main()
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


def _exit_at_once(status: int) -> None:
    """Leave without the interpreter's teardown of every loaded module (a second or two
    with MLflow and matplotlib loaded): exit hooks (the tracker's, logging's, joblib's)
    still run and the output is flushed."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    try:
        status = cli()
    finally:
        tracking_service.shutdown()  # its run is ended by now; let it exit
    sweep = sys.modules.get("pipeline.app.sweep")
    if status > 128 or _single_run or (sweep is not None and sweep.ready_to_exit()):
        # The runs are recorded and flushed: skipping the interpreter's module teardown
        # saves a second or two. After a sweep only when its launcher left nothing running
        # (basic, or joblib once its workers have exited): submitit's pools must shut down
        # the normal way (threads joined before the exit hooks).
        _exit_at_once(status)
    sys.exit(status)
