"""Activation functions by name, each stored with its backward rule.

An :class:`Activation` holds ``forward(z) -> a`` and ``backward(z, a, grad_a) -> grad_z``
together, so the derivative cannot drift away from the function. ``backward`` receives
both the pre-activation ``z`` and the output ``a`` because for several functions the
derivative is cheaper in terms of the output (sigmoid: ``a (1 - a)``, tanh: ``1 - a**2``).
Every function here is written to stay finite and warning-free for ``|z|`` up to 1e4.

The training hot path works in place: the twins ``forward_into(z, out)`` and
``backward_into(z, a, g, scratch)`` write into preallocated buffers instead of allocating
a new array per call, and :meth:`Activation.forward_program` /
:meth:`Activation.backward_program` give the same calls bound once to given arrays (the
step programs of :class:`pipeline.engine.mlp._Workspace`). :meth:`Activation.forward_to` /
:meth:`Activation.backward_to` fall back to the allocating pair for an activation that has
no in-place twin (a user-built one, gelu, softplus).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

Array = np.ndarray
Op = Callable[[], object]


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
    forward_into : callable or None
        ``forward_into(z, out)``: writes ``f(z)`` into ``out`` (same shape, not ``z``)
        without allocating a result; None where only ``forward`` exists.
    backward_into : callable or None
        ``backward_into(z, a, g, scratch)``: multiplies ``g`` in place by ``f'(z)`` (``g``
        holds ``dL/da`` on entry and ``dL/dz`` on exit); ``scratch`` is a spare array of
        the same shape it may overwrite. None where only ``backward`` exists.
    forward_ops, backward_ops : callable or None
        ``forward_ops(z, out)`` / ``backward_ops(z, a, g, scratch)``: the numpy calls of
        ``forward_into`` / ``backward_into`` on these very arrays, as a list of
        argument-free callables bound once (see :meth:`forward_program`).
    """

    name: str
    forward: Callable[[Array], Array]
    backward: Callable[[Array, Array, Array], Array]
    family: str | None = None
    output_only: bool = False
    params: dict = field(default_factory=dict)
    forward_into: Callable[[Array, Array], None] | None = None
    backward_into: Callable[[Array, Array, Array, Array], None] | None = None
    forward_ops: Callable[[Array, Array], list[Op]] | None = None
    backward_ops: Callable[[Array, Array, Array, Array], list[Op]] | None = None

    def __call__(self, z: Array) -> Array:
        return self.forward(z)

    def forward_to(self, z: Array, out: Array) -> None:
        """Write ``f(z)`` into ``out``, in place where the activation allows it."""
        if self.forward_into is not None:
            self.forward_into(z, out)
        else:
            np.copyto(out, self.forward(z))

    def backward_to(self, z: Array, a: Array, g: Array, scratch: Array) -> None:
        """Turn ``g = dL/da`` into ``dL/dz`` in place (``scratch`` may be overwritten)."""
        if self.backward_into is not None:
            self.backward_into(z, a, g, scratch)
        else:
            np.copyto(g, self.backward(z, a, g))

    def forward_program(self, z: Array, out: Array) -> list[Op]:
        """:meth:`forward_to` on these arrays as argument-free calls, bound once.

        Running the calls in order writes ``f(z)`` into ``out``, the same numbers as
        :meth:`forward_to`. A training step on small batches costs its number of numpy
        calls and the Python around them, so the fast path binds every call of a step
        once (arrays and constants as positional arguments) and then only runs them.
        """
        if self.forward_ops is not None:
            return self.forward_ops(z, out)
        return [partial(self.forward_to, z, out)]

    def backward_program(self, z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
        """:meth:`backward_to` on these arrays as argument-free calls, bound once."""
        if self.backward_ops is not None:
            return self.backward_ops(z, a, g, scratch)
        return [partial(self.backward_to, z, a, g, scratch)]


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


def _leaky_relu_into(z: Array, out: Array, slope: float) -> None:
    np.multiply(z, slope, out=out)
    np.copyto(out, z, where=z > 0)


def _leaky_relu_backward_into(z: Array, a: Array, g: Array, scratch: Array, slope: float) -> None:
    # f'(z) = slope + (1 - slope) * (z > 0), built in the scratch without temporaries.
    np.greater(z, 0.0, out=scratch)
    np.multiply(scratch, 1.0 - slope, out=scratch)
    np.add(scratch, slope, out=scratch)
    np.multiply(g, scratch, out=g)


def _leaky_relu(slope: float) -> Activation:
    return Activation(
        "leaky_relu", partial(_leaky_relu_forward, slope=slope),
        partial(_leaky_relu_backward, slope=slope), "relu", params={"slope": slope},
        forward_into=partial(_leaky_relu_into, slope=slope),
        backward_into=partial(_leaky_relu_backward_into, slope=slope),
    )


def _elu_forward(z: Array, alpha: float) -> Array:
    # expm1 of min(z, 0) keeps the unused branch of np.where from overflowing.
    return np.where(z > 0, z, z.dtype.type(alpha) * np.expm1(np.minimum(z, 0)))


def _elu_backward(z: Array, a: Array, grad_a: Array, alpha: float) -> Array:
    # For z <= 0, d/dz alpha (e^z - 1) = alpha e^z = a + alpha.
    return grad_a * np.where(z > 0, z.dtype.type(1), a + z.dtype.type(alpha))


def _elu_into(z: Array, out: Array, alpha: float) -> None:
    np.minimum(z, 0.0, out=out)
    np.expm1(out, out=out)
    np.multiply(out, alpha, out=out)
    np.copyto(out, z, where=z > 0)


def _elu_backward_into(z: Array, a: Array, g: Array, scratch: Array, alpha: float) -> None:
    np.add(a, alpha, out=scratch)
    np.copyto(scratch, 1.0, where=z > 0)
    np.multiply(g, scratch, out=g)


def _elu(alpha: float) -> Activation:
    return Activation(
        "elu", partial(_elu_forward, alpha=alpha), partial(_elu_backward, alpha=alpha),
        "relu", params={"alpha": alpha},
        forward_into=partial(_elu_into, alpha=alpha),
        backward_into=partial(_elu_backward_into, alpha=alpha),
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


# -------------------------------------------------------------------- in-place twins
# Each writes into a preallocated buffer: on small batches the time of a step is mostly
# the number of numpy calls, on large ones the number of passes over memory, so both
# are kept to the minimum and nothing is allocated.


# numpy converts a Python float operand to an array on every call: a cached 0-d array of
# the operands' dtype costs less (0.41 instead of 0.73 us for a 64 x 32 float32 multiply)
# and holds the same number (a Python float meets a float32 array as float32, NEP 50).
_CONSTANTS: dict[tuple, Array] = {}


def const(value: float, dtype: np.dtype | type) -> Array:
    """A cached read-only 0-d array of ``value`` in ``dtype``, for ufunc operands."""
    key = (value, np.dtype(dtype).char)
    c = _CONSTANTS.get(key)
    if c is None:
        if len(_CONSTANTS) >= 256:
            _CONSTANTS.clear()
        c = _CONSTANTS[key] = np.array(value, dtype=dtype)
        c.flags.writeable = False
    return c


def _identity_into(z: Array, out: Array) -> None:
    np.copyto(out, z)


def _identity_backward_into(z: Array, a: Array, g: Array, scratch: Array) -> None:
    return None


# s(z) = (1 + tanh(z / 2)) / 2: the same function as sigmoid() to a few ulp, finite for
# every z (tanh saturates, exp would overflow) and four vectorised passes where the
# branch-free exp form needs seven.
def _sigmoid_ops(z: Array, out: Array) -> list[Op]:
    half = const(0.5, out.dtype)
    return [partial(np.multiply, z, half, out), partial(np.tanh, out, out),
            partial(np.multiply, out, half, out), partial(np.add, out, half, out)]


def _sigmoid_into(z: Array, out: Array) -> None:
    half = const(0.5, out.dtype)
    np.multiply(z, half, out)
    np.tanh(out, out)
    np.multiply(out, half, out)
    np.add(out, half, out)


def _sigmoid_backward_ops(z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
    one = const(1.0, g.dtype)
    return [partial(np.subtract, one, a, scratch), partial(np.multiply, scratch, a, scratch),
            partial(np.multiply, g, scratch, g)]


def _sigmoid_backward_into(z: Array, a: Array, g: Array, scratch: Array) -> None:
    np.subtract(const(1.0, g.dtype), a, scratch)
    np.multiply(scratch, a, scratch)
    np.multiply(g, scratch, g)


def _tanh_ops(z: Array, out: Array) -> list[Op]:
    return [partial(np.tanh, z, out)]


def _tanh_into(z: Array, out: Array) -> None:
    np.tanh(z, out)


def _tanh_backward_ops(z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
    one = const(1.0, g.dtype)
    return [partial(np.multiply, a, a, scratch), partial(np.subtract, one, scratch, scratch),
            partial(np.multiply, g, scratch, g)]


def _tanh_backward_into(z: Array, a: Array, g: Array, scratch: Array) -> None:
    np.multiply(a, a, scratch)
    np.subtract(const(1.0, g.dtype), scratch, scratch)
    np.multiply(g, scratch, g)


# numpy's maximum against a scalar takes a slow broadcasting loop: against an array of
# zeros it runs 3x faster (2 us instead of 7 us on 256 x 64 float32; a 0-d array is no
# faster than the scalar here). Past about a million elements memory traffic dominates
# and the scalar form, which reads one array instead of two, wins again.
_FILLED: dict[tuple, Array] = {}
_ZEROS_MAX_SIZE = 1 << 20


def _filled_like(z: Array, value: float) -> Array:
    """A cached read-only array of ``value`` of ``z``'s shape, dtype and memory order."""
    order = "F" if z.flags.f_contiguous and not z.flags.c_contiguous else "C"
    key = (z.shape, z.dtype.char, order, value)
    filled = _FILLED.get(key)
    if filled is None:
        if len(_FILLED) >= 32:
            _FILLED.clear()
        filled = _FILLED[key] = np.full(z.shape, value, dtype=z.dtype, order=order)
        filled.flags.writeable = False
    return filled


def _bound(z: Array, value: float) -> Array | float:
    """The second operand of a maximum/fmin of ``z`` against ``value`` (see above)."""
    return _filled_like(z, value) if z.size <= _ZEROS_MAX_SIZE else value


def _relu_ops(z: Array, out: Array) -> list[Op]:
    return [bind(np.maximum, z, _bound(z, 0.0), out)]


def _relu_into(z: Array, out: Array) -> None:
    np.maximum(z, _bound(z, 0.0), out=out)


# relu'(z) is (z > 0) (the derivative at exactly 0 is taken as 0, the convention of
# PyTorch and sklearn). The comparison writes booleans that must then be cast to floats,
# the slow part on small arrays (1.4 us on 64 x 32 float32). There, on the output
# a = relu(z) >= 0 instead, ceil(fmin(a, 1)) is 1.0 for every a > 0 (denormals included)
# and 0.0 for a == 0, in two plain float passes (0.41 + 0.42 us): the same numbers
# wherever a is not NaN. From about 16,000 values on the passes over memory cost more
# than the cast (59 vs 50 us on a 100,000 x 2 block), so larger arrays compare.
# fmin, unlike minimum, takes a positional ``out``.
RELU_CEIL_MAX_SIZE = 1 << 13


def _relu_backward_ops(z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
    if a.size > RELU_CEIL_MAX_SIZE:
        # _relu_backward_into's calls, bound: no Python frame, keyword or float operand
        # per step (5.7 -> 5.1 us on 16,384 float32 values).
        return [partial(np.greater, z, const(0.0, g.dtype), scratch),
                partial(np.multiply, g, scratch, g)]
    return [partial(np.fmin, a, _filled_like(a, 1.0), scratch),
            partial(np.ceil, scratch, scratch), partial(np.multiply, g, scratch, g)]


def _relu_backward_into(z: Array, a: Array, g: Array, scratch: Array) -> None:
    if a.size > RELU_CEIL_MAX_SIZE:
        np.greater(z, 0.0, out=scratch)
    else:
        np.fmin(a, _filled_like(a, 1.0), scratch)
        np.ceil(scratch, scratch)
    np.multiply(g, scratch, g)


# Up to this many columns, a reduction along rows runs as one elementwise call per
# column: numpy's reductions along a short last axis cost about 20 ns a row (10 us on
# 256 rows of 4), the column calls under 1 us each.
ROW_REDUCE_MAX_COLUMNS = 7


def row_reduce(ufunc: np.ufunc, z: Array) -> Array:
    """``ufunc.reduce(z, axis=1, keepdims=True)`` for a 2-D ``z``, the same numbers.

    For narrow ``z`` the columns are combined left to right, the order numpy's own
    reduction uses on rows this short, so sums and maxima are bit-identical.
    """
    k = z.shape[1]
    if k > ROW_REDUCE_MAX_COLUMNS or k < 2:
        return ufunc.reduce(z, axis=1, keepdims=True)
    out = ufunc(z[:, 0:1], z[:, 1:2])
    for j in range(2, k):
        ufunc(out, z[:, j : j + 1], out=out)
    return out


def row_reduce_ops(ufunc: np.ufunc, z: Array, out: Array) -> list[Op]:
    """:func:`row_reduce` into ``out`` (shape ``(n, 1)``) as argument-free calls."""
    k = z.shape[1]
    if k > ROW_REDUCE_MAX_COLUMNS or k < 2:
        return [partial(ufunc.reduce, z, 1, None, out, True)]
    return [bind(ufunc, z[:, 0:1], z[:, 1:2], out)] + [
        bind(ufunc, out, z[:, j : j + 1], out) for j in range(2, k)
    ]


def bind(ufunc: np.ufunc, x: Array, y: Array, out: Array) -> Op:
    """``ufunc(x, y, out)`` as an argument-free call.

    ``out`` goes by position (no keyword dict to merge per call), except to np.maximum
    and np.minimum, which take it only by keyword (a positional one is deprecated): for
    those a closure costs less than a partial with a keyword.
    """
    if ufunc is np.maximum or ufunc is np.minimum:

        def call() -> None:
            ufunc(x, y, out=out)

        return call
    return partial(ufunc, x, y, out)


def _softmax_ops(z: Array, out: Array) -> list[Op]:
    r = np.empty((z.shape[0], 1), dtype=out.dtype)  # the row maximum, then the row sum
    return [*row_reduce_ops(np.maximum, z, r), partial(np.subtract, z, r, out),
            partial(np.exp, out, out), *row_reduce_ops(np.add, out, r),
            partial(np.divide, out, r, out)]


def _softmax_into(z: Array, out: Array) -> None:
    np.subtract(z, row_reduce(np.maximum, z), out=out)
    np.exp(out, out=out)
    np.divide(out, row_reduce(np.add, out), out=out)


# ------------------------------------------------------------------------------ registry

ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(
        "identity", _identity, _identity_backward,
        forward_into=_identity_into, backward_into=_identity_backward_into,
    ),
    "sigmoid": Activation(
        "sigmoid", sigmoid, _sigmoid_backward, "saturating",
        forward_into=_sigmoid_into, backward_into=_sigmoid_backward_into,
        forward_ops=_sigmoid_ops, backward_ops=_sigmoid_backward_ops,
    ),
    "tanh": Activation(
        "tanh", np.tanh, _tanh_backward, "saturating",
        forward_into=_tanh_into, backward_into=_tanh_backward_into,
        forward_ops=_tanh_ops, backward_ops=_tanh_backward_ops,
    ),
    "relu": Activation(
        "relu", _relu, _relu_backward, "relu",
        forward_into=_relu_into, backward_into=_relu_backward_into,
        forward_ops=_relu_ops, backward_ops=_relu_backward_ops,
    ),
    "leaky_relu": _leaky_relu(0.01),
    "elu": _elu(1.0),
    "gelu": Activation("gelu", _gelu, _gelu_backward),
    "softplus": Activation("softplus", _softplus, _softplus_backward),
    "softmax": Activation(
        "softmax", softmax, _softmax_backward, output_only=True, forward_into=_softmax_into,
        forward_ops=_softmax_ops,
    ),
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
