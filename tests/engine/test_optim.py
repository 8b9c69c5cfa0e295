"""Tests for pipeline.engine.optim: every optimiser against a straightforward reference.

Parametrised over OPTIMIZERS / SCHEDULES so a new entry is tested by being registered
(the reference below then needs its rule too, and says so when it is missing).
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np
import pytest

from pipeline.engine.optim import OPTIMIZERS, SCHEDULES, Optimizer, make_optimizer, make_schedule

NAMES = sorted(OPTIMIZERS)


# --------------------------------------------------------------------------------------
# Reference: allocating, one formula per line, written from the papers / PyTorch docs.
# state is a dict of arrays (missing keys mean zeros); t counts steps from 1.
# --------------------------------------------------------------------------------------
def _ref_sgd(p, g, state, t, lr):
    return p - lr * g, state


def _ref_momentum(p, g, state, t, lr, momentum=0.9):
    buf = momentum * state.get("buf", 0.0) + g
    return p - lr * buf, {"buf": buf}


def _ref_nesterov(p, g, state, t, lr, momentum=0.9):
    buf = momentum * state.get("buf", 0.0) + g
    return p - lr * (g + momentum * buf), {"buf": buf}


def _ref_adagrad(p, g, state, t, lr, eps=1e-10):
    s = state.get("s", 0.0) + g * g
    return p - lr * g / (np.sqrt(s) + eps), {"s": s}


def _ref_rmsprop(p, g, state, t, lr, rho=0.9, eps=1e-8):
    v = rho * state.get("v", 0.0) + (1 - rho) * g * g
    return p - lr * g / (np.sqrt(v) + eps), {"v": v}


def _ref_adam(p, g, state, t, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    m = beta1 * state.get("m", 0.0) + (1 - beta1) * g
    v = beta2 * state.get("v", 0.0) + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), {"m": m, "v": v}


REFERENCE_RULES = {
    "sgd": _ref_sgd,
    "momentum": _ref_momentum,
    "nesterov": _ref_nesterov,
    "adagrad": _ref_adagrad,
    "rmsprop": _ref_rmsprop,
    "adam": _ref_adam,
    "adamw": _ref_adam,  # the same Adam step; only the decay differs (below)
}
DECOUPLED = {"adamw"}


def reference_step(
    name: str,
    params: np.ndarray,
    grad: np.ndarray,
    state: dict[str, Any],
    t: int,
    *,
    lr: float,
    n_weight_params: int,
    weight_decay: float = 0.0,
    l1: float = 0.0,
    **hp: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One update of optimiser ``name``, allocating freely; returns (new params, new state)."""
    assert name in REFERENCE_RULES, f"add a reference rule for optimizer {name!r}"
    nw = n_weight_params
    p = params.copy()
    g = grad.copy()
    if name not in DECOUPLED:
        g[:nw] = g[:nw] + weight_decay * p[:nw]
    g[:nw] = g[:nw] + l1 * np.sign(p[:nw])
    if name in DECOUPLED:
        p[:nw] = p[:nw] - lr * weight_decay * p[:nw]
    return REFERENCE_RULES[name](p, g, state, t, lr, **hp)


# --------------------------------------------------------------------------------------
# Problems: a convex quadratic and a small logistic regression, gradients by hand.
# --------------------------------------------------------------------------------------
def _quadratic(n: int = 6, cond: float = 10.0):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(np.linspace(1.0, cond, n)) @ q.T  # SPD, eigenvalues 1..cond
    b = rng.normal(size=n)
    x_star = np.linalg.solve(a, b)

    def loss(x):
        return 0.5 * x @ a @ x - b @ x

    def grad(x):
        return a @ x - b

    return loss, grad, x_star


