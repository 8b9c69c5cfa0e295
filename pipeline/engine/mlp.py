"""A multi-layer perceptron with a hand-written backward pass.

The forward pass computes, for each layer ``l = 1..L``::

    Z_l = A_{l-1} @ W_l + b_l          # (n, fan_out)
    A_l = f_l(Z_l)                     # A_0 = X

and the backward pass applies the chain rule from the output back::

    delta_L = dLoss/dZ_L                         # from the loss (see losses.py)
    dW_l    = A_{l-1}.T @ delta_l                # (fan_in, fan_out)
    db_l    = 1.T @ delta_l                      # column sums, as a product (faster)
    delta_{l-1} = f'_{l-1}(Z_{l-1}) * (delta_l @ W_l.T)

All parameters live in one flat vector, weights first, then biases; ``weights`` and
``biases`` are views into it, and the gradient has the same layout. An optimiser can
then update every parameter in one vectorised call, and weight decay touches exactly
``params[:n_weight_params]``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from pipeline.engine.activations import Activation, const, get_activation
from pipeline.engine.init import get_initializer
from pipeline.engine.losses import Loss, encode_targets, get_loss, scores_to_proba

Array = np.ndarray

DTYPES = {"float32": np.float32, "float64": np.float64}


def _as_dtype(dtype: object) -> np.dtype:
    try:
        resolved = np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        resolved = None
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype={dtype!r}: must be float32 or float64")
    return resolved


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise ValueError(f"sizes={sizes!r}: must be a list of layer widths like [2, 16, 1]")
    if len(sizes) < 2:
        raise ValueError(
            f"sizes={list(sizes)!r}: need at least an input and an output width, like [2, 1]"
        )
    checked = []
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            where = "input" if i == 0 else "output" if i == len(sizes) - 1 else f"hidden {i}"
            raise ValueError(
                f"sizes[{i}]={size!r} ({where} layer): widths must be integers >= 1"
            )
        checked.append(int(size))
    return checked


class MLP:
    """Fully connected feed-forward network trained by backpropagation.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths from input to output, e.g. ``[2, 16, 16, 1]``.
    activation : str or sequence of str
        Hidden activation, one name for all hidden layers or one per hidden layer.
    output : str
        Output activation (``sigmoid`` for one binary unit, ``softmax`` for k classes).
    bias : bool
        Whether layers have biases. Without them ``biases`` is None.
    init : str
        Weight initialiser name (see :mod:`pipeline.engine.init`); biases start at zero.
    seed : int
        Seed for the initial weights.
    dtype : {"float64", "float32"} or numpy dtype
        Precision of parameters and computation.
    activation_params : dict, optional
        Parameters of parametrised activations (``slope`` of leaky_relu, ``alpha`` of elu).
    loss : str, optional
        The loss the network is trained with; only used to turn outputs into class
        probabilities in :meth:`predict_proba` (a hinge margin's threshold is 0, a squared
        error on 0/1 targets has 0.5).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "relu",
        output: str = "sigmoid",
        bias: bool = True,
        init: str = "xavier_uniform",
        seed: int = 0,
        dtype: object = np.float64,
        activation_params: dict | None = None,
        loss: str | None = None,
    ) -> None:
        self.sizes = _check_sizes(sizes)
        n_hidden = len(self.sizes) - 2
        names = [activation] * n_hidden if isinstance(activation, str) else list(activation)
        if len(names) != n_hidden:
            raise ValueError(
                f"activation={list(names)!r}: give one name, or one per hidden layer "
                f"({n_hidden} for sizes {self.sizes})"
            )
        self.activation_params = dict(activation_params or {})
        self.hidden_activations: list[Activation] = [
            get_activation(name, hidden=True, **self.activation_params) for name in names
        ]
        self.output_activation: Activation = get_activation(output, **self.activation_params)
        if output == "softmax" and self.sizes[-1] < 2:
            raise ValueError(
                f"output='softmax' needs at least 2 output units; sizes ends in {self.sizes[-1]}"
            )
        if loss is not None:
            get_loss(loss).check_output(output, self.sizes[-1])
        self.loss = loss
        if not isinstance(bias, (bool, np.bool_)):
            raise ValueError(f"bias={bias!r}: must be True or False")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}: must be an integer >= 0")
        self.bias = bool(bias)
        self.init = init
        self.seed = int(seed)
        self.dtype = _as_dtype(dtype)

        shapes = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        self.n_weight_params = sum(fi * fo for fi, fo in shapes)
        n_bias = sum(fo for _, fo in shapes) if self.bias else 0
        self.params = np.zeros(self.n_weight_params + n_bias, dtype=self.dtype)
        self.grad = np.zeros_like(self.params)
        self.weights, self.biases = self._views(self.params, shapes)
        self._grad_weights, self._grad_biases = self._views(self.grad, shapes)
        self._ones = np.ones(0, dtype=self.dtype)
        # Preallocated forward/backward buffers of the fast path, one set per batch size.
        self._workspaces: dict[int, _Workspace] = {}

        draw = get_initializer(init)
        rng = np.random.default_rng(self.seed)
        for W, (fan_in, fan_out) in zip(self.weights, shapes, strict=True):
            W[...] = draw(rng, fan_in, fan_out)

    def _views(self, flat: Array, shapes: list[tuple[int, int]]):
        weights, offset = [], 0
        for fan_in, fan_out in shapes:
            weights.append(flat[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out))
            offset += fan_in * fan_out
        if not self.bias:
            return weights, None
        biases = []
        for _, fan_out in shapes:
            biases.append(flat[offset : offset + fan_out])
            offset += fan_out
        return weights, biases

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_arrays(
        cls,
        weights: Sequence[Array],
        biases: Sequence[Array] | None = None,
        **kwargs: object,
    ) -> MLP:
        """Build a network around given weight (and bias) arrays, checking their shapes.

        Raises
        ------
        ValueError
            Naming the first layer whose shape does not chain onto the previous one.
        """
        weights = [np.asarray(W) for W in weights]
        if not weights:
            raise ValueError("weights: need at least one layer")
        for i, W in enumerate(weights, start=1):
            if W.dtype.kind not in "biuf" or not np.all(np.isfinite(W)):
                raise ValueError(f"layer {i}: weights must be finite numbers")
        for i, W in enumerate(weights, start=1):
            if W.ndim != 2:
                raise ValueError(f"layer {i}: weight must be 2-D (fan_in, fan_out); got {W.shape}")
            if i > 1 and W.shape[0] != weights[i - 2].shape[1]:
                raise ValueError(
                    f"layer {i}: weight of shape {W.shape} takes {W.shape[0]} inputs but "
                    f"layer {i - 1} gives {weights[i - 2].shape[1]} outputs"
                )
        sizes = [weights[0].shape[0]] + [W.shape[1] for W in weights]
        model = cls(sizes, bias=biases is not None, **kwargs)
        for i, W in enumerate(weights):
            model.weights[i][...] = W
        if biases is not None:
            if len(biases) != len(weights):
                raise ValueError(f"biases: {len(biases)} given for {len(weights)} layers")
            for i, b in enumerate(biases, start=1):
                b = np.asarray(b).reshape(-1)
                if b.shape[0] != sizes[i]:
                    raise ValueError(
                        f"layer {i}: bias has {b.shape[0]} entries for {sizes[i]} units"
                    )
                model.biases[i - 1][...] = b
        return model

    def get_config(self) -> dict:
        """The architecture as plain values: ``MLP(**model.get_config())`` rebuilds it."""
        return {
            "sizes": list(self.sizes),
            "activation": [a.name for a in self.hidden_activations],
            "output": self.output_activation.name,
            "bias": self.bias,
            "init": self.init,
            "seed": self.seed,
            "dtype": self.dtype.name,
            "activation_params": dict(self.activation_params),
            "loss": self.loss,
        }

    def copy(self, dtype: object | None = None) -> MLP:
        """An independent copy, optionally cast to another dtype."""
        config = self.get_config()
        if dtype is not None:
            config["dtype"] = dtype
        clone = type(self)(**config)
        clone.set_params(self.params)
        return clone

    def with_input_scaling(self, mean: Array, std: Array) -> MLP:
        """A copy that takes raw inputs ``X`` where this model takes ``(X - mean) / std``.

        The scaling is affine, so it folds exactly into the first layer:
        ``((X - mean) / std) @ W + b == X @ (W / std[:, None]) + (b - (mean / std) @ W)``.
        The copy always has biases (zero where this model has none), since the shift needs
        one. Serving the copy means users never have to standardise inputs themselves.
        """
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.shape != (self.sizes[0],) or std.shape != (self.sizes[0],):
            raise ValueError(
                f"mean and std need {self.sizes[0]} entries; got {mean.shape} and {std.shape}"
            )
        if not np.all(np.isfinite(std)) or np.any(std <= 0):
            raise ValueError(f"std={std.tolist()}: entries must be finite and > 0")
        config = self.get_config()
        config["bias"] = True
        folded = type(self)(**config)
        for i, W in enumerate(self.weights):
            folded.weights[i][...] = W
            if self.biases is not None:
                folded.biases[i][...] = self.biases[i]
            else:
                folded.biases[i][...] = 0.0
        W1 = self.weights[0].astype(np.float64)
        folded.weights[0][...] = W1 / std[:, None]
        folded.biases[0][...] = folded.biases[0] - (mean / std) @ W1
        return folded

    def set_params(self, flat: Array) -> None:
        """Copy a flat parameter vector (same layout as ``params``) into the model."""
        flat = np.asarray(flat)
        if flat.shape != self.params.shape:
            raise ValueError(
                f"parameter vector has shape {flat.shape}; this model needs {self.params.shape}"
            )
        self.params[...] = flat

    # --------------------------------------------------------------------- properties

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    @property
    def n_outputs(self) -> int:
        return self.sizes[-1]

    @property
    def n_classes(self) -> int:
        return max(self.sizes[-1], 2)

    @property
    def activations(self) -> list[Activation]:
        """Activation of every layer, the output layer last."""
        return [*self.hidden_activations, self.output_activation]

    def __repr__(self) -> str:
        acts = ",".join(a.name for a in self.hidden_activations) or "-"
        return (
            f"MLP(sizes={self.sizes}, activation=[{acts}], output={self.output_activation.name}"
            f", bias={self.bias}, params={self.n_params}, dtype={self.dtype.name})"
        )

    # ---------------------------------------------------------------------- checking

    def check_input(self, X: Array) -> Array:
        """Return X as a C-contiguous array of the model's dtype, or raise ValueError."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(
                f"X has shape {X.shape}; this model takes (n_samples, {self.sizes[0]})"
            )
        if X.dtype.kind not in "biuf":
            raise ValueError(f"X must be numeric; got dtype {X.dtype}")
        X = np.ascontiguousarray(X, dtype=self.dtype)
        if not np.all(np.isfinite(X)):
            raise ValueError("X contains NaN or infinite values")
        return X

    def encode_targets(self, y: Array, n_samples: int | None = None) -> Array:
        """Labels or targets as an ``(n_samples, n_outputs)`` matrix in the model's dtype."""
        T = encode_targets(y, self.n_outputs, self.dtype)
        if n_samples is not None and T.shape[0] != n_samples:
            raise ValueError(f"X has {n_samples} samples but y has {T.shape[0]}")
        return T

    # ----------------------------------------------------------------------- forward

    def forward_layers(self, X: Array) -> tuple[list[Array], list[Array]]:
        """Run the forward pass keeping every layer's values.

        Returns
        -------
        Zs : list of arrays
            Pre-activations ``Z_l`` of shape ``(n, sizes[l])`` for ``l = 1..L``.
        As : list of arrays
            Activations with ``As[0] = X`` and ``As[l] = f_l(Z_l)``; ``As[-1]`` is the output.
        """
        return self._forward(self.check_input(X))

    def _forward(self, X: Array) -> tuple[list[Array], list[Array]]:
        Zs: list[Array] = []
        As: list[Array] = [X]
        for i, (W, act) in enumerate(zip(self.weights, self.activations, strict=True)):
            Z = As[-1] @ W
            if self.biases is not None:
                Z += self.biases[i]
            Zs.append(Z)
            As.append(act.forward(Z))
        return Zs, As

    def forward(self, X: Array) -> Array:
        """Network output after the output activation, shape ``(n, n_outputs)``.

        Long inputs go through in blocks of rows whose widest layer holds about
        :data:`FORWARD_BLOCK_BYTES`: memory stays bounded whatever ``n`` (a 1000 x 1000
        grid through 256-unit layers would otherwise hold gigabytes of layer values), and
        blocks that fit in the cache run 1.7-2.4x faster than one pass over 100,000 rows.
        The outputs equal one pass's up to BLAS rounding (bit for bit where measured).
        """
        X = self.check_input(X)
        n = X.shape[0]
        rows = max(1, FORWARD_BLOCK_BYTES // (max(self.sizes) * self.dtype.itemsize))
        if n <= rows:
            return self._forward(X)[1][-1]
        # Blocks of nearly equal length: no short last block taking another BLAS path.
        bounds = np.linspace(0, n, -(-n // rows) + 1).astype(np.intp)
        out = np.empty((n, self.n_outputs), dtype=self.dtype)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            out[start:stop] = self._forward(X[start:stop])[1][-1]
        return out

    def predict_proba(self, X: Array) -> Array:
        """Class probabilities, shape ``(n, n_classes)`` (``[1 - p, p]`` for one unit)."""
        out = self.forward(X)
        return scores_to_proba(out, self.output_activation.name, self.loss)

    def predict(self, X: Array) -> Array:
        """Class labels ``0..n_classes-1``, shape ``(n,)``."""
        return np.argmax(self.predict_proba(X), axis=1)

    # ---------------------------------------------------------------------- backward

    def __getstate__(self) -> dict:
        # Workspaces are scratch (possibly hundreds of MB): never pickle them.
        state = self.__dict__.copy()
        state["_workspaces"] = {}
        return state

    def _backward(self, Zs: list[Array], As: list[Array], delta: Array) -> None:
        """Fill ``self.grad`` from the output delta ``dLoss/dZ_L`` by the chain rule."""
        n = delta.shape[0]
        if self.biases is not None and self._ones.shape[0] != n:
            self._ones = np.ones(n, dtype=self.dtype)
        for i in reversed(range(self.n_layers)):
            np.matmul(As[i].T, delta, out=self._grad_weights[i])
            if self._grad_biases is not None:
                np.matmul(self._ones, delta, out=self._grad_biases[i])
            if i > 0:
                grad_a = delta @ self.weights[i].T
                delta = self.hidden_activations[i - 1].backward(Zs[i - 1], As[i], grad_a)

    def value_and_grad(
        self, X: Array, y: Array, loss: str | Loss, *, compute_value: bool = True
    ) -> float:
        """Mean loss on ``(X, y)``; leaves the gradient in ``self.grad`` (flat layout).

        With ``compute_value=False`` only the gradient is computed and NaN is returned,
        which saves the loss's logs and exps on steps nobody looks at.
        """
        loss = get_loss(loss)
        loss.check_output(self.output_activation.name, self.n_outputs)
        X = self.check_input(X)
        T = self.encode_targets(y, X.shape[0])
        return self._value_and_grad(X, T, loss, compute_value)

    def _value_and_grad(self, X: Array, T: Array, loss: Loss, compute_value: bool) -> float:
        """Unchecked fast path for the trainer, which validates its inputs once up front.

        Runs forward and backward in the preallocated workspace for this batch size
        (see :class:`_Workspace`): matrix products with ``out=`` and the biases folded
        in, in-place activations, the fused output gradient, all as one prebuilt list of
        bound numpy calls. The numbers equal :meth:`_value_and_grad_reference` up to
        floating-point rounding.
        """
        ws = self._workspaces.get(X.shape[0])
        if ws is None:
            ws = self._workspace(X.shape[0])
        return ws.value_and_grad(X, T, loss, compute_value)

    def _train_program(
        self, n: int, loss: Loss, update: list, packed: tuple[Array, Array] | None = None
    ) -> Callable[[Array, Array], None]:
        """``run(X, T)``: one training step on ``n``-row batches as one list of bound calls.

        The step of :meth:`_value_and_grad` (without the loss value) followed by the
        optimiser's ``update`` calls (:meth:`pipeline.engine.optim.Optimizer._program`): for the
        trainer, whose step is the same arrays every time. With ``packed=(P, dP)`` (a
        model with biases only) the step reads the parameters from the packed working
        copy ``P = params[packed_order(self)]`` and writes the gradient into ``dP`` in
        the same order, leaving ``params`` and ``grad`` alone.
        """
        ws = self._workspaces.get(n)
        if ws is None:
            ws = self._workspace(n)
        return ws.train_program(loss, update, packed)

    def _value_and_grad_reference(
        self, X: Array, T: Array, loss: Loss, compute_value: bool
    ) -> float:
        """The straightforward allocating path: the reference the fast path is tested on."""
        Zs, As = self._forward(X)
        delta = loss.delta(Zs[-1], As[-1], T, self.output_activation)
        value = loss.value(Zs[-1], As[-1], T) if compute_value else float("nan")
        self._backward(Zs, As, delta)
        return value

    def _workspace(self, n: int) -> _Workspace:
        """The buffers for batches of ``n`` rows, built on first use and then reused."""
        ws = self._workspaces.get(n)
        if ws is None:
            # A run uses one or two batch sizes (full batches and the remainder) plus the
            # evaluation sets; keep a few so an unusual caller cannot pile up memory.
            while len(self._workspaces) >= 4:
                self._workspaces.pop(next(iter(self._workspaces)))
            ws = self._workspaces[n] = _Workspace(self, n)
        return ws

    def _forward_fast(self, X: Array) -> tuple[list[Array], list[Array]]:
        """:meth:`_forward` into the workspace: the arrays are reused by the next call."""
        ws = self._workspaces.get(X.shape[0])
        if ws is None:
            ws = self._workspace(X.shape[0])
        ws.forward(X)
        return ws.Z, ws.A

    def loss_and_grads(
        self, X: Array, y: Array, loss: str | Loss
    ) -> tuple[float, list[Array], list[Array] | None]:
        """Mean loss and its gradients with respect to every parameter.

        Parameters
        ----------
        X : array of shape (n_samples, sizes[0])
        y : array of shape (n_samples,) or (n_samples, n_outputs)
            Labels or targets (see :func:`pipeline.engine.losses.encode_targets`).
        loss : str or Loss
            A loss name from :data:`pipeline.engine.losses.LOSSES`.

        Returns
        -------
        loss_value : float
        dW : list of arrays, shapes equal to ``weights``
        db : list of arrays, shapes equal to ``biases``, or None without biases
        """
        value = self.value_and_grad(X, y, loss)
        dW = [g.copy() for g in self._grad_weights]
        db = None if self._grad_biases is None else [g.copy() for g in self._grad_biases]
        return value, dW, db

    def compute_loss(self, X: Array, y: Array, loss: str | Loss) -> float:
        """Mean loss on ``(X, y)`` without gradients."""
        loss = get_loss(loss)
        X = self.check_input(X)
        T = self.encode_targets(y, X.shape[0])
        Zs, As = self._forward(X)
        return loss.value(Zs[-1], As[-1], T)


class _Workspace:
    """Preallocated forward and backward buffers of one :class:`MLP` for ``n``-row batches.

    Layout: units-major. Every ``(n, w)`` buffer is column-major, which is the row-major
    ``(w, n)`` array of its transpose, and the products run on those transposes through
    ``np.dot`` (half the call cost of ``np.matmul`` on small shapes; ``np.dot`` wants a
    row-major ``out``). Each unit's values are then contiguous: elementwise passes, the
    column calls of a narrow softmax and the ones column below run at full speed.

    Biases are folded into the products: every layer's input is kept with a trailing
    column of ones, ``[A_{l-1}, 1]``, so ``Z_l = [A_{l-1}, 1] @ [W_l; b_l]`` adds the bias
    inside the product, and ``[A_{l-1}, 1].T @ delta_l`` gives ``dW_l`` and ``db_l`` in one
    product. In column-major order the first ``fan_in`` columns of ``[A_{l-1}, 1]`` are a
    contiguous array, so ``A_{l-1}`` is written there directly. ``[W_l; b_l]`` is packed
    per step (and the gradient unpacked) with slice assignments, a tenth of a microsecond
    each on small layers where a broadcast bias add costs 1.4 us (64 x 32) to 4 us
    (256 x 64), and a saving of two passes per layer on long batches.

    A step runs as a *program*: the list of every numpy call of the forward pass, the
    output gradient and the backward pass, each bound once to its arrays and constants
    (positional arguments, no keyword parsing) when the workspace is built. On small
    batches a step costs its number of calls and the Python around them, so running a
    flat list of bound calls saves the loops, branches and lookups of walking the layers.

    Attributes
    ----------
    Z : list of arrays
        Pre-activations ``Z_l``, shape ``(n, sizes[l])``, ``l = 1..L``; a hidden relu
        layer is computed in place, so after :meth:`forward` its ``Z_l`` holds ``A_l``.
    A : list of arrays
        ``A[0]`` is the input of the last :meth:`forward`; ``A[l] = f_l(Z_l)``
        (the same array as ``Z[l-1]`` for an identity layer).
    G : list of arrays
        ``G[l-1] = dLoss/dZ_l`` after a gradient step (built with the first one). On long
        batches a hidden layer's ``G`` lives in a buffer of the forward pass that is dead
        by the time it is written (see :meth:`_grad_homes`), so after a gradient step the
        hidden layers' ``Z`` and ``A`` may hold gradients: run :meth:`forward` to read
        them (the output layer's ``Z`` and ``A`` are never reused).
    """

    def __init__(self, model: MLP, n: int) -> None:
        self.n = n
        self.fold = model.bias and n * max(model.sizes[1:]) >= FOLD_MIN_ELEMENTS
        sizes, acts, dt = model.sizes, model.activations, model.dtype
        # The model's parts, not the model: a workspace held by its model must not hold
        # it back (a reference cycle would keep large buffers alive until a gc pass).
        self.sizes, self.acts, self.dtype = sizes, acts, dt
        self.weights, self.biases = model.weights, model.biases
        self.grad_weights, self.grad_biases = model._grad_weights, model._grad_biases
        widths = sizes[1:]
        L = len(widths)
        extra = 1 if self.fold else 0
        # Inputs of every layer, then the outputs that are not a later layer's input.
        shapes = [fan_in + extra for fan_in in sizes[:-1]]
        own = [i for i, act in enumerate(acts)
               if i == L - 1 or act.name not in ("identity", "relu")]
        out_identity = acts[-1].name == "identity"
        shapes += [widths[i] for i in own] + ([] if out_identity else [widths[-1]])
        bufs = _arena(self, n, shapes, dt)
        self.Ain = bufs[:L]
        if self.fold:
            for a, fan_in in zip(self.Ain, sizes[:-1], strict=True):
                a[:, fan_in] = 1.0
        spare = iter(bufs[L:])
        self.Z, self.A = [], [None]
        for i, w in enumerate(widths):
            # A hidden relu layer runs in place (A_l is Z_l): its derivative needs only
            # the sign of z, which relu(z) keeps, and on long batches every buffer saved
            # is a pass of first-touch page faults (100 MB per 256-unit layer at 100,000
            # rows).
            a = self.Ain[i + 1][:, :w] if i < L - 1 else None
            z = next(spare) if i in own else a
            if i == L - 1:
                a = z if out_identity else next(spare)
            self.Z.append(z)
            self.A.append(a)
        self.x_in = self.Ain[0][:, : sizes[0]]
        self.forward_ops = self._forward_ops()
        self.G = None  # the backward buffers and program, built with the first step
        self._backward = None
        self._loss = None
        self._step_ops: list = []

    def _forward_ops(self, blocks: list[Array] | None = None) -> list:
        """The forward pass's calls; ``blocks``: read ``[W_l; b_l]`` from these arrays
        (views of a packed parameter vector, see :func:`packed_blocks`) instead of packing
        them from the model's parameters every step."""
        dot, ops = np.dot, []
        biases = self.biases if self.biases is not None else [None] * len(self.weights)
        for i, (W, b, act) in enumerate(zip(self.weights, biases, self.acts, strict=True)):
            AinT, Z = self.Ain[i].T, self.Z[i]
            if self.fold:
                if blocks is None:
                    Wb = np.empty((W.shape[0] + 1, W.shape[1]), dtype=W.dtype)
                    ops += [_assign(Wb[:-1], W), _assign(Wb[-1], b)]
                else:
                    Wb = blocks[i]
                ops.append(partial(dot, Wb.T, AinT, Z.T))
            else:
                ops.append(partial(dot, W.T, AinT[: W.shape[0]], Z.T))
                if b is not None:
                    ops.append(partial(np.add, Z.T, b[:, None], Z.T))
            if act.name != "identity":
                ops += act.forward_program(Z, self.A[i + 1])
        return ops

    def _grad_buffers(self) -> None:
        """The backward buffers: :attr:`G`, the targets and the rules' scratch."""
        n, widths = self.n, self.sizes[1:]
        # The hidden layers' backward rules run one at a time on one scratch, each a
        # contiguous view of its start; on long batches they run on column blocks small
        # enough for the cache (about 1 MB: the mask and the product then never make a
        # round trip to memory, 22 -> 12 ms for relu on 100,000 x 256), sharing a
        # block-sized scratch.
        cols = max(1, FOLD_BLOCK_ELEMENTS // n)
        scratch_cols = min(cols, max(widths[:-1], default=0))
        homes = self._grad_homes()
        own = [k for k, home in enumerate(homes) if home is None]
        bufs = _arena(self, n, [*(widths[k] for k in own), widths[-1], scratch_cols],
                      self.dtype)
        self.G = homes
        for k, buf in zip(own, bufs, strict=False):
            self.G[k] = buf
        self.t_in, self.scratch = bufs[-2], bufs[-1]

    def _grad_homes(self) -> list[Array | None]:
        """For each layer, the forward buffer its ``G`` is written into, or None for a
        buffer of its own.

        On long batches every buffer saved is a pass of first-touch page faults on a
        fresh process (about 2 ms per MB on the test VM: 0.2 s for one 100,000 x 256
        float32 layer). The backward step of layer ``l`` (top down) computes
        ``dW_l = [A_{l-1}, 1]^T G_l`` and then ``G_{l-1} = (G_l W_l^T) * f'(Z_{l-1})``,
        so while ``G_{l-1}`` is written only ``G_l``, the mask's ``Z_{l-1}`` and
        ``A_{l-1}`` and the inputs of lower layers are live. Every hidden buffer above is
        dead: ``A_j`` (``j >= l``: its product ``dW_{j+1}`` and its mask are done), a
        hidden ``Z_j`` of its own (``j >= l``), except the one holding ``G_l``. So a
        hidden layer's ``G`` goes, when its rule runs blocked (long batches):

        - for a relu layer under a one-unit layer (the outer product ``G_l w_l^T`` is
          made block by block), over its own values ``A = Z``: each block's mask is taken
          from ``A`` before ``G`` is written over it (:func:`_blocked_relu_in_place`);
        - for an identity layer (no mask), over its own values ``A = Z``;
        - for a tanh or sigmoid layer, over its own ``Z``: their rules read only ``A``
          (:data:`RULES_WITHOUT_Z`), so the product above and the rule write ``G``
          where ``Z`` was;
        - otherwise into a dead buffer above, when one is wide enough (never an ``A``'s
          ones column: only the ``A_j`` views, which stop before it).

        The output layer's buffers are never used: the loss value is read from them after
        the step. Where the product ``G_l W_l^T`` is a full matrix product, ``G_{l-1}``
        cannot be written over the mask's own operand: blocking that product by rows or
        columns to make room cost 20-60% more on 100,000 x 256 x 256 (measured), more
        than the faults it saves.
        """
        n, widths, acts = self.n, self.sizes[1:], self.acts
        L = len(widths)
        homes: list[Array | None] = [None] * L
        for k in reversed(range(L - 1)):
            if n * widths[k] <= FOLD_BLOCK_ELEMENTS:
                continue
            name = acts[k].name
            if name == "identity" or (name == "relu" and widths[k + 1] == 1):
                # Z[k] is A[k + 1] for both (in place); dead once dW_{k+1} is made.
                assert self.Z[k] is self.A[k + 1]
                homes[k] = self.Z[k]
                continue
            if name in RULES_WITHOUT_Z:
                # Z[k] is the layer's own, read by nothing after the forward pass.
                assert self.Z[k] is not self.A[k + 1]
                homes[k] = self.Z[k]
                continue
            # Dead while G[k] is written (the step of layer k + 1): the hidden A above,
            # the hidden Z of their own from layer k + 1 up; G[k + 1]'s home is read.
            dead = [self.A[j] for j in range(k + 2, L)]
            dead += [self.Z[j] for j in range(k + 1, L - 1) if self.Z[j] is not self.A[j + 1]]
            live = homes[k + 1]
            for buf in dead:
                if buf.shape[1] >= widths[k] and (live is None
                                                  or not np.shares_memory(buf, live)):
                    homes[k] = buf[:, : widths[k]]
                    break
        return homes

    def _backward_ops(self, blocks: list[Array] | None = None,
                      grad_blocks: list[Array] | None = None) -> list:
        """The backward pass's calls; with ``blocks`` the weights are read from the packed
        blocks and ``[dW_l; db_l]`` written into ``grad_blocks`` (no unpacking)."""
        if self.G is None:
            self._grad_buffers()
        n, dt, dot, scratch = self.n, self.dtype, np.dot, self.scratch
        widths, acts = self.sizes[1:], self.acts
        gbiases = self.grad_biases or [None] * len(widths)
        ops = []
        for i in reversed(range(len(widths))):
            W, G, dW, db = self.weights[i], self.G[i], self.grad_weights[i], gbiases[i]
            AinT = self.Ain[i].T
            if blocks is not None:
                W = blocks[i][:-1]
                ops.append(partial(dot, AinT, G, grad_blocks[i]))
            elif self.fold:
                dWb = np.empty((W.shape[0] + 1, W.shape[1]), dtype=dt)
                ops += [partial(dot, AinT, G, dWb), _assign(dW, dWb[:-1]),
                        _assign(db, dWb[-1])]
            else:
                ops.append(partial(dot, AinT[: W.shape[0]], G, dW))
                if db is not None:
                    # A product with a ones vector: several times faster than G.sum(axis=0).
                    ops.append(partial(dot, np.ones(n, dtype=dt), G, db))
            if i == 0:
                continue
            act, G_prev = acts[i - 1], self.G[i - 1]
            Z_prev, A_prev = self.Z[i - 1], self.A[i]
            rule = act.name != "identity"
            if rule and n * W.shape[0] > FOLD_BLOCK_ELEMENTS:
                outer = (G, W[:, 0]) if W.shape[1] == 1 else None
                if act.name == "relu" and G_prev is Z_prev:
                    # A relu layer under a one-unit layer: G over its values (_grad_homes).
                    assert outer is not None and Z_prev is A_prev
                    ops.append(_blocked_relu_in_place(A_prev, scratch, outer))
                    continue
                if outer is None:
                    ops.append(partial(dot, W, G.T, G_prev.T))
                # Block by block; a one-unit layer's outer product G_l w_l^T is made per
                # block too, so that each block is still in the cache when the rule
                # multiplies it.
                ops.append(_blocked_rule(act.backward_to, Z_prev, A_prev, G_prev, scratch,
                                         outer))
                continue
            ops.append(partial(dot, W, G.T, G_prev.T))
            if rule:
                w = W.shape[0]
                S = scratch.reshape(-1, order="F")[: n * w].reshape((n, w), order="F")
                ops += act.backward_program(Z_prev, A_prev, G_prev, S)
        return ops

    def load(self, X: Array) -> None:
        """Copy the batch into the first columns of ``[X, 1]``."""
        self.A[0] = X
        self.x_in[...] = X

    def forward(self, X: Array) -> None:
        """Run the forward pass on ``X`` (``n`` rows) into ``Z`` and ``A``."""
        self.load(X)
        for op in self.forward_ops:
            op()

    def value_and_grad(self, X: Array, T: Array, loss: Loss, compute_value: bool) -> float:
        """Forward pass, output gradient and backward pass: the model's flat gradient."""
        if loss is not self._loss:
            self._compile(loss)
        self.A[0] = X
        self.x_in[...] = X
        self.t_in[...] = T
        for op in self._step_ops:
            op()
        return loss.value(self.Z[-1], self.A[-1], T) if compute_value else float("nan")

    def _compile(self, loss: Loss) -> None:
        """The step program for ``loss``: forward, fused output gradient, backward."""
        if self._backward is None:
            self._backward = self._backward_ops()
        self._step_ops = [*self.forward_ops, *self._delta_ops(loss), *self._backward]
        self._loss = loss

    def _delta_ops(self, loss: Loss) -> list:
        if self.G is None:
            self._grad_buffers()
        return loss.delta_program(self.Z[-1], self.A[-1], self.t_in, self.acts[-1],
                                  self.G[-1])

    def backward(self) -> None:
        """Fill the model's flat gradient from ``G[-1] = dLoss/dZ_L`` by the chain rule."""
        if self._backward is None:
            self._backward = self._backward_ops()
        for op in self._backward:
            op()

    def train_program(self, loss: Loss, update: list,
                      packed: tuple[Array, Array] | None = None) -> Callable[[Array, Array], None]:
        """See :meth:`MLP._train_program`."""
        if packed is None:
            if loss is not self._loss:
                self._compile(loss)
            ops = [*self._step_ops, *update]
        else:
            blocks, grad_blocks = (packed_blocks(a, self.sizes) for a in packed)
            ops = [*self._forward_ops(blocks), *self._delta_ops(loss),
                   *self._backward_ops(blocks, grad_blocks), *update]
        x_in, t_in = self.x_in, self.t_in

        def run(X: Array, T: Array) -> None:
            x_in[...] = X
            t_in[...] = T
            for op in ops:
                op()

        return run


# Biases are folded into the products (see _Workspace) when a layer holds at least this
# many values: always, since packing [W; b] costs two slice assignments (0.1-0.3 us) where
# the bias add it replaces costs 1.4 us on 64 x 32 and more on larger layers.
FOLD_MIN_ELEMENTS = 0


FOLD_BLOCK_ELEMENTS = 2**18

# MLP.forward's block of rows: about this many bytes of the widest layer's values. Measured
# on the 2-core machine (L2 2 MB per core), float32, per call, medians of 5: [2,256,256,1]
# on 100,000 rows 174 ms in one pass, 102 ms in blocks of 1 MB, 289 ms of 2 MB, 239 ms of
# 4 MB; [2,64,64,4] on 200,000 rows 117 / 48 / 134 / 103 ms; [2,16,16,1] on 40,000 rows
# 5.9 / 3.1 / 4.4 / 6.0 ms.
FORWARD_BLOCK_BYTES = 1 << 20

# Hidden activations whose backward rule reads only the output ``a``, never ``z`` (tanh:
# 1 - a^2, sigmoid: a (1 - a)): on long batches their G is written over their own Z
# (see _Workspace._grad_homes). tests/fast/test_fastpath.py holds every name here to it.
RULES_WITHOUT_Z = frozenset({"tanh", "sigmoid"})


def _arena(owner: object, n: int, widths: Sequence[int], dtype: np.dtype) -> list[Array]:
    """Column-major ``(n, w)`` arrays for ``widths``, carved out of one block of memory.

    The block is ``owner``'s until ``owner`` is garbage; then it waits in
    :data:`_SPARE_BLOCKS` for the next workspace of the same size (see there). Each
    array starts on a 64-byte boundary.
    """
    align = 64 // np.dtype(dtype).itemsize
    sizes = [-(-n * w // align) * align for w in widths]
    block = _SPARE_BLOCKS.take(sum(sizes) + align, dtype, owner)
    offset = (-block.ctypes.data // block.itemsize) % align
    out = []
    for w, size in zip(widths, sizes, strict=True):
        out.append(block[offset : offset + n * w].reshape((n, w), order="F"))
        offset += size
    return out


class _SpareBlocks:
    """Memory blocks of workspaces that are gone, kept for the next one of the same size.

    glibc maps every block above its threshold afresh (and unmaps it when freed), so each
    new model paid the first-touch page faults of its workspaces again: 1.5 ms for the
    final evaluation of configuration 3 (10,000 rows of 32-unit layers, 2.8 MB), a
    third of an epoch's matrix products. A run that builds models one after another (a
    sweep, cross-validation, a benchmark) now reuses warm memory. At most ``max_bytes``
    wait here (the oldest go first); a block in use is never here, since it only comes
    back when its workspace, which holds every view of it, has been collected.

    Large blocks are kept too: on a virtual machine that hands freed memory back to its
    host, touching fresh memory costs far more than zeroing it (about 2 ms per MB on the
    2-core test machine, so 0.85 s for the 413 MB workspace of 100,000 rows of 256-unit
    layers, 0.6 s for the 312 MB it takes since the gradients of the hidden layers live in
    dead forward buffers, against 0.07 s when the memory was freed a moment ago).
    :func:`release_spare_memory` gives it all back.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free: list[Array] = []
        self.pending: list[Array] = []  # given back while the lock was held
        self.lock = threading.Lock()

    def take(self, size: int, dtype: np.dtype, owner: object) -> Array:
        dtype = np.dtype(dtype)
        block = None
        with self.lock:
            while self.pending:
                self.free.append(self.pending.pop(0))
            self._trim()
            for i, spare in enumerate(self.free):
                if spare.size == size and spare.dtype == dtype:
                    block = self.free.pop(i)
                    break
        if block is None:
            block = np.empty(size, dtype=dtype)
        if block.nbytes <= self.max_bytes:
            weakref.finalize(owner, self.give_back, block).atexit = False
        return block

    def give_back(self, block: Array) -> None:
        # A finalizer: the cyclic garbage collector runs it whenever an allocation starts
        # a collection, also inside take() on this very thread (a workspace in a
        # reference cycle, e.g. held by an exception's traceback). Waiting for the lock
        # there deadlocked; the block then waits for the next take() instead.
        if not self.lock.acquire(blocking=False):
            self.pending.append(block)
            return
        try:
            self.free.append(block)
            self._trim()
        finally:
            self.lock.release()

    def _trim(self) -> None:
        while sum(b.nbytes for b in self.free) > self.max_bytes:
            self.free.pop(0)


def _spare_limit() -> int:
    """Memory kept for later workspaces: 1/16 of the machine's RAM, at most 1 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not a POSIX system
        ram = 8 << 30
    return int(min(1 << 30, ram // 16))


_SPARE_BLOCKS = _SpareBlocks(_spare_limit())


def release_spare_memory() -> None:
    """Free the memory kept from the workspaces of models that are gone."""
    with _SPARE_BLOCKS.lock:
        _SPARE_BLOCKS.free.clear()
        _SPARE_BLOCKS.pending.clear()


def packed_order(model: MLP) -> Array:
    """The permutation that packs ``model.params`` (or ``grad``) layer by layer.

    ``params[packed_order(model)]`` holds, for each layer, ``[W_l; b_l]`` as one
    row-major ``(fan_in + 1, fan_out)`` block (see :func:`packed_blocks`): the trainer's
    working copy, whose blocks the folded products read (and write, for the gradient)
    in place of packing and unpacking them every step.
    """
    parts, w_offset, b_offset = [], 0, model.n_weight_params
    for fan_in, fan_out in zip(model.sizes[:-1], model.sizes[1:], strict=True):
        parts += [np.arange(w_offset, w_offset + fan_in * fan_out),
                  np.arange(b_offset, b_offset + fan_out)]
        w_offset += fan_in * fan_out
        b_offset += fan_out
    return np.concatenate(parts)


def packed_blocks(flat: Array, sizes: Sequence[int]) -> list[Array]:
    """The ``[W_l; b_l]`` blocks of a packed vector (see :func:`packed_order`), as views."""
    blocks, offset = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        size = (fan_in + 1) * fan_out
        blocks.append(flat[offset : offset + size].reshape(fan_in + 1, fan_out))
        offset += size
    return blocks


def _assign(dst: Array, src: Array):
    """``dst[...] = src`` as an argument-free call (a slice assignment costs less than
    ``np.copyto``: 0.16 vs 0.34 us for 32 values)."""
    setitem = dst.__setitem__

    def assign() -> None:
        setitem(Ellipsis, src)

    return assign


def _blocked_rule(rule, Z: Array, A: Array, G: Array, scratch: Array, outer=None):
    """``rule(Z, A, G, S)`` as a closure over column blocks of column-major arrays.

    With ``outer=(g, w)`` each block of ``G`` is first set to ``g * w`` (the outer
    product of a one-unit layer's delta ``g`` of shape ``(n, 1)`` and its weights ``w``).
    """
    cols = scratch.shape[1]
    blocks = [
        (Z[:, j : j + cols], A[:, j : j + cols], G[:, j : j + cols],
         scratch[:, : min(cols, Z.shape[1] - j)], None if outer is None else outer[1][j : j + cols])
        for j in range(0, Z.shape[1], cols)
    ]
    multiply = np.multiply
    g_out = None if outer is None else outer[0]

    def run() -> None:
        for z, a, g, s, w in blocks:
            if w is not None:
                multiply(g_out, w, out=g)
            rule(z, a, g, s)

    return run


def _blocked_relu_in_place(A: Array, scratch: Array, outer: tuple[Array, Array]):
    """``G = (g w^T) * (A > 0)`` written over ``A`` (a relu layer's values, ``A = Z``)
    block by block, as a closure.

    ``outer=(g, w)``: the delta ``g`` of shape ``(n, 1)`` of the one-unit layer above and
    its weights ``w``. Each block's mask is taken from ``A`` (``relu(z) > 0`` exactly
    where ``z > 0``, NaN included) before ``G`` is written over it; the outer product
    goes to the scratch. The same three passes over a cached block, and the same
    numbers, as :func:`_blocked_rule` with a ``G`` of its own.
    """
    cols = scratch.shape[1]
    g_out, w = outer
    blocks = [(A[:, j : j + cols], scratch[:, : min(cols, A.shape[1] - j)], w[j : j + cols])
              for j in range(0, A.shape[1], cols)]
    greater, multiply, zero = np.greater, np.multiply, const(0.0, A.dtype)

    def run() -> None:
        for a, s, wj in blocks:
            greater(a, zero, a)
            multiply(g_out, wj, s)
            multiply(a, s, a)

    return run
