"""The training loop: batches, optimiser steps, evaluation, diagnostics, callbacks.

:func:`fit` knows nothing of Hydra, MLflow, files or terminals. After every evaluated
epoch it hands a flat ``{name: float}`` dict to each callback; progress bars, trackers
and plot recorders are callbacks, so a run without them (a test, a notebook) follows the
same code path as a tracked run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from pipeline.engine.losses import LOSSES, Loss, get_loss, scores_to_proba
from pipeline.engine.mlp import MLP, packed_order
from pipeline.engine.optim import OPTIMIZERS, Optimizer, make_optimizer

Array = np.ndarray
# The step method as defined: the trainer skips its argument checks only when neither a
# subclass nor a test has replaced it.
_OPTIMIZER_STEP = Optimizer.step
Callback = Callable[[int, dict[str, float]], object]

# A unit counts as saturated where its local derivative is below this share of the
# function's largest derivative: |a| > 0.975 for tanh, a < 0.013 or a > 0.987 for sigmoid.
SATURATION_THRESHOLD = 0.05


# BLAS threads pay off only when one matrix product is large: below about 2**27
# multiply-adds the second thread's start-up and synchronisation cost more than it saves,
# and on a busy machine far more (measured on the 2-core machine: 256x64x64 runs 2.5x
# slower on 2 threads, 2000x256x256 1.5x faster; see benchmarks/README.md). Elementwise
# numpy work is single-threaded anyway.
PARALLEL_MIN_MACS = 2**27
_CORES = os.cpu_count() or 1  # os.cpu_count() reads /sys: tens of microseconds a call


def blas_threads_for(batch: int, widths: Sequence[int], cores: int | None = None) -> int:
    """BLAS threads worth using for training steps on ``batch`` rows.

    Parameters
    ----------
    batch : int
        Rows per step (the batch size, or the data size for full batch).
    widths : sequence of int
        Layer widths from input to output, like ``model.sizes``.
    cores : int, optional
        Cores available; default ``os.cpu_count()``.

    Returns
    -------
    int
        1 when the largest matrix product of a step (``batch * fan_in * fan_out``
        multiply-adds) is below :data:`PARALLEL_MIN_MACS`, else all cores.
    """
    cores = cores if cores is not None else _CORES
    largest = max(fi * fo for fi, fo in zip(widths[:-1], widths[1:], strict=True))
    return cores if batch * largest >= PARALLEL_MIN_MACS else 1


_BLAS: dict[str, object] = {"controller": None, "n_modules": -1}


def _blas_controller():
    """A threadpoolctl controller of the loaded BLAS libraries, cached.

    Building one scans every loaded shared library (milliseconds once torch or scipy are
    loaded, as long as a short training run); a BLAS library can only appear with a new
    import, so the scan is redone only when ``sys.modules`` has grown.
    """
    n_modules = len(sys.modules)
    if _BLAS["controller"] is None or _BLAS["n_modules"] != n_modules:
        from threadpoolctl import ThreadpoolController

        _BLAS["controller"] = ThreadpoolController().select(user_api="blas")
        _BLAS["n_modules"] = n_modules
    return _BLAS["controller"]


def current_blas_threads() -> int | None:
    """The BLAS thread limit in force (the largest over loaded BLAS libraries)."""
    counts = [lib.num_threads for lib in _blas_controller().lib_controllers]
    return max(counts) if counts else None


@contextmanager
def blas_threads(limit: int | None) -> Iterator[None]:
    """Run the block with at most ``limit`` BLAS threads, restoring the settings after.

    ``None`` changes nothing. Thread counts apply to every loaded BLAS library
    (numpy's and scipy's OpenBLAS), through threadpoolctl.
    """
    if limit is None:
        yield
        return
    with _blas_controller().limit(limits=int(limit)):
        yield


def _resolve_threads(threads: int | str | None, batch: int, sizes: Sequence[int]) -> int | None:
    """The limit :func:`fit` applies for its ``threads`` argument (None: leave as is)."""
    if threads is None:
        return None
    if threads == "auto":
        wanted = blas_threads_for(batch, sizes)
        current = current_blas_threads()
        if current is None or wanted >= current:
            return None  # never raise a limit set outside (one thread per sweep job)
        return wanted
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads={threads!r}: must be 'auto', None or an integer >= 1")
    return int(threads)


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

    def to_frame(self):
        """The history as a pandas DataFrame indexed by epoch."""
        import pandas as pd

        return pd.DataFrame(self.metrics, index=pd.Index(self.epochs, name="epoch"))

    def __len__(self) -> int:
        return len(self.epochs)


def true_labels(y: Array, T: Array) -> Array:
    """Class labels from labels or a target matrix (argmax, or > 0.5 for one column)."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y.astype(np.int64)
    return (T[:, 0] > 0.5).astype(np.int64) if T.shape[1] == 1 else np.argmax(T, axis=1)


