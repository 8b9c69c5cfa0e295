"""Hyper-parameter search on a current Optuna: the hydra/sweeper=optuna plugin.

Unit tests for the search space and the storage; end-to-end searches through the real
``train.py`` against fresh stores: basic and joblib launchers, a study resumed by a second
command, pruning, a diverging trial, and optuna-dashboard opening the study.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState  # noqa: E402

from pipeline.app import search  # noqa: E402

#: Short, quiet jobs: the tests are about the search, not the training.
FAST = ("trainer.epochs=30", "tracking.animation=false", "tracking.log_model=false")


# ------------------------------------------------------------------------ search space


def test_sweep_syntax_becomes_optuna_distributions():
    space, fixed = search.search_space([
        "optimizer.lr=tag(log, interval(0.001, 1.0))",
        "dataset.noise=interval(0, 0.5)",
        "model.hidden_sizes=choice([4],[16,16])",
        "trainer.batch_size=range(16, 80, 16)",
        "trainer.epochs=range(1, 10, step=2)",
        "model.activation=relu",
    ])
    assert space["optimizer.lr"] == FloatDistribution(0.001, 1.0, log=True)
    assert space["dataset.noise"] == FloatDistribution(0.0, 0.5)
    assert space["model.hidden_sizes"] == CategoricalDistribution(["[4]", "[16,16]"])
    # Hydra's range excludes its stop; Optuna's high end is included.
    assert space["trainer.batch_size"] == IntDistribution(16, 64, step=16)
    assert space["trainer.epochs"] == IntDistribution(1, 9, step=2)
    assert fixed == ["model.activation=relu"]


def test_the_grid_is_every_value_of_a_discrete_space():
    space, _ = search.search_space(["a=choice(x,y)", "b=range(0, 3)"])
    assert search.grid_of(space) == {"a": ["x", "y"], "b": [0, 1, 2]}
    space, _ = search.search_space(["c=interval(0, 1.5)"])
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.params\.c: the grid sampler"):
        search.grid_of(space)


def test_the_default_storage_is_a_journal_beside_the_mlflow_store(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    assert search.storage_location("auto", f"sqlite:///{db}") == str(
        tmp_path / "store" / "optuna.journal")
    assert search.storage_location(None, f"sqlite:///{db}") is None
    assert search.storage_location("null", None) is None
    assert search.storage_location("sqlite:///x.db", None) == "sqlite:///x.db"
    assert search.storage_location(str(tmp_path / "s.journal"), None) == str(
        tmp_path / "s.journal")
    # A remote MLflow server: the study stays with the project.
    from pipeline.paths import project_root

    assert search.storage_location("auto", "http://127.0.0.1:5000") == str(
        project_root() / "optuna.journal")


def test_a_reporter_reports_every_few_epochs_and_stops_a_pruned_trial(tmp_path):
    from pipeline.engine.loop import StopTraining

    storage = search.open_storage(str(tmp_path / "s.journal"))
    study = optuna.create_study(study_name="s", storage=storage,
                                pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    reporter = search.TrialReporter(trial, every=10)
    for epoch in range(1, 25):
        reporter(epoch, {"val/loss": 0.5, "test/loss": 9.0})  # the pruner sees val only
    assert study.trials[0].intermediate_values == {10: 0.5, 20: 0.5}
    with pytest.raises(StopTraining):
        reporter(30, {"val/loss": 2.0, "test/loss": 0.1})  # over the threshold: pruned
    assert reporter.pruned_epoch == 30
    assert study.trials[0].user_attrs[search.PRUNED_ATTR] == 30
    assert reporter.run_tags() == {"sweep.trial": "0", "sweep.trial_state": "pruned",
                                   "sweep.pruned_epoch": "30"}


# ---------------------------------------------------------------------- end to end


def _runs(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("backprop")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def _study(store_dir, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name,
                             storage=search.open_storage(str(store_dir / "optuna.journal")))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_six_trial_search_is_kept_and_a_second_command_resumes_it(
        launcher, run_train, tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    args = ("+sweep=optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.study_name=six", *FAST)
    if launcher == "joblib":
        args += ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    proc = run_train(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parents, children = _runs(uri)
    assert len(parents) == 1 and len(children) == 6
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["sweep.trial"] for c in children} == {str(i) for i in range(6)}
    study = _study(tmp_path / "store", "six")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    # Each trial told Optuna its run's final validation loss (never the test loss).
    by_trial = {int(c.data.tags["sweep.trial"]): c.data.metrics["val/loss"] for c in children}
    assert {t.number: t.value for t in study.trials} == pytest.approx(by_trial)
    assert "0 trials so far, adding 6" in proc.stdout
    assert f"optuna-dashboard {tmp_path / 'store' / 'optuna.journal'}" in proc.stdout
    parent = parents[0]
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep/optuna")}
    assert {"sweep/optuna/history.png", "sweep/optuna/param_importances.png",
            "sweep/optuna/parallel_coordinates.png"} <= figures

    again = run_train("+sweep=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                      "hydra.sweeper.study_name=six", *FAST, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 trials so far, adding 2" in again.stdout
    assert len(_study(tmp_path / "store", "six").trials) == 8


@pytest.mark.slow
def test_pruning_stops_trials_that_cannot_learn_and_they_are_not_failures(
        run_train, tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    proc = run_train(
        "+sweep=optuna", "hydra.sweeper.params=null", "optimizer.lr=choice(0.05,0.000001)",
        "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.n_trials=6",
        "hydra.sweeper.n_jobs=1", "hydra.sweeper.study_name=prune", "trainer.epochs=60",
        "tracking.animation=false", "tracking.log_model=false",
        env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(tmp_path / "store", "prune")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.params, t.state) for t in study.trials]
    # Only the learning rate that cannot learn is pruned, at its first report.
    assert {t.params["optimizer.lr"] for t in pruned} == {0.000001}
    assert {t.user_attrs[search.PRUNED_ATTR] for t in pruned} == {10}
    client, parents, children = _runs(uri)
    assert parents[0].info.status == "FINISHED"
    pruned_runs = [c for c in children if c.data.tags.get("sweep.trial_state") == "pruned"]
    assert len(pruned_runs) == len(pruned)
    assert {c.info.status for c in pruned_runs} == {"FINISHED"}
    assert {c.data.tags["sweep.pruned_epoch"] for c in pruned_runs} == {"10"}
    # The parent's report shows them as pruned, not failed.
    assert re.search(r"^sweep \S+: 6 jobs, 0 failed", proc.stdout, re.M), proc.stdout[-2000:]
    assert proc.stdout.count("pruned at epoch 10") >= len(pruned)
    assert "PRUNED" in proc.stdout


@pytest.mark.slow
def test_a_diverging_trial_fails_with_its_reason_and_the_search_goes_on(
        run_train, tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    proc = run_train(
        "+sweep=optuna", "hydra.sweeper.params=null", "optimizer.lr=choice(0.01,10.0)",
        "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.study_name=diverge", "optimizer=sgd", "model.activation=relu",
        "model.output=identity", "model.loss=mse", "trainer.dtype=float64",
        "trainer.epochs=50", "tracking.animation=false", "tracking.log_model=false",
        env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 1, proc.stderr[-3000:]  # a sweep with a failed job says so
    study = _study(tmp_path / "store", "diverge")
    states = {t.params["optimizer.lr"]: t.state for t in study.trials}
    assert states == {0.01: TrialState.COMPLETE, 10.0: TrialState.FAIL}
    _, _, children = _runs(uri)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1
    assert failed[0].data.tags["failure_reason"].startswith("loss became")
    assert "1 complete, 0 pruned, 1 failed" in proc.stdout


@pytest.mark.slow
def test_optuna_dashboard_opens_the_study_with_the_printed_command(tmp_path, free_port):
    location = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="watched", storage=search.open_storage(location))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    command = search.dashboard_command(location).split()
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / command[0]), *command[1:], "--port", str(port),
         "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-2000:]
                assert time.monotonic() < deadline, "optuna-dashboard did not answer in 60 s"
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["watched"]
    finally:
        server.terminate()
        server.wait(timeout=30)
