"""Two-dimensional classification datasets, split and standardised.

Every dataset is made by one generator in the registry :data:`DATASETS`, keyed by the
name users type (``dataset=moons``). :func:`make_dataset` is the checked entry point: it
validates the arguments, calls the generator, splits the data with a stratified
``train_test_split`` and standardises the features with statistics of the training
split only (so nothing about the test split leaks into training).

Conventions: ``X`` has shape ``(n_samples, n_features)`` and is float64; labels are int64
in ``0..k-1``. Errors are ``ValueError`` with one line ``<argument>=<value>: <what is
allowed>`` (``noise=-1: must be a number >= 0``); an application reading the arguments from
a config file puts its own key in front (``dataset.noise``).

Examples
--------
>>> from pipeline.data.datasets import make_dataset
>>> ds = make_dataset("moons", n_samples=200, noise=0.2, test_fraction=0.25, seed=0)
>>> ds.X_train.shape, ds.y_test.dtype
((150, 2), dtype('int64'))
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.paths import project_root

__all__ = [
    "DATASETS",
    "Dataset",
    "RawData",
    "load_csv",
    "make_dataset",
    "min_samples",
    "project_root",
    "resolve_path",
]

#: Options every generator takes; anything else is a generator-specific keyword.
COMMON_KEYS = ("n_samples", "noise", "seed")
#: Column names ``Dataset.to_frame`` adds after the features.
LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
#: sklearn's ``random_state`` accepts seeds in [0, 2**32 - 1].
_MAX_SEED = 2**32 - 1


class RawData(NamedTuple):
    """What a generator returns: the whole data set before splitting and scaling.

    Attributes
    ----------
    X : numpy.ndarray of float64, shape (n_samples, 2)
        Features in original units.
    y : numpy.ndarray of int64, shape (n_samples,)
        Labels in ``0..k-1``; ``classes[y[i]]`` is the original label of row ``i``.
    classes : tuple
        Original label values, one per class, in code order.
    feature_names : tuple of str
        One name per feature column.
    source : str
        Where the data came from (a generator name or a CSV's absolute path).
    """

    X: np.ndarray
    y: np.ndarray
    classes: tuple[Any, ...]
    feature_names: tuple[str, ...]
    source: str


# --------------------------------------------------------------------------- paths


def resolve_path(path: str | Path) -> Path:
    """Resolve a user-supplied path: absolute as is, relative to :func:`project_root`.

    Parameters
    ----------
    path : str or pathlib.Path
        Path as typed by the user (``~`` is expanded).

    Returns
    -------
    pathlib.Path
        Absolute path (which may not exist).
    """
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = project_root() / p
    return p.resolve()


# --------------------------------------------------------------------------- checks


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `n_samples=True` is a typo, not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_classes(name: str, classes: Any, allowed: Sequence[int] | None) -> int:
    """Validate ``dataset.classes`` for generator ``name``; ``allowed=None`` means >= 2."""
    what = "2 or more" if allowed is None else " or ".join(str(a) for a in allowed)
    if (
        not _is_int(classes)
        or (allowed is None and classes < 2)
        or (allowed is not None and classes not in allowed)
    ):
        raise ValueError(
            f"classes={classes!r}: not supported by dataset {name}; allowed: {what}"
        )
    return int(classes)


def _balanced_counts(n: int, k: int) -> np.ndarray:
    """Split ``n`` samples into ``k`` class sizes differing by at most one, shape (k,)."""
    counts = np.full(k, n // k, dtype=np.int64)
    counts[: n % k] += 1
    return counts


def min_samples(n_classes: int, test_fraction: float) -> int:
    """Smallest ``n_samples`` whose split puts every class in both train and test.

    A stratified split needs at least ``n_classes`` rows in each split; sklearn puts
    ``ceil(test_fraction * n)`` rows in the test split and the rest in train.

    Parameters
    ----------
    n_classes : int
        Number of classes ``k`` (>= 2).
    test_fraction : float
        Fraction of rows in the test split, in (0, 1).

    Returns
    -------
    int
        The minimum number of rows.
    """
    k = n_classes
    # Both split sizes are non-decreasing in n, so scan upwards from a lower bound.
    # Lower bound: ceil(f n) >= k needs n > (k - 1) / f; n - ceil(f n) >= k needs n (1 - f) >= k.
    n = max(2 * k, math.floor((k - 1) / test_fraction), math.floor(k / (1 - test_fraction)))
    while True:
        n_test = math.ceil(test_fraction * n)
        if n_test >= k and n - n_test >= k:
            return n
        n += 1


# --------------------------------------------------------------------------- generators
# Every generator has the signature (n_samples, noise, seed, *, options...) -> RawData with
# defaults for all arguments; make_dataset validates the common ones before calling it.


def _xy_names() -> tuple[str, str]:
    return ("x1", "x2")


def _raw(X: np.ndarray, y: np.ndarray, k: int, source: str) -> RawData:
    return RawData(
        X=np.ascontiguousarray(X, dtype=np.float64),
        y=np.asarray(y, dtype=np.int64),
        classes=tuple(range(k)),
        feature_names=_xy_names(),
        source=source,
    )


def moons(n_samples: int = 500, noise: float = 0.2, seed: int = 0, *, classes: int = 2) -> RawData:
    """Two interleaved half circles (``sklearn.datasets.make_moons``).

    Parameters
    ----------
    n_samples : int
        Number of points, split evenly between the two moons.
    noise : float
        Standard deviation of Gaussian noise added to the points (moon radius is 1).
    seed : int
        Random seed.
    classes : int
        Must be 2.

    Returns
    -------
    RawData
        ``X`` of shape (n_samples, 2), labels 0 and 1.
    """
    _check_classes("moons", classes, (2,))
    from sklearn.datasets import make_moons  # imported here: config checks need no sklearn

    X, y = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return _raw(X, y, 2, "sklearn.datasets.make_moons")


def circles(
    n_samples: int = 500,
    noise: float = 0.1,
    seed: int = 0,
    *,
    factor: float = 0.5,
    classes: int = 2,
) -> RawData:
    """A small circle inside a large one (``sklearn.datasets.make_circles``).

    Parameters
    ----------
    n_samples : int
        Number of points, split evenly between the circles.
    noise : float
        Standard deviation of Gaussian noise added to the points (outer radius is 1).
    seed : int
        Random seed.
    factor : float
        Inner radius divided by outer radius, in (0, 1).
    classes : int
        Must be 2.

    Returns
    -------
    RawData
        ``X`` of shape (n_samples, 2); label 0 is the outer circle, 1 the inner one.
    """
    _check_classes("circles", classes, (2,))
    if not _is_real(factor) or not 0 < factor < 1:
        raise ValueError(f"factor={factor!r}: must be a number in (0, 1)")
    from sklearn.datasets import make_circles

    X, y = make_circles(n_samples=n_samples, noise=noise, factor=float(factor), random_state=seed)
    return _raw(X, y, 2, "sklearn.datasets.make_circles")


def xor(n_samples: int = 400, noise: float = 0.3, seed: int = 0, *, classes: int = 2) -> RawData:
    """Four Gaussian clusters at the corners ``(+-1, +-1)`` with XOR labels.

    Corner ``(sx, sy)`` gets label ``(sx > 0) XOR (sy > 0)``: 1 where the signs differ
    (``x * y < 0``), 0 where they agree. Labels come from the cluster, so with large
    noise some points stray across the axes, as in the classic XOR task.

    Parameters
    ----------
    n_samples : int
        Number of points, split as evenly as possible between the four clusters.
    noise : float
        Standard deviation of each cluster.
    seed : int
        Random seed.
    classes : int
        Must be 2.

    Returns
    -------
    RawData
        ``X`` of shape (n_samples, 2), labels 0 and 1.
    """
    _check_classes("xor", classes, (2,))
    rng = np.random.default_rng(seed)
    corners = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])  # (4, 2)
    cluster = np.repeat(np.arange(4), _balanced_counts(n_samples, 4))  # (n,)
    X = corners[cluster] + noise * rng.standard_normal((n_samples, 2))
    y = cluster % 2  # corners 1 and 3 have signs that differ
    return _raw(X, y, 2, "pipeline.data.xor")


def quadrants(
    n_samples: int = 500, noise: float = 0.0, seed: int = 0, *, classes: int = 4
) -> RawData:
    """Points uniform on the square ``[-1, 1]^2``, labelled by quadrant.

    Every quadrant gets the same number of points (up to one), so classes are balanced.
    With ``classes=4`` the label is the quadrant counted anticlockwise from 0:
    0 = (+, +), 1 = (-, +), 2 = (-, -), 3 = (+, -). With ``classes=2`` the label is 1
    where ``x * y < 0`` and 0 where ``x * y > 0`` (the same convention as :func:`xor`).

    Parameters
    ----------
    n_samples : int
        Number of points.
    noise : float
        Standard deviation of Gaussian jitter added after labelling (0 keeps every
        point in the quadrant of its label).
    seed : int
        Random seed.
    classes : int
        4 (by quadrant) or 2 (by the sign of ``x * y``).

    Returns
    -------
    RawData
        ``X`` of shape (n_samples, 2), labels in ``0..classes-1``.
    """
    k = _check_classes("quadrants", classes, (2, 4))
    rng = np.random.default_rng(seed)
    signs = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])  # (4, 2)
    quadrant = np.repeat(np.arange(4), _balanced_counts(n_samples, 4))  # (n,)
    # 1 - uniform[0, 1) lies in (0, 1]: no point sits exactly on an axis.
    X = signs[quadrant] * (1.0 - rng.random((n_samples, 2)))
    X += noise * rng.standard_normal((n_samples, 2))
    y = quadrant if k == 4 else quadrant % 2
    return _raw(X, y, k, "pipeline.data.quadrants")


def spirals(
    n_samples: int = 500,
    noise: float = 0.05,
    seed: int = 0,
    *,
    classes: int = 2,
    turns: float = 1.0,
) -> RawData:
    """``classes`` interleaved spiral arms around the origin.

    Arm ``j`` holds points at radius ``r = 0.1 + 0.9 t`` and angle
    ``2 pi j / classes + 2 pi turns t`` for ``t`` uniform in [0, 1).

    Parameters
    ----------
    n_samples : int
        Number of points, split as evenly as possible between the arms.
    noise : float
        Standard deviation of Gaussian jitter on the points (the outer radius is 1).
    seed : int
        Random seed.
    classes : int
        Number of arms (and classes), 2 or more.
    turns : float
        How many full turns each arm makes, > 0.

    Returns
    -------
    RawData
        ``X`` of shape (n_samples, 2), label ``j`` for arm ``j``.
    """
    k = _check_classes("spirals", classes, None)
    if not _is_real(turns) or not 0 < turns < math.inf:
        raise ValueError(f"turns={turns!r}: must be a number > 0")
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), _balanced_counts(n_samples, k))  # (n,)
    t = rng.random(n_samples)  # (n,) position along the arm
    radius = 0.1 + 0.9 * t  # start off the origin, where all arms would meet
    angle = 2 * np.pi * y / k + 2 * np.pi * float(turns) * t
    X = radius[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    X += noise * rng.standard_normal((n_samples, 2))
    return _raw(X, y, k, "pipeline.data.spirals")


def blobs(n_samples: int = 500, noise: float = 1.0, seed: int = 0, *, classes: int = 3) -> RawData:
    """Isotropic Gaussian blobs (``sklearn.datasets.make_blobs``), one per class.

    Parameters
    ----------
    n_samples : int
        Number of points, split as evenly as possible between the blobs.
    noise : float
        ``cluster_std``: standard deviation of each blob (centres are drawn uniformly
        from the box [-10, 10]^2, sklearn's default).
    seed : int
        Random seed.
    classes : int
        Number of blobs (``centers``), 2 or more.

    Returns
    -------
    RawData
        ``X`` of shape (n_samples, 2), labels in ``0..classes-1``.
    """
    k = _check_classes("blobs", classes, None)
    from sklearn.datasets import make_blobs

    X, y = make_blobs(
        n_samples=n_samples, n_features=2, centers=k, cluster_std=noise, random_state=seed
    )
    return _raw(X, y, k, "sklearn.datasets.make_blobs")


def linear(
    n_samples: int = 500,
    noise: float = 0.0,
    seed: int = 0,
    *,
    margin: float = 0.1,
    classes: int = 2,
) -> RawData:
    """Two classes on either side of a random line through the origin.

    Points are uniform on a band of half-width ``1 + margin`` around the line, with a
    gap of ``2 * margin`` in the middle, so with ``noise=0`` the classes are linearly
    separable with that margin: a baseline even a network without hidden layers fits.

    Parameters
    ----------
    n_samples : int
        Number of points, split evenly between the classes.
    noise : float
        Standard deviation of Gaussian jitter added after labelling.
    seed : int
        Random seed (also picks the line's direction).
    margin : float
        Distance from the line to the nearest point of each class (before jitter), >= 0.
    classes : int
        Must be 2.

    Returns
    -------
    RawData
        ``X`` of shape (n_samples, 2); label 1 on the side the line's normal points to.
    """
    _check_classes("linear", classes, (2,))
    if not _is_real(margin) or not 0 <= margin < math.inf:
        raise ValueError(f"margin={margin!r}: must be a number >= 0")
    rng = np.random.default_rng(seed)
    phi = rng.uniform(0.0, 2 * np.pi)
    normal = np.array([np.cos(phi), np.sin(phi)])  # (2,) unit normal of the line
    along = np.array([-np.sin(phi), np.cos(phi)])  # (2,) unit direction of the line
    y = np.repeat(np.arange(2), _balanced_counts(n_samples, 2))  # (n,)
    side = 2.0 * y - 1.0  # -1 for class 0, +1 for class 1
    distance = float(margin) + rng.random(n_samples)  # (n,) from the line
    position = rng.uniform(-1.0, 1.0, n_samples)  # (n,) along the line
    X = position[:, None] * along + (side * distance)[:, None] * normal
    X += noise * rng.standard_normal((n_samples, 2))
    return _raw(X, y, 2, "pipeline.data.linear")


# --------------------------------------------------------------------------- CSV


def _plain_scalar(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (messages show ``0``, not ``np.int64(0)``)."""
    return value.item() if isinstance(value, np.generic) else value


def _row(index: int) -> str:
    # Users open the file in an editor: give the 1-based data row and the file line
    # (the header is line 1).
    return f"row {index + 1} (line {index + 2})"


def _column_list(columns: Sequence[Any]) -> str:
    return ", ".join(repr(str(c)) for c in columns) or "(none)"


def _read_csv(path: str | Path) -> tuple[pd.DataFrame, Path]:
    """Read a CSV into a DataFrame, turning every failure into a one-line ValueError."""
    resolved = resolve_path(path)
    if not resolved.exists():
        raise ValueError(
            f"path={str(path)!r}: no such file {resolved} "
            f"(relative paths start at the project root {project_root()})"
        )
    if not resolved.is_file():
        raise ValueError(f"path={str(path)!r}: {resolved} is not a file")
    try:
        frame = pd.read_csv(resolved)
    except pd.errors.EmptyDataError:
        raise ValueError(f"path={str(path)!r}: {resolved} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(
            f"path={str(path)!r}: {resolved} is not a readable CSV ({reason})"
        ) from None
    if len(frame) == 0:
        raise ValueError(f"path={str(path)!r}: {resolved} has a header but no data rows")
    return frame, resolved


def _numeric_column(frame: pd.DataFrame, column: Any, path: str, resolved: Path) -> np.ndarray:
    """Column ``column`` as float64, shape (n_rows,), or a ValueError naming the bad row."""
    raw = frame[column]
    missing = raw.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"path={path!r}: column {str(column)!r} has {int(missing.sum())} missing "
            f"value(s) in {resolved}, the first at {_row(first)}; fill or drop those rows"
        )
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"path={path!r}: column {str(column)!r} has a non-numeric value "
            f"{raw.iloc[first]!r} at {_row(first)} of {resolved}; features must be finite numbers"
        )
    return values


def load_csv(
    path: str | Path = "data/example.csv",
    *,
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
) -> RawData:
    """Read a two-feature labelled CSV with pandas and check it.

    Parameters
    ----------
    path : str or pathlib.Path
        CSV file with a header row; relative paths start at :func:`project_root`.
    label_column : str
        Name of the column holding the labels (any values: numbers or strings).
    feature_columns : sequence of str, optional
        The two feature columns. By default every column except ``label_column``,
        which must then be exactly two.

    Returns
    -------
    RawData
        ``X`` float64 of shape (n_rows, 2); ``y`` int64 codes in ``0..k-1`` where
        ``classes`` holds the sorted original label values; ``source`` is the absolute
        path.

    Raises
    ------
    ValueError
        Missing, empty or unreadable file; missing label or feature columns; not
        exactly two feature columns; missing or non-numeric feature values; missing
        labels; fewer than two classes.
    """
    shown = str(path)
    frame, resolved = _read_csv(path)
    columns = list(frame.columns)
    if not isinstance(label_column, str) or label_column not in frame.columns:
        raise ValueError(
            f"label_column={label_column!r}: not a column of {resolved}; "
            f"columns are: {_column_list(columns)}"
        )
    if feature_columns is None:
        features = [c for c in columns if c != label_column]
        if len(features) != 2:
            raise ValueError(
                f"path={shown!r}: found {len(features)} feature column(s) "
                f"({_column_list(features)}) besides the label column {label_column!r} in "
                f"{resolved}; exactly 2 are needed for the 2-D plots "
                "(pick two with feature_columns=[a,b])"
            )
    else:
        if isinstance(feature_columns, str):
            raise ValueError(
                f"feature_columns={feature_columns!r}: must be a list of 2 column names"
            )
        features = list(feature_columns)
        if len(features) != 2:
            raise ValueError(
                f"feature_columns={features!r}: names {len(features)} column(s); "
                "exactly 2 are needed for the 2-D plots"
            )
        for column in features:
            if column not in frame.columns:
                raise ValueError(
                    f"feature_columns={features!r}: {column!r} is not a column of {resolved}; "
                    f"columns are: {_column_list(columns)}"
                )
            if column == label_column:
                raise ValueError(
                    f"feature_columns={features!r}: includes the label column "
                    f"{label_column!r}"
                )
        if features[0] == features[1]:
            raise ValueError(f"feature_columns={features!r}: names the same column twice")

    X = np.column_stack([_numeric_column(frame, c, shown, resolved) for c in features])

    labels = frame[label_column]
    missing = labels.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"label_column={label_column!r}: {int(missing.sum())} missing "
            f"label(s) in {resolved}, the first at {_row(first)}"
        )
    try:
        values, codes = np.unique(labels.to_numpy(), return_inverse=True)
    except TypeError:  # mixed types (numbers and strings) in an object column
        values, codes = np.unique(labels.astype(str).to_numpy(), return_inverse=True)
    if len(values) < 2:
        raise ValueError(
            f"label_column={label_column!r}: holds a single class "
            f"({_plain_scalar(values[0])!r}) in {resolved}; at least 2 classes are needed"
        )
    # Plain Python scalars keep `classes` JSON-able for MLflow params and plot legends.
    classes = tuple(_plain_scalar(v) for v in values)
    return RawData(
        X=np.ascontiguousarray(X),
        y=codes.reshape(-1).astype(np.int64),
        classes=classes,
        feature_names=tuple(str(c) for c in features),
        source=str(resolved),
    )


