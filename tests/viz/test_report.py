"""pipeline.viz.report: a sweep's table and figures rebuilt from MLflow alone.

A store under ``tmp_path`` is filled directly through :class:`pipeline.tracking.tracker.RunTracker`
(a parent tagged like pipeline.app.sweep tags it, children with metrics per epoch and a weights
file where pipeline.app.job logs the model), so these tests need no training and no Hydra.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.engine.mlp import MLP
from pipeline.tracking import tracker as tracking
from pipeline.tracking.model_files import save_model
from pipeline.viz import report

SWEPT = [
    report.SweptParam("model.hidden_sizes", "[4],[16,16]", [[4], [16, 16]]),
    report.SweptParam("optimizer.lr", "1.0,0.1,0.01", [1.0, 0.1, 0.01]),
]


def _runs_frame(rows: list[dict]) -> pd.DataFrame:
    """What tracking.search_runs returns, for the columns the report reads."""
    out = []
    for i, r in enumerate(rows):
        out.append({
            "run_id": r.get("run_id", f"r{i}"), "status": r.get("status", "FINISHED"),
            "start_time": pd.Timestamp(1_700_000_000 + i, unit="s"),
            "params.model.hidden_sizes": json.dumps(r["sizes"]),
            "params.optimizer.lr": json.dumps(r["lr"]),
            "metrics.test/accuracy": r.get("acc", 0.9), "metrics.test/loss": r.get("loss", 0.3),
            "metrics.val/accuracy": r.get("acc", 0.9),
            "metrics.val/loss": r.get("val_loss", r.get("loss", 0.3)),
            "metrics.train/accuracy": 0.9, "metrics.train/loss": 0.3,
            "tags.sweep.job": str(r["job"]), "tags.mlflow.runName": f"run{i}",
            "tags.failure_reason": r.get("reason"),
        })
    return pd.DataFrame(out)


GRID = [  # written in completion order (a parallel launcher), not job order
    dict(job=3, sizes=[16, 16], lr=1.0, acc=0.95, loss=0.10),
    dict(job=0, sizes=[4], lr=1.0, acc=0.80, loss=0.50),
    dict(job=5, sizes=[16, 16], lr=0.01, acc=0.85, loss=0.40),
    dict(job=1, sizes=[4], lr=0.1, acc=0.82, loss=0.45),
    dict(job=2, sizes=[4], lr=0.01, status="FAILED", acc=0.5, loss=np.inf,
         reason="loss became inf at epoch 3; try a smaller optimizer.lr"),
    dict(job=4, sizes=[16, 16], lr=0.1, acc=0.90, loss=0.20),
]


# ----------------------------------------------------------------------------- table


def test_table_rows_follow_the_sweep_order_with_values_parsed():
    table = report.sweep_table(_runs_frame(GRID), SWEPT)
    assert table["job"].tolist() == [0, 1, 2, 3, 4, 5]
    assert table["model.hidden_sizes"].tolist() == [[4]] * 3 + [[16, 16]] * 3
    assert table["optimizer.lr"].tolist() == [1.0, 0.1, 0.01] * 2
    assert table.loc[2, "status"] == "FAILED"
    assert table.loc[2, "failure_reason"].startswith("loss became inf")
    assert table.loc[0, "failure_reason"] == ""
    assert list(table.columns[:3]) == ["job", "model.hidden_sizes", "optimizer.lr"]


def test_jobs_with_replicas_show_mean_and_spread():
    runs = _runs_frame(GRID)
    runs["metrics.test/loss/std"] = [0.01 * (i + 1) for i in range(len(runs))]
    runs["metrics.test/accuracy/std"] = 0.005
    table = report.sweep_table(runs, SWEPT)
    assert table.loc[3, "test/loss/std"] == pytest.approx(0.01)  # job 3 came first
    rep = report.SweepReport(table=table, params=[p.key for p in SWEPT])
    text = rep.text()
    assert "0.1000 ± 0.0100" in text and "0.9500 ± 0.0050" in text, text
    failed_row = next(line for line in text.splitlines() if "FAILED" in line)
    assert "±" not in failed_row and " - " in failed_row  # a diverged job's values: "-"
    plain = report.SweptParam("optimizer.lr", "1.0,0.1", [1.0, 0.1])
    single = report.sweep_table(_runs_frame(GRID[:2]), [plain])
    assert not [c for c in single.columns if c.endswith("/std")]
    assert "±" not in report.SweepReport(table=single, params=[plain.key]).text()


def test_search_table_rows_follow_the_trial_number():
    table = report.sweep_table(_runs_frame(GRID), SWEPT, sweeper="optuna")
    assert table["job"].tolist() == [0, 1, 2, 3, 4, 5]


def test_best_is_the_lowest_final_validation_loss_of_a_finished_job():
    table = report.sweep_table(_runs_frame(GRID), SWEPT)
    assert report.pick_best(table) == "r0"  # job 3: loss 0.10
    # Chosen on validation, never on test: a job with the lowest test loss but a worse
    # validation loss is not the best.
    rows = [dict(GRID[0], val_loss=0.5), *GRID[1:]]
    table = report.sweep_table(_runs_frame(rows), SWEPT)
    assert report.pick_best(table) != "r0"
    assert report.pick_best(table) == report.pick_best(table, "val/loss", "min")
    assert report.pick_best(table, "test/accuracy", "max") == "r0"
    failed_only = table.assign(status="FAILED")
    assert report.pick_best(failed_only) is None
    with pytest.raises(ValueError, match="mode="):
        report.pick_best(table, mode="best")


def test_heatmap_grid_holds_each_jobs_final_metric_and_nan_for_failures():
    table = report.sweep_table(_runs_frame(GRID), SWEPT)
    grid = report.heatmap_grid(table, "model.hidden_sizes", "optimizer.lr", "test/accuracy")
    assert grid.index.tolist() == ["[4]", "[16,16]"]  # as listed (lists are not sorted)
    assert grid.columns.tolist() == ["0.01", "0.1", "1"]  # numbers sorted, like the heatmap
    assert grid.loc["[16,16]", "1"] == 0.95 and grid.loc["[4]", "0.1"] == 0.82
    assert np.isnan(grid.loc["[4]", "0.01"])  # the failed job


def test_parse_param_reads_what_tracking_logged():
    assert report.parse_param("[16, 16]") == [16, 16]
    assert report.parse_param("0.1") == 0.1
    assert report.parse_param("relu") == "relu"
    assert report.parse_param("true") is True


# --------------------------------------------------------------------------- figures


@pytest.mark.parametrize(("n_keys", "kind"), [(1, "lines"), (2, "heatmap"), (3, "facets")])
def test_metric_figures_by_number_of_swept_keys(n_keys, kind):
    rng = np.random.default_rng(0)
    rows = []
    for a in (1, 2):
        for b in (0.1, 1.0):
            for c in ("relu", "tanh"):
                rows.append({"a": a, "b": b, "c": c, "test/accuracy": rng.random(),
                             "test/loss": rng.random(), "status": "FINISHED", "job": len(rows)})
    table = pd.DataFrame(rows)
    keys = ["a", "b", "c"][:n_keys]
    figures, grids, notes = report.metric_figures(table, keys)
    assert set(figures) == {"test_accuracy.png", "test_loss.png"}
    n_axes = len(figures["test_accuracy.png"].axes)
    if kind == "lines":
        assert n_axes == 1
        assert any("several jobs share" in n for n in notes)  # 4 jobs per value: the mean
    elif kind == "heatmap":
        assert set(grids) == {"test_accuracy_grid", "test_loss_grid"}
        assert n_axes == 2  # heatmap + colour bar
    else:
        assert n_axes == 3  # two facets + a shared colour bar
        assert not grids


def test_search_figures_show_the_objective_per_trial():
    table = pd.DataFrame({"job": [0, 1, 2], "test/accuracy": [0.8, 0.9, 0.7],
                          "test/loss": [0.5, 0.2, 0.9], "status": ["FINISHED"] * 3})
    figures, grids, _ = report.metric_figures(table, ["optimizer.lr"], sweeper="optuna")
    assert "trial" in figures["test_loss.png"].axes[0].get_xlabel()
    assert not grids


# ------------------------------------------------------------- from a real MLflow store


def _fill_store(uri: str, tmp_path, grid=GRID, with_models: bool = True) -> tuple[str, str]:
    """A parent and its children in experiment ``backprop``; returns (experiment, parent)."""
    experiment = tracking.prepare_experiment(uri, "backprop")
    parent = tracking.RunTracker(uri, spool_root=tmp_path / "spool")
    parent.start(experiment, "sweep-test", params={"optimizer": {"lr": "1.0,0.1,0.01"}},
                 tags={report.TAG_ROLE: "parent", report.TAG_NAME: "sweep-test",
                       report.TAG_PARAMS: json.dumps([p.to_dict() for p in SWEPT])})
    points = pd.DataFrame({"x1": [-1.0, 1.0, 0.0, 0.5], "x2": [0.0, 0.5, -1.0, 1.0],
                           "label": [0, 1, 0, 1], "split": ["train"] * 4})
    for i, job in enumerate(grid):
        child = tracking.RunTracker(uri, spool_root=tmp_path / "spool")
        child.start(experiment, f"job{job['job']}",
                    params={"model": {"hidden_sizes": job["sizes"]},
                            "optimizer": {"lr": job["lr"]}},
                    tags={report.TAG_JOB: str(job["job"])}, parent_run_id=parent.run_id)
        for epoch in (1, 2, 3):  # the last epoch's values are the final ones
            scale = 1.0 if epoch == 3 else 1.5
            child.log_metrics({"test/accuracy": job["acc"] / scale,
                               "test/loss": job["loss"] * scale,
                               "val/accuracy": job["acc"] / scale,
                               "val/loss": job["loss"] * scale}, step=epoch)
        if with_models and job.get("status", "FINISHED") == "FINISHED":
            model = MLP([2, *job["sizes"], 1], activation="tanh", output="sigmoid", seed=i)
            # Where the pyfunc model of pipeline.app.job keeps its weights.
            weights = save_model(model, tmp_path / f"{parent.run_id}-{i}" / "weights.npz")
            child.log_artifact(weights, "model/artifacts")
            child.log_text(points.to_csv(index=False), "data/dataset.csv")
        child.end(job.get("status", "FINISHED"), job.get("reason"))
    parent.end("FINISHED")
    return experiment, parent.run_id


def test_build_report_from_mlflow_alone(tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    experiment, parent = _fill_store(uri, tmp_path)
    rep = report.build_report(uri, experiment, parent)
    t = rep.table
    assert t["job"].tolist() == [0, 1, 2, 3, 4, 5]
    assert t["status"].tolist().count("FAILED") == 1
    assert t.loc[t["job"] == 3, "test/accuracy"].item() == pytest.approx(0.95)
    assert t.loc[t["job"] == 3, "best"].item()
    assert set(rep.figures) == {"test_accuracy.png", "test_loss.png", "boundaries.png"}
    boundaries = rep.figures["boundaries.png"]
    assert len(boundaries.axes) >= 6  # 2 x 3 panels (+ colour bar)
    failed_panel = boundaries.axes[0 * 3 + 0]  # [4] x lr 0.01 (lr sorted: 0.01 first)
    assert any(text.get_text() == "FAILED" for text in failed_panel.texts)
    written = rep.save(tmp_path / "out")
    assert {p.name for p in written} >= {"summary.csv", "test_accuracy_grid.csv",
                                         "boundaries.png"}
    assert len(rep.failed) == 1
    assert "loss became inf" in rep.text()


def test_build_report_of_replicated_jobs_reads_their_spreads(tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    experiment, parent = _fill_store(uri, tmp_path, with_models=False)
    runs = tracking.search_runs(uri, [experiment], f"tags.{report.PARENT_TAG} = '{parent}'")
    job3 = runs.loc[runs[f"tags.{report.TAG_JOB}"] == "3", "run_id"].item()
    child = tracking.RunTracker.attach(uri, job3, spool_root=tmp_path / "spool")
    child.log_metrics({"test/loss/std": 0.02}, step=3)
    child.detach()
    rep = report.build_report(uri, experiment, parent)
    assert rep.table.loc[rep.table["job"] == 3, "test/loss/std"].item() == pytest.approx(0.02)
    assert rep.table["test/loss/std"].isna().sum() == 5  # the other jobs have no replicas
    assert any("replicas" in note for note in rep.notes)
    assert "0.1000 ± 0.0200" in rep.text()


def test_report_figures_are_drawn_once_for_mlflow_and_the_folder(tmp_path, new_store,
                                                                  monkeypatch):
    """A sweep writes its report to MLflow and next to Hydra's outputs: each figure is
    drawn once, and both places get the same PNG."""
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    uri = new_store(tmp_path / "store")
    experiment, parent = _fill_store(uri, tmp_path)
    rep = report.build_report(uri, experiment, parent)
    draws: dict[int, int] = {}
    draw = Figure.draw

    def counted(fig, renderer):
        draws[id(fig)] = draws.get(id(fig), 0) + 1
        return draw(fig, renderer)

    monkeypatch.setattr(Figure, "draw", counted)
    report.log_report(uri, parent, rep)
    rep.save(tmp_path / "out")
    assert sorted(draws) == sorted(id(fig) for fig in rep.figures.values())
    assert set(draws.values()) == {1}
    logged = MlflowClient(uri).download_artifacts(parent, "sweep", str(tmp_path / "logged"))
    for name in rep.figures:
        png = (tmp_path / "out" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (Path(logged) / name).read_bytes() == png


def test_report_cli_writes_and_logs_the_files(tmp_path, new_store, capsys):
    uri = new_store(tmp_path / "store")
    experiment, parent = _fill_store(uri, tmp_path, with_models=False)
    out = tmp_path / "cli"
    code = report.main(["--experiment", "backprop", "--uri", uri, "--sweep", "sweep-test",
                        "--out", str(out), "--log"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 jobs, 1 failed" in printed and "no decision boundaries" in printed
    table = pd.read_csv(out / "summary.csv")
    assert table["run_id"].nunique() == 6
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert "sweep/summary.csv" in names and "sweep/test_loss_grid.csv" in names
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"  # --log leaves the parent's status alone
    best = run.data.tags["best_run_id"]
    assert client.get_run(best).data.tags["best_in_sweep"] == "true"
    assert client.get_run(best).info.status == "FINISHED"
    # --list shows the sweep; unknown names fail with a clear message.
    assert report.main(["--experiment", "backprop", "--uri", uri, "--list"]) == 0
    assert parent in capsys.readouterr().out
    assert report.main(["--experiment", "nope", "--uri", uri]) == 1
    assert "no such experiment" in capsys.readouterr().err
    assert report.main(["--experiment", "backprop", "--uri", uri, "--sweep", "zzz"]) == 1
    assert "no such sweep" in capsys.readouterr().err


def test_two_sweeps_in_one_table(tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    experiment, first = _fill_store(uri, tmp_path, grid=GRID[:2], with_models=False)
    _, second = _fill_store(uri, tmp_path, grid=GRID[2:4], with_models=False)
    rep = report.build_report(uri, experiment, [first, second], boundaries=False)
    assert len(rep.table) == 4 and "sweep" in rep.table.columns
    header, *rows = rep.text().splitlines()
    assert header.split()[:2] == ["sweep", "job"]  # the terminal says which sweep a row is
    assert [row.split()[0] for row in rows] == ["sweep-test"] * 4


def test_boundaries_find_every_jobs_logged_model_in_one_search(tmp_path, new_store,
                                                               monkeypatch):
    """The report locates the jobs' logged models with one search instead of a ``runs:/``
    lookup per job; each panel shows its own job's model, the newest where a job logged
    two, and runs without a model are left out of the locations."""
    from pipeline.tracking.model_files import load_model
    from pipeline.viz import plots

    uri = new_store(tmp_path / "store")
    experiment = tracking.prepare_experiment(uri, "backprop")
    swept = [report.SweptParam("optimizer.lr", "1.0,0.1,0.01", [1.0, 0.1, 0.01])]
    parent = tracking.RunTracker(uri, spool_root=tmp_path / "spool")
    parent.start(experiment, "sweep-models",
                 tags={report.TAG_ROLE: "parent", report.TAG_NAME: "sweep-models",
                       report.TAG_PARAMS: json.dumps([p.to_dict() for p in swept])})
    X = np.random.default_rng(0).normal(size=(40, 2))
    points = pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "label": (X[:, 0] > 0).astype(int),
                           "split": "train"})
    models: dict[str, MLP] = {}
    for job, lr in enumerate((1.0, 0.1, 0.01)):
        child = tracking.RunTracker(uri, spool_root=tmp_path / "spool")
        child.start(experiment, f"job{job}", params={"optimizer": {"lr": lr}},
                    tags={report.TAG_JOB: str(job)}, parent_run_id=parent.run_id)
        child.log_metrics({"test/loss": 0.1 * (job + 1), "val/loss": 0.1 * (job + 1)}, step=1)
        model = MLP([2, 4, 1], activation="tanh", output="sigmoid", seed=job)
        if job == 1:  # an earlier model of the same run: the newer one is the job's
            child.log_model(MLP([2, 4, 1], activation="tanh", output="sigmoid", seed=99), X[:3])
        child.log_model(model, X[:3])
        child.log_text(points.to_csv(index=False), report.DATASET_ARTIFACT)
        child.end("FINISHED")
        models[child.run_id] = model
    parent.end("FINISHED")

    locations = tracking.logged_model_locations(uri, experiment, [*models, parent.run_id])
    assert set(locations) == set(models)
    for run_id, model in models.items():
        path = tracking.download_artifact_uri(
            uri, f"{locations[run_id]}/artifacts/weights.npz", tmp_path / run_id)
        np.testing.assert_array_equal(load_model(path).params, model.params)

    by_run = tracking.download_artifact

    def no_model_by_run(uri_, run_id, path, dst):
        assert path != report.WEIGHTS_ARTIFACT, "a model was looked up through runs:/"
        return by_run(uri_, run_id, path, dst)

    drawn = {}
    draw = plots.plot_small_multiples

    def keep_panels(panels, *args, **kwargs):
        drawn["panels"] = panels
        return draw(panels, *args, **kwargs)

    monkeypatch.setattr(tracking, "download_artifact", no_model_by_run)
    monkeypatch.setattr(plots, "plot_small_multiples", keep_panels)
    rep = report.build_report(uri, experiment, parent.run_id)
    assert "boundaries.png" in rep.figures
    run_of_lr = dict(zip(rep.table["optimizer.lr"], rep.table["run_id"], strict=True))
    assert len(drawn["panels"]) == 3
    for panel in drawn["panels"]:
        expected = models[run_of_lr[panel.col]].predict_proba(X)
        np.testing.assert_allclose(panel.proba(X), expected, rtol=1e-6)
