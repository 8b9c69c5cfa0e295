"""A scikit-learn compatible classifier around :class:`pipeline.engine.mlp.MLP` and :func:`fit`.

:class:`MLPClassifier` follows scikit-learn's estimator conventions: ``__init__`` stores
its arguments unchanged, every check happens in :meth:`MLPClassifier.fit`, learned state
ends in ``_``, and ``clone``, ``get_params``/``set_params``, ``Pipeline``,
``GridSearchCV`` and ``cross_val_score`` work as with any scikit-learn classifier::

    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from pipeline.estimators import MLPClassifier

    clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,),
                                                        learning_rate=0.01, random_state=0))
    clf.fit(X, y).score(X_test, y_test)

It passes every check of :func:`sklearn.utils.estimator_checks.check_estimator` (1.9)
with its defaults and with mini-batch SGD, early stopping, float32 and hinge settings.
The one expected failure is ``check_supervised_y_2d`` with ``warm_start=True``: that
check fits twice and expects equal predictions, and a warm start continues training
(see ``tests/test_estimators.py``).

Differences from ``sklearn.neural_network.MLPClassifier`` worth knowing:

- ``epochs`` is a fixed number of passes; there is no ``tol``-based stopping and so no
  ``ConvergenceWarning``. ``early_stopping`` watches the *validation loss* (not the
  accuracy) with ``patience`` epochs of patience, and always ends on the parameters of
  the epoch with the lowest validation loss.
- ``loss_curve_`` holds the data loss on the whole training split evaluated *after*
  each epoch (no penalty terms), not the running mean of the mini-batch losses.
- the hidden activation, the output activation, the loss, the initialiser, the
  optimiser and the learning-rate schedule are chosen by name from the engine's
  registries (``pipeline.engine.activations.ACTIVATIONS``, ``pipeline.engine.losses.LOSSES``, ...).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.engine.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
from pipeline.engine.init import INITIALIZERS
from pipeline.engine.losses import LOSSES, default_loss, get_loss
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import OPTIMIZERS, SCHEDULES, make_optimizer
from pipeline.fast import fit as train

__all__ = ["MLPClassifier"]

_DTYPES = {"float32": np.float32, "float64": np.float64}
# "auto" batches like scikit-learn's MLPClassifier: min(200, n_samples).
_AUTO_BATCH = 200
# optimizer_params may not repeat what has its own estimator parameter.
_RESERVED = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "l1": "l1",
    "schedule": "schedule",
    "schedule_params": "schedule_params",
}


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _choice(key: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; known: {', '.join(allowed)}")
    return value


def _number(key: str, value: object, *, low: float, low_open: bool, high: float | None = None,
            high_open: bool = True) -> float:
    """A finite real in the given interval, or ValueError naming the parameter."""
    ok = _is_real(value) and np.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{key}={value!r}: must be a finite number in {left}{low:g}, {hi}{right}")
    return float(value)


def _positive_int(key: str, value: object) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{key}={value!r}: must be an integer >= 1")
    return int(value)


def _mapping(key: str, value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}={value!r}: must be a dict (or None)")
    return dict(value)


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """Multi-layer perceptron classifier trained by hand-written backpropagation.

    Two classes are learned with one sigmoid output unit and binary cross-entropy,
    ``k > 2`` classes with ``k`` softmax units and cross-entropy (``output="auto"``,
    ``loss="auto"``).

    Parameters
    ----------
    hidden_layer_sizes : int or tuple of int, default=(16,)
        Width of each hidden layer; ``()`` gives no hidden layer (logistic regression).
    activation : str or sequence of str, default="relu"
        Hidden activation, one name for all hidden layers or one per hidden layer
        (a key of ``pipeline.engine.activations.ACTIVATIONS`` other than softmax).
    output : str, default="auto"
        Output activation; "auto" is ``sigmoid`` (one unit) for two classes and
        ``softmax`` (one unit per class) for more, or the output the chosen ``loss``
        needs (``identity`` for ``hinge``). ``softmax`` always has one unit per class,
        every other output has one unit for two classes.
    loss : str, default="auto"
        A key of ``pipeline.engine.losses.LOSSES``; "auto" is ``bce`` for a sigmoid output,
        ``cross_entropy`` for softmax, ``mse`` otherwise.
    init : str, default="xavier_uniform"
        Weight initialiser (a key of ``pipeline.engine.init.INITIALIZERS``); biases start at 0.
    activation_params : dict or None, default=None
        Parameters of parametrised activations: ``{"slope": 0.01}`` for ``leaky_relu``,
        ``{"alpha": 1.0}`` for ``elu``.
    optimizer : str, default="adam"
        A key of ``pipeline.engine.optim.OPTIMIZERS``.
    learning_rate : float, default=0.001
        Base learning rate (> 0).
    optimizer_params : dict or None, default=None
        Further optimiser settings (``momentum``, ``beta1``, ``beta2``, ``eps``, ``rho``).
    weight_decay : float, default=0.0
        L2 penalty on the weights (decoupled for ``adamw``); biases are not penalised.
    l1 : float, default=0.0
        L1 penalty on the weights.
    schedule : str, default="constant"
        Learning-rate schedule, a key of ``pipeline.engine.optim.SCHEDULES``.
    schedule_params : dict or None, default=None
        The schedule's parameters; ``cosine``'s ``t_max`` defaults to ``epochs``.
    epochs : int, default=200
        Passes over the training data (an upper bound with ``early_stopping``).
    batch_size : int, "auto" or None, default="auto"
        Mini-batch size: "auto" is ``min(200, n_samples)`` as in scikit-learn, None is
        full batch, 1 is online learning. An integer above the number of training
        samples is clipped to it with a warning. Batches are reshuffled every epoch.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data (stratified) and stop once
        its loss has not improved for ``patience`` epochs; the parameters of the best
        epoch are restored.
    validation_fraction : float, default=0.1
        Share of the training data held out with ``early_stopping``, in (0, 1).
    patience : int, default=10
        Epochs without a lower validation loss before stopping.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial weights, the batch shuffling and the validation split.
    dtype : {"float64", "float32"}, default="float64"
        Precision of the parameters and the computation.
    warm_start : bool, default=False
        Continue from the previous fit's parameters (same classes and features) instead
        of starting again; ``loss_curve_`` and ``n_iter_`` then accumulate. The
        optimiser state starts afresh on every call to ``fit``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels seen in ``fit`` (any sortable labels, strings included), in the
        order of the ``predict_proba`` columns.
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Feature names, when ``X`` had string column names.
    model_ : pipeline.engine.mlp.MLP
        The trained network; it predicts class indices into ``classes_``.
    loss_curve_ : list of float
        Training loss after each epoch.
    loss_ : float
        The last entry of ``loss_curve_``.
    best_loss_ : float or None
        The lowest training loss; None with ``early_stopping`` (as in scikit-learn).
    validation_scores_ : list of float or None
        Validation accuracy after each epoch with ``early_stopping``, else None.
    validation_loss_curve_ : list of float or None
        Validation loss after each epoch with ``early_stopping``, else None.
    best_validation_score_ : float or None
        Validation accuracy of the restored (lowest validation loss) epoch.
    n_iter_ : int
        Epochs run.
    n_outputs_ : int
        Output units (1 for two classes unless the output is softmax).
    out_activation_ : str
        Name of the output activation.
    loss_function_ : str
        Name of the loss trained on.
    """

    def __init__(
        self,
        hidden_layer_sizes=(16,),
        activation="relu",
        output="auto",
        loss="auto",
        init="xavier_uniform",
        activation_params=None,
        optimizer="adam",
        learning_rate=0.001,
        optimizer_params=None,
        weight_decay=0.0,
        l1=0.0,
        schedule="constant",
        schedule_params=None,
        epochs=200,
        batch_size="auto",
        early_stopping=False,
        validation_fraction=0.1,
        patience=10,
        random_state=None,
        dtype="float64",
        warm_start=False,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.output = output
        self.loss = loss
        self.init = init
        self.activation_params = activation_params
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.optimizer_params = optimizer_params
        self.weight_decay = weight_decay
        self.l1 = l1
        self.schedule = schedule
        self.schedule_params = schedule_params
        self.epochs = epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.dtype = dtype
        self.warm_start = warm_start

    # -------------------------------------------------------------------- validation

    def _hidden_sizes(self) -> list[int]:
        sizes = self.hidden_layer_sizes
        if _is_int(sizes):
            sizes = (sizes,)
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (Sequence, np.ndarray)):
            raise ValueError(
                f"hidden_layer_sizes={self.hidden_layer_sizes!r}: must be an int or a tuple "
                "of ints >= 1, like (16,) or (32, 16)"
            )
        for size in sizes:
            if not _is_int(size) or size < 1:
                raise ValueError(
                    f"hidden_layer_sizes={self.hidden_layer_sizes!r}: every width must be an "
                    "integer >= 1"
                )
        return [int(s) for s in sizes]

    def _hidden_activations(self, n_hidden: int) -> str | list[str]:
        act = self.activation
        if isinstance(act, str):
            return _choice("activation", act, HIDDEN_ACTIVATIONS)
        if not isinstance(act, Sequence) or len(act) != n_hidden:
            raise ValueError(
                f"activation={act!r}: give one name, or a list of one name per hidden layer "
                f"({n_hidden} for hidden_layer_sizes={self.hidden_layer_sizes!r})"
            )
        return [_choice("activation", a, HIDDEN_ACTIVATIONS) for a in act]

    def _dtype(self) -> type:
        if isinstance(self.dtype, str) and self.dtype in _DTYPES:
            return _DTYPES[self.dtype]
        if self.dtype in (np.float32, np.float64):
            return self.dtype
        raise ValueError(f"dtype={self.dtype!r} is not allowed; known: float64, float32")

    def _head(self, n_classes: int) -> tuple[str, str, int]:
        """Output activation, loss name and number of output units for ``n_classes``."""
        loss = self.loss
        if loss != "auto":
            _choice("loss", loss, ("auto", *LOSSES))
        output = self.output
        if output == "auto":
            output = "sigmoid" if n_classes == 2 else "softmax"
            fits = None if loss == "auto" else get_loss(loss).outputs
            if fits is not None and output not in fits:
                output = fits[0]
        else:
            _choice("output", output, ("auto", *OUTPUT_ACTIVATIONS))
        n_outputs = 1 if n_classes == 2 and output != "softmax" else n_classes
        if loss == "auto":
            loss = default_loss(output)
        try:
            get_loss(loss).check_output(output, n_outputs)
        except ValueError as err:
            raise ValueError(
                f"loss={self.loss!r} with output={self.output!r} for {n_classes} classes: {err}"
            ) from None
        return output, loss, n_outputs

    def _batch(self, n: int) -> int:
        batch = self.batch_size
        if batch is None:
            return n
        if isinstance(batch, str) and batch == "auto":
            return min(_AUTO_BATCH, n)
        if not _is_int(batch) or batch < 1:
            raise ValueError(
                f"batch_size={batch!r}: must be 'auto', None (full batch) or an integer >= 1"
            )
        if batch > n:
            warnings.warn(
                f"batch_size={batch} is larger than the {n} training samples; clipping it to {n}",
                UserWarning,
                stacklevel=3,
            )
            return n
        return int(batch)

    def _make_optimizer(self, epochs: int):
        _choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        _choice("schedule", self.schedule, tuple(SCHEDULES))
        lr = _number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        weight_decay = _number("weight_decay", self.weight_decay, low=0.0, low_open=False)
        l1 = _number("l1", self.l1, low=0.0, low_open=False)
        hyper = _mapping("optimizer_params", self.optimizer_params)
        for key in hyper:
            if key in _RESERVED:
                raise ValueError(
                    f"optimizer_params[{key!r}]: set it with the estimator parameter "
                    f"{_RESERVED[key]!r} instead"
                )
        schedule_params = _mapping("schedule_params", self.schedule_params)
        if self.schedule == "cosine":
            # The cosine's natural length is the run.
            schedule_params.setdefault("t_max", epochs)
        try:
            return make_optimizer(
                self.optimizer, lr=lr, weight_decay=weight_decay, l1=l1,
                schedule=self.schedule, schedule_params=schedule_params, **hyper,
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"optimizer_params/schedule_params: {err}") from None

    # --------------------------------------------------------------------------- fit

    def fit(self, X, y):
        """Train the network on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Class labels (any sortable values, e.g. ints or strings), at least 2 classes.

        Returns
        -------
        self : MLPClassifier

        Raises
        ------
        ValueError
            For a bad parameter (named, with what is allowed) or bad data.
        pipeline.engine.loop.DivergenceError
            When training diverges (loss or parameters non-finite): lower learning_rate.
        """
        # Every parameter is checked before the data, so a typo fails fast.
        hidden = self._hidden_sizes()
        activation = self._hidden_activations(len(hidden))
        _choice("init", self.init, tuple(INITIALIZERS))
        activation_params = _mapping("activation_params", self.activation_params)
        dtype = self._dtype()
        epochs = _positive_int("epochs", self.epochs)
        optimizer = self._make_optimizer(epochs)
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise ValueError(f"early_stopping={self.early_stopping!r}: must be True or False")
        if self.early_stopping:
            fraction = _number(
                "validation_fraction", self.validation_fraction, low=0.0, low_open=True,
                high=1.0,
            )
            patience = _positive_int("patience", self.patience)
        rng = check_random_state(self.random_state)

        warm = bool(self.warm_start) and hasattr(self, "model_")
        X, y = validate_data(self, X, y, reset=not warm, dtype=dtype)
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if classes.shape[0] < 2:
            raise ValueError(
                f"MLPClassifier needs samples of at least 2 classes in y; got 1 class "
                f"({classes[0].item()!r})"
            )
        if warm and not np.array_equal(classes, self.classes_):
            raise ValueError(
                f"warm_start=True needs y with the classes of the previous fit "
                f"{self.classes_.tolist()}; y has {classes.tolist()}"
            )
        output, loss, n_outputs = self._head(classes.shape[0])
        init_seed, shuffle_seed, split_seed = (
            int(s) for s in rng.randint(np.iinfo(np.int32).max, size=3)
        )

        if warm:
            model = self.model_
            expected = [X.shape[1], *hidden, n_outputs]
            if model.sizes != expected or model.output_activation.name != output:
                raise ValueError(
                    f"warm_start=True: the previous network has sizes {model.sizes} and output "
                    f"{model.output_activation.name!r}; the parameters now ask for {expected} "
                    f"and {output!r}. Set warm_start=False to start again."
                )
            model.loss = loss
        else:
            model = MLP(
                [X.shape[1], *hidden, n_outputs], activation=activation, output=output,
                init=self.init, seed=init_seed, dtype=dtype,
                activation_params=activation_params, loss=loss,
            )

        X_val = y_val = None
        if self.early_stopping:
            X, X_val, y_idx, y_val = self._validation_split(
                X, y_idx, classes, fraction, split_seed
            )
        best = {"loss": np.inf, "params": None}

        def keep_best(epoch: int, metrics: dict[str, float]) -> None:
            # The trainer restores the best parameters only when patience ran out; the
            # estimator always ends on the best validation epoch (as scikit-learn does).
            if metrics["val/loss"] < best["loss"]:
                best["loss"] = metrics["val/loss"]
                best["params"] = model.params.copy()

        history = train(
            model, X, y_idx, loss=loss, optimizer=optimizer, epochs=epochs,
            batch_size=self._batch(X.shape[0]), seed=shuffle_seed, X_val=X_val,
            y_val=y_val, callbacks=[keep_best] if self.early_stopping else (),
            patience=patience if self.early_stopping else None, restore_best=False,
            diagnostics=False,
        )

        curve = [float(v) for v in history.metrics["train/loss"]]
        self.classes_ = classes
        self.model_ = model
        self.loss_curve_ = ([*self.loss_curve_, *curve] if warm else curve)
        self.n_iter_ = (self.n_iter_ if warm else 0) + len(history.epochs)
        self.n_outputs_ = model.n_outputs
        self.out_activation_ = output
        self.loss_function_ = loss
        if self.early_stopping:
            model.set_params(best["params"])
            scores = [float(v) for v in history.metrics["val/accuracy"]]
            val_losses = [float(v) for v in history.metrics["val/loss"]]
            self.validation_scores_ = scores
            self.validation_loss_curve_ = val_losses
            self.best_validation_score_ = scores[int(np.argmin(val_losses))]
            self.best_loss_ = None
            self.loss_ = model.compute_loss(X, y_idx, loss)
        else:
            self.validation_scores_ = None
            self.validation_loss_curve_ = None
            self.best_validation_score_ = None
            self.best_loss_ = float(min(self.loss_curve_))
            self.loss_ = self.loss_curve_[-1]
        return self

    @staticmethod
    def _validation_split(X, y_idx, classes, fraction: float, seed: int):
        """Stratified hold-out of ``fraction`` of the rows, at least one per class."""
        n, k = X.shape[0], classes.shape[0]
        counts = np.bincount(y_idx, minlength=k)
        # A stratified split needs a validation row of every class and a training row of
        # every class; rounding a small fraction of a small n down would give neither.
        n_val = max(int(np.ceil(fraction * n)), k)
        if counts.min() < 2 or n - n_val < k:
            rare = classes[int(np.argmin(counts))].item()
            raise ValueError(
                f"early_stopping=True needs a stratified validation split with every class on "
                f"both sides: {n} samples, {k} classes, class {rare!r} has {counts.min()} "
                f"sample(s); give more data or set early_stopping=False"
            )
        return train_test_split(X, y_idx, test_size=n_val, random_state=seed, stratify=y_idx)

    # ----------------------------------------------------------------------- predict

    def predict_proba(self, X):
        """Class probabilities, shape ``(n_samples, n_classes)``, columns in ``classes_`` order.

        Sigmoid and softmax outputs are probabilities; other outputs are mapped to scores
        whose largest entry is the predicted class (see
        ``pipeline.engine.losses.scores_to_proba``).
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=self.model_.dtype.type)
        return self.model_.predict_proba(X)

    def predict(self, X):
        """Predicted class labels (values from ``classes_``), shape ``(n_samples,)``."""
        proba = self.predict_proba(X)  # checks fitted first
        return self.classes_[np.argmax(proba, axis=1)]

    # ----------------------------------------------------------------------- pickling

    def __getstate__(self):
        # A network is pickled as its config and flat parameters: activations built with
        # parameters (leaky_relu slope, elu alpha) hold closures pickle cannot store.
        state = dict(super().__getstate__())
        model = state.pop("model_", None)
        if model is not None:
            state["_model_state"] = (model.get_config(), model.params.copy())
        return state

    def __setstate__(self, state):
        state = dict(state)
        saved = state.pop("_model_state", None)
        if saved is not None:
            config, params = saved
            model = MLP(**config)
            model.set_params(params)
            state["model_"] = model
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Dense float input only; NaN is refused (validate_data raises ValueError).
        tags.input_tags.sparse = False
        tags.input_tags.allow_nan = False
        return tags
