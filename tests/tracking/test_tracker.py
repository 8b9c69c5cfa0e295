"""Tracking against real stores: SQLite files in tmp_path, and (slow) real MLflow servers.

No mocks: a "dead server" is a real closed port, a "server killed mid-run" is a real
``mlflow server`` process stopped by its pid.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from servers import wait_http

from pipeline.engine.mlp import MLP
from pipeline.tracking import tracker as tracking
from pipeline.tracking.tracker import (
    PhaseTimer,
    RunTracker,
    TrackingUnavailable,
    check_reachable,
    flatten_config,
    prepare_experiment,
    resolve_tracking_uri,
    ui_command,
    upload_spool,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = ("train/loss", "test/loss", "train/accuracy", "test/accuracy")
MLFLOW_BIN = str(Path(sys.executable).parent / "mlflow")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """One migrated empty store; tests copy it (migrating a fresh one costs seconds)."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking._create_sqlite_store(tracking.local_tracking_uri_for(db), db.parent.as_uri())
    return db


@pytest.fixture
def uri(tmp_path, template_db) -> str:
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(template_db, db)
    return tracking.local_tracking_uri_for(db)


@pytest.fixture
def exp_id(uri) -> str:
    return prepare_experiment(uri, "test")


@pytest.fixture
def tracker(uri, exp_id, tmp_path):
    t = RunTracker(uri, flush_every_s=3600, spool_root=tmp_path / "spool")
    yield t
    if t.active:
        t.end("KILLED", "test teardown")


