"""The plot work of a default run (``python train.py``), timed task by task.

    python benchmarks/bench_plots.py                          # this checkout, 7 repeats
    python benchmarks/bench_plots.py --baseline /work/main    # against another checkout

What a default run draws (moons, 500 points, MLP [2, 16, 16, 1] tanh, Adam lr 0.01,
300 epochs, 13 metrics per epoch, 40 animation frames on an 80 x 80 grid):

- ``import``: ``import pipeline.plots`` (matplotlib with it), after the modules a run has
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

The script uses only the public API of ``pipeline.plots`` and calls it the way that
checkout's ``pipeline/app.py`` does, so it can time a checkout that predates it.
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

    from pipeline.data import make_dataset
    from pipeline.nn import MLP
    from pipeline.optim import make_optimizer
    from pipeline.trainer import History, fit

    # Training happens before anything is timed; frames are replayed from snapshots.
    ds = make_dataset("moons", n_samples=500, noise=0.2, test_fraction=0.25, seed=0)
    model = MLP([2, 16, 16, 1], activation="tanh", output="sigmoid", init="xavier_uniform",
                seed=0, dtype=np.float32, loss="bce")
    initial = model.copy()
    history = History()
    # Every epoch's model (a few hundred numbers each): the frames are picked with
    # frame_epochs later, as importing pipeline.plots now would spoil the cold timing.
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
    import pipeline.plots as plots

    return {"cold": passes[0], "warm": passes[1:], "sizes": sizes, "file": plots.__file__,
            "renderer": hasattr(plots, "BoundaryRenderer")}


def _one_pass(ds, initial, model, history, snapshots, out_dir: Path, i: int) -> dict:
    t: dict[str, float] = {}

    def raw(m):
        return lambda X: m.predict_proba(ds.transform(X))

    names = dict(class_names=[str(c) for c in ds.classes], feature_names=ds.feature_names)
    data = (ds.X_train_raw, ds.y_train, ds.X_test_raw, ds.y_test)
    name = "moons-16x16-tanh-adam-lr0.01-s0"

    start = time.perf_counter()
    import pipeline.plots as plots

    t["import"] = time.perf_counter() - start
    new = hasattr(plots, "BoundaryRenderer")

    start = time.perf_counter()
    anim = plots.BoundaryAnimation(*data, resolution=80, **names)
    anim.add_frame(raw(initial), 0)
    t["anim_start"] = time.perf_counter() - start

    start = time.perf_counter()
    if new:  # as pipeline/app.py does since the renderer exists
        boundary = plots.BoundaryRenderer(*data, **names)
        before = boundary.render(raw(initial), f"{name}: before training")
        plots.save_image(before, out_dir / f"{i}-before.png")
    else:
        fig = plots.plot_decision_boundary(raw(initial), *data, title=f"{name}: before training",
                                           **names)
        fig.savefig(out_dir / f"{i}-before.png")
    t["before"] = time.perf_counter() - start

    start = time.perf_counter()
    for epoch in plots.frame_epochs(300, 40):
        snap, metrics = snapshots[epoch]
        anim.add_frame(raw(snap), epoch, metrics)
    t["frames"] = time.perf_counter() - start

    title = f"{name}: after 300 epochs"
    start = time.perf_counter()
    if new:
        after = boundary.render(raw(model), title)
        plots.save_image(after, out_dir / f"{i}-after.png")
    else:
        fig = plots.plot_decision_boundary(raw(model), *data, title=title, **names)
        fig.savefig(out_dir / f"{i}-after.png")
    t["after"] = time.perf_counter() - start

    start = time.perf_counter()
    fig = plots.plot_training_curves(history.metrics, history.epochs, title=name,
                                     best_epoch=history.best_epoch)
    if new:
        plots.save_figure(fig, out_dir / f"{i}-curves.png")
    else:
        fig.savefig(out_dir / f"{i}-curves.png")
    t["curves"] = time.perf_counter() - start

    start = time.perf_counter()
    anim.save_gif(out_dir / f"{i}-boundary.gif")
    t["gif"] = time.perf_counter() - start
    return t


def _totals(t: dict) -> dict:
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
    cold: dict[str, list[dict]] = {k: [] for k in roots}
    warm: dict[str, list[dict]] = {k: [] for k in roots}
    info: dict[str, dict] = {}
    # One BLAS thread, as the plot-sized arrays never gain from more, and it keeps the two
    # checkouts from competing differently for the two cores.
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
            cold[key].append(_totals(res["cold"]))
            warm[key].extend(_totals(w) for w in res["warm"])
            info[key] = res

    for key, res in info.items():
        kind = "BoundaryRenderer" if res["renderer"] else "plot_decision_boundary + savefig"
        sizes = ", ".join(f"{n[2:]} {s / 1024:.0f} KiB" for n, s in sorted(res["sizes"].items()))
        print(f"{key}: {res['file']}  ({kind})\n      files: {sizes}")
    print(f"\nmedian ms over {args.repeats} fresh processes (cold) and "
          f"{args.repeats * args.warm} warm passes")
    keys = list(roots)
    head = "".join(f"{k + ' cold':>11}{k + ' warm':>11}" for k in keys)
    ratio = "  base/this cold  warm" if len(keys) == 2 else ""
    print(f"{'task':<12}{head}{ratio}")
    for task in (*TASKS, "plots", "all"):
        row, meds = "", {}
        for k in keys:
            c = statistics.median(r[task] for r in cold[k]) * 1e3
            w = statistics.median(r[task] for r in warm[k]) * 1e3 if warm[k] else float("nan")
            meds[k] = (c, w)
            row += f"{c:11.1f}{w:11.1f}"
        if len(keys) == 2:
            (bc, bw), (tc, tw) = meds["base"], meds["this"]
            row += f"  {bc / tc:14.2f}{bw / tw if tw else float('nan'):6.2f}"
        print(f"{task:<12}{row}")


if __name__ == "__main__":
    main()
