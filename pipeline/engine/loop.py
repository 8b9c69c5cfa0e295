"""The training loop: batches, optimiser steps, evaluation, diagnostics, callbacks.

:func:`fit` runs epochs over a :class:`Stepper`, the object that makes a run's training
steps. The engine's own, :class:`PlainStepper`, is the textbook loop (forward pass,
output delta, backward pass, optimiser step per batch, in :mod:`pipeline.engine.mlp`'s
words). :mod:`pipeline.fast` has a compiled one and one for K replicas trained side by
side; its ``pipeline.fast.fit`` (exported as ``pipeline.fit``) is this function with the
compiled stepper, and the tests hold both to the same numbers.

What ``train/loss`` and ``train/accuracy`` mean: the mean over the epoch's samples of
the loss (and accuracy) the training steps saw, each sample scored by the forward pass
of its own step, before that step's update: a running mean over the batches, as
scikit-learn (``loss_curve_``) and Keras report it. With full batches that is the loss of
the parameters the previous epoch ended with; no second forward pass over the training
data is made. The dead and saturated unit fractions come from the same forward passes.

:func:`fit` knows nothing of Hydra, MLflow, files or terminals. After every evaluated
epoch it hands a flat ``{name: float}`` dict to each callback; progress bars, trackers
and plot recorders are callbacks, so a run without them (a test, a notebook) follows the
same code path as a tracked run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.engine.activations import Activation
from pipeline.engine.losses import LOSSES, Loss, get_loss, scores_to_proba
from pipeline.engine.mlp import MLP, forward_pass
from pipeline.engine.optim import Optimizer, make_optimizer

Array = np.ndarray
Callback = Callable[[int, dict[str, float]], object]

# A unit counts as saturated where its local derivative is below this share of the
# function's largest derivative: |a| > 0.975 for tanh, a < 0.013 or a > 0.987 for sigmoid.
SATURATION_THRESHOLD = 0.05


class StopTraining(Exception):
    """Raised by a callback to end training cleanly after the current epoch."""


class DivergenceError(RuntimeError):
    """The loss or the parameters stopped being finite.

    Attributes
    ----------
    epoch : int
        The epoch in which it was detected (counting from 1).
    reason : str
        What became non-finite, e.g. ``"loss became inf"``.
    """

    def __init__(self, epoch: int, reason: str) -> None:
        self.epoch = epoch
        self.reason = reason
        super().__init__(f"{reason} at epoch {epoch}; try a smaller optimizer.lr")


@dataclass
class History:
    """Per-epoch metrics of one training run.

    ``pandas.DataFrame(history.metrics, index=history.epochs)`` makes a table of it.

    Attributes
    ----------
    epochs : list of int
        The evaluated epochs, counting from 1.
    metrics : dict of str to list of float
        One list per metric name, aligned with ``epochs``.
    stopped_early : bool
        Whether early stopping (or a callback) ended training before ``epochs``.
    best_epoch : int or None
        Epoch of the lowest validation loss, when a validation set was given.
    eval_seconds, callback_seconds : float
        Wall time spent evaluating and in callbacks, so that a run's timing breakdown can
        tell them from the training steps.
    """

    epochs: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    stopped_early: bool = False
    best_epoch: int | None = None
    eval_seconds: float = 0.0
    callback_seconds: float = 0.0

    def append(self, epoch: int, values: dict[str, float]) -> None:
        self.epochs.append(epoch)
        for key, value in values.items():
            self.metrics.setdefault(key, []).append(value)

    def last(self) -> dict[str, float]:
        """The most recent value of every metric."""
        return {key: values[-1] for key, values in self.metrics.items() if values}

    def at(self, epoch: int) -> dict[str, float]:
        """Every metric as evaluated after ``epoch`` (KeyError if it was not evaluated)."""
        try:
            i = self.epochs.index(epoch)
        except ValueError:
            raise KeyError(f"epoch {epoch} was not evaluated") from None
        return {key: values[i] for key, values in self.metrics.items() if len(values) > i}

    def restored_epoch(self, patience: int | None) -> int | None:
        """The epoch whose parameters a run with early stopping (``patience``) ended on,
        when it is not the last one evaluated: fit() keeps the best epoch's parameters."""
        if patience is None or self.best_epoch is None or not self.epochs:
            return None
        return self.best_epoch if self.best_epoch != self.epochs[-1] else None

    def __len__(self) -> int:
        return len(self.epochs)