@pytest.fixture(autouse=True)
def _no_uri_leak(monkeypatch):
    """Each test starts without MLFLOW_TRACKING_URI and must not leave one behind."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield
    assert "MLFLOW_TRACKING_URI" not in os.environ, "a test or the tracker leaked the URI"


def _model(n_out: int = 1, seed: int = 0) -> MLP:
    output = "sigmoid" if n_out == 1 else "softmax"
    model = MLP([2, 8, n_out], activation="tanh", output=output, seed=seed)
    model.set_params(np.random.default_rng(seed).normal(size=model.params.shape))
    return model


def _X(n: int = 30) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- URIs, config


def test_resolve_tracking_uri(monkeypatch):
    root = tracking.project_root()
    assert (root / "pyproject.toml").is_file() and (root / "pipeline").is_dir()
    assert resolve_tracking_uri("local") == f"sqlite:///{root.as_posix()}/mlflow.db"
    assert resolve_tracking_uri("local", "sqlite:///other.db") == (
        f"sqlite:///{root.as_posix()}/other.db"
    )
    assert resolve_tracking_uri("server", "http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("none") is None
    with pytest.raises(ValueError, match="tracking=server needs"):
        resolve_tracking_uri("server", None)
    with pytest.raises(ValueError, match="known: local, server, none"):
        resolve_tracking_uri("sqlite")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert resolve_tracking_uri("local") == "http://elsewhere:5000"
    assert resolve_tracking_uri("server", "http://127.0.0.1:5000") == "http://elsewhere:5000"
    assert resolve_tracking_uri("none") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def test_ui_command(uri):
    db = uri.removeprefix("sqlite:///")
    cmd = ui_command(uri)
    assert cmd.startswith(f"mlflow ui --backend-store-uri sqlite:///{db}")
    assert f"--default-artifact-root file://{Path(db).parent}/mlruns" in cmd
    assert "http://h:5000" in ui_command("http://h:5000")


def test_flatten_config():
    from omegaconf import OmegaConf

    nested = {
        "model": {"hidden_sizes": [16, 16], "activation": "tanh", "bias": True, "extra": {}},
        "optimizer": {"lr": 0.01, "schedule_params": {"gamma": 0.5}},
        "dataset": {"path": None, "long": "x" * 10_000},
        "k" * 300: 1,
    }
    flat = flatten_config(OmegaConf.create(nested))  # Hydra's containers are Mappings
    assert flatten_config({"a": {"b": np.float32(0.25), "c": (1, 2)}}) == {
        "a.b": "0.25", "a.c": "[1, 2]"
    }
    assert flat["model.hidden_sizes"] == "[16, 16]"
    assert flat["model.activation"] == "tanh"
    assert flat["model.bias"] == "true"
    assert flat["model.extra"] == "{}"
    assert flat["optimizer.lr"] == "0.01"
    assert flat["optimizer.schedule_params.gamma"] == "0.5"
    assert flat["dataset.path"] == "null"
    long = flat["dataset.long"]
    assert len(long) == 6000 and long.endswith("...[truncated]")
    assert all(len(k) <= 250 for k in flat)
    assert all(isinstance(v, str) for v in flat.values())


# ------------------------------------------------------------------------------- metrics


def test_metrics_are_buffered_then_sent_in_batches(tracker, exp_id, uri):
    client = MlflowClient(uri)
    run_id = tracker.start(exp_id, "buffered", {"a": 1})
    calls = []
    real_log_batch = tracker.client.log_batch

    def counting_log_batch(run_id, metrics=(), **kw):  # a spy around the real call
        calls.append(len(metrics))
        return real_log_batch(run_id, metrics=metrics, **kw)

    tracker.client.log_batch = counting_log_batch
    for epoch in range(1, 1001):
        tracker(epoch, {k: 1.0 / epoch + i for i, k in enumerate(METRICS)})
    assert calls == [] and client.get_metric_history(run_id, "train/loss") == []

    started = time.perf_counter()
    assert tracker.flush() is True
    elapsed = time.perf_counter() - started
    print(f"\nlog_batch: 1000 epochs x 4 metrics flushed in {elapsed:.3f} s, calls {calls}")
    assert calls == [1000, 1000, 1000, 1000]
    for i, key in enumerate(METRICS):
        history = client.get_metric_history(run_id, key)
        assert len(history) == 1000
        assert sorted(m.step for m in history) == list(range(1, 1001))
        by_step = {m.step: m.value for m in history}
        assert by_step[4] == pytest.approx(0.25 + i)
    tracker.end()


def test_flush_every_epochs_and_timings(tracker, exp_id, uri):
    tracker.flush_every_epochs = 10
    run_id = tracker.start(exp_id, "periodic")
    for epoch in range(1, 26):
        tracker(epoch, {"train/loss": float(epoch)})
    client = MlflowClient(uri)
    assert len(client.get_metric_history(run_id, "train/loss")) == 20
    timer = PhaseTimer()
    with timer("data"):
        pass
    timer.add("train", 1.5)
    tracker.log_timings(timer)
    tracker(26, {"train/loss": float("inf"), "test/loss": float("nan")})
    tracker.end()
    run = client.get_run(run_id)
    assert len(client.get_metric_history(run_id, "train/loss")) == 26
    assert run.data.metrics["time/train"] == 1.5 and "time/data" in run.data.metrics
    assert np.isnan(run.data.metrics["test/loss"])
    assert run.data.metrics["train/loss"] > 1e300  # inf is kept as inf (or the max float)


def test_bad_metric_value_names_the_key(tracker, exp_id):
    tracker.start(exp_id, "bad")
    with pytest.raises(ValueError, match="metric 'train/loss'='abc'"):
        tracker(1, {"train/loss": "abc"})


# ------------------------------------------------------------------------ params, runs


def test_params_tags_and_nested_runs(tracker, exp_id, uri, tmp_path):
    config = {"model": {"hidden_sizes": [16, 16], "activation": "tanh"},
              "optimizer": {"name": "adam", "lr": 0.01}}
    parent = RunTracker(uri, spool_root=tmp_path / "spool")
    parent_id = parent.start(exp_id, "sweep", {"sweep": {"params": "lr=0.01,0.1"}})
    child_id = tracker.start(exp_id, "moons-16x16", config, tags={"dataset": "moons"},
                             parent_run_id=parent_id)
    assert mlflow.active_run() is None  # no fluent state anywhere
    tracker.set_tags({"overrides": ["optimizer.lr=0.01"], "best": True})
    tracker.end()
    parent.end()
    client = MlflowClient(uri)
    child = client.get_run(child_id)
    assert child.data.params == {"model.hidden_sizes": "[16, 16]", "model.activation": "tanh",
                                 "optimizer.name": "adam", "optimizer.lr": "0.01"}
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["mlflow.runName"] == "moons-16x16"
    assert child.data.tags["dataset"] == "moons"
    assert child.data.tags["overrides"] == '["optimizer.lr=0.01"]'
    assert child.data.tags["best"] == "true"
    assert child.info.experiment_id == exp_id
    assert client.get_run(parent_id).data.params == {"sweep.params": "lr=0.01,0.1"}


@pytest.mark.parametrize(
    ("status", "reason"),
    [("FINISHED", None), ("FAILED", "loss became inf at epoch 12; try a smaller optimizer.lr"),
     ("KILLED", "interrupted by SIGTERM")],
)
def test_end_status_and_reason(tracker, exp_id, uri, status, reason):
    run_id = tracker.start(exp_id, status.lower())
    tracker(1, {"train/loss": 0.5})
    assert tracker.end(status, reason) is None
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == status
    assert run.data.tags.get("failure_reason") == reason
    assert run.data.metrics["train/loss"] == 0.5  # flushed before terminating
    with pytest.raises(ValueError, match="must be one of FINISHED, FAILED, KILLED"):
        tracker.end("DONE")


@pytest.mark.parametrize(("exc", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_context_manager_ends_runs(uri, exp_id, tmp_path, exc, status):
    t = RunTracker(uri, spool_root=tmp_path / "spool")
    with pytest.raises(exc), t:
        t.start(exp_id, "ctx")
        raise exc("boom")
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.info.status == status
    assert "boom" in run.data.tags["failure_reason"] or status == "KILLED"


# ------------------------------------------------------------------- dataset, artifacts


def test_dataset_input(tracker, exp_id, uri, tmp_path):
    run_id = tracker.start(exp_id, "data")
    df = pd.DataFrame(_X(20), columns=["x1", "x2"]).assign(label=np.arange(20) % 2)
    source = "sklearn.datasets.make_moons(n_samples=20, noise=0.2, random_state=0)"
    tracker.log_dataset(df, "moons", source, context="training", targets="label")
    csv_path = tmp_path / "data.csv"
    df.to_csv(csv_path, index=False)
    tracker.log_dataset(df, "moons-csv", str(csv_path), digest="abc123", context="eval")
    tracker.end()
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    gen, csv = by_name["moons"], by_name["moons-csv"]
    assert len(gen.dataset.digest) > 0 and source in gen.dataset.source
    assert gen.dataset.source_type == "code"
    assert {t.key: t.value for t in gen.tags}["mlflow.data.context"] == "training"
    assert json.loads(gen.dataset.profile)["num_rows"] == 20
    assert csv.dataset.digest == "abc123" and csv_path.as_uri() in csv.dataset.source
    assert {t.key: t.value for t in csv.tags}["mlflow.data.context"] == "eval"


def test_artifacts_land_under_the_store_not_the_cwd(uri, tmp_path, monkeypatch):
    elsewhere = tmp_path / "hydra_run_dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp_id = prepare_experiment(uri, "where artifacts go")
    store_dir = Path(uri.removeprefix("sqlite:///")).parent
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).artifact_location == (
        (store_dir / "mlruns" / "where_artifacts_go").as_uri()
    )
    t = RunTracker(uri, spool_root=tmp_path / "spool")
    run_id = t.start(exp_id, "artifacts")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    t.log_figure(fig, "plots/loss.png")
    plt.close(fig)
    t.log_dict({"test/accuracy": 0.97}, "summary.json")
    t.log_dict({"model": {"hidden_sizes": [16]}}, "config.yaml")
    t.log_text("hello", "notes/readme.txt")
    extra = tmp_path / "extra.csv"
    extra.write_text("a,b\n1,2\n")
    t.log_artifact(extra, "data")
    t.log_model(_model(), _X(5))
    t.end()
    artifact_dir = store_dir / "mlruns" / "where_artifacts_go" / run_id / "artifacts"
    assert client.get_run(run_id).info.artifact_uri == artifact_dir.as_uri()
    for rel in ("plots/loss.png", "summary.json", "config.yaml", "notes/readme.txt",
                "data/extra.csv"):
        assert (artifact_dir / rel).is_file(), rel
    assert json.loads((artifact_dir / "summary.json").read_text()) == {"test/accuracy": 0.97}
    models = list((store_dir / "mlruns" / "where_artifacts_go" / "models").glob("*/artifacts"))
    assert len(models) == 1 and (models[0] / "artifacts" / "weights.npz").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing scattered into the working directory


# ------------------------------------------------------------------------ pyfunc model


@pytest.mark.parametrize(("n_out", "class_names"), [(1, None), (3, ["a", "b", "c"])])
def test_pyfunc_model_round_trip(tracker, exp_id, uri, n_out, class_names, tmp_path):
    model = _model(n_out)
    X = _X()
    run_id = tracker.start(exp_id, "model")
    model_uri = tracker.log_model(model, X[:5], class_names=class_names,
                                  feature_names=["f1", "f2"])
    assert model_uri == f"runs:/{run_id}/model"
    tracker.end()
    with tracking._global_tracking_uri(uri):
        loaded = mlflow.pyfunc.load_model(model_uri, dst_path=str(tmp_path))
    df = pd.DataFrame(X, columns=["f1", "f2"])
    out = loaded.predict(df)
    expected_cols = class_names or ["proba_0", "proba_1"]
    assert list(out.columns) == expected_cols
    np.testing.assert_allclose(out.to_numpy(), model.predict_proba(X), rtol=0, atol=1e-15)
    sig = loaded.metadata.signature
    assert sig.inputs.input_names() == ["f1", "f2"]
    assert sig.outputs.input_names() == expected_cols
    # No pickle anywhere: weights are .npz, the wrapper is logged as code.
    local = Path(loaded.metadata.artifact_path.removeprefix("file://"))
    assert not list(local.rglob("*.pkl"))
    assert (local / "artifacts" / "weights.npz").is_file()
    assert (local / "input_example.json").is_file()


def test_logging_a_model_says_nothing_on_stderr(tracker, exp_id, capfd):
    """MLflow announces "Validating input example against model signature" at INFO for
    every model logged: noise in every run's output, which the model logging silences."""
    tracker.start(exp_id, "quiet")
    tracker.log_model(_model(1), _X()[:5])
    tracker.end()
    err = capfd.readouterr().err
    assert "Validating input example" not in err, err


