"""pipeline.engine.losses: values on hand-computed examples, stability of the logit forms, the
fused output deltas against the general chain rule, output/loss compatibility and the
target encoding.

End-to-end gradient correctness (every loss through a network, against finite
differences and the autodiff oracle) lives in tests/engine/test_gradients.py.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from pipeline.engine.activations import ACTIVATIONS, sigmoid, softmax
from pipeline.engine.losses import (
    LOSSES,
    Loss,
    default_loss,
    encode_targets,
    get_loss,
    scores_to_proba,
)
from pipeline.engine.mlp import MLP

LN2 = math.log(2.0)


def _outputs(name: str, z: np.ndarray) -> np.ndarray:
    return ACTIVATIONS[name].forward(z)


# (loss, output activation, z, T, expected mean loss), each worked out by hand.
HAND = {
    # squared differences 1, 0, 0 / 0, 16, 1: sum 18 over 6 entries.
    "mse": ("identity", [[1, 2, 0], [3, 4, 1]], [[0, 2, 0], [3, 0, 0]], 3.0),
    # half the sum of squares per sample, averaged over the 2 samples: 0.5 * 18 / 2.
    "half_sse": ("identity", [[1, 2, 0], [3, 4, 1]], [[0, 2, 0], [3, 0, 0]], 4.5),
    # sigmoid(0) = 1/2 with t = 1: ln 2; sigmoid(ln 3) = 3/4 with t = 0: ln 4.
    "bce": ("sigmoid", [[0.0], [math.log(3.0)]], [[1], [0]], (LN2 + 2 * LN2) / 2),
    # softmax([0, 0, 0]) = 1/3 each: ln 3; softmax([ln 3, 0]) = [3/4, 1/4], t = 1: ln 4.
    "cross_entropy": (
        "softmax", [[0.0, 0.0, 0.0], [math.log(3.0), 0.0, -np.inf]], [[1, 0, 0], [0, 1, 0]],
        (math.log(3.0) + 2 * LN2) / 2,
    ),
    # labels {0,1} -> {-1,+1}: margins 1-2 -> 0, 1-0.5, 1+0.5, 1+0.3: (0 + .5 + 1.5 + 1.3) / 4.
    "hinge": ("identity", [[2.0], [0.5], [-0.5], [0.3]], [[1], [1], [1], [0]], 3.3 / 4),
}

# Multi-class hinge (Weston-Watkins): sample 1, true class 0, scores 3, 1, 2.5:
# max(0, 1 + 1 - 3) + max(0, 1 + 2.5 - 3) = 0.5; sample 2, all scores 0, true class 2: 2.
HINGE_MULTI = ([[3.0, 1.0, 2.5], [0.0, 0.0, 0.0]], [[1, 0, 0], [0, 0, 1]], 1.25)


def test_every_loss_has_a_hand_computed_example():
    assert set(LOSSES) <= set(HAND), f"add examples for {sorted(set(LOSSES) - set(HAND))}"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_value_on_hand_computed_example(name):
    output, z, T, expected = HAND[name]
    z = np.array(z, dtype=float)
    if name == "cross_entropy":
        z = np.where(np.isinf(z), -1e4, z)  # the third logit is "minus infinity"
    T = np.array(T, dtype=float)
    a = _outputs(output, z)
    assert LOSSES[name].value(z, a, T) == pytest.approx(expected, rel=1e-12)


def test_multiclass_hinge_value():
    a, T, expected = HINGE_MULTI
    a, T = np.array(a), np.array(T, dtype=float)
    assert LOSSES["hinge"].value(a, a, T) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_value_is_a_mean_over_the_batch(name):
    output, z, T, _ = HAND[name]
    z = np.where(np.isinf(np.array(z, float)), -1e4, np.array(z, float))
    T = np.array(T, dtype=float)
    loss = LOSSES[name]
    act = ACTIVATIONS[output]
    z2, T2 = np.vstack([z, z]), np.vstack([T, T])
    assert loss.value(z2, act.forward(z2), T2) == pytest.approx(
        loss.value(z, act.forward(z), T), rel=1e-12
    )
    # ... so each sample's share of the gradient halves when the batch doubles.
    d1 = loss.delta(z, act.forward(z), T, act)
    d2 = loss.delta(z2, act.forward(z2), T2, act)
    np.testing.assert_allclose(d2[: len(z)], d1 / 2, rtol=1e-12)


# ---------------------------------------------------------------------------- stability


@pytest.fixture
def strict_fp():
    # Underflow is the right answer for exp(-1e4); overflow, invalid and divide are not.
    with np.errstate(all="raise", under="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_bce_from_logits_is_exact_at_1e4(strict_fp):
    z = np.array([[1e4], [-1e4], [1e4], [-1e4]])
    T = np.array([[1.0], [0.0], [0.0], [1.0]])
    a = sigmoid(z)
    bce = LOSSES["bce"]
    # Right and confident: 0 (to within e^-1e4); wrong and confident: |z| = 1e4.
    assert bce.value(z, a, T) == pytest.approx((0 + 0 + 1e4 + 1e4) / 4, rel=1e-15)
    delta = bce.delta(z, a, T, ACTIVATIONS["sigmoid"])
    np.testing.assert_allclose(delta, [[0.0], [0.0], [0.25], [-0.25]], atol=1e-300)


def test_bce_from_logits_matches_naive_form_where_that_is_finite():
    z = np.linspace(-20, 20, 41)[:, None]
    T = (np.arange(41) % 2).astype(float)[:, None]
    p = 1 / (1 + np.exp(-z))
    naive = -np.mean(T * np.log(p) + (1 - T) * np.log(1 - p))
    assert LOSSES["bce"].value(z, sigmoid(z), T) == pytest.approx(naive, rel=1e-9)


def test_cross_entropy_from_logits_is_exact_at_1e4(strict_fp):
    z = np.array([[1e4, -1e4], [1e4, -1e4]])
    T = np.array([[1.0, 0.0], [0.0, 1.0]])
    a = softmax(z)
    ce = LOSSES["cross_entropy"]
    assert ce.value(z, a, T) == pytest.approx((0 + 2e4) / 2, rel=1e-15)
    delta = ce.delta(z, a, T, ACTIVATIONS["softmax"])
    np.testing.assert_allclose(delta, [[0.0, 0.0], [0.5, -0.5]], atol=1e-300)


# ----------------------------------------------------------------------- fused deltas

FUSED = [(name, out) for name, loss in LOSSES.items() for out in loss.fused]


def test_the_documented_fused_pairs_are_registered():
    assert set(FUSED) >= {
        ("bce", "sigmoid"), ("cross_entropy", "softmax"), ("half_sse", "identity"),
    }


@pytest.mark.parametrize(("name", "output"), FUSED)
@pytest.mark.parametrize("soft_targets", [False, True])
def test_fused_delta_equals_general_chain_rule(name, output, soft_targets):
    rng = np.random.default_rng(0)
    loss = LOSSES[name]
    act = ACTIVATIONS[output]
    n_units = 1 if output == "sigmoid" and not soft_targets else 4
    z = rng.normal(0.0, 2.0, size=(6, n_units))
    if soft_targets:
        # Probability rows (for softmax) or values in [0, 1]: the fused forms must hold
        # for every target the loss accepts, not only for one-hot rows.
        T = rng.random(size=z.shape)
        if output == "softmax":
            T /= T.sum(axis=1, keepdims=True)
    else:
        T = np.eye(n_units)[rng.integers(0, n_units, 6)] if n_units > 1 else (
            rng.integers(0, 2, (6, 1)).astype(float)
        )
    a = act.forward(z)
    fused = loss.delta(z, a, T, act)
    chain = act.backward(z, a, loss.grad_output(z, a, T))
    np.testing.assert_allclose(fused, chain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "output"), FUSED)
def test_fused_delta_matches_derivative_of_the_value(name, output):
    # The fused forms are short-cuts; here they are held to d value / dz directly.
    rng = np.random.default_rng(1)
    loss, act = LOSSES[name], ACTIVATIONS[output]
    n_units = 1 if output == "sigmoid" else 3
    z = rng.normal(size=(5, n_units))
    T = np.eye(max(n_units, 2))[rng.integers(0, max(n_units, 2), 5)][:, -n_units:]
    h = 1e-6
    numeric = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        numeric[idx] = (
            loss.value(zp, act.forward(zp), T) - loss.value(zm, act.forward(zm), T)
        ) / (2 * h)
    np.testing.assert_allclose(loss.delta(z, act.forward(z), T, act), numeric, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------- output compatibility

# What each loss is defined on: (allowed output activations or None for any, min units).
COMPATIBLE = {
    "mse": (None, 1),
    "half_sse": (None, 1),
    "bce": (("sigmoid",), 1),
    "cross_entropy": (("softmax",), 2),
    "hinge": (("identity", "tanh"), 1),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("output", sorted(ACTIVATIONS))
@pytest.mark.parametrize("units", [1, 2, 3])
def test_check_output_accepts_exactly_the_fitting_pairs(name, output, units):
    outputs, min_units = COMPATIBLE[name]
    fits = (outputs is None or output in outputs) and units >= min_units
    if fits:
        LOSSES[name].check_output(output, units)
    else:
        with pytest.raises(ValueError, match=f"loss '{name}' does not fit"):
            LOSSES[name].check_output(output, units)


def test_mismatch_messages_say_what_is_allowed():
    with pytest.raises(ValueError, match="1 unit.*it needs at least 2"):
        get_loss("cross_entropy").check_output("softmax", 1)
    with pytest.raises(ValueError, match="'softmax' output; it needs one of: sigmoid"):
        get_loss("bce").check_output("softmax", 3)
    with pytest.raises(ValueError, match="'sigmoid' output; it needs one of: identity, tanh"):
        get_loss("hinge").check_output("sigmoid", 1)


def test_mismatch_refused_by_the_model():
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="loss 'cross_entropy' does not fit a 'sigmoid'"):
        MLP([2, 3, 1], output="sigmoid", loss="cross_entropy")
    model = MLP([2, 3, 2], output="softmax")
    with pytest.raises(ValueError, match="loss 'bce' does not fit a 'softmax' output"):
        model.loss_and_grads(X, y, "bce")


def test_every_loss_names_its_fitting_outputs_consistently():
    # fused pairs must be outputs the loss accepts (else the short-cut is dead code).
    for loss in LOSSES.values():
        for output in loss.fused:
            assert loss.outputs is None or output in loss.outputs


# ------------------------------------------------------------------------- look-ups


def test_get_loss():
    assert get_loss("bce") is LOSSES["bce"]
    assert get_loss(LOSSES["mse"]) is LOSSES["mse"]
    assert isinstance(get_loss("hinge"), Loss)
    with pytest.raises(ValueError, match="unknown loss 'focal'; known: ") as info:
        get_loss("focal")
    for name in LOSSES:
        assert name in str(info.value)


def test_default_loss():
    assert default_loss("sigmoid") == "bce"
    assert default_loss("softmax") == "cross_entropy"
    assert default_loss("identity") == "mse"
    assert default_loss("tanh") == "mse"


# ------------------------------------------------------------------------ targets


def test_encode_binary_labels_as_one_column():
    T = encode_targets(np.array([0, 1, 1]), 1)
    assert T.shape == (3, 1) and T.dtype == np.float64
    np.testing.assert_array_equal(T[:, 0], [0, 1, 1])
    np.testing.assert_array_equal(encode_targets(np.array([True, False]), 1)[:, 0], [1, 0])


def test_encode_class_labels_one_hot():
    T = encode_targets(np.array([2, 0, 1]), 3, np.float32)
    assert T.dtype == np.float32
    np.testing.assert_array_equal(T, np.eye(3)[[2, 0, 1]])
    # Integral floats are labels too.
    np.testing.assert_array_equal(encode_targets(np.array([1.0, 0.0]), 2), [[0, 1], [1, 0]])


def test_encode_passes_float_targets_through():
    y = np.array([[0.2, 0.8], [1.0, 0.0]])
    T = encode_targets(y, 2)
    np.testing.assert_array_equal(T, y)
    assert T.flags.c_contiguous


@pytest.mark.parametrize(
    ("y", "n_outputs", "message"),
    [
        ([0, 2], 1, r"labels \[0, 2\] do not fit a 1-unit output: expected integers 0..1"),
        ([0, 3], 3, r"expected integers 0..2"),
        ([-1, 0], 2, r"labels \[-1, 0\] do not fit"),
        ([0.5, 1.0], 1, "do not fit a 1-unit output"),
        ([0.0, np.nan], 1, "NaN or infinite"),
        (["a", "b"], 2, "y must be numeric labels or targets; got dtype"),
        ([[0.0, 1.0, 0.0]], 2, r"y has shape \(1, 3\); expected \(n_samples,\) labels or "
                               r"\(n_samples, 2\) targets"),
        ([[0.0, np.inf]], 2, "NaN or infinite"),
    ],
)
def test_encode_targets_rejects_bad_labels(y, n_outputs, message):
    with pytest.raises(ValueError, match=message):
        encode_targets(np.array(y), n_outputs)


# ---------------------------------------------------------------------- probabilities


def test_scores_to_proba():
    p = np.array([[0.2], [0.9]])
    np.testing.assert_allclose(scores_to_proba(p, "sigmoid"), [[0.8, 0.2], [0.1, 0.9]])
    # tanh and hinge margins: 0 maps to 0.5, +-1 (and beyond) to certainty.
    m = np.array([[-2.0], [0.0], [0.5]])
    expected = [[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]]
    np.testing.assert_allclose(scores_to_proba(m, "identity", "hinge"), expected)
    np.testing.assert_allclose(scores_to_proba(m, "tanh"), expected)
    s = softmax(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(scores_to_proba(s, "softmax"), s)
    # Squared error on one-hot targets: clipped at 0 and renormalised; all <= 0 is uniform.
    sq = np.array([[0.5, -0.2, 1.5], [-1.0, -1.0, -1.0]])
    np.testing.assert_allclose(
        scores_to_proba(sq, "identity", "mse"), [[0.25, 0.0, 0.75], [1 / 3, 1 / 3, 1 / 3]]
    )
    # Multi-class hinge scores: a softmax, so the argmax is kept.
    h = np.array([[3.0, 1.0, 2.5]])
    proba = scores_to_proba(h, "identity", "hinge")
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert proba.argmax() == 0
