"""One step of backpropagation worked by the numbers, as a textbook would print it.

:func:`explain_step` runs the engine's own :func:`~pipeline.engine.mlp.forward_pass` and
:func:`~pipeline.engine.mlp.backward_pass` on a few samples, applies the optimiser's
first step to a copy of the model, and keeps every quantity on the way: ``Z_l``, ``A_l``,
``delta_l``, ``dW_l``, ``db_l`` and the update, beside the gradient's finite-difference
estimate. :meth:`StepTrace.to_markdown` writes them out layer by layer, each with its
shape and the equation it comes from (the four equations at the top of ``mlp.py``).

    python train.py +experiment=xor_2_2_1 trainer.explain=true

prints it for a tiny network and logs it with the run as ``explain.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.engine.gradcheck import finite_difference_grad, relative_error
from pipeline.engine.losses import Loss, get_loss
from pipeline.engine.mlp import MLP, backward_pass, forward_pass
from pipeline.engine.optim import Optimizer

Array = np.ndarray

#: The derivative of each activation, as the worked example writes it.
DERIVATIVES = {
    "identity": "1",
    "sigmoid": "sigmoid(Z) * (1 - sigmoid(Z)) = A * (1 - A)",
    "tanh": "1 - tanh(Z)**2 = 1 - A**2",
    "relu": "1 where Z > 0, else 0",
    "leaky_relu": "1 where Z > 0, else the slope",
    "elu": "1 where Z > 0, else A + alpha",
}

#: The collapsed output delta of the pairs where the chain rule simplifies (losses.py).
COLLAPSED = {
    ("sigmoid", "bce"): "(A_L - T) / n",
    ("softmax", "cross_entropy"): "(A_L - T) / n",
    ("identity", "half_sse"): "(A_L - T) / n",
}


@dataclass
class LayerStep:
    """Everything one layer ``l`` computes in the step (arrays as the engine made them)."""

    layer: int  # l, counted from 1
    activation: str
    W: Array
    b: Array | None
    A_in: Array  # A_{l-1}
    Z: Array
    A: Array
    delta: Array
    dW: Array
    db: Array | None
    dW_numeric: Array
    db_numeric: Array | None
    W_after: Array
    b_after: Array | None


@dataclass
class StepTrace:
    """One forward pass, one backward pass and one update, on a few samples."""

    sizes: list[int]
    loss: str
    loss_value: float
    X: Array
    T: Array
    layers: list[LayerStep]
    optimizer: str
    lr: float
    notes: list[str] = field(default_factory=list)

    @property
    def gradient_error(self) -> float:
        """Largest relative error between backpropagation and finite differences."""
        errors = [relative_error(s.dW, s.dW_numeric) for s in self.layers]
        errors += [relative_error(s.db, s.db_numeric) for s in self.layers if s.db is not None]
        return max(errors)

    def to_markdown(self, digits: int = 4) -> str:
        """The worked example as Markdown (readable as plain text in a terminal too)."""
        n = self.X.shape[0]
        L = len(self.layers)
        arch = "-".join(str(s) for s in self.sizes)
        acts = ", ".join(f"layer {s.layer}: {s.activation}" for s in self.layers)
        out = [
            f"# One backpropagation step on a {arch} network, by the numbers",
            "",
            f"{n} training samples, loss `{self.loss}`, activations {acts}; then one step "
            f"of `{self.optimizer}` (learning rate {self.lr:g}). Every number below is "
            "the engine's own (`forward_pass` and `backward_pass` in "
            "`pipeline/engine/mlp.py`). Rows are samples, columns are units.",
            "",
            "## The batch",
            "",
            _block(f"X = A_0  {_shape(self.X)}", self.X, digits),
            _block(f"T (targets)  {_shape(self.T)}", self.T, digits),
            "## Forward pass: Z_l = A_{l-1} @ W_l + b_l, then A_l = f_l(Z_l)",
            "",
        ]
        for s in self.layers:
            bias = f" + b_{s.layer}" if s.b is not None else ""
            out += [
                f"### Layer {s.layer} ({s.activation})",
                "",
                _block(f"W_{s.layer}  {_shape(s.W)}", s.W, digits),
                *([_block(f"b_{s.layer}  {_shape(s.b)}", s.b, digits)] if s.b is not None else []),
                _block(f"Z_{s.layer} = A_{s.layer - 1} @ W_{s.layer}{bias}  "
                       f"{_shape(s.A_in)} @ {_shape(s.W)} -> {_shape(s.Z)}", s.Z, digits),
                _block(f"A_{s.layer} = {s.activation}(Z_{s.layer})  {_shape(s.A)}", s.A, digits),
            ]
        out += [
            f"Loss: `{self.loss}`(A_{L}, T) averaged over the {n} samples = "
            f"**{self.loss_value:.{digits + 2}f}**",
            "",
            "## Backward pass: the chain rule from the output back",
            "",
        ]
        for s in reversed(self.layers):
            if s.layer == L:
                rule = COLLAPSED.get((s.activation, self.loss))
                rule = rule and rule.replace("A_L", f"A_{L}").replace("/ n", f"/ {n}")
                how = (f"(1) delta_{L} = dLoss/dZ_{L} = {rule}  ({s.activation} with "
                       f"{self.loss}: the chain rule through the output collapses)"
                       if rule else
                       f"(1) delta_{L} = dLoss/dA_{L} * f'(Z_{L})  ({s.activation}' = "
                       f"{DERIVATIVES.get(s.activation, 'its derivative')})")
            else:
                how = (f"(2) delta_{s.layer} = (delta_{s.layer + 1} @ W_{s.layer + 1}.T) * "
                       f"{s.activation}'(Z_{s.layer}),  {s.activation}' = "
                       f"{DERIVATIVES.get(s.activation, 'its derivative')}")
            out += [
                f"### Layer {s.layer}",
                "",
                _block(f"{how}  {_shape(s.delta)}", s.delta, digits),
                _block(f"(3) dW_{s.layer} = A_{s.layer - 1}.T @ delta_{s.layer}  "
                       f"{_shape(s.A_in.T)} @ {_shape(s.delta)} -> {_shape(s.dW)}",
                       s.dW, digits),
                _block(f"check: finite differences (L(w + eps) - L(w - eps)) / (2 eps), "
                       f"relative error {relative_error(s.dW, s.dW_numeric):.1e}",
                       s.dW_numeric, digits),
            ]
            if s.db is not None:
                out += [
                    _block(f"(4) db_{s.layer} = delta_{s.layer} summed over the {n} rows  "
                           f"{_shape(s.db)}", s.db, digits),
                    _block(f"check: finite differences, relative error "
                           f"{relative_error(s.db, s.db_numeric):.1e}", s.db_numeric, digits),
                ]
        rule = ("W_l <- W_l - lr * dW_l and b_l <- b_l - lr * db_l" if self.optimizer == "sgd"
                else f"the first step of {self.optimizer}")
        out += [f"## The update: {rule}", ""]
        for s in self.layers:
            out.append(_block(f"W_{s.layer} after  (change {_change(s.W, s.W_after, digits)})",
                              s.W_after, digits))
            if s.b is not None:
                out.append(_block(f"b_{s.layer} after  (change {_change(s.b, s.b_after, digits)})",
                                  s.b_after, digits))
        out += [f"Backpropagation against finite differences: largest relative error "
                f"{self.gradient_error:.1e} over all {sum(_size(s) for s in self.layers)} "
                "parameters.", ""]
        out += [f"Note: {note}" for note in self.notes]
        return "\n".join(out).rstrip() + "\n"


def _shape(a: Array) -> str:
    return "(" + ", ".join(str(d) for d in a.shape) + (",)" if a.ndim == 1 else ")")


def _size(s: LayerStep) -> int:
    return s.W.size + (s.b.size if s.b is not None else 0)


def _text(a: Array, digits: int) -> str:
    return np.array2string(np.asarray(a, dtype=np.float64), precision=digits,
                           floatmode="fixed", suppress_small=True, max_line_width=100,
                           sign=" ")


def _block(title: str, a: Array, digits: int) -> str:
    return f"{title}\n\n```\n{_text(a, digits)}\n```\n"


def _change(before: Array, after: Array, digits: int) -> str:
    return f"largest {np.max(np.abs(after - before)):.{digits}g}"


def explain_step(model: MLP, X: Array, y: Array, loss: str | Loss, optimizer: Optimizer,
                 *, eps: float = 1e-6) -> StepTrace:
    """Work one training step of ``model`` on ``(X, y)`` through, keeping every quantity.

    Parameters
    ----------
    model : MLP
        Left unchanged: the update is applied to a copy.
    X, y : arrays
        The few samples of the step (a worked example reads best with 2 to 8).
    loss : str or Loss
    optimizer : Optimizer
        A fresh optimiser (bound here to the copy; its state is used up).
    eps : float
        The finite differences' step (computed on a float64 copy).
    """
    loss = get_loss(loss)
    loss.check_output(model.output_activation.name, model.n_outputs)
    X = model.check_input(X)
    T = model.encode_targets(y, X.shape[0])
    Zs, As = forward_pass(X, model.weights, model.biases, model.activations)
    value = loss.value(Zs[-1], As[-1], T)
    delta_L = loss.delta(Zs[-1], As[-1], T, model.output_activation)  # equation (1)
    deltas: list[Array] = []
    dWs, dbs = backward_pass(Zs, As, delta_L, model.weights, model.activations, deltas=deltas)

    numeric = model.copy(np.float64)
    numeric.grad[...] = finite_difference_grad(numeric, X, y, loss, eps)
    after = model.copy()
    after.value_and_grad(X, y, loss)
    optimizer.bind(after.n_params, after.n_weight_params, after.dtype)
    optimizer.set_epoch(1)
    optimizer.step(after.params, after.grad)

    layers = []
    for k, activation in enumerate(model.activations):
        has_bias = model.biases is not None
        layers.append(LayerStep(
            layer=k + 1, activation=activation.name,
            W=model.weights[k].copy(), b=model.biases[k].copy() if has_bias else None,
            A_in=As[k], Z=Zs[k], A=As[k + 1], delta=deltas[k], dW=dWs[k],
            db=dbs[k] if has_bias else None,
            dW_numeric=numeric.grad_weights[k].copy(),
            db_numeric=numeric.grad_biases[k].copy() if has_bias else None,
            W_after=after.weights[k].copy(), b_after=after.biases[k].copy() if has_bias else None,
        ))
    name = getattr(optimizer, "name", type(optimizer).__name__.lower())
    return StepTrace(sizes=list(model.sizes), loss=loss.name, loss_value=float(value), X=X,
                     T=T, layers=layers, optimizer=name, lr=float(optimizer.current_lr))
