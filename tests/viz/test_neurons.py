"""Per-unit pictures and the network drawing: the maps are the model's own activations."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline.engine.mlp import MLP  # noqa: E402
from pipeline.viz import neurons  # noqa: E402


def _model_and_points(sizes, seed=0):
    model = MLP(sizes, activation="tanh", output="sigmoid" if sizes[-1] == 1 else "softmax",
                seed=seed)
    X = np.random.default_rng(seed).normal(size=(50, 2))
    return model, X


def _hidden(model):
    return lambda P: model.forward_layers(P)[1][1:-1]


def test_each_map_is_its_units_activation_over_the_grid():
    model, X = _model_and_points([2, 3, 4, 1])
    grid = neurons.plane_grid(X, resolution=7)
    units = neurons.unit_maps(_hidden(model), grid)
    xx, yy, points = grid
    assert [m.shape for m in units.maps] == [(3, 7, 7), (4, 7, 7)]
    # Recompute by hand: layer 1, unit 2, at the grid point of row 5, column 1.
    x = np.array([xx[5, 1], yy[5, 1]])
    a1 = np.tanh(x @ model.weights[0] + model.biases[0])
    assert units.maps[0][2, 5, 1] == pytest.approx(a1[2])
    a2 = np.tanh(a1 @ model.weights[1] + model.biases[1])
    assert units.maps[1][3, 5, 1] == pytest.approx(a2[3])
    # One colour scale per layer: its largest absolute activation on the grid.
    A1 = np.tanh(points @ model.weights[0] + model.biases[0])
    assert units.scale[0] == pytest.approx(np.abs(A1).max())


def test_wide_layers_show_a_stated_evenly_spaced_subset():
    assert neurons.shown_units(10).tolist() == list(range(10))
    subset = neurons.shown_units(200)
    assert len(subset) == neurons.MAX_UNITS_SHOWN and subset[0] == 0 and subset[-1] == 199
    assert np.all(np.diff(subset) > 0)
    model, X = _model_and_points([2, 100, 1])
    units = neurons.unit_maps(_hidden(model), neurons.plane_grid(X, resolution=5))
    fig = neurons.plot_neurons(units, "wide")
    assert "layer 1: 64 of 100 units" in fig._suptitle.get_text()


@pytest.mark.parametrize("sizes", [[2, 3, 1], [2, 2, 1], [2, 8, 8, 3]])
def test_the_network_drawing_has_a_map_per_unit_an_edge_per_weight_and_the_output(sizes):
    from matplotlib.collections import LineCollection

    model, X = _model_and_points(sizes)
    units = neurons.unit_maps(_hidden(model), neurons.plane_grid(X, resolution=9))
    fig = neurons.plot_network(model.weights, units, model.predict_proba, "net",
                               feature_names=["a", "b"], activation_names=["tanh"] * 2)
    ax = fig.axes[0]
    n_hidden = sum(sizes[1:-1])
    assert len(ax.images) == n_hidden + 1  # one map per hidden unit, and the output
    edges = next(c for c in ax.collections if isinstance(c, LineCollection))
    n_weights = sum(W.size for W in model.weights[:-1]) + sizes[-2] * sizes[-1]
    assert len(edges.get_segments()) == n_weights
    texts = {t.get_text() for t in ax.texts}
    assert {"a", "b"} <= texts
    # Edge widths follow the magnitudes: the largest weight draws the widest line.
    W = np.concatenate([w.ravel() for w in model.weights])
    assert np.argmax(edges.get_linewidths()) == np.argmax(np.abs(W))