def _logistic(n: int = 200, d: int = 3):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n, d))
    logits = X @ np.array([2.0, -1.0, 0.5]) + 0.3
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(float)

    def loss(theta):  # theta = [w (d), b]: weights first, as the model lays them out
        z = X @ theta[:d] + theta[d]
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    def grad(theta):
        r = 1.0 / (1.0 + np.exp(-(X @ theta[:d] + theta[d]))) - y
        return np.concatenate([X.T @ r / n, [r.mean()]])

    # The optimum by Newton's method, an independent route to the minimum.
    Xb = np.hstack([X, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    for _ in range(25):
        s = 1.0 / (1.0 + np.exp(-(Xb @ theta)))
        theta -= np.linalg.solve(Xb.T @ (Xb * (s * (1 - s))[:, None]) / n, grad(theta))
    return loss, grad, d, loss(theta)


# Learning rates that suit these two small problems; an optimiser missing here is
# tried at its own default.
TEST_LR = {
    "sgd": 0.1,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adagrad": 0.5,
    "rmsprop": 0.01,
    "adam": 0.05,
    "adamw": 0.05,
}


def _run(name: str, grad_fn, x0: np.ndarray, n_weight: int, steps: int, **kw) -> np.ndarray:
    opt = make_optimizer(name, lr=TEST_LR.get(name), **kw).bind(x0.size, n_weight, x0.dtype)
    x = x0.copy()
    for _ in range(steps):
        opt.step(x, grad_fn(x))
    return x


def test_required_optimizers_are_registered():
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"} <= set(NAMES)
    assert {"constant", "step", "exponential", "cosine", "inverse_scaling"} <= set(SCHEDULES)


@pytest.mark.parametrize("name", NAMES)
def test_reduces_quadratic_gap_100x(name):
    loss, grad, x_star = _quadratic()
    x0 = np.zeros(x_star.size)
    x = _run(name, grad, x0, x0.size, steps=300, weight_decay=0.0)
    gap0 = loss(x0) - loss(x_star)
    assert loss(x) - loss(x_star) <= gap0 / 100


@pytest.mark.parametrize("name", NAMES)
def test_reduces_logistic_gap_10x(name):
    loss, grad, d, best = _logistic()
    x0 = np.zeros(d + 1)
    x = _run(name, grad, x0, d, steps=300)
    assert loss(x) - best <= (loss(x0) - best) / 10  # loss(x0) = log 2, best ~ 0.415


def test_adam_first_three_steps_by_hand():
    # Kingma & Ba (2015), Algorithm 1, lr 0.1, beta1 0.9, beta2 0.999, eps 1e-8, on a
    # fixed gradient sequence; every number below follows the formula on paper.
    lr, eps = 0.1, 1e-8
    opt = make_optimizer("adam", lr=lr).bind(2, 2, np.float64)
    p = np.array([1.0, -0.5])
    grads = [np.array([0.2, -0.1]), np.array([0.1, 0.3]), np.array([-0.3, 0.2])]

    # t=1: m = 0.1 g, v = 0.001 g^2, so m_hat = g, v_hat = g^2 and the step is
    # lr * g / (|g| + eps): about lr in each coordinate.
    opt.step(p, grads[0])
    want1 = [1.0 - lr * 0.2 / (0.2 + eps), -0.5 + lr * 0.1 / (0.1 + eps)]
    np.testing.assert_allclose(p, want1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(p, [0.900000005, -0.40000001], rtol=0, atol=1e-12)

    # t=2, g = (0.1, 0.3): m = 0.9 m1 + 0.1 g, v = 0.999 v1 + 0.001 g^2,
    # bias corrections 1 - 0.9^2 = 0.19 and 1 - 0.999^2 = 0.001999.
    m2 = [0.9 * 0.02 + 0.1 * 0.1, 0.9 * -0.01 + 0.1 * 0.3]  # (0.028, 0.021)
    v2 = [0.999 * 4e-5 + 0.001 * 0.01, 0.999 * 1e-5 + 0.001 * 0.09]  # (4.996e-5, 9.999e-5)
    opt.step(p, grads[1])
    want2 = [
        w - lr * (m / 0.19) / (math.sqrt(v / 0.001999) + eps)
        for w, m, v in zip(want1, m2, v2, strict=True)
    ]
    np.testing.assert_allclose(p, want2, rtol=1e-13)
    np.testing.assert_allclose(p, [0.806782047015, -0.449418991120], rtol=0, atol=1e-11)

    # t=3, g = (-0.3, 0.2): corrections 1 - 0.9^3 = 0.271, 1 - 0.999^3 = 0.002997001.
    m3 = [0.9 * m2[0] + 0.1 * -0.3, 0.9 * m2[1] + 0.1 * 0.2]  # (-0.0048, 0.0389)
    v3 = [0.999 * v2[0] + 0.001 * 0.09, 0.999 * v2[1] + 0.001 * 0.04]
    opt.step(p, grads[2])
    want3 = [
        w - lr * (m / 0.271) / (math.sqrt(v / 0.002997001) + eps)
        for w, m, v in zip(want2, m3, v3, strict=True)
    ]
    np.testing.assert_allclose(p, want3, rtol=1e-13)
    np.testing.assert_allclose(p, [0.814979726421, -0.515859107371], rtol=0, atol=1e-11)
    assert opt.t == 3


PENALTIES = {
    "plain": {"weight_decay": 0.0, "l1": 0.0},
    "l2": {"weight_decay": 0.05, "l1": 0.0},
    "l1": {"weight_decay": 0.0, "l1": 0.01},
    "l2+l1": {"weight_decay": 0.05, "l1": 0.01},
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("name", NAMES)
def test_in_place_step_equals_reference(name, penalty, dtype):
    # 20 steps on a fixed gradient sequence, with a step schedule halving lr every
    # 4 epochs and 2 steps per epoch, so a learning-rate change is exercised too.
    n, nw, lr = 23, 17, 0.03
    rng = np.random.default_rng(7)
    p0 = rng.normal(size=n).astype(dtype)
    grads = rng.normal(size=(20, n)).astype(dtype)
    pen = PENALTIES[penalty]
    opt = make_optimizer(
        name, lr=lr, schedule="step", schedule_params={"step_size": 4, "gamma": 0.5}, **pen
    ).bind(n, nw, dtype)
    hp = dict(opt.hyper)  # the optimiser's own hyper-parameters at their defaults

    p = p0.copy()
    p_ref, state = p0.copy(), {}
    for i, g in enumerate(grads):
        epoch = 1 + i // 2
        opt.set_epoch(epoch)
        lr_i = lr * 0.5 ** ((epoch - 1) // 4)
        assert opt.current_lr == pytest.approx(lr_i, rel=1e-15)
        g_before = g.copy()
        opt.step(p, g)
        np.testing.assert_array_equal(g, g_before)  # the caller's gradient is untouched
        p_ref, state = reference_step(
            name, p_ref, g, state, i + 1, lr=lr_i, n_weight_params=nw, **pen, **hp
        )
        assert p.dtype == dtype and p_ref.dtype == dtype
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == np.float64 else {"rtol": 2e-5, "atol": 1e-6}
    np.testing.assert_allclose(p, p_ref, **tol)


@pytest.mark.parametrize("name", NAMES)
def test_penalties_touch_only_weights(name):
    # Zero loss gradient: any movement comes from the penalties, and must stay in
    # params[:n_weight_params].
    n, nw = 10, 6
    p0 = np.linspace(-1.0, 1.5, n)
    p0[2] = 0.3
    # lr small enough that no adaptive step (about lr in size) jumps a weight across 0.
    opt = make_optimizer(name, lr=0.01, weight_decay=0.1, l1=0.01).bind(n, nw, np.float64)
    p = p0.copy()
    for _ in range(3):
        opt.step(p, np.zeros(n))
    np.testing.assert_array_equal(p[nw:], p0[nw:])
    assert np.all(np.abs(p[:nw]) < np.abs(p0[:nw]))  # every weight shrank towards 0


def test_adamw_decay_is_decoupled():
    # With a zero gradient Adam's step is 0, so AdamW moves w by exactly -lr*wd*w,
    # whereas coupled L2 in Adam normalises wd*w to a step of about lr.
    p = np.array([2.0, -4.0, 1.0])
    opt = make_optimizer("adamw", lr=0.1, weight_decay=0.5).bind(3, 2, np.float64)
    opt.step(p, np.zeros(3))
    np.testing.assert_allclose(p, [2.0 * 0.95, -4.0 * 0.95, 1.0], rtol=1e-15)
    assert make_optimizer("adamw").weight_decay == 0.01
    assert make_optimizer("adam").weight_decay == 0.0


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("constant", {}, {1: 0.1, 7: 0.1, 1000: 0.1}),
        ("step", {"step_size": 3, "gamma": 0.5}, {1: 0.1, 3: 0.1, 4: 0.05, 6: 0.05, 7: 0.025}),
        ("step", {}, {10: 0.1, 11: 0.05}),  # defaults: halve every 10 epochs
        ("exponential", {"gamma": 0.9}, {1: 0.1, 2: 0.09, 3: 0.081}),
        ("cosine", {"t_max": 11, "min_lr": 0.01}, {1: 0.1, 6: 0.055, 11: 0.01, 50: 0.01}),
        ("cosine", {"t_max": 5, "eta_min": 0.02}, {1: 0.1, 3: 0.06, 5: 0.02}),
        ("cosine", {"t_max": 1}, {1: 0.1}),
        ("inverse_scaling", {}, {1: 0.1, 4: 0.05, 100: 0.01}),
        ("inverse_scaling", {"power_t": 1.0}, {1: 0.1, 5: 0.02}),
    ],
)
def test_schedule_values(name, params, expected):
    sched = make_schedule(name, 0.1, **params)
    for epoch, lr in expected.items():
        assert sched(epoch) == pytest.approx(lr, rel=1e-12), epoch
    opt = make_optimizer("sgd", lr=0.1, schedule=name, schedule_params=params)
    for epoch, lr in expected.items():
        assert opt.set_epoch(epoch) == pytest.approx(lr, rel=1e-12)
        assert opt.current_lr == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_starts_at_lr_and_never_grows(name):
    params = {"t_max": 20} if name == "cosine" else {}
    sched = make_schedule(name, 0.3, **params)
    values = [sched(e) for e in range(1, 60)]
    assert values[0] == pytest.approx(0.3)
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:], strict=False))
    assert all(v >= 0 for v in values)


