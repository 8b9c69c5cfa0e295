"""The run explorer: one self-contained HTML page that plays a training run back.

During training, :class:`ExplorerRecorder` (a training callback) records frames at the
epochs of the boundary animation: the decision boundary over the plane, every shown hidden
unit's activation map, and the weights. :meth:`ExplorerRecorder.html` writes them, with the
loss and accuracy curves, into one HTML file: an epoch slider and a play button drive the
boundary, the network drawing (units with their maps, edges coloured by the weights' signs
and as wide as their magnitudes) and a cursor on the curves; hovering a unit enlarges its
map. Plain HTML, CSS and JavaScript on canvases, with the data inline: no network access
and no external script, so it opens from MLflow's artifact view or from disk.

Size: pictures are stored as bytes (the boundary as a small RGB image, unit maps as 8-bit
values on a per-layer scale, weights as 8-bit values on a per-frame scale), base64-encoded
in the page: about 1 MB for a default run (16x16 units, 41 frames). The resolution of the
unit maps shrinks for wide networks so that a frame stays within :data:`UNIT_BYTES`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
from matplotlib import colormaps

from pipeline.viz.neurons import UNIT_CMAP, HiddenLayers, shown_units, unit_maps
from pipeline.viz.plots import (
    _BINARY_CMAP,
    _class_colours,
    _evaluate,
    _reduce,
    _region_rgb,
    boundary_grid,
)

#: Side of the boundary image of a frame, in pixels.
OUT_RESOLUTION = 48
#: Bytes of unit maps per frame, which sets their resolution (between 10 and 24 pixels).
UNIT_BYTES = 16_000
#: Most training and test points drawn on the boundary (an even subsample beyond).
MAX_POINTS = 600
#: The page (HTML, CSS and JavaScript) the data is put into, beside this module.
PAGE_TEMPLATE = "explorer.html"
#: Curves drawn, when the run has them.
CURVES = ("train/loss", "val/loss", "test/loss", "train/accuracy", "val/accuracy",
          "test/accuracy")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _rgb_bytes(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


class ExplorerRecorder:
    """Records explorer frames at chosen epochs; a training callback ``(epoch, metrics)``.

    Parameters
    ----------
    X_train, y_train, X_test, y_test : arrays
        The data in the plane the pictures show (raw, unstandardised 2-D points).
    hidden_layers : callable
        ``points -> [A_1, ..., A_{L-1}]``, the hidden activations for raw points.
    predict_proba : callable
        ``points -> (n, k)`` class probabilities for raw points.
    weights : callable
        ``() -> [W_1, ..., W_L]``, the current weight matrices ``(fan_in, fan_out)``.
    epochs : sequence of int
        Epochs to record (0 for the untrained model, recorded by :meth:`record`).
    """

    def __init__(
        self,
        X_train: np.ndarray,
        y_train: np.ndarray,
        X_test: np.ndarray,
        y_test: np.ndarray,
        *,
        hidden_layers: HiddenLayers,
        predict_proba: Callable[[np.ndarray], np.ndarray],
        weights: Callable[[], Sequence[np.ndarray]],
        epochs: Sequence[int],
        sizes: Sequence[int],
        class_names: Sequence[str],
        feature_names: Sequence[str] = ("x1", "x2"),
        activation_names: Sequence[str] = (),
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        X = np.vstack([X_train, X_test])
        self._out_grid = boundary_grid(X, resolution=OUT_RESOLUTION)
        shown = sum(len(shown_units(w)) for w in self.sizes[1:-1]) or 1
        res = int(np.clip(np.sqrt(UNIT_BYTES / shown), 10, 24))
        self._unit_grid = boundary_grid(X, resolution=res)
        self._hidden_layers = hidden_layers
        self._predict_proba = predict_proba
        self._weights = weights
        self._epochs = set(int(e) for e in epochs)
        self.frames: list[dict[str, Any]] = []
        xx, yy, _ = self._out_grid
        self._meta = {
            "sizes": self.sizes,
            "extent": [float(xx[0, 0]), float(xx[0, -1]), float(yy[0, 0]), float(yy[-1, 0])],
            "out_res": OUT_RESOLUTION,
            "unit_res": res,
            "class_names": [str(c) for c in class_names],
            "class_colours": [[int(round(255 * v)) for v in c]
                              for c in _class_colours(max(2, len(class_names)))],
            "feature_names": [str(f) for f in feature_names],
            "activations": [str(a) for a in activation_names],
            "shown": [shown_units(w).tolist() for w in self.sizes[1:-1]],
            "unit_lut": [[int(round(255 * v)) for v in colormaps[UNIT_CMAP](i / 255)[:3]]
                         for i in range(256)],
            "points": self._points(X_train, y_train, X_test, y_test),
        }

    @staticmethod
    def _points(X_train, y_train, X_test, y_test) -> dict[str, list]:
        X = np.vstack([X_train, X_test])
        y = np.concatenate([y_train, y_test])
        split = np.r_[np.zeros(len(y_train), int), np.ones(len(y_test), int)]
        keep = np.arange(len(y))
        if len(y) > MAX_POINTS:
            keep = np.linspace(0, len(y) - 1, MAX_POINTS).round().astype(int)
        return {"x": np.round(X[keep, 0], 4).tolist(), "y": np.round(X[keep, 1], 4).tolist(),
                "label": np.asarray(y)[keep].astype(int).tolist(),
                "test": split[keep].tolist()}

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch in self._epochs:
            self.record(epoch)

    def record(self, epoch: int) -> None:
        """Capture the network as it is now, as the frame of ``epoch``."""
        P = _evaluate(self._predict_proba, self._out_grid)
        D = _reduce(P)
        with np.errstate(invalid="ignore"):
            rgb = (_region_rgb(P, _class_colours(P.shape[-1])) if D.ndim == 3
                   else _BINARY_CMAP(np.nan_to_num(D, nan=0.5))[..., :3])
        units = unit_maps(self._hidden_layers, self._unit_grid)
        layers, ranges = [], []
        for maps, scale in zip(units.maps, units.scale, strict=True):
            # Values on [-scale, scale] as 0..255; rows flipped so row 0 is the top.
            q = np.round((np.nan_to_num(maps[:, ::-1, :]) / scale + 1) * 127.5)
            layers.append(_b64(np.clip(q, 0, 255).astype(np.uint8)))
            ranges.append(scale)
        weights = [np.asarray(W, dtype=float) for W in self._weights()]
        top = max(float(np.max(np.abs(W))) for W in weights) or 1.0
        rows = [np.arange(self.sizes[0]), *[np.asarray(s) for s in self._meta["shown"]],
                np.arange(self.sizes[-1])]
        packed = []
        for i, W in enumerate(weights):
            sub = W[np.ix_(rows[i], rows[i + 1])]
            packed.append(_b64(np.clip(np.round(sub / top * 127), -127, 127).astype(np.int8)))
        self.frames.append({"epoch": int(epoch), "out": _b64(_rgb_bytes(rgb[::-1])),
                            "units": layers, "ranges": ranges, "weights": packed,
                            "weight_scale": top})

    def html(self, curves: Mapping[str, Sequence[float]], epochs: Sequence[int],
             title: str) -> str:
        """The explorer page, with the run's per-epoch metrics for the curves."""
        data = {
            **self._meta,
            "title": title,
            "frames": self.frames,
            "curves": {"epoch": [int(e) for e in epochs],
                       **{k: [None if not np.isfinite(v) else round(float(v), 5)
                              for v in curves[k]] for k in CURVES if k in curves}},
        }
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        page = resources.files(__package__).joinpath(PAGE_TEMPLATE).read_text("utf-8")
        return page.replace("__TITLE__", _escape(title)).replace("__DATA__", payload)


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))
