"""MLflow tracking: the only module of the project that imports mlflow.

What it gives the rest of the pipeline:

- :func:`resolve_tracking_uri`, :func:`check_reachable`, :func:`prepare_experiment`: pick the
  store (``MLFLOW_TRACKING_URI`` wins; the local store is anchored at the project root so
  Hydra's working directories never scatter stores), fail within seconds when a server is
  down, and create store and experiment once (safe when processes race) so that jobs
  address the experiment by id.
- :class:`RunTracker`: one run's lifecycle through an explicit :class:`mlflow.MlflowClient`
  and run id (no fluent ``mlflow.start_run`` state, so parent and child runs of a sweep,
  or two runs in one test, never leak into each other). It is the trainer callback: metrics
  are buffered in memory and sent with ``log_batch`` in chunks.
- Nothing is lost when the store goes away mid-run: whatever could not be sent (metrics,
  artifacts, tags, dataset, model, the final status) is kept in a spool directory, a
  warning says where, and :func:`upload_spool` / ``python -m pipeline.tracking upload DIR``
  sends it later.
- :class:`MLPPyfuncModel`: the MLflow pyfunc wrapper of a trained MLP. The weights are the
  ``.npz`` of :mod:`pipeline.tracking.model_files` (loaded without pickle); the wrapper
  itself is logged as "models from code", so no pickle is involved at all.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.pyfunc import PythonModel
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from pipeline.paths import project_root
from pipeline.tracking import model_files as model_io
from pipeline.tracking.stores import (  # noqa: F401 (re-exported for callers)
    HTTP_ENV_DEFAULTS,
    TRACKING_KINDS,
    TrackingUnavailable,
    _as_uri,
    _sqlite_path,
    check_reachable,
    default_artifact_root,
    limit_http_retries,
    local_tracking_uri,
    local_tracking_uri_for,
    metric_rows,
    resolve_tracking_uri,
    run_url,
    ui_command,
)

logger = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
SPOOL_DIRNAME = ".spool"
_TRUNCATED = "...[truncated]"
_PARENT_TAG = "mlflow.parentRunId"

# ------------------------------------------------------------------ store and experiment


def warm_up() -> None:
    """Import the SQL store's modules (SQLAlchemy, alembic: about 0.6 s) without opening a
    store, so that a process that will track soon pays for them ahead of time."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def warm_up_model_logging() -> None:
    """Pay now what the first run and :meth:`RunTracker.log_model` of a process pay on top of
    later ones (about 0.5 s): MLflow checks the model's requirements against the environment
    with a map of every installed package's modules, built once per process from each
    distribution's file list. Opens no store."""
    from mlflow.utils import requirements_utils

    init = getattr(requirements_utils, "_init_packages_to_modules_map", None)
    if init is not None:  # MLflow's private helper; a later version may not have it
        init()
    # A run's context tags: the source's git commit, looked up once per process with
    # GitPython, imported for it (about 0.08 s of a process's first run).
    _context_tags({})


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock next to an SQLite database (no-op for other stores).

    Several processes creating a fresh ``mlflow.db`` at once race in its schema migration and
    can leave it broken; the lock makes them take turns.
    """
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; create the store before starting parallel jobs
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    # Named "mlflow.db-lock" so the project's .gitignore (mlflow.db-*) covers it.
    with open(f"{db}-lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    return slug[:80]


def prepare_experiment(
    uri: str, name: str, artifact_root: str | os.PathLike | None = None
) -> str:
    """Create the store and the experiment once; return the experiment id.

    Safe when several processes call it at once on a store that does not exist yet. Callers
    then address the experiment by id (never by name, which races).

    Parameters
    ----------
    uri : str
        Tracking URI.
    name : str
        Experiment name.
    artifact_root : str or path-like, optional
        Directory (or URI) under which the experiment's artifacts go, in ``<root>/<name>``.
        Default: :func:`default_artifact_root` (``<dir of mlflow.db>/mlruns`` for SQLite).
        Ignored when the experiment exists already.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"tracking.experiment={name!r}: must be a non-empty string")
    root = _as_uri(artifact_root) if artifact_root is not None else default_artifact_root(uri)
    location = f"{root.rstrip('/')}/{_slug(name)}" if root else None
    try:
        with _store_lock(uri):  # only one process creates (migrates) a fresh store
            _create_sqlite_store(uri, root)
        client = MlflowClient(uri)
        # Opening the store verifies its schema (a second or two): done outside the lock so
        # that many jobs starting at once do it in parallel, not one after another.
        client.get_experiment_by_name(name)
        with _store_lock(uri):
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    return client.create_experiment(name, artifact_location=location)
                except MlflowException:
                    # Another process (a server client, not under our lock) won the race.
                    experiment = client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
            if experiment.lifecycle_stage == "deleted":
                logger.warning(
                    "experiment %r (id %s) was deleted; restoring it",
                    name, experiment.experiment_id,
                )
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
    except MlflowException as e:
        raise TrackingUnavailable(f"tracking store {uri}: cannot prepare experiment "
                                  f"{name!r} ({e.message})") from e


