"""What users run, against scikit-learn: ``fit()`` and ``MLPClassifier`` with their defaults.

Run from the project root::

    python benchmarks/bench_user.py              # configurations 1, 2, 3, 5; 7 repeats
    python benchmarks/bench_user.py --quick      # 3 repeats

``bench_train.py`` times a training loop that evaluates once, at the end. Users meet
the defaults instead, which report every epoch:

- **fit**: ``pipeline.fit`` with its defaults (evaluation and diagnostics after every
  epoch, ``threads="auto"``), float64, Adam;
- **estimator**: ``pipeline.MLPClassifier`` with its defaults (float64, ``loss_curve_``
  every epoch), the configuration's layers, activation, learning rate, batch size and
  epochs;
- **sklearn**: ``sklearn.neural_network.MLPClassifier`` with the same settings, float64
  input, ``tol=0`` and ``n_iter_no_change`` beyond the epochs (so it runs them all),
  ``alpha=0``, at whichever of one BLAS thread and all cores is faster on a short probe
  (as ``bench_train.py`` does; its default of all cores is often slower).

The three are interleaved (fit, estimator, sklearn, fit, ...) in this one process so
that a slow spell of the machine hits them alike; the table gives medians and the
ratio sklearn / ours (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

# PIPELINE_ROOT times another checkout of the package (e.g. the code before a change,
# for a before/after table) with this script.
sys.path.insert(0, os.environ.get("PIPELINE_ROOT", str(Path(__file__).resolve().parents[1])))

from threadpoolctl import threadpool_limits  # noqa: E402

try:
    from pipeline import MLP, MLPClassifier, fit, make_optimizer  # noqa: E402
except ImportError:  # the flat layout before pipeline/engine and pipeline/fast
    from pipeline.estimator import MLPClassifier  # noqa: E402
    from pipeline.nn import MLP  # noqa: E402
    from pipeline.optim import make_optimizer  # noqa: E402
    from pipeline.trainer import fit  # noqa: E402



@dataclass(frozen=True)
class Config:
    """``bench_train.py``'s configurations (same keys), which the issue names."""

    key: int
    n: int
    hidden: tuple[int, ...]
    activation: str
    batch: int | None  # None = full batch
    epochs: int
    classes: int = 2
    lr: float = 0.01

    def label(self) -> str:
        batch = "full" if self.batch is None else str(self.batch)
        return f"{self.key}: n={self.n} {list(self.hidden)} {self.activation} b={batch}"


CONFIGS = [
    Config(1, 1_000, (16, 16), "tanh", None, 300),
    Config(2, 1_000, (3,), "sigmoid", None, 2000),
    Config(3, 10_000, (32, 32), "relu", 64, 5, lr=0.001),
    Config(5, 10_000, (64, 64), "relu", 256, 10, classes=4, lr=0.001),
]


def make_data(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Standardised float64 features (n, 2) and int labels: two moons or four blobs."""
    from sklearn.datasets import make_blobs, make_moons

    if cfg.classes == 2:
        X, y = make_moons(n_samples=cfg.n, noise=0.2, random_state=0)
    else:
        X, y = make_blobs(n_samples=cfg.n, centers=cfg.classes, cluster_std=2.0,
                          random_state=0)
    return (X - X.mean(axis=0)) / X.std(axis=0), y.astype(np.int64)


def run_fit(cfg, X, y) -> float:
    n_out = 1 if cfg.classes == 2 else cfg.classes
    output, loss = ("sigmoid", "bce") if cfg.classes == 2 else ("softmax", "cross_entropy")
    start = time.perf_counter()
    model = MLP([X.shape[1], *cfg.hidden, n_out], activation=cfg.activation, output=output,
                seed=0)
    fit(model, X, y, loss=loss, optimizer=make_optimizer("adam", lr=cfg.lr),
        epochs=cfg.epochs, batch_size=cfg.batch)
    return time.perf_counter() - start


def run_estimator(cfg, X, y) -> float:
    start = time.perf_counter()
    MLPClassifier(hidden_layer_sizes=cfg.hidden, activation=cfg.activation,
                  learning_rate=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch or X.shape[0],
                  random_state=0).fit(X, y)
    return time.perf_counter() - start


def run_sklearn(cfg, X, y, threads: int | None = None) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    clf = SklearnMLP(
        hidden_layer_sizes=cfg.hidden, activation={"sigmoid": "logistic"}.get(cfg.activation,
                                                                            cfg.activation),
        solver="adam", learning_rate_init=cfg.lr, batch_size=cfg.batch or X.shape[0],
        max_iter=cfg.epochs, shuffle=True, random_state=0, tol=0.0, early_stopping=False,
        n_iter_no_change=cfg.epochs + 10, alpha=0.0,
    )
    with warnings.catch_warnings(), threadpool_limits(limits=threads, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        clf.fit(X, y)
        return time.perf_counter() - start


RUNNERS = {"fit": run_fit, "estimator": run_estimator, "sklearn": run_sklearn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    parser.add_argument("--configs", default="1,2,3,5", help="e.g. 1,3")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    keys = {int(k) for k in args.configs.split(",")}
    print(f"user paths, float64, medians of {repeats} interleaved repeats")
    print(f"pipeline from {Path(sys.modules['pipeline'].__file__).parent.parent}")
    print(f"{'config':<36} {'fit':>9} {'estimator':>10} {'sklearn':>9} "
          f"{'sk/fit':>7} {'sk/est':>7}")
    for cfg in CONFIGS:
        if cfg.key not in keys:
            continue
        X, y = make_data(cfg)
        for runner in RUNNERS.values():  # warm-up: imports, first-touch memory
            runner(replace(cfg, epochs=2), X, y)
        probe = replace(cfg, epochs=max(2, cfg.epochs // 10))
        threads = min((None, 1), key=lambda t: min(run_sklearn(probe, X, y, t) for _ in "ab"))
        runners = {**RUNNERS, "sklearn": partial(run_sklearn, threads=threads)}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, runner in runners.items():
                times[name].append(runner(cfg, X, y))
        med = {name: statistics.median(values) for name, values in times.items()}
        print(f"{cfg.label():<36} {med['fit'] * 1e3:>7.1f}ms {med['estimator'] * 1e3:>8.1f}ms "
              f"{med['sklearn'] * 1e3:>7.1f}ms {med['sklearn'] / med['fit']:>6.2f}x "
              f"{med['sklearn'] / med['estimator']:>6.2f}x  (sklearn threads: "
              f"{threads or 'all'})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
