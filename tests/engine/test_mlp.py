"""pipeline.engine.mlp.MLP: parameter layout, argument checking, construction from arrays, config
round trips, prediction and precision.

Gradient correctness is tested in tests/engine/test_gradients.py (finite differences and the
autodiff oracle for every valid combination); here only shapes and plumbing.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from pipeline.engine.activations import HIDDEN_ACTIVATIONS
from pipeline.engine.mlp import MLP

SIZES = [3, 5, 4, 2]


@pytest.fixture
def model() -> MLP:
    return MLP(SIZES, activation=["tanh", "relu"], output="softmax", seed=0)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, 3)), rng.integers(0, 2, size=7)


# ------------------------------------------------------------------------- layout


def test_weight_bias_and_param_shapes(model):
    assert [W.shape for W in model.weights] == [(3, 5), (5, 4), (4, 2)]
    assert [b.shape for b in model.biases] == [(5,), (4,), (2,)]
    n_weights = 3 * 5 + 5 * 4 + 4 * 2
    assert model.n_weight_params == n_weights
    assert model.params.shape == (n_weights + 5 + 4 + 2,) == (model.n_params,)
    assert model.grad.shape == model.params.shape
    assert model.n_layers == 3 and model.n_outputs == 2 and model.n_classes == 2
    assert model.sizes == SIZES
    # Weights first, then biases, in layer order.
    np.testing.assert_array_equal(model.params[:15], model.weights[0].ravel())
    np.testing.assert_array_equal(model.params[n_weights : n_weights + 5], model.biases[0])


def test_weights_and_biases_are_views_into_params(model):
    model.weights[1][2, 3] = 42.0
    model.biases[2][1] = -7.0
    assert 42.0 in model.params and -7.0 in model.params
    model.params[:] = 0.5
    assert np.all(model.weights[0] == 0.5) and np.all(model.biases[2] == 0.5)
    for array in (*model.weights, *model.biases):
        assert np.shares_memory(array, model.params)
    model.set_params(np.arange(model.n_params, dtype=float))
    assert model.weights[0][0, 1] == 1.0
    with pytest.raises(ValueError, match=r"parameter vector has shape \(3,\); this model needs"):
        model.set_params(np.zeros(3))


def test_grad_layout_matches_params(model, data):
    X, y = data
    value, dW, db = model.loss_and_grads(X, y, "cross_entropy")
    assert np.isfinite(value)
    assert [g.shape for g in dW] == [W.shape for W in model.weights]
    assert [g.shape for g in db] == [b.shape for b in model.biases]
    flat = np.concatenate([g.ravel() for g in dW] + list(db))
    np.testing.assert_array_equal(model.grad, flat)
    assert model.value_and_grad(X, y, "cross_entropy") == value
    assert model.compute_loss(X, y, "cross_entropy") == pytest.approx(value, rel=1e-15)
    # loss_and_grads returns copies: the next call must not change them.
    model.loss_and_grads(X[:3], y[:3], "cross_entropy")
    np.testing.assert_array_equal(np.concatenate([g.ravel() for g in dW] + list(db)), flat)


def test_without_bias(data):
    X, y = data
    model = MLP(SIZES, activation="tanh", output="softmax", bias=False)
    assert model.biases is None and model.bias is False
    assert model.n_params == model.n_weight_params == 3 * 5 + 5 * 4 + 4 * 2
    value, dW, db = model.loss_and_grads(X, y, "cross_entropy")
    assert db is None and len(dW) == 3
    assert model.get_config()["bias"] is False


def test_forward_layers(model, data):
    X, _ = data
    Zs, As = model.forward_layers(X)
    assert [Z.shape for Z in Zs] == [(7, 5), (7, 4), (7, 2)]
    assert [A.shape for A in As] == [(7, 3), (7, 5), (7, 4), (7, 2)]
    np.testing.assert_array_equal(As[0], X)
    np.testing.assert_allclose(As[1], np.tanh(X @ model.weights[0] + model.biases[0]))
    np.testing.assert_array_equal(As[-1], model.forward(X))
    assert [a.name for a in model.activations] == ["tanh", "relu", "softmax"]


# ------------------------------------------------------------------------ predict


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000])
def test_forward_in_blocks_covers_every_row_in_order(monkeypatch, n):
    """Long inputs go through forward in blocks of rows (here forced down to 8 rows of
    the widest layer): every row's output is the one-pass output of that row."""
    import pipeline.engine.mlp as nn

    model = MLP([3, 16, 5, 4], activation=["tanh", "relu"], output="softmax", seed=1,
                dtype=np.float64)
    X = np.random.default_rng(n).standard_normal((n, 3))
    whole = model.forward_layers(X)[1][-1]
    monkeypatch.setattr(nn, "FORWARD_BLOCK_BYTES", 8 * 16 * 8)  # 8 rows of 16 float64
    blocked = model.forward(X)
    assert blocked.shape == (n, 4) and blocked.dtype == np.float64
    np.testing.assert_allclose(blocked, whole, rtol=1e-13, atol=0)
    np.testing.assert_allclose(model.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)