def _create_sqlite_store(uri: str, artifact_root: str | None) -> None:
    """Create (migrate) a fresh SQLite store with a Default experiment under our root.

    MLflow would put the Default experiment's artifacts in ``./mlruns`` of whatever the
    working directory is; creating the store ourselves anchors it like every other.
    """
    db = _sqlite_path(uri)
    if db is None or (db.exists() and db.stat().st_size > 0) or artifact_root is None:
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, artifact_root)
    store.engine.dispose()


# ------------------------------------------------------------------------------- params


def _plain(value: Any) -> Any:
    """Nested mappings/sequences (including OmegaConf containers) as plain Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (
        isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    ):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _param_text(value: Any) -> str:
    """Strings as they are; everything else as JSON (``true``, ``null``, ``[16, 16]``),
    which reads like the Hydra override a user would type."""
    value = _plain(value)
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _safe_key(key: str) -> str:
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return key[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + digest


def flatten_config(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config to dotted keys with string values within MLflow's limits.

    ``{"model": {"hidden_sizes": [16, 16], "bias": True}}`` becomes
    ``{"model.hidden_sizes": "[16, 16]", "model.bias": "true"}``. Lists stay one value
    (readable, and what a user types as an override). Values longer than MLflow's param
    limit are cut with a ``...[truncated]`` marker; over-long keys keep a hash suffix.
    """
    flat: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping) and (node or not key):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            flat[_safe_key(key)] = _truncate(_param_text(node), MAX_PARAM_VAL_LENGTH)

    walk(nested, prefix)
    return flat


# ------------------------------------------------------------------------- timings


class PhaseTimer:
    """Wall time per phase: ``with timer("train"): ...``; ``timer.seconds`` maps phase -> s."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)


# ------------------------------------------------------------------------- pyfunc model


class MLPPyfuncModel(PythonModel):
    """MLflow pyfunc wrapper: ``predict(df)`` returns class probabilities as a DataFrame.

    The weights come from the ``weights`` artifact, a
    :mod:`pipeline.tracking.model_files` ``.npz`` (no pickle); the ``columns`` artifact
    (JSON) holds ``feature_names`` (input columns, in order) and ``output_columns``
    (``proba_0``, ``proba_1``, ... or the class names).
    """

    def load_context(self, context: Any) -> None:
        self._model = model_io.load_model(context.artifacts["weights"])
        columns = json.loads(Path(context.artifacts["columns"]).read_text())
        self._features = columns.get("feature_names")
        self._columns = columns.get("output_columns")

    # A DataFrame hint is one MLflow 3 does not derive a schema from, so the signature
    # inferred from the input example stays in charge (arrays and lists work as well).
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Rows of features (DataFrame, array or list) -> DataFrame (n, n_classes)."""
        if isinstance(model_input, pd.DataFrame):
            if self._features and set(self._features) <= set(model_input.columns):
                model_input = model_input[self._features]
            X = model_input.to_numpy(dtype=np.float64)
        else:
            X = np.asarray(model_input, dtype=np.float64)
            if X.ndim == 1:
                X = X.reshape(1, -1)
        proba = self._model.predict_proba(X)
        columns = self._columns or [f"proba_{i}" for i in range(proba.shape[1])]
        return pd.DataFrame(np.asarray(proba, dtype=np.float64), columns=columns)


# The "models from code" entry point logged with each model: MLflow executes it to build the
# wrapper, so loading never unpickles anything.
_PYFUNC_CODE = """\
# MLflow pyfunc entry point for a backprop-pipeline MLP (logged by pipeline.tracking.tracker).
import mlflow
from pipeline.tracking.tracker import MLPPyfuncModel

mlflow.models.set_model(MLPPyfuncModel())
"""


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Temporarily make ``uri`` MLflow's global tracking URI.

    ``Model.log`` resolves its store from the global URI only. ``mlflow.set_tracking_uri``
    also exports ``MLFLOW_TRACKING_URI``, which would then win in
    :func:`resolve_tracking_uri` for the rest of the process; both are restored.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = getattr(tracking_utils, "_tracking_uri", None)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is not None:
            mlflow.set_tracking_uri(previous)
        else:
            tracking_utils._tracking_uri = None
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


#: MLflow loggers whose INFO lines while a model is logged are noise in every run's output
#: ("Validating input example against model signature").
_CHATTY_LOGGERS = ("mlflow.pyfunc", "mlflow.models")


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No download progress bars, schema hints or INFO lines while a model is logged."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's inference of requirements starts a subprocess (seconds).
    import cloudpickle

    return [
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
    ]


def _package_copy(dest: Path) -> Path:
    """A clean copy of the ``pipeline`` package, shipped with the model as its code."""
    src = Path(model_io.__file__).resolve().parent
    target = dest / "pipeline"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


