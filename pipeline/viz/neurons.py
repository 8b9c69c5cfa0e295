"""What each hidden unit computes, and the network drawn: figures of the units over the plane.

A hidden unit of a network on 2-D inputs is a function of the plane: evaluated on a grid
of points it is a small picture, and the pictures of a layer show what that layer has
learned to detect (lines in the first layer, their combinations further in). Two figures:

- :func:`plot_neurons`: every hidden unit's activation over the input plane, one row of
  small maps per layer;
- :func:`plot_network`: the network as columns of units, each hidden unit showing its map,
  edges coloured by the weight's sign and as wide as its magnitude, the inputs named, the
  output showing the decision boundary.

Like :mod:`pipeline.viz.plots`, nothing here knows the engine: the model comes in as a
callable ``hidden_layers(points) -> [A_1, ..., A_{L-1}]`` (each ``(n_points, units)``,
the hidden activations for raw 2-D points) and plain weight matrices.

Colours: activations on a purple (positive) to orange (negative) diverging map, white at
zero, with one symmetric scale per layer so units of a layer compare directly; weights in
the same two colours. The output uses the boundary colours of :mod:`pipeline.viz.plots`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from pipeline.viz.plots import (
    _BINARY_CMAP,
    Grid,
    _class_colours,
    _evaluate,
    _new_figure,
    _reduce,
    _region_rgb,
    boundary_grid,
)

#: Hidden layers wider than this show an evenly spaced subset of their units (say so).
MAX_UNITS_SHOWN = 64
#: The diverging map of activations and weights: purple positive, orange negative.
UNIT_CMAP = "PuOr_r"

HiddenLayers = Callable[[np.ndarray], Sequence[np.ndarray]]


class UnitMaps(NamedTuple):
    """Hidden activations over a grid of the plane.

    ``maps[l]`` has shape ``(units shown, ny, nx)``; ``shown[l]`` the indices of those
    units in layer ``l + 1``; ``widths[l]`` the layer's full width; ``scale[l]`` the
    largest absolute activation of the layer (the colour scale is ``[-scale, scale]``).
    """

    maps: list[np.ndarray]
    shown: list[np.ndarray]
    widths: list[int]
    scale: list[float]
    grid: Grid


def shown_units(width: int, limit: int = MAX_UNITS_SHOWN) -> np.ndarray:
    """Which units of a layer are drawn: all of them, or ``limit`` evenly spaced ones."""
    if width <= limit:
        return np.arange(width)
    return np.unique(np.linspace(0, width - 1, limit).round().astype(int))


def unit_maps(hidden_layers: HiddenLayers, grid: Grid, limit: int = MAX_UNITS_SHOWN) -> UnitMaps:
    """Evaluate every hidden layer on the grid's points (one forward pass)."""
    xx, _, points = grid
    layers = [np.asarray(A, dtype=float) for A in hidden_layers(points)]
    maps, shown, widths, scale = [], [], [], []
    for A in layers:
        if A.ndim != 2 or A.shape[0] != points.shape[0]:
            raise ValueError(f"hidden_layers must give (n_points, units) arrays; got {A.shape}")
        keep = shown_units(A.shape[1], limit)
        # (n_points, units) -> (units, ny, nx): one picture per unit.
        maps.append(A[:, keep].T.reshape(len(keep), *xx.shape))
        shown.append(keep)
        widths.append(A.shape[1])
        finite = A[np.isfinite(A)]
        scale.append(float(np.abs(finite).max()) if finite.size else 1.0)
    return UnitMaps(maps, shown, widths, [s if s > 0 else 1.0 for s in scale], grid)


def _subset_note(units: UnitMaps) -> str:
    cut = [f"layer {i + 1}: {len(s)} of {w} units"
           for i, (s, w) in enumerate(zip(units.shown, units.widths, strict=True))
           if len(s) < w]
    return ("showing an evenly spaced subset (" + "; ".join(cut) + ")") if cut else ""


