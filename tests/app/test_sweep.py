"""Sweeps: one MLflow parent run per Hydra multirun, every job a nested child, a report.

The end-to-end tests run the real ``train.py -m`` in a subprocess (basic, joblib and
submitit launchers, Optuna), with every output under ``tmp_path``, and read the result back
through ``MlflowClient``. The PostgreSQL-backed server case is in ``test_server.py``.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline.app import sweep

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: Short, quiet jobs: the tests are about the sweep, not the training.
FAST = ("trainer.epochs=20", "tracking.animation=false")


# ------------------------------------------------------------------------- helpers


def sweep_runs(uri: str, experiment: str = "backprop"):
    """(parent, children) of the only sweep in ``experiment``, read through MlflowClient."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # Nothing else: every run of the experiment is the parent or one of its children.
    assert len(runs) == 1 + len(children)
    return client, parent, children


def final(client, run_id: str, key: str) -> float:
    history = client.get_metric_history(run_id, key)
    assert history, f"{run_id} has no {key}"
    return max(history, key=lambda m: (m.step, m.timestamp)).value


def artifact_text(client, run_id: str, path: str, tmp_path) -> str:
    local = client.download_artifacts(run_id, path, str(tmp_path))
    with open(local) as f:
        return f.read()


def artifact_names(client, run_id: str, path: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def check_grid_sweep(uri: str, tmp_path, n_jobs: int, keys: list[str]) -> tuple:
    """The common checks of a finished grid sweep; returns (client, parent, children, table)."""
    client, parent, children = sweep_runs(uri)
    assert len(children) == n_jobs
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("sweep-")
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.info.experiment_id for c in children} == {parent.info.experiment_id}
    # The parent holds the sweep's overrides and what was swept.
    swept = [p["key"] for p in json.loads(parent.data.tags["sweep.params"])]
    assert swept == keys
    for key in keys:
        assert "," in parent.data.params[key]
    assert parent.data.tags["sweep.n_jobs"] == str(n_jobs)
    # The report: table, heatmaps, the data behind them.
    names = artifact_names(client, parent.info.run_id, "sweep")
    assert {"sweep/summary.csv", "sweep/test_accuracy.png", "sweep/test_loss.png",
            "sweep/params.json"} <= names, names
    table = pd.read_csv(io.StringIO(
        artifact_text(client, parent.info.run_id, "sweep/summary.csv", tmp_path)))
    assert len(table) == n_jobs and set(table["status"]) == {"FINISHED"}
    assert list(table["job"]) == list(range(n_jobs))  # Hydra's job order
    by_id = {c.info.run_id: c for c in children}
    for _, row in table.iterrows():
        child = by_id[row["run_id"]]
        assert child.data.tags["sweep.job"] == str(row["job"])
        for metric in ("test/accuracy", "test/loss"):
            assert row[metric] == pytest.approx(final(client, row["run_id"], metric), rel=1e-12)
    # Best run tagged on the parent and on that child.
    best = parent.data.tags["best_run_id"]
    assert by_id[best].data.tags.get("best_in_sweep") == "true"
    assert table.loc[table["run_id"] == best, "test/loss"].item() == table["test/loss"].min()
    return client, parent, children, table


def check_heatmap_cells(client, parent, table, tmp_path, row: str, col: str) -> None:
    """Each cell of the heatmap data equals that job's final metric in MLflow."""
    for metric in ("test/accuracy", "test/loss"):
        name = f"sweep/{metric.replace('/', '_')}_grid.csv"
        grid = pd.read_csv(io.StringIO(artifact_text(client, parent.info.run_id, name,
                                                     tmp_path)), index_col=0)
        assert grid.size == len(table)
        for _, job in table.iterrows():
            cell = grid.loc[str(job[row]).replace(" ", ""), str(job[col])]
            assert cell == pytest.approx(final(client, job["run_id"], metric), rel=1e-12)


# ------------------------------------------------------------------- unit: what is swept


def _multirun_config(params: dict | None, task: list[str], sweeper: str = "basic"):
    return OmegaConf.create({"hydra": {
        "sweeper": {"_target_": f"hydra._internal.core_plugins.{sweeper}_sweeper.X",
                    "params": params},
        "overrides": {"task": task},
        "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
        "runtime": {"choices": {}},
    }})


