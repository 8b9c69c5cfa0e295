"""Activation functions by name, each stored with its backward rule.

An :class:`Activation` holds ``forward(z) -> a`` and ``backward(z, a, grad_a) -> grad_z``
together, so the derivative cannot drift away from the function. ``backward`` receives
both the pre-activation ``z`` and the output ``a`` because for several functions the
derivative is cheaper in terms of the output (sigmoid: ``a (1 - a)``, tanh: ``1 - a**2``).
Every function here is written to stay finite and warning-free for ``|z|`` up to 1e4.

Only the math lives here. The in-place kernels of the fast path are in
:mod:`pipeline.fast.kernels`, keyed by these names; an activation registered here without
a kernel there still trains, through a generic kernel built from ``forward`` and
``backward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

Array = np.ndarray


@dataclass(frozen=True)
class Activation:
    """An elementwise (or, for softmax, row-wise) nonlinearity and its backward rule.

    Attributes
    ----------
    name : str
        The name users type (``"tanh"``).
    forward : callable
        ``forward(z) -> a``, both of shape ``(n_samples, n_units)``.
    backward : callable
        ``backward(z, a, grad_a) -> grad_z``: the chain rule through this function,
        given the upstream gradient ``dL/da``; returns ``dL/dz`` of the same shape.
    family : {"relu", "saturating", None}
        Which training pathology this function can show: ``"relu"`` units can die
        (stuck at zero gradient), ``"saturating"`` units can saturate (gradient ~0).
    output_only : bool
        True for functions that only make sense on the output layer (softmax).
    params : dict
        Parameters the function was built with (e.g. the leaky slope), for logging.
    """

    name: str
    forward: Callable[[Array], Array]
    backward: Callable[[Array, Array, Array], Array]
    family: str | None = None
    output_only: bool = False
    params: dict = field(default_factory=dict)

    def __call__(self, z: Array) -> Array:
        return self.forward(z)


# ----------------------------------------------------------------------------- functions


def _identity(z: Array) -> Array:
    return z


def _identity_backward(z: Array, a: Array, grad_a: Array) -> Array:
    return grad_a


def sigmoid(z: Array) -> Array:
    """Logistic function, evaluated without overflow for any finite ``z``."""
    # exp(-|z|) never overflows; the two branches are the same function written so that
    # neither divides two huge numbers.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def _sigmoid_backward(z: Array, a: Array, grad_a: Array) -> Array:
    return grad_a * a * (1.0 - a)


def _tanh_backward(z: Array, a: Array, grad_a: Array) -> Array:
    return grad_a * (1.0 - a * a)


def _relu(z: Array) -> Array:
    return np.maximum(z, 0)


def _relu_backward(z: Array, a: Array, grad_a: Array) -> Array:
    # The derivative at exactly 0 is taken as 0 (the convention of PyTorch and sklearn).
    return grad_a * (z > 0)


# Parametrised activations are built from module-level functions bound with
# functools.partial (not closures), so models using them can be pickled, which
# scikit-learn's clone/joblib and multiprocessing need.


def _leaky_relu_forward(z: Array, slope: float) -> Array:
    return np.where(z > 0, z, z * z.dtype.type(slope))


def _leaky_relu_backward(z: Array, a: Array, grad_a: Array, slope: float) -> Array:
    return grad_a * np.where(z > 0, z.dtype.type(1), z.dtype.type(slope))






def _leaky_relu(slope: float) -> Activation:
    return Activation(
        "leaky_relu", partial(_leaky_relu_forward, slope=slope),
        partial(_leaky_relu_backward, slope=slope), "relu", params={"slope": slope},
    )


def _elu_forward(z: Array, alpha: float) -> Array:
    # expm1 of min(z, 0) keeps the unused branch of np.where from overflowing.
    return np.where(z > 0, z, z.dtype.type(alpha) * np.expm1(np.minimum(z, 0)))


def _elu_backward(z: Array, a: Array, grad_a: Array, alpha: float) -> Array:
    # For z <= 0, d/dz alpha (e^z - 1) = alpha e^z = a + alpha.
    return grad_a * np.where(z > 0, z.dtype.type(1), a + z.dtype.type(alpha))






def _elu(alpha: float) -> Activation:
    return Activation(
        "elu", partial(_elu_forward, alpha=alpha), partial(_elu_backward, alpha=alpha),
        "relu", params={"alpha": alpha},
    )


# GELU in the tanh approximation (Hendrycks & Gimpel 2016; PyTorch approximate="tanh").
# numpy has no erf, and the approximation is within 1e-3 of the exact form.
# Python floats, not numpy scalars: a np.float64 constant would upcast float32 arrays.
_GELU_C = float(np.sqrt(2.0 / np.pi))
_GELU_K = 0.044715


def _gelu(z: Array) -> Array:
    return 0.5 * z * (1.0 + np.tanh(_GELU_C * (z + _GELU_K * z**3)))


def _gelu_backward(z: Array, a: Array, grad_a: Array) -> Array:
    t = np.tanh(_GELU_C * (z + _GELU_K * z**3))
    dt = (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_K * z * z)
    return grad_a * (0.5 * (1.0 + t) + 0.5 * z * dt)


def _softplus(z: Array) -> Array:
    return np.logaddexp(0, z).astype(z.dtype, copy=False)


def _softplus_backward(z: Array, a: Array, grad_a: Array) -> Array:
    return grad_a * sigmoid(z)


def softmax(z: Array) -> Array:
    """Row-wise softmax, shifted by the row maximum so ``exp`` never overflows."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _softmax_backward(z: Array, a: Array, grad_a: Array) -> Array:
    # Jacobian-vector product of softmax: J = diag(a) - a a^T, so J g = a (g - <g, a>).
    return a * (grad_a - np.sum(grad_a * a, axis=1, keepdims=True))


