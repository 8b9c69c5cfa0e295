"""A sweep against a real ``mlflow server`` whose backend store is PostgreSQL.

As a team's shared tracking server would be: PostgreSQL (Debian's ``postgresql`` package,
installed by ``.ci/run``) is started by the fixture on a private port and data directory,
as an unprivileged user when the tests run as root; ``mlflow server`` runs on 127.0.0.1 with
proxied artifacts. Both are stopped by their pids at the end. Without PostgreSQL (or
psycopg2) the tests skip and say why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from servers import wait_http

pytestmark = pytest.mark.slow

MLFLOW_BIN = str(Path(sys.executable).with_name("mlflow"))
FAST = ("trainer.epochs=20", "tracking.animation=false")


def _pg_bin(name: str) -> str | None:
    """``initdb``/``pg_ctl``: on PATH, or in Debian's versioned directory (not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


class Postgres:
    """A throw-away PostgreSQL cluster: ``start()``, ``uri``, ``stop()``."""

    def __init__(self, port: int) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): .ci/run installs "
                        "Debian's postgresql package; apt-get install postgresql")
        pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[dev]'")
        self.user_kwargs: dict = {}
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use its own account
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run "
                            "PostgreSQL as (install Debian's postgresql package)")
            self.user_kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self.owner = (pw.pw_uid, pw.pw_gid)
        else:
            self.owner = None
        self.port = port
        # Not under pytest's tmp_path: its parents are private to root.
        self.dir = Path(tempfile.mkdtemp(prefix="bp-pg-"))
        if self.owner:
            os.chown(self.dir, *self.owner)
        self.data = self.dir / "data"
        self.uri = f"postgresql://bp@127.0.0.1:{port}/mlflow"
        self.started = False

    def _run(self, *args: str) -> None:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                              cwd=self.dir, **self.user_kwargs)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def start(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-U", "bp", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "postgres.log"),
                  "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                  "start")
        self.started = True
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="bp", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()

    def count(self, sql: str) -> int:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user="bp",
                              dbname="mlflow") as conn, conn.cursor() as cur:
            cur.execute(sql)
            return int(cur.fetchone()[0])

    def stop(self) -> None:
        try:
            if self.started:
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory, free_port):
    """(Postgres, http URI of an ``mlflow server`` backed by it)."""
    pg = Postgres(free_port())
    root = tmp_path_factory.mktemp("mlflow-server")
    proc = log = None
    try:
        pg.start()
        port = free_port()
        log = open(root / "server.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [MLFLOW_BIN, "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", pg.uri.replace(
                 "postgresql://", "postgresql+psycopg2://"),
             "--artifacts-destination", str(root / "artifacts")],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", proc, timeout=180)
        yield pg, uri
    finally:
        if proc is not None and proc.poll() is None:  # the server and its workers, by pid
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        if log is not None:
            log.close()
        pg.stop()


def test_sweep_logs_every_run_to_the_server_and_the_report_rebuilds(pg_server, run_train,
                                                                    tmp_path):
    pg, uri = pg_server
    proc = run_train("-m", "tracking=server", f"tracking.uri={uri}",
                     "tracking.experiment=served-sweep", "optimizer.lr=0.01,0.1", *FAST,
                     env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "guard" / "mlflow.db").exists()  # nothing went to a local store
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("served-sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    # In PostgreSQL, with one metric row per epoch for each child.
    assert pg.count("select count(*) from runs") == 3
    assert pg.count("select count(*) from metrics where key = 'test/loss'") == 2 * 20
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/summary.csv", "sweep/test_loss.png", "sweep/boundaries.png"} <= names
    summary = pd.read_csv(client.download_artifacts(parent.info.run_id, "sweep/summary.csv",
                                                    str(tmp_path)))
    # pipeline.viz.report, from the server alone, reproduces the table.
    from pipeline.viz import report

    out = tmp_path / "rebuilt"
    assert report.main(["--experiment", "served-sweep", "--uri", uri, "--out", str(out),
                        "--no-boundaries"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), summary)
    for _, row in summary.iterrows():
        history = client.get_metric_history(row["run_id"], "test/accuracy")
        assert row["test/accuracy"] == pytest.approx(max(history, key=lambda m: m.step).value)
