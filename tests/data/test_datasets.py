"""Tests for pipeline.data.datasets: generators, splits, standardisation, CSV loading, bad input."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.datasets import (
    DATASETS,
    Dataset,
    load_csv,
    make_dataset,
    min_samples,
    project_root,
    resolve_path,
)

EXAMPLE = "data/example.csv"
N = 120  # small enough to keep the file fast, large enough for every class in both splits


def build(name: str, **kwargs) -> Dataset:
    """A dataset with test defaults; csv reads data/example.csv (all rows)."""
    args = {"n_samples": None if name == "csv" else N, "test_fraction": 0.25, "seed": 0}
    args.update(kwargs)
    return make_dataset(name, **args)


def write_csv(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def two_class_csv(n: int = 20, labels: tuple = (0, 1)) -> str:
    rows = [f"{i * 0.5},{(i % 7) - 3.0},{labels[i % 2]}" for i in range(n)]
    return "x1,x2,label\n" + "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- registry


def test_registry_names():
    assert set(DATASETS) == {
        "moons",
        "circles",
        "xor",
        "quadrants",
        "spirals",
        "blobs",
        "linear",
        "csv",
    }


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shapes_dtypes_and_classes(name):
    ds = build(name)
    n = ds.n_train + ds.n_test
    assert n == (200 if name == "csv" else N)
    assert ds.n_test == math.ceil(0.25 * n)
    assert ds.X_train.shape == (ds.n_train, 2) and ds.X_test.shape == (ds.n_test, 2)
    assert ds.y_train.shape == (ds.n_train,) and ds.y_test.shape == (ds.n_test,)
    assert ds.X_train.dtype == np.float64 and ds.X_test.dtype == np.float64
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.n_features == 2 and len(ds.feature_names) == 2
    assert len(ds.classes) == ds.n_classes >= 2
    every = set(range(ds.n_classes))
    assert set(ds.y_train.tolist()) == every and set(ds.y_test.tolist()) == every
    assert np.isfinite(ds.X_train).all() and np.isfinite(ds.X_test).all()
    assert isinstance(ds.source, str) and ds.source
    assert ds.params["test_fraction"] == 0.25 and ds.params["seed"] == 0
    assert ds.mean.shape == (2,) and ds.std.shape == (2,)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_deterministic_for_a_seed(name):
    a, b, c = build(name, seed=7), build(name, seed=7), build(name, seed=8)
    for attr in ("X_train", "X_test", "y_train", "y_test"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
    assert not np.array_equal(a.X_train, c.X_train)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_standardised_with_train_statistics(name):
    ds = build(name)
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ds.mean, ds.X_train_raw.mean(axis=0))
    np.testing.assert_allclose(ds.std, ds.X_train_raw.std(axis=0))
    # The test split uses the training statistics, not its own.
    np.testing.assert_allclose(ds.X_test, ds.transform(ds.X_test_raw))
    np.testing.assert_allclose(ds.inverse_transform(ds.X_train), ds.X_train_raw)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_to_frame_in_original_units(name):
    ds = build(name)
    frame = ds.to_frame()
    assert list(frame.columns) == [*ds.feature_names, "label", "split"]
    assert len(frame) == ds.n_train + ds.n_test
    assert (frame["split"] == "train").sum() == ds.n_train
    train = frame[frame["split"] == "train"]
    np.testing.assert_array_equal(train[list(ds.feature_names)].to_numpy(), ds.X_train_raw)
    expected = [ds.classes[i] for i in ds.y_train]
    assert train["label"].tolist() == expected


def test_dataset_is_frozen_and_checks_shapes():
    ds = build("moons")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"expected \(n_samples, 2\)"):
        ds.transform(np.zeros((3, 3)))
    assert "moons" in repr(ds) and "X_train" not in repr(ds)


# --------------------------------------------------------------------------- labels by construction


def raw_frame(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    return np.vstack([ds.X_train_raw, ds.X_test_raw]), np.concatenate([ds.y_train, ds.y_test])


def test_quadrants_four_classes():
    X, y = raw_frame(build("quadrants", classes=4, noise=0.0))
    quadrant = np.select(
        [(X[:, 0] > 0) & (X[:, 1] > 0), (X[:, 0] < 0) & (X[:, 1] > 0), (X < 0).all(axis=1)],
        [0, 1, 2],
        default=3,
    )
    np.testing.assert_array_equal(y, quadrant)
    assert np.abs(X).max() <= 1.0
    np.testing.assert_array_equal(np.bincount(y), [N // 4] * 4)


def test_quadrants_two_classes_by_sign_of_product():
    X, y = raw_frame(build("quadrants", classes=2, noise=0.0))
    np.testing.assert_array_equal(y, (X[:, 0] * X[:, 1] < 0).astype(np.int64))
    assert build("quadrants", classes=2).classes == (0, 1)


def test_xor_labels_and_corners():
    X, y = raw_frame(build("xor", noise=0.05))
    np.testing.assert_array_equal(y, (X[:, 0] * X[:, 1] < 0).astype(np.int64))
    np.testing.assert_allclose(np.abs(X), 1.0, atol=0.3)  # every point near a corner


def test_linear_is_separable():
    X, y = raw_frame(build("linear", noise=0.0, margin=0.2))
    from sklearn.svm import LinearSVC

    assert LinearSVC(C=1e4, max_iter=20_000).fit(X, y).score(X, y) == 1.0


@pytest.mark.parametrize(
    ("name", "k"), [("spirals", 3), ("spirals", 5), ("blobs", 2), ("blobs", 6)]
)
def test_generators_with_k_classes(name, k):
    ds = build(name, classes=k)
    assert ds.n_classes == k and ds.classes == tuple(range(k))
    assert set(ds.y_test.tolist()) == set(range(k))


def test_params_record_defaults():
    ds = build("circles")
    assert ds.params == {
        "n_samples": N,
        "noise": 0.1,
        "seed": 0,
        "factor": 0.5,
        "classes": 2,
        "test_fraction": 0.25,
        "val_fraction": 0.0,
    }
    assert ds.source == "sklearn.datasets.make_circles"


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.8])
def test_min_samples_is_exact(k, fraction):
    n = min_samples(k, fraction)
    fits = [
        m
        for m in range(1, 200)
        if math.ceil(fraction * m) >= k and m - math.ceil(fraction * m) >= k
    ]
    assert n == fits[0]
    ds = make_dataset("spirals", n_samples=n, test_fraction=fraction, seed=1, classes=k)
    assert set(ds.y_train.tolist()) == set(ds.y_test.tolist()) == set(range(k))
    with pytest.raises(ValueError, match=rf"^n_samples={n - 1}: too few .* at least {n}$"):
        make_dataset("spirals", n_samples=n - 1, test_fraction=fraction, seed=1, classes=k)


# --------------------------------------------------------------------------- CSV


def test_example_csv():
    ds = build("csv")
    assert ds.source == str(project_root() / "data" / "example.csv")
    assert ds.feature_names == ("x1", "x2") and ds.classes == (0, 1)
    file = pd.read_csv(project_root() / EXAMPLE)
    assert len(file) == 200
    frame = ds.to_frame().drop(columns="split")
    key = ["x1", "x2", "label"]
    pd.testing.assert_frame_equal(
        frame.sort_values(key).reset_index(drop=True), file.sort_values(key).reset_index(drop=True)
    )


def test_relative_path_independent_of_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as Hydra may do
    assert resolve_path(EXAMPLE) == project_root() / EXAMPLE
    assert build("csv", path=EXAMPLE).n_train == 150


def test_csv_string_labels_and_custom_columns(tmp_path):
    rows = [f"{i},{i % 5},{i * 2},{['cat', 'dog', 'emu'][i % 3]}" for i in range(30)]
    path = write_csv(tmp_path, "a,b,c,kind\n" + "\n".join(rows) + "\n")
    ds = make_dataset(
        "csv", path=str(path), label_column="kind", feature_columns=["c", "a"], seed=0
    )
    assert ds.classes == ("cat", "dog", "emu") and ds.n_classes == 3
    assert ds.feature_names == ("c", "a") and ds.source == str(path)
    frame = ds.to_frame()
    assert list(frame.columns) == ["c", "a", "label", "split"]
    row = frame.iloc[0]
    assert row["label"] == ["cat", "dog", "emu"][int(row["a"]) % 3] and row["c"] == 2 * row["a"]


def test_csv_minus_one_one_labels_are_remapped(tmp_path):
    path = write_csv(tmp_path, two_class_csv(labels=(-1, 1)))
    ds = make_dataset("csv", path=path, seed=0)
    assert ds.classes == (-1, 1)
    assert set(ds.y_train.tolist()) == {0, 1}
    assert set(ds.to_frame()["label"]) == {-1, 1}


def test_csv_round_trip_through_to_frame(tmp_path):
    original = build("moons", noise=0.1)
    path = tmp_path / "moons.csv"
    original.to_frame().to_csv(path, index=False)
    again = make_dataset("csv", path=path, feature_columns=["x1", "x2"], seed=0)
    assert again.classes == original.classes
    X0, y0 = raw_frame(original)
    X1, y1 = raw_frame(again)
    order0, order1 = np.lexsort(X0.T), np.lexsort(X1.T)
    np.testing.assert_allclose(X1[order1], X0[order0], rtol=1e-15)
    np.testing.assert_array_equal(y1[order1], y0[order0])


def test_csv_subset_and_jitter():
    ds = build("csv", n_samples=100)
    _, y = raw_frame(ds)
    np.testing.assert_array_equal(np.bincount(y), [50, 50])
    assert ds.params["n_samples"] == 100
    plain, jittered = build("csv"), build("csv", noise=0.5)
    assert not np.allclose(plain.X_train_raw, jittered.X_train_raw)


def test_load_csv_returns_codes(tmp_path):
    raw = load_csv(write_csv(tmp_path, two_class_csv(labels=("no", "yes"))))
    assert raw.X.shape == (20, 2) and raw.X.dtype == np.float64
    assert raw.y.dtype == np.int64 and raw.classes == ("no", "yes")


# --------------------------------------------------------------------------- bad input

BAD = [
    # name, kwargs, text the one-line message must contain
    pytest.param("mooons", {}, "unknown dataset; choose one of moons, circles", id="unknown-name"),
    pytest.param(
        "moons", {"factor": 0.5}, "factor=0.5: not an option of dataset moons", id="unknown-option"
    ),
    pytest.param("moons", {"n_samples": 0}, "n_samples=0", id="n-zero"),
    pytest.param("moons", {"n_samples": 10.5}, "n_samples=10.5", id="n-float"),
    pytest.param("moons", {"n_samples": True}, "n_samples=True", id="n-bool"),
    pytest.param("moons", {"n_samples": "100"}, "n_samples='100'", id="n-string"),
    pytest.param("moons", {"n_samples": 4}, "n_samples=4: too few", id="n-too-small"),
    pytest.param("blobs", {"n_samples": 10, "classes": 5}, "need at least 17", id="n-too-small-k"),
    pytest.param("moons", {"noise": -0.1}, "noise=-0.1", id="noise-negative"),
    pytest.param("moons", {"noise": float("nan")}, "noise=nan", id="noise-nan"),
    pytest.param("xor", {"noise": float("inf")}, "noise=inf", id="noise-inf"),
    pytest.param("moons", {"test_fraction": 0.0}, "test_fraction=0.0", id="fraction-zero"),
    pytest.param("moons", {"test_fraction": 1}, "test_fraction=1", id="fraction-one"),
    pytest.param("moons", {"test_fraction": 1.5}, "test_fraction=1.5", id="fraction-big"),
    pytest.param("moons", {"seed": -1}, "seed=-1", id="seed-negative"),
    pytest.param("moons", {"classes": 3}, "classes=3", id="classes-moons"),
    pytest.param("xor", {"classes": 4}, "classes=4", id="classes-xor"),
    pytest.param("quadrants", {"classes": 3}, "allowed: 2 or 4", id="classes-quadrants"),
    pytest.param("spirals", {"classes": 1}, "classes=1", id="classes-spirals"),
    pytest.param("blobs", {"classes": 2.5}, "classes=2.5", id="classes-blobs"),
    pytest.param("circles", {"factor": 1.0}, "factor=1.0", id="factor"),
    pytest.param("spirals", {"turns": 0}, "turns=0", id="turns"),
    pytest.param("linear", {"margin": -1}, "margin=-1", id="margin"),
    pytest.param(
        "csv", {"path": "data/nope.csv"}, "no such file " + str(project_root()), id="csv-missing"
    ),
    pytest.param("csv", {"path": "data"}, "is not a file", id="csv-directory"),
    pytest.param("csv", {"n_samples": 500}, "n_samples=500", id="csv-n-too-large"),
    pytest.param("csv", {"n_samples": 3}, "n_samples=3", id="csv-n-too-small"),
    pytest.param("csv", {"classes": 3}, "classes=3", id="csv-classes"),
    pytest.param(
        "csv", {"label_column": "y"}, "columns are: 'x1', 'x2', 'label'", id="csv-no-label"
    ),
    pytest.param(
        "csv", {"feature_columns": ["x1"]}, "feature_columns", id="csv-features-one"
    ),
    pytest.param(
        "csv", {"feature_columns": ["x1", "z"]}, "'z' is not a column", id="csv-features-unknown"
    ),
    pytest.param(
        "csv", {"feature_columns": ["x1", "label"]}, "label column", id="csv-features-label"
    ),
    pytest.param(
        "csv", {"feature_columns": "x1,x2"}, "feature_columns", id="csv-features-string"
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), BAD)
def test_bad_arguments(name, kwargs, expected):
    with pytest.raises(ValueError) as info:
        build(name, **kwargs)
    message = str(info.value)
    assert expected in message
    # One line "<argument>=<value>: <what is allowed>", the argument as make_dataset takes it.
    assert re.match(r"^\w+=.*: ", message) and "\n" not in message, message


BAD_CSV = [
    # file text, text the one-line message must contain
    pytest.param("", "is empty", id="empty"),
    pytest.param("x1,x2,label\n", "no data rows", id="header-only"),
    pytest.param(
        "x1,x2,label\n1,2,0\n3,abc,1\n5,6,0\n7,8,1\n",
        "column 'x2' has a non-numeric value 'abc' at row 2 (line 3)",
        id="non-numeric",
    ),
    pytest.param(
        "x1,x2,label\n1,,0\n3,4,1\n5,,0\n7,8,1\n",
        "column 'x2' has 2 missing value(s)",
        id="missing-values",
    ),
    pytest.param(
        "x1,x2,label\n1,2,0\n3,4,\n5,6,0\n7,8,1\n",
        "label_column='label': 1 missing",
        id="missing-label",
    ),
    pytest.param(
        "a,b,c,label\n1,2,3,0\n4,5,6,1\n", "found 3 feature column(s)", id="three-features"
    ),
    pytest.param("a,label\n1,0\n4,1\n", "found 1 feature column(s)", id="one-feature"),
    pytest.param("x1,x2,y\n1,2,0\n3,4,1\n", "columns are: 'x1', 'x2', 'y'", id="no-label"),
    pytest.param("x1,x2,label\n1,2,a\n3,4,a\n5,6,a\n", "single class ('a')", id="single-class"),
    pytest.param(two_class_csv(9) + "1,1,2\n", "class 2 has only 1 row", id="lonely-class"),
    pytest.param(two_class_csv(4), "4 rows of", id="too-few-rows"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CSV)
def test_bad_csv(tmp_path, text, expected):
    path = write_csv(tmp_path, text)
    with pytest.raises(ValueError) as info:
        make_dataset("csv", path=str(path), seed=0)
    message = str(info.value)
    assert expected in message
    assert re.match(r"^\w+=.*: ", message) and str(path) in message and "\n" not in message


def test_bad_csv_message_names_resolved_path(tmp_path):
    path = write_csv(tmp_path, "x1,x2,label\n1,2,a\n3,4,a\n")
    with pytest.raises(ValueError, match="^label_column=") as info:
        make_dataset("csv", path=path)
    assert str(path) in str(info.value)


def test_class_too_rare_for_the_split(tmp_path):
    rows = [f"{i},{i % 3},a" for i in range(40)] + ["1,1,b", "2,2,b"]
    path = write_csv(tmp_path, "x1,x2,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"^test_fraction=0\.1: class 'b' \(2 rows\)"):
        make_dataset("csv", path=path, test_fraction=0.1)
    assert make_dataset("csv", path=path, test_fraction=0.5).n_classes == 2


# ------------------------------------------------------------------ validation split


def _rows(X: np.ndarray) -> set[tuple[float, float]]:
    return {tuple(r) for r in np.round(X, 12)}


def test_the_validation_split_is_disjoint_fixed_by_the_seed_and_leaves_test_alone():
    ds = make_dataset("moons", n_samples=400, noise=0.2, seed=3, val_fraction=0.25)
    assert (ds.n_train, ds.n_val, ds.n_test) == (225, 75, 100)
    train, val, test = _rows(ds.X_train_raw), _rows(ds.X_val_raw), _rows(ds.X_test_raw)
    assert not (train & val) and not (train & test) and not (val & test)
    again = make_dataset("moons", n_samples=400, noise=0.2, seed=3, val_fraction=0.25)
    assert np.array_equal(again.X_val_raw, ds.X_val_raw)
    assert np.array_equal(again.y_val, ds.y_val)
    other = make_dataset("moons", n_samples=400, noise=0.2, seed=4, val_fraction=0.25)
    assert not np.array_equal(other.X_val_raw, ds.X_val_raw)
    # The test split is the same with or without a validation split.
    plain = make_dataset("moons", n_samples=400, noise=0.2, seed=3)
    assert np.array_equal(plain.X_test_raw, ds.X_test_raw) and plain.X_val is None
    # Standardised with the statistics of the training rows only.
    assert np.allclose(ds.mean, ds.X_train_raw.mean(axis=0))
    assert np.allclose(ds.X_val, (ds.X_val_raw - ds.mean) / ds.std)
    assert set(np.unique(ds.y_val)) == {0, 1}  # stratified: both classes
    counts = ds.to_frame()["split"].value_counts().to_dict()
    assert counts == {"train": 225, "val": 75, "test": 100}


@pytest.mark.parametrize(("fraction", "message"), [
    (-0.1, r"^val_fraction=-0\.1: must be a number in \[0, 1\)"),
    (1.0, r"^val_fraction=1\.0: must be a number in \[0, 1\)"),
    (0.999, r"^val_fraction=0\.999: 75 of the 75 training rows would be held out, leaving 0"),
])
def test_a_validation_split_that_leaves_no_training_rows_is_refused(fraction, message):
    with pytest.raises(ValueError, match=message) as err:
        make_dataset("moons", n_samples=100, val_fraction=fraction)
    assert "\n" not in str(err.value)
