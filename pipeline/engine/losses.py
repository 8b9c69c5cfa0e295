"""Loss functions by name, each with its gradient, averaged over the batch.

Every loss sees the output layer's pre-activation ``z`` and activation ``a`` (both
``(n_samples, n_outputs)``) and a target matrix ``T`` of the same shape (see
:func:`encode_targets`). ``delta`` returns ``dL/dz``, the gradient the backward pass
starts from. For the canonical pairs the chain rule through the output activation
collapses to ``delta = (a - T) / n`` (times a constant):

- sigmoid + binary cross-entropy,
- softmax + cross-entropy,
- identity + mean squared error / half sum of squares.

Those pairs use the collapsed form, which is both cheaper and free of the
``a (1 - a)`` factor that underflows when a sigmoid saturates; every other pair goes
through the output activation's backward rule.

Only the math lives here; the fused in-place kernels of the fast path are in
:mod:`pipeline.fast.kernels`, keyed by these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.engine.activations import Activation, softmax

Array = np.ndarray


@dataclass(frozen=True)
class Loss:
    """A loss, its gradient with respect to the output, and the outputs it fits.

    Attributes
    ----------
    name : str
        The name users type (``"bce"``).
    value : callable
        ``value(z, a, T) -> float``: mean loss over the batch.
    grad_output : callable
        ``grad_output(z, a, T) -> dL/da`` with the ``1/n`` of the mean included.
    outputs : tuple of str or None
        Output activations this loss is defined on; None for any.
    min_units : int
        Smallest number of output units the loss is defined for.
    max_units : int or None
        Largest number of output units, or None for no limit.
    fused : tuple of str
        Output activations for which ``dL/dz == fused_delta(z, a, T)``.
    fused_delta : callable or None
        The collapsed gradient for the pairs in ``fused``.
    terms : callable or None
        ``terms(z, a, T)``: the loss's terms per sample and output, whose sum over a
        batch divided by its ``n`` is ``value``; any leading axes are kept, so that a
        stack of batches (replicas) can be scored at once.
    """

    name: str
    value: Callable[[Array, Array, Array], float]
    grad_output: Callable[[Array, Array, Array], Array]
    outputs: tuple[str, ...] | None = None
    min_units: int = 1
    max_units: int | None = None
    fused: tuple[str, ...] = ()
    fused_delta: Callable[[Array, Array, Array], Array] | None = None
    terms: Callable[[Array, Array, Array], Array] | None = None

    def delta(self, z: Array, a: Array, T: Array, output: Activation) -> Array:
        """Gradient of the mean loss with respect to the output pre-activation ``z``."""
        if output.name in self.fused and self.fused_delta is not None:
            return self.fused_delta(z, a, T)
        return output.backward(z, a, self.grad_output(z, a, T))

    def check_output(self, output: str, n_units: int) -> None:
        """Raise ValueError if this loss is not defined on ``n_units`` of ``output``."""
        if self.outputs is not None and output not in self.outputs:
            raise ValueError(
                f"loss {self.name!r} does not fit a {output!r} output; "
                f"it needs one of: {', '.join(self.outputs)}"
            )
        if n_units < self.min_units or (self.max_units is not None and n_units > self.max_units):
            allowed = (
                f"exactly {self.min_units}"
                if self.max_units == self.min_units
                else f"at least {self.min_units}"
                if self.max_units is None
                else f"{self.min_units} to {self.max_units}"
            )
            raise ValueError(
                f"loss {self.name!r} does not fit an output layer of {n_units} unit(s); "
                f"it needs {allowed}"
            )


# ------------------------------------------------------------------ mean squared error


def _mse_value(z: Array, a: Array, T: Array) -> float:
    return float(np.mean((a - T) ** 2))


def _mse_grad(z: Array, a: Array, T: Array) -> Array:
    return (2.0 / a.size) * (a - T)


def _half_sse_value(z: Array, a: Array, T: Array) -> float:
    return float(0.5 * np.sum((a - T) ** 2) / a.shape[0])


def _half_sse_grad(z: Array, a: Array, T: Array) -> Array:
    return (a - T) / a.shape[0]


# ------------------------------------------------------------- binary cross-entropy


def _bce_terms(z: Array, a: Array, T: Array) -> Array:
    # From the logits: -[t log s(z) + (1-t) log(1-s(z))] = max(z,0) - t z + log(1+e^-|z|),
    # exact and finite for any z, where log(a) would give -inf once a rounds to 0 or 1.
    return np.maximum(z, 0) - T * z + np.log1p(np.exp(-np.abs(z)))


def _bce_value(z: Array, a: Array, T: Array) -> float:
    return float(np.sum(_bce_terms(z, a, T)) / z.shape[0])


def _bce_grad(z: Array, a: Array, T: Array) -> Array:
    # Only used if bce were paired with a non-sigmoid output, which check_output refuses;
    # kept so that the table is complete and the general path is testable.
    eps = np.finfo(a.dtype).tiny
    return (a - T) / (np.maximum(a * (1.0 - a), eps) * a.shape[0])


def _residual_over_n(z: Array, a: Array, T: Array) -> Array:
    return (a - T) / a.shape[0]


# -------------------------------------------------------------- softmax cross-entropy


def _ce_terms(z: Array, a: Array, T: Array) -> Array:
    shifted = z - z.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return -(T * log_softmax)


def _ce_value(z: Array, a: Array, T: Array) -> float:
    return float(np.sum(_ce_terms(z, a, T)) / z.shape[0])


def _ce_delta(z: Array, a: Array, T: Array) -> Array:
    # d/dz of -sum_j t_j log softmax_j(z) is a * sum_j t_j - t; for one-hot (or any
    # probability-vector) targets the row sums are 1 and this is the familiar a - t.
    return (a * T.sum(axis=1, keepdims=True) - T) / a.shape[0]


def _ce_grad(z: Array, a: Array, T: Array) -> Array:
    eps = np.finfo(a.dtype).tiny
    return -T / (np.maximum(a, eps) * a.shape[0])


# ------------------------------------------------------------------------------ hinge


def _hinge_value(z: Array, a: Array, T: Array) -> float:
    n = a.shape[0]
    if a.shape[1] == 1:
        sign = 2.0 * T - 1.0  # labels {0, 1} -> {-1, +1}
        return float(np.sum(np.maximum(0.0, 1.0 - sign * a)) / n)
    # Multi-class (Weston & Watkins): sum over wrong classes j of max(0, 1 + s_j - s_y).
    true_score = np.sum(a * T, axis=1, keepdims=True)
    margins = np.maximum(0.0, 1.0 + a - true_score) * (1.0 - T)
    return float(np.sum(margins) / n)


def _hinge_grad(z: Array, a: Array, T: Array) -> Array:
    n = a.shape[0]
    if a.shape[1] == 1:
        sign = 2.0 * T - 1.0
        return -sign * (sign * a < 1.0) / n
    true_score = np.sum(a * T, axis=1, keepdims=True)
    active = ((1.0 + a - true_score) > 0) * (1.0 - T)
    # Each active wrong class pushes its own score up and the true class's score down.
    return (active - T * np.sum(active, axis=1, keepdims=True)) / n


LOSSES: dict[str, Loss] = {
    "mse": Loss("mse", _mse_value, _mse_grad),
    "half_sse": Loss(
        "half_sse", _half_sse_value, _half_sse_grad, fused=("identity",),
        fused_delta=_residual_over_n,
    ),
    "bce": Loss(
        "bce", _bce_value, _bce_grad, outputs=("sigmoid",), fused=("sigmoid",),
        fused_delta=_residual_over_n, terms=_bce_terms,
    ),
    "cross_entropy": Loss(
        "cross_entropy", _ce_value, _ce_grad, outputs=("softmax",), min_units=2,
        fused=("softmax",), fused_delta=_ce_delta, terms=_ce_terms,
    ),
    "hinge": Loss("hinge", _hinge_value, _hinge_grad, outputs=("identity", "tanh")),
}


def get_loss(name: str | Loss) -> Loss:
    """Look a loss up by name (a :class:`Loss` passes through unchanged)."""
    if isinstance(name, Loss):
        return name
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


def default_loss(output: str) -> str:
    """The loss a classifier with this output activation is usually trained with."""
    return {"sigmoid": "bce", "softmax": "cross_entropy"}.get(output, "mse")


# ------------------------------------------------------------------------ targets


def encode_targets(y: Array, n_outputs: int, dtype: np.dtype | type = np.float64) -> Array:
    """Turn labels or targets into the ``(n_samples, n_outputs)`` matrix losses expect.

    Parameters
    ----------
    y : array of shape (n_samples,) or (n_samples, n_outputs)
        Integer class labels (0/1 for one output unit, ``0..k-1`` for ``k`` units, which
        become one-hot rows), or real-valued targets of the output's shape.
    n_outputs : int
        Units in the output layer.
    dtype : numpy dtype
        Dtype of the result, the model's.

    Raises
    ------
    ValueError
        For labels outside the range the output can represent, a shape that does not
        match the output, or non-finite targets.
    """
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise ValueError(f"y must be numeric labels or targets; got dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == n_outputs:
        if not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinite values")
        return np.ascontiguousarray(y, dtype=dtype)
    if y.ndim != 1:
        raise ValueError(
            f"y has shape {y.shape}; expected (n_samples,) labels or "
            f"(n_samples, {n_outputs}) targets for a {n_outputs}-unit output"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError("y contains NaN or infinite values")
    n_classes = max(n_outputs, 2)
    labels = y.astype(np.int64)
    if np.any(labels != y) or labels.min(initial=0) < 0 or labels.max(initial=0) >= n_classes:
        found = np.unique(y)[:10]
        raise ValueError(
            f"labels {found.tolist()} do not fit a {n_outputs}-unit output: "
            f"expected integers 0..{n_classes - 1}"
        )
    if n_outputs == 1:
        return labels.astype(dtype)[:, None]
    T = np.zeros((labels.shape[0], n_outputs), dtype=dtype)
    T[np.arange(labels.shape[0]), labels] = 1.0
    return T


def scores_to_proba(a: Array, output: str, loss: str | None = None) -> Array:
    """Map output activations to class probabilities ``(n_samples, n_classes)``.

    Sigmoid and softmax outputs are probabilities already. Other outputs are mapped so
    that the most probable class is the one the loss's decision rule picks: a hinge
    margin of 0 (or a tanh output of 0) maps to 0.5, a squared-error output trained on
    0/1 targets is clipped to [0, 1], and several units are normalised with a softmax.
    These are scores for plotting and thresholds, not calibrated probabilities.
    """
    if a.shape[1] == 1:
        if output == "sigmoid":
            p = a[:, 0]
        elif output == "tanh" or loss == "hinge":
            p = np.clip((a[:, 0] + 1.0) / 2.0, 0.0, 1.0)
        else:
            p = np.clip(a[:, 0], 0.0, 1.0)
        return np.column_stack([1.0 - p, p])
    if output == "softmax":
        return a
    if loss in ("mse", "half_sse") or output == "sigmoid":
        # Squared error on one-hot targets (or independent sigmoids): clip to [0, 1] and
        # renormalise the rows; a row with no positive score is uniform.
        clipped = np.clip(a, 0.0, None)
        total = clipped.sum(axis=1, keepdims=True)
        safe = np.where(total > 0, total, 1.0)
        return np.where(total > 0, clipped / safe, 1.0 / a.shape[1])
    return softmax(a)


__all__ = [
    "LOSSES", "Loss", "default_loss", "encode_targets", "get_loss", "scores_to_proba",
]
