"""pipeline.engine.init: each initialiser's empirical spread against its formula, determinism,
zero biases. Parametrised over ``INITIALIZERS``: a new entry must add its formula to
``FORMULAS``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.engine.init import INITIALIZERS, get_initializer
from pipeline.engine.mlp import MLP

# name -> (distribution, scale(fan_in, fan_out)): the std of a normal, the limit of a
# symmetric uniform.
FORMULAS = {
    "normal": ("normal", lambda fi, fo: 1.0 / math.sqrt(fi)),
    "xavier_uniform": ("uniform", lambda fi, fo: math.sqrt(6.0 / (fi + fo))),
    "xavier_normal": ("normal", lambda fi, fo: math.sqrt(2.0 / (fi + fo))),
    "he_uniform": ("uniform", lambda fi, fo: math.sqrt(6.0 / fi)),
    "he_normal": ("normal", lambda fi, fo: math.sqrt(2.0 / fi)),
}

NAMES = sorted(INITIALIZERS)
# Unequal fans, so swapping fan_in and fan_out would change every formula.
FAN_IN, FAN_OUT = 200, 1000


def _expected_std(name: str, fan_in: int, fan_out: int) -> float:
    kind, scale = FORMULAS[name]
    s = scale(fan_in, fan_out)
    return s if kind == "normal" else s / math.sqrt(3.0)


def test_every_initializer_has_a_formula():
    missing = set(INITIALIZERS) - set(FORMULAS)
    assert not missing, f"add formulas for {sorted(missing)} to FORMULAS"


@pytest.mark.parametrize("name", NAMES)
def test_spread_matches_formula(name):
    W = INITIALIZERS[name](np.random.default_rng(0), FAN_IN, FAN_OUT)
    assert W.shape == (FAN_IN, FAN_OUT)
    assert W.dtype == np.float64
    n = W.size  # 200k draws: the std's relative standard error is 1/sqrt(2n) ~ 0.16%
    expected = _expected_std(name, FAN_IN, FAN_OUT)
    assert W.std() == pytest.approx(expected, rel=0.01)
    assert abs(W.mean()) < 5 * expected / math.sqrt(n)
    kind, scale = FORMULAS[name]
    if kind == "uniform":
        limit = scale(FAN_IN, FAN_OUT)
        assert np.abs(W).max() <= limit
        assert np.abs(W).max() > 0.999 * limit  # fills the interval, no narrower
        # Flat: each quarter of [-limit, limit] holds a quarter of the draws.
        counts, _ = np.histogram(W, bins=4, range=(-limit, limit))
        np.testing.assert_allclose(counts / n, 0.25, atol=0.005)
    else:
        # Normal: about 68.3% within one std, 95.4% within two.
        assert np.mean(np.abs(W) < expected) == pytest.approx(0.6827, abs=0.005)
        assert np.mean(np.abs(W) < 2 * expected) == pytest.approx(0.9545, abs=0.003)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name):
    draw = INITIALIZERS[name]
    a = draw(np.random.default_rng(7), 5, 3)
    b = draw(np.random.default_rng(7), 5, 3)
    c = draw(np.random.default_rng(8), 5, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_model_layers_follow_the_formula_and_biases_start_at_zero(name):
    sizes = [300, 400, 100]
    model = MLP(sizes, activation="relu", output="softmax", init=name, seed=3)
    for W, fan_in, fan_out in zip(model.weights, sizes[:-1], sizes[1:], strict=True):
        assert W.std() == pytest.approx(_expected_std(name, fan_in, fan_out), rel=0.02)
    for b in model.biases:
        assert np.all(b == 0.0)
    same = MLP(sizes, activation="relu", output="softmax", init=name, seed=3)
    other = MLP(sizes, activation="relu", output="softmax", init=name, seed=4)
    np.testing.assert_array_equal(model.params, same.params)
    nw = model.n_weight_params
    assert not np.array_equal(model.params[:nw], other.params[:nw])


@pytest.mark.parametrize("name", NAMES)
def test_float32_model_draws_the_same_weights(name):
    m64 = MLP([4, 6, 1], init=name, seed=1)
    m32 = MLP([4, 6, 1], init=name, seed=1, dtype="float32")
    assert m32.params.dtype == np.float32
    np.testing.assert_allclose(m32.params, m64.params, rtol=1e-7)


def test_lookup():
    for name in NAMES:
        assert get_initializer(name) is INITIALIZERS[name]
    with pytest.raises(ValueError, match="unknown init 'orthogonal'; known: ") as info:
        get_initializer("orthogonal")
    for name in NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown init 'orthogonal'"):
        MLP([2, 3, 1], init="orthogonal")
