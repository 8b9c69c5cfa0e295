"""Reliability through the real entry point: bad input, divergence, Ctrl-C and SIGTERM,
concurrent writers, an unreachable or dying tracking server, tampered model files,
determinism, and a sweep with a bad job.

Everything runs the real ``python train.py`` in subprocesses (or ``pipeline.app.job.run`` where
a subprocess adds nothing), against real SQLite stores in ``tmp_path`` and real
``mlflow server`` processes; no mocks. Every process a test starts is stopped by its pid.
Measured times are printed (``pytest -s``) so the closing note can quote them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, TRAIN_PY, TRAIN_TIMEOUT_S, sqlite_uri
from servers import wait_http

MLFLOW_BIN = str(Path(sys.executable).parent / "mlflow")
# Keys every run of the default model (2 tanh hidden layers) logs once per epoch.
EPOCH_METRICS = (
    "train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr",
    "grad_norm/layer_1", "grad_norm/layer_3", "update_ratio/layer_2",
    "saturated_fraction/layer_1", "saturated_fraction/layer_2",
)


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _all_runs(uri: str) -> list:
    """Every run in every experiment (active or deleted) of a store."""
    from mlflow.entities import ViewType

    client = _client(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


def _store_runs(db: Path) -> list:
    """Runs in the SQLite store at ``db``; [] when the file was never created (opening it
    with MLflow would create it)."""
    return _all_runs(sqlite_uri(db)) if db.exists() else []


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out |= _artifacts(client, run_id, item.path)
        else:
            out.add(item.path)
    return out


def _has_model(client, run) -> bool:
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    return any(m.source_run_id == run.info.run_id for m in models)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr[-3000:]}"
    return lines[0]


def _env_without_uri() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _popen_train(work: Path, *overrides: str, env: dict[str, str]) -> subprocess.Popen:
    """``python train.py`` in the background (its own session, so it can be stopped with
    its children by pid); stdout and stderr go to files under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "cwd").mkdir(exist_ok=True)
    command = [sys.executable, str(TRAIN_PY), *overrides, f"hydra.run.dir={work / 'outputs'}",
               f"hydra.sweep.dir={work / 'multirun'}"]
    out = open(work / "stdout.txt", "w")  # noqa: SIM115 -- closed by _finish
    err = open(work / "stderr.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(command, cwd=work / "cwd", env=env, stdout=out, stderr=err,
                            start_new_session=True)
    proc._files = (out, err)  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, work: Path, timeout: float = TRAIN_TIMEOUT_S):
    """Wait for a process from :func:`_popen_train`; return (returncode, stdout, stderr)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        _stop(proc)
        for f in proc._files:  # type: ignore[attr-defined]
            f.close()
    return (proc.returncode, (work / "stdout.txt").read_text(),
            (work / "stderr.txt").read_text())


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process this module started (and its children: it leads its own session,
    and a joblib sweep's fork server and workers lead their own group in it)."""
    if proc.poll() is None:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for pid in _session_pids(proc.pid):
        with _suppress_lookup():
            os.kill(pid, signal.SIGKILL)


