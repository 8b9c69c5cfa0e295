"""pipeline.engine.activations: every registered function against its closed form, its backward
rule against a numerical derivative, and numerical stability out to |z| = 1e4.

The tests are parametrised over ``ACTIVATIONS``; a new entry must add its closed form to
``CLOSED_FORMS`` (a test fails until it does) and is then tested like the others.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pytest

from pipeline.engine.activations import (
    ACTIVATIONS,
    HIDDEN_ACTIVATIONS,
    OUTPUT_ACTIVATIONS,
    get_activation,
)

NAMES = tuple(ACTIVATIONS)
ELEMENTWISE = tuple(n for n in NAMES if n != "softmax")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


# Straightforward textbook forms, valid for moderate z (|z| <= 30 here).
CLOSED_FORMS = {
    "identity": lambda z: z,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": lambda z: (np.exp(z) - np.exp(-z)) / (np.exp(z) + np.exp(-z)),
    "relu": lambda z: np.where(z > 0, z, 0.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "elu": lambda z: np.where(z > 0, z, np.exp(z) - 1.0),
    "gelu": _gelu_tanh,
    "softplus": lambda z: np.log(1.0 + np.exp(z)),
    "softmax": _softmax,
}

# Exact values at the extremes, where the textbook forms overflow.
EXTREMES = {
    "identity": (1e4, -1e4),
    "sigmoid": (1.0, 0.0),
    "tanh": (1.0, -1.0),
    "relu": (1e4, 0.0),
    "leaky_relu": (1e4, -100.0),
    "elu": (1e4, -1.0),
    "gelu": (1e4, 0.0),
    "softplus": (1e4, 0.0),
}

# Keep a distance from the kinks of relu, leaky_relu and elu (at z = 0) so that the
# central difference never straddles one.
KINK_MARGIN = 1e-2


def _grid(rng: np.random.Generator, shape=(7, 5), scale=4.0) -> np.ndarray:
    z = rng.normal(0.0, scale, size=shape)
    return np.where(np.abs(z) < KINK_MARGIN, KINK_MARGIN * 3, z)


@pytest.fixture
def strict_fp():
    """Overflow, invalid and divide-by-zero raise; any warning is an error.

    Underflow is left alone on purpose: exp(-1e4) rounding to 0 is the correct answer
    (sigmoid, softplus and softmax rely on it), not a loss of accuracy.
    """
    with np.errstate(all="raise", under="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_every_activation_has_a_closed_form():
    missing = set(ACTIVATIONS) - set(CLOSED_FORMS)
    assert not missing, f"add closed forms for {sorted(missing)} to CLOSED_FORMS"


def test_registry_metadata():
    assert set(ACTIVATIONS) >= {
        "identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus",
        "softmax",
    }
    for name, act in ACTIVATIONS.items():
        assert act.name == name
    assert {n for n, a in ACTIVATIONS.items() if a.family == "relu"} == {
        "relu", "leaky_relu", "elu",
    }
    assert {n for n, a in ACTIVATIONS.items() if a.family == "saturating"} == {"sigmoid", "tanh"}
    assert [n for n, a in ACTIVATIONS.items() if a.output_only] == ["softmax"]
    assert "softmax" not in HIDDEN_ACTIVATIONS and "softmax" in OUTPUT_ACTIVATIONS


@pytest.mark.parametrize("name", NAMES)
def test_values_match_closed_form(name):
    z = np.linspace(-30.0, 30.0, 121).reshape(11, 11)
    act = ACTIVATIONS[name]
    np.testing.assert_allclose(act.forward(z), CLOSED_FORMS[name](z), rtol=1e-12, atol=1e-12)
    assert act(z).shape == z.shape  # __call__ is forward


def test_gelu_is_close_to_the_exact_erf_form():
    z = np.linspace(-6.0, 6.0, 241)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in z])
    assert np.max(np.abs(ACTIVATIONS["gelu"].forward(z[None, :])[0] - exact)) < 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_finite_and_warning_free_up_to_1e4(name, strict_fp):
    magnitudes = np.array([0.0, 1e-8, 0.5, 1.0, 20.0, 40.0, 88.0, 89.0, 700.0, 710.0, 1e3, 1e4])
    z = np.concatenate([magnitudes, -magnitudes])[None, :]  # (1, 24)
    z = np.vstack([z, z[:, ::-1], np.full_like(z, 1e4), np.full_like(z, -1e4)])  # (4, 24)
    act = ACTIVATIONS[name]
    a = act.forward(z)
    grad = act.backward(z, a, np.ones_like(z))
    assert np.all(np.isfinite(a)), f"{name} forward not finite"
    assert np.all(np.isfinite(grad)), f"{name} backward not finite"
    if name in EXTREMES:
        hi, lo = EXTREMES[name]
        np.testing.assert_allclose(act.forward(np.array([[1e4, -1e4]]))[0], [hi, lo], atol=1e-12)


def test_softmax_extremes(strict_fp):
    z = np.array([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]])
    np.testing.assert_allclose(
        ACTIVATIONS["softmax"].forward(z),
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]],
        atol=1e-15,
    )


@pytest.mark.parametrize("scale", [1.0, 10.0, 1e4])
def test_softmax_rows_sum_to_one(scale):
    z = np.random.default_rng(1).normal(0.0, scale, size=(50, 6))
    a = ACTIVATIONS["softmax"].forward(z)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(a >= 0)
    # Invariant to adding a constant per row.
    np.testing.assert_allclose(ACTIVATIONS["softmax"].forward(z + 3.0), a, atol=1e-12)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_backward_matches_numerical_derivative(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    act = ACTIVATIONS[name]
    z = _grid(rng)
    h = 1e-6
    numeric = (act.forward(z + h) - act.forward(z - h)) / (2 * h)
    # With grad_a = 1 the backward rule returns f'(z) itself, elementwise.
    a = act.forward(z)
    np.testing.assert_allclose(act.backward(z, a, np.ones_like(z)), numeric, rtol=1e-6, atol=1e-8)
    # And it is a chain rule: an upstream gradient multiplies elementwise.
    g = rng.normal(size=z.shape)
    np.testing.assert_allclose(act.backward(z, a, g), g * numeric, rtol=1e-6, atol=1e-8)


def test_softmax_backward_is_the_jacobian_vector_product():
    rng = np.random.default_rng(0)
    act = ACTIVATIONS["softmax"]
    z = rng.normal(size=(4, 5))
    g = rng.normal(size=(4, 5))
    h = 1e-6
    numeric = np.zeros_like(z)
    # d/dz_ij of sum_k g_ik softmax(z_i)_k, one coordinate at a time.
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            zp, zm = z.copy(), z.copy()
            zp[i, j] += h
            zm[i, j] -= h
            numeric[i, j] = np.sum(g[i] * (act.forward(zp)[i] - act.forward(zm)[i])) / (2 * h)
    np.testing.assert_allclose(act.backward(z, act.forward(z), g), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_float32_in_float32_out(name):
    z = np.linspace(-3.0, 3.0, 12, dtype=np.float32).reshape(3, 4)
    act = ACTIVATIONS[name]
    a = act.forward(z)
    assert a.dtype == np.float32
    assert act.backward(z, a, np.ones_like(z)).dtype == np.float32


# ------------------------------------------------------------------------ parameters


def test_leaky_relu_slope_is_used():
    act = get_activation("leaky_relu", slope=0.2)
    assert act.params == {"slope": 0.2}
    z = np.array([[-2.0, -0.5, 0.5, 3.0]])
    np.testing.assert_allclose(act.forward(z), [[-0.4, -0.1, 0.5, 3.0]])
    np.testing.assert_allclose(act.backward(z, act.forward(z), np.ones_like(z)), [[0.2, 0.2, 1, 1]])
    # The registry default is 0.01.
    np.testing.assert_allclose(ACTIVATIONS["leaky_relu"].forward(z)[0, 0], -0.02)


def test_elu_alpha_is_used():
    act = get_activation("elu", alpha=2.0)
    assert act.params == {"alpha": 2.0}
    z = np.array([[-1e4, -1.0, 1.0]])
    a = act.forward(z)
    np.testing.assert_allclose(a, [[-2.0, 2.0 * (np.exp(-1.0) - 1.0), 1.0]])
    np.testing.assert_allclose(
        act.backward(z, a, np.ones_like(z)), [[0.0, 2.0 * np.exp(-1.0), 1.0]], atol=1e-300
    )


def test_parametrised_backward_matches_numerical_derivative():
    rng = np.random.default_rng(3)
    z = _grid(rng)
    h = 1e-6
    for act in (get_activation("leaky_relu", slope=0.3), get_activation("elu", alpha=0.7)):
        numeric = (act.forward(z + h) - act.forward(z - h)) / (2 * h)
        got = act.backward(z, act.forward(z), np.ones_like(z))
        np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-8)


def test_parameters_a_function_does_not_take_are_ignored():
    assert get_activation("tanh", slope=0.3) is ACTIVATIONS["tanh"]
    assert get_activation("elu", slope=0.3) is ACTIVATIONS["elu"]
    assert get_activation("leaky_relu") is ACTIVATIONS["leaky_relu"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameters_are_refused(value):
    with pytest.raises(ValueError, match="leaky_relu slope=.*must be a finite number"):
        get_activation("leaky_relu", slope=value)
    with pytest.raises(ValueError, match="elu alpha=.*must be a finite number"):
        get_activation("elu", alpha=value)


# ------------------------------------------------------------------------- look-ups


@pytest.mark.parametrize("name", ["swish", "ReLU", "", None, 3])
def test_unknown_names_raise_listing_known_ones(name):
    with pytest.raises(ValueError, match="unknown activation") as info:
        get_activation(name)
    for known in OUTPUT_ACTIVATIONS:
        assert known in str(info.value)


def test_softmax_refused_in_hidden_layers():
    with pytest.raises(ValueError, match="'softmax' can only be used on the output layer") as info:
        get_activation("softmax", hidden=True)
    for known in HIDDEN_ACTIVATIONS:
        assert known in str(info.value)
    with pytest.raises(ValueError, match="unknown activation 'swish'; known: ") as info:
        get_activation("swish", hidden=True)
    assert "softmax" not in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_lookup_by_name_returns_the_registered_entry(name):
    assert get_activation(name) is ACTIVATIONS[name]


@pytest.mark.parametrize("value", ["0.1", None, [0.1]])
def test_non_numeric_parameters_are_refused_with_value_error(value):
    with pytest.raises(ValueError, match="slope"):
        get_activation("leaky_relu", slope=value)