def test_forward_memory_stays_bounded_on_long_inputs():
    """60,000 rows through two 256-unit layers: one pass would hold about 250 MB of layer
    values at once; in blocks the peak is the output and a few MB."""
    import tracemalloc

    model = MLP([2, 256, 256, 1], activation="relu", output="sigmoid", seed=0,
                dtype=np.float32)
    X = np.random.default_rng(0).standard_normal((60_000, 2)).astype(np.float32)
    reference = model.forward_layers(X[:5000])[1][-1]
    tracemalloc.start()
    try:
        out = model.forward(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (60_000, 1)
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MB"
    np.testing.assert_allclose(out[:5000], reference, rtol=1e-6, atol=1e-7)


def test_predict_proba_softmax(model, data):
    X, _ = data
    proba = model.predict_proba(X)
    assert proba.shape == (7, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.predict(X), proba.argmax(axis=1))
    assert model.predict(X).shape == (7,)


def test_predict_proba_one_sigmoid_unit(data):
    X, _ = data
    model = MLP([3, 4, 1], activation="tanh", output="sigmoid", seed=1)
    p = model.forward(X)[:, 0]
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba, np.column_stack([1 - p, p]))
    np.testing.assert_array_equal(model.predict(X), (p > 0.5).astype(int))
    assert model.n_classes == 2


