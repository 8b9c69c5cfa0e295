"""Many networks per run: K replicas of one architecture trained side by side.

A small network trained once says little: another seed can move its accuracy by
several points. :func:`fit_replicas` trains ``K`` independently initialised copies
(seeds ``seed .. seed + K - 1``, optionally one learning rate each) on the same data, in
one vectorised pass, so that a run reports the mean and the spread of every metric.

The replicas' parameters are stacked in one flat vector, weights first, then biases
(so weight decay still touches exactly ``params[:n_weight_params]``), laid out for
the products of a step:

- layer 1 as ``(fan_in, K, fan_out)``, stored LAST among the weights and followed at
  once by its bias ``(K, fan_out)``, the first of the biases: the input is shared, so
  ``[X, 1] @ [W1; b1]`` (``[W1; b1]`` a contiguous ``(fan_in + 1, K * fan_out)`` view)
  is ONE product giving the first layer of every replica with its bias, and
  ``[X, 1].T @ delta_1`` gives every replica's weight AND bias gradient of layer 1;
- layers 2..L as ``(K, fan_in, fan_out)``: one batched product ``A @ W`` over the
  replicas (or, for a one-unit layer, one block-diagonal product, see
  :class:`_ReplicaWorkspace`); their biases as ``(K, fan_out)``.

Activations are ``(n, K, width)`` arrays: every elementwise step (bias, activation,
derivative) is one numpy call for all replicas, and the optimiser updates all of them
in one call per operation. On small networks a step costs its number of numpy calls, not
its arithmetic, so K replicas cost far less than K runs.

One optimiser state covers every replica; its update is elementwise, so each replica
follows exactly the trajectory it would follow trained alone by :func:`pipeline.trainer.fit`
with the same initial seed and the same batch order (``fit(..., seed=seed)``), up to
floating-point rounding of the stacked products.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import as_strided

from pipeline.losses import (
    Loss,
    _ce_delta_into,
    _residual_over_n_into,
    get_loss,
    scores_to_proba,
)
from pipeline.nn import MLP
from pipeline.optim import Optimizer, make_optimizer, make_schedule
from pipeline.trainer import (
    SATURATION_THRESHOLD,
    Callback,
    DivergenceError,
    History,
    StopTraining,
    _logit_loss,
    _positive_int,
    _resolve_threads,
    _ShuffledViews,
    blas_threads,
    prepare_inputs,
)

Array = np.ndarray

__all__ = ["ReplicaHistory", "ReplicaMLP", "fit_replicas", "replicas_from_config"]


class ReplicaMLP:
    """``n_replicas`` MLPs of one architecture, initialised with consecutive seeds.

    Parameters
    ----------
    sizes, activation, output, bias, init, dtype, activation_params, loss
        As for :class:`pipeline.nn.MLP`; shared by every replica.
    seed : int
        Replica ``k`` starts from the weights of ``MLP(..., seed=seed + k)``.
    n_replicas : int
        Number of replicas ``K`` (>= 1).

    Attributes
    ----------
    params, grad : arrays of shape (K * n_params_per_replica,)
        All replicas' parameters (and gradients), stacked as described in the module
        docstring; ``params[:n_weight_params]`` are the weights.
    weights : list of arrays
        Layer 1 ``(fan_in, K, fan_out)``, later layers ``(K, fan_in, fan_out)``; views.
    biases : list of arrays ``(K, fan_out)`` or None
    seeds : list of int
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "relu",
        output: str = "sigmoid",
        bias: bool = True,
        init: str = "xavier_uniform",
        seed: int = 0,
        n_replicas: int = 2,
        dtype: object = np.float64,
        activation_params: dict | None = None,
        loss: str | None = None,
    ) -> None:
        K = _positive_int("n_replicas", n_replicas)
        models = [
            MLP(sizes, activation=activation, output=output, bias=bias, init=init,
                seed=seed + k, dtype=dtype, activation_params=activation_params, loss=loss)
            for k in range(K)
        ]
        self._build(models)

    @classmethod
    def from_models(cls, models: Sequence[MLP]) -> ReplicaMLP:
        """Stack existing networks of one architecture (their parameters are copied)."""
        models = list(models)
        if not models:
            raise ValueError("models: need at least one network to stack")
        first = {k: v for k, v in models[0].get_config().items() if k != "seed"}
        for i, m in enumerate(models[1:], start=1):
            other = {k: v for k, v in m.get_config().items() if k != "seed"}
            if other != first:
                raise ValueError(
                    f"models[{i}] has a different architecture from models[0]: "
                    f"{other} vs {first}"
                )
        self = cls.__new__(cls)
        self._build(models)
        return self

    def _build(self, models: list[MLP]) -> None:
        proto = models[0]
        self.n_replicas = K = len(models)
        self.seeds = [m.seed for m in models]
        self.sizes = list(proto.sizes)
        self.dtype = proto.dtype
        self.hidden_activations = proto.hidden_activations
        self.output_activation = proto.output_activation
        self.bias = proto.bias
        self.loss = proto.loss
        self._config = proto.get_config()
        self.n_params_per_replica = proto.n_params
        self.n_weight_params = K * proto.n_weight_params
        self.params = np.zeros(K * proto.n_params, dtype=self.dtype)
        self.grad = np.zeros_like(self.params)
        self.weights, self.biases = self._views(self.params)
        self._grad_weights, self._grad_biases = self._views(self.grad)
        self._W1, self._grad_W1 = self._first_layer(self.params), self._first_layer(self.grad)
        # _unstack[k] gathers replica k's flat MLP vector from the stacked one.
        positions = np.arange(self.params.size)
        pos_w, pos_b = self._views(positions)
        rows = []
        for k in range(K):
            parts = [pos_w[0][:, k, :].ravel()] + [w[k].ravel() for w in pos_w[1:]]
            if pos_b is not None:
                parts += [b[k] for b in pos_b]
            rows.append(np.concatenate(parts))
        self._unstack = np.stack(rows)
        # Replica index of every stacked parameter, for per-replica learning rates.
        self.replica_of = np.empty(self.params.size, dtype=np.intp)
        self.replica_of[self._unstack] = np.arange(K)[:, None]
        for k, m in enumerate(models):
            self.params[self._unstack[k]] = m.params
        self._workspaces: dict[int, _ReplicaWorkspace] = {}

    def _views(self, flat: Array):
        """Layer-ordered weight and bias views of a stacked flat vector (see module notes)."""
        K, sizes = self.n_replicas, self.sizes
        shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
        weights: list = [None] * len(shapes)
        offset = 0
        for i, (fi, fo) in list(enumerate(shapes))[1:]:
            weights[i] = flat[offset : offset + K * fi * fo].reshape(K, fi, fo)
            offset += K * fi * fo
        fi, fo = shapes[0]
        weights[0] = flat[offset : offset + fi * K * fo].reshape(fi, K, fo)
        offset += fi * K * fo
        if not self.bias:
            return weights, None
        biases = []
        for _, fo in shapes:
            biases.append(flat[offset : offset + K * fo].reshape(K, fo))
            offset += K * fo
        return weights, biases

    def _first_layer(self, flat: Array) -> Array:
        """``[W1; b1]`` (or ``W1`` without biases) as one ``(fan_in [+1], K * fan_out)`` view."""
        fi, fo = self.sizes[0], self.sizes[1]
        start = self.n_weight_params - fi * self.n_replicas * fo
        rows = fi + 1 if self.bias else fi
        return flat[start : start + rows * self.n_replicas * fo].reshape(rows, -1)

    def _augment(self, X: Array) -> Array:
        """``[X, 1]`` (the bias column) for a model with biases, else X itself."""
        if not self.bias:
            return X
        Xa = np.empty((X.shape[0], X.shape[1] + 1), dtype=X.dtype)
        Xa[:, :-1] = X
        Xa[:, -1] = 1.0
        return Xa

    # --------------------------------------------------------------------- per replica

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def n_outputs(self) -> int:
        return self.sizes[-1]

    @property
    def n_classes(self) -> int:
        return max(self.sizes[-1], 2)

    @property
    def activations(self):
        return [*self.hidden_activations, self.output_activation]

    def replica_params(self, k: int) -> Array:
        """Replica ``k``'s parameters in :class:`MLP` layout (a copy)."""
        return self.params[self._unstack[k]]

    def replica_models(self) -> list[MLP]:
        """The K networks as independent :class:`MLP` objects (copies of the parameters)."""
        out = []
        for k, seed in enumerate(self.seeds):
            model = MLP(**{**self._config, "seed": seed})
            model.set_params(self.params[self._unstack[k]])
            out.append(model)
        return out

    def set_replica_params(self, k: int, flat: Array) -> None:
        """Overwrite replica ``k`` from a flat vector in :class:`MLP` layout."""
        self.params[self._unstack[k]] = flat

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_workspaces"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"ReplicaMLP(n_replicas={self.n_replicas}, sizes={self.sizes}, "
            f"seeds={self.seeds[0]}..{self.seeds[-1]}, dtype={self.dtype.name})"
        )

    # ------------------------------------------------------------------------ forward

    def _prototype(self) -> MLP:
        """An MLP of the shared architecture, for its input and target checks."""
        proto = getattr(self, "_proto", None)
        if proto is None:
            proto = self._proto = MLP(**self._config)
        return proto

    def check_input(self, X: Array) -> Array:
        """X as a C-contiguous array of the replicas' dtype, or ValueError."""
        return self._prototype().check_input(X)

    def forward(self, X: Array) -> Array:
        """Outputs of every replica, shape ``(K, n, n_outputs)``."""
        X = self._augment(self.check_input(X))
        ws = _ReplicaWorkspace(self, X.shape[0])
        ws.forward(X)
        return np.ascontiguousarray(ws.A[-1].transpose(1, 0, 2))

    def predict_proba(self, X: Array) -> Array:
        """Class probabilities of every replica, shape ``(K, n, n_classes)``."""
        out = self.forward(X)
        name = self.output_activation.name
        return np.stack([scores_to_proba(o, name, self.loss) for o in out])

    def predict(self, X: Array) -> Array:
        """Class labels of every replica, shape ``(K, n)``."""
        return np.argmax(self.predict_proba(X), axis=2)

    def mean_predict_proba(self, X: Array) -> Array:
        """The replicas' mean class probabilities, shape ``(n, n_classes)``."""
        return self.predict_proba(X).mean(axis=0)

    # ---------------------------------------------------------------------- gradient

    def _workspace(self, n: int) -> _ReplicaWorkspace:
        ws = self._workspaces.get(n)
        if ws is None:
            while len(self._workspaces) >= 4:
                self._workspaces.pop(next(iter(self._workspaces)))
            ws = self._workspaces[n] = _ReplicaWorkspace(self, n)
        return ws

    def _value_and_grad(self, X: Array, T: Array, loss: Loss, compute_value: bool) -> float:
        """Fill ``grad`` for every replica on one batch; returns the mean loss (or NaN).

        ``X`` is the checked input with its bias column (:meth:`_augment`).
        """
        ws = self._workspaces.get(X.shape[0])
        if ws is None:
            ws = self._workspace(X.shape[0])
        ws.forward(X)
        ws.output_delta(T, loss)
        value = float("nan")
        if compute_value:
            value = float(np.mean(ws.losses(T, loss)))
        ws.backward()
        return value


