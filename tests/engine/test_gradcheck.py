"""pipeline.engine.gradcheck: the finite-difference check, its verdicts, and the demonstrations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.engine.gradcheck import (
    GradcheckResult,
    cost_vs_params,
    finite_difference_grad,
    gradcheck,
    relative_error,
    three_ways_demo,
)
from pipeline.engine.mlp import MLP


def _problem(sizes, output="sigmoid", seed=0, n=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, max(sizes[-1], 2), size=n)
    return X, y


class SignErrorMLP(MLP):
    """A model whose second bias gradient has the wrong sign: a typical backprop bug."""

    def loss_and_grads(self, X, y, loss):
        value, dW, db = super().loss_and_grads(X, y, loss)
        db[1] = -db[1]
        return value, dW, db


class ScaledWeightMLP(MLP):
    """A model that forgets the 1/n of the mean in the first weight gradient."""

    def loss_and_grads(self, X, y, loss):
        value, dW, db = super().loss_and_grads(X, y, loss)
        dW[0] = dW[0] * np.asarray(X).shape[0]
        return value, dW, db


def test_correct_model_passes_with_one_entry_per_tensor() -> None:
    model = MLP([3, 5, 4, 2], activation="tanh", output="softmax", seed=1)
    X, y = _problem(model.sizes)
    result = gradcheck(model, X, y, "cross_entropy")
    assert isinstance(result, GradcheckResult) and isinstance(result, dict)
    assert list(result) == ["W1", "W2", "W3", "b1", "b2", "b3"]
    assert all(isinstance(v, float) for v in result.values())
    assert result.passed and bool(result) and result.failed == []
    assert result.max_error < 1e-7
    for name in result:
        assert result.analytic[name].shape == result.numeric[name].shape
    assert "PASSED" in result.table() and "W3" in str(result)


def test_no_bias_model_has_only_weight_entries() -> None:
    model = MLP([4, 3, 1], activation="sigmoid", output="sigmoid", bias=False, seed=2)
    X, y = _problem(model.sizes)
    result = gradcheck(model, X, y, "bce")
    assert list(result) == ["W1", "W2"]
    assert result.passed


def test_sign_error_in_one_bias_is_caught_for_exactly_that_tensor() -> None:
    model = SignErrorMLP([3, 5, 4, 2], activation="tanh", output="softmax", seed=1)
    X, y = _problem(model.sizes)
    result = gradcheck(model, X, y, "cross_entropy")
    assert result.failed == ["b2"]
    assert not result.passed
    # a flipped sign makes |a - b| = |a| + |b|: the largest possible relative error
    assert result["b2"] == pytest.approx(1.0, abs=1e-6)
    assert max(v for k, v in result.items() if k != "b2") < 1e-7
    assert "FAIL" in result.table() and "b2" in result.table().splitlines()[-1]


def test_missing_mean_factor_is_caught() -> None:
    model = ScaledWeightMLP([2, 3, 1], activation="relu", output="sigmoid", seed=3)
    X, y = _problem(model.sizes, n=10)
    result = gradcheck(model, X, y, "bce")
    assert result.failed == ["W1"]
    # analytic = 10 * numeric: |10a - a| / |11a| = 9/11
    assert result["W1"] == pytest.approx(9 / 11, rel=1e-5)


def test_float32_model_is_checked_in_float64_and_left_untouched() -> None:
    model = MLP([3, 4, 1], activation="gelu", output="sigmoid", dtype="float32", seed=4)
    before = model.params.copy()
    X, y = _problem(model.sizes)
    result = gradcheck(model, X, y, "bce")
    # float32 finite differences could not reach 1e-6; the float64 copy can
    assert result.passed, result.table()
    assert model.params.dtype == np.float32
    np.testing.assert_array_equal(model.params, before)


def test_finite_differences_restore_parameters_exactly() -> None:
    model = MLP([2, 3, 1], activation="tanh", output="sigmoid", seed=5)
    before = model.params.copy()
    X, y = _problem(model.sizes)
    fd = finite_difference_grad(model, X, y, "bce")
    assert fd.shape == model.params.shape
    np.testing.assert_array_equal(model.params, before)


def test_relative_error_definition() -> None:
    a = np.array([1.0, -2.0, 0.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(a, -a) == 1.0
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    # normalised by the largest |a| + |b| in the tensor, not entry by entry
    assert relative_error(np.array([1.0, 0.0]), np.array([1.0, 1e-3])) == pytest.approx(1e-3 / 2)
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(np.zeros(2), np.zeros(3))


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan")])
def test_bad_eps_is_refused(eps: float) -> None:
    model = MLP([2, 1], output="sigmoid")
    with pytest.raises(ValueError, match="eps="):
        gradcheck(model, np.zeros((2, 2)), np.array([0, 1]), "bce", eps=eps)


def test_bad_threshold_is_refused() -> None:
    model = MLP([2, 1], output="sigmoid")
    with pytest.raises(ValueError, match="threshold="):
        gradcheck(model, np.zeros((2, 2)), np.array([0, 1]), "bce", threshold=0)


def test_three_ways_agree() -> None:
    demo = three_ways_demo()
    assert demo["names"] == ["w1", "b1", "w2", "b2"]
    np.testing.assert_allclose(demo["closed_form"], demo["backprop"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(demo["closed_form"], demo["finite_differences"], rtol=0, atol=1e-8)
    assert demo["max_abs_difference"] < 1e-8
    assert np.all(np.abs(demo["backprop"]) > 1e-3)  # a real gradient, not all ~0
    assert demo["passes"]["finite_differences"]["forward"] == 8
    assert demo["passes"]["backprop"] == {"forward": 1, "backward": 1}


def test_three_ways_agree_at_other_points() -> None:
    rng = np.random.default_rng(6)
    for _ in range(5):
        x, t, w1, b1, w2, b2 = rng.uniform(-2, 2, size=6)
        demo = three_ways_demo(x, t, w1, b1, w2, b2)
        assert demo["max_abs_difference"] < 1e-8


def test_cost_grows_with_parameters_for_finite_differences_only() -> None:
    rows = cost_vs_params([[2, 3, 1], [4, 16, 16, 3], [8, 32, 32, 2]], n_samples=32)
    assert len(rows) == 6
    fd = [r for r in rows if r["method"] == "finite_differences"]
    bp = [r for r in rows if r["method"] == "backprop"]
    assert [r["n_params"] for r in fd] == [13, 403, 1410]
    for f, b in zip(fd, bp, strict=True):
        assert f["forward_passes"] == 2 * f["n_params"] and f["backward_passes"] == 0
        assert b["forward_passes"] == 1 and b["backward_passes"] == 1
        assert f["max_abs_difference"] < 1e-8  # both methods computed the same gradient
        assert f["seconds"] > 0 and b["seconds"] > 0
    # 2820 forward passes against one forward and one backward: not close
    assert fd[-1]["seconds"] > 10 * bp[-1]["seconds"]
    assert fd[-1]["seconds"] > fd[0]["seconds"]
