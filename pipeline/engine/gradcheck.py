"""Gradient checking: backpropagation against central finite differences.

``gradcheck(model, X, y, loss)`` perturbs every parameter of a float64 copy of the model by
``±eps``, measures the change in the loss, and compares that slope with the gradient that
``model.loss_and_grads`` computes by backpropagation, one relative error per parameter
tensor (``W1``, ``b1``, ``W2``, ...).

``three_ways_demo()`` gets one gradient three ways on a 1-1-1 sigmoid chain: a closed-form
derivative written out by hand, finite differences and backpropagation.
``cost_vs_params(sizes_list)`` shows why backpropagation wins: finite differences need two
forward passes per parameter, backpropagation one forward and one backward pass in total.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from pipeline.engine.losses import Loss, get_loss
from pipeline.engine.mlp import MLP

__all__ = [
    "GradcheckResult",
    "cost_vs_params",
    "finite_difference_grad",
    "gradcheck",
    "relative_error",
    "three_ways_demo",
]

_TINY = np.finfo(np.float64).tiny


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max(max(|a| + |b|), tiny)`` over all entries of two same-shape arrays.

    The normaliser is the largest ``|a| + |b|`` in the tensor, not entry by entry, so an
    entry whose gradient is ~0 (a dead unit, a saturated sigmoid) cannot blow the ratio up
    with rounding noise. Two all-zero tensors give 0. The value lies in [0, 1]; 1 means
    the two disagree completely (e.g. opposite signs).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(a) + np.abs(b)))
    return float(np.max(np.abs(a - b)) / max(scale, _TINY))


class GradcheckResult(dict):
    """Relative error per parameter tensor (a ``dict[str, float]``) with a verdict.

    Attributes
    ----------
    threshold : float
        A tensor passes when its relative error is below this.
    analytic, numeric : dict[str, ndarray]
        The backpropagated and the finite-difference gradients, by tensor name.
    eps : float
        The finite-difference step.
    """

    def __init__(
        self,
        errors: dict[str, float],
        threshold: float,
        analytic: dict[str, np.ndarray],
        numeric: dict[str, np.ndarray],
        eps: float,
    ) -> None:
        super().__init__(errors)
        self.threshold = float(threshold)
        self.analytic = analytic
        self.numeric = numeric
        self.eps = float(eps)

    @property
    def max_error(self) -> float:
        return max(self.values(), default=0.0)

    @property
    def failed(self) -> list[str]:
        """Names of the tensors whose relative error is not below the threshold."""
        return [name for name, err in self.items() if not err < self.threshold]

    @property
    def passed(self) -> bool:
        return not self.failed

    def __bool__(self) -> bool:  # "if gradcheck(...):" reads as "if it passed"
        return self.passed

    def table(self) -> str:
        """A fixed-width table: tensor, shape, relative error, max |grad|, verdict."""
        lines = [
            f"{'tensor':<8} {'shape':<12} {'rel. error':>11} {'max |grad|':>11}  verdict",
        ]
        for name, err in self.items():
            shape = "x".join(str(s) for s in self.analytic[name].shape)
            gmax = float(np.max(np.abs(self.analytic[name]), initial=0.0))
            verdict = "ok" if err < self.threshold else "FAIL"
            lines.append(f"{name:<8} {shape:<12} {err:>11.3e} {gmax:>11.3e}  {verdict}")
        summary = "PASSED" if self.passed else f"FAILED: {', '.join(self.failed)}"
        lines.append(f"threshold {self.threshold:.0e}, eps {self.eps:.0e}: {summary}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _float64_copy(model: MLP) -> MLP:
    """The same network in float64, of the same class (so an overridden method is checked)."""
    config = model.get_config()
    config["dtype"] = "float64"
    clone = type(model)(**config)
    clone.set_params(np.asarray(model.params, dtype=np.float64))
    return clone


def _tensor_names(model: MLP) -> list[str]:
    names = [f"W{i}" for i in range(1, model.n_layers + 1)]
    if model.biases is not None:
        names += [f"b{i}" for i in range(1, model.n_layers + 1)]
    return names  # the order of the flat parameter vector: weights first, then biases


def finite_difference_grad(
    model: MLP, X: np.ndarray, y: np.ndarray, loss: str | Loss, eps: float = 1e-6
) -> np.ndarray:
    """Central finite differences of the mean loss for every parameter (flat layout).

    ``(L(p + eps e_i) - L(p - eps e_i)) / (2 eps)`` for each ``i``: two forward passes per
    parameter. The model's parameters are perturbed in place and restored exactly.

    Returns
    -------
    ndarray of shape (model.n_params,)
    """
    loss = get_loss(loss)
    p = model.params
    out = np.empty(p.shape[0], dtype=np.float64)
    for i in range(p.shape[0]):
        old = p[i]
        p[i] = old + eps
        up_step = p[i]  # the step actually taken after rounding to the nearest float
        up = model.compute_loss(X, y, loss)
        p[i] = old - eps
        down_step = p[i]
        down = model.compute_loss(X, y, loss)
        p[i] = old
        out[i] = (up - down) / (up_step - down_step)
    return out


def gradcheck(
    model: MLP,
    X: np.ndarray,
    y: np.ndarray,
    loss: str | Loss,
    eps: float = 1e-6,
    threshold: float = 1e-6,
) -> GradcheckResult:
    """Compare ``model.loss_and_grads`` with central finite differences, per tensor.

    Both are computed on a float64 copy of ``model`` (the model itself is not touched), so
    a float32 model is checked for its formulas, not its rounding.

    Parameters
    ----------
    model : MLP
    X : array of shape (n_samples, n_features)
    y : array of shape (n_samples,) or (n_samples, n_outputs)
    loss : str or Loss
    eps : float
        Finite-difference step. In float64, 1e-6 balances truncation error (~eps**2)
        against rounding error (~1e-16 |L| / eps).
    threshold : float
        Pass/fail bound on the relative error of each tensor.

    Returns
    -------
    GradcheckResult
        ``{"W1": err, ..., "b1": err, ...}`` where ``err`` is
        ``max|analytic - numeric| / max(max(|analytic| + |numeric|), tiny)`` over the tensor
        (see :func:`relative_error`); ``.passed``, ``.failed``, ``.table()``.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps!r}: must be a finite number > 0")
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"threshold={threshold!r}: must be a number > 0")
    m64 = _float64_copy(model)
    _, dW, db = m64.loss_and_grads(X, y, loss)
    analytic_flat = np.concatenate([g.ravel() for g in [*dW, *(db or [])]])
    numeric_flat = finite_difference_grad(m64, X, y, loss, eps)

    names = _tensor_names(m64)
    shapes = [W.shape for W in m64.weights] + [b.shape for b in (m64.biases or [])]
    analytic, numeric, errors = {}, {}, {}
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        size = int(np.prod(shape))
        analytic[name] = analytic_flat[offset : offset + size].reshape(shape)
        numeric[name] = numeric_flat[offset : offset + size].reshape(shape)
        errors[name] = relative_error(analytic[name], numeric[name])
        offset += size
    return GradcheckResult(errors, threshold, analytic, numeric, eps)


