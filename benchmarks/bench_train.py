"""Seconds per epoch: our trainer vs scikit-learn, PyTorch and the matmul floor.

Run from the project root::

    python benchmarks/bench_train.py            # the five configurations, 5 repeats
    python benchmarks/bench_train.py --quick    # fewer epochs and repeats (~1 min)

Every trainer runs in this one process on the same float32 data; the repeats are
interleaved (ours, sklearn, torch, floor, ours, sklearn, ...) so that a slow spell of the
machine hits them all alike, and the median of the repeats is reported.

- **ours**: ``pipeline.engine.loop.fit`` with ``diagnostics=False`` and ``eval_every=epochs``
  (no per-epoch evaluation; the one evaluation after the last epoch is included), float32,
  Adam, threads chosen by the trainer (``threads="auto"``).
- **sklearn**: ``MLPClassifier`` with the same layers, activation, Adam and learning rate,
  batch size and epochs (``max_iter``), ``early_stopping=False``, ``tol=0``,
  ``n_iter_no_change`` larger than the epochs, float32 input (sklearn keeps float32).
- **torch**: a plain CPU loop, ``nn.Sequential`` + ``torch.optim.Adam``, ``randperm``
  mini-batches (when torch is importable; it is never a dependency of the package).
- **floor**: only the matrix products one epoch needs (forward ``A @ W``, weight
  gradients ``A.T @ delta``, ``delta @ W.T``) on preallocated float32 arrays with
  ``out=``, timed with one BLAS thread and with all cores; the faster is the floor.

Threads: ours picks its own (``blas_threads_for``: one BLAS thread unless a product
is large). Each peer gets whichever of one thread and all cores is faster for it on
the configuration (a short probe before the timed repeats; PyTorch's default of all
cores is many times slower than one thread on these small networks), so the ratios
compare every trainer at its best thread count. The thread counts used are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from pipeline.engine.mlp import MLP  # noqa: E402
from pipeline.engine.optim import make_optimizer  # noqa: E402
from pipeline.fast import fit  # noqa: E402
from pipeline.fast.threads import blas_threads_for  # noqa: E402

try:  # optional peer
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None


@dataclass(frozen=True)
class Config:
    key: int
    n: int
    hidden: tuple[int, ...]
    activation: str
    batch: int | None  # None = full batch
    epochs: int
    quick_epochs: int
    classes: int = 2
    lr: float = 0.01

    def label(self) -> str:
        batch = "full" if self.batch is None else str(self.batch)
        return (
            f"{self.key}: n={self.n} {list(self.hidden)} {self.activation} "
            f"{self.classes}cl b={batch}"
        )


# The five configurations of the performance issue. Binary problems are two moons,
# the 4-class one is four Gaussian blobs; both 2-D, standardised.
CONFIGS = [
    Config(1, 1_000, (16, 16), "tanh", None, 300, 100),
    Config(2, 1_000, (3,), "sigmoid", None, 2000, 500),
    Config(3, 10_000, (32, 32), "relu", 64, 5, 2, lr=0.001),
    Config(4, 100_000, (256, 256), "relu", None, 10, 2, lr=0.001),
    Config(5, 10_000, (64, 64), "relu", 256, 10, 3, classes=4, lr=0.001),
]


def make_data(cfg: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standardised float32 features (n, 2) and int labels (n,)."""
    from sklearn.datasets import make_blobs, make_moons

    if cfg.classes == 2:
        X, y = make_moons(n_samples=cfg.n, noise=0.2, random_state=seed)
    else:
        X, y = make_blobs(n_samples=cfg.n, centers=cfg.classes, cluster_std=2.0,
                          random_state=seed)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return np.ascontiguousarray(X, dtype=np.float32), y.astype(np.int64)


# ----------------------------------------------------------------------------- runners


def run_ours(cfg: Config, X: np.ndarray, y: np.ndarray, epochs: int,
             threads: int | None = None, evaluated: bool = False) -> tuple[float, float]:
    """``evaluated``: evaluate and report diagnostics after every epoch, as a run of
    ``train.py`` does (else once, after the last epoch)."""
    n_out = 1 if cfg.classes == 2 else cfg.classes
    output, loss = ("sigmoid", "bce") if cfg.classes == 2 else ("softmax", "cross_entropy")
    start = time.perf_counter()
    model = MLP([X.shape[1], *cfg.hidden, n_out], activation=cfg.activation, output=output,
                init="xavier_uniform", seed=0, dtype=np.float32)
    fit(model, X, y, loss=loss, optimizer=make_optimizer("adam", lr=cfg.lr), epochs=epochs,
        batch_size=cfg.batch, seed=0, eval_every=1 if evaluated else epochs,
        diagnostics=evaluated)
    elapsed = time.perf_counter() - start
    return elapsed, float(np.mean(model.predict(X) == y))


