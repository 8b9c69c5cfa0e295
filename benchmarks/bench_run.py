"""Whole runs of ``train.py``: wall time, its phases, and what tracking costs the run.

Run from the project root::

    python benchmarks/bench_run.py                 # default run: 3 ways, 5 repeats each
    python benchmarks/bench_run.py --sweep         # also the 8-job sweep, basic vs joblib
    python benchmarks/bench_run.py --repeats 3 -- trainer.epochs=1000   # other overrides
    python benchmarks/bench_run.py --sweep-only -- trainer.epochs=3000  # sweep of longer jobs

Every repeat runs the ways side by side (A, B, C, A, B, C, ...) so that a slow spell of
the machine hits them alike; medians are reported. Each way writes to its own fresh
SQLite store in a temporary directory (never the project's ``mlflow.db``).

- **service**: ``python train.py`` as users run it; MLflow works in the tracking service
  process (:mod:`pipeline.tracking.service`) while the run trains and draws.
- **in-process**: the same with ``BACKPROP_TRACKING_SERVICE=0``: MLflow in the training
  process, as before the service existed.
- **untracked**: ``tracking=none`` (no MLflow, no plots): what the run costs without any
  of it.

Phases come from the run's own ``time/*`` metrics. ``logging`` is the time the training
process spends on tracking (sending, and waiting for the store); with the service that
is what MLflow adds to the run's wall time, and ``tracking_service`` is the work the
service did on the other core meanwhile.

``--sweep`` times ``python train.py -m model.hidden_sizes=[4],[8],[16],[32]
optimizer.lr=0.01,0.1`` (8 default jobs) with Hydra's basic launcher and with the joblib
launcher on 2 workers.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"

WAYS = {
    "service": ((), {}),
    "in-process": ((), {"BACKPROP_TRACKING_SERVICE": "0"}),
    "untracked": (("tracking=none",), {}),
}
PHASES = ("startup", "data", "train", "evaluation", "callbacks", "plots", "logging",
          "tracking_service")
SWEEP = ("-m", "model.hidden_sizes=[4],[8],[16],[32]", "optimizer.lr=0.01,0.1")
SWEEP_WAYS = {
    "basic": (),
    "joblib-2": ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
}


def _env(store: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(store / 'mlflow.db').as_posix()}"
    env.update(extra)
    return env


def _timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def _last_phases(store: Path) -> dict[str, float]:
    """The ``time/*`` metrics of the newest run in the store."""
    db = store / "mlflow.db"
    if not db.exists():
        return {}
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT run_uuid FROM runs ORDER BY start_time DESC LIMIT 1").fetchone()
        if row is None:
            return {}
        rows = con.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ? "
                           "AND key LIKE 'time/%'", row).fetchall()
    return {key.removeprefix("time/"): value for key, value in rows}


def bench_runs(repeats: int, overrides: list[str], work: Path) -> None:
    walls: dict[str, list[float]] = {w: [] for w in WAYS}
    phases: dict[str, dict[str, list[float]]] = {w: {} for w in WAYS}
    for i in range(repeats):
        for way, (args, extra) in WAYS.items():
            store = work / way
            store.mkdir(exist_ok=True)
            command = [sys.executable, str(TRAIN), *args, *overrides,
                       f"hydra.run.dir={work / 'out' / way / str(i)}"]
            walls[way].append(_timed(command, _env(store, extra), work))
            for key, value in _last_phases(store).items():
                phases[way].setdefault(key, []).append(value)
    print(f"python train.py {' '.join(overrides)}: medians of {repeats} interleaved repeats")
    header = f"{'way':<12}{'wall':>8}" + "".join(f"{p:>17}" for p in PHASES)
    print(header)
    print("-" * len(header))
    med = {w: statistics.median(v) for w, v in walls.items()}
    for way in WAYS:
        cells = "".join(
            f"{statistics.median(phases[way][p]):>16.2f}s" if p in phases[way] else f"{'-':>17}"
            for p in PHASES)
        print(f"{way:<12}{med[way]:>7.2f}s{cells}")
    for way in ("service", "in-process"):
        ph = phases[way]
        if "logging" in ph:
            logging_s = statistics.median(ph["logging"])
            print(f"{way}: tracking on the run's critical path {logging_s:.2f} s = "
                  f"{100 * logging_s / med[way]:.1f}% of its wall time")
        if "plots" in ph and "train" in ph:
            print(f"{way}: plots {statistics.median(ph['plots']):.2f} s vs training "
                  f"{statistics.median(ph['train']):.2f} s")
    print(f"service / in-process wall: {med['service'] / med['in-process']:.2f}x; "
          f"service - untracked: {med['service'] - med['untracked']:.2f} s")


def bench_sweep(repeats: int, work: Path, overrides: list[str] = ()) -> None:
    walls: dict[str, list[float]] = {w: [] for w in SWEEP_WAYS}
    for i in range(repeats):
        for way, args in SWEEP_WAYS.items():
            store = work / f"sweep-{way}-{i}"
            store.mkdir()
            command = [sys.executable, str(TRAIN), *SWEEP, *overrides, *args,
                       f"hydra.sweep.dir={work / 'multirun' / way / str(i)}"]
            walls[way].append(_timed(command, _env(store, {}), work))
    med = {w: statistics.median(v) for w, v in walls.items()}
    print(f"\n8-job sweep ({' '.join([*SWEEP, *overrides])}), medians of {repeats}:")
    for way in SWEEP_WAYS:
        print(f"  {way:<9} {med[way]:6.1f} s   (runs: {', '.join(f'{s:.1f}' for s in walls[way])})")
    print(f"  joblib-2 / basic: {med['joblib-2'] / med['basic']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="also time the 8-job sweep")
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--sweep-only", action="store_true",
                        help="time the sweep alone, not the single runs")
    parser.add_argument("overrides", nargs="*",
                        help="train.py overrides for the single runs and the sweep's jobs")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        work = Path(tmp)
        if not args.sweep_only:
            bench_runs(args.repeats, args.overrides, work)
        if args.sweep or args.sweep_only:
            bench_sweep(args.sweep_repeats, work, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