def test_attach_then_detach_keeps_the_status(tracker, exp_id, uri, tmp_path):
    run_id = tracker.start(exp_id, "parent")
    tracker.end("FINISHED")
    later = RunTracker.attach(uri, run_id, spool_root=tmp_path / "spool")
    later.set_tags({"best_child": "abc"})
    later.log_text("a,b\n", "report/summary.csv")
    later.log_metrics({"best/test_accuracy": 0.9})
    assert later.detach() is None and not later.active
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["best_child"] == "abc"
    assert run.data.metrics["best/test_accuracy"] == 0.9
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "report")] == [
        "report/summary.csv"
    ]


def test_reading_runs_back_for_reports(tracker, exp_id, uri, tmp_path):
    model = _model()
    run_id = tracker.start(exp_id, "report me", {"optimizer": {"lr": 0.1}})
    tracker(1, {"test/accuracy": 0.5})
    tracker(2, {"test/accuracy": 0.75})
    tracker.log_model(model, _X(3))
    tracker.end()
    assert tracking.find_experiment_id(uri, "test") == exp_id
    assert tracking.find_experiment_id(uri, "absent") is None
    missing = tmp_path / "missing" / "mlflow.db"
    assert tracking.find_experiment_id(tracking.local_tracking_uri_for(missing), "test",
                                       create_store=False) is None
    assert not missing.exists()
    runs = tracking.search_runs(uri, [exp_id])
    row = runs.set_index("run_id").loc[run_id]
    assert row["metrics.test/accuracy"] == 0.75 and row["params.optimizer.lr"] == "0.1"
    assert row["status"] == "FINISHED"
    weights = tracking.download_artifact(uri, run_id, "model/artifacts/weights.npz", tmp_path)
    from pipeline.tracking.model_files import load_model

    np.testing.assert_array_equal(load_model(weights).params, model.params)
    MlflowClient(uri).delete_experiment(exp_id)
    assert tracking.find_experiment_id(uri, "test") is None  # a deleted one is not found