def run_sklearn(cfg: Config, X: np.ndarray, y: np.ndarray, epochs: int,
                threads: int | None = None) -> tuple[float, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    act = {"sigmoid": "logistic"}.get(cfg.activation, cfg.activation)
    clf = MLPClassifier(
        hidden_layer_sizes=cfg.hidden, activation=act, solver="adam",
        learning_rate_init=cfg.lr, batch_size=cfg.batch or X.shape[0], max_iter=epochs,
        shuffle=True, random_state=0, tol=0.0, early_stopping=False,
        n_iter_no_change=epochs + 10, alpha=0.0,
    )
    with threadpool_limits(limits=threads, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        clf.fit(X, y)
        elapsed = time.perf_counter() - start
    return elapsed, float(clf.score(X, y))


def run_torch(cfg: Config, X: np.ndarray, y: np.ndarray, epochs: int,
              threads: int | None = None) -> tuple[float, float]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _torch_loop(cfg, X, y, epochs)
    finally:
        torch.set_num_threads(before)


def _torch_loop(cfg: Config, X: np.ndarray, y: np.ndarray, epochs: int) -> tuple[float, float]:
    nn = torch.nn
    torch.manual_seed(0)
    start = time.perf_counter()
    widths = [X.shape[1], *cfg.hidden]
    act = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}[cfg.activation]
    layers: list = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), act()]
    n_out = 1 if cfg.classes == 2 else cfg.classes
    model = nn.Sequential(*layers, nn.Linear(widths[-1], n_out))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    Xt = torch.from_numpy(X)
    if cfg.classes == 2:
        yt = torch.from_numpy(y.astype(np.float32)).reshape(-1, 1)
        loss_fn = nn.BCEWithLogitsLoss()
    else:
        yt = torch.from_numpy(y)
        loss_fn = nn.CrossEntropyLoss()
    n = X.shape[0]
    batch = cfg.batch or n
    for _ in range(epochs):
        if batch == n:
            batches = [(Xt, yt)]
        else:
            perm = torch.randperm(n)
            batches = (
                (Xt[perm[i : i + batch]], yt[perm[i : i + batch]]) for i in range(0, n, batch)
            )
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        out = model(Xt)
        pred = (out[:, 0] > 0).long() if cfg.classes == 2 else out.argmax(dim=1)
    return elapsed, float((pred.numpy() == y).mean())


