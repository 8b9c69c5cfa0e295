"""Tracking in a process of its own, so that MLflow's cost overlaps the training run.

Of a default ``python train.py`` (about 6 s on two cores), loading MLflow and the SQLite
store's modules takes about 2 s and logging the metrics and the model most of another
second, while the training process needs none of it to train and plot. As W&B does with
its service process, a single run therefore hands its tracking to a child process,
started by ``train.py`` before anything else so that it imports MLflow while Hydra composes
the config and scikit-learn makes the data:

- :class:`TrackingService` is the parent's handle on the child (``python -m
  pipeline.tracking.service FD``, talking over a socket pair with
  :mod:`multiprocessing.connection` framing). The child only imports; it opens no store
  until a run starts, so a bad config or a bad CSV still leaves no store behind.
- :class:`RemoteTracker` has the interface of :class:`pipeline.tracking.tracker.RunTracker` that
  :mod:`pipeline.app.job` uses. Every call becomes a message, sent from a background thread
  (a large artifact never blocks training) and run in order on a real ``RunTracker`` in
  the child, so buffering, ``log_batch``, spooling when the store goes away and the model
  format are exactly those of in-process tracking. Calls that return nothing are not
  waited for; if one of them fails, the next call that waits (:meth:`RemoteTracker.barrier`
  or :meth:`RemoteTracker.end`) raises its error.
- Signals: the child ignores SIGINT and SIGTERM (a terminal's Ctrl-C and a scheduler's
  SIGTERM reach the whole process group) and ends the run only when the parent says how;
  if the parent disappears without saying (SIGKILL, a crash), the child sees the socket
  close and ends the run KILLED, so no run is left RUNNING.

Nothing here imports MLflow in the parent: only the child imports :mod:`pipeline.tracking.tracker`.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipeline.app import heap
from pipeline.tracking.stores import TrackingUnavailable, metric_rows

log = logging.getLogger(__name__)

#: Set to 0 to keep tracking in the training process (``train.py`` then starts no child).
ENV_SWITCH = "BACKPROP_TRACKING_SERVICE"
_STOP = object()
#: Seconds of training after which a run's callback waits (once) for the run to exist.
CONFIRM_AFTER_S = 2.0


class TrackingServiceError(RuntimeError):
    """An operation failed in the tracking service; the message names the original error."""


def _rebuild_error(kind: str, message: str) -> Exception:
    """The parent-side exception for an error raised in the child."""
    if kind == "TrackingUnavailable":
        return TrackingUnavailable(message)
    if kind in ("ValueError", "TypeError"):
        return {"ValueError": ValueError, "TypeError": TypeError}[kind](message)
    return TrackingServiceError(f"{kind}: {message}")


# --------------------------------------------------------------------------- parent side


class TrackingService:
    """The parent's handle on one tracking child process (one run at a time).

    Use :meth:`spawn`; :meth:`tracker` gives the :class:`RemoteTracker` of the next run and
    :meth:`close` ends the child (it also exits by itself when this process goes away).
    """

    def __init__(self, process: subprocess.Popen, conn: Connection) -> None:
        self.process = process
        self._conn = conn
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._send_error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="tracking-service-send",
                                        daemon=True)
        self._sender.start()
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def spawn(cls) -> TrackingService:
        """Start the child; it begins importing MLflow at once."""
        parent_sock, child_sock = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.tracking.service", str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                cwd=os.getcwd(), env=_child_env(),
            )
        finally:
            child_sock.close()
        return cls(process, Connection(parent_sock.detach()))

    # -- transport
    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            if message is _STOP:
                return
            try:
                self._conn.send(message)
            except BaseException as e:  # the child is gone: every later wait reports it
                self._send_error = e
                return

    def post(self, op: str, /, *args: Any, **kwargs: Any) -> None:
        """Queue a call the caller does not wait for."""
        self._check_alive()
        self._outbox.put((op, args, kwargs, False))

    def call(self, op: str, /, *args: Any, **kwargs: Any) -> Any:
        """Queue a call and wait for its result (after every call queued before it)."""
        self._check_alive()
        with self._lock:
            self._outbox.put((op, args, kwargs, True))
            try:
                ok, value = self._conn.recv()
            except (EOFError, OSError) as e:
                raise TrackingServiceError(
                    f"the tracking service (pid {self.process.pid}) stopped: {e or 'EOF'}"
                ) from None
        if not ok:
            raise _rebuild_error(*value)
        return value

    def _check_alive(self) -> None:
        if self.closed:
            raise TrackingServiceError("the tracking service was closed")
        if self._send_error is not None:
            raise TrackingServiceError(
                f"the tracking service (pid {self.process.pid}) stopped: {self._send_error}"
            )

    def tracker(self, uri: str, *, spool_root: str | os.PathLike | None = None) -> RemoteTracker:
        """A tracker for the next run, logging to ``uri`` through the child."""
        return RemoteTracker(self, uri, spool_root=spool_root)

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the child finish what it was given and exit (ending an open run KILLED)."""
        if self.closed:
            return
        self.closed = True
        self._outbox.put(_STOP)
        self._sender.join(timeout_s)
        try:
            self._conn.close()
        finally:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this project's package even when the parent found it on a
    # sys.path entry the environment does not carry (a script next to pipeline/).
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


