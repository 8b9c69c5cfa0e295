"""Where runs are stored: tracking URIs, the local default store, and whether it is reachable.

Nothing here imports MLflow (a second or more to load), so a process can decide on its
store, check it and fail fast before paying for MLflow.
:mod:`pipeline.tracking.tracker` re-exports everything for its callers.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from pipeline.paths import project_root

TRACKING_KINDS = ("local", "server", "none")
# Bounds on MLflow's own HTTP client (its defaults retry 7 times with exponential backoff,
# minutes of waiting when a server is down). Set with setdefault: a user's export wins.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or used; the message names the URI."""


# ------------------------------------------------------------------------ where stores live


def local_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``sqlite:///<root>/mlflow.db`` with an absolute path (root: the project root)."""
    root = Path(root) if root is not None else project_root()
    return f"sqlite:///{(root / 'mlflow.db').resolve().as_posix()}"


def resolve_tracking_uri(kind: str, uri: str | None = None) -> str | None:
    """The tracking URI a run should use.

    Parameters
    ----------
    kind : {"local", "server", "none"}
        ``none`` disables tracking (returns None, even if ``MLFLOW_TRACKING_URI`` is set).
    uri : str, optional
        For ``server``, the server's ``http(s)://`` address (required). For ``local``, an
        optional store URI; a relative ``sqlite:///`` path is anchored at the project root.

    Returns
    -------
    str or None
        ``MLFLOW_TRACKING_URI`` when set (as MLflow users expect), else the URI for ``kind``.
    """
    if kind not in TRACKING_KINDS:
        raise ValueError(f"tracking={kind!r}: unknown; known: {', '.join(TRACKING_KINDS)}")
    if kind == "none":
        return None
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if kind == "server":
        if not uri or not re.match(r"^https?://[^/]+", uri):
            raise ValueError(
                f"tracking.uri={uri!r}: tracking=server needs the server's http(s) address, "
                "like http://127.0.0.1:5000 (or set MLFLOW_TRACKING_URI)"
            )
        return uri.rstrip("/")
    if not uri:
        return local_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path would be relative to Hydra's run directory: anchor it.
        return local_tracking_uri_for(project_root() / uri.removeprefix("sqlite:///"))
    return uri


def local_tracking_uri_for(db_path: str | os.PathLike) -> str:
    """``sqlite:///`` URI of an SQLite file, made absolute."""
    return f"sqlite:///{Path(db_path).resolve().as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def default_artifact_root(uri: str) -> str | None:
    """Where experiments created by :func:`prepare_experiment` keep artifacts by default.

    For an SQLite store, ``<directory of the .db>/mlruns`` as an absolute file URI (MLflow's
    own default is ``./mlruns`` relative to the working directory: the trap). For a server,
    None: the server decides (``--default-artifact-root`` / proxied artifacts).
    """
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlruns").as_uri()


def _as_uri(location: str | os.PathLike) -> str:
    text = os.fspath(location)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text) and not re.match(r"^[A-Za-z]:[\\/]", text):
        return text
    return Path(text).resolve().as_uri()


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri`` (for the end-of-run summary)."""
    if re.match(r"^https?://", uri):
        return f"open {uri} in a browser (the tracking server serves the UI)"
    parts = ["mlflow", "ui", "--backend-store-uri", uri]
    root = default_artifact_root(uri)
    if root is not None:
        parts += ["--default-artifact-root", root]
    return " ".join(_shell_quote(p) for p in parts)


def _shell_quote(text: str) -> str:
    return text if re.fullmatch(r"[\w@%+=:,./-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the UI of a tracking server (None for a local store)."""
    if not re.match(r"^https?://", uri):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# ---------------------------------------------------------------------- reaching the store


def limit_http_retries(overrides: Mapping[str, str] | None = None) -> None:
    """Bound MLflow's HTTP retries and timeouts in this process (user exports still win)."""
    for key, value in {**HTTP_ENV_DEFAULTS, **(overrides or {})}.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before training, when the tracking store cannot be used.

    For ``http(s)`` URIs, one GET of ``<uri>/health`` (no retries, ``timeout_s``); for
    SQLite, the database's directory must be creatable and writable. Also bounds MLflow's
    own HTTP retries for the rest of the process (:func:`limit_http_retries`).

    Raises
    ------
    TrackingUnavailable
        Naming the URI and what to do, within about ``timeout_s`` seconds.
    """
    limit_http_retries()
    if re.match(r"^https?://", uri):
        _check_http(uri, timeout_s)
        return
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailable(
                f"tracking store {uri}: cannot create {db.parent} ({e})"
            ) from e
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingUnavailable(f"tracking store {uri}: {db} is not writable")


def _check_http(uri: str, timeout_s: float) -> None:
    url = f"{uri.rstrip('/')}/health"
    hint = (
        "start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix "
        "tracking.uri / MLFLOW_TRACKING_URI, or run with tracking=local or tracking=none"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            response.read(64)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is failing: GET /health answered HTTP {e.code}; "
                + hint
            ) from None
        # 4xx: something answers (auth, a proxy without /health); MLflow reports the rest.
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({reason}); {hint}"
        ) from None


def metric_rows(
    metrics: Mapping[str, object], step: int, timestamp_ms: int
) -> list[tuple[str, float, int, int]]:
    """``(key, value, timestamp_ms, step)`` rows of a metrics dict, values checked to be
    numbers (a ValueError names the first that is not)."""
    rows = []
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r}={value!r}: metric values must be numbers") from None
        rows.append((str(key), number, int(timestamp_ms), int(step)))
    return rows