def _diagnostics(model: MLP, As: list[Array], out: dict[str, float]) -> None:
    """Dead and saturated unit fractions per hidden layer, from a forward pass on data."""
    for i, act in enumerate(model.hidden_activations, start=1):
        a = As[i]
        if act.family == "relu":
            # A unit is dead when it never leaves its flat part (a <= 0) on any training
            # sample. For leaky_relu and elu that part still has a small slope, so such
            # units learn slowly rather than not at all, but the signal is the same.
            out[f"dead_fraction/layer_{i}"] = float(np.mean(np.all(a <= 0, axis=0)))
        elif act.family == "saturating":
            if act.name == "tanh":
                deriv, peak = 1.0 - a * a, 1.0
            else:
                deriv, peak = a * (1.0 - a), 0.25
            out[f"saturated_fraction/layer_{i}"] = float(
                np.mean(deriv < SATURATION_THRESHOLD * peak)
            )


def _layer_norms(model: MLP, flat: Array) -> list[float]:
    """Euclidean norm per layer of a flat vector laid out like ``model.params``."""
    norms = []
    offset = 0
    bias_offset = model.n_weight_params
    for W in model.weights:
        sq = float(np.dot(flat[offset : offset + W.size], flat[offset : offset + W.size]))
        offset += W.size
        if model.biases is not None:
            b = flat[bias_offset : bias_offset + W.shape[1]]
            sq += float(np.dot(b, b))
            bias_offset += W.shape[1]
        norms.append(np.sqrt(sq))
    return norms