# ------------------------------------------------------------------------- demonstrations


def three_ways_demo(
    x: float = 0.5,
    target: float = 1.0,
    w1: float = 0.8,
    b1: float = -0.2,
    w2: float = -1.3,
    b2: float = 0.4,
    eps: float = 1e-6,
) -> dict[str, object]:
    """One gradient three ways on a 1-1-1 sigmoid chain with the half squared error.

    The network is ``a1 = s(w1 x + b1)``, ``a2 = s(w2 a1 + b2)`` with ``s`` the sigmoid and
    loss ``L = (a2 - target)**2 / 2``. By hand, with ``s' = s (1 - s)``::

        d2 = (a2 - target) a2 (1 - a2)      dL/dw2 = d2 a1      dL/db2 = d2
        d1 = d2 w2 a1 (1 - a1)              dL/dw1 = d1 x       dL/db1 = d1

    Returns
    -------
    dict
        ``names`` (["w1", "b1", "w2", "b2"]); ``closed_form``, ``finite_differences`` and
        ``backprop`` (arrays of shape (4,) in that order); ``max_abs_difference`` between
        any two of them; ``loss``; ``passes`` (forward/backward passes each method used).
    """
    sig = _sigmoid_scalar
    a1 = sig(w1 * x + b1)
    a2 = sig(w2 * a1 + b2)
    d2 = (a2 - target) * a2 * (1.0 - a2)
    d1 = d2 * w2 * a1 * (1.0 - a1)
    closed = np.array([d1 * x, d1, d2 * a1, d2])

    model = MLP.from_arrays(
        [np.array([[w1]]), np.array([[w2]])],
        [np.array([b1]), np.array([b2])],
        activation="sigmoid",
        output="sigmoid",
        dtype=np.float64,
    )
    X, y = np.array([[x]]), np.array([[target]])
    loss_value, dW, db = model.loss_and_grads(X, y, "half_sse")
    backprop = np.array([dW[0][0, 0], db[0][0], dW[1][0, 0], db[1][0]])

    fd_flat = finite_difference_grad(model, X, y, "half_sse", eps)  # layout W1 W2 b1 b2
    fd = fd_flat[[0, 2, 1, 3]]

    diffs = [closed - fd, closed - backprop, fd - backprop]
    return {
        "names": ["w1", "b1", "w2", "b2"],
        "closed_form": closed,
        "finite_differences": fd,
        "backprop": backprop,
        "max_abs_difference": float(max(np.max(np.abs(d)) for d in diffs)),
        "loss": float(loss_value),
        "passes": {
            "closed_form": {"forward": 1, "backward": 0},  # the formula needs a1, a2
            "finite_differences": {"forward": 2 * 4, "backward": 0},
            "backprop": {"forward": 1, "backward": 1},
        },
    }