def _session_pids(session: int) -> list[int]:
    """Live (not zombie) processes of a session, from /proc (Linux; [] elsewhere)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, ProcessLookupError)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
              interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        try:
            value = predicate()
        except Exception:  # the store may be mid-creation; try again
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ------------------------------------------------------------- bad input through train.py


_ROWS = "".join(f"{i % 7},{(3 * i) % 5},{i % 2}\n" for i in range(12))

# (id, CSV text or None for a missing file, key the message starts with, what it says)
CSV_CASES = [
    ("csv_missing", None, "dataset.path", "no such file"),
    ("csv_empty", "", "dataset.path", "is empty"),
    ("csv_header_only", "x1,x2,label\n", "dataset.path", "no data rows"),
    ("csv_non_numeric", "x1,x2,label\n" + _ROWS + "3,oops,1\n", "dataset.path",
     "non-numeric value 'oops'"),
    ("csv_missing_value", "x1,x2,label\n" + _ROWS.replace("1,3,1\n", "1,,1\n", 1),
     "dataset.path", "missing value"),
    ("csv_three_features",
     "x1,x2,x3,label\n" + "".join(f"{i},{i % 3},{i % 5},{i % 2}\n" for i in range(12)),
     "dataset.path", "exactly 2 are needed"),
    ("csv_one_feature", "x1,label\n" + "".join(f"{i},{i % 2}\n" for i in range(12)),
     "dataset.path", "exactly 2 are needed"),
    ("csv_single_class", "x1,x2,label\n" + "".join(f"{i},{i % 3},0\n" for i in range(12)),
     "dataset.label_column", "at least 2 classes"),
    ("csv_no_label_column", "x1,x2,y\n" + _ROWS, "dataset.label_column", "columns are"),
]


def _csv_cases(directory: Path) -> list[tuple]:
    """The CSV cases as (id, overrides, key, allowed), their files written to ``directory``."""
    cases = []
    for case_id, text, key, allowed in CSV_CASES:
        path = directory / f"{case_id}.csv"
        if text is not None:
            path.write_text(text)
        cases.append((case_id, ("dataset=csv", f"dataset.path={path}"), key, allowed))
    return cases


# (id, overrides, key the message starts with, text saying what is allowed)
BAD_INPUTS = [
    ("plus_typo", ("+trainer.epoch=5",), "trainer.epoch", "did you mean epochs"),
    ("unknown_key", ("trainer.epoch=5",), "trainer.epoch", "trainer takes epochs"),
    ("unknown_group", ("datset=moons",), "datset", ""),
    ("wrong_type", ("trainer.epochs=abc",), "trainer.epochs", "must be an integer"),
    ("unknown_optimizer_option", ("optimizer=lbfgs",), "optimizer", "adam"),
    ("unknown_dataset_option", ("dataset=mnist",), "dataset", "moons"),
    ("unknown_experiment", ("+experiment=nope",), "experiment", "xor_2_2_1"),
    ("lr_zero", ("optimizer.lr=0",), "optimizer.lr", "positive"),
    ("lr_negative", ("optimizer.lr=-1",), "optimizer.lr", "positive"),
    ("hidden_size_zero", ("model.hidden_sizes=[16,0]",), "model.hidden_sizes", ">= 1"),
    ("hidden_empty", ("model.hidden_sizes=[]",), "model.hidden_sizes", "non-empty"),
    ("test_fraction_1", ("dataset.test_fraction=1",), "dataset.test_fraction", "(0, 1)"),
    ("batch_zero", ("trainer.batch_size=0",), "trainer.batch_size", ">= 1"),
    ("batch_over_data", ("trainer.batch_size=400",), "trainer.batch_size", "at most 300"),
    ("noise_negative", ("dataset.noise=-0.1",), "dataset.noise", ">= 0"),
    ("n_samples_too_small", ("dataset.n_samples=3",), "dataset.n_samples", "at least 5"),
    ("unknown_activation", ("model.activation=swish",), "model.activation", "tanh"),
    ("unknown_loss", ("model.loss=huber",), "model.loss", "cross_entropy"),
    ("loss_not_fitting_output", ("model.output=softmax", "model.loss=bce"), "model.loss",
     "does not fit the softmax output"),
    ("ce_on_identity", ("model.output=identity", "model.loss=cross_entropy"), "model.loss",
     "does not fit"),
    ("bad_dtype", ("trainer.dtype=float16",), "trainer.dtype", "float32 or float64"),
    ("server_without_uri", ("tracking=server", "tracking.uri=null"), "tracking.uri",
     "http"),
]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory, make_train_runner):
    """Every bad input through ``python train.py``, two at a time; each job has its own
    (not yet existing) SQLite store, where anything that slipped through would show."""
    base = tmp_path_factory.mktemp("bad-input")
    csv_dir = base / "csv"
    csv_dir.mkdir()
    cases = BAD_INPUTS + _csv_cases(csv_dir)

    def one(case):
        case_id, overrides, _, _ = case
        work = base / case_id
        db = work / "store" / "mlflow.db"
        started = time.perf_counter()
        proc = make_train_runner(work)(*overrides, env={"MLFLOW_TRACKING_URI": sqlite_uri(db)})
        return case_id, SimpleNamespace(proc=proc, db=db,
                                        seconds=time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, cases))
    wall = time.perf_counter() - started
    print(f"\n{len(cases)} bad inputs through train.py: {wall:.1f} s wall, "
          f"{max(r.seconds for r in results.values()):.1f} s slowest")
    return {"cases": {c[0]: c for c in cases}, "results": results}


ALL_BAD_IDS = [c[0] for c in BAD_INPUTS] + [c[0] for c in CSV_CASES]


def test_the_bad_input_table_has_at_least_25_cases():
    assert len(ALL_BAD_IDS) >= 25
    assert len(set(ALL_BAD_IDS)) == len(ALL_BAD_IDS)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ALL_BAD_IDS)
def test_bad_input_is_one_line_exit_2_and_nothing_tracked(bad_input_results, case_id):
    _, overrides, key, allowed = bad_input_results["cases"][case_id]
    r = bad_input_results["results"][case_id]
    proc = r.proc
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = _one_line(proc.stderr)
    assert line.startswith(f"config error: {key}="), line
    assert allowed in line, line
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    assert len(line) < 400
    # Nothing trained, nothing tracked: no run in the store (it was not even created).
    assert "FINISHED" not in proc.stdout and "MLflow run" not in proc.stdout
    assert _store_runs(r.db) == []


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    env = {**_env_without_uri(), "HYDRA_FULL_ERROR": "1", "MLFLOW_TRACKING_URI": sqlite_uri(db)}
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "optimizer.lr=-1" in proc.stderr
    assert _store_runs(db) == []


# ----------------------------------------------------------------------------- divergence


DIVERGING = (
    "optimizer=sgd", "optimizer.lr=10", "model.activation=relu", "model.output=identity",
    "model.loss=mse", "trainer.dtype=float64",
)


@pytest.mark.slow
def test_divergence_through_train_py_ends_failed_with_what_it_reached(
    tmp_path, new_store, run_train
):
    uri = new_store(tmp_path / "store")
    started = time.perf_counter()
    proc = run_train(*DIVERGING, "trainer.epochs=50", "tracking.log_model=false",
                     env={"MLFLOW_TRACKING_URI": uri})
    print(f"\ndivergence: train.py exited {proc.returncode} after "
          f"{time.perf_counter() - started:.1f} s")
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = _one_line(proc.stderr)  # no traceback, no numpy overflow warnings
    match = re.fullmatch(r"error: loss became (inf|nan) at epoch (\d+); "
                         r"try a smaller optimizer\.lr", line)
    assert match, line
    epoch = int(match.group(2))
    assert 1 < epoch < 50
    assert f"FAILED after {epoch - 1} epochs" in proc.stdout

    (run,) = _all_runs(uri)
    client = _client(uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == line.removeprefix("error: ")
    # Detected in the epoch it appeared: every metric has exactly the epochs before it.
    for key in EPOCH_METRICS[:5]:
        assert _steps(client, run.info.run_id, key) == list(range(1, epoch)), key
    arts = _artifacts(client, run.info.run_id)
    assert {"plots/curves.png", "plots/boundary_before.png", "plots/boundary.gif",
            "summary.json", "config.yaml"} <= arts
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json",
                                                        str(tmp_path))).read_text())
    assert summary["status"] == "FAILED" and summary["epochs_run"] == epoch - 1


@pytest.mark.parametrize("eval_every", [1, 10])
def test_divergence_is_detected_in_the_epoch_it_appears(config, eval_every):
    """The epoch named must not depend on how often the run is evaluated."""
    from pipeline.app import job as app

    def diverged_at(every: int) -> int:
        cfg = config("tracking=none", "trainer.epochs=60", *DIVERGING, "optimizer.lr=100",
                     f"trainer.eval_every={every}")
        with pytest.raises(app.RunFailed) as info:
            app.run(cfg, echo=False)
        return info.value.__cause__.epoch

    assert diverged_at(eval_every) == diverged_at(1)


# -------------------------------------------------------------------- SIGINT and SIGTERM


# Long epochs (1500 single-sample steps each) so that a signal lands mid-training.
LONG_RUN = ("dataset.n_samples=2000", "trainer.batch_size=1", "trainer.epochs=2000",
            "tracking.log_model=false")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, new_store):
    """Three real train.py runs, interrupted at once: SIGINT, SIGTERM, and SIGINT twice
    0.3 s apart (the second lands while the first one's results are being saved)."""
    base = tmp_path_factory.mktemp("signals")
    plans = {"sigint": [signal.SIGINT], "sigterm": [signal.SIGTERM],
             "sigint_twice": [signal.SIGINT, signal.SIGINT]}
    jobs = {}
    try:
        for name in plans:
            uri = new_store(base / name / "store")
            env = {**_env_without_uri(), "MLFLOW_TRACKING_URI": uri}
            jobs[name] = SimpleNamespace(uri=uri, work=base / name,
                                         proc=_popen_train(base / name, *LONG_RUN, env=env))
        for name, job in jobs.items():
            job.run_id = _wait_for(
                lambda job=job: [r.info.run_id for r in _all_runs(job.uri)
                                 if r.info.status == "RUNNING"],
                120, f"the {name} run to start", job.proc)[0]
        time.sleep(4)  # a few epochs of training, held in the tracker's buffer
        for name, job in jobs.items():
            assert job.proc.poll() is None, f"{name} ended before the signal"
            job.sent = time.perf_counter()
            for i, sig in enumerate(plans[name]):
                if i:
                    time.sleep(0.3)
                job.proc.send_signal(sig)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
            j.proc.poll() is None for j in jobs.values()
        ):
            for job in jobs.values():
                if not hasattr(job, "seconds") and job.proc.poll() is not None:
                    job.seconds = time.perf_counter() - job.sent
            time.sleep(0.05)
        for job in jobs.values():
            if not hasattr(job, "seconds"):
                job.seconds = time.perf_counter() - job.sent
            job.returncode, job.stdout, job.stderr = _finish(job.proc, job.work, timeout=5)
    finally:
        for job in jobs.values():
            _stop(job.proc)
    for name, job in jobs.items():
        print(f"\n{name}: exit {job.returncode} {job.seconds:.1f} s after the first signal")
    return jobs