def test_predict_proba_multiclass_identity_output():
    X = np.random.default_rng(2).normal(size=(6, 3))
    model = MLP([3, 4, 3], output="identity", loss="mse", seed=0)
    proba = model.predict_proba(X)
    assert proba.shape == (6, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.all(proba >= 0)


def test_inputs_are_converted(model):
    X = [[1, 2, 3], [0, 0, 1]]  # nested lists of ints
    np.testing.assert_array_equal(model.forward(X), model.forward(np.array(X, dtype=float)))


# --------------------------------------------------------------------- precision


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
def test_float32_and_float64_forward_agree(activation, data):
    X, y = data
    m64 = MLP(SIZES, activation=activation, output="softmax", seed=5)
    m32 = m64.copy(dtype="float32")
    assert m32.params.dtype == np.float32
    np.testing.assert_allclose(m32.forward(X), m64.forward(X), rtol=1e-5, atol=1e-6)
    v32, dW32, _ = m32.loss_and_grads(X, y, "cross_entropy")
    v64, dW64, _ = m64.loss_and_grads(X, y, "cross_entropy")
    assert v32 == pytest.approx(v64, rel=1e-5)
    for g32, g64 in zip(dW32, dW64, strict=True):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
def test_float32_model_computes_in_float32(activation, data):
    X, _ = data
    model = MLP(SIZES, activation=activation, output="softmax", seed=5, dtype="float32")
    Zs, As = model.forward_layers(X)
    dtypes = {a.dtype for a in (*Zs, *As)}
    assert dtypes == {np.dtype(np.float32)}


def test_copy_is_independent(model):
    clone = model.copy()
    np.testing.assert_array_equal(clone.params, model.params)
    clone.params[:] = 0.0
    assert np.any(model.params != 0.0)
    assert not np.shares_memory(clone.weights[0], model.weights[0])


# ------------------------------------------------------------------ config, arrays


def test_get_config_round_trip(model, data):
    X, _ = data
    config = model.get_config()
    assert json.loads(json.dumps(config)) == config  # plain, JSON-able values
    assert config["sizes"] == SIZES and config["activation"] == ["tanh", "relu"]
    assert config["output"] == "softmax" and config["dtype"] == "float64"
    rebuilt = MLP(**config)
    assert rebuilt.get_config() == config
    # The same seed draws the same initial weights.
    np.testing.assert_array_equal(rebuilt.params, model.params)
    np.testing.assert_array_equal(rebuilt.forward(X), model.forward(X))


def test_get_config_keeps_activation_params():
    model = MLP([2, 3, 1], activation="leaky_relu", activation_params={"slope": 0.2}, seed=2)
    rebuilt = MLP(**model.get_config())
    assert rebuilt.hidden_activations[0].params == {"slope": 0.2}
    z = np.array([[-1.0, 2.0]])
    np.testing.assert_array_equal(rebuilt.forward(z), model.forward(z))


def test_from_arrays_round_trip(model, data):
    X, _ = data
    rebuilt = MLP.from_arrays(
        model.weights, model.biases, activation=["tanh", "relu"], output="softmax"
    )
    assert rebuilt.sizes == SIZES
    np.testing.assert_array_equal(rebuilt.forward(X), model.forward(X))
    no_bias = MLP.from_arrays(model.weights, None, activation="tanh", output="softmax")
    assert no_bias.biases is None


@pytest.mark.parametrize(
    ("weights", "biases", "message"),
    [
        ([(2, 3), (4, 1)], None, r"layer 2: weight of shape \(4, 1\) takes 4 inputs but layer 1 "
                                 r"gives 3 outputs"),
        ([(2, 3), (3, 4), (5, 1)], None, "layer 3: weight of shape"),
        ([(3,)], None, r"layer 1: weight must be 2-D \(fan_in, fan_out\); got \(3,\)"),
        ([(2, 3), (3, 1)], [(3,), (2,)], "layer 2: bias has 2 entries for 1 units"),
        ([(2, 3), (3, 1)], [(3,)], "biases: 1 given for 2 layers"),
        ([], None, "weights: need at least one layer"),
    ],
)
def test_from_arrays_with_incompatible_shapes_names_the_layer(weights, biases, message):
    Ws = [np.zeros(shape) for shape in weights]
    bs = None if biases is None else [np.zeros(shape) for shape in biases]
    with pytest.raises(ValueError, match=message):
        MLP.from_arrays(Ws, bs, activation="tanh")


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
def test_pickle_round_trip(activation, data):
    X, _ = data
    model = MLP(SIZES, activation=activation, output="softmax", seed=4)
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.forward(X), model.forward(X))


# ---------------------------------------------------------------------- bad input