# --------------------------------------------------------------------------- the tracker


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunTracker:
    """One MLflow run's lifecycle, through an explicit client and run id.

    Use as the trainer's callback (``tracker(epoch, metrics)`` buffers; ``flush`` sends),
    optionally as a context manager (an exception ends the run FAILED, Ctrl-C KILLED).

    Parameters
    ----------
    uri : str
        Tracking URI (see :func:`resolve_tracking_uri`).
    flush_every_s : float
        Send buffered metrics when this many seconds passed since the last send.
    flush_every_epochs : int, optional
        Also send every this many epochs.
    spool_root : path-like, optional
        Where unsendable data goes, as ``<spool_root>/<run_id>/`` (default
        ``<project root>/mlruns/.spool``; the Hydra run directory is a good choice).
    retry_after_s : float
        After a failed send, further sends wait this long before trying the store again
        (meanwhile data is buffered and spooled); :meth:`end` always tries once more.
    """

    def __init__(
        self,
        uri: str,
        *,
        flush_every_s: float = 30.0,
        flush_every_epochs: int | None = None,
        spool_root: str | os.PathLike | None = None,
        retry_after_s: float = 30.0,
    ) -> None:
        if flush_every_epochs is not None and flush_every_epochs < 1:
            raise ValueError(f"flush_every_epochs={flush_every_epochs!r}: must be >= 1 or None")
        self.uri = uri
        self.client = MlflowClient(uri)
        self.flush_every_s = float(flush_every_s)
        self.flush_every_epochs = flush_every_epochs
        self.retry_after_s = float(retry_after_s)
        self._spool_root = (
            Path(spool_root) if spool_root is not None
            else project_root() / "mlruns" / SPOOL_DIRNAME
        )
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = False
        self.spool_dir: Path | None = None  # set once anything had to be kept on disk
        self._metrics: list[Metric] = []
        self._ops: list[dict] = []  # operations that failed and wait for the store
        self._offline_until = 0.0
        self._last_error: str | None = None
        self._last_flush = time.monotonic()
        self._epochs_since_flush = 0
        self._warned = False
        self.send_seconds = 0.0  # wall time spent talking to the store (for overhead checks)

    # ----------------------------------------------------------------- lifecycle

    def start(
        self,
        experiment_id: str,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        start_time: int | None = None,
    ) -> str:
        """Create the run (nested under ``parent_run_id`` if given) and log its params.

        ``start_time`` (ms since the epoch, default now) lets a run start when the
        command did, so that MLflow shows how long the command took.

        ``params`` may be nested (a resolved config): it is flattened with
        :func:`flatten_config`. Returns the run id. Raises :class:`TrackingUnavailable`
        naming the URI if the store cannot create the run.
        """
        if self.run_id is not None:
            raise RuntimeError(f"this tracker already holds run {self.run_id}")
        user_tags = {k: _truncate(_param_text(v), MAX_TAG_VAL_LENGTH)
                     for k, v in (tags or {}).items()}
        if parent_run_id:
            user_tags[_PARENT_TAG] = parent_run_id
        all_tags = _context_tags(user_tags)
        flat = flatten_config(params or {})
        started = time.perf_counter()
        try:
            run = self.client.create_run(
                str(experiment_id), run_name=run_name or None, tags=all_tags,
                start_time=start_time,
            )
            self.run_id = run.info.run_id
            self.experiment_id = run.info.experiment_id
            self.active = True
            self._last_flush = time.monotonic()
            atexit.register(self._at_exit)
            # The run exists from here on: if the store goes away now, the params are kept
            # on disk with everything logged later (the run is not lost for a race).
            self._submit({"op": "params", "params": dict(flat)})
        except Exception as e:
            if self.run_id is not None:
                self.active = False
                atexit.unregister(self._at_exit)
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.run_id, "FAILED")
            raise TrackingUnavailable(
                f"tracking store {self.uri}: cannot start run {run_name!r} in experiment "
                f"{experiment_id} ({_describe(e)})"
            ) from e
        finally:
            self.send_seconds += time.perf_counter() - started
        return self.run_id

    @classmethod
    def attach(cls, uri: str, run_id: str, **kwargs: Any) -> RunTracker:
        """A tracker for an existing run (a sweep's parent at the end, a spool upload)."""
        tracker = cls(uri, **kwargs)
        run = tracker.client.get_run(run_id)
        tracker.run_id = run.info.run_id
        tracker.experiment_id = run.info.experiment_id
        tracker.active = True
        atexit.register(tracker._at_exit)
        return tracker

    def end(self, status: str = "FINISHED", reason: str | None = None) -> Path | None:
        """Flush everything, record ``reason`` as tag ``failure_reason``, terminate the run.

        Returns None when everything reached the store, else the spool directory holding
        what did not (a warning with the upload command has been logged).
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status={status!r}: must be one of {', '.join(RUN_STATUSES)}")
        self._require_run()
        if not self.active:
            return self.spool_dir
        if reason:
            self.set_tags({"failure_reason": reason})
        self._submit({"op": "end", "status": status, "end_time": _now_ms()}, defer=True)
        self.flush(force=True)
        self.active = False
        atexit.unregister(self._at_exit)
        if self.spool_dir is not None and (self._metrics or self._ops):
            logger.warning("%s", self.spool_message)
            return self.spool_dir
        return None

    def detach(self) -> Path | None:
        """Send what is pending and let go of the run without changing its status (for a
        tracker from :meth:`attach` that only added tags or artifacts to a finished run).
        Returns None, or the spool directory holding what could not be sent."""
        self._require_run()
        if self.active:
            self.flush(force=True)
            self.active = False
            atexit.unregister(self._at_exit)
        return self.spool_dir if (self._metrics or self._ops) else None

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if not self.active:
            return
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED", "interrupted (KeyboardInterrupt)")
        else:
            self.end("FAILED", f"{exc_type.__name__}: {exc}")

    def _at_exit(self) -> None:
        # Without this a run whose process exits early stays RUNNING forever.
        if self.active:
            try:
                self.end("KILLED", "the process exited before the run was ended")
            except Exception as e:  # at interpreter exit: report, never raise
                logger.warning("run %s could not be ended at exit: %s", self.run_id, e)

    # ------------------------------------------------------------------- metrics

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Trainer callback: buffer ``metrics`` at step ``epoch``; send when due."""
        self.log_metrics(metrics, step=epoch)
        self._epochs_since_flush += 1
        if self._due():
            self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Buffer metric values at ``step`` (sent by :meth:`flush` / :meth:`end`)."""
        self._require_run()
        self._metrics.extend(Metric(*row) for row in metric_rows(metrics, step, _now_ms()))

    def log_timings(self, seconds: Mapping[str, float] | PhaseTimer, step: int = 0) -> None:
        """Log a timing breakdown as metrics ``time/<phase>`` (seconds)."""
        if isinstance(seconds, PhaseTimer):
            seconds = seconds.seconds
        self.log_metrics({f"time/{k}": v for k, v in seconds.items()}, step=step)

    def _due(self) -> bool:
        if self.flush_every_epochs and self._epochs_since_flush >= self.flush_every_epochs:
            return True
        return time.monotonic() - self._last_flush >= self.flush_every_s

    def flush(self, force: bool = False) -> bool:
        """Send buffered metrics (``log_batch``, at most 1000 per call) and pending operations.

        Never raises for an unreachable store: what cannot be sent is spooled to disk.
        Returns True when nothing is left pending.
        """
        self._last_flush = time.monotonic()
        self._epochs_since_flush = 0
        if not self._metrics and not self._ops:
            return True
        if not force and time.monotonic() < self._offline_until:
            self._persist_spool()  # store still considered down: keep the disk copy current
            return False
        try:
            self._send_metrics()
            self._drain_ops()
        except Exception as e:
            if not _is_store_failure(e):
                raise
            self._went_offline(e)
            return False
        if self.spool_dir is not None:
            self._clear_spool()
        return True

    def _send_metrics(self) -> None:
        started = time.perf_counter()
        try:
            while self._metrics:
                chunk = self._metrics[:MAX_METRICS_PER_BATCH]
                self.client.log_batch(self.run_id, metrics=chunk)
                del self._metrics[: len(chunk)]  # sent: never resend on a later failure
        finally:
            self.send_seconds += time.perf_counter() - started

    # ---------------------------------------------------------------- operations

    def _submit(self, op: dict, defer: bool = False) -> None:
        """Run one operation now, or queue (and spool) it if the store is unavailable.

        ``defer`` only queues it (the caller flushes). Queued operations keep their order.
        """
        self._require_run()
        offline = time.monotonic() < self._offline_until
        if defer or offline or self._ops:
            self._queue(op)
            if defer:
                return
            if offline:
                self._persist_spool()
            else:
                self.flush()  # the store may be back: send the queue in order
            return
        started = time.perf_counter()
        try:
            self._do(op)
        except Exception as e:
            if not _is_store_failure(e):
                raise
            self._queue(op)
            self._went_offline(e)
        finally:
            self.send_seconds += time.perf_counter() - started

    def _drain_ops(self) -> None:
        started = time.perf_counter()
        try:
            while self._ops:
                self._do(self._ops[0])
                self._ops.pop(0)
        finally:
            self.send_seconds += time.perf_counter() - started

    def _queue(self, op: dict) -> None:
        """Keep ``op`` for later; its files are copied into the spool (temp files vanish)."""
        files = op.get("files")
        if files:
            spool = self._ensure_spool_dir()
            kept = {}
            for role, path in files.items():
                path = Path(path)
                if spool in path.parents:
                    kept[role] = str(path)
                    continue
                target = spool / "files" / f"{len(os.listdir(spool / 'files')):04d}" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    shutil.copytree(path, target)
                else:
                    shutil.copy2(path, target)
                kept[role] = str(target)
            op = {**op, "files": kept}
        self._ops.append(op)

    def _do(self, op: dict) -> None:
        kind = op["op"]
        files = op.get("files", {})
        if kind == "artifact":
            path = Path(files["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), op.get("artifact_path"))
            else:
                self.client.log_artifact(self.run_id, str(path), op.get("artifact_path"))
        elif kind == "params":
            items = [Param(k, v) for k, v in op["params"].items()]
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id,
                                      params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        elif kind == "tags":
            items = [RunTag(k, v) for k, v in op["tags"].items()]
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        elif kind == "dataset":
            dataset = Dataset(**op["dataset"])
            tags = [InputTag(k, v) for k, v in op["input_tags"].items()]
            inputs = [DatasetInput(dataset, tags)]
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
            except Exception as e:
                if not _lost_insert_race(e):
                    raise
                # Runs of the same data share one dataset row, which MLflow looks up and
                # then inserts: another process inserted it in between. It exists now, so
                # the second try only links it to this run.
                self.client.log_inputs(self.run_id, datasets=inputs)
        elif kind == "model":
            self._log_model_now(op, files)
        elif kind == "end":
            self.client.set_terminated(self.run_id, op["status"], op["end_time"])
        else:
            raise _UserError(f"unknown spooled operation {kind!r}")

    # ---------------------------------------------------------------- artifacts

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a directory into the run's artifacts under ``artifact_path``."""
        path = Path(local_path)
        if not path.exists():
            raise ValueError(f"log_artifact: {path} does not exist")
        self._submit({"op": "artifact", "files": {"path": str(path)},
                      "artifact_path": artifact_path})

    def _log_rendered(self, artifact_file: str, write) -> None:  # noqa: ANN001
        artifact_file = artifact_file.strip("/")
        directory, _, filename = artifact_file.rpartition("/")
        if not filename:
            raise ValueError(f"artifact path {artifact_file!r}: must name a file")
        with tempfile.TemporaryDirectory(prefix="bp-artifact-") as tmp:
            path = Path(tmp) / filename
            write(path)
            self._submit({"op": "artifact", "files": {"path": str(path)},
                          "artifact_path": directory or None})

    def log_figure(self, fig: Any, artifact_file: str, **savefig_kwargs: Any) -> None:
        """Save a matplotlib figure as artifact ``artifact_file`` (e.g. ``plots/loss.png``).

        No ``bbox_inches="tight"`` by default: our figures use constrained layout already,
        and the extra layout pass costs about a quarter of the save time.
        """
        self._log_rendered(artifact_file, lambda p: fig.savefig(p, **savefig_kwargs))

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Save a dict as JSON (or YAML for ``.yaml``/``.yml``) artifact ``artifact_file``."""
        def write(path: Path) -> None:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                path.write_text(yaml.safe_dump(_plain(dictionary), sort_keys=False))
            else:
                path.write_text(json.dumps(_plain(dictionary), indent=2, default=str))

        self._log_rendered(artifact_file, write)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Save ``data`` (a rendered image, a file's contents) as artifact ``artifact_file``."""
        self._log_rendered(artifact_file, lambda p: p.write_bytes(data))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save ``text`` as artifact ``artifact_file``."""
        self._log_rendered(artifact_file, lambda p: p.write_text(text, encoding="utf-8"))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified and cut to MLflow's limit)."""
        clean = {str(k): _truncate(_param_text(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        if clean:
            self._submit({"op": "tags", "tags": clean})

    def log_dataset(
        self,
        df: pd.DataFrame,
        name: str,
        source: str | None = None,
        digest: str | None = None,
        context: str = "training",
        targets: str | None = None,
    ) -> None:
        """Record ``df`` as the run's dataset input (name, digest, source, schema, profile).

        ``source`` is a file path, a ``file:``/``http(s):`` URI, or a free description of how
        the data was made (``"sklearn.datasets.make_moons(n_samples=500, noise=0.2)"``). The
        digest defaults to MLflow's hash of the data.
        """
        if digest is not None and len(digest) > MAX_DATASET_DIGEST_SIZE:
            raise ValueError(f"digest={digest!r}: at most {MAX_DATASET_DIGEST_SIZE} characters")
        with warnings.catch_warnings():
            # MLflow warns about source resolution and pandas deprecations; not actionable.
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_pandas(
                df, source=_dataset_source(source), name=name, digest=digest, targets=targets
            )
            entity = dataset._to_mlflow_entity()
        self._submit({
            "op": "dataset",
            "dataset": {
                "name": entity.name, "digest": entity.digest,
                "source_type": entity.source_type, "source": entity.source,
                "schema": entity.schema, "profile": entity.profile,
            },
            "input_tags": {"mlflow.data.context": context},
        })

    # ----------------------------------------------------------------------- model

    def log_model(
        self,
        model: Any,
        input_example: pd.DataFrame | np.ndarray,
        name: str = "model",
        class_names: Sequence[str] | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> str:
        """Log ``model`` (an MLP) as an MLflow pyfunc model; return ``runs:/<id>/<name>``.

        Parameters
        ----------
        model : MLP
        input_example : DataFrame or array of shape (n, n_features)
            A few input rows; gives the signature and the stored input example.
        class_names : sequence of str, optional
            Output column names (default ``proba_0``, ``proba_1``, ...).
        feature_names : sequence of str, optional
            Input column names when ``input_example`` is an array (default ``x1``, ``x2``, ...).
        """
        example = _example_frame(input_example, feature_names)
        n_classes = model.predict_proba(example.to_numpy(dtype=np.float64)).shape[1]
        columns = list(class_names) if class_names else [f"proba_{i}" for i in range(n_classes)]
        if len(columns) != n_classes:
            raise ValueError(f"class_names={columns!r}: the model has {n_classes} classes")
        with tempfile.TemporaryDirectory(prefix="bp-model-") as tmp:
            weights = model_io.save_model(model, Path(tmp) / "weights.npz")
            example_path = Path(tmp) / "input_example.json"
            example_path.write_text(example.to_json(orient="split"))
            self._submit({
                "op": "model", "name": name, "output_columns": columns,
                "files": {"weights": str(weights), "example": str(example_path)},
            })
        return f"runs:/{self.run_id}/{name}"

    def _log_model_now(self, op: dict, files: Mapping[str, str]) -> None:
        from mlflow.entities import LoggedModelStatus

        name = op["name"]
        example = pd.read_json(
            io.StringIO(Path(files["example"]).read_text()), orient="split", dtype=False
        ).astype(np.float64)  # JSON would turn 0.0 into an integer column
        weights = model_io.load_model(files["weights"])  # validates what we are about to ship
        proba = weights.predict_proba(example.to_numpy(dtype=np.float64))
        output = pd.DataFrame(proba, columns=op["output_columns"])
        with _quiet_mlflow():
            signature = infer_signature(example, output)
        # A previous attempt that died half-way leaves a non-READY model with this name that
        # `runs:/<id>/<name>` could resolve to: remove it first.
        for old in self.client.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"name = '{name}'"
        ):
            if old.source_run_id == self.run_id and old.status != LoggedModelStatus.READY:
                self.client.delete_logged_model(old.model_id)
        logged = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id
        )
        with tempfile.TemporaryDirectory(prefix="bp-pyfunc-") as tmp:
            code = Path(tmp) / "mlp_pyfunc.py"
            code.write_text(_PYFUNC_CODE)
            # Kept as an artifact, not model_config: MLflow copies model_config into run params.
            columns = Path(tmp) / "columns.json"
            columns.write_text(json.dumps({
                "feature_names": list(example.columns),
                "output_columns": list(op["output_columns"]),
            }))
            with _global_tracking_uri(self.uri), _quiet_mlflow():
                Model.log(
                    artifact_path=None,
                    name=name,
                    flavor=mlflow.pyfunc,
                    run_id=self.run_id,
                    model_id=logged.model_id,
                    python_model=str(code),
                    artifacts={"weights": files["weights"], "columns": str(columns)},
                    code_paths=[str(_package_copy(Path(tmp) / "code"))],
                    signature=signature,
                    input_example=example,
                    pip_requirements=_pip_requirements(),
                )

    # -------------------------------------------------------------------- spool

    def _require_run(self) -> None:
        if self.run_id is None:
            raise RuntimeError("RunTracker: call start() first")

    def _ensure_spool_dir(self) -> Path:
        if self.spool_dir is None:
            self.spool_dir = self._spool_root / self.run_id
        (self.spool_dir / "files").mkdir(parents=True, exist_ok=True)
        return self.spool_dir

    def _went_offline(self, error: BaseException) -> None:
        self._offline_until = time.monotonic() + self.retry_after_s
        self._last_error = _describe(error)
        self._persist_spool()
        if not self._warned:
            self._warned = True
            logger.warning("%s", self.spool_message)

    @property
    def spool_message(self) -> str | None:
        """What was kept on disk and how to upload it (None if nothing is spooled)."""
        if self.spool_dir is None:
            return None
        return (
            f"MLflow tracking store {self.uri} could not be written ({self._last_error}); "
            f"kept {len(self._metrics)} metric values and {len(self._ops)} pending "
            f"operations of run {self.run_id} in {self.spool_dir}. Upload them later with: "
            f"python -m pipeline.tracking upload {self.spool_dir}"
        )

    def _persist_spool(self) -> None:
        spool = self._ensure_spool_dir()
        _write_json(spool / "run.json", {
            "run_id": self.run_id, "experiment_id": self.experiment_id,
            "tracking_uri": self.uri, "last_error": self._last_error,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        _write_json(spool / "ops.json", [_relative_files(op, spool) for op in self._ops])
        tmp = spool / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "value", "timestamp", "step"])
            for m in self._metrics:
                writer.writerow([m.key, repr(m.value), m.timestamp, m.step])
        os.replace(tmp, spool / "metrics.csv")

    def _clear_spool(self) -> None:
        """Everything reached the store after all: the disk copy is no longer needed."""
        if self.spool_dir is not None:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
            logger.info("run %s: spooled data uploaded to %s", self.run_id, self.uri)
        self.spool_dir = None
        self._warned = False


class _UserError(ValueError):
    """A programming error in an operation: raised, never spooled."""


# Errors that mean "the request was understood and refused": resending later cannot help.
_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
            "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def _is_store_failure(error: BaseException) -> bool:
    """True when the store could not be reached or written (worth keeping data for later);
    False for programming errors and requests the store refused, which are raised."""
    import requests
    import sqlalchemy.exc

    if isinstance(error, MlflowException):
        return error.error_code not in _REFUSED
    return isinstance(
        error, (OSError, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, TimeoutError)
    )


def _lost_insert_race(error: BaseException) -> bool:
    """True for a unique-constraint violation (a row another process inserted first)."""
    import sqlalchemy.exc

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlalchemy.exc.IntegrityError) or "UNIQUE constraint failed" in str(
            error
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _relative_files(op: dict, spool: Path) -> dict:
    """Spooled file paths relative to the spool, so the directory can be moved or copied."""
    if not op.get("files"):
        return op
    files = {}
    for role, path in op["files"].items():
        p = Path(path)
        files[role] = p.relative_to(spool).as_posix() if spool in p.parents else str(p)
    return {**op, "files": files}


def _absolute_files(op: dict, spool: Path) -> dict:
    if not op.get("files"):
        return op
    return {**op, "files": {k: str(spool / v) for k, v in op["files"].items()}}


def _describe(error: BaseException) -> str:
    text = error.message if isinstance(error, MlflowException) else str(error)
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text[:300]}"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """User, source file, git commit (what fluent ``start_run`` adds), then ``tags``."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in resolve_tags(tags).items()}
    except Exception:  # context tags are a nicety; never fail a run for them
        return dict(tags)


def _dataset_source(source: str | None) -> Any:
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if source is None:
        return None
    if re.match(r"^(https?|s3|gs|file)://", source) or re.match(r"^file:", source):
        return source
    if os.path.exists(source):
        return Path(source).resolve().as_uri()
    # A description of generated data (not a path MLflow could resolve).
    return CodeDatasetSource(tags={"description": source})


def _example_frame(example: Any, feature_names: Sequence[str] | None) -> pd.DataFrame:
    if isinstance(example, pd.DataFrame):
        return example.astype(np.float64).reset_index(drop=True)
    X = np.asarray(example, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"input_example has shape {X.shape}; need (n_samples, n_features)")
    names = list(feature_names) if feature_names else [f"x{i + 1}" for i in range(X.shape[1])]
    if len(names) != X.shape[1]:
        raise ValueError(f"feature_names={names!r}: input_example has {X.shape[1]} columns")
    return pd.DataFrame(X, columns=names)


# ------------------------------------------------------------ reading runs back (reports)


def find_experiment_id(uri: str, name: str, *, create_store: bool = True) -> str | None:
    """The id of the active experiment called ``name`` in ``uri``, or None if there is none.

    With ``create_store=False`` an SQLite store that does not exist yet is left uncreated
    (opening it with MLflow would create and migrate it) and None is returned.
    """
    db = _sqlite_path(uri)
    if not create_store and db is not None:
        if not db.exists():
            return None
        # The file appears when another process starts creating the store, which it
        # migrates under the store lock: opening it before that ends would migrate it a
        # second time, concurrently. Wait for the lock once.
        with _store_lock(uri):
            pass
    experiment = MlflowClient(uri).get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        return None
    return experiment.experiment_id


def search_runs(
    uri: str,
    experiment_ids: Sequence[str],
    filter_string: str = "",
    order_by: Sequence[str] | None = None,
) -> pd.DataFrame:
    """``mlflow.search_runs`` against ``uri``: one row per run (all pages), as a DataFrame.

    Columns as MLflow names them: ``run_id``, ``status``, ``start_time``, ``metrics.<key>``
    (latest value of each metric), ``params.<key>``, ``tags.<key>``. Empty frame if no run
    matches.
    """
    with _global_tracking_uri(uri), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.search_runs(
            experiment_ids=[str(e) for e in experiment_ids],
            filter_string=filter_string,
            order_by=list(order_by) if order_by else None,
            output_format="pandas",
        )


def download_artifact(uri: str, run_id: str, path: str, dst_dir: str | os.PathLike) -> Path:
    """Download one artifact of a run (``runs:/<id>/<path>``, so the files of the run's
    logged model such as ``model/artifacts/weights.npz`` resolve too) into ``dst_dir``."""
    # The global URI too: MLflow resolves a logged model's files through it.
    with _global_tracking_uri(uri), _quiet_mlflow():
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/{path}", dst_path=os.fspath(dst_dir), tracking_uri=uri
        )
    return Path(local)