def _check_killed(job, reason: str, plots: bool) -> int:
    client = _client(job.uri)
    run = client.get_run(job.run_id)
    assert run.info.status == "KILLED", (run.info.status, job.stderr[-2000:])
    assert run.data.tags["failure_reason"].startswith(reason), run.data.tags
    assert [r.info.status for r in _all_runs(job.uri)] == ["KILLED"]
    match = re.search(r"KILLED after (\d+) epochs", job.stdout)
    assert match, job.stdout[-2000:]
    epochs = int(match.group(1))
    assert epochs >= 1  # the signal came mid-training, after some epochs
    # Every metric of every epoch reached so far was flushed, none lost, none doubled.
    for key in EPOCH_METRICS:
        assert _steps(client, job.run_id, key) == list(range(1, epochs + 1)), key
    arts = _artifacts(client, job.run_id)
    if plots:
        assert {"plots/boundary_before.png", "plots/boundary_after.png", "plots/curves.png",
                "plots/boundary.gif", "summary.json", "config.yaml"} <= arts, arts
        summary = json.loads(Path(client.download_artifacts(
            job.run_id, "summary.json", str(job.work))).read_text())
        assert summary["status"] == "KILLED" and summary["epochs_run"] == epochs
    return epochs


@pytest.mark.slow
def test_sigint_ends_the_run_killed_with_metrics_and_plots(interrupted):
    job = interrupted["sigint"]
    assert job.returncode == 130, job.stderr[-2000:]
    assert _one_line(job.stderr) == "interrupted by SIGINT (Ctrl-C); exiting"
    _check_killed(job, "interrupted by SIGINT", plots=True)


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_metrics_and_plots(interrupted):
    job = interrupted["sigterm"]
    assert job.returncode == 143, job.stderr[-2000:]
    assert _one_line(job.stderr) == "interrupted by SIGTERM; exiting"
    _check_killed(job, "interrupted by SIGTERM", plots=True)


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_and_the_run_is_not_left_running(interrupted):
    job, single = interrupted["sigint_twice"], interrupted["sigint"]
    assert job.returncode == 130, job.stderr[-2000:]
    assert "Traceback" not in job.stderr
    # Exits promptly: skips the remaining plots, still flushes the metrics and ends the run.
    assert job.seconds < 5, job.seconds
    assert job.seconds <= single.seconds + 1.0, (job.seconds, single.seconds)
    _check_killed(job, "interrupted by SIGINT", plots=False)


