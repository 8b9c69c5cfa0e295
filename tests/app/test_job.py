"""pipeline.app.job in-process: RunResult, model sizing, loss resolution, raw-input export,
divergence and failures recorded in a throw-away MLflow store.

Configs come from ``conf/`` composed as ``train.py`` composes them (``config`` fixture);
tracked runs log into ``tracking_env`` (an SQLite store under ``tmp_path``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.app import job as app
from pipeline.app.config import dataset_kwargs
from pipeline.app.job import RunFailed, RunResult, build_model
from pipeline.data.datasets import make_dataset
from pipeline.engine.loop import DivergenceError, History
from pipeline.engine.mlp import MLP

#: Diverges at a small, fixed epoch (> 1, so some metrics exist before it): unbounded
#: ReLU/identity network, MSE, plain SGD with a large step.
DIVERGING = (
    "optimizer=sgd", "optimizer.lr=10", "model.activation=relu",
    "model.output=identity", "model.loss=mse",
)
#: A tracked run without the model and the GIF (seconds each; test_train_e2e covers them).
LIGHT = ("tracking.log_model=false", "tracking.animation=false")


def _dataset(cfg: dict):
    return make_dataset(cfg["dataset"]["name"], **dataset_kwargs(cfg))


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


# ------------------------------------------------------------------------------ results


def test_a_parallel_sweeps_job_keeps_to_one_blas_thread_throughout(config, monkeypatch):
    """Not only its training: the data, evaluation and pictures of a job in a parallel
    sweep use one BLAS thread (the other cores run other jobs); the setting is restored
    after the run, and a job outside a parallel sweep keeps what it had."""
    from pipeline.fast.threads import blas_threads, current_blas_threads

    seen: list[int | None] = []
    make = app.make_dataset

    def recording(*args, **kwargs):
        seen.append(current_blas_threads())
        return make(*args, **kwargs)

    monkeypatch.setattr(app, "make_dataset", recording)
    with blas_threads(2):
        before = current_blas_threads()
        app.run(config("tracking=none", "trainer.epochs=2"), echo=False, parallel=True)
        assert current_blas_threads() == before
        app.run(config("tracking=none", "trainer.epochs=2"), echo=False)
    assert seen == [1, before], seen


def test_run_without_tracking_returns_a_complete_result(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/must-not-exist.db")
    result = app.run(config("tracking=none", "trainer.epochs=20"), echo=False)

    assert isinstance(result, RunResult)
    assert result.status == "FINISHED"
    assert result.reason is None
    assert (result.run_id, result.experiment_id, result.tracking_uri) == (None, None, None)
    assert isinstance(result.history, History) and result.history.epochs == list(range(1, 21))
    assert isinstance(result.model, MLP)
    assert result.dataset.name == "moons"
    for key in ("train/loss", "test/loss", "train/accuracy", "test/accuracy", "lr",
                "grad_norm/layer_1", "update_ratio/layer_1", "saturated_fraction/layer_1"):
        assert key in result.metrics, key
        assert result.metrics[key] == result.history.metrics[key][-1]
    # The objective is the validation loss: what sweeps select on, never the test split.
    assert result.objective == result.metrics["val/loss"] != result.metrics["test/loss"]
    assert {"data", "train"} <= set(result.timings)
    assert all(v >= 0 for v in result.timings.values())
    # tracking=none touches no store, whatever MLFLOW_TRACKING_URI says.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_with_tracking_logs_one_finished_run(config, tracking_env, capsys):
    result = app.run(config("trainer.epochs=5", *LIGHT), overrides=["trainer.epochs=5"])

    assert result.status == "FINISHED"
    assert result.tracking_uri == tracking_env.uri
    runs = tracking_env.runs("backprop")
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == result.experiment_id
    assert run.info.run_name == "moons-16x16-tanh-adam-lr0.01-s0"
    assert run.data.tags["overrides"] == "trainer.epochs=5"
    for key, value in result.metrics.items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-6), key
    # The summary names the run and tells how to open the UI on this store.
    out = capsys.readouterr().out
    assert result.run_id in out
    assert f"mlflow ui --backend-store-uri {tracking_env.uri}" in out


def test_the_cli_job_without_hydra_returns_the_objective(compose, tmp_path, monkeypatch):
    from pipeline.app import cli

    monkeypatch.chdir(tmp_path)
    objective = cli.job(compose("tracking=none", "trainer.epochs=3"))
    assert isinstance(objective, float) and np.isfinite(objective)


# ------------------------------------------------------------------------ model sizing


@pytest.mark.parametrize(
    ("overrides", "sizes", "output", "loss"),
    [
        ((), [2, 16, 16, 1], "sigmoid", "bce"),
        (("dataset=quadrants",), [2, 16, 16, 4], "softmax", "cross_entropy"),
        (("dataset=quadrants", "dataset.classes=2"), [2, 16, 16, 1], "sigmoid", "bce"),
        (("dataset=blobs", "model.hidden_sizes=[8]"), [2, 8, 3], "softmax", "cross_entropy"),
        (("dataset=spirals", "dataset.classes=3", "model.hidden_sizes=[4,5,6]"),
         [2, 4, 5, 6, 3], "softmax", "cross_entropy"),
        (("dataset=csv",), [2, 16, 16, 1], "sigmoid", "bce"),
    ],
    ids=["moons", "quadrants4", "quadrants2", "blobs", "spirals3", "csv"],
)
def test_build_model_sizes_the_head_for_the_classes(config, overrides, sizes, output, loss):
    cfg = config(*overrides)
    ds = _dataset(cfg)
    model = build_model(cfg, ds)
    assert model.sizes == sizes
    assert model.get_config()["output"] == output
    assert model.loss == loss
    assert model.n_classes == ds.n_classes
    assert model.predict_proba(ds.X_test).shape == (ds.n_test, ds.n_classes)


@pytest.mark.parametrize(
    ("overrides", "output", "loss", "n_out"),
    [
        (("model.output=softmax",), "softmax", "cross_entropy", 2),
        (("model.loss=cross_entropy",), "softmax", "cross_entropy", 2),
        (("model.loss=mse",), "sigmoid", "mse", 1),
        (("model.loss=hinge",), "identity", "hinge", 1),
        (("model.output=tanh",), "tanh", "mse", 1),
        (("model.output=identity", "dataset=blobs"), "identity", "mse", 3),
        (("model.loss=bce",), "sigmoid", "bce", 1),
    ],
    ids=["softmax->ce", "ce->softmax", "mse->sigmoid", "hinge->identity", "tanh->mse",
         "identity->mse-k", "bce->sigmoid"],
)
def test_auto_output_and_loss_resolve_and_train(config, overrides, output, loss, n_out):
    cfg = config("tracking=none", "trainer.epochs=3", *overrides)
    model = build_model(cfg, _dataset(cfg))
    assert (model.get_config()["output"], model.loss, model.sizes[-1]) == (output, loss, n_out)
    result = app.run(cfg, echo=False)
    assert result.status == "FINISHED"
    assert np.isfinite(result.metrics["train/loss"])


# ------------------------------------------------------------------ raw-input export


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dataset", ["moons", "quadrants"])
def test_with_input_scaling_takes_raw_inputs(config, bias, dataset):
    cfg = config("tracking=none", "trainer.epochs=15", "trainer.dtype=float64",
                 f"dataset={dataset}", f"model.bias={str(bias).lower()}")
    result = app.run(cfg, echo=False)
    ds, model = result.dataset, result.model
    before = model.params.copy()
    X_raw = np.vstack([ds.X_train_raw, ds.X_test_raw])
    assert not np.allclose(ds.mean, 0.0)  # else the check below proves nothing

    raw = model.with_input_scaling(ds.mean, ds.std)

    np.testing.assert_allclose(raw.predict_proba(X_raw), model.predict_proba(ds.transform(X_raw)),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(raw.predict(X_raw), model.predict(ds.transform(X_raw)))
    assert raw.sizes == model.sizes and raw.bias  # the shift needs a bias
    assert raw.get_config()["output"] == model.get_config()["output"]
    np.testing.assert_array_equal(model.params, before)  # the trained model is untouched


def test_with_input_scaling_in_float32_stays_close(config):
    result = app.run(config("tracking=none", "trainer.epochs=15"), echo=False)
    ds, model = result.dataset, result.model
    assert model.dtype == np.float32
    raw = model.with_input_scaling(ds.mean, ds.std)
    X_raw = ds.X_test_raw
    np.testing.assert_allclose(raw.predict_proba(X_raw), model.predict_proba(ds.transform(X_raw)),
                               atol=1e-5)


@pytest.mark.slow
def test_exported_model_of_a_k_class_run_takes_raw_inputs(config, tracking_env, tmp_path):
    """The logged pyfunc model of a 4-class run: raw x1, x2 in, 4 probability columns out."""
    import mlflow
    import pandas as pd

    result = app.run(config("dataset=quadrants", "trainer.epochs=10",
                            "tracking.animation=false"), echo=False)
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model",
                                     dst_path=str(tmp_path))
    ds = result.dataset
    raw = pd.DataFrame(ds.X_test_raw, columns=list(ds.feature_names))
    proba = model.predict(raw)
    assert list(proba.columns) == ["proba_0", "proba_1", "proba_2", "proba_3"]
    expected = result.model.predict_proba(ds.transform(ds.X_test_raw))
    np.testing.assert_allclose(proba.to_numpy(), expected, atol=1e-5)
    # Columns by name, in any order, give the same answer.
    np.testing.assert_allclose(model.predict(raw[["x2", "x1"]]).to_numpy(), proba.to_numpy())


# ------------------------------------------------------------------ divergence, failures


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_without_tracking_raises_run_failed(config):
    with pytest.raises(RunFailed, match=r"at epoch \d+") as info:
        app.run(config("tracking=none", "trainer.epochs=50", *DIVERGING), echo=False)
    cause = info.value.__cause__
    assert isinstance(cause, DivergenceError)
    assert 1 < cause.epoch < 50
    assert "optimizer.lr" in str(info.value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_ends_the_run_failed_and_keeps_what_was_logged(config, tracking_env):
    with pytest.raises(RunFailed, match=r"at epoch \d+") as info:
        app.run(config("trainer.epochs=50", *DIVERGING), echo=False)
    epoch = info.value.__cause__.epoch

    runs = tracking_env.runs("backprop")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    reason = run.data.tags["failure_reason"]
    assert f"at epoch {epoch}" in reason and "optimizer.lr" in reason
    client = tracking_env.client()
    # The epochs before the divergence are all there, one point each.
    for key in ("train/loss", "test/loss", "train/accuracy", "lr", "grad_norm/layer_1"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, epoch)), key
    arts = _artifacts(client, run.info.run_id)
    assert {"plots/boundary_before.png", "plots/curves.png", "config.yaml", "summary.json",
            "data/dataset.csv"} <= arts
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tracking_env.root))
    summary = json.loads(Path(local).read_text())
    assert summary["status"] == "FAILED"
    assert summary["epochs_run"] == epoch - 1
    # No model is logged for a diverged network.
    assert not run.outputs.model_outputs


@pytest.mark.parametrize(
    ("error", "status", "raised"),
    [(RuntimeError("boom in epoch 3"), "FAILED", RunFailed),
     (KeyboardInterrupt(), "KILLED", KeyboardInterrupt)],
    ids=["exception", "ctrl-c"],
)
def test_error_during_training_is_recorded_then_raised(
    config, tracking_env, monkeypatch, error, status, raised
):
    real_fit = app.fit

    def fit_then_fail(*args, **kwargs):
        kwargs["epochs"] = 3
        real_fit(*args, **kwargs)
        raise error

    monkeypatch.setattr(app, "fit", fit_then_fail)
    with pytest.raises(raised):
        app.run(config("trainer.epochs=10", *LIGHT), echo=False)

    (run,) = tracking_env.runs("backprop")
    assert run.info.status == status
    reason = run.data.tags["failure_reason"]
    if status == "FAILED":
        assert reason == "RuntimeError: boom in epoch 3"
    else:
        assert reason.startswith("interrupted")
    steps = [m.step for m in tracking_env.client().get_metric_history(run.info.run_id,
                                                                      "train/loss")]
    assert steps == [1, 2, 3]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_reason_of_a_failed_run_names_the_epoch(config):
    """The message users see: '<what> at epoch N; try a smaller optimizer.lr'."""
    with pytest.raises(RunFailed) as info:
        app.run(config("tracking=none", "trainer.epochs=50", *DIVERGING), echo=False)
    assert re.fullmatch(r"\w[\w ]* became \w+ at epoch \d+; try a smaller optimizer\.lr",
                        str(info.value)), str(info.value)


# ---------------------------------------------------------------------------- replicas


def test_early_stopping_reports_the_epoch_whose_weights_are_kept(config, tracking_env, capsys):
    from pipeline.engine.loop import evaluate
    from pipeline.engine.losses import encode_targets, get_loss

    result = app.run(config("trainer.epochs=2000", "trainer.patience=5", *LIGHT), echo=True)
    h = result.history
    assert h.stopped_early and result.restored_epoch == h.best_epoch < h.epochs[-1]
    kept = h.at(h.best_epoch)
    # The kept epoch is the one of least validation loss, whatever the test loss says.
    assert kept["val/loss"] == min(h.metrics["val/loss"])
    assert result.metrics == kept and result.objective == kept["val/loss"]
    # The model is that epoch's: its test loss is the one reported.
    ds, model = result.dataset, result.model
    T = encode_targets(ds.y_test, model.n_outputs, dtype=model.dtype)
    loss, _ = evaluate(model, model.check_input(ds.X_test), T, ds.y_test, get_loss(model.loss))
    assert loss == pytest.approx(kept["test/loss"], rel=1e-6)
    # MLflow's latest values are the kept epoch's, logged once more after the last epoch.
    client = tracking_env.client()
    latest = client.get_run(result.run_id).data.metrics
    assert latest["test/loss"] == pytest.approx(kept["test/loss"])
    assert latest["restored_epoch"] == h.best_epoch
    steps = [m.step for m in client.get_metric_history(result.run_id, "test/loss")]
    assert sorted(steps) == [*h.epochs, h.epochs[-1] + 1]
    out = capsys.readouterr().out
    expected = f"no better validation loss after epoch {h.best_epoch}, whose weights are kept"
    assert expected in out, out
    # Without early stopping the last epoch is the run's.
    plain = app.run(config("trainer.epochs=5", *LIGHT), echo=False)
    assert plain.restored_epoch is None and plain.metrics == plain.history.last()
    assert "restored_epoch" not in client.get_run(plain.run_id).data.metrics


def test_replicated_run_logs_mean_spread_table_and_replica_plot(config, tracking_env, tmp_path):
    result = app.run(config("trainer.epochs=8", "trainer.replicas=3", *LIGHT), echo=False)

    assert result.status == "FINISHED"
    run = tracking_env.client().get_run(result.run_id)
    # Mean under fit()'s keys, spread under key/std, one point per epoch.
    for key in ("test/accuracy", "test/accuracy/std", "train/loss", "train/loss/std"):
        history = tracking_env.client().get_metric_history(result.run_id, key)
        assert [m.step for m in history] == list(range(1, 9)), key
    assert run.data.metrics["train/loss/std"] > 0  # three seeds do not agree exactly
    path = tracking_env.client().download_artifacts(result.run_id, "replicas.csv", str(tmp_path))
    table = pd.read_csv(path)
    assert table["replica"].tolist() == [0, 1, 2]
    assert table["seed"].tolist() == [0, 1, 2]
    # The logged mean equals the mean of the per-replica final values.
    assert run.data.metrics["test/loss"] == pytest.approx(table["test/loss"].mean(), rel=1e-5)
    names = {a.path for a in tracking_env.client().list_artifacts(result.run_id, "plots")}
    assert "plots/boundary_after.png" in names
    # Replica 0 is the run replicas=1 makes: same seed, same data, same batches.
    single = app.run(config("trainer.epochs=8", "tracking=none"), echo=False)
    assert table.loc[0, "test/loss"] == pytest.approx(single.metrics["test/loss"], rel=1e-4)


def test_replicated_run_summary_shows_the_spread_across_replicas(config, capsys):
    result = app.run(config("trainer.epochs=5", "trainer.replicas=3", "tracking=none",
                            "trainer.seed=7"), echo=True)
    out = capsys.readouterr().out
    m = result.metrics
    assert (f"train accuracy {m['train/accuracy']:.3f} ± {m['train/accuracy/std']:.3f}"
            in out), out
    assert f"test loss {m['test/loss']:.4f} ± {m['test/loss/std']:.4f}" in out, out
    assert "(mean ± standard deviation over 3 replicas, seeds 7..9)" in out, out
    single = app.run(config("trainer.epochs=5", "tracking=none"), echo=True)
    out = capsys.readouterr().out
    assert f"test loss {single.metrics['test/loss']:.4f}\n" in out and "±" not in out, out


def test_replica_learning_rates_train_each_replica_with_its_own(config):
    result = app.run(config("trainer.epochs=5", "trainer.replicas=2", "tracking=none",
                            "trainer.replica_lrs=[0.001,0.1]"), echo=False)
    assert result.status == "FINISHED"
    assert result.metrics["lr"] == pytest.approx((0.001 + 0.1) / 2)
