"""End to end: the real ``python train.py`` in a temp directory, read back through MlflowClient.

The subprocess runs (``slow``) share one default run (``trainer.epochs=30``) for the checks
of params, tags, metrics, artifacts, dataset input and model, and a served model. The
override matrix and the experiment presets run in-process through ``pipeline.app.job.run`` on
configs composed exactly as ``train.py`` composes them, with ``tracking=none`` and a few
epochs (fast).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.app import job as app

ROOT = Path(__file__).resolve().parents[2]
MLFLOW_BIN = str(Path(sys.executable).parent / "mlflow")
EPOCHS = 30
PER_EPOCH = (
    "train/loss", "test/loss", "train/accuracy", "test/accuracy", "lr",
    "grad_norm/layer_1", "update_ratio/layer_1", "saturated_fraction/layer_1",
)
ARTIFACTS = (
    "plots/boundary_before.png", "plots/boundary_after.png", "plots/curves.png",
    "plots/boundary.gif", "config.yaml", "summary.json", "data/dataset.csv",
)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _flatten(node, prefix: str = "") -> dict:
    """An independent flattening of a nested config to dotted keys (values unchanged)."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: node}


def _param_value(text: str):
    """A logged param back to a value: JSON for non-strings (``[16, 16]``, ``null``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}"


def _one_run(client, experiment: str = "backprop"):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


# ------------------------------------------------------------- the default run (shared)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, new_store, make_train_runner):
    """``python train.py trainer.epochs=30`` into a fresh store; what it left behind."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("e2e-default")
    uri = new_store(work / "store")
    launched_ms = time.time() * 1000
    started = time.perf_counter()
    proc = make_train_runner(work)(f"trainer.epochs={EPOCHS}", env={"MLFLOW_TRACKING_URI": uri})
    seconds = time.perf_counter() - started
    _check(proc)
    client = MlflowClient(uri)
    run = _one_run(client)
    return SimpleNamespace(uri=uri, work=work, proc=proc, client=client, run=run,
                           run_id=run.info.run_id, seconds=seconds, launched_ms=launched_ms)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The same config trained in-process without tracking: the reference predictions."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.app.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer.epochs={EPOCHS}", "tracking=none"])
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return app.run(plain, echo=False)


@pytest.mark.slow
def test_default_run_is_one_finished_run_and_says_how_to_view_it(default_run):
    run = default_run.run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "moons-16x16-tanh-adam-lr0.01-s0"
    out = default_run.proc.stdout
    assert default_run.run_id in out
    assert f"mlflow ui --backend-store-uri {default_run.uri}" in out
    assert "FINISHED" in out and "test accuracy" in out
    # Not a terminal: no progress bar in either stream.
    assert "epoch/s" not in default_run.proc.stderr + out and "\r" not in out
    # Nothing lands in the working directory; Hydra's outputs go where we pointed them.
    assert list((default_run.work / "cwd").iterdir()) == []
    outputs = default_run.work / "outputs"
    assert (outputs / ".hydra" / "config.yaml").is_file()
    result = json.loads((outputs / "result.json").read_text())
    assert result["status"] == "FINISHED" and result["run_id"] == default_run.run_id


@pytest.mark.slow
def test_the_run_is_the_command_as_mlflow_shows_it(default_run):
    """Source is the script the user ran, and the run starts when the command did (its
    duration in the UI is the command's, not only what followed the imports)."""
    info, tags = default_run.run.info, default_run.run.data.tags
    assert tags["mlflow.source.name"].endswith("train.py"), tags["mlflow.source.name"]
    # /proc's start time ticks in 10 ms; the process starts after the launch.
    assert default_run.launched_ms - 50 <= info.start_time <= default_run.launched_ms + 2000
    assert info.end_time <= default_run.launched_ms + 1000 * default_run.seconds


@pytest.mark.slow
def test_params_are_the_whole_resolved_config(default_run, config):
    expected = _flatten(config(f"trainer.epochs={EPOCHS}"))
    params = default_run.run.data.params
    assert set(params) == set(expected)
    for key, value in expected.items():
        assert _param_value(params[key]) == value, (key, params[key], value)
    assert params["model.hidden_sizes"] == "[16, 16]"
    assert float(params["optimizer.lr"]) == 0.01
    assert params["optimizer.name"] == "adam"
    assert params["dataset.name"] == "moons"
    assert params["trainer.epochs"] == str(EPOCHS)
    assert params["model.activation"] == "tanh"