def true_labels(y: Array, T: Array) -> Array:
    """Class labels from labels or a target matrix (argmax, or > 0.5 for one column)."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y.astype(np.int64)
    return (T[:, 0] > 0.5).astype(np.int64) if T.shape[1] == 1 else np.argmax(T, axis=1)


def layer_norms(flat: Array, layer_of: Array, n_layers: int) -> Array:
    """Euclidean norm per layer (weights and biases together) of a flat vector laid out
    like ``model.params``; ``layer_of[i]`` is the layer of parameter ``i``."""
    return np.sqrt(np.bincount(layer_of, weights=flat * flat, minlength=n_layers))


def layer_of_params(model: MLP) -> Array:
    """The layer (0-based) of every parameter of ``model``, in the flat layout."""
    shapes = list(zip(model.sizes[:-1], model.sizes[1:], strict=True))
    weights = [np.full(fan_in * fan_out, k) for k, (fan_in, fan_out) in enumerate(shapes)]
    biases = [np.full(fan_out, k) for k, (_, fan_out) in enumerate(shapes)] if model.bias else []
    return np.concatenate(weights + biases).astype(np.intp)


def unit_fractions(activations: Sequence[Activation], hidden: Sequence[Array]) -> dict[str, float]:
    """Dead and saturated unit fractions per hidden layer, from its values on data.

    ``hidden[i - 1]`` holds hidden layer ``i``'s values ``(n, width)``.
    """
    out: dict[str, float] = {}
    for i, (act, a) in enumerate(zip(activations, hidden, strict=True), start=1):
        if act.family == "relu":
            # A unit is dead when it never leaves its flat part (a <= 0) on any training
            # sample. For leaky_relu and elu that part still has a small slope, so such
            # units learn slowly rather than not at all, but the signal is the same.
            dead = np.count_nonzero(np.all(a <= 0, axis=0))
            out[f"dead_fraction/layer_{i}"] = dead / a.shape[1]
        elif act.family == "saturating":
            if act.name == "tanh":
                deriv, peak = 1.0 - a * a, 1.0
            else:
                deriv, peak = a * (1.0 - a), 0.25
            out[f"saturated_fraction/layer_{i}"] = (
                np.count_nonzero(deriv < SATURATION_THRESHOLD * peak) / a.size
            )
    return out


def evaluate(model: MLP, X: Array, T: Array, labels: Array, loss: Loss,
             forward: Callable[[Array], tuple[list[Array], list[Array]]] | None = None,
             ) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on checked inputs.

    ``forward(X) -> (Zs, As)`` runs the forward pass (default: :func:`forward_pass` on
    the model's parameters; a compiled stepper passes its own).
    """
    if forward is None:
        Zs, As = forward_pass(X, model.weights, model.biases, model.activations)
    else:
        Zs, As = forward(X)
    return _loss_and_accuracy(model, loss, Zs[-1], As[-1], T, labels)


def _loss_and_accuracy(model, loss: Loss, z: Array, a: Array, T: Array,
                       labels: Array) -> tuple[float, float]:
    value = loss.value(z, a, T)
    proba = scores_to_proba(a, model.output_activation.name, loss.name)
    return value, float(np.mean(np.argmax(proba, axis=1) == labels))


