"""The engine room: the engine's math made fast. Imports the engine; the engine never imports it.

- :mod:`~pipeline.fast.kernels`: in-place kernels of the engine's activations and losses,
  keyed by their names, with a generic fallback for any other;
- :mod:`~pipeline.fast.workspace`: preallocated buffers and bound step programs;
- :mod:`~pipeline.fast.compile`: ``compile_step``, the compiled stepper of one network;
- :mod:`~pipeline.fast.replicas`: K networks trained side by side as one stepper;
- :mod:`~pipeline.fast.threads`: BLAS threads per run.

:func:`fit` is :func:`pipeline.engine.loop.fit` with the fast stepper: what users call.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

from pipeline.engine.loop import History, StepperFactory
from pipeline.engine.loop import fit as engine_fit
from pipeline.engine.mlp import MLP
from pipeline.fast.compile import compile_step
from pipeline.fast.replicas import ReplicaHistory, ReplicaMLP, ReplicaStepper
from pipeline.fast.threads import blas_threads, resolve_threads

__all__ = ["compile_step", "fit", "fit_replicas"]


def fit(model: MLP | ReplicaMLP, X: np.ndarray, y: np.ndarray, *,
        threads: int | str | None = "auto", fast: bool = True,
        stepper: StepperFactory | None = None, **kwargs) -> History:
    """:func:`pipeline.engine.loop.fit` (same arguments) with the fast stepper.

    Parameters
    ----------
    model : MLP or ReplicaMLP
        One network (compiled steps, :func:`compile_step`) or K replicas
        (:class:`~pipeline.fast.replicas.ReplicaStepper`, which also takes
        ``learning_rates`` through :func:`~pipeline.fast.replicas.fit_replicas`).
    threads : "auto", int or None
        BLAS threads during training: ``"auto"`` picks
        :func:`~pipeline.fast.threads.blas_threads_for` the batch and layer sizes, never
        more than the limit already in force (so a sweep job capped at one thread stays
        at one); an integer sets exactly that many; None leaves the BLAS settings alone.
        Settings are restored on return.
    fast : bool
        False trains a single network with the engine's plain stepper instead (the same
        numbers up to floating-point rounding).
    stepper : callable, optional
        Any other stepper factory; overrides ``fast``.
    """
    replicas = isinstance(model, ReplicaMLP)
    if stepper is None:
        if replicas:
            if not fast:
                raise ValueError("fast=False: replicas train only with the fast stepper")
            stepper = ReplicaStepper
        elif fast:
            stepper = compile_step
    rows = np.shape(X)[0] if np.ndim(X) == 2 else 1
    batch = kwargs.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not 0 < batch <= rows:
        batch = max(rows, 1)
    widths: Sequence[int] = model.sizes
    if replicas:
        # As for one network whose layers are K times wider.
        widths = [model.sizes[0]] + [model.n_replicas * w for w in model.sizes[1:]]
    with blas_threads(resolve_threads(threads, batch, widths)):
        return engine_fit(model, X, y, stepper=stepper, **kwargs)


def fit_replicas(model: ReplicaMLP, X: np.ndarray, y: np.ndarray, *,
                 learning_rates: Sequence[float] | None = None, **kwargs) -> ReplicaHistory:
    """Train every replica of ``model`` in place, in one vectorised pass per batch.

    :func:`fit` with a :class:`~pipeline.fast.replicas.ReplicaStepper`, taking its
    arguments, and ``learning_rates``: one base learning rate per replica (each follows
    the optimiser's schedule; default the optimiser's ``lr`` for all). The batch order,
    seeded by ``seed``, is shared by all replicas (they differ by their initial
    weights): replica ``k`` follows ``fit(MLP(..., seed=model.seeds[k]), ...,
    seed=seed)``. Early stopping watches the mean validation loss across replicas.

    Returns
    -------
    ReplicaHistory
        Mean and spread of every metric, plus each replica's own history. Callbacks get
        the same dict as ``history.metrics`` rows: means under fit()'s keys, spreads
        under ``key + "/std"``.
    """
    stepper = partial(ReplicaStepper, learning_rates=learning_rates)
    return fit(model, X, y, stepper=stepper, **kwargs)