def test_swept_params_follow_hydra_order_and_precedence():
    cfg = _multirun_config(
        {"model.hidden_sizes": "[4],[8],[16,16]", "optimizer.lr": "0.01,0.1"},
        ["optimizer.lr=0.5,1.0,2.0", "trainer.epochs=5", "optimizer=adam,sgd"],
    )
    params = sweep.swept_params(cfg)
    assert [p.key for p in params] == ["model.hidden_sizes", "optimizer.lr", "optimizer"]
    assert params[0].values == [[4], [8], [16, 16]]
    assert params[1].values == [0.5, 1.0, 2.0]  # the command line wins, first position kept
    assert params[1].spec == "0.5,1.0,2.0"
    assert params[2].values == ["adam", "sgd"]
    assert sweep._expected_jobs(cfg) == 18


def test_swept_params_fixed_value_on_the_command_line_ends_the_sweep_of_a_key():
    cfg = _multirun_config({"optimizer.lr": "0.01,0.1"}, ["optimizer.lr=0.05"])
    assert sweep.swept_params(cfg) == []
    assert sweep._expected_jobs(cfg) == 1


def test_swept_params_of_a_search_keep_the_distribution():
    cfg = _multirun_config({"optimizer.lr": "tag(log, interval(0.001, 1.0))",
                            "model.hidden_sizes": "choice([4],[16,16])"}, [], sweeper="optuna")
    lr, sizes = sweep.swept_params(cfg)
    assert lr.values is None and "interval" in lr.spec
    assert sizes.values == [[4], [16, 16]]
    assert sweep._expected_jobs(cfg) == 0  # unknown in advance


def test_sweep_name_uses_the_preset_or_the_keys():
    cfg = _multirun_config({"optimizer.lr": "0.1,1"}, [])
    assert sweep.sweep_name(cfg, sweep.swept_params(cfg)).startswith("sweep-lr-")
    cfg.hydra.runtime.choices = {"sweep": "width_x_lr"}
    assert sweep.sweep_name(cfg, []).startswith("sweep-width_x_lr-")


@pytest.mark.parametrize(("target", "name"), [
    ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", "basic"),
    ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "joblib"),
    ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "submitit_local"),
    ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "submitit_slurm"),
    ("hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher", "ray"),
    ("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "optuna"),
    ("hydra_plugins.backprop_optuna_sweeper.optuna_sweeper.OptunaSweeper", "optuna"),
])
def test_plugin_short_names(target, name):
    assert sweep._short(target) == name


def test_callback_pickles_its_context_without_the_parent_tracker():
    import pickle

    cb = sweep.MlflowSweepCallback()
    cb.context = sweep.SweepContext("sqlite:///x.db", "3", "abc", "sweep-x", "/tmp/s")
    cb._parent = object()  # stands for the RunTracker (unpicklable in general)
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.context == cb.context and clone._parent is None
    clone.on_job_start(OmegaConf.create({}))
    assert sweep.current_context() == cb.context
    sweep._set_current(None)


@pytest.mark.parametrize("preset", ["processes", "slurm"])
def test_launcher_presets_extend_submitit_with_a_timeout(preset):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from pipeline.app.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={preset}"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("LocalLauncher" if preset == "processes"
                                      else "SlurmLauncher")
    assert launcher.timeout_min > 60  # submitit's default kills longer jobs
    assert launcher.cpus_per_task == 1  # a job uses one core (one BLAS thread)


# ----------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_basic_launcher_2x2_sweep_one_parent_four_children(run_train, tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    proc = run_train("-m", "model.hidden_sizes=[4],[8]", "optimizer.lr=0.01,0.1", *FAST,
                     env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parent, children, table = check_grid_sweep(
        uri, tmp_path / "dl", 4, ["model.hidden_sizes", "optimizer.lr"])
    check_heatmap_cells(client, parent, table, tmp_path / "dl2", "model.hidden_sizes",
                        "optimizer.lr")
    assert "sweep/boundaries.png" in artifact_names(client, parent.info.run_id, "sweep")
    # Every job's final network drawing, on one page to flip through.
    page = artifact_text(client, parent.info.run_id, "sweep/networks.html", tmp_path / "dl3")
    assert page.count('<figure class="card') == 4
    assert page.count("data:image/png;base64,") == 4 and "<script src" not in page
    assert "model.hidden_sizes=[8], optimizer.lr=0.1" in page
    assert parent.data.tags["sweep.launcher"] == "basic"
    assert "4 jobs, 0 failed" in proc.stdout
    # The standalone report rebuilds the same table from MLflow alone.
    from pipeline.viz import report

    out = tmp_path / "rebuilt"
    assert report.main(["--experiment", "backprop", "--uri", uri, "--out", str(out),
                        "--no-boundaries"]) == 0
    rebuilt = pd.read_csv(out / "summary.csv")
    pd.testing.assert_frame_equal(rebuilt, table)


