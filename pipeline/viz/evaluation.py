"""How a trained classifier does on the test split: the numbers and the figures users read.

:func:`evaluate_classifier` takes the true labels and the predicted class probabilities
(of the test split: reported, never selected on) and returns scikit-learn's metrics as
plain numbers and one figure of three or four panels (one figure: drawing is most of what
pictures cost a run):

- the confusion matrix, counts and the share of each true class;
- the reliability (calibration) diagram: how often a prediction made with confidence p
  is right, against p, with the share of predictions in each bin as bars;
- the ROC curve and the precision-recall curve (two classes).

Like the rest of :mod:`pipeline.viz`, nothing here knows the engine or MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.viz.plots import _new_figure

#: Bins of the reliability diagram.
CALIBRATION_BINS = 10


def evaluate_classifier(y_true: np.ndarray, proba: np.ndarray,
                        class_names: Sequence[str]) -> tuple[dict[str, Any], Figure]:
    """Metrics and figures of predicted probabilities ``proba`` (n, k) against ``y_true``.

    Returns
    -------
    numbers : dict
        ``accuracy``, ``balanced_accuracy``, ``log_loss``, ``brier`` (mean squared error of
        the probabilities), ``expected_calibration_error``, per-class ``precision``,
        ``recall`` and ``f1`` (scikit-learn's ``classification_report``), the
        ``confusion_matrix`` as nested lists, and for two classes ``roc_auc`` and
        ``average_precision``.
    figure : Figure
        The confusion matrix, the reliability diagram and, for two classes, the ROC and
        precision-recall curves, side by side.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=float)
    k = proba.shape[1]
    if proba.ndim != 2 or proba.shape[0] != y_true.shape[0] or k < 2:
        raise ValueError(f"proba must be (n, k >= 2) for {y_true.shape[0]} labels; "
                         f"got {proba.shape}")
    # float32 probabilities sum to 1 only to about 1e-7; scikit-learn warns on that.
    proba = proba / proba.sum(axis=1, keepdims=True)
    names = [str(c) for c in class_names]
    labels = list(range(k))
    pred = proba.argmax(axis=1)
    onehot = np.eye(k)[y_true]
    confidence = proba.max(axis=1)
    bins = _calibration_bins(confidence, pred == y_true)
    numbers: dict[str, Any] = {
        "n": int(y_true.shape[0]),
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, pred)),
        "log_loss": float(skm.log_loss(y_true, np.clip(proba, 1e-15, 1), labels=labels)),
        "brier": float(np.mean(np.sum((proba - onehot) ** 2, axis=1))),
        "expected_calibration_error": float(
            np.sum(bins["count"] * np.abs(bins["accuracy"] - bins["confidence"]))
            / max(1, y_true.shape[0])),
        "confusion_matrix": skm.confusion_matrix(y_true, pred, labels=labels).tolist(),
        "classes": skm.classification_report(y_true, pred, labels=labels, target_names=names,
                                             output_dict=True, zero_division=0),
    }
    binary = k == 2 and len(np.unique(y_true)) == 2
    fig = _new_figure(((4 if binary else 2) * 3.6 + 0.4, 3.9), layout=None)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.86, wspace=0.35)
    axes = fig.subplots(1, 4 if binary else 2)
    _confusion(axes[0], np.array(numbers["confusion_matrix"]), names)
    _calibration(axes[1], bins, numbers)
    if binary:
        score = proba[:, 1]
        fpr, tpr, _ = skm.roc_curve(y_true, score)
        precision, recall, _ = skm.precision_recall_curve(y_true, score)
        numbers["roc_auc"] = float(skm.roc_auc_score(y_true, score))
        numbers["average_precision"] = float(skm.average_precision_score(y_true, score))
        _curve(axes[2], fpr, tpr, "false positive rate", "true positive rate",
               f"ROC, AUC {numbers['roc_auc']:.3f}", chance=([0, 1], [0, 1]))
        positives = float(np.mean(y_true == 1))
        _curve(axes[3], recall, precision, "recall", "precision",
               f"precision-recall, AP {numbers['average_precision']:.3f}",
               chance=([0, 1], [positives, positives]))
    fig.suptitle(f"test split ({y_true.shape[0]} rows)"
                 + (f", class {names[1]} positive" if binary else ""), fontsize="medium")
    return numbers, fig


def _calibration_bins(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Per bin of confidence: how many predictions, their mean confidence, their accuracy."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, CALIBRATION_BINS - 1)
    count = np.bincount(which, minlength=CALIBRATION_BINS).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, confidence, CALIBRATION_BINS) / count
        acc = np.bincount(which, correct.astype(float), CALIBRATION_BINS) / count
    return {"edges": edges, "count": count, "confidence": np.nan_to_num(conf),
            "accuracy": np.nan_to_num(acc)}


def _confusion(ax: Any, C: np.ndarray, names: list[str]) -> None:
    k = len(names)
    share = C / np.maximum(C.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{C[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    fontsize="small", color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix", fontsize="medium")


def _curve(ax: Any, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str, *,
           chance: tuple[list[float], list[float]]) -> None:
    ax.plot(*chance, color="0.6", ls="--", lw=1, label="chance")
    ax.plot(x, y, color="C0", lw=2)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)


def _calibration(ax: Any, bins: dict[str, np.ndarray], numbers: dict[str, Any]) -> None:
    seen = bins["count"] > 0
    share = bins["count"] / max(1.0, bins["count"].sum())
    ax.bar(bins["edges"][:-1], share, width=np.diff(bins["edges"]), align="edge",
           color="C0", alpha=0.2, edgecolor="white", label="share of predictions")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="calibrated")
    ax.plot(bins["confidence"][seen], bins["accuracy"][seen], "o-", color="C0", lw=2,
            label="share correct")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_title(f"reliability, ECE {numbers['expected_calibration_error']:.3f}",
                 fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left")
