"""Figures for training runs and sweeps: decision boundaries, curves, animations, reports.

Every function builds a :class:`matplotlib.figure.Figure` through the object API with an
Agg canvas and returns it; nothing is shown and pyplot's global figure manager is never
touched, so the module is safe in worker threads, headless servers and parallel sweeps.

Models are duck-typed: anything that maps points to class probabilities is accepted as a
``predict_proba`` callable,

    predict_proba(points: ndarray (n, 2)) -> ndarray (n, k), k >= 2

so this module imports neither the engine nor Hydra nor MLflow. Wherever a callable is
accepted a precomputed probability array on the plotting grid may be passed instead
(``(res, res, k)``, ``(res * res, k)``, or for two classes a ``(res, res)`` grid of
P(class 1)), so callers that already evaluated a model do not pay twice.

Colour conventions, shared by all plots so that a reader learns them once:

* two classes: P(class 1) on a lightened red-blue diverging map (blue = class 0,
  red = class 1, white = undecided) with the 0.5 contour drawn in black;
* k classes: each point of the plane takes the colour of its most probable class, faded
  towards white as the confidence drops to chance (1 / k); thin lines mark class borders;
* training points are filled markers, test points hollow rings, both coloured by class.
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import contourpy
import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

__all__ = [
    "BoundaryAnimation",
    "BoundaryRenderer",
    "ProbaSource",
    "SweepPanel",
    "boundary_grid",
    "frame_epochs",
    "plot_decision_boundary",
    "plot_replica_boundary",
    "plot_small_multiples",
    "plot_sweep_facets",
    "plot_sweep_heatmap",
    "plot_sweep_lines",
    "plot_training_curves",
    "save_figure",
    "save_image",
]

#: A model's probabilities: a callable ``(n, 2) -> (n, k)`` or an array already evaluated
#: on the plotting grid.
ProbaSource = Callable[[np.ndarray], np.ndarray] | np.ndarray

Grid = tuple[np.ndarray, np.ndarray, np.ndarray]

# Lightened so that saturated class-coloured markers stay visible on top of the map,
# and so that "undecided" (p = 0.5) reads as white. Bad values (NaN from a diverged
# model) are drawn grey rather than silently transparent.
_DIVERGING = "RdBu_r"
_LIGHTEN = 0.45
_BAD_COLOUR = "#bdbdbd"
_BINARY_CLASS_COLOURS = ("#2166ac", "#b2182b")  # the two ends of RdBu_r, darker
_QUALITATIVE = "tab10"
_HATCH_COLOUR = "#4d4d4d"
_PNG_COMPRESS_LEVEL = 1


# ----------------------------------------------------------------------------- helpers


def _new_figure(figsize: tuple[float, float], *, layout: str | None = "constrained") -> Figure:
    """A Figure with its own Agg canvas, outside pyplot (thread-safe, no display needed)."""
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _root_figure(ax: Axes) -> Figure:
    # ax.figure may be a SubFigure; its .figure is the root Figure that can be saved.
    fig = ax.figure
    while not isinstance(fig, Figure):
        fig = fig.figure
    return fig


def _lightened_cmap(name: str, amount: float) -> ListedColormap:
    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    rgba[:, :3] = 1.0 - (1.0 - rgba[:, :3]) * (1.0 - amount)
    return ListedColormap(rgba, name=f"{name}_light").with_extremes(bad=_BAD_COLOUR)


_BINARY_CMAP = _lightened_cmap(_DIVERGING, _LIGHTEN)


def _class_colours(n_classes: int) -> np.ndarray:
    """(n_classes, 3) RGB colours; binary problems reuse the ends of the diverging map."""
    if n_classes <= 2:
        return np.array([mcolors.to_rgb(c) for c in _BINARY_CLASS_COLOURS])
    cmap = colormaps[_QUALITATIVE] if n_classes <= 10 else colormaps["tab20"]
    if n_classes > cmap.N:
        # More classes than the palette holds: sample a continuous map instead of cycling,
        # so two classes never share a colour.
        return colormaps["hsv"](np.linspace(0, 1, n_classes, endpoint=False))[:, :3]
    return np.asarray(cmap.colors)[:n_classes, :3]


def _check_points(X: Any, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape (n_samples, 2) for a 2-D boundary plot, got shape {X.shape}"
        )
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty; at least one point is needed")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or inf; only finite coordinates can be plotted")
    return X


def _check_labels(y: Any, n: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2:
        # One-hot or probability targets (n, k): the plotted class is the largest column.
        y = np.argmax(y, axis=1) if y.shape[1] > 1 else y[:, 0]
    y = y.reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but there are {n} points")
    try:
        yf = y.astype(float)
    except (TypeError, ValueError):
        yf = np.array([np.nan])
    if y.size and not (np.all(np.isfinite(yf)) and np.all(yf >= 0) and np.all(yf == np.round(yf))):
        raise ValueError(
            f"{name} must hold integer class labels 0..k-1, got values like {y[:5].tolist()}"
        )
    return yf.astype(int)


def _pair(X: Any, y: Any, xname: str, yname: str) -> tuple[np.ndarray, np.ndarray] | None:
    if X is None and y is None:
        return None
    if X is None or y is None:
        raise ValueError(f"{xname} and {yname} must be given together (got only one of them)")
    Xa = _check_points(X, xname)
    return Xa, _check_labels(y, Xa.shape[0], yname)


def _proba_array(P: Any, n_points: int, shape: tuple[int, int]) -> np.ndarray:
    """Normalise a probability array to (ny, nx, k) with k >= 2."""
    P = np.asarray(P, dtype=float)
    ny, nx = shape
    if P.ndim == 1 or (P.ndim == 2 and P.shape[1] == 1 and P.shape[0] == n_points):
        # A single column is P(class 1): a sigmoid unit's output, or a pyfunc's column.
        p1 = P.reshape(-1)
        if p1.shape[0] != n_points:
            raise ValueError(f"expected {n_points} probabilities, got {p1.shape[0]}")
        P = np.stack([1.0 - p1, p1], axis=-1)
    elif P.ndim == 2 and P.shape == (ny, nx):
        P = np.stack([1.0 - P, P], axis=-1)  # a (res, res) grid of P(class 1)
    if P.ndim == 2:
        if P.shape[0] != n_points:
            raise ValueError(
                f"predict_proba returned {P.shape[0]} rows for {n_points} grid points; "
                "it must map (n, 2) points to (n, k) probabilities"
            )
        P = P.reshape(ny, nx, P.shape[1])
    if P.ndim != 3 or P.shape[:2] != (ny, nx):
        raise ValueError(
            f"probabilities of shape {P.shape} do not fit the ({ny}, {nx}) plotting grid; "
            f"allowed: ({n_points}, k), ({ny}, {nx}, k) or ({ny}, {nx}) for P(class 1)"
        )
    if P.shape[2] < 2:
        raise ValueError(f"need probabilities for k >= 2 classes, got k = {P.shape[2]}")
    return P


def _evaluate(source: ProbaSource, grid: Grid) -> np.ndarray:
    """Class probabilities on the grid, shape (ny, nx, k). One vectorised call."""
    xx, _, points = grid
    if callable(source):
        source = source(points)
    return _proba_array(source, points.shape[0], xx.shape)


def _reduce(P: np.ndarray) -> np.ndarray:
    """What is drawn: P(class 1) (ny, nx) for two classes, else the full (ny, nx, k)."""
    return P[..., 1] if P.shape[-1] == 2 else P


def _extent(xx: np.ndarray, yy: np.ndarray) -> tuple[float, float, float, float]:
    # imshow's extent is the outer edge of the pixels; the grid values sit at pixel
    # centres, so widen by half a step to put each probability exactly on its point.
    dx = (xx[0, -1] - xx[0, 0]) / max(xx.shape[1] - 1, 1)
    dy = (yy[-1, 0] - yy[0, 0]) / max(yy.shape[0] - 1, 1)
    return (xx[0, 0] - dx / 2, xx[0, -1] + dx / 2, yy[0, 0] - dy / 2, yy[-1, 0] + dy / 2)


def _region_rgb(P: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(ny, nx, 3) RGB image for k classes: argmax colour faded by confidence.

    The fade maps confidence 1/k (chance) to a pale tint and 1 to 75 % of the class
    colour, blended with white so the image stays opaque (no alpha compositing cost).
    """
    k = P.shape[-1]
    bad = ~np.all(np.isfinite(P), axis=-1)
    P = np.where(bad[..., None], 0.0, P)
    label = np.argmax(P, axis=-1)
    confidence = np.max(P, axis=-1)
    strength = np.clip((confidence - 1.0 / k) / (1.0 - 1.0 / k), 0.0, 1.0)
    alpha = (0.12 + 0.63 * strength)[..., None]
    rgb = 1.0 - alpha * (1.0 - colours[label])
    rgb[bad] = mcolors.to_rgb(_BAD_COLOUR)
    return rgb


def _level_lines(xx: np.ndarray, yy: np.ndarray, Z: np.ndarray, level: float) -> list[np.ndarray]:
    """Polylines (each (m, 2)) where Z crosses ``level``; NaN cells are left out.

    contourpy is matplotlib's own contouring engine; calling it directly and feeding one
    LineCollection is much cheaper than building a ContourSet artist per animation frame.
    """
    finite = np.isfinite(Z)
    if not finite.any():
        return []
    z = Z[finite]
    if not z.min() < level < z.max():
        return []
    gen = contourpy.contour_generator(
        xx, yy, np.ma.masked_invalid(Z) if not finite.all() else Z, line_type="Separate"
    )
    return [seg for seg in gen.lines(level) if len(seg) > 1]