def evaluate(model: MLP, X: Array, T: Array, labels: Array, loss: Loss) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on checked inputs."""
    Zs, As = model._forward(X)
    value = loss.value(Zs[-1], As[-1], T)
    proba = scores_to_proba(As[-1], model.output_activation.name, loss.name)
    accuracy = float(np.mean(np.argmax(proba, axis=1) == labels))
    return value, accuracy


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
    callbacks: Iterable[Callback] = (),
    eval_every: int = 1,
    patience: int | None = None,
    restore_best: bool = True,
    diagnostics: bool = True,
    threads: int | str | None = "auto",
    fast: bool = True,
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
        Held-out data; reported as ``test/loss`` and ``test/accuracy``.
    callbacks : iterable of callables
        ``callback(epoch, metrics)`` after each evaluated epoch; raise
        :class:`StopTraining` to stop.
    eval_every : int
        Evaluate (and call callbacks) every this many epochs, and on the last one.
    patience : int or None
        Stop when the validation loss has not improved for this many evaluations.
    restore_best : bool
        With ``patience``, put back the parameters of the best evaluation at the end.
    diagnostics : bool
        Also report per-layer gradient norms, update-to-weight ratios and the fractions
        of dead or saturated hidden units.
    threads : "auto", int or None
        BLAS threads during training: ``"auto"`` picks :func:`blas_threads_for` the
        batch and layer sizes, never more than the limit already in force (so a sweep
        job capped at one thread stays at one); an integer sets exactly that many;
        None leaves the BLAS settings alone. Settings are restored on return.
    fast : bool
        Use the preallocated fast path (:meth:`MLP._value_and_grad`, batches as views of
        a shuffled copy). False runs the straightforward allocating reference path
        (:meth:`MLP._value_and_grad_reference`, per-step gathers); both give the same
        numbers up to floating-point rounding.

    Returns
    -------
    History

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
    n = X.shape[0]
    has_val = val is not None
    if has_val:
        X_val, T_val, labels_val = val

    callbacks = list(callbacks)
    optimizer.bind(model.n_params, model.n_weight_params, model.dtype)
    rng = np.random.default_rng(seed)
    history = History()
    early = EarlyStopping(patience, restore_best)
    n_batches = -(-n // batch)
    previous = np.empty_like(model.params) if diagnostics else None
    if fast:
        value_and_grad, forward = model._value_and_grad, model._forward_fast
        epoch_batches = _ShuffledViews(X, T, batch, rng)
    else:
        value_and_grad, forward = model._value_and_grad_reference, model._forward
        # Reused batch buffers: fancy indexing would allocate a fresh copy every step.
        Xb = np.empty((batch, X.shape[1]), dtype=model.dtype)
        Tb = np.empty((batch, T.shape[1]), dtype=model.dtype)

        def epoch_batches() -> Iterable[tuple[Array, Array]]:
            return [(X, T)] if batch == n else _shuffled_batches(X, T, rng, batch, Xb, Tb)

    params, grad = model.params, model.grad
    # The arrays were bound above with their shape and dtype, so the per-step argument
    # checks of Optimizer.step can be skipped (unless a subclass has its own step).
    fast_step = fast and type(optimizer).step is _OPTIMIZER_STEP
    step = optimizer._step if fast_step else optimizer.step
    bound = None
    if fast_step and type(model)._value_and_grad is MLP._value_and_grad:
        bound = _BoundSteps(model, loss, optimizer, epoch_batches)
    # Full batch: the first (only) step of an epoch sees exactly the parameters the
    # previous epoch ended with, so its loss, cheap next to the forward pass it needs
    # anyway, is the training loss an evaluation of that epoch would have found. A loss
    # that overflows while the parameters stay finite (squared errors of exploding
    # outputs) is then reported in the epoch it appeared, whatever eval_every (with
    # mini-batches, at the next evaluation). The losses computed from the logits (bce,
    # cross_entropy, hinge) stay finite while the outputs do, so they skip the check.
    check_unevaluated = batch == n and eval_every > 1 and not _logit_loss(loss)
    evaluated_last = True
    with blas_threads(_resolve_threads(threads, batch, model.sizes)):
        try:
            for epoch in range(1, epochs + 1):
                optimizer.set_epoch(epoch)
                evaluate_now = epoch % eval_every == 0 or epoch == epochs
                keep_previous = evaluate_now and diagnostics
                check_loss = check_unevaluated and not evaluated_last
                evaluated_last = evaluate_now
                if bound is not None and not check_loss and not keep_previous:
                    bound.epoch()
                else:
                    if bound is not None:
                        bound.sync()
                    run_epoch_steps(epoch_batches(), n_batches, value_and_grad, step, loss,
                                    epoch, check_loss, previous if keep_previous else None,
                                    params, grad)
                if not _all_finite(params if bound is None else bound.current_params):
                    raise DivergenceError(epoch, "parameters became non-finite")
                if not evaluate_now:
                    continue
                if bound is not None:
                    bound.sync()

                eval_started = time.perf_counter()
                metrics: dict[str, float] = {}
                Zs, As = forward(X)
                train_loss = loss.value(Zs[-1], As[-1], T)
                if not np.isfinite(train_loss):
                    raise DivergenceError(epoch, f"loss became {train_loss}")
                proba = scores_to_proba(As[-1], model.output_activation.name, loss.name)
                metrics["train/loss"] = train_loss
                metrics["train/accuracy"] = float(np.mean(np.argmax(proba, axis=1) == labels))
                unit_fractions: dict[str, float] = {}
                if diagnostics:
                    # Now, before a validation forward pass that may reuse the same buffers.
                    _diagnostics(model, As, unit_fractions)
                if has_val:
                    val_loss, val_accuracy = _evaluate(forward, model, X_val, T_val, labels_val,
                                                       loss)
                    metrics["test/loss"] = val_loss
                    metrics["test/accuracy"] = val_accuracy
                metrics["lr"] = float(optimizer.current_lr)
                if diagnostics:
                    grad_norms = _layer_norms(model, model.grad)
                    update_norms = _layer_norms(model, model.params - previous)
                    weight_norms = _layer_norms(model, model.params)
                    norms = zip(grad_norms, update_norms, weight_norms, strict=True)
                    for i, (g, u, w) in enumerate(norms, start=1):
                        metrics[f"grad_norm/layer_{i}"] = float(g)
                        metrics[f"update_ratio/layer_{i}"] = float(u / w) if w > 0 else 0.0
                    metrics.update(unit_fractions)
                history.append(epoch, metrics)
                history.eval_seconds += time.perf_counter() - eval_started

                stop = has_val and early.update(epoch, metrics["test/loss"], model.params,
                                                history)
                callbacks_started = time.perf_counter()
                stop = run_callbacks(callbacks, epoch, metrics) or stop
                history.callback_seconds += time.perf_counter() - callbacks_started
                if stop and epoch < epochs:
                    history.stopped_early = True
                    break
        finally:
            if bound is not None:
                bound.sync()  # params, grad and the optimiser's state back in order

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


def _evaluate(forward, model: MLP, X: Array, T: Array, labels: Array, loss: Loss):
    Zs, As = forward(X)
    value = loss.value(Zs[-1], As[-1], T)
    proba = scores_to_proba(As[-1], model.output_activation.name, loss.name)
    return value, float(np.mean(np.argmax(proba, axis=1) == labels))


def run_epoch_steps(batches: Iterable[tuple[Array, Array]], n_batches: int, value_and_grad,
                    step, loss: Loss, epoch: int, check_loss: bool, previous: Array | None,
                    params: Array, grad: Array) -> None:
    """One epoch of optimiser steps the plain way (one call per step, not a bound program).

    ``check_loss`` computes each step's loss and raises :class:`DivergenceError` naming the
    previous epoch when it is not finite; ``previous``, if given, receives the parameters
    before the epoch's last step (to report the size of that update relative to the
    weights). Shared by :func:`fit` and the replica trainer.
    """
    last = n_batches - 1
    for k, (xb, tb) in enumerate(batches):
        if check_loss:
            value = value_and_grad(xb, tb, loss, True)
            if not np.isfinite(value):
                raise DivergenceError(epoch - 1, f"loss became {value}")
        else:
            value_and_grad(xb, tb, loss, False)
        if previous is not None and k == last:
            previous[...] = params
        step(params, grad)


def _all_finite(params: Array) -> bool:
    """Whether every parameter is finite, in one reduction on the common path.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves
    all are finite; only a non-finite sum (which finite values can also produce, by
    overflow) needs the exact elementwise check.
    """
    if np.isfinite(np.add.reduce(params)):
        return True
    return bool(np.all(np.isfinite(params)))


class _BoundSteps:
    """The fast path's epochs: each batch's whole step bound once as one list of calls.

    The batches are fixed views of the per-epoch shuffled copy (:class:`_ShuffledViews`),
    so each one's step, the model's calls and then the optimiser's, is bound once
    (:meth:`MLP._train_program`, :meth:`Optimizer._program`) and an epoch only runs
    them. Where the products fold the biases in and the optimiser treats every
    parameter alike (a built-in one, no penalty), the steps run on a packed working
    copy, ``P = params[packed_order(model)]``: each layer's ``[W_l; b_l]`` is then one
    block the products read, and ``[dW_l; db_l]`` one block they write, saving the two
    copies per layer and direction of packing and unpacking them every step (2.7 of
    25 us on configuration 3). The optimiser's state is permuted alike while the copy
    is in use; :meth:`sync` puts parameters, gradient and state back in the model's
    order, before anything else looks at them.
    """

    def __init__(self, model: MLP, loss: Loss, optimizer: Optimizer,
                 batches: _ShuffledViews) -> None:
        self.batches = batches
        self.model, self.optimizer = model, optimizer
        sizes = {xb.shape[0] for xb, _ in batches.views}
        self.packed = (
            type(optimizer) in OPTIMIZERS.values() and optimizer._uniform
            and all(model._workspace(n).fold for n in sizes)
        )
        self.in_use = False
        self.params, self.grad = model.params, model.grad
        if self.packed:
            self.order = packed_order(model)
            self.inverse = np.argsort(self.order)
            self.params, self.grad = np.empty_like(model.params), np.empty_like(model.grad)
        update = optimizer._program(self.params, self.grad)
        packed = (self.params, self.grad) if self.packed else None
        runs = {n: model._train_program(n, loss, update, packed) for n in sizes}
        self.steps = [(runs[xb.shape[0]], xb, tb) for xb, tb in batches.views]

    def epoch(self) -> None:
        """Shuffle and run every batch's step once."""
        if self.packed and not self.in_use:
            np.take(self.model.params, self.order, out=self.params)
            np.take(self.model.grad, self.order, out=self.grad)
            self.optimizer._reorder(self.order)
            self.in_use = True
        self.batches()
        for run, xb, tb in self.steps:
            run(xb, tb)

    @property
    def current_params(self) -> Array:
        """The parameters as the last step left them (in either order)."""
        return self.params if self.in_use else self.model.params

    def sync(self) -> None:
        """Parameters, gradient and optimiser state back in the model's own order."""
        if self.in_use:
            np.take(self.params, self.inverse, out=self.model.params)
            np.take(self.grad, self.inverse, out=self.model.grad)
            self.optimizer._reorder(self.inverse)
            self.in_use = False