def plot_neurons(
    units: UnitMaps,
    title: str = "",
    *,
    activation_names: Sequence[str] | None = None,
    columns: int = 16,
) -> Figure:
    """Every hidden unit's activation over the input plane, one block of maps per layer.

    Parameters
    ----------
    units : UnitMaps
        From :func:`unit_maps`.
    title : str
        Figure title (the run's name and "before" or "after training").
    activation_names : sequence of str, optional
        Each hidden layer's activation, for the row labels.
    columns : int
        Maps per row within a layer; wider layers wrap onto more rows.
    """
    n_layers = len(units.maps)
    if n_layers == 0:
        raise ValueError("the network has no hidden layer: nothing to draw")
    rows = [max(1, -(-len(m) // columns)) for m in units.maps]
    cols = min(columns, max(len(m) for m in units.maps))
    cell = 0.62
    # Laid out by hand (no constrained layout): drawing is most of what the figure costs.
    fig = _new_figure((max(4.0, cols * cell + 1.6), sum(rows) * cell + 0.3 * n_layers + 0.8),
                      layout=None)
    fig.subplots_adjust(left=0.09, right=0.99, bottom=0.02, top=0.86, hspace=0.25)
    axes = fig.subplots(n_layers, 1, squeeze=False,
                        gridspec_kw={"height_ratios": [r + 0.4 for r in rows]})[:, 0]
    cmap = colormaps[UNIT_CMAP]
    for layer, ax in enumerate(axes):
        maps = units.maps[layer]
        ny, nx = maps.shape[1:]
        gap = max(2, nx // 5)  # a blank band above each row of maps holds their indices
        mosaic = np.full((rows[layer] * (ny + gap), cols * (nx + gap) - gap), np.nan)
        for j, picture in enumerate(maps):
            r, c = divmod(j, columns)
            top = r * (ny + gap) + gap
            # Row 0 of a grid is its lowest x2: flip so that up is up in the mosaic.
            mosaic[top: top + ny, c * (nx + gap): c * (nx + gap) + nx] = picture[::-1]
        s = units.scale[layer]
        ax.imshow(mosaic, cmap=cmap.with_extremes(bad="white"), vmin=-s, vmax=s,
                  interpolation="nearest")
        for j, index in enumerate(units.shown[layer]):
            r, c = divmod(j, columns)
            ax.text(c * (nx + gap), r * (ny + gap) + gap - 0.6, str(index), fontsize=5,
                    va="bottom", ha="left", color="0.3")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        name = f" ({activation_names[layer]})" if activation_names else ""
        ax.set_ylabel(f"layer {layer + 1}{name}\n|a| <= {s:.2g}", fontsize=8)
    note = _subset_note(units)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    return fig


def plot_network(
    weights: Sequence[np.ndarray],
    units: UnitMaps,
    predict_proba: Callable[[np.ndarray], np.ndarray],
    title: str = "",
    *,
    feature_names: Sequence[str] = ("x1", "x2"),
    activation_names: Sequence[str] | None = None,
) -> Figure:
    """The network as columns of units joined by its weights.

    Each hidden unit shows its activation map (:func:`unit_maps`), each input its name,
    the output the decision boundary over the same plane. An edge's colour is its weight's
    sign (purple positive, orange negative) and its width and opacity its magnitude
    relative to the largest weight of the network.
    """
    sizes = [weights[0].shape[0]] + [W.shape[1] for W in weights]
    if len(units.maps) != len(sizes) - 2:
        raise ValueError(f"{len(units.maps)} layers of maps for a network of sizes {sizes}")
    shown = [np.arange(sizes[0]), *units.shown, np.arange(1)]
    n_max = max(len(s) for s in shown)
    # Units sit 1 apart in a column; columns sit `gap` apart, wider for tall columns so
    # that the edges between them stay readable.
    gap = max(3.0, n_max / 3)
    height = max(n_max, 3) + 1.5
    width = gap * (len(sizes) - 1) + 2.5
    scale_in = min(0.42, 9.0 / height)
    fig = _new_figure((width * scale_in + 0.4, height * scale_in + (0.8 if title else 0.3)),
                      layout=None)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.88 if title else 0.96))
    box = 0.4  # half the side of a unit's square (units are 1 apart)

    def ys(n: int) -> np.ndarray:  # centred column of n units, 1 apart
        return (np.arange(n)[::-1] - (n - 1) / 2) * 1.0

    pos = [ys(len(s)) for s in shown]
    cmap = colormaps[UNIT_CMAP]
    top = float(max(np.max(np.abs(W)) for W in weights)) or 1.0
    lines, colours, widths = [], [], []
    for layer, W in enumerate(weights):
        rows_, cols_ = shown[layer], (shown[layer + 1] if layer + 1 < len(sizes) - 1
                                     else np.arange(W.shape[1]))
        dest = pos[layer + 1] if layer + 1 < len(sizes) - 1 else ys(1)
        for i, src in enumerate(rows_):
            for j, dst in enumerate(cols_):
                w = float(W[src, dst])
                strength = abs(w) / top
                y_out = dest[j] if len(cols_) == len(dest) else dest[0]
                lines.append([(layer * gap + box, pos[layer][i]),
                              ((layer + 1) * gap - box, y_out)])
                colours.append((*cmap(0.9 if w > 0 else 0.1)[:3], 0.15 + 0.75 * strength))
                widths.append(0.3 + 3.2 * strength)
    ax.add_collection(LineCollection(lines, colors=colours, linewidths=widths, zorder=1))

    for i, y in enumerate(pos[0]):  # inputs: named boxes
        ax.add_patch(_square(0, y, box, "0.92"))
        ax.text(0, y, feature_names[i] if i < len(feature_names) else f"x{i + 1}",
                ha="center", va="center", fontsize=8, zorder=3)
    for layer, maps in enumerate(units.maps):
        s = units.scale[layer]
        for j, picture in enumerate(maps):
            x, y = (layer + 1) * gap, pos[layer + 1][j]
            ax.imshow(picture, cmap=cmap, vmin=-s, vmax=s, origin="lower",
                      extent=(x - box, x + box, y - box, y + box), zorder=2,
                      interpolation="nearest")
            ax.add_patch(_square(x, y, box, "none"))
        label = f"layer {layer + 1}" + (f"\n{activation_names[layer]}" if activation_names
                                        else "")
        ax.text((layer + 1) * gap, pos[layer + 1][0] + box + 0.15, label, ha="center",
                va="bottom", fontsize=7)
    # The output: the decision boundary over the same plane.
    out_x = (len(sizes) - 1) * gap
    P = _evaluate(predict_proba, units.grid)
    D = _reduce(P)
    image = (_region_rgb(P, _class_colours(P.shape[-1])) if D.ndim == 3
             else _BINARY_CMAP(D)[..., :3])
    ax.imshow(image, origin="lower", extent=(out_x - 1.6 * box, out_x + 1.6 * box,
                                             -1.6 * box, 1.6 * box), zorder=2)
    ax.add_patch(_square(out_x, 0, 1.6 * box, "none"))
    ax.text(out_x, 1.6 * box + 0.15, f"output\n{sizes[-1]} unit{'s' * (sizes[-1] > 1)}",
            ha="center", va="bottom", fontsize=7)
    span = max(n_max, 3) / 2
    ax.set_xlim(-0.8, out_x + 1.6 * box + 0.3)
    ax.set_ylim(-span - 0.3, span + 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    note = _subset_note(units)
    if title or note:
        fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    return fig


def _square(x: float, y: float, half: float, face: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - half, y - half), 2 * half, 2 * half, facecolor=face,
                     edgecolor="0.35", linewidth=0.6, zorder=3 if face == "none" else 1.5)


def plane_grid(X: np.ndarray, resolution: int = 40) -> Grid:
    """The grid the unit maps are drawn on: the data's plane, coarser than the boundary's."""
    return boundary_grid(X, resolution=resolution)


__all__ = ["MAX_UNITS_SHOWN", "UnitMaps", "plane_grid", "plot_network", "plot_neurons",
           "shown_units", "unit_maps"]