def csv(
    n_samples: int | None = None,
    noise: float = 0.0,
    seed: int = 0,
    *,
    path: str = "data/example.csv",
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
    classes: int | None = None,
) -> RawData:
    """A two-feature CSV file (see :func:`load_csv`).

    Parameters
    ----------
    n_samples : int, optional
        ``None`` uses every row; a smaller number draws a stratified random subset
        of that many rows.
    noise : float
        Standard deviation of Gaussian jitter added to the features, in the file's
        units (0 keeps the file's values).
    seed : int
        Random seed for the subset and the jitter.
    path, label_column, feature_columns
        As in :func:`load_csv`.
    classes : int, optional
        If given, the number of classes the file must hold.

    Returns
    -------
    RawData
        ``X`` of shape (n_samples or n_rows, 2), ``y`` codes, original ``classes``.
    """
    raw = load_csv(path, label_column=label_column, feature_columns=feature_columns)
    k = len(raw.classes)
    if classes is not None and (not _is_int(classes) or classes != k):
        raise ValueError(
            f"classes={classes!r}: {raw.source} holds {k} classes "
            f"{list(raw.classes)!r}; allowed: null or {k}"
        )
    counts = np.bincount(raw.y, minlength=k)
    if counts.min() < 2:
        lonely = raw.classes[int(np.argmin(counts))]
        raise ValueError(
            f"path={str(path)!r}: class {lonely!r} has only {int(counts.min())} row in "
            f"{raw.source}; every class needs at least 2 rows (one for train, one for test)"
        )
    X, y = raw.X, raw.y
    n_rows = len(y)
    rng = np.random.default_rng(seed)
    if n_samples is not None and n_samples != n_rows:
        if n_samples > n_rows:
            raise ValueError(
                f"n_samples={n_samples}: {raw.source} has only {n_rows} rows; "
                f"allowed: null (all rows) or at most {n_rows}"
            )
        # Stratified subset: each class keeps its share of the rows (largest remainder).
        share = n_samples * counts / n_rows  # (k,)
        quota = np.floor(share).astype(np.int64)
        by_remainder = np.argsort(-(share - quota), kind="stable")
        quota[by_remainder[: n_samples - int(quota.sum())]] += 1
        if quota.min() < 2:
            rare = raw.classes[int(np.argmin(quota))]
            raise ValueError(
                f"n_samples={n_samples}: keeps only {int(quota.min())} row(s) of class "
                f"{rare!r} from {raw.source}; every class needs 2; allowed: null (all rows) "
                "or a larger n_samples"
            )
        keep = np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(y == c))[: quota[c]] for c in range(k)])
        )
        X, y = X[keep], y[keep]
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return raw._replace(X=np.ascontiguousarray(X, dtype=np.float64), y=y.astype(np.int64))


