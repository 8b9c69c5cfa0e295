"""pipeline.estimators.MLPClassifier against scikit-learn's estimator contract.

scikit-learn's own ``check_estimator`` suite runs on several configurations (binary and
multi-class heads, mini-batch SGD, early stopping, float32, hinge, warm start); the rest
checks the behaviour scikit-learn cannot know about: which head is built, parameter
errors, early stopping's restore, warm start, pickling, and use inside ``Pipeline``,
``GridSearchCV`` and ``cross_val_score``.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_iris, make_moons
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import pipeline
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import Optimizer
from pipeline.estimators import MLPClassifier

# ----------------------------------------------------------------- scikit-learn's checks

DEFAULT = MLPClassifier(random_state=0)
VARIANTS = [
    # Two hidden layers with different (parametrised) activations, softmax on two
    # classes too, mini-batch SGD: the mini-batch path and activation_params.
    MLPClassifier(
        hidden_layer_sizes=(8, 4), activation=["leaky_relu", "elu"],
        activation_params={"slope": 0.1}, output="softmax", optimizer="sgd",
        learning_rate=0.1, epochs=50, batch_size=8, random_state=0,
    ),
    MLPClassifier(early_stopping=True, learning_rate=0.01, epochs=100, random_state=0),
    MLPClassifier(
        dtype="float32", loss="hinge", activation="tanh", learning_rate=0.01,
        schedule="cosine", random_state=0,
    ),
    MLPClassifier(warm_start=True, learning_rate=0.01, batch_size=None, random_state=0),
]


def _expected_failures(estimator: MLPClassifier) -> dict[str, str]:
    """The checks a configuration is known to fail, with the reason."""
    if estimator.warm_start:
        # check_supervised_y_2d fits twice on the same estimator (1-D y, then a column y)
        # and expects equal predictions; warm_start=True continues training on the
        # second fit, which is its documented purpose. scikit-learn's own checks switch
        # warm_start off in the other fit-twice checks, but not in this one.
        return {"check_supervised_y_2d": "warm_start continues training on a second fit"}
    return {}


@parametrize_with_checks([DEFAULT], expected_failed_checks=_expected_failures, xfail_strict=True)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.slow
@parametrize_with_checks(VARIANTS, expected_failed_checks=_expected_failures, xfail_strict=True)
def test_sklearn_compatible_variants(estimator, check):
    check(estimator)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def moons():
    X, y = make_moons(n_samples=300, noise=0.2, random_state=0)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def noisy_moons():
    # Noisy enough that a wide network overfits 140 points within a few dozen epochs.
    return make_moons(n_samples=200, noise=0.4, random_state=0)


@pytest.fixture(scope="module")
def iris():
    return load_iris(return_X_y=True)


def _fast(**params) -> MLPClassifier:
    return MLPClassifier(**{"learning_rate": 0.01, "epochs": 100, "random_state": 0, **params})


# ---------------------------------------------------------------------- conventions


def test_init_stores_parameters_unchanged():
    sizes, opt_params = [8, 4], {"beta1": 0.8}
    est = MLPClassifier(hidden_layer_sizes=sizes, optimizer_params=opt_params, epochs="junk")
    # No validation, no copying, no conversion in __init__.
    assert est.hidden_layer_sizes is sizes
    assert est.optimizer_params is opt_params
    assert est.epochs == "junk"
    params = est.get_params()
    assert params["hidden_layer_sizes"] is sizes and params["batch_size"] == "auto"


def test_clone_and_set_params(moons):
    X_train, _, y_train, _ = moons
    est = _fast(hidden_layer_sizes=(4,)).fit(X_train, y_train)
    copy = clone(est)
    assert copy.get_params() == est.get_params()
    assert not hasattr(copy, "model_") and not hasattr(copy, "classes_")
    assert copy.set_params(hidden_layer_sizes=(6, 3)) is copy
    assert copy.fit(X_train, y_train).model_.sizes == [2, 6, 3, 1]


def test_unfitted_estimator_raises_not_fitted():
    with pytest.raises(NotFittedError):
        MLPClassifier().predict(np.zeros((2, 2)))


def test_pipeline_package_exports_estimator():
    assert pipeline.MLPClassifier is MLPClassifier


# ------------------------------------------------------------------------------ heads


def test_binary_head_is_one_sigmoid_unit_with_bce(moons):
    X_train, X_test, y_train, y_test = moons
    est = _fast().fit(X_train, y_train)
    assert est.model_.sizes == [2, 16, 1]
    assert (est.out_activation_, est.loss_function_, est.n_outputs_) == ("sigmoid", "bce", 1)
    proba = est.predict_proba(X_test)
    assert proba.shape == (len(X_test), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(est.predict(X_test), est.classes_[proba.argmax(axis=1)])


def test_multiclass_head_is_softmax_with_cross_entropy(iris):
    X, y = iris
    est = _fast(epochs=20).fit(X, y)
    assert est.model_.sizes == [4, 16, 3]
    assert (est.out_activation_, est.loss_function_, est.n_outputs_) == (
        "softmax", "cross_entropy", 3,
    )


@pytest.mark.parametrize(
    ("params", "n_classes", "head"),
    [
        ({"loss": "hinge"}, 2, ("identity", "hinge", 1)),
        ({"loss": "hinge"}, 3, ("identity", "hinge", 3)),
        ({"loss": "bce"}, 3, ("sigmoid", "bce", 3)),
        ({"loss": "cross_entropy"}, 2, ("softmax", "cross_entropy", 2)),
        ({"output": "softmax"}, 2, ("softmax", "cross_entropy", 2)),
        ({"output": "tanh"}, 2, ("tanh", "mse", 1)),
        ({"output": "identity", "loss": "half_sse"}, 3, ("identity", "half_sse", 3)),
    ],
)
def test_output_and_loss_choice(params, n_classes, head):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2))
    y = np.arange(30) % n_classes
    est = _fast(epochs=2, **params).fit(X, y)
    assert (est.out_activation_, est.loss_function_, est.n_outputs_) == head
    assert est.predict_proba(X).shape == (30, n_classes)


def test_string_labels_and_proba_columns_follow_classes(iris):
    X, y = iris
    names = np.array(["virginica", "setosa", "versicolor"])[y]  # not in sorted order
    est = make_pipeline(StandardScaler(), _fast(epochs=200)).fit(X, names)
    clf = est[-1]
    np.testing.assert_array_equal(clf.classes_, ["setosa", "versicolor", "virginica"])
    assert est.predict(X).dtype == clf.classes_.dtype
    proba = est.predict_proba(X)
    # Column j is the probability of classes_[j]: averaged over the samples of a class,
    # its own column is the largest.
    for j, label in enumerate(clf.classes_):
        assert proba[names == label].mean(axis=0).argmax() == j
    assert est.score(X, names) > 0.9


# --------------------------------------------------------------- sklearn integration


def test_pipeline_with_scaler_on_moons(moons):
    X_train, X_test, y_train, y_test = moons
    pipe = make_pipeline(StandardScaler(), _fast(epochs=200)).fit(X_train, y_train)
    assert pipe.score(X_test, y_test) >= 0.85


def test_cross_val_score_on_iris(iris):
    X, y = iris
    scores = cross_val_score(make_pipeline(StandardScaler(), _fast(epochs=150)), X, y, cv=3)
    assert scores.shape == (3,)
    assert scores.mean() >= 0.85


def test_grid_search_on_iris(iris):
    X, y = iris
    pipe = make_pipeline(StandardScaler(), _fast(epochs=100))
    grid = {
        "mlpclassifier__learning_rate": [1e-5, 1e-2],
        "mlpclassifier__hidden_layer_sizes": [(4,), (8,)],
    }
    search = GridSearchCV(pipe, grid, cv=3).fit(X, y)
    # 100 epochs at lr 1e-5 barely move the weights; lr 1e-2 learns iris.
    assert search.best_params_["mlpclassifier__learning_rate"] == 1e-2
    assert search.best_score_ >= 0.85
    assert search.score(X, y) >= 0.9


# --------------------------------------------------------------------- fitted state


def test_fitted_attributes(moons):
    X_train, _, y_train, _ = moons
    est = _fast(epochs=30).fit(X_train, y_train)
    assert isinstance(est.model_, MLP)
    assert est.n_features_in_ == 2
    assert est.n_iter_ == 30 and len(est.loss_curve_) == 30
    assert est.loss_ == est.loss_curve_[-1]
    assert est.best_loss_ == min(est.loss_curve_)
    assert est.validation_scores_ is None and est.best_validation_score_ is None
    # Adam at lr 0.01 on moons: the training loss goes down.
    assert est.loss_curve_[-1] < 0.7 * est.loss_curve_[0]


def test_random_state_makes_fits_reproducible(moons):
    X_train, _, y_train, _ = moons
    a = _fast(epochs=5, batch_size=16).fit(X_train, y_train)
    b = _fast(epochs=5, batch_size=16).fit(X_train, y_train)
    c = _fast(epochs=5, batch_size=16, random_state=1).fit(X_train, y_train)
    np.testing.assert_array_equal(a.model_.params, b.model_.params)
    assert not np.array_equal(a.model_.params, c.model_.params)


def test_float32_training(moons):
    X_train, X_test, y_train, _ = moons
    est = _fast(epochs=5, dtype="float32").fit(X_train, y_train)
    assert est.model_.params.dtype == np.float32
    ref = _fast(epochs=5).fit(X_train, y_train)
    np.testing.assert_allclose(
        est.predict_proba(X_test), ref.predict_proba(X_test), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("batch_size", "steps_per_epoch"), [("auto", 2), (None, 1), (1, 210), (100, 3)]
)
def test_batch_size(moons, monkeypatch, batch_size, steps_per_epoch):
    X_train, _, y_train, _ = moons  # 210 rows: "auto" is min(200, 210), two batches
    steps = []
    original = Optimizer.step

    def counting_step(self, params, grad):
        steps.append(len(grad))
        return original(self, params, grad)

    monkeypatch.setattr(Optimizer, "step", counting_step)
    est = _fast(epochs=2, batch_size=batch_size).fit(X_train, y_train)
    assert len(steps) == 2 * steps_per_epoch
    assert est.n_iter_ == 2


def test_batch_size_larger_than_data_is_clipped_with_warning(moons):
    X_train, _, y_train, _ = moons
    with pytest.warns(UserWarning, match="batch_size=1000 is larger than the 210"):
        _fast(epochs=2, batch_size=1000).fit(X_train, y_train)


# --------------------------------------------------------------------- early stopping


def test_early_stopping_restores_the_best_validation_epoch(noisy_moons):
    X_train, y_train = noisy_moons
    # A wide net with a large learning rate overfits, so the validation loss turns up
    # and patience runs out well before 100 epochs.
    est = MLPClassifier(
        hidden_layer_sizes=(64, 64), learning_rate=0.05, epochs=100, early_stopping=True,
        validation_fraction=0.3, patience=5, random_state=0,
    ).fit(X_train, y_train)
    assert est.best_loss_ is None
    assert len(est.validation_scores_) == len(est.validation_loss_curve_) == est.n_iter_
    best = int(np.argmin(est.validation_loss_curve_))
    assert est.n_iter_ < 100, "patience did not stop the run"
    assert est.n_iter_ == best + 1 + 5
    assert est.best_validation_score_ == est.validation_scores_[best]
    # The same run cut at the best epoch (same seeds, so same split and trajectory)
    # ends on exactly the parameters early stopping restored.
    cut = clone(est).set_params(epochs=best + 1, patience=1000).fit(X_train, y_train)
    np.testing.assert_array_equal(cut.model_.params, est.model_.params)


def test_early_stopping_restores_best_even_without_running_out_of_patience(noisy_moons):
    X_train, y_train = noisy_moons
    est = MLPClassifier(
        hidden_layer_sizes=(64, 64), learning_rate=0.05, epochs=30, early_stopping=True,
        validation_fraction=0.3, patience=1000, random_state=0,
    ).fit(X_train, y_train)
    best = int(np.argmin(est.validation_loss_curve_))
    assert est.n_iter_ == 30 and best < 29, "the validation loss should have turned up"
    cut = clone(est).set_params(epochs=best + 1).fit(X_train, y_train)
    np.testing.assert_array_equal(cut.model_.params, est.model_.params)


def test_early_stopping_on_too_little_data_is_refused():
    X = np.arange(10.0).reshape(5, 2)
    y = np.array([0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"early_stopping=True .* class 1 has 1 sample"):
        MLPClassifier(early_stopping=True).fit(X, y)


# ------------------------------------------------------------------------ warm start


def test_warm_start_continues_training(moons):
    X_train, _, y_train, _ = moons
    est = _fast(epochs=10, warm_start=True).fit(X_train, y_train)
    first = est.model_.params.copy()
    first_curve = list(est.loss_curve_)
    model = est.model_
    est.fit(X_train, y_train)
    assert est.model_ is model  # the same network, trained further
    assert est.n_iter_ == 20 and est.loss_curve_[:10] == first_curve
    assert not np.array_equal(first, est.model_.params)
    assert est.loss_curve_[-1] < first_curve[-1]
    # Different classes cannot continue.
    with pytest.raises(ValueError, match="warm_start=True needs y with the classes"):
        est.fit(X_train, y_train + 1)
    # Without warm_start the same call starts again from the initial weights.
    cold = clone(est).set_params(warm_start=False)
    np.testing.assert_array_equal(
        cold.fit(X_train, y_train).model_.params, clone(cold).fit(X_train, y_train).model_.params
    )


def test_warm_start_refuses_a_changed_architecture(moons):
    X_train, _, y_train, _ = moons
    est = _fast(epochs=2, warm_start=True).fit(X_train, y_train)
    with pytest.raises(ValueError, match=r"previous network has sizes \[2, 16, 1\]"):
        est.set_params(hidden_layer_sizes=(3,)).fit(X_train, y_train)


# -------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu"])
def test_pickle_round_trip(moons, activation):
    X_train, X_test, y_train, _ = moons
    est = _fast(epochs=5, activation=activation, activation_params={"slope": 0.2}).fit(
        X_train, y_train
    )
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.predict_proba(X_test), est.predict_proba(X_test))
    assert back.model_.get_config() == est.model_.get_config()
    assert back.loss_curve_ == est.loss_curve_


# ---------------------------------------------------------------------- bad arguments

BAD_PARAMS = [
    ("hidden_layer_sizes", (16, 0), "every width must be an integer >= 1"),
    ("hidden_layer_sizes", "16", "must be an int or a tuple"),
    ("activation", "swish", "activation='swish' is not allowed; known: identity"),
    ("activation", "softmax", "activation='softmax' is not allowed"),
    ("activation", ["relu", "tanh"], "one name per hidden layer"),
    ("output", "relu6", "output='relu6' is not allowed; known: auto, identity"),
    ("loss", "focal", "loss='focal' is not allowed; known: auto, mse"),
    ("init", "orthogonal", "init='orthogonal' is not allowed; known: normal"),
    ("optimizer", "lbfgs", "optimizer='lbfgs' is not allowed; known: sgd"),
    ("learning_rate", 0.0, r"learning_rate=0.0: must be a finite number in \(0, inf\)"),
    ("learning_rate", float("nan"), "learning_rate=nan"),
    ("weight_decay", -1.0, r"weight_decay=-1.0: must be a finite number in \[0, inf\)"),
    ("l1", "a", "l1='a'"),
    ("schedule", "warmup", "schedule='warmup' is not allowed; known: constant"),
    ("schedule_params", {"gamma": 2.0}, "gamma"),
    ("optimizer_params", {"lr": 0.1}, "set it with the estimator parameter 'learning_rate'"),
    ("optimizer_params", {"betaa": 0.1}, "betaa"),
    ("optimizer_params", [1], "optimizer_params=\\[1\\]: must be a dict"),
    ("epochs", 0, "epochs=0: must be an integer >= 1"),
    ("epochs", 2.5, "epochs=2.5"),
    ("batch_size", 0, "batch_size=0: must be 'auto', None"),
    ("batch_size", "full", "batch_size='full'"),
    ("dtype", "float16", "dtype='float16' is not allowed; known: float64, float32"),
    ("early_stopping", "yes", "early_stopping='yes': must be True or False"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_PARAMS)
def test_bad_parameters_raise_value_error_naming_them(key, value, message):
    X = np.random.default_rng(0).normal(size=(20, 2))
    y = np.arange(20) % 2
    params = {key: value}
    if key == "schedule_params":
        params["schedule"] = "step"
    est = MLPClassifier(**params)  # accepted unchecked
    with pytest.raises(ValueError, match=message):
        est.fit(X, y)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("validation_fraction", 1.0, "validation_fraction=1.0"), ("patience", 0, "patience=0")],
)
def test_early_stopping_parameters_checked_only_when_used(key, value, message):
    X = np.random.default_rng(0).normal(size=(20, 2))
    y = np.arange(20) % 2
    MLPClassifier(epochs=1, **{key: value}).fit(X, y)
    with pytest.raises(ValueError, match=message):
        MLPClassifier(epochs=1, early_stopping=True, **{key: value}).fit(X, y)


def test_loss_that_does_not_fit_the_output_is_refused():
    X = np.random.default_rng(0).normal(size=(20, 2))
    y = np.arange(20) % 3
    with pytest.raises(ValueError, match="loss 'bce' does not fit a 'softmax' output"):
        MLPClassifier(output="softmax", loss="bce").fit(X, y)
    with pytest.raises(ValueError, match="loss 'cross_entropy' does not fit a 'sigmoid'"):
        MLPClassifier(output="sigmoid", loss="cross_entropy").fit(X, y)


def test_one_class_and_continuous_targets_are_refused():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="at least 2 classes in y; got 1 class"):
        MLPClassifier().fit(X, ["a"] * 4)
    with pytest.raises(ValueError, match="Unknown label type"):
        MLPClassifier().fit(X, [0.1, 0.2, 0.3, 0.4])


def test_nan_and_wrong_width_are_refused(moons):
    X_train, X_test, y_train, _ = moons
    bad = X_train.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MLPClassifier().fit(bad, y_train)
    est = _fast(epochs=1).fit(X_train, y_train)
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting 2"):
        est.predict(np.zeros((2, 3)))


def test_divergence_is_reported():
    from pipeline.engine.loop import DivergenceError

    X, y = make_moons(n_samples=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(DivergenceError, match="at epoch"):
            MLPClassifier(
                optimizer="sgd", learning_rate=1e30, output="identity", loss="mse",
                random_state=0,
            ).fit(X * 1e3, y)