class _ReplicaWorkspace:
    """Preallocated ``(n, K, width)`` buffers for one batch size (see the module notes).

    A layer of one unit per replica (the output of a binary classifier) would make K
    tiny products, or a broadcast outer product that numpy runs 8-10x slower than BLAS.
    Where the sizes are small it is instead one product with a block-diagonal matrix
    ``(K * fan_in, K)`` holding replica k's weight column in rows ``k * fan_in ..``,
    refreshed from the weights each step through a strided view of its diagonal blocks
    (K times the arithmetic, one call instead of K).
    """

    # Largest n * K * K * fan_in for which the block-diagonal product beats K small ones
    # in the forward and weight-gradient products, and beats the broadcast outer
    # product in the propagation (measured on the 2-core machine).
    BLOCK_FORWARD_MACS = 2**18
    BLOCK_PROPAGATE_MACS = 2**21

    def __init__(self, model: ReplicaMLP, n: int) -> None:
        K, dt = model.n_replicas, model.dtype
        widths = model.sizes[1:]
        acts = model.activations
        self.model = model
        self.n = n
        self.Z = [np.empty((n, K, w), dtype=dt) for w in widths]
        self.A: list = [None] + [
            z if act.name == "identity" else np.empty_like(z)
            for z, act in zip(self.Z, acts, strict=True)
        ]
        self.G = [np.empty((n, K, w), dtype=dt) for w in widths]
        self.S = [np.empty((n, K, w), dtype=dt) for w in widths[:-1]]
        self.ones = np.ones(n, dtype=dt)
        self.fwd = [None if a.name == "identity" else (a.forward_into or a.forward_to)
                    for a in acts]
        self.bwd = [None if a.name == "identity" else (a.backward_into or a.backward_to)
                    for a in acts]
        # Per layer 2..L: how its products run.
        self.plan: list = [None]
        for i in range(1, model.n_layers):
            fi, fo = model.sizes[i], model.sizes[i + 1]
            if fo == 1:
                macs = n * K * K * fi
                block = np.zeros((K * fi, K), dtype=dt)
                item = block.itemsize
                diag = as_strided(block, shape=(K, fi), strides=((fi * K + 1) * item, K * item))
                scratch = np.empty((K * fi, K), dtype=dt)
                sdiag = as_strided(scratch, shape=(K, fi),
                                   strides=((fi * K + 1) * item, K * item))
                self.plan.append(("column", block, diag, scratch, sdiag,
                                  macs <= self.BLOCK_FORWARD_MACS,
                                  macs <= self.BLOCK_PROPAGATE_MACS))
            else:
                # Contiguous (K, fan_out, fan_in) copy of W for the propagation: numpy's
                # batched matmul is slow on a transposed right-hand operand.
                self.plan.append(("batched", np.empty((K, fo, fi), dtype=dt)))

    @staticmethod
    def _flat(a: Array) -> Array:
        """(n, K, w) as (n * K, w): rows are one replica's units (softmax per row)."""
        return a.reshape(-1, a.shape[2])

    @staticmethod
    def _wide(a: Array) -> Array:
        """(n, K, w) as (n, K * w): columns line up with a (K, w) bias or a shared W1."""
        return a.reshape(a.shape[0], -1)

    def forward(self, Xa: Array) -> None:
        """Forward pass of every replica on ``Xa`` = ``[X, 1]`` (``X`` without biases)."""
        m = self.model
        self.A[0] = Xa
        wide = self._wide
        for i, W in enumerate(m.weights):
            Z = self.Z[i]
            if i == 0:
                # Shared input, bias folded in: one product for all replicas' layer 1.
                np.dot(Xa, m._W1, out=wide(Z))
            else:
                plan = self.plan[i]
                if plan[0] == "column" and plan[5]:
                    _, block, diag, *_ = plan
                    np.copyto(diag, W[:, :, 0])
                    np.dot(wide(self.A[i]), block, out=wide(Z))
                else:
                    np.matmul(self.A[i].transpose(1, 0, 2), W, out=Z.transpose(1, 0, 2))
                if m.biases is not None:
                    np.add(wide(Z), m.biases[i].reshape(-1), out=wide(Z))
            if self.fwd[i] is not None:
                self.fwd[i](self._flat(Z), self._flat(self.A[i + 1]))

    def output_delta(self, T: Array, loss: Loss) -> None:
        """``G[-1] = dLoss/dZ_L`` for every replica (each a mean over the batch)."""
        out = self.model.output_activation
        Z, A, G = self.Z[-1], self.A[-1], self.G[-1]
        T3 = T[:, None, :]  # broadcast over the replicas
        fused = out.name in loss.fused and loss.fused_delta_into is not None
        if fused and loss.fused_delta_into is _residual_over_n_into:
            np.subtract(A, T3, out=G)
            np.divide(G, self.n, out=G)
        elif fused and loss.fused_delta_into is _ce_delta_into:
            np.multiply(A, T3.sum(axis=2, keepdims=True), out=G)
            np.subtract(G, T3, out=G)
            np.divide(G, self.n, out=G)
        else:
            for k in range(G.shape[1]):
                G[:, k, :] = loss.delta(Z[:, k, :], A[:, k, :], T, out)

    def losses(self, T: Array, loss: Loss) -> Array:
        """Mean loss of each replica on the last forward batch, shape ``(K,)``."""
        Z, A = self.Z[-1], self.A[-1]
        return np.array([loss.value(Z[:, k, :], A[:, k, :], T) for k in range(Z.shape[1])])

    def backward(self) -> None:
        m = self.model
        gW, gb = m._grad_weights, m._grad_biases
        wide = self._wide
        for i in reversed(range(m.n_layers)):
            G = self.G[i]
            if i == 0:
                # Weight and bias gradients of layer 1 for every replica in one product.
                np.dot(self.A[0].T, wide(G), out=m._grad_W1)
                continue
            plan = self.plan[i]
            column = plan[0] == "column"
            if column and plan[5]:
                _, block, diag, scratch, sdiag, *_ = plan
                # Replica k's gradient is the k-th diagonal block of A_wide.T @ G.
                np.dot(wide(self.A[i]).T, wide(G), out=scratch)
                np.copyto(gW[i][:, :, 0], sdiag)
            else:
                np.matmul(self.A[i].transpose(1, 2, 0), G.transpose(1, 0, 2), out=gW[i])
            if gb is not None:
                np.dot(self.ones, wide(G), out=gb[i].reshape(-1))
            W, G_prev = m.weights[i], self.G[i - 1]
            if column:
                _, block, diag, _, _, forward_block, propagate_block = plan
                if propagate_block:
                    if not forward_block:
                        np.copyto(diag, W[:, :, 0])
                    np.dot(wide(G), block.T, out=wide(G_prev))
                else:
                    np.multiply(G, W[:, :, 0], out=G_prev)
            else:
                WT = plan[1]
                np.copyto(WT, W.transpose(0, 2, 1))
                np.matmul(G.transpose(1, 0, 2), WT, out=G_prev.transpose(1, 0, 2))
            rule = self.bwd[i - 1]
            if rule is not None:
                rule(self._flat(self.Z[i - 1]), self._flat(self.A[i]), self._flat(G_prev),
                     self._flat(self.S[i - 1]))