# -------------------------------------------------------------------- stores, servers


def _prepare_worker(uri, barrier, queue):
    barrier.wait()
    try:
        queue.put(("ok", prepare_experiment(uri, "raced")))
    except Exception as e:  # reported to the parent, which fails the test
        queue.put(("error", repr(e)))


def test_prepare_experiment_concurrently_on_a_fresh_store(tmp_path):
    n = 6
    db = tmp_path / "fresh" / "mlflow.db"
    uri = tracking.local_tracking_uri_for(db)
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_prepare_worker, args=(uri, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert [r[0] for r in results] == ["ok"] * n, results
    assert len({r[1] for r in results}) == 1
    client = MlflowClient(uri)
    names = sorted(e.name for e in client.search_experiments())
    assert names == ["Default", "raced"]
    default = client.get_experiment("0")
    assert default.artifact_location == (db.parent / "mlruns" / "0").as_uri()
    run = client.create_run(results[0][1])  # the store is healthy
    assert client.get_run(run.info.run_id).info.experiment_id == results[0][1]


def test_check_reachable_fails_fast_on_a_closed_port():
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailable, match="is unreachable") as info:
        check_reachable(uri)
    elapsed = time.perf_counter() - started
    print(f"\nclosed port: TrackingUnavailable after {elapsed:.3f} s")
    assert elapsed < 5 and uri in str(info.value)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]  # MLflow's retries bounded too


