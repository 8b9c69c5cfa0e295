"""The scalar autodiff oracle: local rules, reverse vs forward mode, branches, the MLP oracle."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from pipeline.engine.autodiff import (
    Dual,
    Value,
    demo_reverse_vs_forward,
    forward_derivative,
    mlp_loss_oracle,
    reverse_gradient,
)

GELU_C = math.sqrt(2.0 / math.pi)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# name -> (apply to a Value/Dual, f on floats, f' on floats written out by hand)
UNARY = {
    "exp": (lambda v: v.exp(), math.exp, math.exp),
    "log": (lambda v: v.log(), math.log, lambda x: 1.0 / x),
    "tanh": (lambda v: v.tanh(), math.tanh, lambda x: 1.0 - math.tanh(x) ** 2),
    "sigmoid": (lambda v: v.sigmoid(), _sig, lambda x: _sig(x) * (1.0 - _sig(x))),
    "relu": (lambda v: v.relu(), lambda x: max(x, 0.0), lambda x: float(x > 0)),
    "leaky_relu": (
        lambda v: v.leaky_relu(0.1),
        lambda x: x if x > 0 else 0.1 * x,
        lambda x: 1.0 if x > 0 else 0.1,
    ),
    "elu": (
        lambda v: v.elu(0.7),
        lambda x: x if x > 0 else 0.7 * (math.exp(x) - 1.0),
        lambda x: 1.0 if x > 0 else 0.7 * math.exp(x),
    ),
    "softplus": (
        lambda v: v.softplus(),
        lambda x: math.log1p(math.exp(x)),
        _sig,
    ),
    "gelu": (
        lambda v: v.gelu(),
        lambda x: 0.5 * x * (1.0 + math.tanh(GELU_C * (x + 0.044715 * x**3))),
        # product rule on 0.5 x (1 + t(x)), t = tanh(u), u = c (x + k x^3)
        lambda x: (
            0.5 * (1.0 + math.tanh(GELU_C * (x + 0.044715 * x**3)))
            + 0.5
            * x
            * (1.0 - math.tanh(GELU_C * (x + 0.044715 * x**3)) ** 2)
            * GELU_C
            * (1.0 + 3 * 0.044715 * x**2)
        ),
    ),
    "abs": (lambda v: v.abs(), abs, lambda x: math.copysign(1.0, x)),
    "neg": (lambda v: -v, lambda x: -x, lambda x: -1.0),
    "pow3": (lambda v: v**3, lambda x: x**3, lambda x: 3 * x**2),
    "pow_half": (lambda v: v**0.5, math.sqrt, lambda x: 0.5 / math.sqrt(x)),
    "rdiv": (lambda v: 2.0 / v, lambda x: 2.0 / x, lambda x: -2.0 / x**2),
    "rsub": (lambda v: 2.0 - v, lambda x: 2.0 - x, lambda x: -1.0),
}
# Points away from every kink (relu, leaky_relu, elu, abs at 0) and inside every domain
# (log, sqrt need x > 0 for the positive points; the negative ones skip those ops).
POINTS = [-2.3, -0.4, 0.3, 1.7]
POSITIVE_ONLY = {"log", "pow_half"}


def _cases():
    for name in UNARY:
        for x in POINTS:
            if name in POSITIVE_ONLY and x <= 0:
                continue
            yield name, x


@pytest.mark.parametrize(("name", "x"), list(_cases()))
def test_unary_rule_matches_analytic_and_finite_differences(name: str, x: float) -> None:
    op, f, df = UNARY[name]
    v = Value(x)
    out = op(v)
    out.backward()
    assert out.data == pytest.approx(f(x), rel=1e-12, abs=1e-14)
    assert v.grad == pytest.approx(df(x), rel=1e-12, abs=1e-14)
    h = 1e-6
    fd = (f(x + h) - f(x - h)) / (2 * h)
    assert v.grad == pytest.approx(fd, rel=1e-7, abs=1e-9)
    # forward mode: same derivative, in one pass for one input
    d = op(Dual(x, 1.0))
    assert d.value == pytest.approx(out.data, rel=1e-15, abs=0)
    assert d.tangent == pytest.approx(v.grad, rel=1e-15, abs=0)


@pytest.mark.parametrize(
    ("op", "da", "db"),
    [
        (lambda a, b: a + b, lambda a, b: 1.0, lambda a, b: 1.0),
        (lambda a, b: a - b, lambda a, b: 1.0, lambda a, b: -1.0),
        (lambda a, b: a * b, lambda a, b: b, lambda a, b: a),
        (lambda a, b: a / b, lambda a, b: 1.0 / b, lambda a, b: -a / b**2),
        (lambda a, b: 3.0 * a + b * 2.0 - 1.0, lambda a, b: 3.0, lambda a, b: 2.0),
    ],
    ids=["add", "sub", "mul", "div", "mixed_constants"],
)
def test_binary_rules(op, da, db) -> None:
    a, b = 1.3, -0.7
    value, (ga, gb) = reverse_gradient(op, (a, b))
    assert value == pytest.approx(op(a, b))
    assert ga == pytest.approx(da(a, b), rel=1e-14)
    assert gb == pytest.approx(db(a, b), rel=1e-14)
    assert forward_derivative(op, (a, b), 0)[1] == pytest.approx(ga, rel=1e-14)
    assert forward_derivative(op, (a, b), 1)[1] == pytest.approx(gb, rel=1e-14)


def test_fused_rules_equal_their_composition_from_primitives() -> None:
    """Ops with a hand-written local rule agree with the same function built from + * exp..."""
    composed = {
        "sigmoid": lambda v: 1.0 / (1.0 + (-v).exp()),
        "softplus": lambda v: (1.0 + v.exp()).log(),
        "gelu": lambda v: 0.5 * v * (1.0 + ((v + 0.044715 * v**3) * GELU_C).tanh()),
        "tanh": lambda v: ((2.0 * v).exp() - 1.0) / ((2.0 * v).exp() + 1.0),
    }
    for name, g in composed.items():
        for x in POINTS:
            v1, v2 = Value(x), Value(x)
            o1, o2 = UNARY[name][0](v1), g(v2)
            o1.backward()
            o2.backward()
            assert o1.data == pytest.approx(o2.data, rel=1e-12), name
            assert v1.grad == pytest.approx(v2.grad, rel=1e-10), name


def _every_op(a, b, c):
    """A function of three inputs touching every operation, shared by both modes."""
    u = (a * b - c / 2.0).tanh() + (a**2 + 1.0).log() - b.sigmoid() * c.exp()
    w = (u * 0.5).elu(0.8) + (c - 0.1).relu() + (b + 0.05).leaky_relu(0.2) + a.gelu()
    return w * b.softplus() - (u - a).abs() + 1.0 / (2.0 + c * c)


def test_forward_mode_equals_reverse_mode() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.uniform(-1.5, 1.5, size=3)
        value, grads = reverse_gradient(_every_op, x)
        for i in range(3):
            fv, d = forward_derivative(_every_op, x, wrt=i)
            assert fv == pytest.approx(value, rel=1e-14)
            assert d == pytest.approx(grads[i], rel=1e-10, abs=1e-12)


def test_gradients_add_at_branches() -> None:
    x = Value(3.0)
    y = x * x  # both factors are the same node: 3 + 3
    y.backward()
    assert x.grad == 6.0

    x = Value(0.5)
    h = x.tanh()  # a reused intermediate node
    f = h * h + h
    f.backward()
    t = math.tanh(0.5)
    assert x.grad == pytest.approx((2 * t + 1) * (1 - t * t), rel=1e-14)

    # The same node as both operands of + (not just *).
    x = Value(2.0)
    (x + x).backward()
    assert x.grad == 2.0


def test_backward_handles_long_chains_without_recursion_limit() -> None:
    x = Value(1.0)
    y = x
    for _ in range(5000):
        y = y + x * 0.001
    y.backward()
    assert x.grad == pytest.approx(1.0 + 5000 * 0.001)


def test_demo_reverse_vs_forward() -> None:
    demo = demo_reverse_vs_forward()
    assert demo["value"] == 14.0
    assert demo["reverse_grads"] == (7.0, 9.0, 2.0)
    assert demo["forward_grads"] == (7.0, 9.0, 2.0)
    # reverse mode: one forward pass and one backward pass give all three partials;
    # forward mode: one pass per input.
    assert demo["reverse_forward_passes"] == 1
    assert demo["reverse_backward_passes"] == 1
    assert demo["forward_passes"] == 3


def test_stable_at_large_arguments() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in (-1e4, 1e4):
            for op in ("sigmoid", "softplus", "tanh", "gelu"):
                v = Value(x)
                out = getattr(v, op)()
                out.backward()
                assert math.isfinite(out.data) and math.isfinite(v.grad), (op, x)
            d = Dual(x, 1.0).softplus()
            assert math.isfinite(d.value) and math.isfinite(d.tangent)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="constant"):
        _ = Value(2.0) ** Value(3.0)
    with pytest.raises(ValueError, match="wrt=3"):
        forward_derivative(lambda a, b: a * b, (1.0, 2.0), wrt=3)
    W = [np.ones((2, 1))]
    with pytest.raises(ValueError, match="loss='nope'"):
        mlp_loss_oracle(W, None, np.ones((1, 2)), np.array([1]), [], "sigmoid", "nope")
    with pytest.raises(ValueError, match="activation='nope'"):
        mlp_loss_oracle(W, None, np.ones((1, 2)), np.array([1]), [], "nope", "mse")


def test_oracle_on_a_1_1_1_chain_by_hand() -> None:
    """x -> sigmoid(w1 x + b1) -> sigmoid(w2 a1 + b2), loss 0.5 (a2 - y)^2, by the chain rule."""
    x, y, w1, b1, w2, b2 = 0.8, 1.0, 0.4, -0.3, 1.2, 0.1
    a1 = _sig(w1 * x + b1)
    a2 = _sig(w2 * a1 + b2)
    d2 = (a2 - y) * a2 * (1 - a2)
    d1 = d2 * w2 * a1 * (1 - a1)
    value, dW, db = mlp_loss_oracle(
        [np.array([[w1]]), np.array([[w2]])],
        [np.array([b1]), np.array([b2])],
        np.array([[x]]),
        np.array([[y]]),
        "sigmoid",
        "sigmoid",
        "half_sse",
    )
    assert value == pytest.approx(0.5 * (a2 - y) ** 2, rel=1e-14)
    np.testing.assert_allclose(
        [dW[0][0, 0], db[0][0], dW[1][0, 0], db[1][0]], [d1 * x, d1, d2 * a1, d2], rtol=1e-13
    )


@pytest.mark.parametrize(
    ("output", "loss", "k"),
    [
        ("softmax", "cross_entropy", 3),
        ("sigmoid", "bce", 1),
        ("identity", "hinge", 1),
        ("identity", "hinge", 3),
        ("identity", "mse", 2),
        ("sigmoid", "half_sse", 2),
    ],
)
def test_oracle_matches_its_own_finite_differences(output: str, loss: str, k: int) -> None:
    """The oracle's gradient is the derivative of the oracle's loss (self-consistency)."""
    rng = np.random.default_rng(1)
    W = [rng.normal(size=(3, 4)), rng.normal(size=(4, k))]
    b = [rng.normal(size=4), rng.normal(size=k)]
    X = rng.normal(size=(5, 3))
    y = rng.integers(0, max(k, 2), size=5)
    value, dW, db = mlp_loss_oracle(W, b, X, y, ["tanh"], output, loss)
    h = 1e-6
    for tensors, grads in ((W, dW), (b, db)):
        for T, G in zip(tensors, grads, strict=True):
            fd = np.zeros_like(T)
            for idx in np.ndindex(T.shape):
                old = T[idx]
                T[idx] = old + h
                up = mlp_loss_oracle(W, b, X, y, "tanh", output, loss)[0]
                T[idx] = old - h
                down = mlp_loss_oracle(W, b, X, y, "tanh", output, loss)[0]
                T[idx] = old
                fd[idx] = (up - down) / (2 * h)
            # hinge kinks: a random draw lands within h of a margin with negligible probability
            np.testing.assert_allclose(G, fd, rtol=1e-6, atol=1e-8)
