"""A tiny scalar automatic differentiation, written to be read in one sitting.

Two ways to let the computer apply the chain rule:

* **Reverse mode** (:class:`Value`): every arithmetic operation builds a node that remembers
  its inputs (children) and a *local* backward rule: "given d(output)/d(me), add my share to
  each child's gradient". ``Value.backward()`` walks the graph once, from the output back to
  the inputs, in reverse topological order, so the partial derivatives with respect to *all*
  inputs come out of a single backward pass. A node used twice (``x * x``, a shared hidden
  unit) receives one contribution per use; the contributions ADD (``+=``), which is the
  multivariate chain rule.
* **Forward mode** (:class:`Dual`): every number carries its derivative along with it
  (a dual number ``value + tangent * epsilon`` with ``epsilon**2 = 0``). One forward pass
  gives the derivative with respect to one chosen input, so a function of ``k`` inputs needs
  ``k`` passes for its full gradient.

:func:`demo_reverse_vs_forward` shows both on ``f = (a + b) * (b + c)``.

:func:`mlp_loss_oracle` builds a whole multi-layer perceptron and its loss out of
:class:`Value` scalars. It shares no code with :mod:`pipeline.engine.mlp`, so the tests can hold the
layer-wise, matrix-form backpropagation against a second, differently built gradient.
It is slow (one Python object per scalar operation) and meant for tiny networks only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Value",
    "Dual",
    "forward_derivative",
    "reverse_gradient",
    "demo_reverse_vs_forward",
    "mlp_loss_oracle",
    "ORACLE_ACTIVATIONS",
    "ORACLE_LOSSES",
]

# Constant of the tanh approximation of GELU (Hendrycks & Gimpel 2016), as in the engine.
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def _sigmoid(x: float) -> float:
    """Logistic function without overflow: exp is only ever taken of a non-positive number."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softplus(x: float) -> float:
    """log(1 + exp(x)) computed as max(x, 0) + log1p(exp(-|x|)) so it never overflows."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


# --------------------------------------------------------------------------- reverse mode


class Value:
    """A scalar node of an expression graph, with its gradient.

    Parameters
    ----------
    data : float
        The value computed in the forward pass.
    children : tuple of Value
        The nodes this one was computed from.
    op : str
        Name of the operation, for printing the graph.

    Attributes
    ----------
    grad : float
        d(output)/d(self) after ``output.backward()``; 0 before.
    """

    __slots__ = ("data", "grad", "_children", "_backward", "op")

    def __init__(self, data: float, children: tuple[Value, ...] = (), op: str = "") -> None:
        self.data = float(data)
        self.grad = 0.0
        self._children = children
        # The local rule: reads self.grad, adds into each child's .grad. Leaves have none.
        self._backward: Callable[[], None] = lambda: None
        self.op = op

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"

    # -- binary operations -------------------------------------------------------------

    def __add__(self, other: Value | float) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other), "+")

        def _backward() -> None:
            # d(a+b)/da = d(a+b)/db = 1
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other: Value | float) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other), "*")

        def _backward() -> None:
            # d(ab)/da = b, d(ab)/db = a. For x * x both lines hit x: 2x in total.
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def __pow__(self, k: float) -> Value:
        if isinstance(k, Value):
            raise TypeError("Value ** Value is not supported; the exponent must be a constant")
        k = float(k)
        out = Value(self.data**k, (self,), f"**{k:g}")

        def _backward() -> None:
            self.grad += k * self.data ** (k - 1.0) * out.grad

        out._backward = _backward
        return out

    def __truediv__(self, other: Value | float) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data / other.data, (self, other), "/")

        def _backward() -> None:
            # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
            self.grad += out.grad / other.data
            other.grad -= self.data / other.data**2 * out.grad

        out._backward = _backward
        return out

    def __neg__(self) -> Value:
        out = Value(-self.data, (self,), "neg")

        def _backward() -> None:
            self.grad -= out.grad

        out._backward = _backward
        return out

    def __sub__(self, other: Value | float) -> Value:
        return self + (-other)

    def __radd__(self, other: float) -> Value:
        return self + other

    def __rsub__(self, other: float) -> Value:
        return (-self) + other

    def __rmul__(self, other: float) -> Value:
        return self * other

    def __rtruediv__(self, other: float) -> Value:
        return Value(other) / self

    # -- unary operations: each is (forward value, local derivative) --------------------

    def _unary(self, data: float, local_grad: float, op: str) -> Value:
        """A node whose derivative with respect to its single child is ``local_grad``."""
        out = Value(data, (self,), op)

        def _backward() -> None:
            self.grad += local_grad * out.grad

        out._backward = _backward
        return out

    def exp(self) -> Value:
        e = math.exp(self.data)
        return self._unary(e, e, "exp")

    def log(self) -> Value:
        return self._unary(math.log(self.data), 1.0 / self.data, "log")

    def tanh(self) -> Value:
        t = math.tanh(self.data)
        return self._unary(t, 1.0 - t * t, "tanh")

    def sigmoid(self) -> Value:
        s = _sigmoid(self.data)
        return self._unary(s, s * (1.0 - s), "sigmoid")

    def relu(self) -> Value:
        """max(x, 0). The derivative at the kink x = 0 is taken as 0."""
        x = self.data
        return self._unary(max(x, 0.0), 1.0 if x > 0 else 0.0, "relu")

    def leaky_relu(self, slope: float = 0.01) -> Value:
        x = self.data
        return self._unary(x if x > 0 else slope * x, 1.0 if x > 0 else slope, "leaky_relu")

    def elu(self, alpha: float = 1.0) -> Value:
        x = self.data
        if x > 0:
            return self._unary(x, 1.0, "elu")
        e = math.exp(x)
        return self._unary(alpha * (e - 1.0), alpha * e, "elu")

    def softplus(self) -> Value:
        # d/dx log(1 + e^x) = sigmoid(x)
        return self._unary(_softplus(self.data), _sigmoid(self.data), "softplus")

    def gelu(self) -> Value:
        """Tanh approximation: 0.5 x (1 + tanh(c (x + k x^3))), c = sqrt(2/pi), k = 0.044715."""
        x = self.data
        t = math.tanh(_GELU_C * (x + _GELU_K * x**3))
        dt = (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_K * x * x)
        return self._unary(0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * dt, "gelu")

    def abs(self) -> Value:
        """|x|. The derivative at the kink x = 0 is taken as 0."""
        x = self.data
        return self._unary(abs(x), 1.0 if x > 0 else (-1.0 if x < 0 else 0.0), "abs")

    def identity(self) -> Value:
        return self

    # -- the backward pass ---------------------------------------------------------------

    def backward(self) -> None:
        """Fill ``.grad`` of every node in the graph with d(self)/d(node).

        A node's gradient is complete only once every node that uses it has passed its
        share back, so nodes are visited in reverse topological order (users before the
        nodes they use). Gradients are *accumulated*: call on a fresh graph (or zero the
        ``.grad`` fields) to avoid adding to an earlier pass.
        """
        order: list[Value] = []
        visited: set[int] = set()
        # Iterative depth-first search (post-order): a long chain of sums must not hit
        # Python's recursion limit.
        stack: list[tuple[Value, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for child in node._children:
                if id(child) not in visited:
                    stack.append((child, False))
        self.grad = 1.0  # d(self)/d(self)
        for node in reversed(order):
            node._backward()


def reverse_gradient(f: Callable[..., Value], inputs: Sequence[float]) -> tuple[float, list[float]]:
    """Value and all partial derivatives of ``f`` at ``inputs`` with one backward pass.

    Parameters
    ----------
    f : callable
        ``f(*xs)`` built from arithmetic and the methods of :class:`Value`.
    inputs : sequence of float, length k

    Returns
    -------
    value : float
    grads : list of float, length k
    """
    xs = [Value(x) for x in inputs]
    out = f(*xs)
    out.backward()
    return out.data, [x.grad for x in xs]


# --------------------------------------------------------------------------- forward mode


class Dual:
    """A dual number ``value + tangent * epsilon`` with ``epsilon**2 = 0``.

    Arithmetic on duals carries the derivative along: (u + u' e)(v + v' e) = uv + (u'v + uv') e.
    Seed the input of interest with tangent 1 (the others with 0) and the output's tangent is
    the derivative with respect to that input.
    """

    __slots__ = ("value", "tangent")

    def __init__(self, value: float, tangent: float = 0.0) -> None:
        self.value = float(value)
        self.tangent = float(tangent)

    def __repr__(self) -> str:
        return f"Dual(value={self.value:.6g}, tangent={self.tangent:.6g})"

    @staticmethod
    def _lift(x: Dual | float) -> Dual:
        return x if isinstance(x, Dual) else Dual(x, 0.0)

    def __add__(self, other: Dual | float) -> Dual:
        o = self._lift(other)
        return Dual(self.value + o.value, self.tangent + o.tangent)

    def __mul__(self, other: Dual | float) -> Dual:
        o = self._lift(other)
        return Dual(self.value * o.value, self.tangent * o.value + self.value * o.tangent)

    def __truediv__(self, other: Dual | float) -> Dual:
        o = self._lift(other)
        return Dual(
            self.value / o.value,
            (self.tangent * o.value - self.value * o.tangent) / o.value**2,
        )

    def __pow__(self, k: float) -> Dual:
        if isinstance(k, Dual):
            raise TypeError("Dual ** Dual is not supported; the exponent must be a constant")
        k = float(k)
        return Dual(self.value**k, k * self.value ** (k - 1.0) * self.tangent)

    def __neg__(self) -> Dual:
        return Dual(-self.value, -self.tangent)

    def __sub__(self, other: Dual | float) -> Dual:
        return self + (-self._lift(other))

    def __radd__(self, other: float) -> Dual:
        return self + other

    def __rsub__(self, other: float) -> Dual:
        return (-self) + other

    def __rmul__(self, other: float) -> Dual:
        return self * other

    def __rtruediv__(self, other: float) -> Dual:
        return Dual(other) / self

    # Unary functions: value f(x), tangent f'(x) * x'. The local derivatives are the same
    # formulas as in Value; only the direction in which they are applied differs.
    def _chain(self, value: float, local_grad: float) -> Dual:
        return Dual(value, local_grad * self.tangent)

    def exp(self) -> Dual:
        e = math.exp(self.value)
        return self._chain(e, e)

    def log(self) -> Dual:
        return self._chain(math.log(self.value), 1.0 / self.value)

    def tanh(self) -> Dual:
        t = math.tanh(self.value)
        return self._chain(t, 1.0 - t * t)

    def sigmoid(self) -> Dual:
        s = _sigmoid(self.value)
        return self._chain(s, s * (1.0 - s))

    def relu(self) -> Dual:
        x = self.value
        return self._chain(max(x, 0.0), 1.0 if x > 0 else 0.0)

    def leaky_relu(self, slope: float = 0.01) -> Dual:
        x = self.value
        return self._chain(x if x > 0 else slope * x, 1.0 if x > 0 else slope)

    def elu(self, alpha: float = 1.0) -> Dual:
        x = self.value
        if x > 0:
            return self._chain(x, 1.0)
        e = math.exp(x)
        return self._chain(alpha * (e - 1.0), alpha * e)

    def softplus(self) -> Dual:
        return self._chain(_softplus(self.value), _sigmoid(self.value))

    def gelu(self) -> Dual:
        x = self.value
        t = math.tanh(_GELU_C * (x + _GELU_K * x**3))
        dt = (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_K * x * x)
        return self._chain(0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * dt)

    def abs(self) -> Dual:
        x = self.value
        return self._chain(abs(x), 1.0 if x > 0 else (-1.0 if x < 0 else 0.0))

    def identity(self) -> Dual:
        return self


def forward_derivative(
    f: Callable[..., Dual], inputs: Sequence[float], wrt: int
) -> tuple[float, float]:
    """Value of ``f`` at ``inputs`` and its partial derivative along input ``wrt``: one pass.

    Parameters
    ----------
    f : callable
        ``f(*xs)`` built from arithmetic and the methods of :class:`Dual`.
    inputs : sequence of float, length k
    wrt : int
        Index (0 <= wrt < k) of the input to differentiate with respect to.

    Returns
    -------
    value, derivative : float
    """
    if not 0 <= wrt < len(inputs):
        raise ValueError(f"wrt={wrt!r} is out of range; allowed: 0..{len(inputs) - 1}")
    xs = [Dual(x, 1.0 if i == wrt else 0.0) for i, x in enumerate(inputs)]
    out = f(*xs)
    return out.value, out.tangent


def demo_reverse_vs_forward(a: float = -1.0, b: float = 3.0, c: float = 4.0) -> dict[str, Any]:
    """f = (a + b)(b + c): all partials from reverse mode (1 pass) and forward mode (3 passes).

    At a=-1, b=3, c=4: f = 2 * 7 = 14, df/da = b + c = 7, df/db = (b + c) + (a + b) = 9
    (b is used twice and the two contributions add), df/dc = a + b = 2.

    Returns
    -------
    dict
        ``value`` (float), ``reverse_grads`` and ``forward_grads`` (tuples of 3 floats,
        ordered a, b, c), ``reverse_forward_passes`` (1), ``reverse_backward_passes`` (1),
        ``forward_passes`` (3: one per input).
    """
    calls = {"n": 0}

    def f(a: Any, b: Any, c: Any) -> Any:  # the same code runs on Value and on Dual
        calls["n"] += 1
        return (a + b) * (b + c)

    value, rev = reverse_gradient(f, (a, b, c))
    reverse_calls = calls["n"]
    calls["n"] = 0
    fwd = tuple(forward_derivative(f, (a, b, c), wrt=i)[1] for i in range(3))
    return {
        "value": value,
        "reverse_grads": tuple(rev),
        "reverse_forward_passes": reverse_calls,
        "reverse_backward_passes": 1,
        "forward_grads": fwd,
        "forward_passes": calls["n"],
    }


# --------------------------------------------------------------------------- MLP oracle
# Everything below builds the network out of Value scalars, one node per multiply-add, so
# the gradient comes from the generic topological walk above and not from any layer-wise
# formula. Only tiny networks are practical (a few thousand nodes).

ORACLE_ACTIVATIONS: tuple[str, ...] = (
    "identity",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "softplus",
    "softmax",
)
ORACLE_LOSSES: tuple[str, ...] = ("mse", "half_sse", "bce", "cross_entropy", "hinge")


def _activate(name: str, row: list[Value], params: dict[str, float]) -> list[Value]:
    """Apply activation ``name`` to one row (one sample's layer pre-activations)."""
    if name == "softmax":
        # Subtracting the row maximum (a constant) leaves softmax unchanged and keeps exp
        # from overflowing; as a constant it contributes nothing to the gradient.
        m = max(v.data for v in row)
        exps = [(v - m).exp() for v in row]
        total = _sum(exps)
        return [e / total for e in exps]
    if name == "leaky_relu":
        return [v.leaky_relu(params.get("slope", 0.01)) for v in row]
    if name == "elu":
        return [v.elu(params.get("alpha", 1.0)) for v in row]
    if name not in ORACLE_ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; known: {', '.join(ORACLE_ACTIVATIONS)}")
    return [getattr(v, name)() for v in row]


def _sum(values: Iterable[Value | float]) -> Value:
    total: Value | float = 0.0
    for v in values:
        total = v + total
    assert isinstance(total, Value)
    return total


def _log_sum_exp(row: list[Value]) -> Value:
    m = max(v.data for v in row)  # constant shift, see _activate
    return _sum((v - m).exp() for v in row).log() + m


def _sample_loss(
    loss: str, z: list[Value], a: list[Value], t: np.ndarray, label: int | None, output: str
) -> Value:
    """Loss of one sample, before averaging over the batch.

    ``z`` are the output pre-activations (logits), ``a`` the outputs after the output
    activation, ``t`` the float target row (one-hot for classes) and ``label`` the integer
    class (None for regression targets).
    """
    k = len(z)
    if loss == "mse":
        # mean over the output units as well as the batch
        return _sum((ai - float(ti)) ** 2 for ai, ti in zip(a, t, strict=True)) / k
    if loss == "half_sse":
        return 0.5 * _sum((ai - float(ti)) ** 2 for ai, ti in zip(a, t, strict=True))
    if loss == "bce":
        if output == "sigmoid":
            # From the logit: -[t log s(z) + (1-t) log(1-s(z))] = softplus(z) - t z, with
            # softplus(z) = relu(z) + log(1 + exp(-|z|)): written out in primitive ops.
            terms = [
                zi.relu() + ((-zi.abs()).exp() + 1.0).log() - float(ti) * zi
                for zi, ti in zip(z, t, strict=True)
            ]
        else:
            terms = [
                -(float(ti) * ai.log() + (1.0 - float(ti)) * (1.0 - ai).log())
                for ai, ti in zip(a, t, strict=True)
            ]
        # Summed over the output units (independent binary labels), like scikit-learn's
        # binary log loss; only the squared error 'mse' averages over units too.
        return _sum(terms)
    if loss == "cross_entropy":
        if output == "softmax":
            # -sum_j t_j log softmax(z)_j = sum_j t_j (logsumexp(z) - z_j)
            lse = _log_sum_exp(z)
            return _sum(float(tj) * (lse - zj) for zj, tj in zip(z, t, strict=True) if tj != 0)
        return -_sum(float(tj) * aj.log() for aj, tj in zip(a, t, strict=True) if tj != 0)
    if loss == "hinge":
        if k == 1:
            sign = 2.0 * float(t[0]) - 1.0  # labels {0, 1} -> {-1, +1}
            return (1.0 - sign * a[0]).relu()
        if label is None:
            label = int(np.argmax(t))
        # Multi-class (Weston-Watkins, as in CS231n): sum over wrong classes of
        # max(0, 1 + a_j - a_label).
        return _sum((1.0 + a[j] - a[label]).relu() for j in range(k) if j != label)
    raise ValueError(f"loss={loss!r} is unknown; known: {', '.join(ORACLE_LOSSES)}")


def mlp_loss_oracle(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray] | None,
    X: np.ndarray,
    y: np.ndarray,
    activations: str | Sequence[str],
    output: str,
    loss: str,
    activation_params: dict[str, float] | None = None,
) -> tuple[float, list[np.ndarray], list[np.ndarray] | None]:
    """Loss of an MLP and its gradients, computed by scalar reverse-mode autodiff.

    An independent second implementation of ``MLP.loss_and_grads``: the forward pass and
    the loss are built from :class:`Value` scalars and differentiated by one topological
    backward walk; no layer-wise backpropagation formula is used.

    Parameters
    ----------
    weights : list of arrays, shapes (fan_in, fan_out)
    biases : list of arrays, shapes (fan_out,), or None for a network without biases
    X : array, shape (n_samples, n_features)
    y : array, shape (n_samples,) of int labels, or (n_samples, n_outputs) float targets.
        Int labels become one column for a 1-unit output and one-hot rows for k > 1 units.
    activations : str or list of str
        Hidden activation(s): one name for every hidden layer, or one per hidden layer.
    output : str
        Output activation name.
    loss : str
        One of ``mse``, ``half_sse``, ``bce``, ``cross_entropy``, ``hinge``; summed over the
        output units and averaged over the batch, except ``mse``, the mean over both
        (the conventions of :mod:`pipeline.engine.losses`). Hinge with one unit maps labels
        {0, 1} to {-1, +1}; with k units it is the Weston-Watkins multi-class hinge.
    activation_params : dict, optional
        ``slope`` for leaky_relu, ``alpha`` for elu.

    Returns
    -------
    loss_value : float
    dW : list of arrays, same shapes as ``weights``
    db : list of arrays, same shapes as ``biases``, or None when ``biases`` is None
    """
    params = dict(activation_params or {})
    X = np.asarray(X, dtype=np.float64)
    n, n_layers = X.shape[0], len(weights)
    k = int(np.shape(weights[-1])[1])
    hidden = [activations] * (n_layers - 1) if isinstance(activations, str) else list(activations)
    if len(hidden) != n_layers - 1:
        raise ValueError(
            f"activations has {len(hidden)} entries; the network has {n_layers - 1} hidden layers"
        )
    y = np.asarray(y)
    labels: np.ndarray | None = None
    if y.ndim == 1:
        labels = y.astype(int)
        T = labels.reshape(-1, 1).astype(np.float64) if k == 1 else np.eye(k)[labels]
    else:
        T = y.astype(np.float64)

    W = [[[Value(w) for w in row] for row in np.asarray(Wl, dtype=np.float64)] for Wl in weights]
    B = (
        None
        if biases is None
        else [[Value(b) for b in np.asarray(bl, dtype=np.float64)] for bl in biases]
    )

    total: Value | float = 0.0
    for i in range(n):
        a: list[Value] = [Value(x) for x in X[i]]  # inputs: leaves we never read back
        z: list[Value] = a
        for layer in range(n_layers):
            fan_out = len(W[layer][0])
            z = [
                _sum(a[p] * W[layer][p][q] for p in range(len(a)))
                + (B[layer][q] if B is not None else 0.0)
                for q in range(fan_out)
            ]
            name = hidden[layer] if layer < n_layers - 1 else output
            a = _activate(name, z, params)
        label = None if labels is None or k == 1 else int(labels[i])
        total = _sample_loss(loss, z, a, T[i], label, output) + total
    assert isinstance(total, Value)
    mean_loss = total / n
    mean_loss.backward()

    dW = [np.array([[w.grad for w in row] for row in Wl]) for Wl in W]
    db = None if B is None else [np.array([b.grad for b in bl]) for bl in B]
    return mean_loss.data, dW, db