def test_check_reachable_times_out_on_a_silent_server():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
            check_reachable(uri, timeout_s=0.5)
        assert time.perf_counter() - started < 2.5


def test_start_on_a_dead_server_names_the_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_free_port()}"
    t = RunTracker(uri, spool_root=tmp_path)
    with pytest.raises(TrackingUnavailable, match=f"tracking store {uri}: cannot start run"):
        t.start("1", "r")


def test_a_store_lost_right_after_the_run_is_created_keeps_its_params(
        tracker, exp_id, uri, monkeypatch):
    """The store goes away between creating the run and logging its params (a server
    killed at that moment): the run exists, so it goes on offline and keeps the params
    for the upload, instead of failing a run the store already shows."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    create_run = tracker.client.create_run

    def create_then_lose_the_store(*args, **kwargs):
        run = create_run(*args, **kwargs)
        tracker.client = MlflowClient(f"http://127.0.0.1:{_free_port()}")  # gone
        return run

    monkeypatch.setattr(tracker.client, "create_run", create_then_lose_the_store)
    run_id = tracker.start(exp_id, "params-kept", {"model": {"hidden_sizes": [16, 16]},
                                                   "lr": 0.1})
    spool = tracker.spool_dir
    assert tracker.active and spool is not None and spool.name == run_id
    params = {"model.hidden_sizes": "[16, 16]", "lr": "0.1"}
    ops = json.loads((spool / "ops.json").read_text())
    assert ops[0]["op"] == "params" and ops[0]["params"] == params
    tracker(1, {"train/loss": 0.5})
    assert tracker.end("FINISHED") == spool
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.params == {}
    assert client.get_run(run_id).info.status == "RUNNING"
    assert tracking.main(["upload", str(spool)]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == params
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.5]


def test_spool_when_the_store_goes_away_then_upload(tracker, exp_id, uri, monkeypatch, caplog,
                                                    tmp_path):
    """Mid-run the client is pointed at a real closed port (the store "went away")."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = tracker.start(exp_id, "spooled", {"lr": 0.1})
    for epoch in range(1, 6):
        tracker(epoch, {"train/loss": 1.0 / epoch})
    tracker.flush()
    tracker.client = MlflowClient(f"http://127.0.0.1:{_free_port()}")  # gone
    for epoch in range(6, 11):
        tracker(epoch, {"train/loss": 1.0 / epoch})
    assert tracker.flush() is False
    spool = tracker.spool_dir
    assert spool is not None and spool.name == run_id
    assert "python -m pipeline.tracking upload" in caplog.text and str(spool) in caplog.text
    tracker.log_text("late", "notes/late.txt")
    tracker.log_dataset(pd.DataFrame(_X(4), columns=["x1", "x2"]), "moons", "generated")
    model = _model()
    tracker.log_model(model, _X(3))
    assert tracker.end("KILLED", "interrupted by SIGINT") == spool
    assert len((spool / "metrics.csv").read_text().splitlines()) == 1 + 5
    ops = json.loads((spool / "ops.json").read_text())
    assert [op["op"] for op in ops] == ["artifact", "dataset", "model", "tags", "end"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # not yet known to the store

    moved = spool.parent / "moved"  # the spool can be moved (relative paths inside)
    spool.rename(moved)
    assert tracking.main(["upload", str(moved.parent)]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == "interrupted by SIGINT"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["moons"]
    names = [a.path for a in client.list_artifacts(run_id, "notes")]
    assert names == ["notes/late.txt"]
    with tracking._global_tracking_uri(uri):
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model",
                                          dst_path=str(tmp_path))
    np.testing.assert_array_equal(loaded.predict(pd.DataFrame(_X(), columns=["x1", "x2"])),
                                  model.predict_proba(_X()))
    assert not moved.exists()  # uploaded: removed
    with pytest.raises(ValueError, match="no spooled run here"):
        upload_spool(moved.parent)


# ------------------------------------------------------------------------- slow: servers


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started (and its workers: it leads its own session) by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


class MlflowServer:
    def __init__(self, root: Path, template_db: Path) -> None:
        self.root = root
        self.db = root / "server.db"
        shutil.copy(template_db, self.db)
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [MLFLOW_BIN, "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            # No background job runner (7 extra processes, not needed for tracking).
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        wait_http(f"{self.uri}/health", self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        self.log.close()


@pytest.fixture
def server(tmp_path, template_db):
    srv = MlflowServer(tmp_path, template_db)
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_real_server_receives_a_run(server, tmp_path):
    check_reachable(server.uri)
    exp_id = prepare_experiment(server.uri, "served")
    assert exp_id == prepare_experiment(server.uri, "served")
    t = RunTracker(server.uri, spool_root=tmp_path / "spool")
    run_id = t.start(exp_id, "remote", {"model": {"hidden_sizes": [4]}})
    for epoch in range(1, 301):
        t(epoch, {k: float(epoch) for k in METRICS})
    t.log_text("remote", "notes/remote.txt")
    model = _model()
    t.log_model(model, _X(4))
    assert t.end() is None and t.spool_dir is None
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.hidden_sizes": "[4]"}
    assert all(len(client.get_metric_history(run_id, k)) == 300 for k in METRICS)
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/remote.txt"]
    with tracking._global_tracking_uri(server.uri):
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model",
                                          dst_path=str(tmp_path))
    np.testing.assert_array_equal(loaded.predict(pd.DataFrame(_X(), columns=["x1", "x2"])),
                                  model.predict_proba(_X()))


@pytest.mark.slow
def test_server_killed_mid_run_loses_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    exp_id = prepare_experiment(server.uri, "flaky")
    t = RunTracker(server.uri, flush_every_epochs=50, spool_root=tmp_path / "spool")
    run_id = t.start(exp_id, "flaky")
    for epoch in range(1, 101):
        t(epoch, {"train/loss": 1.0 / epoch})
    server.stop()  # the server dies mid-run
    started = time.perf_counter()
    for epoch in range(101, 201):
        t(epoch, {"train/loss": 1.0 / epoch})
    t.log_text("after the crash", "notes/late.txt")
    model = _model()
    t.log_model(model, _X(3))
    spool = t.end("FINISHED")
    print(f"\nserver gone: run ended with spool after {time.perf_counter() - started:.2f} s")
    assert spool is not None and (spool / "metrics.csv").is_file()
    server.start()  # back on the same port and store
    totals = upload_spool(spool)
    assert totals["runs"] == 1 and totals["metrics"] == 100
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 201))
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/late.txt"]


