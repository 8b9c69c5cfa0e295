"""The plot work of a default run (``python train.py``), timed task by task.

    python benchmarks/bench_plots.py                          # this checkout, 7 repeats
    python benchmarks/bench_plots.py --baseline /work/main    # against another checkout

What a default run draws (moons, 500 points, MLP [2, 16, 16, 1] tanh, Adam lr 0.01,
300 epochs, 13 metrics per epoch, 40 animation frames on an 80 x 80 grid):

- ``import``: ``import pipeline.viz.plots`` (matplotlib with it), after the modules a run has
  already imported (numpy, pandas, the engine);
- ``anim_start``: the ``BoundaryAnimation`` and its epoch-0 frame;
- ``before`` / ``after``: the boundary PNGs before and after training (200 x 200 grid);
- ``frames``: the 40 frames captured during training (one grid evaluation each);
- ``curves``: the training-curves PNG;
- ``gif``: rendering and writing the animation.

``plots`` is ``before + after + curves + gif``: what a run reports as ``time/plots``.
``all`` adds ``import``, ``anim_start`` and ``frames``, which a run spends elsewhere.

A run is one fresh process, so the figures that matter are *cold*: the first time each
piece of code runs (fonts loaded, caches filled, matplotlib imported). Each repeat starts
a new process per checkout, alternating checkouts (A, B, A, B, ...) so that a slow spell
of the shared machine hits both alike, and reports the median. The same process then
repeats the work *warm* (``--warm`` times) to show the steady cost, e.g. in a notebook
or a sweep worker that trains many models.

The script uses only the public API of ``pipeline.viz.plots`` and calls it the way that
checkout's ``pipeline/app/job.py`` does, so it can time a checkout that predates it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TASKS = ("import", "anim_start", "before", "frames", "after", "curves", "gif")
PLOTS = ("before", "after", "curves", "gif")


def _child(root: Path, warm: int) -> dict:
    """One cold pass of a run's plot work in this (fresh) process, then ``warm`` more."""
    sys.path.insert(0, str(root))
    import numpy as np

    from pipeline.data.datasets import make_dataset
    from pipeline.engine.loop import History
    from pipeline.engine.mlp import MLP
    from pipeline.engine.optim import make_optimizer
    from pipeline.fast import fit

    # Training happens before anything is timed; frames are replayed from snapshots.
    ds = make_dataset("moons", n_samples=500, noise=0.2, test_fraction=0.25, seed=0)
    model = MLP([2, 16, 16, 1], activation="tanh", output="sigmoid", init="xavier_uniform",
                seed=0, dtype=np.float32, loss="bce")
    initial = model.copy()
    history = History()
    # Every epoch's model (a few hundred numbers each): the frames are picked with
    # frame_epochs later, as importing pipeline.viz.plots now would spoil the cold timing.
    snapshots: dict[int, tuple] = {}

    def snap(epoch: int, metrics: dict) -> None:
        snapshots[epoch] = (model.copy(), dict(metrics))

    fit(model, ds.X_train, ds.y_train, loss="bce", optimizer=make_optimizer("adam", lr=0.01),
        epochs=300, X_val=ds.X_test, y_val=ds.y_test, callbacks=[history.append, snap])
    # Warm numpy on the grid size so the first pass is not charged numpy's own start-up.
    model.predict_proba(np.zeros((6400, 2)))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-plots-"))
    passes = [_one_pass(ds, initial, model, history, snapshots, out_dir, i)
              for i in range(1 + warm)]
    sizes = {p.name: p.stat().st_size for p in out_dir.iterdir() if p.name.startswith("0-")}
    import pipeline.viz.plots as plots

    return {"cold": passes[0], "warm": passes[1:], "sizes": sizes, "file": plots.__file__,
            "renderer": hasattr(plots, "BoundaryRenderer")}


