"""A hyper-parameter search with pruning against the same search without, same seed.

    python benchmarks/bench_search.py                    # 40 trials on spirals, median pruner
    python benchmarks/bench_search.py --trials 20 --pruner successive_halving -- trainer.epochs=500

Each search runs ``train.py +sweep=optuna`` (TPE, seed 0, over the preset's learning rate
and width x depth) in its own fresh store in a temporary directory, one after the other,
and the table reports its wall time, how many trials were pruned and the best value the
study found (the final validation loss, the search's objective).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def search(pruner: str, trials: int, dataset: str, extra: list[str]) -> dict:
    import optuna

    from pipeline.app.search import open_storage

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "+sweep=optuna", f"dataset={dataset}",
             f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.n_jobs=1",
             f"hydra/sweeper/pruner={pruner}", "hydra.sweeper.study_name=bench",
             f"hydra.sweep.dir={tmp}/multirun", *extra],
            cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode not in (0, 1):
            sys.exit(f"{pruner}: train.py failed\n{proc.stderr[-3000:]}")
        study = optuna.load_study(study_name="bench", storage=open_storage(f"{tmp}/optuna.journal"))
        states = [t.state.name for t in study.trials]
        best = study.best_trial
        return {"pruner": pruner, "seconds": seconds, "complete": states.count("COMPLETE"),
                "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
                "best": best.value, "best_trial": best.number, "params": best.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--dataset", default="spirals")
    parser.add_argument("--pruner", default="median", choices=["median", "successive_halving"])
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, after --")
    args = parser.parse_args()
    rows = [search(p, args.trials, args.dataset, args.overrides) for p in ("none", args.pruner)]
    print(f"{args.trials}-trial search on {args.dataset} (TPE, seed 0), one trial at a time")
    print(f"{'pruner':<20}{'wall s':>8}{'complete':>10}{'pruned':>8}{'failed':>8}"
          f"{'best val/loss':>16}  best trial")
    for r in rows:
        print(f"{r['pruner']:<20}{r['seconds']:>8.1f}{r['complete']:>10}{r['pruned']:>8}"
              f"{r['failed']:>8}{r['best']:>16.4g}  #{r['best_trial']} {r['params']}")
    print(f"time ratio with/without pruning: {rows[1]['seconds'] / rows[0]['seconds']:.2f}")


if __name__ == "__main__":
    main()