def _boundary_segments(xx: np.ndarray, yy: np.ndarray, D: np.ndarray) -> list[np.ndarray]:
    """The decision boundary: p = 0.5 for two classes; for k classes the borders between
    regions, i.e. for each class c the zero level of p_c - max_{j != c} p_j (each border
    is found from both sides, which only draws the same line twice)."""
    if D.ndim == 2:
        return _level_lines(xx, yy, D, 0.5)
    P = np.where(np.isfinite(D), D, np.nan)
    top2 = np.sort(P, axis=-1)[..., -2:]  # NaN rows sort last and stay NaN
    label = np.argmax(np.nan_to_num(P, nan=-1.0), axis=-1)
    segments: list[np.ndarray] = []
    for c in range(P.shape[-1]):
        best_other = np.where(label == c, top2[..., 0], top2[..., 1])
        segments += _level_lines(xx, yy, P[..., c] - best_other, 0.0)
    return segments


class _BoundaryLayer:
    """The probability image and the decision boundary on one axes, updatable in place.

    Used once by the static plots and once per frame by the animation, which only swaps
    the image data and the boundary's line segments instead of rebuilding the axes.

    Attributes
    ----------
    image : AxesImage
        P(class 1) with the diverging map (two classes) or the RGB class regions.
    boundary : LineCollection
        The 0.5 contour (two classes) or the class borders (k classes); its label says which.
    """

    def __init__(self, ax: Axes, grid: Grid, D: np.ndarray, colours: np.ndarray) -> None:
        self.ax = ax
        self.xx, self.yy, _ = grid
        self.colours = colours
        self.binary = D.ndim == 2
        extent = _extent(self.xx, self.yy)
        if self.binary:
            self.image = ax.imshow(
                np.ma.masked_invalid(D), cmap=_BINARY_CMAP, norm=Normalize(0.0, 1.0),
                origin="lower", extent=extent, aspect="auto", interpolation="bilinear",
                zorder=0,
            )
            style = dict(colors="k", linewidths=1.6, label="p = 0.5")
        else:
            self.image = ax.imshow(
                _region_rgb(D, colours), origin="lower", extent=extent, aspect="auto",
                interpolation="bilinear", zorder=0,
            )
            style = dict(colors="0.2", linewidths=0.9, label="class borders")
        self.boundary = LineCollection(_boundary_segments(self.xx, self.yy, D), zorder=2,
                                       **style)
        ax.add_collection(self.boundary, autolim=False)

    def update(self, D: np.ndarray) -> None:
        if (D.ndim == 2) != self.binary:
            raise ValueError("the number of classes changed between frames")
        data = np.ma.masked_invalid(D) if self.binary else _region_rgb(D, self.colours)
        self.image.set_data(data)
        self.update_lines(D)

    def update_lines(self, D: np.ndarray) -> None:
        self.boundary.set_segments(_boundary_segments(self.xx, self.yy, D))


def _scatter_points(
    ax: Axes,
    train: tuple[np.ndarray, np.ndarray] | None,
    test: tuple[np.ndarray, np.ndarray] | None,
    colours: np.ndarray,
    *,
    size: float = 5.0,
) -> list[Line2D]:
    """Training points filled, test points as hollow rings, one Line2D per class and split.

    Line2D markers are stamped from one cached bitmap by Agg, about ten times faster than
    a scatter PathCollection; that matters when the animation redraws them every frame.
    """
    out: list[Line2D] = []
    for split, filled in ((train, True), (test, False)):
        if split is None:
            continue
        X, y = split
        for c in np.unique(y):
            pts = X[y == c]
            if filled:
                style = dict(ms=size, mfc=colours[c], mec="k", mew=0.5)
            else:
                style = dict(ms=size * 1.05, mfc="none", mec=colours[c], mew=1.5)
            out.extend(ax.plot(pts[:, 0], pts[:, 1], ls="", marker="o", zorder=3, **style))
    return out


def _point_legend(
    ax: Axes, colours: np.ndarray, class_names: Sequence[str], has_test: bool
) -> None:
    handles = [
        Line2D([], [], ls="", marker="s", ms=8, mfc=colours[i], mec="none", label=name)
        for i, name in enumerate(class_names)
    ]
    handles.append(Line2D([], [], ls="", marker="o", ms=6, mfc="0.45", mec="k", mew=0.5,
                          label="train"))
    if has_test:
        handles.append(Line2D([], [], ls="", marker="o", ms=6, mfc="none", mec="0.35",
                              mew=1.5, label="test"))
    # Below the axes: loc="best" scans every data point (slow) and still covers some.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=min(len(handles), 6), frameon=False, fontsize="small",
              handletextpad=0.3, columnspacing=1.0)


def _class_names(names: Sequence[str] | None, n_classes: int) -> list[str]:
    if names is None:
        return [f"class {i}" for i in range(n_classes)]
    if len(names) < n_classes:
        raise ValueError(f"class_names has {len(names)} names but there are {n_classes} classes")
    return [str(n) for n in names[:n_classes]]


# ------------------------------------------------------------------------------ public