# --------------------------------------------------------------------------- training


@dataclass
class ReplicaHistory(History):
    """:class:`~pipeline.trainer.History` of a replicated run.

    ``metrics`` holds, for every key :func:`~pipeline.trainer.fit` reports
    (``train/loss``, ``test/accuracy``, ``grad_norm/layer_1``, ...), the mean across
    replicas under the same key and the standard deviation under ``key + "/std"``.
    ``replicas[k]`` is replica ``k``'s own :class:`History` with fit()'s keys exactly.
    """

    replicas: list[History] = field(default_factory=list)

    def final_table(self) -> list[dict[str, float]]:
        """Each replica's last metrics, one row per replica (``replica`` and ``seed``)."""
        return [{"replica": k, **h.last()} for k, h in enumerate(self.replicas)]


def fit_replicas(
    model: ReplicaMLP,
    X: Array,
    y: Array,
    *,
    loss: str | Loss,
    optimizer: Optimizer | str,
    epochs: int,
    batch_size: int | None = None,
    seed: int = 0,
    learning_rates: Sequence[float] | None = None,
    X_val: Array | None = None,
    y_val: Array | None = None,
    callbacks: Iterable[Callback] = (),
    eval_every: int = 1,
    patience: int | None = None,
    restore_best: bool = True,
    diagnostics: bool = True,
    threads: int | str | None = "auto",
) -> ReplicaHistory:
    """Train every replica of ``model`` in place, in one vectorised pass per batch.

    Takes :func:`pipeline.trainer.fit`'s arguments, with these differences:

    Parameters
    ----------
    model : ReplicaMLP
    seed : int
        Seeds the batch order, shared by all replicas (the replicas differ by their
        initial weights): replica ``k`` follows ``fit(MLP(..., seed=model.seeds[k]), ...,
        seed=seed)``.
    learning_rates : sequence of float, optional
        One base learning rate per replica (each follows the optimiser's schedule);
        default: the optimiser's ``lr`` for all.
    patience : int, optional
        Early stopping on the mean validation loss across replicas.

    Returns
    -------
    ReplicaHistory
        Mean and spread of every metric, plus each replica's own history. Callbacks get
        the same dict as ``history.metrics`` rows: means under fit()'s keys, spreads
        under ``key + "/std"``.
    """
    loss = get_loss(loss)
    loss.check_output(model.output_activation.name, model.n_outputs)
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer)
    epochs = _positive_int("epochs", epochs)
    eval_every = _positive_int("eval_every", eval_every)
    if patience is not None:
        patience = _positive_int("patience", patience)
    K = model.n_replicas
    schedules = None
    if learning_rates is not None:
        rates = list(learning_rates)
        if len(rates) != K:
            raise ValueError(
                f"learning_rates: {len(rates)} given for {K} replicas; give one per replica"
            )
        schedules = [
            make_schedule(optimizer.schedule, lr, **optimizer.schedule_params) for lr in rates
        ]

    proto = model._prototype()
    X, T, labels, batch, val = prepare_inputs(proto, X, y, batch_size, X_val, y_val, patience)
    n = X.shape[0]
    has_val = val is not None
    if has_val:
        X_val, T_val, labels_val = val

    callbacks = list(callbacks)
    optimizer.bind(model.params.size, model.n_weight_params, model.dtype)
    rng = np.random.default_rng(seed)
    history = ReplicaHistory(replicas=[History() for _ in range(K)])
    best_loss, best_params, stale = np.inf, None, 0
    n_batches = -(-n // batch)
    previous = np.empty_like(model.params) if diagnostics else None
    Xa = model._augment(X)
    Xa_val = model._augment(X_val) if has_val else None
    epoch_batches = _ShuffledViews(Xa, T, batch, rng)
    params, grad = model.params, model.grad
    value_and_grad = model._value_and_grad
    # Thread choice as for one network whose layers are K times wider.
    widths = [model.sizes[0]] + [K * w for w in model.sizes[1:]]
    # As in fit(): with full batches the loss of an unevaluated epoch comes nearly free
    # with the next step, so divergence is dated the same whatever eval_every.
    check_unevaluated = batch == n and eval_every > 1 and not _logit_loss(loss)
    evaluated_last = True
    with blas_threads(_resolve_threads(threads, batch, widths)):
        for epoch in range(1, epochs + 1):
            optimizer.set_epoch(epoch)
            lrs = np.full(K, optimizer.current_lr)
            if schedules is not None:
                lrs = np.array([s(epoch) for s in schedules])
                optimizer.current_lr = lrs.astype(model.dtype)[model.replica_of]
            evaluate_now = epoch % eval_every == 0 or epoch == epochs
            check_loss = check_unevaluated and not evaluated_last
            evaluated_last = evaluate_now
            for k, (xb, tb) in enumerate(epoch_batches()):
                if check_loss:
                    value = value_and_grad(xb, tb, loss, True)
                    if not np.isfinite(value):
                        raise DivergenceError(epoch - 1, f"loss became {value}")
                else:
                    value_and_grad(xb, tb, loss, False)
                if evaluate_now and diagnostics and k == n_batches - 1:
                    previous[...] = params
                optimizer.step(params, grad)
            if not np.all(np.isfinite(params)):
                bad = np.unique(model.replica_of[~np.isfinite(params)])
                raise DivergenceError(
                    epoch, f"parameters of replica(s) {bad.tolist()} became non-finite"
                )
            if not evaluate_now:
                continue

            per = _replica_metrics(model, Xa, T, labels, loss, lrs, diagnostics, previous,
                                   (Xa_val, T_val, labels_val) if has_val else None)
            bad = [k for k in range(K) if not np.isfinite(per["train/loss"][k])]
            if bad:
                raise DivergenceError(epoch, f"loss of replica(s) {bad} became non-finite")
            for k, h in enumerate(history.replicas):
                h.append(epoch, {key: float(v[k]) for key, v in per.items()})
            summary: dict[str, float] = {}
            for key, values in per.items():
                summary[key] = float(np.mean(values))
            for key, values in per.items():
                summary[f"{key}/std"] = float(np.std(values))
            history.append(epoch, summary)

            stop = False
            if has_val:
                if summary["test/loss"] < best_loss:
                    best_loss, stale = summary["test/loss"], 0
                    history.best_epoch = epoch
                    if patience is not None and restore_best:
                        best_params = params.copy()
                else:
                    stale += 1
                    stop = patience is not None and stale >= patience
            for callback in callbacks:
                try:
                    callback(epoch, summary)
                except StopTraining:
                    stop = True
            if stop and epoch < epochs:
                history.stopped_early = True
                break

    if best_params is not None:
        params[...] = best_params
    return history


def _replica_metrics(model, X, T, labels, loss, lrs, diagnostics, previous, val):
    """fit()'s metrics for every replica: ``{key: array of K values}``."""
    K = model.n_replicas
    out_name = model.output_activation.name
    ws = model._workspace(X.shape[0])
    ws.forward(X)
    per: dict[str, Array] = {}
    per["train/loss"] = ws.losses(T, loss)
    A = ws.A[-1]
    per["train/accuracy"] = np.array([
        np.mean(np.argmax(scores_to_proba(A[:, k, :], out_name, loss.name), axis=1) == labels)
        for k in range(K)
    ])
    fractions = _unit_fractions(model, ws.A) if diagnostics else {}
    if val is not None:
        X_val, T_val, labels_val = val
        wv = model._workspace(X_val.shape[0])
        wv.forward(X_val)
        per["test/loss"] = wv.losses(T_val, loss)
        Av = wv.A[-1]
        per["test/accuracy"] = np.array([
            np.mean(np.argmax(scores_to_proba(Av[:, k, :], out_name, loss.name), axis=1)
                    == labels_val)
            for k in range(K)
        ])
    per["lr"] = np.asarray(lrs, dtype=np.float64)
    if diagnostics:
        grad_norms = _layer_norms(model, model.grad)
        update_norms = _layer_norms(model, model.params - previous)
        weight_norms = _layer_norms(model, model.params)
        for i, (g, u, w) in enumerate(zip(grad_norms, update_norms, weight_norms,
                                          strict=True), start=1):
            per[f"grad_norm/layer_{i}"] = g
            per[f"update_ratio/layer_{i}"] = np.where(w > 0, u / np.where(w > 0, w, 1.0), 0.0)
        per.update(fractions)
    return per


def _layer_norms(model: ReplicaMLP, flat: Array) -> list[Array]:
    """Per layer, the Euclidean norm of each replica's weights and biases, ``(K,)``."""
    weights, biases = model._views(flat)
    norms = []
    for i, W in enumerate(weights):
        axes = (0, 2) if i == 0 else (1, 2)
        sq = np.sum(np.square(W, dtype=np.float64), axis=axes)
        if biases is not None:
            sq = sq + np.sum(np.square(biases[i], dtype=np.float64), axis=1)
        norms.append(np.sqrt(sq))
    return norms


def _unit_fractions(model: ReplicaMLP, As: list[Array]) -> dict[str, Array]:
    """Dead and saturated unit fractions per hidden layer and replica (as fit() does)."""
    out: dict[str, Array] = {}
    for i, act in enumerate(model.hidden_activations, start=1):
        a = As[i]  # (n, K, h)
        if act.family == "relu":
            out[f"dead_fraction/layer_{i}"] = np.mean(np.all(a <= 0, axis=0), axis=1)
        elif act.family == "saturating":
            if act.name == "tanh":
                deriv, peak = 1.0 - a * a, 1.0
            else:
                deriv, peak = a * (1.0 - a), 0.25
            out[f"saturated_fraction/layer_{i}"] = np.mean(
                deriv < SATURATION_THRESHOLD * peak, axis=(0, 2)
            )
    return out


def replicas_from_config(model: MLP, n_replicas: int) -> ReplicaMLP:
    """K replicas of ``model``'s architecture, seeds ``model.seed .. model.seed + K - 1``.

    Replica 0 starts from ``model``'s current parameters, so a replicated run's first
    replica is the run that ``replicas=1`` would make.
    """
    config = model.get_config()
    seed = config.pop("seed")
    replicas = ReplicaMLP(seed=seed, n_replicas=n_replicas, **config)
    replicas.set_replica_params(0, model.params)
    return replicas