def _sigmoid_scalar(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def cost_vs_params(
    sizes_list: Sequence[Sequence[int]],
    n_samples: int = 64,
    activation: str = "tanh",
    seed: int = 0,
    eps: float = 1e-6,
) -> list[dict[str, object]]:
    """Time one full gradient by finite differences and by backpropagation per network.

    Each network gets a sigmoid output and binary cross-entropy (or softmax and
    cross-entropy for several outputs) on random data of ``n_samples`` rows.

    Returns
    -------
    list of dict
        Two rows per entry of ``sizes_list``, one per method, with keys ``sizes``,
        ``n_params``, ``method`` ("finite_differences" or "backprop"),
        ``forward_passes`` (2 per parameter vs 1), ``backward_passes`` (0 vs 1),
        ``seconds`` and ``max_abs_difference`` between the two gradients.
        ``pandas.DataFrame(rows)`` makes it a table.
    """
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for sizes in sizes_list:
        sizes = list(sizes)
        k = sizes[-1]
        output, loss = ("sigmoid", "bce") if k == 1 else ("softmax", "cross_entropy")
        model = MLP(sizes, activation=activation, output=output, seed=seed, dtype=np.float64)
        X = rng.normal(size=(n_samples, sizes[0]))
        y = rng.integers(0, max(k, 2), size=n_samples)
        # backprop is fast enough for timer resolution to matter: best of a few repeats
        bp_seconds = math.inf
        for _ in range(5):
            start = time.perf_counter()
            model.value_and_grad(X, y, loss)
            bp_seconds = min(bp_seconds, time.perf_counter() - start)
        start = time.perf_counter()
        fd = finite_difference_grad(model, X, y, loss, eps)
        fd_seconds = time.perf_counter() - start
        model.value_and_grad(X, y, loss)
        diff = float(np.max(np.abs(fd - model.grad)))
        P = model.n_params
        rows.append(
            {
                "sizes": sizes,
                "n_params": P,
                "method": "finite_differences",
                "forward_passes": 2 * P,
                "backward_passes": 0,
                "seconds": fd_seconds,
                "max_abs_difference": diff,
            }
        )
        rows.append(
            {
                "sizes": sizes,
                "n_params": P,
                "method": "backprop",
                "forward_passes": 1,
                "backward_passes": 1,
                "seconds": bp_seconds,
                "max_abs_difference": diff,
            }
        )
    return rows