def boundary_grid(X: np.ndarray, resolution: int = 200, margin: float = 0.5) -> Grid:
    """A regular grid covering 2-D data, for evaluating a model over the plane.

    Parameters
    ----------
    X : ndarray, shape (n_samples, 2)
        Points the grid must cover (pass train and test stacked).
    resolution : int
        Number of grid values along each axis (>= 2).
    margin : float
        Extra space added on every side, in units of that feature's standard deviation
        (>= 0): half a unit on standardised data, and the same relative room for data in
        raw units of any scale (a CSV in metres or in micrometres).

    Returns
    -------
    xx, yy : ndarray, shape (resolution, resolution)
        Coordinates from ``np.meshgrid``; rows vary along x2, columns along x1.
    points : ndarray, shape (resolution * resolution, 2)
        ``column_stack([xx.ravel(), yy.ravel()])``: one row per grid point, in the order
        that ``predict_proba(points).reshape(resolution, resolution, k)`` maps back.
    """
    X = _check_points(X, "X")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) \
            or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    if not (np.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    scale = X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a single point or a constant feature
    lo = X.min(axis=0) - margin * scale
    hi = X.max(axis=0) + margin * scale
    # A degenerate axis (all points share one coordinate) would give a zero-width image.
    hi = np.where(hi - lo > 0, hi, lo + 1.0)
    xs = np.linspace(lo[0], hi[0], int(resolution))
    ys = np.linspace(lo[1], hi[1], int(resolution))
    xx, yy = np.meshgrid(xs, ys)
    points = np.column_stack([xx.ravel(), yy.ravel()])
    return xx, yy, points


def plot_decision_boundary(
    predict_proba: ProbaSource,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    title: str = "",
    ax: Axes | None = None,
    grid: Grid | None = None,
    resolution: int = 200,
    class_names: Sequence[str] | None = None,
    feature_names: Sequence[str] = ("x1", "x2"),
    colorbar: bool = True,
    legend: bool = True,
) -> Figure:
    """A model's decision boundary over the plane with the data drawn on top.

    Two classes: P(class 1) as a diverging colour map with a colour bar and the 0.5
    contour. k classes: regions coloured by the most probable class, faded by confidence,
    with the class borders drawn. Training points are filled, test points hollow.

    Parameters
    ----------
    predict_proba : callable or ndarray
        ``(n, 2) -> (n, k)`` class probabilities, called once on all grid points; or the
        probabilities already evaluated on ``grid`` (``(res * res, k)``, ``(res, res, k)``
        or ``(res, res)`` for P(class 1)).
    X_train : ndarray, shape (n_train, 2)
    y_train : ndarray, shape (n_train,)
        Integer labels (one-hot ``(n_train, k)`` is accepted too).
    X_test, y_test : ndarray, shape (n_test, 2) and (n_test,), optional
    title : str
    ax : Axes, optional
        Draw into this axes (e.g. one panel of a larger figure) instead of a new figure.
    grid : (xx, yy, points), optional
        From :func:`boundary_grid`; reuse one grid across many plots to save work.
        Defaults to a grid over train and test points at ``resolution``.
    resolution : int
        Grid size when ``grid`` is not given.
    class_names : sequence of str, optional
        Legend names, ``class 0 ...`` by default.
    feature_names : (str, str)
        Axis labels.
    colorbar, legend : bool
        Whether to draw the colour bar (two classes only) and the legend.

    Returns
    -------
    Figure
        The figure holding the axes (``ax``'s figure when ``ax`` is given).
    """
    train = _pair(X_train, y_train, "X_train", "y_train")
    test = _pair(X_test, y_test, "X_test", "y_test")
    if grid is None:
        cover = train[0] if test is None else np.vstack([train[0], test[0]])
        grid = boundary_grid(cover, resolution=resolution)
    D = _reduce(_evaluate(predict_proba, grid))
    n_labels = max(int(train[1].max()), -1 if test is None else int(test[1].max())) + 1
    n_classes = max(2 if D.ndim == 2 else D.shape[-1], n_labels)
    colours = _class_colours(n_classes)

    if ax is None:
        fig = _new_figure((5.6, 5.0))
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    layer = _BoundaryLayer(ax, grid, D, colours)
    _scatter_points(ax, train, test, colours)
    if title:
        ax.set_title(title)
    _decorate_boundary(fig, ax, layer, _class_names(class_names, n_classes), feature_names,
                       has_test=test is not None, colorbar=colorbar, legend=legend)
    return fig


def _decorate_boundary(
    fig: Figure, ax: Axes, layer: _BoundaryLayer, names: list[str],
    feature_names: Sequence[str], *, has_test: bool, colorbar: bool = True,
    legend: bool = True,
) -> None:
    """Limits, axis labels, colour bar and legend of a boundary plot (all but the title)."""
    ax.set_xlim(layer.image.get_extent()[:2])
    ax.set_ylim(layer.image.get_extent()[2:])
    ax.set_xlabel(feature_names[0])
    ax.set_ylabel(feature_names[1])
    if colorbar and layer.binary:
        cb = fig.colorbar(layer.image, ax=ax, fraction=0.05, pad=0.02)
        cb.set_label(f"P({names[1]})")
    if legend:
        _point_legend(ax, layer.colours, names, has_test)


def plot_training_curves(
    history: Mapping[str, Sequence[float]],
    epochs: Sequence[int] | None = None,
    *,
    title: str = "",
    best_epoch: int | None = None,
) -> Figure:
    """Loss and accuracy over training, train and test side by side.

    Parameters
    ----------
    history : mapping of str to sequence of float
        Metric series keyed ``train/loss``, ``test/loss``, ``train/accuracy``,
        ``test/accuracy`` (any subset; at least one of them). NaN entries (epochs that
        were not evaluated) are skipped rather than breaking the line.
    epochs : sequence of int, optional
        The epoch of each entry, same length as the series; ``1..n`` when omitted.
    title : str
    best_epoch : int, optional
        Marked with a dotted vertical line on both panels (e.g. the early-stopping epoch).

    Returns
    -------
    Figure
        Two axes: loss (log-scaled when it spans more than two decades) and accuracy.
    """
    panels = {"loss": ("train/loss", "val/loss", "test/loss"),
              "accuracy": ("train/accuracy", "val/accuracy", "test/accuracy")}
    present = [k for keys in panels.values() for k in keys if k in history]
    if not present:
        raise ValueError(
            "history has none of train/loss, val/loss, test/loss, train/accuracy, "
            "val/accuracy, test/accuracy; "
            f"keys found: {sorted(history)}"
        )
    n = len(history[present[0]])
    x = np.arange(1, n + 1) if epochs is None else np.asarray(epochs, dtype=float)
    for key in present:
        if len(history[key]) != len(x):
            raise ValueError(
                f"history[{key!r}] has {len(history[key])} values but epochs has {len(x)}"
            )

    fig = _new_figure((10.0, 4.0))
    axes = fig.subplots(1, 2)
    styles = {"train": dict(color="C0", lw=1.8), "val": dict(color="C2", lw=1.5, ls="-."),
              "test": dict(color="C1", lw=1.8, ls="--")}
    for ax, (name, keys) in zip(axes, panels.items(), strict=True):
        for key in keys:
            if key not in history:
                continue
            v = np.asarray(history[key], dtype=float)
            ok = np.isfinite(v)
            split = key.split("/")[0]
            ax.plot(x[ok], v[ok], label=split, **styles[split])
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.3", ls=":", lw=1.2, label=f"best (epoch {best_epoch})")
        if ax.lines:
            ax.legend(fontsize="small")
    loss_ax, acc_ax = axes
    losses = np.concatenate(
        [np.asarray(history[k], dtype=float) for k in panels["loss"] if k in history] or [[]]
    )
    losses = losses[np.isfinite(losses)]
    # Log scale only when every value is positive (hinge/MSE can reach exactly 0) and the
    # curve spans more than two decades; otherwise the late-training detail is flattened.
    if losses.size and losses.min() > 0 and losses.max() / losses.min() > 100:
        loss_ax.set_yscale("log")
    acc_ax.set_ylim(-0.02, 1.02)
    if len(x) and x.max() > x.min():
        for ax in axes:
            ax.set_xlim(x.min(), x.max())
    if title:
        fig.suptitle(title)
    return fig


def frame_epochs(total_epochs: int, n_frames: int = 40, *, start: int = 1) -> list[int]:
    """Epochs at which to capture animation frames, dense early and sparse late.

    Learning is fastest in the first epochs, so frames are log-spaced: consecutive epochs
    at the start, then geometrically wider gaps, always ending on the last epoch.

    Parameters
    ----------
    total_epochs : int
        Last epoch of training (>= ``start``).
    n_frames : int
        Number of frames wanted (>= 1); all epochs are returned when there are fewer.
    start : int
        First epoch to include; pass 0 to include a frame of the untrained model taken
        before training starts (the trainer's callbacks count epochs from 1).

    Returns
    -------
    list of int
        Strictly increasing epochs, ``min(n_frames, total_epochs - start + 1)`` of them,
        the first being ``start`` and the last ``total_epochs``.
    """
    for name, value, low in (("total_epochs", total_epochs, start), ("n_frames", n_frames, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    span = int(total_epochs) - start + 1  # epochs available, as offsets 1..span
    if n_frames >= span:
        return list(range(start, int(total_epochs) + 1))
    if n_frames == 1:
        return [int(total_epochs)]
    targets = np.geomspace(1.0, span, n_frames)
    offsets: list[int] = []
    prev = 0
    for i, t in enumerate(targets):
        # Push duplicates forward (early frames become consecutive epochs) but leave room
        # for the frames still to come.
        v = min(max(int(round(t)), prev + 1), span - (n_frames - 1 - i))
        offsets.append(v)
        prev = v
    return [start - 1 + v for v in offsets]


def _metrics_text(metrics: Mapping[str, float]) -> str:
    parts = []
    for split in ("train", "test"):
        bits = [
            f"{short} {metrics[f'{split}/{name}']:.3f}"
            for name, short in (("loss", "loss"), ("accuracy", "acc"))
            if f"{split}/{name}" in metrics
        ]
        if bits:
            parts.append(f"{split} " + " ".join(bits))
    return "   |   ".join(parts)


def _pixel_box(centres: np.ndarray, nodes: np.ndarray, flip: bool) -> tuple[float, float]:
    """Pillow's resize ``box`` (source pixel units, one axis) that puts the output pixels
    whose centres have data coordinates ``centres`` exactly onto the grid ``nodes``.

    Pillow samples output pixel i at source coordinate ``b0 + (i + 0.5) * (b1 - b0) / n``
    and holds source pixel j at ``j + 0.5``; the grid node j is source pixel j (or
    ``n - 1 - j`` with ``flip``, images being stored top row first).
    """
    n = nodes.shape[0]
    f = (centres - nodes[0]) / (nodes[-1] - nodes[0]) * (n - 1)
    if flip:
        f = (n - 1) - f
    step = (f[-1] - f[0]) / max(f.shape[0] - 1, 1)
    b0 = f[0] + 0.5 - 0.5 * step
    b1 = b0 + f.shape[0] * step
    # Clamped into the image: the axes edges sit half a grid step outside the outer nodes,
    # so this moves them by a rounding error at most.
    return min(max(b0, 0.0), float(n)), min(max(b1, 0.0), float(n))


class _AxesRaster:
    """Paints a probability grid straight into an axes' pixels of an Agg buffer.

    Matplotlib's own image resampling costs about 7 ms per 100x100 frame. Pillow's
    bilinear resize of the grid (P(class 1) as 8 bits, as many levels as the colour map
    has) into the axes' pixel box, with the box mapped exactly onto the pixel centres,
    and a palette lookup cost about 0.3 ms. Used by :class:`BoundaryRenderer`; static
    figures use imshow.
    """

    def __init__(self, ax: Axes, grid: Grid, colours: np.ndarray, buffer_height: int) -> None:
        xx, yy, _ = grid
        box = ax.get_window_extent()  # display pixels, origin at the bottom left
        c0, c1 = math.ceil(box.x0 - 0.5), math.floor(box.x1 - 0.5)
        d0, d1 = math.ceil(box.y0 - 0.5), math.floor(box.y1 - 0.5)
        cols = np.arange(c0, c1 + 1) + 0.5
        ups = np.arange(d1, d0 - 1, -1) + 0.5  # top row first, like the buffer
        inv = ax.transData.inverted()
        xdata = inv.transform(np.column_stack([cols, np.full(cols.size, ups[0])]))[:, 0]
        ydata = inv.transform(np.column_stack([np.full(ups.size, cols[0]), ups]))[:, 1]
        bx0, bx1 = _pixel_box(xdata, xx[0], flip=False)
        by0, by1 = _pixel_box(ydata, yy[:, 0], flip=True)
        self.box = (bx0, by0, bx1, by1)
        self.size = (cols.size, ups.size)
        self.rows = slice(buffer_height - 1 - d1, buffer_height - d0)
        self.cols = slice(c0, c1 + 1)
        self.colours = colours
        lut = _BINARY_CMAP(np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
        self.lut = lut
        self.palette = lut.tobytes()
        self.bad = (np.array(mcolors.to_rgb(_BAD_COLOUR)) * 255 + 0.5).astype(np.uint8)

    def paint(self, buffer: np.ndarray, D: np.ndarray) -> None:
        from PIL import Image

        if D.ndim == 2 and np.isfinite(D).all():
            # Probabilities are interpolated, then coloured (as imshow does), so the
            # white p = 0.5 band between two colours stays white.
            levels = (np.clip(D[::-1], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            im = Image.fromarray(levels, "L").resize(self.size, Image.Resampling.BILINEAR,
                                                     box=self.box)
            im.putpalette(self.palette)
        else:
            # k classes, or a diverged model's NaN: colours are interpolated instead.
            if D.ndim == 2:
                bad = ~np.isfinite(D)
                colour = self.lut[(np.clip(np.nan_to_num(D), 0.0, 1.0) * 255 + 0.5)
                                  .astype(np.intp)]
                colour[bad] = self.bad
            else:
                colour = (_region_rgb(D, self.colours) * 255.0 + 0.5).astype(np.uint8)
            im = Image.fromarray(np.ascontiguousarray(colour[::-1]), "RGB")
            im = im.resize(self.size, Image.Resampling.BILINEAR, box=self.box)
        # Whole RGBA pixels (the buffer is opaque there): a contiguous copy, ~40x faster
        # than writing the three colour channels alone.
        buffer[self.rows, self.cols] = np.asarray(im.convert("RGBA"))


class _Canvas(NamedTuple):
    """A boundary figure drawn once without its changing parts (see BoundaryRenderer)."""

    fig: Figure
    layer: _BoundaryLayer
    points: list[Line2D]
    spines: list[Any]
    background: Any  # the Agg buffer region to restore before each picture
    raster: _AxesRaster
    title_lines: int
    anchor: tuple[float, float]  # top centre of the title, Pillow pixel coordinates
    font: Any  # PIL FreeTypeFont: the title's font file at the title's pixel size
    spacing: int


class _CanvasPool:
    """Laid-out boundary figures of renderers that are gone, kept for the next renderer
    of the same pictures (same points, grid, names, size, class count and title lines).

    Laying out and drawing a boundary figure's static parts is most of what a run's
    pictures cost (about 125 ms for the PNGs' figure, 150-180 ms for the GIF's), and the
    jobs of a sweep that runs in one process (the basic launcher, a joblib worker) draw
    the same data again and again. A canvas is used by one renderer at a time: it leaves
    the pool while a renderer has it and comes back when that renderer is collected.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._idle: OrderedDict[tuple, _Canvas] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: tuple) -> _Canvas | None:
        with self._lock:
            return self._idle.pop(key, None)

    def give(self, key: tuple, canvas: _Canvas) -> None:
        with self._lock:
            self._idle[key] = canvas
            self._idle.move_to_end(key)
            while len(self._idle) > self.size:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


_CANVASES = _CanvasPool()


def _content_key(*arrays: np.ndarray | None) -> str:
    """A digest of arrays' dtypes, shapes and values."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        if array is None:
            digest.update(b"-")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


class BoundaryRenderer:
    """Decision-boundary pictures of one data set, drawn on one figure laid out once.

    :func:`plot_decision_boundary` builds, lays out and draws a whole figure per call, and
    most of that cost (ticks, labels, colour bar, legend, and the constrained layout that
    measures them) is the same for every picture of the same data. Here that part is
    rendered once as a background; each picture then only paints the probability image
    into the axes' pixels, draws the boundary and the points on top, and writes the title
    with Pillow: milliseconds instead of a few hundred. The content is that of
    :func:`plot_decision_boundary` with the colour bar and the legend.

    One renderer serves many models or epochs (a run's pictures before and after
    training, the frames of :class:`BoundaryAnimation`). It is not thread-safe.

    Parameters
    ----------
    X_train, y_train, X_test, y_test : ndarray
        As in :func:`plot_decision_boundary`.
    resolution : int
        Grid size along each axis, when ``grid`` is not given.
    grid : (xx, yy, points), optional
        From :func:`boundary_grid`; by default over train and test points.
    class_names, feature_names : sequence of str, optional
        Legend names and axis labels.
    dpi : int
        Pixels per inch of the 5.6 x 5.0 inch picture.
    marker_size : float
        Size of the data points in points (1/72 inch).
    title_size : str or float
        Font size of the title (a matplotlib size name or points).

    Attributes
    ----------
    grid : (xx, yy, points)
        The grid on which ``predict_proba`` is evaluated.

    Examples
    --------
    >>> boundary = BoundaryRenderer(X_tr, y_tr, X_te, y_te)                 # doctest: +SKIP
    >>> save_image(boundary.render(model.predict_proba, "before"), "b.png")  # doctest: +SKIP
    >>> fit(model, X_tr, y_tr, ...)                                         # doctest: +SKIP
    >>> save_image(boundary.render(model.predict_proba, "after"), "a.png")   # doctest: +SKIP
    """

    def __init__(
        self,
        X_train: np.ndarray,
        y_train: np.ndarray,
        X_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
        *,
        resolution: int = 200,
        grid: Grid | None = None,
        class_names: Sequence[str] | None = None,
        feature_names: Sequence[str] = ("x1", "x2"),
        dpi: int = 100,
        marker_size: float = 5.0,
        title_size: str | float = "large",
    ) -> None:
        train = _pair(X_train, y_train, "X_train", "y_train")
        assert train is not None
        self.train = train
        self.test = _pair(X_test, y_test, "X_test", "y_test")
        if grid is None:
            cover = train[0] if self.test is None else np.vstack([train[0], self.test[0]])
            grid = boundary_grid(cover, resolution=resolution)
        self.grid = grid
        self.class_names = class_names
        self.feature_names = tuple(feature_names)
        self.dpi = int(dpi)
        self.marker_size = float(marker_size)
        self.title_size = title_size
        self._canvas: _Canvas | None = None
        self._returns: weakref.finalize | None = None  # gives the canvas back to the pool

    def render(self, predict_proba: ProbaSource, title: str = "") -> Any:
        """The picture of one model: an RGB :class:`PIL.Image.Image`.

        Parameters
        ----------
        predict_proba : callable or ndarray
            ``(n, 2) -> (n, k)``, called once on all grid points, or its result on
            :attr:`grid` (as in :func:`plot_decision_boundary`).
        title : str
            Drawn above the axes; may have several lines.
        """
        return self._render(_reduce(_evaluate(predict_proba, self.grid)), title)

    def _render(self, D: np.ndarray, title: str, reserve: str | None = None) -> Any:
        """Picture of the reduced probabilities ``D`` (P(class 1), or (ny, nx, k)).

        ``reserve`` is the title the layout makes room for (default: ``title``); the
        layout is solved again only if a title has more lines than the room made.
        """
        from PIL import Image, ImageDraw

        c = self._canvas
        lines = title.count("\n") + 1
        if c is not None and (D.ndim == 2) != c.layer.binary:
            raise ValueError("the number of classes changed between pictures")
        if c is None or lines > c.title_lines:
            c = self._canvas = self._acquire(D, title if reserve is None else reserve)
        canvas = c.fig.canvas
        canvas.restore_region(c.background)
        c.layer.update_lines(D)
        c.raster.paint(np.asarray(canvas.buffer_rgba()), D)
        for artist in (c.layer.boundary, *c.points, *c.spines):
            # Spines again: the image would otherwise cover half their line width.
            c.fig.axes[0].draw_artist(artist)
        w, h = canvas.get_width_height()
        im = Image.frombuffer("RGBA", (w, h), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        im = im.convert("RGB")  # a copy: the next picture reuses the buffer
        if title:
            ImageDraw.Draw(im).multiline_text(c.anchor, title, font=c.font, fill=(0, 0, 0),
                                              anchor="ma", align="center", spacing=c.spacing)
        return im

    def _acquire(self, D: np.ndarray, reserve: str) -> _Canvas:
        """A canvas for pictures like ``D`` under titles of ``reserve``'s line count: an idle
        one from the pool (the same figure this renderer would build), else a new one."""
        if self._returns is not None:  # a canvas too small for the titles: back it goes
            self._returns()
        key = (
            _content_key(*self.train, *(self.test or (None, None)), *self.grid),
            tuple(self.class_names or ()), self.feature_names, self.dpi, self.marker_size,
            self.title_size, D.shape[2:], reserve.count("\n") + 1,
        )
        canvas = _CANVASES.take(key) or self._build(D, reserve)
        # Not a method of self: the pool must not keep this renderer alive.
        self._returns = weakref.finalize(self, _CANVASES.give, key, canvas)
        return canvas

    def _build(self, D: np.ndarray, reserve: str) -> _Canvas:
        from matplotlib import font_manager
        from PIL import ImageFont

        n_labels = max(int(self.train[1].max()),
                       -1 if self.test is None else int(self.test[1].max())) + 1
        n_classes = max(2 if D.ndim == 2 else D.shape[-1], n_labels)
        colours = _class_colours(n_classes)
        fig = _new_figure((5.6, 5.0))
        fig.set_dpi(self.dpi)
        ax = fig.add_subplot()
        layer = _BoundaryLayer(ax, self.grid, D, colours)
        points = _scatter_points(ax, self.train, self.test, colours, size=self.marker_size)
        # The title reserves its room in the layout but is drawn by Pillow: Agg renders text
        # glyph by glyph (~8 ms for two lines, the largest cost left per picture).
        title = ax.set_title(reserve or " ", fontsize=self.title_size)
        _decorate_boundary(fig, ax, layer, _class_names(self.class_names, n_classes),
                           self.feature_names, has_test=self.test is not None)
        # Solve the layout once, then freeze it: the pictures share one geometry (and a
        # GIF does not jitter).
        fig.get_layout_engine().execute(fig)
        fig.set_layout_engine("none")
        # Blitting: what changes per picture is animated, so it is left out of the
        # background (ticks, labels, legend, colour bar: most of the drawing cost).
        for artist in (layer.image, layer.boundary, *points):
            artist.set_animated(True)
        canvas = fig.canvas
        title_box = title.get_window_extent(canvas.get_renderer())
        font_px = title.get_fontsize() * fig.dpi / 72.0
        font = ImageFont.truetype(font_manager.findfont(title.get_fontproperties()),
                                  max(1, round(font_px)))
        title.set_visible(False)
        canvas.draw()
        height = canvas.get_width_height()[1]
        return _Canvas(
            fig=fig, layer=layer, points=points, spines=list(ax.spines.values()),
            background=canvas.copy_from_bbox(fig.bbox),
            raster=_AxesRaster(ax, self.grid, colours, height),
            title_lines=reserve.count("\n") + 1,
            anchor=((title_box.x0 + title_box.x1) / 2.0, height - title_box.y1),
            font=font, spacing=max(1, round(0.2 * font_px)),
        )


def _figure_image(fig: Figure, dpi: float) -> Any:
    """The figure drawn at ``dpi`` as a PIL image: RGB if it is opaque, else RGBA."""
    from PIL import Image

    saved = fig.dpi
    fig.set_dpi(dpi)
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        opaque = bool(rgba[..., 3].min() == 255)
        return Image.fromarray(rgba[..., :3] if opaque else rgba)  # copies
    finally:
        fig.set_dpi(saved)


def save_image(image: Any, path: str | Path) -> Path:
    """Write a rendered picture (a PIL image, e.g. from :class:`BoundaryRenderer`).

    PNGs are written at zlib level 1: about twice as fast as Pillow's default 6 for a
    file about a fifth larger, on these flat-coloured plots.

    Returns
    -------
    Path
        The written file; parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        image.save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    else:
        image.save(path)
    return path


#: Colours of the GIF palette; the next index marks pixels a frame leaves unchanged.
_GIF_COLOURS = 255


def _unchanged_transparent(frames: Iterable[Any]) -> list[Any]:
    """Frames after the first with every pixel equal to the previous frame's made
    transparent (index ``_GIF_COLOURS``), all sharing the first frame's palette.

    Shown without disposal, a transparent pixel keeps what the previous frame showed, so
    the picture is unchanged; long runs of one index compress far better than the static
    parts of the figure (and the encoder crops each frame to what changed).
    """
    from PIL import Image

    frames = iter(frames)  # consumed one at a time: a generator may draw them lazily
    first = next(frames)
    palette = first.getpalette()
    out = [first]
    previous = np.asarray(first)
    for frame in frames:
        current = np.asarray(frame)
        assert current.max() < _GIF_COLOURS  # the transparent index is not a colour
        delta = np.where(current == previous, np.uint8(_GIF_COLOURS), current)
        im = Image.fromarray(delta, "P")
        im.putpalette(palette)
        out.append(im)
        previous = current
    return out


class BoundaryAnimation:
    """Collects decision-boundary frames during training and writes them as a GIF.

    Each frame evaluates the model once on a fixed grid and keeps only the probability
    array (float32), so collecting 40 frames costs 40 forward passes over
    ``resolution ** 2`` points and a few megabytes; rendering happens once, at the end,
    on a single reused figure.

    Parameters
    ----------
    X_train : ndarray, shape (n_train, 2)
    y_train : ndarray, shape (n_train,)
    X_test, y_test : ndarray, shape (n_test, 2) and (n_test,), optional
    resolution : int
        Grid size along each axis.

    Examples
    --------
    >>> anim = BoundaryAnimation(X_tr, y_tr, X_te, y_te)                # doctest: +SKIP
    >>> anim.add_frame(model.predict_proba, 0)                          # doctest: +SKIP
    >>> cb = anim.callback(model.predict_proba, frame_epochs(300))        # doctest: +SKIP
    >>> fit(model, X_tr, y_tr, epochs=300, callbacks=[cb])               # doctest: +SKIP
    >>> anim.save_gif("boundary.gif")                                   # doctest: +SKIP
    """

    def __init__(
        self,
        X_train: np.ndarray,
        y_train: np.ndarray,
        X_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
        resolution: int = 100,
        *,
        class_names: Sequence[str] | None = None,
        feature_names: Sequence[str] = ("x1", "x2"),
    ) -> None:
        train = _pair(X_train, y_train, "X_train", "y_train")
        assert train is not None
        self.train = train
        self.test = _pair(X_test, y_test, "X_test", "y_test")
        cover = train[0] if self.test is None else np.vstack([train[0], self.test[0]])
        self.grid = boundary_grid(cover, resolution=resolution)
        self.class_names = class_names
        self.feature_names = tuple(feature_names)
        self.epochs: list[int] = []
        self.metrics: list[dict[str, float]] = []
        self.frames: list[np.ndarray] = []  # (res, res) P(class 1) or (res, res, k)

    def __len__(self) -> int:
        return len(self.frames)

    def add_frame(
        self,
        predict_proba: ProbaSource,
        epoch: int,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Evaluate the model on the grid (one vectorised call) and store the result.

        Parameters
        ----------
        predict_proba : callable or ndarray
            ``(n, 2) -> (n, k)``; called now, so a model trained in place is captured
            as it is at this epoch.
        epoch : int
            Shown in the frame's title.
        metrics : mapping, optional
            Trainer metrics; ``train/loss``, ``test/loss``, ``train/accuracy`` and
            ``test/accuracy`` are shown in the title when present.
        """
        D = _reduce(_evaluate(predict_proba, self.grid)).astype(np.float32)
        if self.frames and D.shape != self.frames[0].shape:
            raise ValueError(
                f"frame at epoch {epoch} has probability grid shape {D.shape}, "
                f"earlier frames have {self.frames[0].shape}; the class count must not change"
            )
        self.frames.append(D)
        self.epochs.append(int(epoch))
        self.metrics.append({
            k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float, np.number))
        })

    def callback(
        self, predict_proba: Callable[[np.ndarray], np.ndarray], epochs: Sequence[int]
    ) -> Callable[[int, Mapping[str, float]], None]:
        """A trainer callback ``cb(epoch, metrics)`` adding a frame at the given epochs.

        Parameters
        ----------
        predict_proba : callable
            Usually a bound method of the model being trained (evaluated at call time).
        epochs : sequence of int
            When to capture, e.g. ``frame_epochs(total_epochs)``.
        """
        wanted = {int(e) for e in epochs}

        def _capture(epoch: int, metrics: Mapping[str, float]) -> None:
            if epoch in wanted:
                self.add_frame(predict_proba, epoch, metrics)

        return _capture

    def save_gif(self, path: str | Path, fps: float = 8, *, dpi: int = 80,
                 hold_last: float = 1.5) -> Path:
        """Render all frames into an animated GIF.

        The frames are drawn by one :class:`BoundaryRenderer` (the figure is laid out and
        drawn once; each frame paints the probability image, the boundary, the points and
        the title). All frames share one palette so colours do not flicker, and what a
        frame leaves unchanged is written transparent, so it costs almost nothing.

        Parameters
        ----------
        path : str or Path
            Output file; parent directories are created.
        fps : float
            Frames per second (> 0).
        dpi : int
            Resolution of the rendered figure (the GIF is about 450 x 400 px at 80).
        hold_last : float
            Seconds the final frame stays on screen before the loop restarts.

        Returns
        -------
        Path
            The written file.
        """
        from PIL import Image

        if not self.frames:
            raise ValueError("no frames to save; call add_frame() during training first")
        if not (fps > 0):
            raise ValueError(f"fps must be > 0, got {fps!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        paint = self._frame_painter(dpi)
        n = len(self.frames)
        first, last = paint(0), paint(n - 1)

        # One palette for all frames, built from the first and last frame (the extremes
        # of the colour range), and applied without dithering: faster, smaller, no flicker.
        w, h = first.size
        probe = Image.new("RGB", (w, 2 * h))
        probe.paste(first, (0, 0))
        probe.paste(last, (0, h))
        palette = probe.quantize(colors=_GIF_COLOURS, method=Image.Quantize.MEDIANCUT)
        # Pillow maps a colour to the palette through a cache of cells about 8 levels wide,
        # so the figure's white came out light grey (252) through a near-white entry of
        # its cell: entries within 8 levels of white (or black) are made exact.
        rgb = np.array(palette.getpalette()[: 3 * _GIF_COLOURS], dtype=np.int16).reshape(-1, 3)
        for exact in (255, 0):
            rgb[np.abs(rgb - exact).max(axis=1) <= 8] = exact
        palette.putpalette(rgb.astype(np.uint8).tobytes())
        # Each frame is quantised as soon as it is drawn, so one RGB picture (0.5 MB) is
        # alive at a time instead of all of them: in a fresh process, new memory costs
        # about as much as drawing.
        rgb_frames = (first if i == 0 else last if i == n - 1 else paint(i) for i in range(n))
        frames = _unchanged_transparent(
            im.quantize(palette=palette, dither=Image.Dither.NONE) for im in rgb_frames
        )

        step_ms = int(round(1000.0 / fps))
        durations = [step_ms] * len(frames)
        durations[-1] = max(step_ms, int(round(1000.0 * hold_last)))
        # optimize=False: Pillow's palette optimisation would give each frame its own
        # palette and then compare frames in RGBA to find what changed, which costs
        # three times the encoding; _unchanged_transparent did that comparison already.
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:],
                       duration=durations, loop=0, disposal=1, optimize=False,
                       transparency=_GIF_COLOURS)
        return path

    def _title(self, i: int) -> str:
        text = _metrics_text(self.metrics[i])
        return f"epoch {self.epochs[i]}" + (f"\n{text}" if text else "\n ")

    def _frame_painter(self, dpi: int) -> Callable[[int], Any]:
        """``paint(i)``: frame ``i`` as an RGB PIL image, all drawn on one renderer's
        figure, in any order."""
        titles = [self._title(i) for i in range(len(self.frames))]
        renderer = BoundaryRenderer(
            *self.train, *(self.test or (None, None)), grid=self.grid,
            class_names=self.class_names, feature_names=self.feature_names, dpi=dpi,
            marker_size=4.0, title_size="medium",
        )
        # The longest title makes the room in the layout, so that no frame overflows it.
        reserve = max(titles, key=len)
        return lambda i: renderer._render(self.frames[i], titles[i], reserve)

    def _render_frames(self, dpi: int) -> list[Any]:
        """One RGB PIL image per frame, all drawn on one renderer's figure."""
        paint = self._frame_painter(dpi)
        return [paint(i) for i in range(len(self.frames))]


# ------------------------------------------------------------------- sweeps and reports


class SweepPanel(NamedTuple):
    """One job of a sweep for :func:`plot_small_multiples`.

    Attributes
    ----------
    row, col : Any
        The job's values of the two swept parameters.
    proba : callable, ndarray or None
        The trained model's ``predict_proba`` or its probabilities on the grid
        (``None`` for a failed job).
    text : str
        Shown in the panel, e.g. ``"test acc 0.96"`` or the failure reason.
    failed : bool
        Draw the panel empty and marked FAILED.
    """

    row: Any
    col: Any
    proba: ProbaSource | None = None
    text: str = ""
    failed: bool = False


def _key(v: Any) -> Any:
    """A hashable, comparable stand-in for a swept value ([16, 16] -> (16, 16))."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(_key(x) for x in v)
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)  # 16.0 from a pandas column and 16 from a config are the same job
    return v


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


def _ordered_values(values: Sequence[Any]) -> list[Any]:
    """Distinct values: numerically sorted when all numeric, else in order of appearance
    (which is the order the user wrote in the sweep command)."""
    seen: dict[Any, Any] = {}
    for v in values:
        seen.setdefault(_key(v), v)
    keys = list(seen)
    if all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in keys):
        keys.sort()
    return [seen[k] for k in keys]


def plot_small_multiples(
    panels: Sequence[SweepPanel | tuple[Any, ...]],
    row_values: Sequence[Any],
    col_values: Sequence[Any],
    row_label: str,
    col_label: str,
    X: np.ndarray,
    y: np.ndarray,
    *,
    resolution: int = 100,
    title: str = "",
    panel_size: float = 2.3,
) -> Figure:
    """Final decision boundaries of a two-parameter sweep, one panel per job, on its grid.

    Parameters
    ----------
    panels : sequence of SweepPanel or tuple
        ``(row_value, col_value, proba, text, failed)``; the last two may be omitted.
        ``proba`` is a ``predict_proba`` callable or probabilities on
        ``boundary_grid(X, resolution)``.
    row_values, col_values : sequence
        Values of the two swept parameters in display order (rows top to bottom).
    row_label, col_label : str
        Parameter names, e.g. ``"model.hidden_sizes"``, ``"optimizer.lr"``.
    X : ndarray, shape (n, 2)
        Points drawn in every panel (usually the training set); also defines the grid.
    y : ndarray, shape (n,)
    resolution : int
        Grid size along each axis.
    title : str
    panel_size : float
        Inches per panel.

    Returns
    -------
    Figure
        ``len(row_values) * len(col_values)`` panel axes first, in row-major order
        (a cell without a job is left blank and says so), then a shared colour bar when
        every drawn panel is a two-class model.
    """
    data = _pair(X, y, "X", "y")
    assert data is not None
    if not row_values or not col_values:
        raise ValueError("row_values and col_values must each list at least one value")
    row_index = {_key(v): i for i, v in enumerate(row_values)}
    col_index = {_key(v): j for j, v in enumerate(col_values)}
    cells: dict[tuple[int, int], SweepPanel] = {}
    for raw in panels:
        p = raw if isinstance(raw, SweepPanel) else SweepPanel(*raw)
        if _key(p.row) not in row_index:
            raise ValueError(f"panel row value {p.row!r} is not in row_values {list(row_values)}")
        if _key(p.col) not in col_index:
            raise ValueError(f"panel col value {p.col!r} is not in col_values {list(col_values)}")
        cell = (row_index[_key(p.row)], col_index[_key(p.col)])
        if cell in cells:
            raise ValueError(
                f"two panels for {row_label}={p.row!r}, {col_label}={p.col!r}; a third swept "
                "parameter or replicas need one figure per value (or pick one job per cell)"
            )
        cells[cell] = p

    grid = boundary_grid(data[0], resolution=resolution)
    nr, nc = len(row_values), len(col_values)
    fig = _new_figure((panel_size * nc + 1.2, panel_size * nr + 0.6))
    axes = np.atleast_2d(fig.subplots(nr, nc, sharex=True, sharey=True, squeeze=False))
    drawn: list[_BoundaryLayer] = []
    colours = None
    for i in range(nr):
        for j in range(nc):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{col_label} = {_fmt_value(col_values[j])}", fontsize="medium")
            if j == 0:
                ax.set_ylabel(f"{row_label} = {_fmt_value(row_values[i])}", fontsize="medium")
            p = cells.get((i, j))
            if p is None:
                ax.set_facecolor("0.97")
                ax.text(0.5, 0.5, "no run", transform=ax.transAxes, ha="center",
                        va="center", color="0.5")
                continue
            if p.failed or p.proba is None:
                _mark_failed(ax, p.text)
                continue
            D = _reduce(_evaluate(p.proba, grid))
            n_classes = max(2 if D.ndim == 2 else D.shape[-1], int(data[1].max()) + 1)
            colours = _class_colours(n_classes)
            drawn.append(_BoundaryLayer(ax, grid, D, colours))
            _scatter_points(ax, data, None, colours, size=2.2)
            ax.set_xlim(drawn[-1].image.get_extent()[:2])
            ax.set_ylim(drawn[-1].image.get_extent()[2:])
            if p.text:
                ax.text(0.03, 0.03, p.text, transform=ax.transAxes, fontsize="small",
                        va="bottom", ha="left", zorder=4,
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
    if drawn and all(layer.binary for layer in drawn):
        cb = fig.colorbar(drawn[0].image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        cb.set_label("P(class 1)")
    if title:
        fig.suptitle(title)
    return fig


def _mark_failed(ax: Axes, reason: str = "") -> None:
    ax.set_facecolor("#fbeaea")
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, hatch="///",
                           edgecolor="#e3a5a5", linewidth=0))
    ax.text(0.5, 0.55, "FAILED", transform=ax.transAxes, ha="center", va="center",
            color="#b2182b", fontweight="bold", fontsize="large")
    if reason:
        ax.text(0.5, 0.35, reason, transform=ax.transAxes, ha="center", va="center",
                fontsize="x-small", color="#7f0000", wrap=True)


def _failed_series(table: pd.DataFrame, failed_mask: Any) -> pd.Series:
    if failed_mask is None:
        return pd.Series(False, index=table.index)
    mask = pd.Series(np.asarray(failed_mask, dtype=bool).reshape(-1), index=table.index) \
        if not isinstance(failed_mask, pd.Series) else failed_mask.reindex(table.index)
    if len(mask) != len(table):
        raise ValueError(f"failed_mask has {len(mask)} entries, table has {len(table)} rows")
    return mask.fillna(False).astype(bool)


def _check_columns(table: pd.DataFrame, **columns: str | None) -> None:
    for arg, name in columns.items():
        if name is not None and name not in table.columns:
            raise ValueError(
                f"{arg}={name!r} is not a column of the table; columns: {list(table.columns)}"
            )


_AGGREGATES = ("mean", "median", "min", "max")


def _cell_matrix(
    table: pd.DataFrame, failed: pd.Series, row: str, col: str, value: str,
    rows: list[Any], cols: list[Any], agg: str | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, failed, n_jobs) matrices, shape (len(rows), len(cols))."""
    ri = {_key(v): i for i, v in enumerate(rows)}
    ci = {_key(v): j for j, v in enumerate(cols)}
    buckets: dict[tuple[int, int], list[float]] = {}
    n_failed = np.zeros((len(rows), len(cols)), dtype=int)
    n_jobs = np.zeros((len(rows), len(cols)), dtype=int)
    for r, c, v, f in zip(table[row], table[col], table[value], failed, strict=True):
        cell = (ri[_key(r)], ci[_key(c)])
        n_jobs[cell] += 1
        if f:
            n_failed[cell] += 1
        else:
            buckets.setdefault(cell, []).append(float(v))
    M = np.full((len(rows), len(cols)), np.nan)
    has_value = np.zeros(M.shape, dtype=bool)
    for cell, vals in buckets.items():
        if len(vals) > 1 and agg is None:
            raise ValueError(
                f"{len(vals)} jobs share {row}={_fmt_value(rows[cell[0]])}, "
                f"{col}={_fmt_value(cols[cell[1]])}; pass agg= one of {_AGGREGATES} "
                "(e.g. over seeds) or facet by the extra parameter with plot_sweep_facets"
            )
        has_value[cell] = True
        with np.errstate(all="ignore"):
            M[cell] = float(pd.Series(vals).agg(agg or "mean"))
    # A cell counts as failed only when a job in it failed and none produced a value.
    return M, (n_failed > 0) & ~has_value, n_jobs


def _draw_heatmap(
    ax: Axes, M: np.ndarray, F: np.ndarray, rows: list[Any], cols: list[Any],
    row: str, col: str, norm: Normalize, cmap: Any, best: np.ndarray, fmt: str,
) -> Any:
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, norm=norm, aspect="auto",
                   interpolation="nearest")
    ax.set_facecolor("0.95")  # cells without a value show the axes background
    ax.set_xticks(range(len(cols)), [_fmt_value(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_fmt_value(r) for r in rows])
    ax.set_xlabel(col)
    ax.set_ylabel(row)
    ax.tick_params(length=0)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if F[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#fbeaea",
                                       hatch="///", edgecolor="#b2182b", linewidth=0))
                ax.text(j, i, "FAILED", ha="center", va="center", color="#b2182b",
                        fontweight="bold", fontsize="small")
            elif np.isfinite(M[i, j]):
                # Dark text on light cells and vice versa, by the cell colour's luminance.
                r, g, b, _ = cmap(norm(M[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
                ax.text(j, i, format(M[i, j], fmt), ha="center", va="center",
                        color="k" if dark else "w", fontsize="small",
                        fontweight="bold" if best[i, j] else "normal")
            else:
                ax.text(j, i, "–", ha="center", va="center", color="0.5")
            if best[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="k",
                                       linewidth=3.0, zorder=5))
    # Spines off, white gaps between cells: the grid reads as a table.
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="w", linewidth=2)
    ax.tick_params(which="minor", length=0)
    return im


def _position(values: list[Any], value: Any) -> int:
    return next(i for i, v in enumerate(values) if _key(v) == _key(value))


def _best_mask(M: np.ndarray, higher_is_better: bool) -> np.ndarray:
    if not np.any(np.isfinite(M)):
        return np.zeros(M.shape, dtype=bool)
    target = np.nanmax(M) if higher_is_better else np.nanmin(M)
    # Ties (several cells at 100 % accuracy) are all outlined: choosing one would be arbitrary.
    return np.isfinite(M) & np.isclose(M, target, rtol=0, atol=1e-12)


def plot_sweep_heatmap(
    table: pd.DataFrame,
    row: str,
    col: str,
    value: str,
    *,
    failed_mask: Any = None,
    higher_is_better: bool = True,
    agg: str | None = None,
    fmt: str = ".3f",
    title: str | None = None,
    cmap: str = "viridis",
    best_job: int | None = None,
    best_by: str | None = None,
) -> Figure:
    """A metric over a two-parameter sweep as an annotated heatmap.

    Parameters
    ----------
    table : DataFrame
        One row per job, with columns ``row``, ``col`` and ``value``.
    row, col : str
        The swept parameters (columns) laid out on the y and x axes. Numeric values are
        sorted; other values (e.g. ``[16, 16]``) keep their order of appearance.
    value : str
        The metric column, e.g. ``"test/accuracy"``.
    failed_mask : bool array-like or Series, optional
        True for jobs that failed (length ``len(table)``); their cells are hatched and
        marked FAILED.
    higher_is_better : bool
        Whether the best cell (outlined) is the maximum or the minimum.
    agg : {"mean", "median", "min", "max"}, optional
        How to combine several jobs in one cell (e.g. seeds). Without it, duplicates
        raise ``ValueError`` rather than being silently averaged.
    fmt : str
        Format spec of the cell annotations.
    title : str, optional
    cmap : str
        Colour map (reversed automatically when lower is better, so "good" is always
        the same colour).
    best_job, best_by : int and str, optional
        The position in ``table`` of the sweep's best job and the metric it was chosen
        by: its cell is outlined, whatever this figure's metric says (one definition of
        "best" across a report). Without it the best cell of ``value`` is outlined.

    Returns
    -------
    Figure
        The heatmap axes and its colour bar.
    """
    _check_columns(table, row=row, col=col, value=value)
    if agg is not None and agg not in _AGGREGATES:
        raise ValueError(f"agg={agg!r} is not allowed; use one of {_AGGREGATES} or None")
    failed = _failed_series(table, failed_mask)
    rows, cols = _ordered_values(list(table[row])), _ordered_values(list(table[col]))
    M, F, _ = _cell_matrix(table, failed, row, col, value, rows, cols, agg)
    cm = colormaps[cmap] if higher_is_better else colormaps[cmap].reversed()
    finite = M[np.isfinite(M)]
    norm = Normalize(*(finite.min(), finite.max()) if finite.size else (0.0, 1.0))
    fig = _new_figure((1.1 * len(cols) + 2.8, 0.7 * len(rows) + 1.8))
    ax = fig.add_subplot()
    if best_job is None:
        best, outlined = _best_mask(M, higher_is_better), "best outlined"
    else:
        best = np.zeros(M.shape, dtype=bool)
        job = table.iloc[int(best_job)]
        best[_position(rows, job[row]), _position(cols, job[col])] = True
        outlined = f"best by {best_by} outlined" if best_by else "best outlined"
    im = _draw_heatmap(ax, M, F, rows, cols, row, col, norm, cm, best, fmt)
    fig.colorbar(im, ax=ax, label=value)
    ax.set_title(title if title is not None else
                 f"{value}{' (' + agg + ')' if agg else ''}: "
                 f"{'higher' if higher_is_better else 'lower'} is better, {outlined}",
                 fontsize="medium")
    return fig


def plot_sweep_facets(
    table: pd.DataFrame,
    row: str,
    col: str,
    facet: str,
    value: str,
    *,
    failed_mask: Any = None,
    higher_is_better: bool = True,
    agg: str | None = None,
    fmt: str = ".3f",
    cmap: str = "viridis",
    max_cols: int = 3,
) -> Figure:
    """A three-parameter sweep: one heatmap of ``row`` x ``col`` per value of ``facet``.

    All panels share one colour scale, and the best cell of the whole sweep is outlined
    (ties included), so panels can be compared directly. Parameters are as in
    :func:`plot_sweep_heatmap`; ``max_cols`` panels per figure row.

    Returns
    -------
    Figure
        One axes per facet value (plus unused blank slots hidden) and a shared colour bar.
    """
    _check_columns(table, row=row, col=col, facet=facet, value=value)
    if agg is not None and agg not in _AGGREGATES:
        raise ValueError(f"agg={agg!r} is not allowed; use one of {_AGGREGATES} or None")
    failed = _failed_series(table, failed_mask)
    rows, cols = _ordered_values(list(table[row])), _ordered_values(list(table[col]))
    facets = _ordered_values(list(table[facet]))
    keys = table[facet].map(_key)
    mats = []
    for fv in facets:
        sel = (keys == _key(fv)).to_numpy()
        mats.append(_cell_matrix(table[sel], failed[sel], row, col, value, rows, cols, agg)[:2])
    allM = np.stack([m for m, _ in mats])
    best = _best_mask(allM, higher_is_better)
    finite = allM[np.isfinite(allM)]
    norm = Normalize(*(finite.min(), finite.max()) if finite.size else (0.0, 1.0))
    cm = colormaps[cmap] if higher_is_better else colormaps[cmap].reversed()
    ncols = min(max_cols, len(facets))
    nrows = math.ceil(len(facets) / ncols)
    fig = _new_figure(((1.0 * len(cols) + 1.6) * ncols + 1.2, (0.65 * len(rows) + 1.4) * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    im = None
    for k, fv in enumerate(facets):
        M, F = mats[k]
        im = _draw_heatmap(axes[k], M, F, rows, cols, row, col, norm, cm, best[k], fmt)
        axes[k].set_title(f"{facet} = {_fmt_value(fv)}", fontsize="medium")
    for ax in axes[len(facets):]:
        ax.remove()
    fig.colorbar(im, ax=list(axes[: len(facets)]), label=value, fraction=0.03)
    fig.suptitle(f"{value}: {'higher' if higher_is_better else 'lower'} is better, "
                 "best of the sweep outlined", fontsize="medium")
    return fig


def plot_sweep_lines(
    table: pd.DataFrame,
    x: str,
    value: str,
    hue: str | None = None,
    *,
    failed_mask: Any = None,
    higher_is_better: bool = True,
    title: str | None = None,
    spread: str | None = None,
) -> Figure:
    """A metric against one swept parameter, one line per value of ``hue``.

    Several jobs at the same point (e.g. seeds) are drawn as their mean with a band of
    +/- one standard deviation, so a difference can be told from seed noise; a point of
    one job whose ``spread`` column holds the standard deviation across its replicas
    (``trainer.replicas``) gets that band. Failed jobs
    are marked with a red x on the x axis. A numeric, positive ``x`` spanning two decades
    or more (a learning rate) gets a log axis; non-numeric values are categories.

    Parameters
    ----------
    table : DataFrame
        One row per job.
    x, value : str
        The swept parameter and the metric columns.
    hue : str, optional
        A second parameter, one line per value.
    failed_mask : bool array-like, optional
        True for failed jobs.
    higher_is_better : bool
        The best point is circled.
    title : str, optional
    spread : str, optional
        A column with each job's standard deviation of ``value`` across its replicas.

    Returns
    -------
    Figure
        One axes.
    """
    _check_columns(table, x=x, value=value, hue=hue)
    failed = _failed_series(table, failed_mask)
    xs = _ordered_values(list(table[x]))
    numeric = all(isinstance(_key(v), (int, float)) and not isinstance(_key(v), bool)
                  for v in xs)
    pos = {_key(v): (float(_key(v)) if numeric else float(i)) for i, v in enumerate(xs)}
    hues = _ordered_values(list(table[hue])) if hue else [None]

    fig = _new_figure((6.4, 4.2))
    ax = fig.add_subplot()
    best_val, best_xy = None, None
    banded = False  # the first band gets the legend entry
    for n, hv in enumerate(hues):
        sel = np.ones(len(table), dtype=bool) if hue is None else \
            (table[hue].map(_key) == _key(hv)).to_numpy()
        ok = sel & ~failed.to_numpy() & np.isfinite(table[value].to_numpy(dtype=float))
        sub = pd.DataFrame({"x": [pos[_key(v)] for v in table[x][ok]],
                            "v": table[value][ok].to_numpy(dtype=float),
                            "s": (table[spread][ok].to_numpy(dtype=float) if spread
                                  else np.nan)})
        if sub.empty:
            continue
        stats = sub.groupby("x").agg(mean=("v", "mean"), std=("v", "std"),
                                     count=("v", "count"), within=("s", "mean")).sort_index()
        # Seeds as separate jobs: their spread; one replicated job: its replicas' spread.
        sd = stats["std"].where(stats["count"] > 1, stats["within"])
        label = None if hue is None else f"{hue} = {_fmt_value(hv)}"
        line, = ax.plot(stats.index, stats["mean"], marker="o", color=f"C{n % 10}", label=label)
        if sd.notna().any():
            sd = sd.fillna(0.0)
            ax.fill_between(stats.index, stats["mean"] - sd, stats["mean"] + sd,
                            color=line.get_color(), alpha=0.2, linewidth=0,
                            label=None if banded else "± 1 sd across seeds")
            banded = True
        i = stats["mean"].idxmax() if higher_is_better else stats["mean"].idxmin()
        v = stats["mean"][i]
        if best_val is None or (v > best_val if higher_is_better else v < best_val):
            best_val, best_xy = v, (i, v)
    fx = [pos[_key(v)] for v in table[x][failed.to_numpy()]]
    if fx:
        ax.plot(fx, [0.0] * len(fx), ls="", marker="x", color="#b2182b", ms=9, mew=2,
                clip_on=False, transform=ax.get_xaxis_transform(), label="failed", zorder=5)
    if best_xy is not None:
        ax.plot(*best_xy, ls="", marker="o", ms=15, mfc="none", mec="k", mew=2, label="best")
    if numeric:
        vals = np.array([pos[_key(v)] for v in xs])
        if vals.size and vals.min() > 0 and vals.max() / vals.min() >= 100:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(xs)), [_fmt_value(v) for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel(value)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.set_title(title if title is not None else f"{value} vs {x}", fontsize="medium")
    return fig


def _replica_probas(predict_probas: Any, grid: Grid) -> np.ndarray:
    """(K, ny, nx, k) probabilities of K replicas on the grid."""
    xx, _, points = grid
    if callable(predict_probas) or isinstance(predict_probas, np.ndarray):
        # One call for all replicas: a stacked model may return (K, n, k) directly.
        stacked = np.asarray(
            predict_probas(points) if callable(predict_probas) else predict_probas, dtype=float
        )
        if stacked.ndim < 3:
            raise ValueError(
                f"a single predict_probas must give (K, n, k) for K replicas, got shape "
                f"{stacked.shape}; pass a list of per-replica callables instead"
            )
        return np.stack([_proba_array(s, points.shape[0], xx.shape) for s in stacked])
    return np.stack([_evaluate(p, grid) for p in predict_probas])


def plot_replica_boundary(
    predict_probas: Sequence[ProbaSource] | Callable[[np.ndarray], np.ndarray] | np.ndarray,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    title: str = "",
    grid: Grid | None = None,
    resolution: int = 150,
    disagreement_levels: Sequence[float] = (0.1, 0.25),
    class_names: Sequence[str] | None = None,
    feature_names: Sequence[str] = ("x1", "x2"),
) -> Figure:
    """Replicas of one configuration: their mean boundary and where they disagree.

    Left panel: the mean prediction of the K replicas (coloured as in
    :func:`plot_decision_boundary`), each replica's own boundary as a thin line, and the
    regions where the replicas disagree hatched. Right panel: the disagreement itself.
    Where the lines bundle and nothing is hatched the boundary is a property of the
    configuration; where they fan out it is the luck of the initialisation.

    Disagreement is the standard deviation across replicas of the probability of the
    class that the mean prediction picks (for two classes: the std of P(class 1)).

    Parameters
    ----------
    predict_probas : sequence of callables/arrays, callable, or ndarray
        K ``predict_proba`` callables (or their grid probabilities); or one callable
        returning ``(K, n, k)`` for a stacked replica model; or an array ``(K, n, k)``
        / ``(K, res, res, k)`` already evaluated on ``grid``.
    X_train, y_train, X_test, y_test : ndarray
        As in :func:`plot_decision_boundary`.
    title : str
    grid : (xx, yy, points), optional
        From :func:`boundary_grid`; by default over train and test at ``resolution``.
    resolution : int
    disagreement_levels : (float, float)
        Std thresholds of the light (dots) and dense (hatch) shading.
    class_names, feature_names : sequence of str, optional

    Returns
    -------
    Figure
        Two panels, each with a colour bar.
    """
    train = _pair(X_train, y_train, "X_train", "y_train")
    test = _pair(X_test, y_test, "X_test", "y_test")
    lo, hi = (float(v) for v in disagreement_levels)
    if not 0 < lo < hi:
        raise ValueError(f"disagreement_levels must be two increasing positive numbers, "
                         f"got {tuple(disagreement_levels)}")
    if grid is None:
        cover = train[0] if test is None else np.vstack([train[0], test[0]])
        grid = boundary_grid(cover, resolution=resolution)
    R = _replica_probas(predict_probas, grid)  # (K, ny, nx, k)
    if R.shape[0] < 2:
        raise ValueError(f"need at least 2 replicas to measure disagreement, got {R.shape[0]}")
    xx, yy, _ = grid
    mean = R.mean(axis=0)  # (ny, nx, k)
    pick = np.argmax(np.nan_to_num(mean, nan=-1.0), axis=-1)
    spread = np.take_along_axis(R, pick[None, ..., None], axis=-1)[..., 0].std(axis=0)

    n_labels = max(int(train[1].max()), -1 if test is None else int(test[1].max())) + 1
    n_classes = max(R.shape[-1], n_labels)
    colours = _class_colours(n_classes)
    names = _class_names(class_names, n_classes)
    fig = _new_figure((11.5, 5.0))
    ax, ax_d = fig.subplots(1, 2, sharex=True, sharey=True)
    layer = _BoundaryLayer(ax, grid, _reduce(mean), colours)
    # Regions where replicas disagree, hatched over the mean.
    top = max(hi * 2, float(np.nanmax(spread)) + 1e-9)
    shade_args = dict(levels=[lo, hi, top], colors="none", hatches=["..", "////"], zorder=2.5)
    if hasattr(LineCollection, "set_hatchcolor"):  # matplotlib >= 3.10: per-artist styling
        shade = ax.contourf(xx, yy, spread, **shade_args)
        shade.set_hatchcolor(_HATCH_COLOUR)
        shade.set_hatch_linewidth(0.7)
    else:  # older matplotlib reads the hatch style from rcParams (global: not thread-safe)
        with matplotlib.rc_context({"hatch.color": _HATCH_COLOUR, "hatch.linewidth": 0.7}):
            ax.contourf(xx, yy, spread, **shade_args)
    # Each replica's own boundary on top: where the lines bundle the boundary is a
    # property of the configuration, where they fan out it is initialisation luck.
    replica_lines = [seg for r in R for seg in _boundary_segments(xx, yy, _reduce(r))]
    ax.add_collection(LineCollection(replica_lines, colors="0.1", linewidths=0.8, alpha=0.6,
                                     zorder=2.7, label="replica boundaries"), autolim=False)
    _scatter_points(ax, train, test, colours)
    ext = layer.image.get_extent()
    ax.set_xlim(ext[:2])
    ax.set_ylim(ext[2:])
    ax.set_xlabel(feature_names[0])
    ax.set_ylabel(feature_names[1])
    ax.set_title(f"mean of {R.shape[0]} replicas", fontsize="medium")
    if layer.binary:
        fig.colorbar(layer.image, ax=ax, fraction=0.05, pad=0.02, label=f"mean P({names[1]})")
    handles = [Line2D([], [], ls="", marker="s", ms=8, mfc=colours[i], mec="none", label=n)
               for i, n in enumerate(names)]
    handles += [
        Line2D([], [], color="0.1", lw=0.8, alpha=0.6, label="each replica"),
        Rectangle((0, 0), 1, 1, fill=False, hatch="..", ec=_HATCH_COLOUR, label=f"std > {lo:g}"),
        Rectangle((0, 0), 1, 1, fill=False, hatch="////", ec=_HATCH_COLOUR,
                  label=f"std > {hi:g}"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=min(len(handles), 4), frameon=False, fontsize="small")

    # The disagreement alone, on a sequential map: 0 (all replicas agree) to 0.5 (the
    # largest std a probability can have).
    im = ax_d.imshow(np.ma.masked_invalid(spread), cmap=colormaps["magma_r"],
                     norm=Normalize(0.0, 0.5), origin="lower", extent=ext, aspect="auto",
                     interpolation="bilinear")
    ax_d.contour(xx, yy, spread, levels=[lo, hi], colors="k", linewidths=[0.6, 1.2])
    ax_d.scatter(train[0][:, 0], train[0][:, 1], s=6, c="0.5", linewidths=0, alpha=0.6)
    ax_d.set_xlabel(feature_names[0])
    ax_d.set_title("disagreement between replicas (std of p)", fontsize="medium")
    fig.colorbar(im, ax=ax_d, fraction=0.05, pad=0.02, label="std across replicas")
    if title:
        fig.suptitle(title)
    return fig


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as a PNG file's bytes, encoded like :func:`save_figure` writes it (the
    same pixels as ``savefig``, zlib level 1), for a picture written to several places."""
    import io

    buffer = io.BytesIO()
    if isinstance(fig.canvas, FigureCanvasAgg):
        _figure_image(fig, dpi).save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    else:
        fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a figure to ``path`` (format from the suffix) and release it.

    Parent directories are created. If the figure was made through pyplot it is closed
    there too, so long sweeps do not accumulate open figures. A PNG of an Agg figure is
    written from the drawn canvas as RGB (when it is opaque) at zlib level 1: the same
    pixels as ``savefig``, encoded in about a third of the time of its RGBA at level 6.

    Returns
    -------
    Path
        The written file.
    """
    import sys

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png" and isinstance(fig.canvas, FigureCanvasAgg):
        save_image(_figure_image(fig, dpi), path)
    else:
        fig.savefig(path, dpi=dpi)
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:  # only if the caller already uses pyplot: never import it here
        plt.close(fig)
    return path