@pytest.mark.slow
def test_models_serve_answers_invocations(tracker, exp_id, uri, tmp_path):
    model = _model(3)
    X = _X(10)
    run_id = tracker.start(exp_id, "serve")
    tracker.log_model(model, X[:3])
    tracker.end()
    port = _free_port()
    # `mlflow models serve` execs `uvicorn` found on PATH: the venv's bin must be on it.
    # TMPDIR: the server downloads the model into a temporary directory it never removes.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [MLFLOW_BIN, "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", proc)
            body = json.dumps({"dataframe_split": {"columns": ["x1", "x2"],
                                                   "data": X.tolist()}}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                predictions = json.loads(response.read())["predictions"]
        finally:
            _stop(proc)
    got = pd.DataFrame(predictions)[["proba_0", "proba_1", "proba_2"]].to_numpy()
    np.testing.assert_allclose(got, model.predict_proba(X), rtol=1e-12, atol=0)


def test_warm_up_model_logging_builds_mlflows_package_map_without_a_store(tmp_path, monkeypatch):
    from mlflow.utils import requirements_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)
    tracking.warm_up_model_logging()
    assert requirements_utils._PACKAGES_TO_MODULES  # filled: the first log_model skips it
    assert "numpy" in requirements_utils._PACKAGES_TO_MODULES
    assert list(tmp_path.iterdir()) == []  # no store, no mlruns