class _ShuffledViews:
    """Batches of one epoch as views into one shuffled copy of the data.

    Gathering the whole shuffled data set once per epoch (two ``take`` calls) and then
    slicing contiguous batches costs far less than two gathers per step, and the batches
    hold exactly the rows :func:`_shuffled_batches` would give for the same generator.
    """

    def __init__(self, X: Array, T: Array, batch: int, rng: np.random.Generator) -> None:
        self.X, self.T, self.rng = X, T, rng
        n = X.shape[0]
        if batch >= n:
            self.views = [(X, T)]
            self.shuffle = False
            return
        self.shuffle = True
        self.Xs = np.empty_like(X)
        self.Ts = np.empty_like(T)
        self.views = [
            (self.Xs[i : i + batch], self.Ts[i : i + batch]) for i in range(0, n, batch)
        ]

    def __call__(self) -> list[tuple[Array, Array]]:
        if self.shuffle:
            order = self.rng.permutation(self.X.shape[0])
            np.take(self.X, order, axis=0, out=self.Xs)
            np.take(self.T, order, axis=0, out=self.Ts)
        return self.views


def _shuffled_batches(
    X: Array, T: Array, rng: np.random.Generator, batch: int, Xb: Array, Tb: Array
) -> Iterator[tuple[Array, Array]]:
    """One epoch of shuffled batches; full-size ones are gathered into reused buffers."""
    n = X.shape[0]
    order = rng.permutation(n)
    n_full = n // batch
    for k in range(n_full):
        idx = order[k * batch : (k + 1) * batch]
        np.take(X, idx, axis=0, out=Xb)
        np.take(T, idx, axis=0, out=Tb)
        yield Xb, Tb
    if n_full * batch < n:
        idx = order[n_full * batch :]
        yield X[idx], T[idx]


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
    val = None
    if X_val is not None and y_val is not None:
        X_val = model.check_input(X_val)
        T_val = model.encode_targets(y_val, X_val.shape[0])
        val = (X_val, T_val, true_labels(y_val, T_val))
    elif patience is not None:
        raise ValueError("patience: early stopping needs validation data (X_val, y_val)")
    return X, T, labels, batch, val


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key}={value!r}: must be an integer >= 1")
    return int(value)
