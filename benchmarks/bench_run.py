"""Whole runs of ``train.py``: wall time, its phases, and what each process tuning of
:mod:`pipeline.app.process` earns.

Run from the project root::

    python benchmarks/bench_run.py                 # default run: 5 ways, 5 repeats each
    python benchmarks/bench_run.py --sweep         # also the 8-job sweep, 3 ways
    python benchmarks/bench_run.py --repeats 3 -- trainer.epochs=1000   # other overrides
    python benchmarks/bench_run.py --sweep-only -- trainer.epochs=3000  # sweep of longer jobs

To see whether a mechanism pays with one core busy, run a CPU-bound process beside it
(``python -c "while True: pass" &``, and kill it after).

Every repeat runs the ways side by side (A, B, C, A, B, C, ...) so that a slow spell of
the machine hits them alike; medians are reported. Each way writes to its own fresh
SQLite store in a temporary directory (never the project's ``mlflow.db``).

- **tuned**: ``python train.py`` as users run it, every mechanism on.
- **no-gc-pause**: ``BACKPROP_GC_PAUSE=0``: the garbage collector left on during the
  imports (and the heap never frozen).
- **no-fast-exit**: ``BACKPROP_FAST_EXIT=0``: the interpreter's normal teardown at exit.
- **untuned**: both off.
- **untracked**: ``tracking=none`` (no MLflow, no plots): what the run costs without any
  of it.

Phases come from the run's own ``time/*`` metrics. ``--sweep`` times ``python train.py -m
model.hidden_sizes=[4],[8],[16],[32] optimizer.lr=0.01,0.1`` (8 default jobs) with Hydra's
basic launcher, with the joblib launcher on 2 workers forked warm, and with joblib's own
cold workers (``BACKPROP_PREWARM=0``).
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
    "tuned": ((), {}),
    "no-gc-pause": ((), {"BACKPROP_GC_PAUSE": "0"}),
    "no-fast-exit": ((), {"BACKPROP_FAST_EXIT": "0"}),
    "untuned": ((), {"BACKPROP_GC_PAUSE": "0", "BACKPROP_FAST_EXIT": "0"}),
    "untracked": (("tracking=none",), {}),
}
PHASES = ("startup", "data", "train", "evaluation", "callbacks", "plots", "logging")
SWEEP = ("-m", "model.hidden_sizes=[4],[8],[16],[32]", "optimizer.lr=0.01,0.1")
_JOBLIB = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
SWEEP_WAYS = {
    "basic": ((), {}),
    "joblib-warm": (_JOBLIB, {}),
    "joblib-cold": (_JOBLIB, {"BACKPROP_PREWARM": "0"}),
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
    header = f"{'way':<15}{'wall':>8}" + "".join(f"{p:>17}" for p in PHASES)
    print(header)
    print("-" * len(header))
    med = {w: statistics.median(v) for w, v in walls.items()}
    for way in WAYS:
        cells = "".join(
            f"{statistics.median(phases[way][p]):>16.2f}s" if p in phases[way] else f"{'-':>17}"
            for p in PHASES)
        print(f"{way:<15}{med[way]:>7.2f}s{cells}")
    ph = phases["tuned"]
    if "logging" in ph:
        logging_s = statistics.median(ph["logging"])
        print(f"tuned: tracking on the run's critical path {logging_s:.2f} s = "
              f"{100 * logging_s / med['tuned']:.1f}% of its wall time")
    for way in ("no-gc-pause", "no-fast-exit", "untuned"):
        print(f"tuned / {way}: {med['tuned'] / med[way]:.2f}x ({med[way] - med['tuned']:+.2f} s)")


def bench_sweep(repeats: int, work: Path, overrides: list[str] = ()) -> None:
    walls: dict[str, list[float]] = {w: [] for w in SWEEP_WAYS}
    for i in range(repeats):
        for way, (args, extra) in SWEEP_WAYS.items():
            store = work / f"sweep-{way}-{i}"
            store.mkdir()
            command = [sys.executable, str(TRAIN), *SWEEP, *overrides, *args,
                       f"hydra.sweep.dir={work / 'multirun' / way / str(i)}"]
            walls[way].append(_timed(command, _env(store, extra), work))
    med = {w: statistics.median(v) for w, v in walls.items()}
    print(f"\n8-job sweep ({' '.join([*SWEEP, *overrides])}), medians of {repeats}:")
    for way in SWEEP_WAYS:
        runs = ", ".join(f"{s:.1f}" for s in walls[way])
        print(f"  {way:<12} {med[way]:6.1f} s   (runs: {runs})")
    print(f"  joblib-warm / basic: {med['joblib-warm'] / med['basic']:.2f}x; "
          f"joblib-warm / joblib-cold: {med['joblib-warm'] / med['joblib-cold']:.2f}x")


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
