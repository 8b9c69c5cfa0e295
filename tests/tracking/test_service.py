"""The tracking service: a single run's MLflow work in a child process (real processes,
real SQLite stores; nothing mocked)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_PY

from pipeline.engine.mlp import MLP
from pipeline.tracking import service as tracking_service
from pipeline.tracking.stores import TrackingUnavailable

PARAMS = {"model": {"hidden_sizes": [8, 8], "activation": "tanh"}, "optimizer": {"lr": 0.01}}
TAGS = {"dataset": "moons", "overrides": "(defaults)"}


@pytest.fixture
def service():
    svc = tracking_service.TrackingService.spawn()
    yield svc
    svc.close()
    assert svc.process.poll() is not None  # the child is gone


def _model_and_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    model = MLP([2, 5, 1], activation="tanh", output="sigmoid", seed=3, loss="bce")
    return model, X


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def _log_everything(tracker, tmp_path: Path, model: MLP, X: np.ndarray) -> None:
    import pandas as pd

    for epoch in range(1, 6):
        tracker(epoch, {"train/loss": 1.0 / epoch, "test/accuracy": 0.5 + epoch / 20})
    tracker.log_dataset(pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "label": X[:, 0] > 0}),
                        name="toy", source="a test", targets="label")
    tracker.log_figure(_figure(), "plots/line.png")
    tracker.log_text("hello", "notes/hello.txt")
    tracker.log_dict({"a": 1, "b": [1, 2]}, "summary.json")
    (tmp_path / "one.bin").write_bytes(b"\x00\x01\x02")
    tracker.log_artifact(tmp_path / "one.bin", "files")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "sub" / "deep.txt").write_text("deep")
    tracker.log_artifact(tree, "tree")
    tracker.set_tags({"note": "tagged"})
    tracker.log_model(model, X[:5], class_names=["proba_0", "proba_1"],
                      feature_names=["x1", "x2"])


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_a_run_through_the_service_records_what_an_in_process_run_records(
    service, tmp_path, new_store, monkeypatch
):
    """The same calls on a RemoteTracker and on an in-process RunTracker give runs with the
    same params, tags, metrics, artifacts (byte for byte) and a model that predicts alike."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import tracker as tracking

    uri = new_store(tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.pyfunc.load_model below
    model, X = _model_and_data()

    remote = service.tracker(uri, spool_root=tmp_path / "spool")
    remote.start("svc", "remote-run", params=PARAMS, tags=TAGS)
    (tmp_path / "r").mkdir()
    _log_everything(remote, tmp_path / "r", model, X)
    remote.barrier()
    assert remote.end("FINISHED") is None
    assert remote.service_seconds > 0

    experiment_id = tracking.prepare_experiment(uri, "svc")
    local = tracking.RunTracker(uri, spool_root=tmp_path / "spool")
    local.start(experiment_id, "local-run", params=PARAMS, tags=TAGS)
    (tmp_path / "l").mkdir()
    _log_everything(local, tmp_path / "l", model, X)
    local.end("FINISHED")

    client = MlflowClient(uri)
    r, lo = client.get_run(remote.run_id), client.get_run(local.run_id)
    assert r.info.experiment_id == lo.info.experiment_id == experiment_id
    assert r.info.status == "FINISHED"
    assert r.data.params == lo.data.params == tracking.flatten_config(PARAMS)
    assert r.data.tags["note"] == "tagged" and r.data.tags["dataset"] == "moons"
    history = client.get_metric_history(remote.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (e, pytest.approx(1.0 / e)) for e in range(1, 6)]
    # The service reports its own working time; the in-process run has no such metric.
    assert "time/tracking_service" in r.data.metrics
    assert set(r.data.metrics) - {"time/tracking_service"} == set(lo.data.metrics)

    arts = _artifacts(client, remote.run_id)
    assert arts == _artifacts(client, local.run_id)
    assert {"plots/line.png", "notes/hello.txt", "summary.json", "files/one.bin",
            "tree/top.txt", "tree/sub/deep.txt"} <= arts
    for path in ("notes/hello.txt", "summary.json", "files/one.bin", "tree/sub/deep.txt"):
        a = Path(client.download_artifacts(remote.run_id, path, str(tmp_path / "dl-r")))
        b = Path(client.download_artifacts(local.run_id, path, str(tmp_path / "dl-l")))
        assert a.read_bytes() == b.read_bytes(), path
    png = Path(client.download_artifacts(remote.run_id, "plots/line.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [d.dataset.name for d in r.inputs.dataset_inputs] == ["toy"]

    loaded = mlflow.pyfunc.load_model(f"runs:/{remote.run_id}/model", dst_path=str(tmp_path))
    import pandas as pd

    out = loaded.predict(pd.DataFrame(X, columns=["x1", "x2"]))
    np.testing.assert_allclose(out.to_numpy(), model.predict_proba(X), rtol=1e-12)


def test_an_error_in_a_call_nobody_waited_for_is_raised_by_the_next_wait(
    service, tmp_path, new_store
):
    uri = new_store(tmp_path / "store")
    model, X = _model_and_data()
    tracker = service.tracker(uri)
    tracker.start("svc", "bad-model")
    tracker.log_model(model, X[:5], class_names=["only_one"])  # the model has 2 classes
    with pytest.raises(ValueError, match="class_names"):
        tracker.barrier()
    tracker.barrier()  # reported once; the run goes on
    tracker.log_text("still logging", "after.txt")
    assert tracker.end("FAILED", "the model could not be logged") is None
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "the model could not be logged"
    assert "after.txt" in _artifacts(MlflowClient(uri), tracker.run_id)


def test_a_run_the_store_cannot_start_fails_at_the_next_wait(service, tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    tracker = service.tracker(uri)
    tracker.start("svc", "nowhere", experiment_id="424242")  # no such experiment
    tracker(1, {"train/loss": 0.5})  # accepted and dropped: there is no run to hold it
    with pytest.raises(TrackingUnavailable, match=r"cannot start run 'nowhere'.*424242"):
        tracker.wait_started()
    with pytest.raises(TrackingUnavailable, match="424242"):
        tracker.end("FINISHED")
    # The service is still usable for the next run.
    again = service.tracker(uri)
    again.start("svc", "second")
    assert again.wait_started()
    assert again.end("FINISHED") is None


def test_a_long_training_waits_once_for_its_run_and_stops_if_it_cannot_exist(
    service, tmp_path, new_store, monkeypatch
):
    """The callback confirms the run after CONFIRM_AFTER_S of training, so a store that
    refused the run stops training early instead of at its end."""
    monkeypatch.setattr(tracking_service, "CONFIRM_AFTER_S", 0.05)
    tracker = service.tracker(new_store(tmp_path / "store"))
    tracker.start("svc", "refused", experiment_id="424242")
    tracker(1, {"loss": 1.0})
    time.sleep(0.1)
    with pytest.raises(TrackingUnavailable, match="424242"):
        tracker(2, {"loss": 0.9})


def test_the_service_ends_the_run_killed_when_its_parent_vanishes(tmp_path, new_store):
    """SIGKILL of the training process (no exit hook runs there): the service sees the
    socket close and ends the run KILLED with what it was sent; nothing stays RUNNING."""
    from mlflow import MlflowClient

    uri = new_store(tmp_path / "store")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pipeline.tracking import service as tracking_service
        svc = tracking_service.TrackingService.spawn()
        print(svc.process.pid, flush=True)
        t = svc.tracker({uri!r})
        t.start("svc", "orphan")
        for epoch in range(1, 4):
            t(epoch, {{"train/loss": 1.0 / epoch}})
        t.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    child = int(proc.stdout.split()[0])
    client = MlflowClient(uri)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = client.search_runs([client.get_experiment_by_name("svc").experiment_id])
        if runs and runs[0].info.status != "RUNNING":
            break
        time.sleep(0.2)
    (run,) = runs
    assert run.info.status == "KILLED"
    assert "exited before the run was ended" in run.data.tags["failure_reason"]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) \
        == [1, 2, 3]
    _wait_gone(child)


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"tracking service {pid} still running")


@pytest.mark.parametrize("argv", [
    ["-m", "optimizer.lr=0.1,0.2"], ["--multirun"], ["--help"], ["--cfg", "job"],
    ["hydra.mode=MULTIRUN"], ["+sweep=width_x_lr"],
])
def test_start_early_starts_nothing_for_sweeps_and_informational_flags(argv, monkeypatch):
    monkeypatch.setitem(tracking_service._SERVICE, "current", None)
    assert tracking_service.start_early(argv) is None
    assert tracking_service.current() is None


def test_start_early_can_be_switched_off(monkeypatch):
    monkeypatch.setitem(tracking_service._SERVICE, "current", None)
    monkeypatch.setenv(tracking_service.ENV_SWITCH, "0")
    assert tracking_service.start_early(["trainer.epochs=5"]) is None


# ---------------------------------------------------------------------- through train.py


@pytest.mark.slow
def test_train_py_tracks_a_single_run_through_the_service(run_train, tmp_path, new_store):
    """Same params, metrics and artifacts with and without the service; only the service's
    run reports time/tracking_service."""
    from mlflow import MlflowClient

    runs = {}
    for switch in ("1", "0"):
        uri = new_store(tmp_path / f"store{switch}")
        proc = run_train("trainer.epochs=20", env={"MLFLOW_TRACKING_URI": uri,
                                                   tracking_service.ENV_SWITCH: switch})
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("backprop").experiment_id])
        runs[switch] = (client, run)
    (c1, r1), (c0, r0) = runs["1"], runs["0"]
    assert r1.info.status == r0.info.status == "FINISHED"
    assert r1.data.params == r0.data.params
    assert "time/tracking_service" in r1.data.metrics
    assert "time/tracking_service" not in r0.data.metrics
    assert set(r1.data.metrics) - {"time/tracking_service"} == set(r0.data.metrics)
    assert _artifacts(c1, r1.info.run_id) == _artifacts(c0, r0.info.run_id)
    for key in ("train/loss", "test/accuracy"):
        a = sorted((m.step, m.value) for m in c1.get_metric_history(r1.info.run_id, key))
        b = sorted((m.step, m.value) for m in c0.get_metric_history(r0.info.run_id, key))
        assert a == b and [s for s, _ in a] == list(range(1, 21))


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_ends_the_run_killed_and_the_service_exits(tmp_path, new_store):
    """A terminal's Ctrl-C reaches the whole process group, the service included: the
    service must outlive it long enough to record the run KILLED with its metrics."""
    from mlflow import MlflowClient

    uri = new_store(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")
    (tmp_path / "cwd").mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), "dataset.n_samples=2000", "trainer.batch_size=1",
         "trainer.epochs=2000", "tracking.log_model=false", f"hydra.run.dir={tmp_path / 'o'}"],
        cwd=tmp_path / "cwd", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 120
        run_id = None
        while time.monotonic() < deadline and run_id is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            exp = client.get_experiment_by_name("backprop")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            run_id = runs[0].info.run_id if runs else None
            time.sleep(0.2)
        assert run_id, "the run never appeared"
        time.sleep(3)  # some epochs
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    epochs = int(json.loads(Path(client.download_artifacts(
        run_id, "summary.json", str(tmp_path))).read_text())["epochs_run"])
    assert epochs >= 1
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, epochs + 1))
    # Nothing of the group is left running.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("a process of the run's group outlived it")


def test_opening_the_store_early_creates_nothing_and_the_run_lands_where_it_should(
    service, tmp_path, new_store
):
    """open_store (sent before the data is made) must not create a missing store or
    experiment: a run that then fails on its data leaves no trace."""
    from mlflow import MlflowClient

    from pipeline.tracking import tracker as tracking

    missing = tmp_path / "nowhere" / "mlflow.db"
    service.post("open_store", f"sqlite:///{missing.as_posix()}", "svc")
    uri = new_store(tmp_path / "store")
    service.post("open_store", uri, "not-yet")
    service.call("barrier_all")
    assert not missing.exists() and not missing.parent.exists()
    assert tracking.find_experiment_id(uri, "not-yet") is None
    tracker = service.tracker(uri)
    tracker.start("not-yet", "first")  # the experiment is created only now
    tracker.wait_started()
    assert tracker.end("FINISHED") is None
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.experiment_id == \
        tracking.find_experiment_id(uri, "not-yet")
