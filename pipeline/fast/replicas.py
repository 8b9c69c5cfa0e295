"""Many networks per run: K replicas of one architecture trained side by side.

A small network trained once says little: another seed can move its accuracy by
several points. ``pipeline.fast.fit_replicas`` trains ``K`` independently initialised copies
(seeds ``seed .. seed + K - 1``, optionally one learning rate each) on the same data, in
one vectorised pass, so that a run reports the mean and the spread of every metric.

The replicas' parameters are stacked in one flat vector, weights first, then biases
(so weight decay still touches exactly ``params[:n_weight_params]``): layer 1's weights
as ``(fan_in, K, fan_out)`` (stored last among the weights), layers 2..L as
``(K, fan_in, fan_out)``, each layer's biases as ``(K, fan_out)``.

A step works on a *packed* copy of that vector, ``P = params[order]``
(:meth:`ReplicaMLP._packed_order`), one block per layer holding weights and biases
together, as the products want them:

- layer 1 as ``[W1; b1].T`` of shape ``(fan_out * K, fan_in + 1)``, row ``j * K + k``
  holding unit ``j`` of replica ``k``: the input is shared, so
  ``[W1; b1].T @ [X, 1].T`` is ONE product giving layer 1 of every replica with its
  bias, and ``delta_1 @ [X, 1]`` every replica's weight and bias gradient;
- layers 2..L as ``(K, fan_in + 1, fan_out)``, replica ``k``'s ``[W_l; b_l]``: one
  batched product over the replicas.

Values are units-major, as in :class:`pipeline.fast.workspace.Workspace`: a layer's values are one
C-ordered ``(width, K, n)`` array (unit, replica, sample), and a layer's input carries
its row of ones (the bias) as ``(width + 1, K, n)``, the ones last, so its values are
one contiguous block. Every elementwise step (activation, derivative) is then one numpy
call on contiguous memory for all replicas, and the optimiser updates all of them in
one call per operation. On small networks a step costs its number of numpy calls, not
its arithmetic, so K replicas cost far less than K runs.

One optimiser state covers every replica; its update is elementwise, so each replica
follows exactly the trajectory it would follow trained alone by :func:`pipeline.engine.loop.fit`
with the same initial seed and the same batch order (``fit(..., seed=seed)``), up to
floating-point rounding of the stacked products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from pipeline.engine.loop import (
    SATURATION_THRESHOLD,
    DivergenceError,
    History,
    Stepper,
    all_finite,
)
from pipeline.engine.losses import Loss, scores_to_proba
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import OPTIMIZERS, Optimizer, make_schedule
from pipeline.fast.compile import DEFINED_STEP, Observer, ShuffledViews
from pipeline.fast.kernels import backward_program, const, forward_program, fused_delta_kind
from pipeline.fast.workspace import arena, assign

Array = np.ndarray

__all__ = ["ReplicaHistory", "ReplicaMLP", "ReplicaStepper", "replicas_from_config"]

# Hidden activations whose forward program may run in place (``z`` is ``out``) and whose
# backward rule reads only the output: their layer keeps no separate pre-activation.
_IN_PLACE = ("identity", "relu", "sigmoid", "tanh")


class ReplicaMLP:
    """``n_replicas`` MLPs of one architecture, initialised with consecutive seeds.

    Parameters
    ----------
    sizes, activation, output, bias, init, dtype, activation_params, loss
        As for :class:`pipeline.engine.mlp.MLP`; shared by every replica.
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
        if isinstance(n_replicas, bool) or not isinstance(n_replicas, (int, np.integer)) or (
            n_replicas < 1
        ):
            raise ValueError(f"n_replicas={n_replicas!r}: must be an integer >= 1")
        K = int(n_replicas)
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
        # The packed copy the workspaces' products read, and the gradient they write in
        # the same order (see the module notes).
        self._order = self._packed_order()
        # The inverse permutation by a scatter (argsort took 1.4 ms of building config 5).
        self._inverse = np.empty_like(self._order)
        self._inverse[self._order] = np.arange(self._order.size)
        self._P = np.empty_like(self.params)
        self._dP = np.empty_like(self.params)
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

    def _packed_order(self) -> Array:
        """The permutation ``order`` with ``params[order]`` packed layer by layer.

        Layer 1's block is ``[W1; b1].T`` as ``(fan_out, K, fan_in + 1)`` (row-major, so
        ``(fan_out * K, fan_in + 1)`` with replica ``k``'s unit ``j`` in row
        ``j * K + k``), every later layer's ``(K, fan_in + 1, fan_out)``, replica ``k``'s
        ``[W_l; b_l]`` (without biases, the same blocks without their bias row or column).
        """
        pos_w, pos_b = self._views(np.arange(self.params.size))
        parts = []
        for i, W in enumerate(pos_w):
            if i == 0:
                block = W.transpose(2, 1, 0)
                if pos_b is not None:
                    block = np.concatenate([block, pos_b[0].T[:, :, None]], axis=2)
            else:
                block = W
                if pos_b is not None:
                    block = np.concatenate([block, pos_b[i][:, None, :]], axis=1)
            parts.append(block.ravel())
        return np.concatenate(parts)

    def _norm_bins(self) -> Array:
        """For every value of the flat vector, ``layer * K + replica``: the bin whose
        weights and biases :func:`_layer_norms` adds it to."""
        bins = getattr(self, "_bins", None)
        if bins is None:
            K = self.n_replicas
            bins = np.empty(self.params.size, dtype=np.intp)
            weights, biases = self._views(bins)
            for i, W in enumerate(weights):
                replica_axis = 1 if i == 0 else 0
                shape = [1, 1, 1]
                shape[replica_axis] = K
                W[...] = i * K + np.arange(K).reshape(shape)
                if biases is not None:
                    biases[i][...] = i * K + np.arange(K)[:, None]
            self._bins = bins
        return bins

    def _blocks(self, flat: Array) -> list[Array]:
        """The per-layer blocks of a packed vector (see :meth:`_packed_order`), as views."""
        K, extra = self.n_replicas, int(self.bias)
        blocks, offset = [], 0
        for i, (fi, fo) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True)):
            shape = (fo * K, fi + extra) if i == 0 else (K, fi + extra, fo)
            size = (fi + extra) * fo * K
            blocks.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return blocks

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
        state.pop("_bins", None)  # rebuilt on demand
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

    def encode_targets(self, y: Array, n_samples: int | None = None) -> Array:
        """Labels or targets as an ``(n_samples, n_outputs)`` matrix (see MLP's)."""
        return self._prototype().encode_targets(y, n_samples)

    def set_params(self, flat: Array) -> None:
        """Copy a stacked parameter vector (the layout of ``params``) into the replicas."""
        flat = np.asarray(flat)
        if flat.shape != self.params.shape:
            raise ValueError(
                f"parameter vector has shape {flat.shape}; these replicas need "
                f"{self.params.shape}"
            )
        self.params[...] = flat

    # Rows per block of an evaluation pass: K * rows * width values per buffer stay in
    # the cache (10,000 rows, K=8, forward passes only: configuration 3 5.6 -> 3.4 ms,
    # 5 17.7 -> 12.1 ms, measured with blocks of 256 to 10,000 rows).
    EVAL_BLOCK_VALUES = 2**17

    def _outputs(self, X: Array) -> tuple[Array, Array]:
        """Output pre-activations and activations of every replica on checked ``X``,
        ``(n_outputs, K, n)`` each, from ``params``, computed block by block of rows.

        With one block the arrays are the workspace's, valid until its next pass.
        """
        np.take(self.params, self._order, out=self._P, mode="clip")
        n = X.shape[0]
        rows = max(64, self.EVAL_BLOCK_VALUES // (self.n_replicas * max(self.sizes[1:])))
        Z = A = None
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            ws = self._workspace(stop - start)
            ws.forward(X[start:stop])
            if stop - start == n:
                return ws.Z[-1], ws.A[-1]
            if Z is None:
                Z = np.empty((self.n_outputs, self.n_replicas, n), dtype=self.dtype)
                A = Z if ws.A[-1] is ws.Z[-1] else np.empty_like(Z)
            Z[:, :, start:stop] = ws.Z[-1]
            if A is not Z:
                A[:, :, start:stop] = ws.A[-1]
        if Z is None:  # no rows
            Z = A = np.empty((self.n_outputs, self.n_replicas, 0), dtype=self.dtype)
        return Z, A

    def forward(self, X: Array) -> Array:
        """Outputs of every replica, shape ``(K, n, n_outputs)``."""
        return np.ascontiguousarray(self._outputs(self.check_input(X))[1].transpose(1, 2, 0))

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
            # Training batches and their remainder, evaluation blocks and theirs.
            while len(self._workspaces) >= 8:
                self._workspaces.pop(next(iter(self._workspaces)))
            ws = self._workspaces[n] = _ReplicaWorkspace(self, n)
        return ws

    def _augment(self, X: Array) -> Array:
        """``[X, 1]`` (the bias column) for a model with biases, else X itself."""
        if not self.bias:
            return X
        Xa = np.empty((X.shape[0], X.shape[1] + 1), dtype=X.dtype)
        Xa[:, :-1] = X
        Xa[:, -1] = 1.0
        return Xa

    def _value_and_grad(self, Xa: Array, T: Array, loss: Loss, compute_value: bool) -> float:
        """Fill ``grad`` for every replica on one batch; returns the mean loss (or NaN).

        ``Xa`` is the checked input with its bias column (:meth:`_augment`), ``T`` the
        encoded targets (:func:`pipeline.engine.loop.prepare_inputs`).
        """
        ws = self._workspace(Xa.shape[0])
        np.take(self.params, self._order, out=self._P, mode="clip")
        value = ws.value_and_grad(Xa, T, loss, compute_value)
        np.take(self._dP, self._inverse, out=self.grad, mode="clip")
        return value


def _cols(a: Array) -> Array:
    """A ``(w, K, n)`` array as the column-major ``(K * n, w)`` view the activation and
    loss programs of a single network take (rows are samples of one replica)."""
    return a.reshape(a.shape[0], -1).T


class _ReplicaWorkspace:
    """Units-major buffers and bound step programs of every replica for ``n``-row batches.

    Layer ``l``'s values are ``(w_l, K, n)`` C-ordered arrays; its input ``[A_{l-1}; 1]``
    is ``(w_{l-1} + 1, K, n)`` with the ones last, ``A_{l-1}`` its first rows (see the
    module notes). The products read the packed blocks of ``model._P`` and write the
    gradient into those of ``model._dP``:

    - layer 1: ``Z_1 (w_1 * K, n) = [W_1; b_1].T @ [X, 1].T`` and
      ``[dW_1; db_1].T = delta_1 @ [X, 1]``, one ``np.dot`` each; ``[X, 1]`` is kept
      row-major, which the gradient product needs to run at speed (13.5 instead of
      80 us for 8 x 64 units on 256 rows, where BLAS would read ``[X, 1].T`` with a
      stride of 256 values);
    - layers 2..L: ``np.matmul`` batched over the replicas (its operands are strided
      views; BLAS takes them as they are), for the forward product, the weight gradient
      and the propagation ``delta_{l-1} = W_l @ delta_l``;
    - the propagation through a one-unit output layer is K outer products
      ``w_k delta_k^T``, which a batched matmul with an inner dimension of 1 runs on
      numpy's slow loop (19 us for 8 x (32, 1) @ (1, 64)). Padded to an inner
      dimension of 2, BLAS runs it: the output delta is the first half of a zero
      ``(2, K, n)`` array and the weights are copied each step into column 0 of a zero
      ``(K, fan_in, 2)`` one (K=8: 2.4 us at fan_in=32, n=64; 4.0 for the
      ``(fan_in * K, K)`` product with replica k's weights in column k it replaces,
      6.2 for a broadcast multiply; 9.9 vs 25 us for the broadcast at fan_in=16,
      n=1000). A hidden one-unit layer, whose delta its activation rule needs
      contiguous, takes the broadcast multiply.

    As in :class:`pipeline.fast.workspace.Workspace` every numpy call of a step is bound once
    (:meth:`train_program`) and a hidden relu, sigmoid or tanh layer runs in place.
    """

    # These sized the block-diagonal products of a one-unit layer, now retired: batched
    # matmuls on the units-major layout beat them at every size measured (forward 3.8
    # vs 6.5 us at fan_in=3, n=1000, 7 vs 34 us at fan_in=16; propagation above).
    # Kept, without effect, for code that still sets them.
    BLOCK_FORWARD_MACS = 0
    BLOCK_PROPAGATE_MACS = 0

    def __init__(self, model: ReplicaMLP, n: int) -> None:
        K, dt, extra = model.n_replicas, model.dtype, int(model.bias)
        sizes, acts = model.sizes, model.activations
        widths, L = sizes[1:], len(sizes) - 1
        # The model's parts, not the model: a workspace held by its model must not hold
        # it back (a reference cycle would keep large buffers alive until a gc pass).
        self.n, self.K, self.dtype, self.sizes, self.acts = n, K, dt, sizes, acts
        self.blocks, self.grad_blocks = model._blocks(model._P), model._blocks(model._dP)
        in_place = [i < L - 1 and act.name in _IN_PLACE for i, act in enumerate(acts)]
        out_identity = acts[-1].name == "identity"
        # Inputs of layers 2..L, own pre-activations, then the output.
        shapes = [w + extra for w in widths[:-1]]
        shapes += [widths[i] for i in range(L) if not in_place[i]]
        shapes += [] if out_identity else [widths[-1]]
        bufs = [b.T.reshape(b.shape[1], K, n) for b in arena(self, K * n, shapes, dt)]
        # The shared input [X, 1] row-major for the weight gradient of layer 1, and
        # units-major (its transpose, C-ordered) for the forward product, which reads it
        # 1.3-1.5x faster than the transposed view (see train_program).
        self.x0 = np.empty((n, sizes[0] + extra), dtype=dt)
        self.x0T = np.empty((sizes[0] + extra, n), dtype=dt)
        self.x0[:, sizes[0] :] = 1.0
        self.x0T[sizes[0] :] = 1.0
        self.Ain: list = [None] + bufs[: L - 1]
        for a, w in zip(self.Ain[1:], widths[:-1], strict=True):
            a[w:] = 1.0
        spare = iter(bufs[L - 1 :])
        self.Z, self.A = [], [None]
        for i, w in enumerate(widths):
            a = self.Ain[i + 1][:w] if i < L - 1 else None
            z = a if in_place[i] else next(spare)
            if i == L - 1:
                a = z if out_identity else next(spare)
            self.Z.append(z)
            self.A.append(a)
        self.forward_ops = self._forward_ops(self.x0T)
        self.G = None  # the backward buffers, built with the first step
        self._programs: dict = {}
        self._middle = None

    def _forward_ops(self, xT: Array) -> list:
        """The forward pass's calls on the input ``xT = [X, 1].T`` (``(fan_in + 1, n)``)."""
        n, ops = self.n, []
        for i, act in enumerate(self.acts):
            Z = self.Z[i]
            if i == 0:
                ops.append(partial(np.dot, self.blocks[0], xT, Z.reshape(-1, n)))
            else:
                ops.append(partial(np.matmul, self.blocks[i].transpose(0, 2, 1),
                                   self.Ain[i].transpose(1, 0, 2), Z.transpose(1, 0, 2)))
            if act.name != "identity":
                ops += forward_program(act, _cols(Z), _cols(self.A[i + 1]))
        return ops

    def _grad_buffers(self) -> None:
        K, n, widths = self.K, self.n, self.sizes[1:]
        # One scratch for the hidden layers' backward rules, which run one at a time.
        ruled = [w for w, act in zip(widths[:-1], self.acts[:-1], strict=True)
                 if act.name != "identity"]
        # A one-unit output layer's delta is the first half of a zero (2, K, n) array,
        # the padded operand of its propagation (see the class notes); contiguous, so
        # that the output gradient's calls run on contiguous memory.
        padded = len(widths) > 1 and widths[-1] == 1
        shapes = [*(widths[:-1] if padded else widths), max(ruled, default=1)]
        bufs = arena(self, K * n, shapes, self.dtype)
        self.G = [b.T.reshape(b.shape[1], K, n) for b in bufs[:-1]]
        self.scratch = bufs[-1].reshape(-1, order="F")
        self.G_padded = None
        if padded:
            self.G_padded = np.zeros((2, K, n), dtype=self.dtype)
            self.G.append(self.G_padded[:1])
        self.t0 = np.empty((n, widths[-1]), dtype=self.dtype)  # targets of a copied batch
        self.rows = np.empty(n, dtype=self.dtype)  # the targets' row sums (cross-entropy)

    def _backward_ops(self, x: Array) -> list:
        """The backward pass's calls, from ``G[-1]`` to the packed gradient ``model._dP``."""
        if self.G is None:
            self._grad_buffers()
        K, n, sizes, acts = self.K, self.n, self.sizes, self.acts
        ops = []
        for i in reversed(range(len(sizes) - 1)):
            G = self.G[i]
            if i == 0:
                ops.append(partial(np.dot, G.reshape(-1, n), x, self.grad_blocks[0]))
                continue
            ops.append(partial(np.matmul, self.Ain[i].transpose(1, 0, 2), G.transpose(1, 2, 0),
                               self.grad_blocks[i]))
            fi, fo = sizes[i], sizes[i + 1]
            W, G_prev = self.blocks[i][:, :fi, :], self.G[i - 1]
            if fo > 1:
                ops.append(partial(np.matmul, W, G.transpose(1, 0, 2), G_prev.transpose(1, 0, 2)))
            elif i == len(sizes) - 2:
                W_padded = np.zeros((K, fi, 2), dtype=self.dtype)
                ops += [assign(W_padded[:, :, 0], W[:, :, 0]),
                        partial(np.matmul, W_padded, self.G_padded.transpose(1, 0, 2),
                                G_prev.transpose(1, 0, 2))]
            else:
                ops.append(partial(np.multiply, W[:, :, 0].T[:, :, None], G, G_prev))
            act = acts[i - 1]
            if act.name != "identity":
                S = self.scratch[: fi * K * n].reshape((K * n, fi), order="F")
                ops += backward_program(act, _cols(self.Z[i - 1]), _cols(self.A[i]),
                                        _cols(G_prev), S)
        return ops

    def _delta_ops(self, loss: Loss, T: Array) -> list:
        """``G[-1] = dLoss/dZ_L`` for every replica (each a mean over the batch) for the
        targets ``T`` (``(n, n_outputs)``)."""
        if self.G is None:
            self._grad_buffers()
        out = self.acts[-1]
        Z, A, G, t = self.Z[-1], self.A[-1], self.G[-1], T.T
        T3 = t[:, None, :]  # broadcast over the replicas
        n = const(self.n, self.dtype)
        kind = fused_delta_kind(loss, out)
        # The single network's fused deltas (kernels.py), in the same order of operations.
        if kind == "residual_over_n":
            return [partial(np.subtract, A, T3, G), partial(np.divide, G, n, G)]
        if kind == "cross_entropy":
            rows = self.rows
            sums = [partial(np.add, t[0], t[1], rows)] + [
                partial(np.add, rows, t[j], rows) for j in range(2, t.shape[0])]
            return [*sums, partial(np.multiply, A, rows, G), partial(np.subtract, G, T3, G),
                    partial(np.divide, G, n, G)]

        def general() -> None:
            for k in range(self.K):
                G[:, k, :] = loss.delta(Z[:, k, :].T, A[:, k, :].T, T, out).T

        return [general]

    def forward(self, X: Array) -> None:
        """Forward pass of every replica on ``X`` (without its ones column) from the
        packed parameters ``model._P``."""
        self.x0T[: X.shape[1]] = X.T
        for op in self.forward_ops:
            op()

    def value_and_grad(self, Xa: Array, T: Array, loss: Loss, compute_value: bool) -> float:
        """Forward and backward pass on ``Xa = [X, 1]`` into ``model._dP``; the mean loss
        across replicas (or NaN)."""
        self.x0[...] = Xa
        self.x0T[...] = Xa.T
        if self.G is None:
            self._grad_buffers()
        self.t0[...] = T
        key = (loss, None)
        ops = self._programs.get(key)
        if ops is None:
            ops = self._programs[key] = [*self.forward_ops, *self._delta_ops(loss, self.t0),
                                         *self._backward_ops(self.x0)]
        for op in ops:
            op()
        return float(np.mean(self.losses(self.t0, loss))) if compute_value else float("nan")

    def losses(self, T: Array, loss: Loss) -> Array:
        """Mean loss of each replica on the last forward batch, shape ``(K,)``."""
        Z, A = self.Z[-1], self.A[-1]
        return np.array([loss.value(Z[:, k, :].T, A[:, k, :].T, T) for k in range(self.K)])

    def outputs(self, k: int) -> Array:
        """Replica ``k``'s outputs on the last forward batch, ``(n, n_outputs)``, a view."""
        return self.A[-1][:, k, :].T

    def train_program(self, Xa: Array, XaT: Array, T: Array, loss: Loss, update: list,
                      pack: list, unpack: list, observe: Callable[[], object] | None = None,
                      ) -> Callable[[], None]:
        """One training step on a batch as a call running one list of bound calls.

        The batch is fixed arrays (views of the epoch's shuffled copies, see
        :class:`_ShuffledInputs`): ``Xa = [X, 1]``, its units-major ``XaT`` (a view of the
        transposed copy, rows n apart) and ``T``. The products read them where they are,
        so a step copies nothing (copying 1,000 rows of X into ``[X, 1]`` took 5 us), and
        layer 1's forward product reads ``XaT`` (configuration 3: 2.7 instead of 3.6 us
        from ``Xa.T``; 3.2 instead of 5.7 on 1,000 rows of configuration 2). ``pack``
        fills ``model._P`` before the forward pass and ``unpack`` reads ``model._dP``
        after the backward pass (both empty when the optimiser steps on the packed copy
        itself); ``update`` is the optimiser's program. ``observe``, if given, is called
        between the forward and the backward pass.
        """
        # Only the first and last products and the output gradient depend on the batch:
        # the rest is bound once per workspace (binding 157 steps afresh took 5 ms).
        if self._middle is None:
            forward, backward = self._forward_ops(XaT), self._backward_ops(Xa)
            self._middle = (forward[1:], backward[:-1])
        forward, backward = self._middle
        ops = [*pack, partial(np.dot, self.blocks[0], XaT, self.Z[0].reshape(-1, self.n)),
               *forward, *([] if observe is None else [observe]), *self._delta_ops(loss, T),
               *backward,
               partial(np.dot, self.G[0].reshape(-1, self.n), Xa, self.grad_blocks[0]),
               *unpack, *update]

        def run() -> None:
            for op in ops:
                op()

        # The ops hold views of this workspace's memory: the workspace must outlive them
        # (its memory goes back to the spare blocks when it is collected).
        run.workspace = self  # type: ignore[attr-defined]
        return run


# --------------------------------------------------------------------------- training


@dataclass
class ReplicaHistory(History):
    """:class:`~pipeline.engine.loop.History` of a replicated run.

    ``metrics`` holds, for every key :func:`~pipeline.engine.loop.fit` reports
    (``train/loss``, ``test/accuracy``, ``grad_norm/layer_1``, ...), the mean across
    replicas under the same key and the standard deviation under ``key + "/std"``.
    ``replicas[k]`` is replica ``k``'s own :class:`History` with fit()'s keys exactly.
    """

    replicas: list[History] = field(default_factory=list)

    def final_table(self, epoch: int | None = None) -> list[dict[str, float]]:
        """Each replica's last metrics (or those of ``epoch``), one row per replica."""
        return [{"replica": k, **(h.last() if epoch is None else h.at(epoch))}
                for k, h in enumerate(self.replicas)]


class _ReplicaRecord:
    """The replicas' outputs (and hidden values) of one epoch's forward passes, as
    :class:`pipeline.engine.loop.OutputRecord` keeps them for one network: units-major,
    ``(width, K, n)``. An epoch of one step has its hidden values counted at once
    (:class:`_UnitFractions`) instead of kept."""

    def __init__(self, model: ReplicaMLP, n: int, hidden: bool) -> None:
        K, dt = model.n_replicas, model.dtype
        self.model, self.n, self.hidden = model, n, hidden
        self.z = np.empty((model.n_outputs, K, n), dtype=dt)
        self.a = np.empty_like(self.z)
        self.kept: list[Array] | None = None
        self.fractions: _UnitFractions | None = None

    def add(self, start: int, z: Array, a: Array, hidden: Sequence[Array] = ()) -> None:
        stop = start + z.shape[2]
        self.z[:, :, start:stop] = z
        self.a[:, :, start:stop] = a
        if not self.hidden:
            return
        if stop - start == self.n:
            self.fractions = _UnitFractions(self.model)
            self.fractions.add([None, *hidden, a])
            return
        if self.kept is None:
            K, dt = self.model.n_replicas, self.model.dtype
            self.kept = [np.empty((w, K, self.n), dtype=dt) for w in self.model.sizes[1:-1]]
        for kept, values in zip(self.kept, hidden, strict=True):
            kept[:, :, start:stop] = values

    def unit_fractions(self) -> dict[str, Array]:
        if self.kept is None:
            return self.fractions.result()
        fractions = _UnitFractions(self.model)
        fractions.add([None, *self.kept, self.a])
        return fractions.result()


class ReplicaStepper(Stepper):
    """The steps of every replica of a :class:`ReplicaMLP` at once, for
    :func:`pipeline.engine.loop.fit`.

    Each batch's step is one list of bound calls (:meth:`_ReplicaWorkspace.
    train_program`) ending with the optimiser's. A built-in optimiser without penalties
    updates every parameter alike, so it steps on the packed copy ``model._P`` and its
    gradient ``model._dP`` directly, with its state (and a per-parameter learning rate)
    permuted alike while the copy is in use; :meth:`sync` puts everything back in the
    model's order. Any other optimiser steps on ``params`` and ``grad``, packed and
    unpacked around the products every step (two ``take`` calls).

    The metrics are arrays of one value per replica; :meth:`record` keeps each
    replica's own history and hands callbacks their mean and spread.

    Parameters
    ----------
    learning_rates : sequence of float, optional
        One base learning rate per replica (each follows the optimiser's schedule);
        default: the optimiser's ``lr`` for all.
    """

    def __init__(self, model: ReplicaMLP, loss: Loss, optimizer: Optimizer, batch_size: int,
                 learning_rates: Sequence[float] | None = None) -> None:
        super().__init__(model, loss, optimizer, batch_size)
        K = model.n_replicas
        self.schedules = None
        if learning_rates is not None:
            rates = list(learning_rates)
            if len(rates) != K:
                raise ValueError(
                    f"learning_rates: {len(rates)} given for {K} replicas; give one per replica"
                )
            self.schedules = [make_schedule(optimizer.schedule, lr, **optimizer.schedule_params)
                              for lr in rates]
        self.data: Array | None = None
        self.in_use = False
        self.records: dict[bool, _ReplicaRecord] = {}
        self.observer = Observer()

    def _bind(self, X: Array, T: Array, labels: Array) -> None:
        model, optimizer = self.model, self.optimizer
        self.batches = _ShuffledInputs(model._augment(X), T, labels, self.batch_size)
        own_step = type(optimizer).step is not DEFINED_STEP
        self.packed = (not own_step and type(optimizer) in OPTIMIZERS.values()
                       and optimizer._uniform)
        params, grad = (model._P, model._dP) if self.packed else (model.params, model.grad)
        pack, unpack = [], []
        if not self.packed:
            pack = [partial(np.take, model.params, model._order, None, model._P, "clip")]
            unpack = [partial(np.take, model._dP, model._inverse, None, model.grad, "clip")]
        # A bound Adam program holds a scalar step size: a per-parameter learning rate
        # goes through the step method, which handles both.
        if own_step:
            update = [partial(optimizer.step, params, grad)]
        elif self.schedules is not None:
            update = [partial(optimizer._step, params, grad)]
        else:
            update = optimizer._program(params, grad)
        self.steps = {
            observed: [
                (start, model._workspace(xb.shape[0]).train_program(
                    xb, xbT, tb, self.loss, update, pack, unpack,
                    partial(self.observer, model._workspace(xb.shape[0])) if observed
                    else None))
                for (start, xb, tb), xbT in zip(self.batches.views, self.batches.views_T,
                                                strict=True)]
            for observed in (False, True)
        }
        self.data = X

    def set_epoch(self, epoch: int) -> None:
        optimizer, model = self.optimizer, self.model
        optimizer.set_epoch(epoch)
        if self.schedules is not None:
            self.lrs = np.array([s(epoch) for s in self.schedules])
            optimizer.current_lr = self.lrs.astype(model.dtype)[self.replica_of]
        else:
            self.lrs = np.full(model.n_replicas, optimizer.current_lr)

    @property
    def current_lr(self) -> Array:
        return np.asarray(self.lrs, dtype=np.float64)

    @property
    def replica_of(self) -> Array:
        """The replica of every parameter in the order the optimiser now steps in."""
        m = self.model
        return m.replica_of[m._order] if self.in_use else m.replica_of

    @property
    def params(self) -> Array:
        return self.model._P if self.in_use else self.model.params

    def epoch(self, X: Array, T: Array, labels: Array, order: Array | None, *,
              track: bool = False, hidden: bool = False,
              previous: Array | None = None) -> None:
        if X is not self.data:
            self._bind(X, T, labels)
        m = self.model
        if self.packed and not self.in_use:
            self._permute(m._order)
            np.take(m.params, m._order, out=m._P, mode="clip")
            self.in_use = True
        self.batches.shuffle(order)
        if track:
            record = self.records.get(hidden)
            if record is None:
                record = self.records[hidden] = _ReplicaRecord(m, X.shape[0], hidden)
            self.observer.record = record
        steps = self.steps[track]
        last = len(steps) - 1
        for k, (start, run) in enumerate(steps):
            if previous is not None and k == last:
                if self.in_use:
                    np.take(m._P, m._inverse, out=previous, mode="clip")
                else:
                    previous[...] = m.params
            self.observer.start = start
            run()
        if track:
            self.last = (self.observer.record, *self.batches.epoch_targets())

    def sync(self) -> None:
        if self.in_use:
            m = self.model
            np.take(m._P, m._inverse, out=m.params, mode="clip")
            np.take(m._dP, m._inverse, out=m.grad, mode="clip")
            self._permute(m._inverse)
            self.in_use = False

    def _permute(self, order: Array) -> None:
        opt = self.optimizer
        opt._reorder(order)
        if isinstance(opt.current_lr, np.ndarray):
            opt.current_lr = opt.current_lr[order]

    def train_loss(self) -> float:
        record, T, labels = self.last
        return float(np.mean(_scores(self.model, self.loss, record.z, record.a, T, labels)[0]))

    def train_metrics(self) -> dict[str, Array]:
        record, T, labels = self.last
        out: dict[str, Array] = {}
        out["train/loss"], out["train/accuracy"] = _scores(self.model, self.loss, record.z,
                                                           record.a, T, labels)
        if record.hidden:
            out.update(record.unit_fractions())
        return out

    def evaluate(self, X: Array, T: Array, labels: Array) -> tuple[Array, Array]:
        return _evaluate(self.model, X, T, labels, self.loss)

    def diagnostics(self, previous: Array) -> dict[str, Array]:
        model, out = self.model, {}
        norms = zip(_layer_norms(model, model.grad), _layer_norms(model, model.params - previous),
                    _layer_norms(model, model.params), strict=True)
        for i, (g, u, w) in enumerate(norms, start=1):
            out[f"grad_norm/layer_{i}"] = g
            out[f"update_ratio/layer_{i}"] = np.where(w > 0, u / np.where(w > 0, w, 1.0), 0.0)
        return out

    def check_params(self, epoch: int) -> None:
        if not all_finite(self.params):
            self.sync()
            bad = np.unique(self.model.replica_of[~np.isfinite(self.model.params)])
            raise DivergenceError(
                epoch, f"parameters of replica(s) {bad.tolist()} became non-finite"
            )

    def check_metrics(self, epoch: int, metrics: dict) -> None:
        losses = metrics["train/loss"]
        bad = [k for k in range(self.model.n_replicas) if not np.isfinite(losses[k])]
        if bad:
            raise DivergenceError(epoch, f"loss of replica(s) {bad} became non-finite")

    def new_history(self) -> ReplicaHistory:
        return ReplicaHistory(replicas=[History() for _ in range(self.model.n_replicas)])

    def record(self, history: ReplicaHistory, epoch: int, metrics: dict) -> dict[str, float]:
        return _record_replica_metrics(history, epoch, metrics)


class _ShuffledInputs(ShuffledViews):
    """:class:`pipeline.fast.compile.ShuffledViews` of ``[X, 1]`` (the same rows for the
    same order), with a units-major copy alongside: ``views_T[i]`` is ``views[i][1].T``
    as a view of one C-ordered ``(fan_in + 1, n)`` array, gathered by the same shuffle."""

    def __init__(self, Xa: Array, T: Array, labels: Array, batch: int) -> None:
        super().__init__(Xa, T, labels, batch)
        self.XT = np.ascontiguousarray(Xa.T)
        self.XsT = np.empty_like(self.XT) if self.shuffled else self.XT
        n = Xa.shape[0]
        self.views_T = [self.XsT[:, i : i + batch] for i in range(0, n, batch)]
        if not self.shuffled:
            self.views_T = [self.XT]

    def shuffle(self, order: Array | None) -> None:
        super().shuffle(order)
        if order is not None:
            np.take(self.XT, order, axis=1, out=self.XsT, mode="clip")


def _record_replica_metrics(history: ReplicaHistory, epoch: int,
                            per: dict[str, Array]) -> dict[str, float]:
    """Append an evaluated epoch's metrics (``{key: K values}``) to every replica's
    history and their mean and spread to ``history``; returns that summary."""
    keys = list(per)
    # One (metrics, K) table: a mean and a spread per metric in two calls instead of two
    # calls per metric (13 metrics of a default run: 130 -> 15 us an epoch).
    table = np.array([np.asarray(per[key], dtype=np.float64) for key in keys])
    for k, h in enumerate(history.replicas):
        h.append(epoch, dict(zip(keys, table[:, k].tolist(), strict=True)))
    summary = dict(zip(keys, table.mean(axis=1).tolist(), strict=True))
    summary.update(zip([f"{key}/std" for key in keys], table.std(axis=1).tolist(),
                       strict=True))
    history.append(epoch, summary)
    return summary


def _evaluate(model: ReplicaMLP, X: Array, T: Array, labels: Array,
              loss: Loss) -> tuple[Array, Array]:
    """Each replica's mean loss and accuracy on checked data, ``(K,)`` each."""
    Z, A = model._outputs(X)
    return _scores(model, loss, Z, A, T, labels)


# Most values _stacked_values puts through Loss.terms in one go: a larger stack's
# temporaries cost more (fresh memory, cache misses) than the calls they save (8
# replicas x 10,000 samples x 4 classes: 0.8 ms a batch at a time, 2.5 ms at once).
STACK_VALUES = 2**16


def _stack_group(batch_values: int) -> int:
    """How many batches of ``batch_values`` values each go through at once."""
    return max(1, STACK_VALUES // max(batch_values, 1))


def _stacked_values(loss: Loss, z: Array, a: Array, T: Array) -> Array:
    """The mean loss of each batch of a stack: ``z`` and ``a`` of shape ``(..., n, c)``,
    the targets ``T`` ``(n, c)`` shared by all; returns an array of shape ``(...)``."""
    lead, (n, c) = z.shape[:-2], z.shape[-2:]
    if loss.terms is None:
        out = np.empty(lead)
        for index in np.ndindex(*lead):
            out[index] = loss.value(z[index], a[index], T)
        return out
    z, a = z.reshape(-1, n, c), a.reshape(-1, n, c)
    out = np.empty(z.shape[0], dtype=np.result_type(z, T))
    step = _stack_group(n * c)
    for start in range(0, z.shape[0], step):
        part = slice(start, start + step)
        out[part] = np.sum(loss.terms(z[part], a[part], T), axis=(-2, -1)) / n
    return out.reshape(lead)


def _scores(model: ReplicaMLP, loss: Loss, Z: Array, A: Array, T: Array,
            labels: Array) -> tuple[Array, Array]:
    """Each replica's mean loss and accuracy from its outputs ``(c, K, n)``."""
    K, (c, n) = model.n_replicas, (A.shape[0], A.shape[2])
    losses = _stacked_values(loss, Z.transpose(1, 2, 0), A.transpose(1, 2, 0), T)
    # scores_to_proba maps row by row, so the rows of several replicas go through it at
    # once; as many as _stacked_values takes in one go.
    accuracy = np.empty(K)
    step = _stack_group(n * c)
    for start in range(0, K, step):
        group = A[:, start : start + step].transpose(1, 2, 0)
        proba = scores_to_proba(group.reshape(-1, c), model.output_activation.name, loss.name)
        hits = np.argmax(proba, axis=1).reshape(group.shape[0], n) == labels
        accuracy[start : start + step] = np.count_nonzero(hits, axis=1) / max(n, 1)
    return losses, accuracy


class _UnitFractions:
    """Dead and saturated unit fractions per hidden layer and replica (as fit() reports
    them), gathered over blocks of rows."""

    def __init__(self, model: ReplicaMLP) -> None:
        self.acts = model.hidden_activations
        self.widths = model.sizes[1:-1]
        self.live: dict[int, Array] = {}  # (h, K): the unit leaves its flat part somewhere
        self.saturated: dict[int, Array] = {}  # (K,): saturated values counted
        self.rows = 0

    def add(self, As: list[Array]) -> None:
        """Count a block's hidden values ``As[i]``, each ``(h, K, rows)``."""
        for i, act in enumerate(self.acts, start=1):
            a = As[i]
            if act.family == "relu":
                live = ~np.all(a <= 0, axis=2)
                self.live[i] = live | self.live[i] if i in self.live else live
            elif act.family == "saturating":
                # fit()'s numbers (1 - a*a, a * (1 - a)) without its temporaries, and one
                # count per replica: count_nonzero over a whole view is several times
                # faster than with an axis (a (16, 8, 1000) block: 80 -> 38 us).
                if act.name == "tanh":
                    deriv = np.multiply(a, a)
                    np.subtract(1.0, deriv, out=deriv)
                    peak = 1.0
                else:
                    deriv = np.subtract(1.0, a)
                    np.multiply(a, deriv, out=deriv)
                    peak = 0.25
                low = np.less(deriv, SATURATION_THRESHOLD * peak)
                count = np.array([np.count_nonzero(low[:, k]) for k in range(a.shape[1])])
                self.saturated[i] = self.saturated.get(i, 0) + count
        self.rows += As[-1].shape[2]

    def result(self) -> dict[str, Array]:
        out: dict[str, Array] = {}
        for i, act in enumerate(self.acts, start=1):
            if act.family == "relu":
                out[f"dead_fraction/layer_{i}"] = np.mean(~self.live[i], axis=0)
            elif act.family == "saturating":
                values = self.rows * self.widths[i - 1]
                out[f"saturated_fraction/layer_{i}"] = self.saturated[i] / values
        return out


def _layer_norms(model: ReplicaMLP, flat: Array) -> list[Array]:
    """Per layer, the Euclidean norm of each replica's weights and biases, ``(K,)``."""
    # One weighted bincount over the flat vector instead of two reductions per layer:
    # the squares add up into bin (layer * K + replica) of each value.
    bins = model._norm_bins()
    squares = np.square(flat, dtype=np.float64)
    sums = np.bincount(bins, weights=squares, minlength=model.n_layers * model.n_replicas)
    return list(np.sqrt(sums).reshape(model.n_layers, model.n_replicas))


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