@pytest.mark.slow
def test_joblib_launcher_2x2_sweep_two_workers(run_train, tmp_path, new_store):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    uri = new_store(tmp_path / "store")
    proc = run_train("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "model.hidden_sizes=[4],[8]", "optimizer.lr=0.01,0.1", *FAST,
                     "tracking.log_model=false", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parent, children, table = check_grid_sweep(
        uri, tmp_path / "dl", 4, ["model.hidden_sizes", "optimizer.lr"])
    check_heatmap_cells(client, parent, table, tmp_path / "dl2", "model.hidden_sizes",
                        "optimizer.lr")
    assert parent.data.tags["sweep.launcher"] == "joblib"


@pytest.mark.slow
def test_failing_jobs_are_recorded_and_the_others_still_run(run_train, tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    # Job 1 diverges (loss nan), job 2 has a bad value that validation refuses.
    proc = run_train("-m", "optimizer=sgd", "model.activation=relu",
                     "optimizer.lr=0.1,1e6,-1", *FAST, "tracking.log_model=false",
                     env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 job(s) failed" in proc.stderr
    assert "loss became" in proc.stderr and "optimizer.lr" in proc.stderr
    client, parent, children = sweep_runs(uri)
    assert parent.info.status == "FAILED"
    assert "2 of 3 jobs failed" in parent.data.tags["failure_reason"]
    by_job = {c.data.tags["sweep.job"]: c for c in children}
    assert sorted(by_job) == ["0", "1", "2"]
    assert by_job["0"].info.status == "FINISHED"
    assert by_job["1"].info.status == "FAILED"
    assert "loss became nan at epoch" in by_job["1"].data.tags["failure_reason"]
    assert by_job["2"].info.status == "FAILED"
    assert by_job["2"].data.tags["failure_reason"].startswith("config error: optimizer.lr=")
    assert by_job["2"].data.params["optimizer.lr"] == "-1.0"  # the bad config, recorded
    for c in (by_job["1"], by_job["2"]):
        assert "error/traceback.txt" in {a.path for a in client.list_artifacts(c.info.run_id,
                                                                                 "error")}
    table = pd.read_csv(io.StringIO(
        artifact_text(client, parent.info.run_id, "sweep/summary.csv", tmp_path)))
    assert list(table["status"]) == ["FINISHED", "FAILED", "FAILED"]
    assert table["failure_reason"].isna().tolist() == [True, False, False]
    assert parent.data.tags["best_run_id"] == by_job["0"].info.run_id


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(run_train, tmp_path, new_store):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    uri = new_store(tmp_path / "store")
    proc = run_train("-m", "hydra/launcher=processes", "optimizer.lr=0.01,0.1", *FAST,
                     "tracking.log_model=false", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parent, children, table = check_grid_sweep(uri, tmp_path / "dl", 2,
                                                       ["optimizer.lr"])
    assert parent.data.tags["sweep.launcher"] == "submitit_local"
    assert (tmp_path / "multirun" / ".submitit").is_dir()
    assert "sweep/test_accuracy.png" in artifact_names(client, parent.info.run_id, "sweep")


@pytest.mark.slow
def test_optuna_search_trials_are_child_runs(run_train, tmp_path, new_store):
    pytest.importorskip("optuna")
    uri = new_store(tmp_path / "store")
    proc = run_train("+sweep=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=3",
                     *FAST, "tracking.log_model=false", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parent, children = sweep_runs(uri)
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    assert parent.data.tags["sweep.sweeper"] == "optuna"
    assert parent.info.run_name.startswith("sweep-optuna-")
    assert {c.data.tags["sweep.job"] for c in children} == {"0", "1", "2"}
    best = parent.data.tags["best_run_id"]
    losses = {c.info.run_id: final(client, c.info.run_id, "test/loss") for c in children}
    assert best == min(losses, key=losses.get)
    assert "search: best trial" in proc.stdout


@pytest.mark.slow
def test_untracked_sweep_still_reports_failures(run_train, tmp_path):
    proc = run_train("-m", "tracking=none", "optimizer.lr=0.1,-1", "trainer.epochs=5")
    assert proc.returncode == 1
    assert "1 job(s) failed" in proc.stderr and "#1" in proc.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
