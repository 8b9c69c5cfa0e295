"""The compiled training step of one network: :func:`compile_step`.

``compile_step(model, loss, optimizer, batch_size)`` returns a
:class:`~pipeline.engine.loop.Stepper` for :func:`pipeline.engine.loop.fit` that makes
the same steps as the engine's :class:`~pipeline.engine.loop.PlainStepper`, faster:

- the batches of an epoch are fixed views of one shuffled copy of the data
  (:class:`ShuffledViews`: two gathers an epoch instead of two a step);
- each batch's whole step (forward pass, output gradient, backward pass and the
  optimiser's update) is one list of numpy calls bound once to preallocated arrays
  (:class:`pipeline.fast.workspace.Workspace`), so an epoch only runs them;
- where the products fold the biases in and the optimiser treats every parameter alike
  (a built-in one, no penalty), the steps run on a packed working copy
  ``P = params[packed_order(model)]``: each layer's ``[W_l; b_l]`` is then one block the
  products read, and ``[dW_l; db_l]`` one block they write, saving the copies of packing
  and unpacking them every step (2.7 of 25 us on configuration 3). The optimiser's state
  is permuted alike while the copy is in use; :meth:`CompiledStepper.sync` puts
  parameters, gradient and state back in the model's order before anyone looks at them.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from pipeline.engine.loop import OutputRecord, Stepper
from pipeline.engine.losses import Loss, get_loss
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import OPTIMIZERS, Optimizer
from pipeline.fast.workspace import Workspace, packed_order

Array = np.ndarray

__all__ = ["DEFINED_STEP", "CompiledStepper", "Observer", "ShuffledViews", "compile_step"]

# The step method as defined: an optimiser whose step was replaced (a subclass, a test)
# is stepped through its step method; the others through their bound program.
DEFINED_STEP = Optimizer.step


class ShuffledViews:
    """Batches of one epoch as views into one shuffled copy of the data.

    Gathering the whole shuffled data set once per epoch (a ``take`` per array) and then
    slicing contiguous batches costs far less than gathers per step, and the batches hold
    exactly the rows the plain stepper takes for the same order.
    """

    def __init__(self, X: Array, T: Array, labels: Array, batch: int) -> None:
        self.X, self.T, self.labels = X, T, labels
        n = X.shape[0]
        self.shuffled = batch < n
        if not self.shuffled:
            self.views = [(0, X, T)]
            return
        self.Xs, self.Ts, self.Ls = np.empty_like(X), np.empty_like(T), np.empty_like(labels)
        self.views = [(i, self.Xs[i : i + batch], self.Ts[i : i + batch])
                      for i in range(0, n, batch)]

    def shuffle(self, order: Array | None) -> None:
        """Gather the rows in ``order`` (None: leave them as they are) into the views."""
        if order is not None:
            np.take(self.X, order, axis=0, out=self.Xs)
            np.take(self.T, order, axis=0, out=self.Ts)
            self.order = order

    def epoch_targets(self) -> tuple[Array, Array]:
        """Targets and labels in the rows' current order."""
        if not self.shuffled:
            return self.T, self.labels
        np.take(self.labels, self.order, out=self.Ls)
        return self.Ts, self.Ls


class Observer:
    """What the observing programs call between a batch's forward and backward pass: it
    keeps the batch's values in the tracked epoch's record (``record``, from row
    ``start``). Its own object, not a method of the stepper: the programs that hold it
    would otherwise hold the stepper in a reference cycle, and with it workspaces whose
    memory only a garbage-collector pass would give back (the next model then paid the
    first-touch page faults of fresh memory: 0.5 s on 100,000 rows of 256 units)."""

    def __init__(self) -> None:
        self.record = None
        self.start = 0

    def __call__(self, ws) -> None:
        hidden = ws.A[1:-1] if self.record.hidden else ()
        self.record.add(self.start, ws.Z[-1], ws.A[-1], hidden)