#: Generators keyed by the names users type. Each takes ``(n_samples, noise, seed)``
#: plus its own keyword options and returns a :class:`RawData`; use
#: :func:`make_dataset` to get checked, split and standardised data.
DATASETS: dict[str, Callable[..., RawData]] = {
    "moons": moons,
    "circles": circles,
    "xor": xor,
    "quadrants": quadrants,
    "spirals": spirals,
    "blobs": blobs,
    "linear": linear,
    "csv": csv,
}


# --------------------------------------------------------------------------- Dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits of a 2-D classification data set, standardised.

    Attributes
    ----------
    X_train : numpy.ndarray of float64, shape (n_train, n_features)
        Standardised training features (mean 0, std 1 per column).
    X_test : numpy.ndarray of float64, shape (n_test, n_features)
        Test features standardised with the training statistics.
    y_train : numpy.ndarray of int64, shape (n_train,)
        Training labels in ``0..n_classes-1``.
    y_test : numpy.ndarray of int64, shape (n_test,)
        Test labels in ``0..n_classes-1``.
    n_classes : int
        Number of classes ``k``.
    n_features : int
        Number of feature columns (2).
    name : str
        Registry name (``"moons"``, ``"csv"``...).
    classes : tuple
        Original label values: label ``i`` stands for ``classes[i]``.
    mean : numpy.ndarray of float64, shape (n_features,)
        Per-feature mean of the training split (original units).
    std : numpy.ndarray of float64, shape (n_features,)
        Per-feature standard deviation of the training split (1 for constant features).
    feature_names : tuple of str
        Column names of the features (``("x1", "x2")`` for generated data).
    source : str
        ``"sklearn.datasets.make_moons"``, ``"pipeline.data.xor"`` or a CSV's absolute path.
    params : dict
        The generator's arguments with defaults filled in, plus ``test_fraction``.
    X_train_raw, X_test_raw : numpy.ndarray of float64, shape (n_train or n_test, n_features)
        The same features in original units (kept so ``to_frame`` is exact).
    X_val, y_val, X_val_raw : numpy.ndarray or None
        The validation split (taken from the training part, standardised with the
        training statistics), or None when ``val_fraction`` is 0. Anything chosen during
        training (early stopping, a sweep's best run, a search's objective) is chosen on
        it, so that the test split stays an honest estimate.
    """

    X_train: np.ndarray = field(repr=False)
    X_test: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    n_classes: int
    n_features: int
    name: str
    classes: tuple[Any, ...]
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)
    feature_names: tuple[str, ...]
    source: str
    params: dict[str, Any]
    X_train_raw: np.ndarray = field(repr=False)
    X_test_raw: np.ndarray = field(repr=False)
    X_val: np.ndarray | None = field(default=None, repr=False)
    y_val: np.ndarray | None = field(default=None, repr=False)
    X_val_raw: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test rows."""
        return int(self.y_test.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation rows (0 without a validation split)."""
        return 0 if self.y_val is None else int(self.y_val.shape[0])

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X has shape {X.shape}; expected (n_samples, {self.n_features})")
        return X

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Standardise features in original units with the training statistics.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features)
            Features in original units.

        Returns
        -------
        numpy.ndarray of float64, shape (n_samples, n_features)
            ``(X - mean) / std``.
        """
        return (self._check_X(X) - self.mean) / self.std

    def inverse_transform(self, X: np.ndarray) -> np.ndarray:
        """Map standardised features back to original units.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features)
            Standardised features (as in ``X_train``).

        Returns
        -------
        numpy.ndarray of float64, shape (n_samples, n_features)
            ``X * std + mean``.
        """
        return self._check_X(X) * self.std + self.mean

    def to_frame(self) -> pd.DataFrame:
        """All rows as a DataFrame in original units.

        Returns
        -------
        pandas.DataFrame
            ``n_train + n_val + n_test`` rows (train, then validation, then test) with one
            column per feature (``feature_names``), ``label`` (the original label values,
            ``classes[y]``) and ``split`` (``"train"``, ``"val"`` or ``"test"``). Saved as
            CSV it reads back with ``make_dataset("csv", path=...,
            feature_columns=list(feature_names))``.
        """
        parts = [(self.X_train_raw, self.y_train, "train"), (self.X_test_raw, self.y_test, "test")]
        if self.X_val_raw is not None:
            parts.insert(1, (self.X_val_raw, self.y_val, "val"))
        X = np.vstack([p[0] for p in parts])  # (n, n_features)
        y = np.concatenate([p[1] for p in parts])  # (n,)
        frame = pd.DataFrame(X, columns=list(self.feature_names))
        frame[LABEL_COLUMN] = pd.Series(self.classes).to_numpy()[y]
        frame[SPLIT_COLUMN] = [name for p in parts for name in [p[2]] * len(p[1])]
        return frame


# --------------------------------------------------------------------------- entry point


def _check_common(n_samples: Any, noise: Any, test_fraction: Any, seed: Any, name: str,
                  val_fraction: Any = 0.0) -> None:
    # None means "the generator's default" (for csv: every row of the file).
    if n_samples is not None and (not _is_int(n_samples) or n_samples < 1):
        allowed = "null (all rows) or an integer >= 1" if name == "csv" else "an integer >= 1"
        raise ValueError(f"n_samples={n_samples!r}: must be {allowed}")
    if noise is not None and (not _is_real(noise) or not 0 <= noise < math.inf):
        raise ValueError(f"noise={noise!r}: must be a number >= 0")
    if not _is_real(test_fraction) or not 0 < test_fraction < 1:
        raise ValueError(
            f"test_fraction={test_fraction!r}: must be a number in (0, 1)"
        )
    if not _is_real(val_fraction) or not 0 <= val_fraction < 1:
        raise ValueError(
            f"val_fraction={val_fraction!r}: must be a number in [0, 1) (a share of the "
            "training part; 0 = no validation split)"
        )
    if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**32-1]")