def logged_model_locations(uri: str, experiment_id: str, run_ids: Sequence[str],
                           name: str = "model") -> dict[str, str]:
    """Where the READY logged model ``name`` of each of ``run_ids`` keeps its files, as
    ``{run_id: artifact URI}``, from one search of the experiment's logged models.

    ``runs:/<id>/<name>/...`` resolves the same place, at the cost of a run lookup and a
    model search for every run (about 35 ms each on SQLite). Runs without such a model are
    left out; where a run logged several, the newest counts.
    """
    from mlflow.entities import LoggedModelStatus

    wanted = set(run_ids)
    found: dict[str, tuple[int, str]] = {}
    client = MlflowClient(uri)
    token = None
    with _quiet_mlflow():
        while True:
            page = client.search_logged_models(
                experiment_ids=[str(experiment_id)], filter_string=f"name = '{name}'",
                page_token=token)
            for model in page:
                run = model.source_run_id
                if run not in wanted or model.status != LoggedModelStatus.READY:
                    continue
                if run not in found or model.creation_timestamp > found[run][0]:
                    found[run] = (model.creation_timestamp, model.artifact_location)
            token = page.token
            if not token:
                break
    return {run: location for run, (_, location) in found.items()}


def download_artifact_uri(uri: str, artifact_uri: str, dst_dir: str | os.PathLike) -> Path:
    """Download the artifact at ``artifact_uri`` (as :func:`logged_model_locations` gives,
    plus a path inside it) into ``dst_dir``."""
    with _global_tracking_uri(uri), _quiet_mlflow():
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=os.fspath(dst_dir), tracking_uri=uri)
    return Path(local)