# ------------------------------------------------------------------------------ registry

ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation("identity", _identity, _identity_backward),
    "sigmoid": Activation("sigmoid", sigmoid, _sigmoid_backward, "saturating"),
    "tanh": Activation("tanh", np.tanh, _tanh_backward, "saturating"),
    "relu": Activation("relu", _relu, _relu_backward, "relu"),
    "leaky_relu": _leaky_relu(0.01),
    "elu": _elu(1.0),
    "gelu": Activation("gelu", _gelu, _gelu_backward),
    "softplus": Activation("softplus", _softplus, _softplus_backward),
    "softmax": Activation("softmax", softmax, _softmax_backward, output_only=True),
}

# Activations that take parameters are rebuilt by these factories when params are given.
_FACTORIES: dict[str, Callable[..., Activation]] = {"leaky_relu": _leaky_relu, "elu": _elu}
_PARAM_NAMES: dict[str, tuple[str, ...]] = {"leaky_relu": ("slope",), "elu": ("alpha",)}

HIDDEN_ACTIVATIONS = tuple(name for name, a in ACTIVATIONS.items() if not a.output_only)
OUTPUT_ACTIVATIONS = tuple(ACTIVATIONS)


def get_activation(name: str, *, hidden: bool = False, **params: float) -> Activation:
    """Look an activation up by name, optionally with its parameters.

    Parameters
    ----------
    name : str
        One of ``ACTIVATIONS``.
    hidden : bool
        Refuse output-only functions (softmax) when True.
    **params : float
        ``slope`` for ``leaky_relu``, ``alpha`` for ``elu``. Parameters that the
        function does not take are ignored, so one ``activation_params`` mapping can
        serve a list of different activations.

    Raises
    ------
    ValueError
        For an unknown name, an output-only function used in a hidden layer, or a
        non-finite parameter.
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        known = ", ".join(HIDDEN_ACTIVATIONS if hidden else OUTPUT_ACTIVATIONS)
        raise ValueError(f"unknown activation {name!r}; known: {known}")
    if hidden and ACTIVATIONS[name].output_only:
        raise ValueError(
            f"activation {name!r} can only be used on the output layer; "
            f"hidden layers take one of: {', '.join(HIDDEN_ACTIVATIONS)}"
        )
    own = {k: v for k, v in params.items() if k in _PARAM_NAMES.get(name, ())}
    if not own:
        return ACTIVATIONS[name]
    for key, value in own.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or (
            not np.isfinite(value)
        ):
            raise ValueError(f"{name} {key}={value!r}: must be a finite number")
    return _FACTORIES[name](**{k: float(v) for k, v in own.items()})