def _import_train():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_under_test", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM is POSIX")
def test_sigterm_outside_a_job_is_handled_like_ctrl_c(monkeypatch, capsys):
    """Between the jobs of a sweep or while its report is made (outside ``app.run``),
    SIGTERM must still end in exit hooks (which end open runs KILLED), not a silent death."""
    from pipeline.app import cli

    before = signal.getsignal(signal.SIGTERM)

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # interrupted long before this ends
        raise AssertionError("SIGTERM was not delivered")

    assert cli.run(main, []) == 143
    assert capsys.readouterr().err.strip() == "interrupted by SIGTERM; exiting"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_leaves_finished_jobs_finished_and_none_running(tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    env = {**_env_without_uri(), "MLFLOW_TRACKING_URI": uri}
    # Jobs long enough (a few seconds) that the second is still running 1.5 s after it
    # is first seen running, however fast a training step is.
    proc = _popen_train(tmp_path / "sweep", "-m", "optimizer.lr=0.01,0.02,0.03",
                        "dataset.n_samples=4000", "trainer.batch_size=1", "trainer.epochs=60",
                        "tracking.log_model=false", "tracking.animation=false", env=env)
    try:
        def second_job_running():
            runs = _all_runs(uri)
            return any(r.info.status == "RUNNING" and r.data.tags.get("sweep.job") == "1"
                       for r in runs)

        _wait_for(second_job_running, 180, "the sweep's second job", proc)
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        returncode, stdout, stderr = _finish(proc, tmp_path / "sweep", timeout=120)
    finally:
        _stop(proc)
    assert returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    runs = _all_runs(uri)
    jobs = {r.data.tags.get("sweep.job"): r.info.status for r in runs
            if "mlflow.parentRunId" in r.data.tags}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert jobs == {"0": "FINISHED", "1": "KILLED"}, jobs  # job 2 never started
    assert parent.info.status == "KILLED"
    assert _steps(_client(uri), [r for r in runs if r.data.tags.get("sweep.job") == "0"][0]
                  .info.run_id, "train/loss") == list(range(1, 61))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-in-a-terminal", "sigterm-to-the-launcher"])
def test_interrupted_joblib_sweep_lets_running_jobs_end_their_runs(tmp_path, new_store, signum,
                                                                  to_group):
    """Ctrl-C in a terminal (the whole foreground group) or SIGTERM to the launching
    process alone: the jobs running in joblib's workers end their runs KILLED themselves,
    with the metrics they had not sent yet; no queued job starts; the parent ends KILLED;
    no process is left."""
    uri = new_store(tmp_path / "store")
    env = {**_env_without_uri(), "MLFLOW_TRACKING_URI": uri}
    proc = _popen_train(tmp_path / "sweep", "-m", "optimizer.lr=0.01,0.02,0.03,0.04",
                        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        "dataset.n_samples=4000", "trainer.batch_size=1", "trainer.epochs=60",
                        "tracking.log_model=false", "tracking.animation=false", env=env)
    try:
        def two_jobs_training():
            runs = [r for r in _all_runs(uri) if "mlflow.parentRunId" in r.data.tags]
            client = _client(uri)
            return len(runs) == 2 and all(
                r.info.status == "RUNNING" and client.get_run(r.info.run_id).data.params
                for r in runs)

        _wait_for(two_jobs_training, 180, "two jobs training", proc)
        time.sleep(1.5)  # some epochs in, none sent yet (runs send every 30 s)
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        returncode, stdout, stderr = _finish(proc, tmp_path / "sweep", timeout=120)
        _wait_for(lambda: not _session_pids(proc.pid), 10, "the sweep's processes to exit")
    finally:
        _stop(proc)
    assert returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM"
    assert stderr.strip().splitlines()[-1] == f"interrupted by {name}; exiting"
    runs = _all_runs(uri)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "KILLED"
    assert len(children) == 2, [r.info.run_name for r in children]  # no queued job started
    for child in children:
        assert child.info.status == "KILLED"
        # Ended by the job itself (not closed as an orphan by the launching process).
        assert child.data.tags["failure_reason"] == f"interrupted by {name}"
        steps = _steps(_client(uri), child.info.run_id, "train/loss")
        assert steps and steps == list(range(1, len(steps) + 1)), steps


# ------------------------------------------------------------------- concurrent writers


N_WRITERS = 8
WRITER_EPOCHS = 6


@pytest.mark.slow
def test_eight_writers_on_a_fresh_sqlite_store_lose_nothing(tmp_path, make_train_runner):
    """8 train.py processes started together on a store that does not exist yet."""
    db = tmp_path / "fresh" / "mlflow.db"
    uri = sqlite_uri(db)
    assert not db.parent.exists()

    def one(i: int):
        return make_train_runner(tmp_path / f"job{i}")(
            f"trainer.epochs={WRITER_EPOCHS}", f"trainer.seed={i}",
            "tracking.experiment=writers", env={"MLFLOW_TRACKING_URI": uri})

    started = time.perf_counter()
    with ThreadPoolExecutor(N_WRITERS) as pool:
        procs = list(pool.map(one, range(N_WRITERS)))
    wall = time.perf_counter() - started
    assert [p.returncode for p in procs] == [0] * N_WRITERS, \
        [p.stderr[-1500:] for p in procs if p.returncode]

    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = _client(uri)
    from mlflow.entities import ViewType

    experiments = {e.name: e.experiment_id
                   for e in client.search_experiments(view_type=ViewType.ALL)}
    assert sorted(experiments) == ["Default", "writers"]
    assert client.search_runs([experiments["Default"]], run_view_type=ViewType.ALL) == []
    runs = client.search_runs([experiments["writers"]], run_view_type=ViewType.ALL)
    assert len(runs) == N_WRITERS
    assert sorted(r.data.params["trainer.seed"] for r in runs) == [str(i) for i in range(8)]
    points = 0
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            steps = _steps(client, run.info.run_id, key)
            assert steps == list(range(1, WRITER_EPOCHS + 1)), (run.info.run_id, key)
            points += len(steps)
        assert {"plots/boundary_before.png", "plots/boundary_after.png", "plots/curves.png",
                "plots/boundary.gif", "config.yaml", "summary.json",
                "data/dataset.csv"} <= _artifacts(client, run.info.run_id)
        assert _has_model(client, run)
        assert len(run.inputs.dataset_inputs) == 1
    print(f"\n{N_WRITERS} writers on a fresh store: {wall:.1f} s wall, {len(runs)} runs "
          f"FINISHED, {points} metric points checked, 0 in Default")


# ------------------------------------------------------------- tracking server problems


@pytest.mark.slow
def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, run_train, free_port):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    # An empty MLFLOW_TRACKING_URI does not override tracking.uri.
    proc = run_train("tracking=server", f"tracking.uri={uri}",
                     env={"MLFLOW_TRACKING_URI": ""})
    seconds = time.perf_counter() - started
    print(f"\nunreachable server: train.py exited {proc.returncode} after {seconds:.2f} s")
    assert seconds < 10
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = _one_line(proc.stderr)
    assert line.startswith(f"error: MLflow tracking server {uri} is unreachable"), line
    assert "tracking=local or tracking=none" in line
    # Before training: nothing trained, nothing kept for later.
    assert "epochs" not in proc.stdout
    assert not list(tmp_path.rglob("run.json"))