class _Clock:
    """Wall and CPU seconds of each task. CPU time (one BLAS thread, single-threaded
    matplotlib) is much steadier than wall time when other jobs share the cores."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def start(self) -> None:
        self._w, self._c = time.perf_counter(), time.process_time()

    def stop(self, task: str) -> None:
        self.wall[task] = time.perf_counter() - self._w
        self.cpu[task] = time.process_time() - self._c


def _one_pass(ds, initial, model, history, snapshots, out_dir: Path, i: int) -> dict:
    t = _Clock()

    def raw(m):
        return lambda X: m.predict_proba(ds.transform(X))

    names = dict(class_names=[str(c) for c in ds.classes], feature_names=ds.feature_names)
    data = (ds.X_train_raw, ds.y_train, ds.X_test_raw, ds.y_test)
    name = "moons-16x16-tanh-adam-lr0.01-s0"

    t.start()
    import pipeline.viz.plots as plots

    t.stop("import")
    new = hasattr(plots, "BoundaryRenderer")

    t.start()
    anim = plots.BoundaryAnimation(*data, resolution=80, **names)
    anim.add_frame(raw(initial), 0)
    t.stop("anim_start")

    t.start()
    if new:  # as pipeline/app/job.py does since the renderer exists
        boundary = plots.BoundaryRenderer(*data, **names)
        before = boundary.render(raw(initial), f"{name}: before training")
        plots.save_image(before, out_dir / f"{i}-before.png")
    else:
        fig = plots.plot_decision_boundary(raw(initial), *data, title=f"{name}: before training",
                                           **names)
        fig.savefig(out_dir / f"{i}-before.png")
    t.stop("before")

    t.start()
    for epoch in plots.frame_epochs(300, 40):
        snap, metrics = snapshots[epoch]
        anim.add_frame(raw(snap), epoch, metrics)
    t.stop("frames")

    title = f"{name}: after 300 epochs"
    t.start()
    if new:
        after = boundary.render(raw(model), title)
        plots.save_image(after, out_dir / f"{i}-after.png")
    else:
        fig = plots.plot_decision_boundary(raw(model), *data, title=title, **names)
        fig.savefig(out_dir / f"{i}-after.png")
    t.stop("after")

    t.start()
    fig = plots.plot_training_curves(history.metrics, history.epochs, title=name,
                                     best_epoch=history.best_epoch)
    if new:
        plots.save_figure(fig, out_dir / f"{i}-curves.png")
    else:
        fig.savefig(out_dir / f"{i}-curves.png")
    t.stop("curves")

    t.start()
    anim.save_gif(out_dir / f"{i}-boundary.gif")
    t.stop("gif")
    return {"wall": t.wall, "cpu": t.cpu}


def _totals(t: dict[str, float]) -> dict[str, float]:
    return {**t, "plots": sum(t[k] for k in PLOTS), "all": sum(t[k] for k in TASKS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare against")
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per checkout")
    parser.add_argument("--warm", type=int, default=3, help="warm passes per process")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.warm)))
        return

    roots = {"this": HERE}
    if args.baseline:
        roots = {"base": args.baseline.resolve(), "this": HERE}
    # results[clock][key] -> list of per-pass dicts, cold and warm apart
    cold = {c: {k: [] for k in roots} for c in ("wall", "cpu")}
    warm = {c: {k: [] for k in roots} for c in ("wall", "cpu")}
    info: dict[str, dict] = {}
    # One BLAS thread: the plot-sized arrays never gain from more, and CPU time then
    # measures one thread's work.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for _ in range(args.repeats):
        for key, root in roots.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(root), "--warm", str(args.warm)],
                capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
            )
            if proc.returncode:
                sys.exit(f"{key} ({root}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            for clock in ("wall", "cpu"):
                cold[clock][key].append(_totals(res["cold"][clock]))
                warm[clock][key].extend(_totals(w[clock]) for w in res["warm"])
            info[key] = res

    for key, res in info.items():
        kind = "BoundaryRenderer" if res["renderer"] else "plot_decision_boundary + savefig"
        sizes = ", ".join(f"{n[2:]} {s / 1024:.0f} KiB" for n, s in sorted(res["sizes"].items()))
        print(f"{key}: {res['file']}  ({kind})\n      files: {sizes}")
    keys = list(roots)
    for clock in ("wall", "cpu"):
        print(f"\n{clock} time, median ms of {args.repeats} fresh processes (cold) and "
              f"{args.repeats * args.warm} warm passes")
        head = "".join(f"{k + ' cold':>11}{k + ' warm':>11}" for k in keys)
        ratio = "   base/this cold  warm" if len(keys) == 2 else ""
        print(f"{'task':<12}{head}{ratio}")
        for task in (*TASKS, "plots", "all"):
            row, meds = "", {}
            for k in keys:
                c = statistics.median(r[task] for r in cold[clock][k]) * 1e3
                w = (statistics.median(r[task] for r in warm[clock][k]) * 1e3
                     if warm[clock][k] else float("nan"))
                meds[k] = (c, w)
                row += f"{c:11.1f}{w:11.1f}"
            if len(keys) == 2:
                (bc, bw), (tc, tw) = meds["base"], meds["this"]
                row += f"  {bc / tc:15.2f}{bw / tw if tw else float('nan'):6.2f}"
            print(f"{task:<12}{row}")


if __name__ == "__main__":
    main()