class OutputRecord:
    """The output values of one epoch's forward passes, row for row as the steps saw
    them, and with ``hidden`` the hidden layers' values: what ``train/loss``,
    ``train/accuracy`` and the unit fractions of an epoch are computed from (see the
    module notes)."""

    def __init__(self, model: MLP, n: int, hidden: bool) -> None:
        self.model, self.n, self.hidden = model, n, hidden
        # Column-major, like the fast path's buffers: copying a batch's columns is then
        # contiguous (a transposing copy cost 90 us per step on 256 x 64).
        self.z = np.empty((n, model.n_outputs), dtype=model.dtype, order="F")
        self.a = np.empty_like(self.z)
        self.kept: list[Array] | None = None  # hidden values of an epoch of several steps
        self.fractions: dict[str, float] = {}

    def add(self, start: int, z: Array, a: Array, hidden: Sequence[Array] = ()) -> None:
        """Keep a batch's output pre-activations ``z``, outputs ``a`` and hidden values
        (``hidden[i - 1]`` of layer ``i``, when recorded) at rows ``start..``."""
        stop = start + z.shape[0]
        self.z[start:stop] = z
        self.a[start:stop] = a
        if not self.hidden:
            return
        if stop - start == self.n:  # the epoch is one step: count now, keep nothing
            self.fractions = unit_fractions(self.model.hidden_activations, hidden)
            return
        if self.kept is None:
            self.kept = [np.empty((self.n, w), dtype=self.model.dtype, order="F")
                         for w in self.model.sizes[1:-1]]
        for kept, values in zip(self.kept, hidden, strict=True):
            kept[start:stop] = values

    def loss(self, loss: Loss, T: Array) -> float:
        """The mean loss over the recorded rows (``T``: their targets)."""
        return loss.value(self.z, self.a, T)

    def metrics(self, loss: Loss, T: Array, labels: Array) -> dict[str, float]:
        """``train/loss``, ``train/accuracy`` and, when recorded, the unit fractions."""
        value, accuracy = _loss_and_accuracy(self.model, loss, self.z, self.a, T, labels)
        out = {"train/loss": value, "train/accuracy": accuracy}
        if self.hidden:
            out.update(self.fractions if self.kept is None
                       else unit_fractions(self.model.hidden_activations, self.kept))
        return out


class Stepper:
    """The training steps of one run, as :func:`fit` drives them.

    Per epoch :func:`fit` calls :meth:`set_epoch`, :meth:`epoch` and
    :meth:`check_params`; on evaluated epochs first :meth:`sync` (the model's arrays are
    then up to date) and :meth:`train_metrics` (checked by :meth:`check_metrics`), then
    :meth:`evaluate` on the validation data and :meth:`diagnostics`, and :meth:`record`
    the result; at the end, also after an error, :meth:`close`.

    The methods here serve any stepper of one :class:`MLP`; a stepper of several
    networks (:mod:`pipeline.fast.replicas`) returns arrays of per-network values and
    records them with its own :meth:`new_history` and :meth:`record`.
    """

    def __init__(self, model: MLP, loss: Loss, optimizer: Optimizer, batch_size: int) -> None:
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.batch_size = batch_size
        # The last tracked epoch: its record, and the targets and labels in its row order.
        self.last: tuple[OutputRecord, Array, Array] | None = None
        self.layer_of: Array | None = None  # each parameter's layer, for the norms

    def set_epoch(self, epoch: int) -> None:
        self.optimizer.set_epoch(epoch)

    def epoch(self, X: Array, T: Array, labels: Array, order: Array | None, *,
              track: bool = False, hidden: bool = False,
              previous: Array | None = None) -> None:
        """One epoch of steps on the rows of ``X`` (targets ``T``, ``labels``) in
        ``order`` (None: as they are), batch after batch.

        ``track`` records the steps' outputs for :meth:`train_loss` and
        :meth:`train_metrics`, ``hidden`` the hidden values too; ``previous``, if given,
        receives the parameters before the epoch's last step.
        """
        raise NotImplementedError

    @property
    def params(self) -> Array:
        """The parameters as the last step left them (in whatever order the steps keep)."""
        return self.model.params

    def sync(self) -> None:
        """Put the model's own arrays (and the optimiser's state) in order."""

    def close(self) -> None:
        self.sync()

    def train_loss(self) -> float:
        record, T, _ = self.last
        return record.loss(self.loss, T)

    def train_metrics(self) -> dict[str, float]:
        record, T, labels = self.last
        return record.metrics(self.loss, T, labels)

    def forward(self, X: Array) -> tuple[list[Array], list[Array]]:
        return forward_pass(X, self.model.weights, self.model.biases, self.model.activations)

    def evaluate(self, X: Array, T: Array, labels: Array) -> tuple[float, float]:
        return evaluate(self.model, X, T, labels, self.loss, self.forward)

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.current_lr)

    def diagnostics(self, previous: Array) -> dict[str, float]:
        """Per layer, the gradient norm and the size of the epoch's last update relative
        to the weights (``previous``: the parameters before it)."""
        model, out = self.model, {}
        if self.layer_of is None:
            self.layer_of = layer_of_params(model)
        L, layer_of = model.n_layers, self.layer_of
        norms = zip(layer_norms(model.grad, layer_of, L).tolist(),
                    layer_norms(model.params - previous, layer_of, L).tolist(),
                    layer_norms(model.params, layer_of, L).tolist(), strict=True)
        for i, (g, u, w) in enumerate(norms, start=1):
            out[f"grad_norm/layer_{i}"] = g
            out[f"update_ratio/layer_{i}"] = u / w if w > 0 else 0.0
        return out

    def check_params(self, epoch: int) -> None:
        if not all_finite(self.params):
            raise DivergenceError(epoch, "parameters became non-finite")

    def check_metrics(self, epoch: int, metrics: dict) -> None:
        if not np.isfinite(metrics["train/loss"]):
            raise DivergenceError(epoch, f"loss became {metrics['train/loss']}")

    def new_history(self) -> History:
        return History()

    def record(self, history: History, epoch: int, metrics: dict) -> dict[str, float]:
        """Append an evaluated epoch to ``history``; the dict callbacks are given."""
        history.append(epoch, metrics)
        return metrics