def test_warm_up_model_logging_resolves_the_run_context_once():
    """The context tags of a process's first run (its git commit, through GitPython) are
    looked up by the warm-up, in a fresh process where nothing had done it."""
    code = ("import sys; from pipeline.tracking import tracker; before = 'git' in sys.modules; "
            "tracker.warm_up_model_logging(); print(before, 'git' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out == ["False", "True"]


def test_a_lost_dataset_insert_race_is_retried_and_links_the_existing_row(
    tracker, exp_id, uri, monkeypatch
):
    """Runs of the same data share one dataset row; when another process inserts it between
    MLflow's lookup and insert, the unique constraint fails: the retry links the row."""
    import pandas as pd
    import sqlalchemy.exc

    tracker.start(exp_id, "racer")
    real = tracker.client.log_inputs
    calls = []

    def first_loses(run_id, datasets=None, **kw):
        calls.append(run_id)
        if len(calls) == 1:
            real(run_id, datasets=datasets, **kw)  # the row now exists ...
            raise sqlalchemy.exc.IntegrityError("INSERT INTO datasets", {}, Exception(
                "UNIQUE constraint failed: datasets.experiment_id, datasets.name"))
        return real(run_id, datasets=datasets, **kw)

    monkeypatch.setattr(tracker.client, "log_inputs", first_loses)
    tracker.log_dataset(pd.DataFrame({"x": [1.0, 2.0], "label": [0, 1]}), name="shared",
                        targets="label")
    assert len(calls) == 2
    tracker.end()
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["shared"]


def test_lost_insert_race_is_recognised_only_for_unique_violations():
    import sqlalchemy.exc

    wrapped = MlflowException("failed")
    wrapped.__cause__ = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE"))
    assert tracking._lost_insert_race(wrapped)
    assert not tracking._lost_insert_race(MlflowException("RESOURCE_DOES_NOT_EXIST"))
    assert not tracking._lost_insert_race(OSError("disk full"))