class _Server:
    """A real ``mlflow server`` on 127.0.0.1 with an SQLite backend under ``root``."""

    def __init__(self, root: Path, db: Path, port: int) -> None:
        self.root, self.db, self.port = root, db, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [MLFLOW_BIN, "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", sqlite_uri(self.db),
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**_env_without_uri(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        wait_http(f"{self.uri}/health", self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


SERVER_EPOCHS = 20


@pytest.mark.slow
def test_server_killed_mid_run_keeps_everything_for_upload(tmp_path, new_store, free_port):
    root = tmp_path / "server"
    new_store(root)  # a migrated SQLite file for the server's backend
    server = _Server(root, root / "mlflow.db", free_port())
    server.start()
    work = tmp_path / "job"
    env = _env_without_uri()
    proc = _popen_train(work, "dataset.n_samples=2000", "trainer.batch_size=1",
                        f"trainer.epochs={SERVER_EPOCHS}", "tracking=server",
                        f"tracking.uri={server.uri}", env=env)
    try:
        client = _client(server.uri)
        run_id = _wait_for(lambda: [r.info.run_id for r in _all_runs(server.uri)],
                           120, "the run on the server", proc)[0]
        server.kill()  # the server dies mid-run
        killed = time.perf_counter()
        returncode, stdout, stderr = _finish(proc, work)
        seconds = time.perf_counter() - killed
    finally:
        _stop(proc)
        server.kill()
    print(f"\nserver killed mid-run: train.py finished {seconds:.1f} s later, exit {returncode}")
    # Training finished; what could not be sent is on disk and the message says where.
    assert returncode == 0, stderr[-2000:]
    assert f"FINISHED after {SERVER_EPOCHS} epochs" in stdout
    match = re.search(r"python -m pipeline\.tracking upload (\S+)", stdout)
    assert match, stdout[-3000:]
    spool = Path(match.group(1))
    assert spool.is_dir() and spool.name == run_id
    assert spool.is_relative_to(work / "outputs")  # in the run's own output directory
    assert f"MLflow tracking store {server.uri} could not be written" in stdout

    server.start()  # back, on the same port and store
    try:
        started = time.perf_counter()
        up = subprocess.run([sys.executable, "-m", "pipeline.tracking", "upload", str(spool)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        print(f"upload: {time.perf_counter() - started:.1f} s: {up.stdout.strip()}")
        assert up.returncode == 0, up.stderr[-2000:]
        uploaded = re.search(r"uploaded 1 run\(s\): (\d+) metric values, \d+ operations",
                             up.stdout)
        assert uploaded, up.stdout
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert _steps(client, run_id, key) == list(range(1, SERVER_EPOCHS + 1)), key
        # Every metric point of the run was kept on disk and arrived, once.
        on_server = sum(len(client.get_metric_history(run_id, k)) for k in run.data.metrics)
        assert int(uploaded.group(1)) == on_server
        # Timings and the test split's evaluation are logged once; the rest every epoch.
        from pipeline.app.job import EVALUATION_SCALARS

        once = {f"test/{k}" for k in EVALUATION_SCALARS}
        epoch_keys = [k for k in run.data.metrics if not k.startswith("time/") and k not in once]
        assert on_server == SERVER_EPOCHS * len(epoch_keys) + len(run.data.metrics) - len(
            epoch_keys)
        print(f"after upload: {on_server} metric points on the server "
              f"({len(epoch_keys)} keys x {SERVER_EPOCHS} epochs + timings)")
        assert {"plots/boundary_before.png", "plots/boundary_after.png", "plots/curves.png",
                "plots/boundary.gif", "config.yaml", "summary.json",
                "data/dataset.csv"} <= _artifacts(client, run_id)
        assert _has_model(client, run)
        assert not spool.exists()  # uploaded, then removed
    finally:
        server.kill()


# --------------------------------------------------------------- model files, determinism


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, new_store):
    """One short tracked run (in-process), its store and the run id."""
    from omegaconf import OmegaConf

    from pipeline.app import job as app
    from pipeline.app.config import load_config

    base = tmp_path_factory.mktemp("logged")
    uri = new_store(base / "store")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = OmegaConf.to_container(load_config(
            ["trainer.epochs=3", "tracking.animation=false"]), resolve=True)
        cfg.pop("hydra", None)
        result = app.run(cfg, echo=False)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return SimpleNamespace(uri=uri, run_id=result.run_id, root=base)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan_params"])
def test_tampered_weights_through_pyfunc_give_a_clear_error(logged_run, tmp_path, damage):
    import io
    import zipfile

    from pipeline.tracking import tracker as tracking

    local = tracking.download_artifact(logged_run.uri, logged_run.run_id, "model", tmp_path)
    weights = local / "artifacts" / "weights.npz"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x80\x04cos\nsystem\n" + os.urandom(64))  # a pickle-like blob
    else:
        with zipfile.ZipFile(io.BytesIO(data)) as zin:
            members = {n: zin.read(n) for n in zin.namelist()}
        params = np.load(io.BytesIO(members["params.npy"]))
        params[0] = np.nan
        buf = io.BytesIO()
        np.save(buf, params)
        members["params.npy"] = buf.getvalue()
        with zipfile.ZipFile(weights, "w") as zout:
            for name, blob in members.items():
                zout.writestr(name, blob)

    import mlflow.pyfunc

    with pytest.raises(Exception) as info:  # noqa: PT011 -- the type MLflow wraps it in varies
        mlflow.pyfunc.load_model(str(local))
    text = str(info.value)
    chain = info.value
    while chain is not None and not isinstance(chain, ValueError):
        chain = chain.__cause__ or chain.__context__
    assert isinstance(chain, ValueError), repr(info.value)
    assert "is not a valid backprop-pipeline model" in str(chain), text
    assert "weights.npz" in str(chain)


def test_same_config_and_seed_give_bit_identical_metrics(config, tracking_env):
    """float64, mini-batches (shuffled with the seed), two runs logged to one store: every
    metric history read back from MLflow is identical, bit for bit, as are the weights."""
    from pipeline.app import job as app

    cfg = config("trainer.dtype=float64", "trainer.batch_size=32", "trainer.epochs=15",
                 "trainer.seed=7", "dataset.seed=3", "model.activation=[relu,tanh]",
                 "tracking.animation=false", "tracking.log_model=false")
    first, second = app.run(cfg, echo=False), app.run(cfg, echo=False)
    assert first.run_id != second.run_id
    assert first.model.params.tobytes() == second.model.params.tobytes()
    client = tracking_env.client()
    keys = sorted(k for k in client.get_run(first.run_id).data.metrics if not
                  k.startswith("time/"))
    assert len(keys) >= 10
    assert keys == sorted(k for k in client.get_run(second.run_id).data.metrics
                          if not k.startswith("time/"))
    for key in keys:
        a = [(m.step, m.value) for m in client.get_metric_history(first.run_id, key)]
        b = [(m.step, m.value) for m in client.get_metric_history(second.run_id, key)]
        assert len(a) == (15 if key in first.history.metrics else 1), key
        assert sorted(a) == sorted(b), key
        assert np.array(sorted(a)).tobytes() == np.array(sorted(b)).tobytes(), key
    assert first.history.metrics == second.history.metrics


# ---------------------------------------------------------------------- sweep, bad job


@pytest.mark.slow
def test_multirun_with_a_bad_job_records_the_good_one_and_reports_the_bad(
    tmp_path, new_store, run_train
):
    uri = new_store(tmp_path / "store")
    proc = run_train("-m", "optimizer.lr=0.1,-1", "trainer.epochs=5",
                     "tracking.animation=false", "tracking.log_model=false",
                     env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed: the command says so
    assert "optimizer.lr=-1" in proc.stderr and "Traceback" not in proc.stderr
    runs = _all_runs(uri)
    assert "RUNNING" not in [r.info.status for r in runs]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    by_lr = {r.data.params.get("optimizer.lr"): r for r in children}
    good = by_lr["0.1"]
    assert good.info.status == "FINISHED"
    assert _steps(_client(uri), good.info.run_id, "train/loss") == [1, 2, 3, 4, 5]
    (bad,) = [r for r in children if r is not good]
    assert bad.info.status == "FAILED"
    assert "optimizer.lr=-1" in bad.data.tags["failure_reason"]
