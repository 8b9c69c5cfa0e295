"""In-place kernels of the engine's activations and losses, keyed by their names.

The engine states the math once (``Activation.forward`` / ``backward``, ``Loss.delta``);
this module gives the same numbers as *programs*: lists of argument-free numpy calls
bound once to preallocated arrays, which the compiled training step
(:mod:`pipeline.fast.workspace`) runs every step without allocating. On small batches a
step costs its number of numpy calls and the Python around them, on large ones its
passes over memory, so each kernel keeps both to a minimum.

Three entry points, each with a generic fallback so that an activation or a loss
registered in the engine without a kernel here still trains (one allocating call and a
copy per step):

- :func:`forward_program` ``(act, z, out)``: ``out = f(z)``;
- :func:`backward_program` ``(act, z, a, g, scratch)``: ``g *= f'(z)`` in place (``g``
  holds ``dL/da`` on entry, ``dL/dz`` on exit; ``scratch`` may be overwritten);
- :func:`delta_program` ``(loss, output, z, a, T, out)``: ``out = dL/dz`` of the output.

A kernel is used only for the very function the engine registered under its name (a
user-built activation that reuses a name gets the generic path).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from pipeline.engine.activations import ACTIVATIONS, Activation
from pipeline.engine.losses import LOSSES, Loss

Array = np.ndarray
Op = Callable[[], object]

__all__ = [
    "ROW_REDUCE_MAX_COLUMNS", "Op", "backward_program", "bind", "const", "delta_program",
    "forward_program", "fused_delta_kind", "row_reduce_ops", "run",
]


def run(ops: list[Op]) -> None:
    """Run a program once."""
    for op in ops:
        op()


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


# Up to this many columns, a reduction along rows runs as one elementwise call per
# column: numpy's reductions along a short last axis cost about 20 ns a row (10 us on
# 256 rows of 4), the column calls under 1 us each.
ROW_REDUCE_MAX_COLUMNS = 7


def row_reduce_ops(ufunc: np.ufunc, z: Array, out: Array) -> list[Op]:
    """``ufunc.reduce(z, axis=1, keepdims=True)`` into ``out`` (shape ``(n, 1)``).

    For narrow ``z`` the columns are combined left to right, the order numpy's own
    reduction uses on rows this short, so sums and maxima are bit-identical.
    """
    k = z.shape[1]
    if k > ROW_REDUCE_MAX_COLUMNS or k < 2:
        return [partial(ufunc.reduce, z, 1, None, out, True)]
    return [bind(ufunc, z[:, 0:1], z[:, 1:2], out)] + [
        bind(ufunc, out, z[:, j : j + 1], out) for j in range(2, k)
    ]


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


# ------------------------------------------------------------------ activation kernels


def _identity_forward(z: Array, out: Array) -> list[Op]:
    return [partial(np.copyto, out, z)]


def _identity_backward(z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
    return []


# s(z) = (1 + tanh(z / 2)) / 2: the same function as sigmoid() to a few ulp, finite for
# every z (tanh saturates, exp would overflow) and four vectorised passes where the
# branch-free exp form needs seven.
def _sigmoid_forward(z: Array, out: Array) -> list[Op]:
    half = const(0.5, out.dtype)
    return [partial(np.multiply, z, half, out), partial(np.tanh, out, out),
            partial(np.multiply, out, half, out), partial(np.add, out, half, out)]


def _sigmoid_backward(z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
    one = const(1.0, g.dtype)
    return [partial(np.subtract, one, a, scratch), partial(np.multiply, scratch, a, scratch),
            partial(np.multiply, g, scratch, g)]


def _tanh_forward(z: Array, out: Array) -> list[Op]:
    return [partial(np.tanh, z, out)]


def _tanh_backward(z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
    one = const(1.0, g.dtype)
    return [partial(np.multiply, a, a, scratch), partial(np.subtract, one, scratch, scratch),
            partial(np.multiply, g, scratch, g)]


def _relu_forward(z: Array, out: Array) -> list[Op]:
    return [bind(np.maximum, z, _bound(z, 0.0), out)]


# relu'(z) is (z > 0) (the derivative at exactly 0 is taken as 0, the convention of
# PyTorch and sklearn). The comparison writes booleans that must then be cast to floats,
# the slow part on small arrays (1.4 us on 64 x 32 float32). There, on the output
# a = relu(z) >= 0 instead, ceil(fmin(a, 1)) is 1.0 for every a > 0 (denormals included)
# and 0.0 for a == 0, in two plain float passes (0.41 + 0.42 us): the same numbers
# wherever a is not NaN. From about 16,000 values on the passes over memory cost more
# than the cast (59 vs 50 us on a 100,000 x 2 block), so larger arrays compare.
# fmin, unlike minimum, takes a positional ``out``.
RELU_CEIL_MAX_SIZE = 1 << 13


def _relu_backward(z: Array, a: Array, g: Array, scratch: Array) -> list[Op]:
    if a.size > RELU_CEIL_MAX_SIZE:
        return [partial(np.greater, z, const(0.0, g.dtype), scratch),
                partial(np.multiply, g, scratch, g)]
    return [partial(np.fmin, a, _filled_like(a, 1.0), scratch),
            partial(np.ceil, scratch, scratch), partial(np.multiply, g, scratch, g)]


def _leaky_relu_forward_into(z: Array, out: Array, slope: float) -> None:
    np.multiply(z, slope, out=out)
    np.copyto(out, z, where=z > 0)


def _leaky_relu_backward_into(z: Array, a: Array, g: Array, scratch: Array,
                              slope: float) -> None:
    # f'(z) = slope + (1 - slope) * (z > 0), built in the scratch without temporaries.
    np.greater(z, 0.0, out=scratch)
    np.multiply(scratch, 1.0 - slope, out=scratch)
    np.add(scratch, slope, out=scratch)
    np.multiply(g, scratch, out=g)


def _leaky_relu_forward(z: Array, out: Array, slope: float) -> list[Op]:
    return [partial(_leaky_relu_forward_into, z, out, slope)]


def _leaky_relu_backward(z: Array, a: Array, g: Array, scratch: Array,
                         slope: float) -> list[Op]:
    return [partial(_leaky_relu_backward_into, z, a, g, scratch, slope)]


def _elu_forward_into(z: Array, out: Array, alpha: float) -> None:
    np.minimum(z, 0.0, out=out)
    np.expm1(out, out=out)
    np.multiply(out, alpha, out=out)
    np.copyto(out, z, where=z > 0)


def _elu_backward_into(z: Array, a: Array, g: Array, scratch: Array, alpha: float) -> None:
    np.add(a, alpha, out=scratch)
    np.copyto(scratch, 1.0, where=z > 0)
    np.multiply(g, scratch, out=g)


def _elu_forward(z: Array, out: Array, alpha: float) -> list[Op]:
    return [partial(_elu_forward_into, z, out, alpha)]


def _elu_backward(z: Array, a: Array, g: Array, scratch: Array, alpha: float) -> list[Op]:
    return [partial(_elu_backward_into, z, a, g, scratch, alpha)]


def _softmax_forward(z: Array, out: Array) -> list[Op]:
    r = np.empty((z.shape[0], 1), dtype=out.dtype)  # the row maximum, then the row sum
    return [*row_reduce_ops(np.maximum, z, r), partial(np.subtract, z, r, out),
            partial(np.exp, out, out), *row_reduce_ops(np.add, out, r),
            partial(np.divide, out, r, out)]


# name -> kernel; a parametrised activation's kernel takes its params as keywords.
FORWARD_KERNELS: dict[str, Callable[..., list[Op]]] = {
    "identity": _identity_forward, "sigmoid": _sigmoid_forward, "tanh": _tanh_forward,
    "relu": _relu_forward, "leaky_relu": _leaky_relu_forward, "elu": _elu_forward,
    "softmax": _softmax_forward,
}
BACKWARD_KERNELS: dict[str, Callable[..., list[Op]]] = {
    "identity": _identity_backward, "sigmoid": _sigmoid_backward, "tanh": _tanh_backward,
    "relu": _relu_backward, "leaky_relu": _leaky_relu_backward, "elu": _elu_backward,
}


def _function(f: Callable) -> Callable:
    return f.func if isinstance(f, partial) else f


def _registered(act: Activation) -> bool:
    """Whether ``act`` computes what the engine registered under its name (the kernels
    are written for those functions, whatever their parameters)."""
    known = ACTIVATIONS.get(act.name)
    return known is not None and (
        _function(known.forward) is _function(act.forward)
        and _function(known.backward) is _function(act.backward)
    )


def _generic_forward(f: Callable[[Array], Array], z: Array, out: Array) -> None:
    np.copyto(out, f(z))


def _generic_backward(f: Callable, z: Array, a: Array, g: Array) -> None:
    np.copyto(g, f(z, a, g))


def forward_program(act: Activation, z: Array, out: Array) -> list[Op]:
    """Calls that write ``act(z)`` into ``out`` (same shape, not ``z``), bound once."""
    kernel = FORWARD_KERNELS.get(act.name)
    if kernel is None or not _registered(act):
        return [partial(_generic_forward, act.forward, z, out)]
    return kernel(z, out, **act.params)


def backward_program(act: Activation, z: Array, a: Array, g: Array,
                     scratch: Array) -> list[Op]:
    """Calls that turn ``g = dL/da`` into ``dL/dz`` in place, bound once; ``scratch`` is
    an array of ``g``'s shape they may overwrite. ``a`` is ``act(z)``; for relu (and
    identity) ``z`` may be ``a`` itself, as in a layer computed in place."""
    kernel = BACKWARD_KERNELS.get(act.name)
    if kernel is None or not _registered(act):
        return [partial(_generic_backward, act.backward, z, a, g)]
    return kernel(z, a, g, scratch, **act.params)


# ------------------------------------------------------------------------ loss kernels


# Division, not multiplication by 1/n, so the numbers equal the engine's (a - T) / n; n as
# a 0-d array of the dtype (cheaper than the Python int, the same number).
def _residual_over_n(z: Array, a: Array, T: Array, out: Array) -> list[Op]:
    n = const(a.shape[0], out.dtype)
    return [partial(np.subtract, a, T, out), partial(np.divide, out, n, out)]


def _cross_entropy_delta(z: Array, a: Array, T: Array, out: Array) -> list[Op]:
    rows = np.empty((T.shape[0], 1), dtype=out.dtype)  # the targets' row sums
    n = const(a.shape[0], out.dtype)
    return [*row_reduce_ops(np.add, T, rows), partial(np.multiply, a, rows, out),
            partial(np.subtract, out, T, out), partial(np.divide, out, n, out)]


# (loss, output) -> the kind of collapsed gradient (see pipeline.engine.losses).
FUSED_KINDS = {
    ("half_sse", "identity"): "residual_over_n",
    ("bce", "sigmoid"): "residual_over_n",
    ("cross_entropy", "softmax"): "cross_entropy",
}
DELTA_KERNELS = {"residual_over_n": _residual_over_n, "cross_entropy": _cross_entropy_delta}


def fused_delta_kind(loss: Loss, output: Activation) -> str | None:
    """``"residual_over_n"`` (``(a - T) / n``), ``"cross_entropy"`` (``(a * sum(T) - T) /
    n``) or None: which collapsed output gradient the pair has a kernel for."""
    if LOSSES.get(loss.name) is not loss or not _registered(output):
        return None
    return FUSED_KINDS.get((loss.name, output.name))


def _generic_delta(loss: Loss, output: Activation, z: Array, a: Array, T: Array,
                   out: Array) -> None:
    np.copyto(out, loss.delta(z, a, T, output))


def delta_program(loss: Loss, output: Activation, z: Array, a: Array, T: Array,
                  out: Array) -> list[Op]:
    """Calls that write ``dLoss/dz`` of the output layer into ``out``, bound once."""
    kind = fused_delta_kind(loss, output)
    if kind is None:
        return [partial(_generic_delta, loss, output, z, a, T, out)]
    return DELTA_KERNELS[kind](z, a, T, out)