class PlainStepper(Stepper):
    """The textbook step, one batch at a time: forward pass, output delta, backward pass
    (:mod:`pipeline.engine.mlp`) and the optimiser's step. Slow on purpose: it is the
    reference the fast steppers are tested against."""

    def epoch(self, X: Array, T: Array, labels: Array, order: Array | None, *,
              track: bool = False, hidden: bool = False,
              previous: Array | None = None) -> None:
        model, loss, batch = self.model, self.loss, self.batch_size
        if order is not None:
            X, T, labels = X[order], T[order], labels[order]
        n = X.shape[0]
        record = OutputRecord(model, n, hidden) if track else None
        for start in range(0, n, batch):
            xb, tb = X[start : start + batch], T[start : start + batch]
            Zs, As = forward_pass(xb, model.weights, model.biases, model.activations)
            if record is not None:
                record.add(start, Zs[-1], As[-1], As[1:-1])
            delta = loss.delta(Zs[-1], As[-1], tb, model.output_activation)
            model.backward(Zs, As, delta)
            if previous is not None and start + batch >= n:
                previous[...] = model.params
            self.optimizer.step(model.params, model.grad)
        if record is not None:
            self.last = (record, T, labels)


# How fit() gets its stepper: stepper(model, loss, optimizer, batch_size).
StepperFactory = Callable[[MLP, Loss, Optimizer, int], Stepper]


