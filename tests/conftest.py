"""Shared fixtures: composed configs, throw-away MLflow stores, and the real ``train.py``.

Every fixture points its outputs at ``tmp_path`` (or a per-module temporary directory):
no test writes ``mlflow.db``, ``mlruns/``, ``outputs/`` or ``multirun/`` into the repository.

- ``compose(*overrides)`` / ``config(*overrides)``: ``conf/`` composed by Hydra's
  ``initialize_config_dir`` exactly as ``train.py`` would, validated; ``config`` gives the
  plain resolved dict that :func:`pipeline.app.job.run` takes.
- ``new_store(directory)``: a fresh, already migrated SQLite store (a copy of one migrated
  once per session: migrating a new ``mlflow.db`` costs seconds). Returns its URI.
- ``tracking_env``: a store under ``tmp_path`` with ``MLFLOW_TRACKING_URI`` set to it for
  the test (in-process runs with ``tracking=local`` log there).
- ``run_train(*overrides, env=...)``: ``python train.py`` in a subprocess, working
  directory and Hydra output directories under ``tmp_path``; returns the
  ``CompletedProcess``. ``MLFLOW_TRACKING_URI`` defaults to a store under ``tmp_path``
  (``<tmp_path>/guard/mlflow.db``) so a test that forgets ``tracking_env`` still cannot log
  into the project's store. ``make_train_runner(directory)`` builds one for module-scoped
  fixtures.
- ``free_port()``: a TCP port nothing listens on (for servers started by tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = ROOT / "train.py"
CONF_DIR = ROOT / "conf"
#: Seconds one ``train.py`` subprocess may take before the test fails (a loaded 2-core CI box).
TRAIN_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- configs


@pytest.fixture
def compose() -> Callable[..., object]:
    """``compose(*overrides, check=True)`` -> the validated ``DictConfig`` of ``conf/``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.app.config import register_configs, validate

    register_configs()

    def _compose(*overrides: str, check: bool = True):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        if check:
            validate(cfg)
        return cfg

    return _compose


@pytest.fixture
def config(compose) -> Callable[..., dict]:
    """``config(*overrides)`` -> the plain dict ``pipeline.app.job.main`` hands to ``run``."""
    from omegaconf import OmegaConf

    def _config(*overrides: str) -> dict:
        plain = OmegaConf.to_container(compose(*overrides), resolve=True)
        plain.pop("hydra", None)
        return plain

    return _config


# ------------------------------------------------------------------------------ stores


def sqlite_uri(db: Path) -> str:
    return f"sqlite:///{Path(db).resolve().as_posix()}"


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """One empty, migrated SQLite store per session; tests get copies of it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    directory = tmp_path_factory.mktemp("template-store")
    db = directory / "mlflow.db"
    store = SqlAlchemyStore(sqlite_uri(db), (directory / "mlruns").as_uri())
    store.engine.dispose()
    return db


@pytest.fixture(scope="session")
def new_store(_migrated_store) -> Callable[[Path], str]:
    """``new_store(directory)`` -> URI of a fresh store ``<directory>/mlflow.db``.

    Experiments created in it by the pipeline keep their artifacts in
    ``<directory>/mlruns`` (the pipeline anchors them next to the database).
    """

    def _new(directory: Path) -> str:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        db = directory / "mlflow.db"
        shutil.copyfile(_migrated_store, db)
        return sqlite_uri(db)

    return _new


@dataclass(frozen=True)
class TrackingEnv:
    """A test's own MLflow store: ``uri`` (also in ``MLFLOW_TRACKING_URI``), ``db``, ``root``."""

    uri: str
    db: Path
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    def runs(self, experiment: str = "backprop") -> list:
        """Every run of ``experiment`` (oldest first); [] if the experiment does not exist."""
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture
def tracking_env(tmp_path, monkeypatch, new_store) -> TrackingEnv:
    """A store at ``<tmp_path>/store/mlflow.db``, exported as ``MLFLOW_TRACKING_URI``."""
    root = tmp_path / "store"
    uri = new_store(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return TrackingEnv(uri=uri, db=root / "mlflow.db", root=root)


# ---------------------------------------------------------------------- real train.py


def _train_runner(workdir: Path) -> Callable[..., subprocess.CompletedProcess]:
    workdir = Path(workdir)

    def run_train(
        *overrides: str,
        env: Mapping[str, str] | None = None,
        timeout: float = TRAIN_TIMEOUT_S,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """``python train.py *overrides`` with outputs under ``workdir``; never raises on failure.

        ``env`` entries are added to (a copy of) this process's environment.
        """
        run_dir = Path(cwd) if cwd is not None else workdir / "cwd"
        run_dir.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        # Default store under workdir: never the project's mlflow.db.
        full_env.setdefault("MLFLOW_TRACKING_URI", sqlite_uri(workdir / "guard" / "mlflow.db"))
        full_env.update(env or {})
        full_env.pop("HYDRA_FULL_ERROR", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        command = [
            sys.executable, str(TRAIN_PY), *overrides,
            f"hydra.run.dir={workdir / 'outputs'}",
            f"hydra.sweep.dir={workdir / 'multirun'}",
        ]
        return subprocess.run(
            command, cwd=run_dir, env=full_env, capture_output=True, text=True, timeout=timeout
        )

    return run_train


@pytest.fixture(scope="session")
def make_train_runner() -> Callable[[Path], Callable[..., subprocess.CompletedProcess]]:
    """``make_train_runner(directory)`` -> a ``run_train`` writing under ``directory``."""
    return _train_runner


@pytest.fixture
def run_train(tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """``run_train(*overrides, env=None)`` -> ``CompletedProcess`` of the real ``train.py``."""
    return _train_runner(tmp_path)


# ------------------------------------------------------------------------------- misc


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()`` -> a localhost TCP port nothing listens on right now."""

    def _free() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return _free