_SERVICE: dict[str, TrackingService | None] = {"current": None}


def start_early(argv: Sequence[str]) -> TrackingService | None:
    """Start the service for a single run of ``train.py``, before its heavy imports.

    Returns None (and starts nothing) for a multirun (its jobs track in their own
    processes), for Hydra's informational flags (``--help``, ``--cfg``...), on Windows, or
    when ``BACKPROP_TRACKING_SERVICE=0``.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if os.name != "posix" or _SERVICE["current"] is not None:
        return _SERVICE["current"]
    for arg in argv:
        if arg.startswith("-") or arg.startswith("hydra.mode=") or arg.startswith("+sweep="):
            return None
    try:
        _SERVICE["current"] = TrackingService.spawn()
    except OSError as e:  # no fork/exec here: track in-process
        log.debug("tracking service not started: %s", e)
        return None
    return _SERVICE["current"]


def current() -> TrackingService | None:
    """The service :func:`start_early` started in this process, if it is still usable."""
    service = _SERVICE["current"]
    if service is None or service.closed or service.process.poll() is not None:
        return None
    return service


def shutdown() -> None:
    """Close the service of this process (at exit of ``train.py``)."""
    service, _SERVICE["current"] = _SERVICE["current"], None
    if service is not None:
        service.close()


class RemoteTracker:
    """The parts of :class:`pipeline.tracking.tracker.RunTracker` a run uses, run in the service.

    Attributes
    ----------
    run_id, experiment_id : str or None
        Known once :meth:`wait_started` (or any waiting call) has returned.
    active : bool
        Between :meth:`start` and :meth:`end`.
    spool_message : str or None
        After :meth:`end`: what could not reach the store and how to upload it.
    service_seconds : float
        After :meth:`end`: wall time the service spent working for this run.
    """

    def __init__(self, service: TrackingService, uri: str, *,
                 spool_root: str | os.PathLike | None = None) -> None:
        self.service = service
        self.uri = uri
        self.spool_root = None if spool_root is None else str(spool_root)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = False
        self.spool_message: str | None = None
        self.service_seconds = 0.0
        self._first_epoch_at: float | None = None

    def start(self, experiment: str | None, run_name: str | None = None, *,
              experiment_id: str | None = None, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None) -> None:
        """Create the run in the service (experiment by id, or by name, created if new).

        Does not wait: the store is opened while this process goes on. A failure is raised
        by the next waiting call.
        """
        self.service.post("start", self.uri, self.spool_root, experiment, experiment_id,
                          run_name, _plain(params or {}), dict(tags or {}), parent_run_id)
        self.active = True

    def wait_started(self) -> str:
        """Wait until the run exists; return its id (raises what starting it raised)."""
        if self.run_id is None:
            self.run_id, self.experiment_id = self.service.call("run_ids")
        return self.run_id

    def barrier(self) -> None:
        """Wait until every call so far has run; raise the first error among them."""
        self.service.call("barrier")

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Trainer callback: the epoch's metrics, stamped now, to the service's buffer.

        After :data:`CONFIRM_AFTER_S` of training it waits once for the run to exist, so
        that a store that cannot create the run stops a long training early (a short run
        never waits before its end).
        """
        self.log_metrics(metrics, step=epoch)
        if self.run_id is None:
            now = time.monotonic()
            if self._first_epoch_at is None:
                self._first_epoch_at = now
            elif now - self._first_epoch_at >= CONFIRM_AFTER_S:
                self.wait_started()

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.service.post("metric_rows", metric_rows(metrics, step, int(time.time() * 1000)))

    def flush(self) -> None:
        """Ask the service to send buffered metrics now (training is over, say)."""
        self.service.post("flush")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.service.post("set_tags", dict(tags))

    def log_dataset(self, df: Any, name: str, source: str | None = None,
                    digest: str | None = None, context: str = "training",
                    targets: str | None = None) -> None:
        self.service.post("log_dataset", df, name, source=source, digest=digest,
                          context=context, targets=targets)

    def log_figure(self, fig: Any, artifact_file: str, **savefig_kwargs: Any) -> None:
        """Render ``fig`` here (the figure stays in this process) and send the bytes."""
        buffer = io.BytesIO()
        fmt = savefig_kwargs.pop("format", None) or Path(artifact_file).suffix.lstrip(".")
        fig.savefig(buffer, format=fmt or "png", **savefig_kwargs)
        self.service.post("log_bytes", buffer.getvalue(), artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Send a file (or a directory's files) now: it may be gone when the service runs."""
        path = Path(local_path)
        if not path.exists():
            raise ValueError(f"log_artifact: {path} does not exist")
        files = ([path] if path.is_file()
                 else sorted(p for p in path.rglob("*") if p.is_file()))
        # As MLflow lays them out: a file goes under artifact_path, a directory's contents
        # (not the directory itself) too.
        prefix = (artifact_path or "").strip("/")
        base = path.parent if path.is_file() else path
        for file in files:
            relative = file.relative_to(base).as_posix()
            self.service.post("log_bytes", file.read_bytes(),
                              f"{prefix}/{relative}" if prefix else relative)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.service.post("log_text", text, artifact_file)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        self.service.post("log_dict", _plain(dictionary), artifact_file)

    def log_model(self, model: Any, input_example: Any, name: str = "model",
                  class_names: Sequence[str] | None = None,
                  feature_names: Sequence[str] | None = None) -> None:
        self.service.post("log_model", model, input_example, name=name,
                          class_names=None if class_names is None else list(class_names),
                          feature_names=None if feature_names is None else list(feature_names))

    def end(self, status: str = "FINISHED", reason: str | None = None) -> Path | None:
        """End the run with ``status`` once everything sent before has been logged.

        Returns None, or the spool directory holding what could not reach the store.
        Errors of earlier calls nobody waited for are logged as warnings here (the run's
        status is what the caller decided).
        """
        if not self.active:
            return None
        self.active = False
        outcome = self.service.call("end", status, reason)
        self.run_id = outcome["run_id"] or self.run_id
        self.experiment_id = outcome["experiment_id"] or self.experiment_id
        self.spool_message = outcome["spool_message"]
        self.service_seconds = outcome["service_seconds"]
        for kind, message in outcome["errors"]:
            log.warning("tracking: %s: %s", kind, message)
        return Path(outcome["spool_dir"]) if outcome["spool_dir"] else None


def _plain(value: Any) -> Any:
    """Plain Python containers (a Hydra DictConfig pickles, but only with Hydra loaded)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- child side


class _Service:
    """The child's state: one :class:`pipeline.tracking.tracker.RunTracker` per run, in turn."""

    def __init__(self) -> None:
        from pipeline.tracking import tracker as tracking

        self.tracking = tracking
        self.tracker = None
        self.start_error: tuple[str, str] | None = None
        self.errors: list[tuple[str, str]] = []
        self.busy = 0.0
        self.known_experiments: dict[tuple[str, str], str | None] = {}

    # Each handler runs one message; async ones' errors are kept for the next wait.
    def open_store(self, uri: str, experiment: str) -> None:
        """Open an existing SQLite store and look the experiment up, creating nothing (the
        run may still fail on its data); :meth:`start` then only has to create the run.

        A server is left alone: asking it costs one request, and the training process
        checks it is up (and says so in one line if not) before anything is sent.
        """
        if not uri.startswith("sqlite:"):
            return
        try:
            self.known_experiments[(uri, experiment)] = self.tracking.find_experiment_id(
                uri, experiment, create_store=False)
        except Exception as e:  # start() will meet it again and report it
            log.debug("tracking service: opening %s early failed: %s", uri, e)

    def start(self, uri, spool_root, experiment, experiment_id, run_name, params, tags,
              parent_run_id) -> None:
        tracking = self.tracking
        self.tracker, self.start_error, self.errors, self.busy = None, None, [], 0.0
        try:
            tracking.check_reachable(uri)
            if experiment_id is None:
                experiment_id = self.known_experiments.pop((uri, experiment), None)
            if experiment_id is None:
                experiment_id = tracking.prepare_experiment(uri, experiment)
            tracker = tracking.RunTracker(uri, spool_root=spool_root)
            tracker.start(experiment_id, run_name, params=params, tags=tags,
                          parent_run_id=parent_run_id)
            self.tracker = tracker
        except Exception as e:
            self.start_error = (type(e).__name__, str(e))

    def _run(self):
        if self.tracker is None:
            if self.start_error is not None:
                raise _Reported(*self.start_error)
            raise RuntimeError("no run was started")
        return self.tracker

    def barrier_all(self) -> None:
        """Nothing to do: answering proves every earlier message has been handled."""

    def run_ids(self) -> tuple[str, str]:
        tracker = self._run()
        return tracker.run_id, tracker.experiment_id

    def barrier(self) -> None:
        self._run()
        if self.errors:
            raise _Reported(*self.errors.pop(0))

    def metric_rows(self, rows) -> None:
        self._run().log_metric_rows(rows)

    def flush(self) -> None:
        self._run().flush()

    def set_tags(self, tags) -> None:
        self._run().set_tags(tags)

    def log_dataset(self, df, name, **kwargs) -> None:
        self._run().log_dataset(df, name, **kwargs)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        self._run().log_bytes(data, artifact_file)

    def log_text(self, text, artifact_file) -> None:
        self._run().log_text(text, artifact_file)

    def log_dict(self, dictionary, artifact_file) -> None:
        self._run().log_dict(dictionary, artifact_file)

    def log_model(self, model, example, **kwargs) -> None:
        self._run().log_model(model, example, **kwargs)

    def end(self, status: str, reason: str | None) -> dict:
        tracker, errors = self.tracker, self.errors
        self.tracker, self.errors = None, []
        if tracker is None:
            if self.start_error is not None:
                raise _Reported(*self.start_error)
            raise RuntimeError("no run was started")
        tracker.log_metrics({"time/tracking_service": self.busy}, step=0)
        spool = tracker.end(status, reason)
        return {
            "run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
            "spool_dir": None if spool is None else str(spool),
            "spool_message": tracker.spool_message if spool is not None else None,
            "service_seconds": self.busy, "errors": errors,
        }

    def abandon(self) -> None:
        """The parent went away without ending the run: end it KILLED, as at exit."""
        if self.tracker is not None and self.tracker.active:
            self.tracker.end("KILLED", "the training process exited before the run was ended")
            self.tracker = None


class _Reported(Exception):
    """An error to hand back to the parent under its original type name."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind, self.message = kind, message
        super().__init__(f"{kind}: {message}")


def _quietly(task) -> None:
    try:
        task()
    except Exception as e:  # a warm-up that fails only costs the time it would have saved
        log.debug("tracking service: warm-up %s failed: %s", getattr(task, "__name__", task), e)


def _warm_up_then_settle(task) -> None:
    _quietly(task)
    heap.settle()


def serve(conn: Connection) -> None:
    """The child's loop: run each message in order until the parent closes the socket."""
    from pipeline.tracking import tracker as tracking

    tracking.warm_up()  # about 2 s of imports, while the parent composes and makes data
    # The model's first logging costs another 0.5 s, mostly Python reading package
    # metadata: in a thread, it fills the moments the loop waits on the parent or on disk.
    # Then the heap is settled (pipeline.app.heap: no collection while the imports ran).
    threading.Thread(target=_warm_up_then_settle, args=(tracking.warm_up_model_logging,),
                     daemon=True, name="warm-up-model-logging").start()
    service = _Service()
    while True:
        try:
            name, args, kwargs, reply = conn.recv()
        except (EOFError, OSError):
            break
        started = time.perf_counter()
        try:
            result = getattr(service, name)(*args, **kwargs)
            outcome = (True, result)
        except _Reported as e:
            outcome = (False, (e.kind, e.message))
        except Exception as e:
            outcome = (False, (type(e).__name__, str(e)))
            if not reply:
                service.errors.append(outcome[1])
        finally:
            service.busy += time.perf_counter() - started
        if reply:
            try:
                conn.send(outcome)
            except OSError:
                break
    service.abandon()


def _main(argv: Sequence[str]) -> None:
    # Ctrl-C in a terminal and a scheduler's SIGTERM reach the whole process group: the
    # parent decides how the run ends and tells us; we only stop when it is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    heap.pause()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    conn = Connection(int(argv[0]))
    try:
        serve(conn)
    finally:
        conn.close()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    # Every run is ended and flushed: skip the interpreter's teardown of MLflow's modules
    # (about a second that nobody waits for).
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1:])