class CompiledStepper(Stepper):
    """The engine's steps as bound programs (see the module notes)."""

    def __init__(self, model: MLP, loss: Loss, optimizer: Optimizer, batch_size: int) -> None:
        super().__init__(model, loss, optimizer, batch_size)
        self.data: Array | None = None  # the X the programs are bound to
        self.workspaces: dict[int, Workspace] = {}
        self.records: dict[bool, OutputRecord] = {}
        self.in_use = False
        self.observer = Observer()

    def _bind(self, X: Array, T: Array, labels: Array) -> None:
        model, opt = self.model, self.optimizer
        self.views = ShuffledViews(X, T, labels, self.batch_size)
        # An optimiser with a step of its own gets its step method, on the model's arrays.
        own_step = type(opt).step is not DEFINED_STEP
        # Packing pays over many steps; a full-batch epoch is one step between syncs.
        self.packed = (not own_step and model.bias and type(opt) in OPTIMIZERS.values()
                       and opt._uniform and len(self.views.views) > 1)
        self.P, self.dP = model.params, model.grad
        if self.packed:
            self.order = packed_order(model)
            self.inverse = np.argsort(self.order)
            self.P, self.dP = np.empty_like(model.params), np.empty_like(model.grad)
        update = ([partial(opt.step, self.P, self.dP)] if own_step
                  else opt._program(self.P, self.dP))
        packed = (self.P, self.dP) if self.packed else None
        sizes = {xb.shape[0] for _, xb, _ in self.views.views}
        for n in sizes:
            self.workspace(n)
        self.steps = {
            observed: {
                n: self.workspaces[n].train_program(
                    self.loss, update, packed,
                    partial(self.observer, self.workspaces[n]) if observed else None)
                for n in sizes}
            for observed in (False, True)
        }
        self.data = X

    def workspace(self, n: int) -> Workspace:
        ws = self.workspaces.get(n)
        if ws is None:
            ws = self.workspaces[n] = Workspace(self.model, n)
        return ws

    def epoch(self, X: Array, T: Array, labels: Array, order: Array | None, *,
              track: bool = False, hidden: bool = False,
              previous: Array | None = None) -> None:
        if X is not self.data:
            self._bind(X, T, labels)
        if self.packed and not self.in_use:
            np.take(self.model.params, self.order, out=self.P)
            np.take(self.model.grad, self.order, out=self.dP)
            self.optimizer._reorder(self.order)
            self.in_use = True
        self.views.shuffle(order)
        if track:
            record = self.records.get(hidden)
            if record is None:
                record = self.records[hidden] = OutputRecord(self.model, X.shape[0], hidden)
            self.observer.record = record
        runs = self.steps[track]
        views = self.views.views
        last = len(views) - 1
        for k, (start, xb, tb) in enumerate(views):
            if previous is not None and k == last:
                if self.in_use:
                    np.take(self.P, self.inverse, out=previous)
                else:
                    previous[...] = self.model.params
            self.observer.start = start
            runs[xb.shape[0]](xb, tb)
        if track:
            self.last = (self.observer.record, *self.views.epoch_targets())

    @property
    def params(self) -> Array:
        return self.P if self.in_use else self.model.params

    def sync(self) -> None:
        if self.in_use:
            np.take(self.P, self.inverse, out=self.model.params)
            np.take(self.dP, self.inverse, out=self.model.grad)
            self.optimizer._reorder(self.inverse)
            self.in_use = False

    def forward(self, X: Array) -> tuple[list[Array], list[Array]]:
        """The forward pass in a workspace (valid until its next use)."""
        ws = self.workspace(X.shape[0])
        ws.forward(X)
        return ws.Z, ws.A


def compile_step(model: MLP, loss: str | Loss, optimizer: Optimizer,
                 batch_size: int) -> CompiledStepper:
    """The compiled stepper of ``model`` for :func:`pipeline.engine.loop.fit`
    (``fit(..., stepper=compile_step)``): the engine's steps, bound once."""
    return CompiledStepper(model, get_loss(loss), optimizer, batch_size)