def make_dataset(
    name: str,
    *,
    n_samples: int | None = None,
    noise: float | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    val_fraction: float = 0.0,
    **extra: Any,
) -> Dataset:
    """Generate (or read) a data set, split it and standardise it.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    n_samples : int, optional
        Number of rows; ``None`` takes the generator's default (all rows for ``csv``).
    noise : float, optional
        Generator-specific noise level (see each generator), >= 0; ``None`` takes the
        generator's default.
    test_fraction : float
        Fraction of rows in the test split, in (0, 1). The split is stratified, so
        every class appears in both splits.
    seed : int
        Seed for the generator and the split; the same seed gives identical arrays.
    val_fraction : float
        Share of the training part held out as the validation split, in [0, 1); 0 for
        none. Stratified like the test split; the test split is the same whatever it is.
    **extra
        Generator options: ``classes`` (all), ``factor`` (circles), ``turns``
        (spirals), ``margin`` (linear), ``path``, ``label_column``,
        ``feature_columns`` (csv).

    Returns
    -------
    Dataset
        Standardised splits and the statistics used.

    Raises
    ------
    ValueError
        Unknown name or option, or a bad value; one line naming the argument, the
        value and what is allowed.
    """
    if name not in DATASETS:
        raise ValueError(f"name={name!r}: unknown dataset; choose one of {', '.join(DATASETS)}")
    generator = DATASETS[name]
    signature = inspect.signature(generator)
    options = [p for p in signature.parameters if p not in COMMON_KEYS]
    for key, value in extra.items():
        if key not in options:
            raise ValueError(
                f"{key}={value!r}: not an option of dataset {name}; "
                f"allowed: {', '.join(options) or '(none)'}"
            )
    _check_common(n_samples, noise, test_fraction, seed, name, val_fraction)

    given = {"n_samples": n_samples, "noise": noise}
    kwargs = {k: v for k, v in given.items() if v is not None}
    kwargs.update(extra, seed=int(seed))
    bound = signature.bind(**kwargs)
    bound.apply_defaults()
    params: dict[str, Any] = dict(bound.arguments)
    if isinstance(params.get("feature_columns"), Sequence) and not isinstance(
        params["feature_columns"], str
    ):
        params["feature_columns"] = [str(c) for c in params["feature_columns"]]
    params["test_fraction"] = float(test_fraction)
    params["val_fraction"] = float(val_fraction)

    raw = generator(**bound.arguments)
    k = len(raw.classes)
    n = len(raw.y)
    needed = min_samples(k, float(test_fraction))
    if n < needed:
        if name == "csv" and n_samples is None:
            what = f"path={str(params['path'])!r}: {n} rows of {raw.source} are too few"
        else:
            what = f"n_samples={n}: too few"
        raise ValueError(
            f"{what} to put each of the {k} classes in both the train and the test split "
            f"with test_fraction={test_fraction}; "
            f"need at least {needed}"
        )

    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X_train, X_test, y_train, y_test = train_test_split(
        raw.X, raw.y, test_size=float(test_fraction), random_state=int(seed), stratify=raw.y
    )
    for split, labels in (("train", y_train), ("test", y_test)):
        missing = np.setdiff1d(np.arange(k), labels)
        if missing.size:
            absent = raw.classes[int(missing[0])]
            raise ValueError(
                f"test_fraction={test_fraction}: class {absent!r} "
                f"({int(np.sum(raw.y == missing[0]))} rows) got no {split} rows; "
                "choose a test_fraction nearer 0.5 or provide more rows of that class"
            )

    X_val = y_val = None
    if val_fraction > 0:
        X_train, X_val, y_train, y_val = _validation_split(
            X_train, y_train, float(val_fraction), int(seed), raw.classes)

    # Training statistics only: nothing about the validation or test rows leaks in.
    scaler = StandardScaler().fit(X_train)
    return Dataset(
        X_train=np.ascontiguousarray(scaler.transform(X_train), dtype=np.float64),
        X_test=np.ascontiguousarray(scaler.transform(X_test), dtype=np.float64),
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        n_classes=k,
        n_features=int(raw.X.shape[1]),
        name=name,
        classes=raw.classes,
        mean=scaler.mean_.astype(np.float64),
        std=scaler.scale_.astype(np.float64),
        feature_names=raw.feature_names,
        source=raw.source,
        params=params,
        X_train_raw=np.ascontiguousarray(X_train, dtype=np.float64),
        X_test_raw=np.ascontiguousarray(X_test, dtype=np.float64),
        X_val=None if X_val is None else np.ascontiguousarray(scaler.transform(X_val),
                                                               dtype=np.float64),
        y_val=None if y_val is None else np.ascontiguousarray(y_val, dtype=np.int64),
        X_val_raw=None if X_val is None else np.ascontiguousarray(X_val, dtype=np.float64),
    )


def _validation_split(X: np.ndarray, y: np.ndarray, fraction: float, seed: int,
                      classes: tuple) -> tuple[np.ndarray, ...]:
    """Hold out ``fraction`` of the training part, stratified, every class on both sides."""
    from sklearn.model_selection import train_test_split

    k = len(classes)
    n_val = math.ceil(fraction * len(y))
    if len(y) - n_val < k or n_val < k:
        raise ValueError(
            f"val_fraction={fraction}: {n_val} of the {len(y)} training rows would be "
            f"held out, leaving {len(y) - n_val} to train on; each of the {k} classes "
            "needs a row on both sides: choose a smaller val_fraction or more n_samples"
        )
    # A seed of its own (derived from the data's), so the test split does not move.
    X_fit, X_val, y_fit, y_val = train_test_split(
        X, y, test_size=fraction, random_state=(seed + 1) % 2**32, stratify=y)
    missing = np.setdiff1d(np.arange(k), np.intersect1d(y_fit, y_val))
    if missing.size:
        raise ValueError(
            f"val_fraction={fraction}: class {classes[int(missing[0])]!r} got no training "
            "or no validation row; choose a val_fraction nearer 0.5 or more n_samples"
        )
    return X_fit, X_val, y_fit, y_val