@pytest.mark.parametrize("name", NAMES)
def test_buffers_are_reused_and_steps_allocate_nothing(name):
    n = 100_000
    opt = make_optimizer(
        name, lr=0.01, weight_decay=0.01, l1=0.001, schedule="cosine",
        schedule_params={"t_max": 10},
    ).bind(n, n // 2, np.float32)
    before = opt.buffers()
    p = np.ones(n, np.float32)
    g = np.full(n, 0.5, np.float32)
    opt.step(p, g)  # warm up any lazily created numpy internals
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for epoch in range(1, 6):
            opt.set_epoch(epoch)
            opt.step(p, g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A single temporary of params' size would be 400 kB.
    assert peak - base < 20_000
    after = opt.buffers()
    assert before.keys() == after.keys()
    assert all(after[k] is before[k] for k in before)
    assert p.dtype == np.float32


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_exactly(name):
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(10, 8))
    a = make_optimizer(name, lr=0.05, weight_decay=0.01).bind(8, 5, np.float64)
    p_a = np.ones(8)
    for g in grads[:5]:
        a.step(p_a, g)
    saved = a.state_dict()
    p_b = p_a.copy()
    b = make_optimizer(name, lr=0.05, weight_decay=0.01)
    b.load_state_dict(saved)
    for g in grads[5:]:
        a.step(p_a, g)
        b.step(p_b, g)
    np.testing.assert_array_equal(p_a, p_b)
    assert b.t == 10


def test_hyperparams_for_logging():
    opt = make_optimizer(
        "adam", lr=0.01, beta1=0.8, schedule="step", schedule_params={"step_size": 5}
    )
    assert opt.hyperparams() == {
        "name": "adam",
        "lr": 0.01,
        "weight_decay": 0.0,
        "l1": 0.0,
        "beta1": 0.8,
        "beta2": 0.999,
        "eps": 1e-8,
        "schedule": "step",
        "schedule_params.step_size": 5,
        "schedule_params.gamma": 0.5,
    }
    assert isinstance(opt, Optimizer)
    assert "beta1=0.8" in repr(opt)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"name": "adamm"}, ["name", "'adamm'", "adam, adamw"]),
        ({"name": "sgd", "lr": 0.0}, ["lr", "positive number"]),
        ({"name": "sgd", "lr": -1}, ["lr", "-1"]),
        ({"name": "sgd", "lr": float("nan")}, ["lr", "finite"]),
        ({"name": "sgd", "lr": float("inf")}, ["lr", "finite"]),
        ({"name": "sgd", "lr": "fast"}, ["lr", "'fast'", "number"]),
        ({"name": "momentum", "momentum": 1.0}, ["momentum", "[0, 1)"]),
        ({"name": "nesterov", "momentum": -0.1}, ["momentum", "[0, 1)"]),
        ({"name": "momentum", "momentum": True}, ["momentum", "number"]),
        ({"name": "adam", "beta1": 1.2}, ["beta1", "1.2", "[0, 1)"]),
        ({"name": "adamw", "beta2": 1.0}, ["beta2", "[0, 1)"]),
        ({"name": "rmsprop", "rho": 1.0}, ["rho", "[0, 1)"]),
        ({"name": "adam", "eps": 0.0}, ["eps", "positive number"]),
        ({"name": "adagrad", "eps": -1e-8}, ["eps", "positive number"]),
        ({"name": "sgd", "weight_decay": -0.1}, ["weight_decay", "number >= 0"]),
        ({"name": "adam", "l1": -1e-3}, ["l1", "number >= 0"]),
        ({"name": "sgd", "momentum": 0.9}, ["momentum", "optimizer sgd", "takes none"]),
        ({"name": "adam", "rho": 0.9}, ["rho", "optimizer adam", "beta1, beta2, eps"]),
        ({"name": "sgd", "schedule": "linear"}, ["schedule", "'linear'", "cosine"]),
        (
            {"name": "sgd", "schedule": "step", "schedule_params": {"gamma": 0.0}},
            ["schedule_params.gamma", "(0, 1]"],
        ),
        (
            {"name": "sgd", "schedule": "step", "schedule_params": {"step_size": 2.5}},
            ["schedule_params.step_size", "integer >= 1"],
        ),
        (
            {"name": "sgd", "schedule": "step", "schedule_params": {"t_max": 3}},
            ["schedule_params.t_max", "schedule step", "gamma, step_size"],
        ),
        ({"name": "sgd", "schedule": "cosine"}, ["schedule_params.t_max", "required"]),
        (
            {"name": "sgd", "lr": 0.1, "schedule": "cosine",
             "schedule_params": {"t_max": 5, "min_lr": 0.5}},
            ["schedule_params.min_lr", "<= lr=0.1"],
        ),
        (
            {"name": "sgd", "schedule": "cosine",
             "schedule_params": {"t_max": 5, "min_lr": 0.0, "eta_min": 0.0}},
            ["schedule_params.eta_min", "given twice", "min_lr"],
        ),
        (
            {"name": "sgd", "schedule": "inverse_scaling", "schedule_params": {"power_t": -1}},
            ["schedule_params.power_t", "number >= 0"],
        ),
    ],
)
def test_bad_arguments_are_one_line_naming_the_argument(kwargs, fragments):
    with pytest.raises(ValueError) as err:
        make_optimizer(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    # "<argument>=<value>: <what is allowed>", the argument as the caller passed it.
    assert message.startswith(f"{fragments[0]}="), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_bind_and_step_arguments():
    opt = make_optimizer("adam")
    with pytest.raises(RuntimeError, match="bind"):
        opt.step(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="n_weight_params"):
        opt.bind(3, 4, np.float64)
    with pytest.raises(ValueError, match="n_params"):
        opt.bind(0, 0, np.float64)
    with pytest.raises(ValueError, match="dtype"):
        opt.bind(3, 2, np.int64)
    opt.bind(3, 2, np.float32)
    with pytest.raises(ValueError, match="float32"):
        opt.step(np.zeros(3), np.zeros(3))  # float64 arrays into a float32-bound optimiser
    with pytest.raises(ValueError, match=r"\(3,\)"):
        opt.step(np.zeros(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="epoch"):
        opt.set_epoch(0)
    with pytest.raises(ValueError, match=r"^schedule=.cosinus.: unknown schedule"):
        make_schedule("cosinus", 0.1)
    with pytest.raises(ValueError, match=r"^lr=0.0: must be a positive number$"):
        make_schedule("constant", 0.0)