# ---------------------------------------------------------------------------- upload


def _spool_dirs(path: Path) -> list[Path]:
    if (path / "run.json").is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / "run.json").is_file()) if path.is_dir() else []


def upload_spool(spool_dir: str | os.PathLike, uri: str | None = None) -> dict[str, int]:
    """Send what a run kept on disk to its tracking store.

    Parameters
    ----------
    spool_dir : path-like
        One run's spool directory (``.../.spool/<run_id>``) or a directory of them.
    uri : str, optional
        Tracking URI; default the one recorded in the spool.

    Returns
    -------
    dict
        Counts: ``runs``, ``metrics``, ``operations`` uploaded.

    Raises
    ------
    TrackingUnavailable
        If the store is still unreachable (the spool is left as it was, minus what was sent).
    """
    path = Path(spool_dir)
    dirs = _spool_dirs(path)
    if not dirs:
        raise ValueError(f"{path}: no spooled run here (expected run.json)")
    totals = {"runs": 0, "metrics": 0, "operations": 0}
    for spool in dirs:
        info = json.loads((spool / "run.json").read_text())
        target = uri or info["tracking_uri"]
        check_reachable(target)
        tracker = RunTracker.attach(target, info["run_id"], spool_root=spool.parent)
        tracker.spool_dir = spool
        with open(spool / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        tracker._metrics = [
            Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows
        ]
        tracker._ops = [
            _absolute_files(op, spool) for op in json.loads((spool / "ops.json").read_text())
        ]
        n_ops = len(tracker._ops)
        ok = tracker.flush(force=True)
        tracker.active = False
        atexit.unregister(tracker._at_exit)
        if not ok:
            raise TrackingUnavailable(tracker.spool_message or f"upload of {spool} failed")
        totals["runs"] += 1
        totals["metrics"] += len(rows)
        totals["operations"] += n_ops
    return totals


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.tracking upload DIR [--uri URI]`` / ``ui``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload runs kept on disk while MLflow was unreachable")
    up.add_argument("dir", help="a spool directory (mlruns/.spool/<run_id>) or mlruns/.spool")
    up.add_argument("--uri", default=None, help="tracking URI (default: the one recorded)")
    ui = sub.add_parser("ui", help="print the command that opens the MLflow UI")
    ui.add_argument("--uri", default=None)
    args = parser.parse_args(argv)
    if args.command == "ui":
        print(ui_command(args.uri or resolve_tracking_uri("local")))
        return 0
    try:
        totals = upload_spool(args.dir, args.uri)
    except (TrackingUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {totals['runs']} run(s): {totals['metrics']} metric values, "
          f"{totals['operations']} operations")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "HTTP_ENV_DEFAULTS", "MLPPyfuncModel", "PhaseTimer", "RunTracker", "TrackingUnavailable",
    "check_reachable", "default_artifact_root", "download_artifact", "download_artifact_uri",
    "find_experiment_id", "logged_model_locations",
    "flatten_config", "limit_http_retries", "search_runs",
    "local_tracking_uri", "prepare_experiment", "project_root", "resolve_tracking_uri",
    "run_url", "ui_command", "upload_spool",
]