class Floor:
    """The matrix products of one epoch, on preallocated arrays (no activations, no update).

    Per batch: the forward products ``A_{l-1} @ W_l``, the weight gradients
    ``A_{l-1}.T @ delta_l`` and the propagated gradients ``delta_l @ W_l.T`` (none for the
    first layer). Each product is made with whichever of ``np.dot`` / ``np.matmul`` is
    faster for its shapes, and a ``(b, 1) @ (1, h)`` outer product as a broadcast
    multiply, so the floor is the fastest way numpy offers to do that arithmetic.
    """

    def __init__(self, cfg: Config, n_features: int) -> None:
        rng = np.random.default_rng(0)
        n_out = 1 if cfg.classes == 2 else cfg.classes
        self.sizes = [n_features, *cfg.hidden, n_out]
        batch = cfg.batch or cfg.n
        # Full batches, then the remainder batch, as the trainers see them.
        counts = [batch] * (cfg.n // batch) + ([cfg.n % batch] if cfg.n % batch else [])
        self.plans = []
        f32 = np.float32
        for b in sorted(set(counts)):
            A = [rng.standard_normal((b, w)).astype(f32) for w in self.sizes]
            Z = [np.empty((b, w), f32) for w in self.sizes[1:]]
            D = [rng.standard_normal((b, w)).astype(f32) for w in self.sizes[1:]]
            DA = [np.empty((b, w), f32) for w in self.sizes[1:-1]]
            W = [rng.standard_normal((fi, fo)).astype(f32)
                 for fi, fo in zip(self.sizes[:-1], self.sizes[1:], strict=True)]
            G = [np.empty_like(w) for w in W]
            ops = []
            L = len(W)
            for i in range(L):
                ops.append(self._fastest(A[i], W[i], Z[i]))
            for i in reversed(range(L)):
                ops.append(self._fastest(A[i].T, D[i], G[i]))
                if i > 0:
                    if W[i].shape[1] == 1:
                        ops.append((np.multiply, D[i], W[i][:, 0], DA[i - 1]))
                    else:
                        ops.append(self._fastest(D[i], W[i].T, DA[i - 1]))
            self.plans.append((counts.count(b), ops))

    @staticmethod
    def _fastest(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> tuple:
        best, best_t = None, np.inf
        for fn in (np.dot, np.matmul):
            start = time.perf_counter()
            for _ in range(20):
                fn(a, b, out=out)
            elapsed = time.perf_counter() - start
            if elapsed < best_t:
                best, best_t = fn, elapsed
        return best, a, b, out

    def epoch(self) -> None:
        for count, ops in self.plans:
            for _ in range(count):
                for fn, a, b, out in ops:
                    fn(a, b, out=out)


def run_floor(floor: Floor, epochs: int, threads: int) -> float:
    with threadpool_limits(limits=threads, user_api="blas"):
        start = time.perf_counter()
        for _ in range(epochs):
            floor.epoch()
        return time.perf_counter() - start


# ----------------------------------------------------------------------------- report


def blas_summary() -> str:
    parts = []
    for lib in threadpool_info():
        name = lib.get("internal_api")
        arch = lib.get("architecture")
        parts.append(
            f"{name} {lib.get('version')} ({lib.get('prefix')}"
            + (f", {arch}" if arch else "")
            + f"): {lib.get('num_threads')} threads"
        )
    return "; ".join(parts)


def environment() -> list[str]:
    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{os.cpu_count()} cores, {platform.machine()}",
        f"BLAS/threads: {blas_summary()}",
        "OPENBLAS_CORETYPE="
        + repr(os.environ.get("OPENBLAS_CORETYPE"))
        + ", OPENBLAS_L2_SIZE="
        + repr(os.environ.get("OPENBLAS_L2_SIZE")),
    ]
    import sklearn

    lines.append(f"sklearn {sklearn.__version__}")
    if torch is not None:
        lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    else:
        lines.append("torch not installed: its column is skipped")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    parser.add_argument("--configs", default="1,2,3,4,5", help="e.g. 1,3")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-sklearn", action="store_true")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    wanted = {int(k) for k in args.configs.split(",")}

    for line in environment():
        print(line)
    print(f"repeats={repeats} (interleaved, median), float32, Adam\n")

    cores = os.cpu_count() or 1
    rows = []
    for cfg in CONFIGS:
        if cfg.key not in wanted:
            continue
        epochs = cfg.quick_epochs if args.quick else cfg.epochs
        X, y = make_data(cfg)
        floor = Floor(cfg, X.shape[1])
        runners = {"ours": run_ours}
        if not args.no_sklearn:
            runners["sklearn"] = run_sklearn
        if torch is not None and not args.no_torch:
            runners["torch"] = run_torch
        times: dict[str, list[float]] = {name: [] for name in [*runners, "floor"]}
        acc: dict[str, float] = {}
        # Warm-up (imports, first-touch allocations, thread pools), and the peers' thread
        # count: each runs with whichever of 1 thread and all cores is faster for it here.
        threads = {"ours": blas_threads_for(cfg.batch or cfg.n, [X.shape[1], *cfg.hidden])}
        probe = max(1, -(-epochs // 10))
        run_ours(cfg, X, y, 1)
        for name, run in runners.items():
            if name == "ours":
                continue
            best = {}
            for t in sorted({1, cores}):
                run(cfg, X, y, 1, t)
                best[t] = min(run(cfg, X, y, probe, t)[0] for _ in range(2))
            threads[name] = min(best, key=best.get)
        run_floor(floor, 1, 1)
        for _ in range(repeats):
            for name, run in runners.items():
                seconds, acc[name] = run(cfg, X, y, epochs, threads[name])
                times[name].append(seconds / epochs)
            times["floor"].append(
                min(run_floor(floor, epochs, 1), run_floor(floor, epochs, cores)) / epochs
            )
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append((cfg, epochs, med, acc, threads))
        print(format_row(cfg, epochs, med, acc, threads), flush=True)

    print("\n" + table(rows))
    return 0


def _fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_row(cfg: Config, epochs: int, med: dict, acc: dict, threads: dict) -> str:
    times = ", ".join(f"{k} {_fmt_s(v)}" for k, v in med.items())
    accs = ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
    used = ", ".join(f"{k} {v}" for k, v in threads.items())
    return (f"config {cfg.label()} x{epochs} epochs: {times} | train accuracy: {accs} "
            f"| threads: {used}")


def table(rows: list) -> str:
    head = (
        f"{'config':<40} {'ours/ep':>9} {'sklearn/ep':>10} {'torch/ep':>9} {'floor/ep':>9}"
        f" {'skl/ours':>8} {'torch/ours':>10} {'ours/floor':>10}  accuracy ours/skl/torch"
        f"  threads"
    )
    lines = [head, "-" * len(head)]
    for cfg, _epochs, med, acc, threads in rows:
        ours = med["ours"]
        skl = med.get("sklearn")
        trc = med.get("torch")
        cells = [
            f"{cfg.label():<40}",
            f"{_fmt_s(ours):>9}",
            f"{_fmt_s(skl) if skl else '-':>10}",
            f"{_fmt_s(trc) if trc else '-':>9}",
            f"{_fmt_s(med['floor']):>9}",
            f"{(f'{skl / ours:.2f}x' if skl else '-'):>8}",
            f"{(f'{trc / ours:.2f}x' if trc else '-'):>10}",
            f"{ours / med['floor']:>9.2f}x",
            " " + "/".join(f"{acc[k]:.3f}" for k in ("ours", "sklearn", "torch") if k in acc),
            "  " + "/".join(str(threads[k]) for k in ("ours", "sklearn", "torch") if k in threads),
        ]
        lines.append(" ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