def fit(
    model: MLP,
    X: Array,
    y: Array,
    *,
    loss: str | Loss,
    optimizer: Optimizer | str,
    epochs: int,
    batch_size: int | None = None,
    seed: int = 0,
    X_val: Array | None = None,
    y_val: Array | None = None,
    X_test: Array | None = None,
    y_test: Array | None = None,
    callbacks: Iterable[Callback] = (),
    eval_every: int = 1,
    patience: int | None = None,
    restore_best: bool = True,
    diagnostics: bool = True,
    stepper: StepperFactory | None = None,
) -> History:
    """Train ``model`` in place by mini-batch gradient descent.

    Parameters
    ----------
    model : MLP
        The network; its parameters are updated in place.
    X : array of shape (n_samples, n_features)
    y : array of shape (n_samples,) or (n_samples, n_outputs)
        Labels or targets.
    loss : str or Loss
        Loss name (``"bce"``, ``"cross_entropy"``, ``"mse"``, ...).
    optimizer : Optimizer or str
        A configured optimiser, or a name to build one with its default settings.
    epochs : int
        Passes over the training data.
    batch_size : int or None
        None for full batch, 1 for online learning. Samples are reshuffled every epoch
        with a generator seeded by ``seed``.
    X_val, y_val : arrays, optional
        Validation data, the only data anything is selected on: reported as ``val/loss``
        and ``val/accuracy``, and early stopping watches ``val/loss``.
    X_test, y_test : arrays, optional
        Test data, reported as ``test/loss`` and ``test/accuracy`` and never used to
        decide anything (so that they stay an honest estimate).
    callbacks : iterable of callables
        ``callback(epoch, metrics)`` after each evaluated epoch; raise
        :class:`StopTraining` to stop.
    eval_every : int
        Evaluate (and call callbacks) every this many epochs, and on the last one.
    patience : int or None
        Stop when the validation loss has not improved for this many evaluations
        (needs ``X_val``).
    restore_best : bool
        With ``patience``, put back the parameters of the best evaluation at the end.
    diagnostics : bool
        Also report per-layer gradient norms, update-to-weight ratios and the fractions
        of dead or saturated hidden units.
    stepper : callable, optional
        ``stepper(model, loss, optimizer, batch_size) -> Stepper``: who makes the steps.
        Default :class:`PlainStepper`; ``pipeline.fast.fit`` passes the compiled one.

    Returns
    -------
    History
        ``train/loss`` and ``train/accuracy`` are running means over each epoch's steps
        (see the module notes).

    Raises
    ------
    DivergenceError
        When the loss or the parameters become NaN or infinite.
    ValueError
        For inputs that do not fit the model or out-of-range settings.
    """
    loss = get_loss(loss)
    loss.check_output(model.output_activation.name, model.n_outputs)
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer)
    epochs = _positive_int("epochs", epochs)
    eval_every = _positive_int("eval_every", eval_every)
    if patience is not None:
        patience = _positive_int("patience", patience)
    X, T, labels, batch, val = prepare_inputs(model, X, y, batch_size, X_val, y_val, patience)
    test = held_out(model, X_test, y_test, "X_test")
    n = X.shape[0]

    callbacks = list(callbacks)
    optimizer.bind(model.params.size, model.n_weight_params, model.dtype)
    rng = np.random.default_rng(seed)
    steps = (stepper or PlainStepper)(model, loss, optimizer, batch)
    history = steps.new_history()
    early = EarlyStopping(patience, restore_best)
    previous = np.empty_like(model.params) if diagnostics else None
    # Full batch: the loss of an epoch's one step, cheap next to the forward pass it needs
    # anyway, is that epoch's training loss. A loss that overflows while the parameters
    # stay finite (squared errors of exploding outputs) is then reported in the epoch it
    # appeared, whatever eval_every (with mini-batches, at the next evaluation). The
    # losses computed from the logits (bce, cross_entropy, hinge) stay finite while the
    # outputs do.
    check_unevaluated = batch == n and eval_every > 1 and not _logit_loss(loss)
    evaluated_last = True
    try:
        for epoch in range(1, epochs + 1):
            steps.set_epoch(epoch)
            evaluate_now = epoch % eval_every == 0 or epoch == epochs
            check_loss = check_unevaluated and not evaluated_last
            evaluated_last = evaluate_now
            order = rng.permutation(n) if batch < n else None
            steps.epoch(X, T, labels, order, track=evaluate_now or check_loss,
                        hidden=evaluate_now and diagnostics,
                        previous=previous if evaluate_now and diagnostics else None)
            if check_loss:
                value = steps.train_loss()
                if not np.isfinite(value):
                    raise DivergenceError(epoch, f"loss became {value}")
            if not evaluate_now:
                steps.check_params(epoch)
                continue

            eval_started = time.perf_counter()
            steps.sync()
            train = steps.train_metrics()
            metrics = {"train/loss": train.pop("train/loss"),
                       "train/accuracy": train.pop("train/accuracy")}
            # The loss first: the steps saw it before this epoch's updates.
            steps.check_metrics(epoch, metrics)
            steps.check_params(epoch)
            if val is not None:
                metrics["val/loss"], metrics["val/accuracy"] = steps.evaluate(*val)
            if test is not None:
                metrics["test/loss"], metrics["test/accuracy"] = steps.evaluate(*test)
            metrics["lr"] = steps.current_lr
            if diagnostics:
                metrics.update(steps.diagnostics(previous))
                metrics.update(train)  # the unit fractions
            summary = steps.record(history, epoch, metrics)
            history.eval_seconds += time.perf_counter() - eval_started

            stop = val is not None and early.update(epoch, summary["val/loss"], model.params,
                                                    history)
            callbacks_started = time.perf_counter()
            stop = run_callbacks(callbacks, epoch, summary) or stop
            history.callback_seconds += time.perf_counter() - callbacks_started
            if stop and epoch < epochs:
                history.stopped_early = True
                break
    finally:
        steps.close()  # parameters, gradient and the optimiser's state back in order

    if early.best_params is not None:
        model.set_params(early.best_params)
    return history


