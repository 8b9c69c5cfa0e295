"""Backpropagation in pipeline.engine.mlp against two independent gradients, for every valid model.

For every hidden activation x output activation x loss x bias/no-bias combination that the
registries allow (a new activation or loss is tested by being registered), on random
shapes from a seeded grid, ``MLP.loss_and_grads`` must match

* central finite differences in float64: relative error < 1e-6 per tensor, and
* the scalar reverse-mode autodiff oracle (``pipeline.engine.autodiff.mlp_loss_oracle``), which
  builds the same network from scalar nodes and shares no code with the engine:
  relative error < 1e-9 per tensor.

Relative error is ``max|a - b| / max(|a| + |b|)`` per tensor (``pipeline.engine.gradcheck``).
Run with ``-s`` to print the largest errors measured per activation and per loss.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np
import pytest

from pipeline.engine.activations import ACTIVATIONS
from pipeline.engine.autodiff import demo_reverse_vs_forward, mlp_loss_oracle
from pipeline.engine.gradcheck import gradcheck, relative_error
from pipeline.engine.losses import LOSSES, get_loss
from pipeline.engine.mlp import MLP

FD_TOL = 1e-6
ORACLE_TOL = 1e-9
# Distance kept from every non-differentiable point. A finite-difference step of 1e-6 on
# one parameter moves a pre-activation by about 1e-6 * |input| (a few 1e-6 here); if that
# step crossed a kink (relu/leaky_relu/elu at z = 0, the hinge at margin 1), the two
# one-sided slopes would be averaged and the "error" would be the kink, not a bug.
KINK_MARGIN = 1e-3
# Central differences resolve a slope only down to their rounding noise, about
# 1e-16 |L| / eps (measured ~1e-11 |L| here). A tensor whose true gradient is smaller than
# that (e.g. a binary hinge bias gradient where +1 and -1 samples cancel to exactly 0)
# has a meaningless relative error, for the oracle comparison too, so such draws are
# redrawn, decided on the oracle's gradient so the engine under test does not pick its
# own cases. 1e-4 |L| keeps the FD relative error below ~1e-7.
GRAD_FLOOR = 1e-4

HIDDEN = tuple(name for name, act in ACTIVATIONS.items() if not act.output_only)
PARAMETRISED = {"leaky_relu": "slope", "elu": "alpha"}


def _valid_combos():
    """Every (hidden, output, loss, n_outputs, bias) the engine accepts.

    Validity is asked of the engine itself (``Loss.check_output`` and the MLP
    constructor), so this grid follows the registries without a hand-kept list.
    One output unit and three output units are both tried: they are different code paths
    (binary vs multi-class hinge, one-hot encoding).
    """
    for loss_name, loss in LOSSES.items():
        for output in ACTIVATIONS:
            for k in (1, 3):
                try:
                    loss.check_output(output, k)
                    MLP([2, k], output=output)
                except ValueError:
                    continue
                for hidden in HIDDEN:
                    for bias in (True, False):
                        yield pytest.param(
                            hidden,
                            output,
                            loss_name,
                            k,
                            bias,
                            id=f"{hidden}-{output}-{loss_name}-k{k}-{'bias' if bias else 'nobias'}",
                        )


COMBOS = list(_valid_combos())

# name -> worst error seen, printed at the end of the module (pytest -s)
MAX_FD: dict[str, float] = defaultdict(float)
MAX_ORACLE: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def _report_max_errors():
    yield
    if not MAX_FD:
        return
    print("\n\nlargest relative errors of loss_and_grads (max over tensors and samples)")
    print(f"{'':<22} {'vs finite diff.':>16} {'vs autodiff':>12}")
    for key in sorted(MAX_FD, key=lambda k: (k.split(":")[0], k)):
        print(f"{key:<22} {MAX_FD[key]:>16.2e} {MAX_ORACLE[key]:>12.2e}")


def _record(keys: list[str], fd: float, oracle: float) -> None:
    for key in keys:
        MAX_FD[key] = max(MAX_FD[key], fd)
        MAX_ORACLE[key] = max(MAX_ORACLE[key], oracle)


def _targets(rng, loss: str, k: int, n: int) -> np.ndarray:
    """Integer labels half the time; otherwise real targets valid for the loss."""
    labels = rng.integers(0, max(k, 2), size=n)
    if loss == "hinge" or rng.random() < 0.5:
        return labels  # hinge is defined on class labels only
    if loss == "cross_entropy":
        return rng.dirichlet(np.ones(k), size=n)  # soft labels: rows summing to 1
    if loss == "bce":
        return rng.uniform(0, 1, size=(n, k))  # soft binary labels
    return rng.normal(size=(n, k))  # regression targets


def _distance_to_kinks(model: MLP, X: np.ndarray, y: np.ndarray, loss: str) -> float:
    """Smallest distance of any pre-activation from 0, or hinge margin from its kink.

    Every layer is checked whatever its activation: it is simpler than keeping a list of
    which registered functions have kinks, and costs only an occasional redraw.
    """
    Zs, As = model.forward_layers(X)
    dist = min(float(np.min(np.abs(Z))) for Z in Zs)
    if loss == "hinge":
        a = As[-1]
        T = model.encode_targets(y)
        if a.shape[1] == 1:
            margins = (2.0 * T - 1.0) * a - 1.0
        else:
            true_score = np.sum(a * T, axis=1, keepdims=True)
            margins = (1.0 + a - true_score)[T == 0]
        dist = min(dist, float(np.min(np.abs(margins))))
    return dist


def _random_case(hidden, output: str, loss: str, k: int, bias: bool, seed: int):
    """A model and data drawn from ``seed``, redrawn until clear of every kink."""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        n = int(rng.integers(1, 7))
        n_in = int(rng.integers(1, 5))
        widths = [int(w) for w in rng.integers(1, 6, size=int(rng.integers(1, 3)))]
        names = [hidden] * len(widths) if isinstance(hidden, str) else list(hidden)
        names = (names * len(widths))[: len(widths)]
        params = {}
        for name in {*names, output}:
            if name in PARAMETRISED and rng.random() < 0.5:  # defaults the other half
                params[PARAMETRISED[name]] = float(rng.uniform(0.05, 1.5))
        model = MLP(
            [n_in, *widths, k],
            activation=names,
            output=output,
            bias=bias,
            seed=int(rng.integers(2**31)),
            activation_params=params,
        )
        if bias:  # biases start at zero; random ones exercise the bias path properly
            for b in model.biases:
                b[...] = rng.normal(scale=0.5, size=b.shape)
        X = rng.normal(size=(n, n_in))
        y = _targets(rng, loss, k, n)
        if _distance_to_kinks(model, X, y, loss) <= KINK_MARGIN:
            continue
        oracle = mlp_loss_oracle(
            model.weights, model.biases, X, y, names, output, loss, activation_params=params
        )
        floor = GRAD_FLOOR * max(1.0, abs(oracle[0]))
        if min(float(np.max(np.abs(g))) for g in [*oracle[1], *(oracle[2] or [])]) > floor:
            return model, X, y, names, params, oracle
    raise AssertionError(
        "could not draw a case clear of kinks and vanishing gradients"
    )  # pragma: no cover


def _check(model: MLP, X, y, loss: str, names, params, oracle=None) -> tuple[float, float]:
    """Assert both comparisons; return (worst FD error, worst oracle error)."""
    value, dW, db = model.loss_and_grads(X, y, loss)
    assert len(dW) == model.n_layers
    for g, W in zip(dW, model.weights, strict=True):
        assert g.shape == W.shape
    if model.biases is None:
        assert db is None
    else:
        for g, b in zip(db, model.biases, strict=True):
            assert g.shape == b.shape

    result = gradcheck(model, X, y, loss, eps=1e-6, threshold=FD_TOL)
    assert result.passed, "\n" + result.table()

    if oracle is None:
        oracle = mlp_loss_oracle(
            model.weights,
            model.biases,
            X,
            y,
            names,
            model.output_activation.name,
            loss,
            activation_params=params,
        )
    o_value, o_dW, o_db = oracle
    assert value == pytest.approx(o_value, rel=1e-12, abs=1e-14)
    oracle_errors = [relative_error(a, b) for a, b in zip(dW, o_dW, strict=True)]
    if db is not None:
        assert o_db is not None
        oracle_errors += [relative_error(a, b) for a, b in zip(db, o_db, strict=True)]
    worst_oracle = max(oracle_errors)
    assert worst_oracle < ORACLE_TOL, f"oracle disagrees: {oracle_errors}"
    return result.max_error, worst_oracle


N_DRAWS = 2  # random shapes per combination; ~650 combinations x 2 stays under ~30 s


@pytest.mark.parametrize(("hidden", "output", "loss", "k", "bias"), COMBOS)
def test_backprop_matches_finite_differences_and_oracle(hidden, output, loss, k, bias) -> None:
    case_id = f"{hidden}-{output}-{loss}-{k}-{bias}"
    worst_fd = worst_oracle = 0.0
    for draw in range(N_DRAWS):
        seed = zlib.crc32(f"{case_id}-{draw}".encode())  # stable across runs and machines
        model, X, y, names, params, oracle = _random_case(hidden, output, loss, k, bias, seed)
        fd, oracle_err = _check(model, X, y, loss, names, params, oracle)
        worst_fd, worst_oracle = max(worst_fd, fd), max(worst_oracle, oracle_err)
    _record([f"activation:{hidden}", f"output:{output}", f"loss:{loss}"], worst_fd, worst_oracle)


def test_every_registered_name_is_in_the_grid() -> None:
    ids = " ".join(p.id for p in COMBOS)
    for name in HIDDEN:
        assert f"{name}-" in ids
    for name in ACTIVATIONS:
        assert f"-{name}-" in ids
    for name in LOSSES:
        assert f"-{name}-" in ids
        assert get_loss(name) is LOSSES[name]


@pytest.mark.parametrize("seed", range(6))
def test_mixed_hidden_activations_per_layer(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = [str(s) for s in rng.choice(HIDDEN, size=3)]
    model, X, y, names, params, oracle = _random_case(
        names, "softmax", "cross_entropy", 3, True, seed
    )
    errors = _check(model, X, y, "cross_entropy", names, params, oracle)
    _record([f"mixed:{'/'.join(names)}"], *errors)


def test_5_10_4_12_network_without_biases_half_sse() -> None:
    """The reference example: 5-10-4-12, tanh then sigmoid hidden, identity output, no
    biases, half the sum of squared errors."""
    rng = np.random.default_rng(2012)
    model = MLP(
        [5, 10, 4, 12],
        activation=["tanh", "sigmoid"],
        output="identity",
        bias=False,
        init="normal",
        seed=7,
    )
    X = rng.normal(size=(8, 5))
    Y = rng.normal(size=(8, 12))
    value, dW, db = model.loss_and_grads(X, Y, "half_sse")
    assert db is None and [g.shape for g in dW] == [(5, 10), (10, 4), (4, 12)]
    out = model.forward(X)
    assert value == pytest.approx(0.5 * np.sum((out - Y) ** 2) / 8, rel=1e-14)
    result = gradcheck(model, X, Y, "half_sse")
    assert list(result) == ["W1", "W2", "W3"]
    assert result.passed, result.table()
    names = ["tanh", "sigmoid"]
    fd, oracle = _check(model, X, Y, "half_sse", names, {})
    _record(["reference:5-10-4-12"], fd, oracle)


def test_reverse_mode_demo_f_equals_a_plus_b_times_b_plus_c() -> None:
    """f = (a+b)(b+c) at a=-1, b=3, c=4: 14, and all partials (7, 9, 2) in one backward pass."""
    demo = demo_reverse_vs_forward(-1.0, 3.0, 4.0)
    assert demo["value"] == 14.0
    assert demo["reverse_grads"] == (7.0, 9.0, 2.0)
    assert demo["reverse_backward_passes"] == 1
    assert demo["forward_grads"] == demo["reverse_grads"]
    assert demo["forward_passes"] == 3


def test_cross_entropy_with_soft_targets_not_summing_to_one() -> None:
    """(n, k) float targets are accepted for cross_entropy; the gradient must then be the
    derivative of the value the loss reports, -sum_j t_j log softmax(z)_j, which is
    (softmax(z) * sum_j t_j - t) / n: the fused (a - t) / n holds only when rows sum to 1.
    Refusing such targets with a ValueError would be an equally valid fix."""
    model = MLP([2, 3], activation=[], output="softmax", seed=0)
    X = np.array([[0.5, -1.0], [1.0, 2.0]])
    T = np.array([[0.5, 0.2, 0.1], [0.0, 0.0, 2.0]])  # rows sum to 0.8 and 2.0
    try:
        model.loss_and_grads(X, T, "cross_entropy")
    except ValueError:
        return
    fd, oracle_err = _check(model, X, T, "cross_entropy", [], {})
    _record(["loss:cross_entropy(soft, unnormalised)"], fd, oracle_err)