BAD_CONSTRUCTION = [
    ({"sizes": [2, 0, 1]}, r"sizes\[1\]=0 \(hidden 1 layer\): widths must be integers >= 1"),
    ({"sizes": [2, -3, 1]}, r"sizes\[1\]=-3 \(hidden 1 layer\)"),
    ({"sizes": [0, 3, 1]}, r"sizes\[0\]=0 \(input layer\)"),
    ({"sizes": [2, 3, 0]}, r"sizes\[2\]=0 \(output layer\)"),
    ({"sizes": [2, 3.5, 1]}, r"sizes\[1\]=3.5"),
    ({"sizes": [2, True, 1]}, r"sizes\[1\]=True"),
    ({"sizes": [2]}, r"sizes=\[2\]: need at least an input and an output width"),
    ({"sizes": "2,3,1"}, "must be a list of layer widths"),
    ({"activation": "swish"}, "unknown activation 'swish'; known: identity, sigmoid"),
    ({"activation": "softmax"}, "'softmax' can only be used on the output layer; hidden"),
    ({"activation": ["relu", "tanh"]}, r"give one name, or one per hidden layer \(1 for sizes"),
    ({"activation": []}, "one per hidden layer"),
    ({"output": "swish"}, "unknown activation 'swish'; known: .*softmax"),
    ({"output": "softmax"}, "output='softmax' needs at least 2 output units"),
    ({"init": "orthogonal"}, "unknown init 'orthogonal'; known: normal"),
    ({"dtype": "float16"}, "dtype='float16': must be float32 or float64"),
    ({"dtype": int}, "must be float32 or float64"),
    ({"loss": "focal"}, "unknown loss 'focal'; known: mse"),
    ({"loss": "cross_entropy"}, "loss 'cross_entropy' does not fit a 'sigmoid' output"),
    ({"activation": "leaky_relu", "activation_params": {"slope": float("nan")}},
     "leaky_relu slope=nan: must be a finite number"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONSTRUCTION)
def test_bad_construction_raises_value_error(kwargs, message):
    args = {"sizes": [2, 3, 1], "activation": "relu", "output": "sigmoid", **kwargs}
    with pytest.raises(ValueError, match=message):
        MLP(**args)


@pytest.mark.parametrize(
    ("X", "message"),
    [
        (np.zeros((4, 2)), r"X has shape \(4, 2\); this model takes \(n_samples, 3\)"),
        (np.zeros(3), r"X has shape \(3,\); this model takes"),
        (np.zeros((2, 2, 3)), r"X has shape \(2, 2, 3\)"),
        (np.array([[0.0, np.nan, 1.0]]), "X contains NaN or infinite values"),
        (np.array([[0.0, np.inf, 1.0]]), "X contains NaN or infinite values"),
        (np.array([["a", "b", "c"]]), "X must be numeric; got dtype"),
    ],
)
def test_bad_inputs_raise_value_error(model, X, message):
    with pytest.raises(ValueError, match=message):
        model.forward(X)
    with pytest.raises(ValueError, match=message):
        model.loss_and_grads(X, np.zeros(len(X), dtype=int), "cross_entropy")


@pytest.mark.parametrize(
    ("sizes", "output", "y", "message"),
    [
        ([3, 4, 1], "sigmoid", [0, 1, 2, 1], r"labels \[0, 1, 2\] do not fit a 1-unit output: "
                                             r"expected integers 0..1"),
        ([3, 4, 3], "softmax", [0, 3, 1, 1], r"do not fit a 3-unit output: expected integers 0..2"),
        ([3, 4, 3], "softmax", [0, -1, 1, 1], r"labels \[-1, 0, 1\] do not fit"),
        ([3, 4, 3], "softmax", [0, 1, 1], "X has 4 samples but y has 3"),
        ([3, 4, 2], "softmax", np.zeros((4, 3)), r"y has shape \(4, 3\); expected"),
        ([3, 4, 1], "sigmoid", [0, np.nan, 1, 1], "y contains NaN or infinite values"),
    ],
)
def test_label_output_mismatch_raises_value_error(sizes, output, y, message):
    model = MLP(sizes, activation="tanh", output=output)
    X = np.zeros((4, 3))
    loss = "bce" if output == "sigmoid" else "cross_entropy"
    with pytest.raises(ValueError, match=message):
        model.loss_and_grads(X, np.asarray(y), loss)


def test_unknown_loss_in_loss_and_grads(model, data):
    X, y = data
    with pytest.raises(ValueError, match="unknown loss 'focal'; known: "):
        model.loss_and_grads(X, y, "focal")


def test_repr(model):
    text = repr(model)
    assert "sizes=[3, 5, 4, 2]" in text and "tanh,relu" in text and "softmax" in text
    assert f"params={model.n_params}" in text


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"seed": "a"}, "seed"), ({"seed": -1}, "seed"), ({"bias": "no"}, "bias")],
)
def test_bad_seed_and_bias_are_named(kwargs, key):
    with pytest.raises(ValueError, match=key):
        MLP([2, 3, 1], **kwargs)


def test_from_arrays_refuses_non_finite_weights():
    with pytest.raises(ValueError, match="layer 2"):
        MLP.from_arrays([np.ones((2, 3)), np.full((3, 1), np.nan)], activation="tanh")