class EarlyStopping:
    """The best validation loss so far, the evaluations since it last improved and, when
    training is to end on the best epoch's parameters, a copy of them (for :func:`fit`
    and the replica trainer)."""

    def __init__(self, patience: int | None, restore_best: bool) -> None:
        self.patience = patience
        self.keep_best = patience is not None and restore_best
        self.best_loss, self.stale = np.inf, 0
        self.best_params: Array | None = None

    def update(self, epoch: int, loss: float, params: Array, history: History) -> bool:
        """Record this evaluation's ``loss``; True when patience has run out."""
        if loss < self.best_loss:
            self.best_loss, self.stale = loss, 0
            history.best_epoch = epoch
            if self.keep_best:
                self.best_params = params.copy()
            return False
        self.stale += 1
        return self.patience is not None and self.stale >= self.patience


def run_callbacks(callbacks: Iterable[Callback], epoch: int, metrics: dict) -> bool:
    """Call every callback (all of them, even after one asked to stop); True when one
    raised :class:`StopTraining`."""
    stop = False
    for callback in callbacks:
        try:
            callback(epoch, metrics)
        except StopTraining:
            stop = True
    return stop


def _logit_loss(loss: Loss) -> bool:
    """A registered loss that is finite wherever the network's outputs are finite."""
    return loss.name in ("bce", "cross_entropy", "hinge") and LOSSES.get(loss.name) is loss


def all_finite(params: Array) -> bool:
    """Whether every parameter is finite, in one reduction on the common path.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves
    all are finite; only a non-finite sum (which finite values can also produce, by
    overflow) needs the exact elementwise check.
    """
    if np.isfinite(np.add.reduce(params)):
        return True
    return bool(np.all(np.isfinite(params)))


def prepare_inputs(
    model: MLP, X: Array, y: Array, batch_size: int | None, X_val: Array | None,
    y_val: Array | None, patience: int | None,
) -> tuple[Array, Array, Array, int, tuple[Array, Array, Array] | None]:
    """Check and encode the training (and validation) data once, before any step.

    Returns ``(X, T, labels, batch, val)``: inputs in the model's dtype, the target
    matrix, integer labels, the batch size (``n`` for full batch) and
    ``(X_val, T_val, labels_val)`` or None. Shared by :func:`fit` and the replica trainer.
    """
    X = model.check_input(X)
    n = X.shape[0]
    if n == 0:
        raise ValueError("X has 0 samples: training needs at least one")
    T = model.encode_targets(y, n)
    labels = true_labels(y, T)
    batch = n if batch_size is None else _positive_int("batch_size", batch_size)
    if batch > n:
        raise ValueError(f"batch_size={batch_size}: must be at most the {n} training samples")
    val = held_out(model, X_val, y_val, "X_val")
    if val is None and patience is not None:
        raise ValueError("patience: early stopping needs validation data (X_val, y_val)")
    return X, T, labels, batch, val


def held_out(model: MLP, X: Array | None, y: Array | None,
             name: str = "X_test") -> tuple[Array, Array, Array] | None:
    """Checked and encoded held-out data ``(X, T, labels)``, or None when not given."""
    if X is None or y is None:
        return None
    X = model.check_input(X)
    if X.shape[0] == 0:
        raise ValueError(f"{name} has 0 samples: give held-out rows or None")
    T = model.encode_targets(y, X.shape[0])
    return X, T, true_labels(y, T)


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key}={value!r}: must be an integer >= 1")
    return int(value)