@pytest.mark.slow
def test_tags_dataset_overrides_and_git_commit(default_run):
    tags = default_run.run.data.tags
    assert tags["dataset"] == "moons"
    assert tags["overrides"] == f"trainer.epochs={EPOCHS}"  # hydra.* overrides left out
    if (ROOT / ".git").exists():
        commit = tags.get("mlflow.source.git.commit", "")
        assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
        # A commit of this repository (HEAD may have moved since: teammates commit).
        check = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT)
        assert check.returncode == 0


@pytest.mark.slow
def test_metrics_have_one_point_per_epoch(default_run):
    client, run_id = default_run.client, default_run.run_id
    for key in PER_EPOCH:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
        assert all(np.isfinite(m.value) for m in history), key
    for key in ("train/accuracy", "test/accuracy", "saturated_fraction/layer_1"):
        assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(run_id, key))
    assert {m.value for m in client.get_metric_history(run_id, "lr")} == {0.01}
    # tanh network: no dead-unit metric (that is for the ReLU family).
    assert not any(k.startswith("dead_fraction/") for k in default_run.run.data.metrics)
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"),
                                      key=lambda m: m.step)]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_artifacts_plots_gif_config_summary_data(default_run, in_process, tmp_path):
    from PIL import Image

    client, run_id = default_run.client, default_run.run_id
    assert set(ARTIFACTS) <= _artifacts(client, run_id)
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    for png in ("boundary_before", "boundary_after", "curves", "evaluation",
                "neurons_before", "neurons_after", "network_before", "network_after"):
        with Image.open(local / "plots" / f"{png}.png") as img:
            assert img.format == "PNG" and min(img.size) > 100
    # The test split's evaluation: the numbers behind the figure, and its scalars as metrics.
    evaluation = json.loads((local / "evaluation.json").read_text())
    run_metrics = default_run.run.data.metrics
    assert evaluation["accuracy"] == pytest.approx(run_metrics["test/accuracy"], abs=1e-6)
    assert run_metrics["test/roc_auc"] == pytest.approx(evaluation["roc_auc"])
    assert sum(map(sum, evaluation["confusion_matrix"])) == 125
    with Image.open(local / "plots" / "boundary.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames > 2

    cfg = yaml.safe_load((local / "config.yaml").read_text())
    assert cfg["trainer"]["epochs"] == EPOCHS and cfg["model"]["hidden_sizes"] == [16, 16]

    summary = json.loads((local / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["epochs_run"] == EPOCHS
    metrics = default_run.run.data.metrics
    for key in ("train/accuracy", "test/accuracy", "test/loss"):
        assert summary[key] == pytest.approx(metrics[key], rel=1e-6), key

    frame = pd.read_csv(local / "data" / "dataset.csv")
    assert list(frame.columns) == ["x1", "x2", "label", "split"]
    expected = in_process.dataset.to_frame()
    np.testing.assert_allclose(frame[["x1", "x2"]].to_numpy(), expected[["x1", "x2"]].to_numpy())
    assert frame["label"].tolist() == expected["label"].tolist()
    assert frame["split"].value_counts().to_dict() == {"train": 300, "val": 75, "test": 125}


@pytest.mark.slow
def test_dataset_input_has_name_digest_and_source(default_run, in_process):
    import mlflow

    inputs = default_run.run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "moons"
    assert "make_moons" in ds.source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        digest = mlflow.data.from_pandas(in_process.dataset.to_frame(), targets="label").digest
    assert ds.digest == digest  # the very data trained on
    assert json.loads(ds.profile)["num_rows"] == 500
    assert {t.key: t.value for t in inputs[0].tags}.get("mlflow.data.context") == "training"


@pytest.mark.slow
def test_model_is_logged_with_signature_and_npz_weights(default_run):
    client = default_run.client
    outputs = default_run.run.outputs.model_outputs
    assert len(outputs) == 1
    model = client.get_logged_model(outputs[0].model_id)
    assert model.name == "model" and model.source_run_id == default_run.run_id
    assert model.status.name == "READY"
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)} | {
        f.path for d in client.list_logged_model_artifacts(model.model_id) if d.is_dir
        for f in client.list_logged_model_artifacts(model.model_id, d.path)
    }
    assert "MLmodel" in files
    assert any(p.endswith(".npz") for p in files), files
    assert not any(p.endswith((".pkl", ".pickle", ".cloudpickle")) for p in files), files


@pytest.mark.slow
def test_pyfunc_model_reproduces_in_process_predictions(default_run, in_process, monkeypatch,
                                                         tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_run.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{default_run.run_id}/model",
                                     dst_path=str(tmp_path))
    assert model.metadata.get_input_schema().input_names() == ["x1", "x2"]
    assert model.metadata.get_output_schema().input_names() == ["proba_0", "proba_1"]

    local = default_run.client.download_artifacts(default_run.run_id, "data/dataset.csv",
                                                  str(tmp_path))
    raw = pd.read_csv(local)[["x1", "x2"]]  # RAW units: the model standardises itself
    proba = model.predict(raw)
    assert list(proba.columns) == ["proba_0", "proba_1"]

    ds, ref = in_process.dataset, in_process.model
    expected = ref.predict_proba(ds.transform(raw.to_numpy()))
    np.testing.assert_allclose(proba.to_numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    # And the accuracy the run logged is what the loaded model scores on the test split.
    test = pd.read_csv(local)
    test = test[test["split"] == "test"]
    accuracy = np.mean(model.predict(test[["x1", "x2"]]).to_numpy().argmax(1) == test["label"])
    assert accuracy == pytest.approx(default_run.run.data.metrics["test/accuracy"], abs=1e-9)


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(default_run, free_port, tmp_path, in_process):
    port = free_port()
    # As in an activated venv: the server execs `uvicorn` found on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # TMPDIR: the server downloads the model into a temporary directory it never removes.
    env = {**os.environ, "MLFLOW_TRACKING_URI": default_run.uri, "PATH": path,
           "TMPDIR": str(tmp_path)}
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [MLFLOW_BIN, "models", "serve", "-m", f"runs:/{default_run.run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}: {_tail(log)}"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"no /ping in 120 s: {_tail(log)}"
            time.sleep(0.5)

        X = in_process.dataset.X_test_raw[:7]
        body = json.dumps({"dataframe_split": {"columns": ["x1", "x2"], "data": X.tolist()}})
        request = urllib.request.Request(f"{base}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.loads(r.read())
        got = pd.DataFrame(answer["predictions"])
        assert list(got.columns) == ["proba_0", "proba_1"]
        expected = in_process.model.predict_proba(in_process.dataset.transform(X))
        np.testing.assert_allclose(got.to_numpy(), expected, atol=1e-5)
    finally:
        _stop(proc)
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-2000:]


def _stop(proc: subprocess.Popen) -> None:
    """End the server and its workers (its own process group, started by this test)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------- more real subprocess runs


@pytest.mark.slow
def test_overrides_of_several_groups_in_one_real_run(run_train, tracking_env):
    overrides = [
        "dataset=csv", "model.hidden_sizes=[8]", "model.activation=relu",
        "optimizer=sgd", "optimizer.lr=0.5", "trainer.batch_size=32", "trainer.epochs=12",
        "tracking.log_model=false", "tracking.animation=false",
        "tracking.experiment=other", "tracking.run_name=my-run",
    ]
    proc = run_train(*overrides, env=tracking_env.env)
    _check(proc)
    client = tracking_env.client()
    assert client.get_experiment_by_name("backprop") is None
    run = _one_run(client, "other")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "my-run"
    assert run.data.tags["overrides"] == " ".join(overrides)
    assert run.data.tags["dataset"] == "csv"
    p = run.data.params
    assert (p["dataset.name"], p["model.hidden_sizes"], p["model.activation"]) == (
        "csv", "[8]", "relu")
    # dataset.path is relative to the project root, not to the working directory.
    (ds_input,) = run.inputs.dataset_inputs
    assert "example.csv" in ds_input.dataset.source
    assert (p["optimizer.name"], float(p["optimizer.lr"]), p["trainer.batch_size"]) == (
        "sgd", 0.5, "32")
    assert "optimizer.beta1" not in p  # the sgd option replaced adam's keys
    for key in ("dead_fraction/layer_1", "grad_norm/layer_2", "update_ratio/layer_2"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, 13)), key
    assert "saturated_fraction/layer_1" not in run.data.metrics
    arts = _artifacts(client, run.info.run_id)
    assert "plots/boundary.gif" not in arts and "plots/curves.png" in arts
    assert not run.outputs.model_outputs


@pytest.mark.slow
def test_tracking_none_creates_no_store(run_train, tmp_path):
    db = tmp_path / "would-be" / "mlflow.db"
    proc = run_train("tracking=none", "trainer.epochs=5",
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    _check(proc)
    assert not db.parent.exists()
    found = [p for p in tmp_path.rglob("*") if p.name in ("mlflow.db", "mlruns")]
    assert found == []
    assert "MLflow run" not in proc.stdout and "FINISHED" in proc.stdout


DIVERGING = (
    "optimizer=sgd", "optimizer.lr=10", "model.activation=relu", "model.output=identity",
    "model.loss=mse", "trainer.epochs=50", "tracking.log_model=false",
    "tracking.animation=false",
)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, new_store, make_train_runner):
    """``python train.py`` with a learning rate that blows the loss up after a few epochs."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("e2e-diverged")
    uri = new_store(work / "store")
    proc = make_train_runner(work)(*DIVERGING, env={"MLFLOW_TRACKING_URI": uri})
    return SimpleNamespace(proc=proc, client=MlflowClient(uri))


@pytest.mark.slow
def test_divergence_through_train_py_fails_the_run_and_says_when(diverged):
    proc = diverged.proc
    assert proc.returncode != 0
    match = re.search(r"loss became \w+ at epoch (\d+); try a smaller optimizer\.lr",
                      proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr[-2000:]
    epoch = int(match.group(1))
    run = _one_run(diverged.client)
    assert run.info.status == "FAILED"
    assert f"at epoch {epoch}" in run.data.tags["failure_reason"]
    steps = [m.step for m in diverged.client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, epoch))
    assert "plots/curves.png" in _artifacts(diverged.client, run.info.run_id)


@pytest.mark.slow
def test_divergence_through_train_py_prints_no_traceback(diverged):
    assert diverged.proc.returncode == 1
    assert "Traceback" not in diverged.proc.stderr, diverged.proc.stderr[-2000:]


# --------------------------------------------------- override matrix, in-process (fast)


@pytest.fixture
def quick(config, tmp_path, monkeypatch):
    """``quick(*overrides)`` -> (config, RunResult): 5 epochs, no tracking, cwd in tmp."""
    monkeypatch.chdir(tmp_path)

    def _quick(*overrides: str):
        cfg = config("tracking=none", "trainer.epochs=5", *overrides)
        return cfg, app.run(cfg, echo=False)

    return _quick


@pytest.mark.parametrize(
    ("dataset", "n_classes"),
    [("moons", 2), ("circles", 2), ("xor", 2), ("quadrants", 4), ("spirals", 2),
     ("blobs", 3), ("linear", 2), ("csv", 2)],
)
def test_dataset_override(quick, dataset, n_classes):
    cfg, result = quick(f"dataset={dataset}")
    assert cfg["dataset"]["name"] == dataset
    assert result.status == "FINISHED"
    assert result.dataset.name == dataset
    assert result.dataset.n_classes == n_classes
    assert result.model.sizes[-1] == (1 if n_classes == 2 else n_classes)
    assert result.history.epochs == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("optimizer",
                         ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"])
def test_optimizer_override(quick, optimizer):
    cfg, result = quick(f"optimizer={optimizer}", "optimizer.lr=0.02")
    assert cfg["optimizer"]["name"] == optimizer
    assert result.status == "FINISHED"
    assert result.history.metrics["lr"] == [0.02] * 5
    assert np.isfinite(result.metrics["train/loss"])


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (("model.hidden_sizes=[8]",), lambda r: r.model.sizes == [2, 8, 1]),
        (("model.hidden_sizes=[4,6,8]",), lambda r: r.model.sizes == [2, 4, 6, 8, 1]),
        (("model.activation=relu",),
         lambda r: "dead_fraction/layer_1" in r.metrics
         and "saturated_fraction/layer_1" not in r.metrics),
        (("model.activation=[relu,tanh]",),
         lambda r: "dead_fraction/layer_1" in r.metrics
         and "saturated_fraction/layer_2" in r.metrics),
        (("model.activation=leaky_relu", "model.activation_params.slope=0.2"),
         lambda r: r.model.activation_params["slope"] == 0.2),
        (("model.init=he_normal", "model.bias=false"),
         lambda r: r.model.biases is None and r.model.init == "he_normal"),
        (("trainer.batch_size=32",), lambda r: r.status == "FINISHED"),
        (("trainer.dtype=float64",), lambda r: r.model.dtype == np.float64),
        (("trainer.seed=3",), lambda r: r.model.seed == 3),
        (("optimizer.schedule=cosine",), lambda r: r.history.metrics["lr"][-1]
         < r.history.metrics["lr"][0]),
        (("trainer.eval_every=2",), lambda r: r.history.epochs == [2, 4, 5]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "",
)
def test_model_and_trainer_overrides(quick, overrides, check):
    _, result = quick(*overrides)
    assert result.status == "FINISHED"
    assert check(result)


def test_batch_size_changes_the_training(quick):
    _, full = quick()
    _, mini = quick("trainer.batch_size=32")
    assert full.metrics["train/loss"] != mini.metrics["train/loss"]


def test_same_config_gives_identical_metrics(quick):
    _, a = quick("trainer.dtype=float64")
    _, b = quick("trainer.dtype=float64")
    assert a.history.metrics == b.history.metrics


def test_default_config_reaches_095_on_moons(config, tmp_path, monkeypatch):
    """The README's promise for a plain ``python train.py`` (full default epochs)."""
    monkeypatch.chdir(tmp_path)
    cfg = config("tracking=none")
    assert cfg["trainer"]["epochs"] == 300 and cfg["dataset"]["name"] == "moons"
    result = app.run(cfg, echo=False)
    assert result.metrics["test/accuracy"] >= 0.95


# ------------------------------------------------------------------- experiment presets


PRESETS = {
    "xor_2_2_1": dict(dataset="xor", sizes=[2, 2, 1], optimizer="sgd", lr=1.0),
    "circles_2_3_1": dict(dataset="circles", sizes=[2, 3, 1], optimizer="sgd", lr=1.0),
    "quadrants_leaky": dict(dataset="quadrants", sizes=[2, 3, 2], optimizer="sgd", lr=0.05),
    "showcase": dict(dataset="spirals", sizes=[2, 64, 64, 3], optimizer="adam", lr=0.01),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_experiment_preset_composes_and_runs(quick, name):
    want = PRESETS[name]
    cfg, result = quick(f"+experiment={name}", "trainer.epochs=3")
    assert cfg["dataset"]["name"] == want["dataset"]
    assert cfg["optimizer"]["name"] == want["optimizer"]
    assert cfg["optimizer"]["lr"] == want["lr"]
    assert cfg["trainer"]["epochs"] == 3  # command-line overrides win over the preset
    assert result.status == "FINISHED"
    assert result.model.sizes == want["sizes"]


def test_experiment_preset_keeps_its_head(config):
    cfg = config("+experiment=quadrants_leaky")
    assert (cfg["model"]["output"], cfg["model"]["loss"]) == ("leaky_relu", "mse")
    assert cfg["dataset"]["classes"] == 2 and cfg["trainer"]["batch_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xor_2_2_1", "circles_2_3_1", "quadrants_leaky"])
def test_reference_presets_learn_their_task(config, name, tmp_path, monkeypatch):
    """The classic small networks at their full epochs solve the task they were made for."""
    monkeypatch.chdir(tmp_path)
    result = app.run(config(f"+experiment={name}", "tracking=none"), echo=False)
    assert result.metrics["test/accuracy"] >= 0.9, result.metrics


@pytest.mark.slow
def test_explain_prints_and_logs_the_first_step_worked_by_the_numbers(
        run_train, tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    proc = run_train("+experiment=xor_2_2_1", "trainer.explain=true", "trainer.epochs=5",
                     "tracking.animation=false", "tracking.log_model=false",
                     env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# One backpropagation step on a 2-2-1 network, by the numbers" in proc.stdout
    assert "(2) delta_1 = (delta_2 @ W_2.T) * sigmoid'(Z_1)" in proc.stdout
    (page,) = (tmp_path / "store" / "mlruns").glob("*/*/artifacts/explain.md")
    text = page.read_text()
    assert text.startswith("# One backpropagation step on a 2-2-1 network")
    assert text in proc.stdout  # the terminal shows exactly what was logged
