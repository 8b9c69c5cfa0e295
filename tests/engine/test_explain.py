"""The worked example: every number is the engine's own, and it reads like a textbook's."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.engine.explain import explain_step
from pipeline.engine.losses import get_loss
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import make_optimizer

XOR_X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = np.array([0, 1, 1, 0])


@pytest.mark.parametrize(("sizes", "activation"), [([2, 2, 1], "sigmoid"), ([2, 3, 1], "tanh"),
                                                   ([2, 4, 3, 1], "relu")])
def test_every_quantity_is_the_engines_own(sizes, activation):
    model = MLP(sizes, activation=activation, output="sigmoid", seed=3, dtype="float64")
    before = model.params.copy()
    # Off the corners, so that no ReLU sits exactly on its kink (where finite differences
    # see half a slope and the derivative's convention says 0).
    X = XOR_X + [0.13, -0.07]
    trace = explain_step(model, X, XOR_Y, "bce", make_optimizer("sgd", lr=0.5))
    assert np.array_equal(model.params, before)  # the model itself is untouched
    Zs, As = model.forward_layers(X)
    value, dW, db = model.loss_and_grads(X, XOR_Y, "bce")
    assert trace.loss_value == value
    for k, step in enumerate(trace.layers):
        assert np.array_equal(step.Z, Zs[k]) and np.array_equal(step.A, As[k + 1])
        assert np.array_equal(step.dW, dW[k]) and np.array_equal(step.db, db[k])
        # Plain SGD: the update is exactly -lr times the gradient.
        assert np.allclose(step.W_after, step.W - 0.5 * dW[k], rtol=0, atol=1e-15)
        assert np.allclose(step.b_after, step.b - 0.5 * db[k], rtol=0, atol=1e-15)
        # (4) db_l is delta_l summed over the rows; (3) dW_l = A_{l-1}.T @ delta_l.
        assert np.allclose(step.db, step.delta.sum(axis=0))
        assert np.allclose(step.dW, step.A_in.T @ step.delta)
    T = model.encode_targets(XOR_Y)
    delta_L = get_loss("bce").delta(Zs[-1], As[-1], T, model.output_activation)
    assert np.array_equal(trace.layers[-1].delta, delta_L)
    assert np.allclose(delta_L, (As[-1] - T) / 4)  # sigmoid + bce collapse
    assert trace.gradient_error < 1e-6


def test_the_2_2_1_example_reads_like_a_worked_example():
    model = MLP([2, 2, 1], activation="sigmoid", output="sigmoid", seed=1, dtype="float64")
    text = explain_step(model, XOR_X, XOR_Y, "bce", make_optimizer("sgd", lr=1.0)).to_markdown()
    for line in ("# One backpropagation step on a 2-2-1 network, by the numbers",
                 "Z_1 = A_0 @ W_1 + b_1  (4, 2) @ (2, 2) -> (4, 2)",
                 "A_1 = sigmoid(Z_1)  (4, 2)",
                 "(1) delta_2 = dLoss/dZ_2 = (A_2 - T) / 4",
                 "(2) delta_1 = (delta_2 @ W_2.T) * sigmoid'(Z_1)",
                 "(3) dW_1 = A_0.T @ delta_1  (2, 4) @ (4, 2) -> (2, 2)",
                 "(4) db_2 = delta_2 summed over the 4 rows  (1,)",
                 "## The update: W_l <- W_l - lr * dW_l and b_l <- b_l - lr * db_l"):
        assert line in text, line
    # The numbers printed are the arrays' own, rounded.
    W1 = model.weights[0]
    assert f"{W1[0, 0]: .4f}" in text
    assert "relative error" in text and text.count("```") % 2 == 0


def test_an_uncollapsed_output_delta_names_the_derivative():
    model = MLP([2, 3, 1], activation="tanh", output="sigmoid", seed=0, dtype="float64")
    text = explain_step(model, XOR_X, XOR_Y, "mse", make_optimizer("adam", lr=0.01)).to_markdown()
    assert "(1) delta_2 = dLoss/dA_2 * f'(Z_2)  (sigmoid' = sigmoid(Z) * (1 - sigmoid(Z))" in text
    assert "## The update: the first step of adam" in text
