"""The test split's evaluation: scikit-learn's numbers, and the figure that shows them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from pipeline.viz.evaluation import evaluate_classifier  # noqa: E402


def test_binary_numbers_are_scikit_learns_and_the_figure_has_four_panels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p1 = np.clip(0.7 * y + rng.normal(0.15, 0.2, 300), 0, 1)
    proba = np.c_[1 - p1, p1]
    numbers, fig = evaluate_classifier(y, proba, ["no", "yes"])
    assert numbers["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert numbers["average_precision"] == pytest.approx(skm.average_precision_score(y, p1))
    assert numbers["confusion_matrix"] == skm.confusion_matrix(y, p1 > 0.5).tolist()
    assert numbers["accuracy"] == pytest.approx(np.mean((p1 > 0.5) == y))
    assert numbers["brier"] == pytest.approx(np.mean(2 * (p1 - y) ** 2))
    assert numbers["classes"]["yes"]["recall"] == pytest.approx(
        skm.recall_score(y, p1 > 0.5))
    assert len(fig.axes) == 4
    assert [ax.get_title().split(",")[0] for ax in fig.axes] == [
        "confusion matrix", "reliability", "ROC", "precision-recall"]


def test_a_perfectly_calibrated_model_has_no_calibration_error():
    # Confidence 0.8 everywhere, right 80 % of the time.
    y = np.array([0] * 80 + [1] * 20)
    proba = np.tile([0.8, 0.2], (100, 1))
    numbers, _ = evaluate_classifier(y, proba, ["a", "b"])
    assert numbers["expected_calibration_error"] == pytest.approx(0.0, abs=1e-12)
    proba = np.tile([0.95, 0.05], (100, 1))  # overconfident by 0.15
    numbers, _ = evaluate_classifier(y, proba, ["a", "b"])
    assert numbers["expected_calibration_error"] == pytest.approx(0.15)


def test_several_classes_get_the_matrix_and_the_reliability_only():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 120)
    proba = rng.dirichlet([1, 1, 1], 120)
    proba[np.arange(120), y] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    numbers, fig = evaluate_classifier(y, proba, ["a", "b", "c"])
    assert "roc_auc" not in numbers and len(fig.axes) == 2
    assert np.trace(np.array(numbers["confusion_matrix"])) == int(np.sum(proba.argmax(1) == y))
