"""Optimisers and learning-rate schedules working in place on one flat parameter vector.

The model keeps every parameter in one flat 1-D vector (all weights first, then all
biases) and fills one flat gradient vector of the same layout, so an optimiser is a small
state machine over two 1-D arrays::

    opt = make_optimizer("adam", lr=1e-3, weight_decay=1e-4)
    opt.bind(model.params.size, model.n_weight_params, model.params.dtype)
    for epoch in range(1, epochs + 1):
        opt.set_epoch(epoch)          # the schedule sets opt.current_lr
        for batch in batches:
            model.value_and_grad(...)  # fills model.grad
            opt.step(model.params, model.grad)

Every buffer (optimiser state and scratch) is allocated once in :meth:`Optimizer.bind`;
:meth:`Optimizer.step` only runs ufuncs with ``out=`` / in-place operators on them, so
the training loop allocates no arrays per step (the scratch-free hot path matters on
small networks where the update is a sizeable fraction of an epoch).

Penalties act on ``params[:n_weight_params]`` only: biases are not decayed (decaying them
only shifts the decision boundary towards the origin and helps no one).

- L2 ``weight_decay``: ``weight_decay * w`` is added to the gradient (the gradient of
  ``weight_decay / 2 * ||w||^2``). ``adamw`` instead decays decoupled from the gradient,
  ``w -= current_lr * weight_decay * w`` (Loshchilov & Hutter, as in PyTorch's AdamW).
- L1 ``l1``: the subgradient ``l1 * sign(w)`` (0 at w == 0) is added to the gradient, for
  every optimiser including ``adamw``.

The caller's gradient array is never written to: when a penalty is active the penalised
gradient is built in an internal buffer.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "SGD",
    "AdaGrad",
    "Adam",
    "AdamW",
    "Momentum",
    "Nesterov",
    "Optimizer",
    "RMSProp",
    "ScheduleSpec",
    "make_optimizer",
    "make_schedule",
]

# --------------------------------------------------------------------------------------
# Validation helpers: one readable line ``<argument>=<value>: <what is allowed>`` naming the
# argument as the caller passed it (``lr``, ``schedule_params.gamma``); an application that
# reads the values from a config file puts its own key in front (``optimizer.lr``).
# --------------------------------------------------------------------------------------
def _as_float(key: str, value: Any) -> float:
    """Return ``value`` as a finite Python float or raise ``ValueError`` naming ``key``."""
    # bool is an int subclass; `momentum: true` in a YAML file is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{key}={value!r}: must be a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{key}={value!r}: must be a finite number")
    return out


def _positive(key: str, value: Any) -> float:
    out = _as_float(key, value)
    if out <= 0.0:
        raise ValueError(f"{key}={value!r}: must be a positive number")
    return out


def _non_negative(key: str, value: Any) -> float:
    out = _as_float(key, value)
    if out < 0.0:
        raise ValueError(f"{key}={value!r}: must be a number >= 0")
    return out


def _unit_interval(key: str, value: Any) -> float:
    # A decay factor of 1 never forgets (momentum diverges, Adam's bias correction
    # divides by zero), so the allowed range is half open.
    out = _as_float(key, value)
    if not 0.0 <= out < 1.0:
        raise ValueError(f"{key}={value!r}: must be a number in [0, 1)")
    return out


def _decay_factor(key: str, value: Any) -> float:
    out = _as_float(key, value)
    if not 0.0 < out <= 1.0:
        raise ValueError(f"{key}={value!r}: must be a number in (0, 1]")
    return out


def _positive_int(key: str, value: Any) -> int:
    # Accept 10.0 (YAML/JSON round trips) but not 10.5 or True.
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not float(value).is_integer() or value < 1):
        raise ValueError(f"{key}={value!r}: must be an integer >= 1")
    return int(value)


def _known(kind: str, key: str, name: Any, table: Mapping[str, Any]) -> None:
    if not isinstance(name, str) or name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=1, cutoff=0.6)
        raise ValueError(
            f"{key}={name!r}: unknown {kind}; choose one of {', '.join(table)}"
            + (f" (did you mean {close[0]}?)" if close else "")
        )


# --------------------------------------------------------------------------------------
# Learning-rate schedules: pure functions of the epoch (counted from 1).
# --------------------------------------------------------------------------------------
def _constant(epoch: int, lr: float) -> float:
    return lr


def _step(epoch: int, lr: float, step_size: int, gamma: float) -> float:
    # Epochs 1..step_size run at lr, epoch step_size + 1 at lr * gamma, and so on
    # (PyTorch's StepLR with its 0-based epoch shifted to our 1-based one).
    return lr * gamma ** ((epoch - 1) // step_size)


def _exponential(epoch: int, lr: float, gamma: float) -> float:
    return lr * gamma ** (epoch - 1)


def _cosine(epoch: int, lr: float, t_max: int, min_lr: float) -> float:
    # Half a cosine from lr at epoch 1 down to min_lr at epoch t_max, then held there
    # (PyTorch's CosineAnnealingLR would climb back up past t_max, which is never wanted
    # when t_max is the length of the run and a run is extended).
    if t_max <= 1:
        return lr
    frac = min(1.0, (epoch - 1) / (t_max - 1))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))


def _inverse_scaling(epoch: int, lr: float, power_t: float) -> float:
    # scikit-learn's "invscaling", counted in epochs rather than samples seen.
    return lr / epoch**power_t


@dataclass(frozen=True)
class ScheduleSpec:
    """One entry of :data:`SCHEDULES`.

    Attributes
    ----------
    fn : callable
        ``fn(epoch, lr, **params) -> float``, the learning rate at ``epoch`` (from 1).
    defaults : mapping
        Parameter name -> default; ``None`` marks a required parameter.
    checks : mapping
        Parameter name -> validator ``check(key, value) -> value``.
    aliases : mapping
        Other accepted spellings -> canonical name (e.g. PyTorch's ``eta_min``).
    """

    fn: Callable[..., float]
    defaults: Mapping[str, float | int | None] = field(default_factory=dict)
    checks: Mapping[str, Callable[[str, Any], float | int]] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)


SCHEDULES: dict[str, ScheduleSpec] = {
    "constant": ScheduleSpec(_constant),
    "step": ScheduleSpec(
        _step,
        defaults={"step_size": 10, "gamma": 0.5},
        checks={"step_size": _positive_int, "gamma": _decay_factor},
    ),
    "exponential": ScheduleSpec(
        _exponential, defaults={"gamma": 0.99}, checks={"gamma": _decay_factor}
    ),
    "cosine": ScheduleSpec(
        _cosine,
        # t_max has no sensible default: it is the run's number of epochs.
        defaults={"t_max": None, "min_lr": 0.0},
        checks={"t_max": _positive_int, "min_lr": _non_negative},
        aliases={"eta_min": "min_lr"},
    ),
    "inverse_scaling": ScheduleSpec(
        _inverse_scaling, defaults={"power_t": 0.5}, checks={"power_t": _non_negative}
    ),
}


def _resolve_schedule(
    name: str, lr: float, params: Mapping[str, Any] | None
) -> tuple[ScheduleSpec, dict[str, float | int]]:
    """Validate a schedule name and its parameters; return the spec and full parameters."""
    _known("schedule", "schedule", name, SCHEDULES)
    spec = SCHEDULES[name]
    given: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        canonical = spec.aliases.get(key, key)
        if canonical not in spec.defaults:
            allowed = ", ".join(sorted(spec.defaults)) or "none"
            raise ValueError(
                f"schedule_params.{key}={value!r}: not a parameter of schedule {name} "
                f"(it takes: {allowed})"
            )
        if canonical in given:
            raise ValueError(
                f"schedule_params.{key}={value!r}: given twice for schedule {name} "
                f"(as {canonical} and an alias); give only {canonical}"
            )
        given[canonical] = value
    out: dict[str, float | int] = {}
    for key, default in spec.defaults.items():
        value = given.get(key, default)
        if value is None:
            raise ValueError(
                f"schedule_params.{key}=None: required for schedule {name}"
                + (" (set it to the number of epochs)" if key == "t_max" else "")
            )
        out[key] = spec.checks[key](f"schedule_params.{key}", value)
    if "min_lr" in out and out["min_lr"] > lr:
        raise ValueError(f"schedule_params.min_lr={out['min_lr']!r}: must be <= lr={lr!r}")
    return spec, out


def make_schedule(name: str, lr: float, **params: Any) -> Callable[[int], float]:
    """Build a learning-rate schedule, a pure function ``epoch -> lr`` (epoch from 1).

    Parameters
    ----------
    name : str
        A key of :data:`SCHEDULES`: ``constant``, ``step`` (``step_size=10``,
        ``gamma=0.5``), ``exponential`` (``gamma=0.99``), ``cosine`` (``t_max``
        required, ``min_lr=0.0``, alias ``eta_min``), ``inverse_scaling``
        (``power_t=0.5``).
    lr : float
        Base learning rate, the value at epoch 1 (> 0).
    **params
        The schedule's parameters.

    Returns
    -------
    callable
        ``schedule(epoch: int) -> float``.

    Raises
    ------
    ValueError
        Unknown schedule or parameter, or a value out of range.
    """
    lr = _positive("lr", lr)
    spec, resolved = _resolve_schedule(name, lr, params)
    return functools.partial(spec.fn, lr=lr, **resolved)


# --------------------------------------------------------------------------------------
# Optimisers
# --------------------------------------------------------------------------------------
# Validator per hyper-parameter name, shared by every optimiser that uses the name.
_HYPER_CHECKS: dict[str, Callable[[str, Any], float]] = {
    "momentum": _unit_interval,
    "beta1": _unit_interval,
    "beta2": _unit_interval,
    "rho": _unit_interval,
    "eps": _positive,
}


class Optimizer:
    """Base class: penalties, schedule, buffers and validation; subclasses do the update.

    Parameters
    ----------
    lr : float, optional
        Base learning rate (> 0); ``None`` takes the class's ``default_lr``.
    weight_decay : float, optional
        L2 penalty on the weights (>= 0); ``None`` takes ``default_weight_decay``
        (0.0, or 0.01 for ``adamw``).
    l1 : float, default 0.0
        L1 penalty on the weights (>= 0).
    schedule : str, default "constant"
        A key of :data:`SCHEDULES`.
    schedule_params : mapping, optional
        The schedule's parameters (see :func:`make_schedule`).
    **hyper
        The optimiser's own hyper-parameters (see ``defaults`` of each class).

    Attributes
    ----------
    lr : float
        Base learning rate.
    current_lr : float
        Learning rate used by the next :meth:`step` (set by :meth:`set_epoch`).
    t : int
        Number of steps taken since :meth:`bind` (Adam's bias correction counts these).
    epoch : int
        Last epoch passed to :meth:`set_epoch` (1 before the first call).
    """

    name: ClassVar[str] = ""
    #: Hyper-parameter name -> default. Only these may be passed as ``**hyper``.
    defaults: ClassVar[dict[str, float]] = {}
    default_lr: ClassVar[float] = 0.01
    default_weight_decay: ClassVar[float] = 0.0
    #: True when weight decay is applied to the parameters, not added to the gradient.
    decoupled_weight_decay: ClassVar[bool] = False
    #: Names of the state buffers (each a flat array like params), zero at bind().
    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        lr: float | None = None,
        weight_decay: float | None = None,
        l1: float = 0.0,
        schedule: str = "constant",
        schedule_params: Mapping[str, Any] | None = None,
        **hyper: Any,
    ) -> None:
        self.lr = _positive("lr", self.default_lr if lr is None else lr)
        self.weight_decay = _non_negative(
            "weight_decay",
            self.default_weight_decay if weight_decay is None else weight_decay,
        )
        self.l1 = _non_negative("l1", l1)
        unknown = sorted(set(hyper) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(
                f"{unknown[0]}={hyper[unknown[0]]!r}: not a hyper-parameter of optimizer "
                f"{self.name}; it takes {allowed} "
                f"(plus lr, weight_decay, l1, schedule, schedule_params)"
            )
        self.hyper: dict[str, float] = {
            key: _HYPER_CHECKS[key](key, hyper.get(key, default))
            for key, default in self.defaults.items()
        }
        spec, resolved = _resolve_schedule(schedule, self.lr, schedule_params)
        self.schedule = schedule
        self.schedule_params: dict[str, float | int] = resolved
        self._schedule: Callable[[int], float] = functools.partial(
            spec.fn, lr=self.lr, **resolved
        )
        self.epoch = 1
        self.current_lr = self._schedule(1)
        self.t = 0
        # Penalties folded into the gradient need the internal gradient copy.
        self._coupled_l2 = self.weight_decay > 0.0 and not self.decoupled_weight_decay
        self._decoupled_l2 = self.weight_decay > 0.0 and self.decoupled_weight_decay
        self._needs_grad_copy = self._coupled_l2 or self.l1 > 0.0
        self._bound = False
        self._buffers: dict[str, np.ndarray] = {}

    # ---- lifecycle ---------------------------------------------------------------------
    def bind(
        self, n_params: int, n_weight_params: int, dtype: Any = np.float64
    ) -> Optimizer:
        """Allocate every state and scratch buffer once, zeroing the state.

        Parameters
        ----------
        n_params : int
            Length of the flat parameter vector (> 0).
        n_weight_params : int
            ``params[:n_weight_params]`` are the weights (0 <= n_weight_params <= n_params);
            penalties apply to them only.
        dtype : numpy dtype, default float64
            Floating dtype of params and grad (float32 or float64).

        Returns
        -------
        Optimizer
            ``self``, so ``opt = make_optimizer(...).bind(...)`` reads naturally.
        """
        n = _positive_int("n_params", n_params)
        if (
            isinstance(n_weight_params, bool)
            or not isinstance(n_weight_params, (int, np.integer))
            or not 0 <= n_weight_params <= n
        ):
            raise ValueError(
                f"n_weight_params={n_weight_params!r} must be an integer in [0, {n}]"
            )
        dt = np.dtype(dtype)
        if dt.kind != "f":
            raise ValueError(f"dtype={dt} must be a floating dtype (float32 or float64)")
        self._n = n
        self._nw = int(n_weight_params)
        self._dtype = dt
        self._shape = (n,)
        self._buffers = {name: np.zeros(n, dtype=dt) for name in self.state_names}
        # Scratch for the update; its weight-part view is reused for the L1 sign term.
        self._buffers["scratch"] = np.empty(n, dtype=dt)
        if self._needs_grad_copy:
            self._buffers["grad"] = np.empty(n, dtype=dt)
        self._bind_views()
        self.t = 0
        self._bound = True
        return self

    def _bind_views(self) -> None:
        # Views of our own buffers are made once; views of the caller's arrays cannot be,
        # since params/grad are passed each step (a view is a tiny object, not data).
        nw = self._nw
        self._tmp = self._buffers["scratch"]
        self._tmp_w = self._tmp[:nw]
        g = self._buffers.get("grad")
        self._g = g
        if g is not None:
            self._g_w, self._g_b = g[:nw], g[nw:]
        for name in self.state_names:
            setattr(self, "_" + name, self._buffers[name])

    def reset(self) -> None:
        """Zero the state and the step count, keeping the buffers (no allocation)."""
        for name in self.state_names:
            self._buffers[name].fill(0.0)
        self.t = 0

    def set_epoch(self, epoch: int) -> float:
        """Set :attr:`current_lr` from the schedule for ``epoch`` (counted from 1).

        Returns
        -------
        float
            The new learning rate.
        """
        self.epoch = _positive_int("epoch", epoch)
        self.current_lr = float(self._schedule(self.epoch))
        return self.current_lr

    # ---- the hot path ------------------------------------------------------------------
    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        """Update ``params`` in place from ``grad`` (neither is reallocated; grad is unchanged).

        Parameters
        ----------
        params : ndarray, shape (n_params,)
            Flat parameters, weights first; dtype as given to :meth:`bind`.
        grad : ndarray, shape (n_params,)
            Gradient of the (unpenalised) loss with respect to ``params``.
        """
        if not self._bound:
            raise RuntimeError(
                "call opt.bind(n_params, n_weight_params, dtype) before opt.step()"
            )
        if (
            params.shape != self._shape
            or grad.shape != self._shape
            or params.dtype != self._dtype
            or grad.dtype != self._dtype
        ):
            raise ValueError(
                f"params {params.shape} {params.dtype} and grad {grad.shape} {grad.dtype} "
                f"must both be shape {self._shape} dtype {self._dtype} as bound"
            )
        self._step(params, grad)

    def _step(self, params: np.ndarray, grad: np.ndarray) -> None:
        """:meth:`step` without the argument checks, for a training loop that made them
        once (its arrays keep their shape and dtype for the whole run)."""
        self.t += 1
        lr = self.current_lr
        g = self._penalised_grad(params, grad) if self._needs_grad_copy else grad
        if self._decoupled_l2:
            # AdamW: w <- w - lr * wd * w, applied before the adaptive update as PyTorch
            # does; the gradient was taken at the un-decayed w.
            w = params[: self._nw]
            # lr may be a per-parameter vector (replicas trained with one lr each).
            lr_w = lr[: self._nw] if isinstance(lr, np.ndarray) else lr
            np.multiply(w, 1.0 - lr_w * self.weight_decay, out=w)
        self._update(params, g, lr)

    def _reorder(self, order: np.ndarray) -> None:
        """Permute the state in place, ``state[...] = state[order]`` for every state array.

        The update is elementwise, so an optimiser may run on a permuted copy of the
        parameters (the trainer's packed working copy) with its state permuted alike,
        as long as no penalty needs the weights to come first (:attr:`_uniform`).
        """
        for name in self.state_names:
            state = self._buffers[name]
            np.take(state, order, out=self._tmp)
            state[...] = self._tmp

    @property
    def _uniform(self) -> bool:
        """Whether the update treats every parameter alike (no penalty on the weights)."""
        return not (self._needs_grad_copy or self._decoupled_l2)

    def _program(self, params: np.ndarray, grad: np.ndarray) -> list[Callable[[], object]]:
        """:meth:`_step` on these arrays as a list of argument-free calls.

        For a training loop that passes the same two arrays every step: it can then run
        the update as part of one flat list of bound calls (see
        :meth:`pipeline.engine.mlp.MLP._train_program`). Running the list once is one step.
        """
        return [partial(self._step, params, grad)]

    def _penalised_grad(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """Fill the internal gradient buffer with grad + wd * w + l1 * sign(w)."""
        nw = self._nw
        w = params[:nw]
        g_w = self._g_w
        if self._coupled_l2:
            np.multiply(w, self.weight_decay, out=g_w)
            np.add(g_w, grad[:nw], out=g_w)
        else:
            np.copyto(g_w, grad[:nw])
        if self.l1 > 0.0:
            np.sign(w, out=self._tmp_w)
            self._tmp_w *= self.l1
            g_w += self._tmp_w
        np.copyto(self._g_b, grad[nw:])
        return self._g

    def _update(self, params: np.ndarray, g: np.ndarray, lr: float) -> None:
        """Apply the optimiser's rule in place; ``g`` is read only (may be the caller's)."""
        raise NotImplementedError

    # ---- introspection -----------------------------------------------------------------
    def hyperparams(self) -> dict[str, Any]:
        """Flat dict of every setting, for logging (schedule params as ``schedule_params.x``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "l1": self.l1,
            **self.hyper,
            "schedule": self.schedule,
        }
        out.update({f"schedule_params.{k}": v for k, v in self.schedule_params.items()})
        return out

    def buffers(self) -> dict[str, np.ndarray]:
        """The live state and scratch buffers (not copies), keyed by name."""
        return dict(self._buffers)

    def state_dict(self) -> dict[str, Any]:
        """Copy of everything needed to resume: settings, step count, epoch and state."""
        if not self._bound:
            raise RuntimeError("call opt.bind(...) before opt.state_dict()")
        return {
            "hyperparams": self.hyperparams(),
            "t": self.t,
            "epoch": self.epoch,
            "n_params": self._n,
            "n_weight_params": self._nw,
            "dtype": self._dtype.name,
            "state": {name: self._buffers[name].copy() for name in self.state_names},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this optimiser (binding it if needed).

        The settings (lr, penalties, schedule, hyper-parameters) stay those this
        optimiser was built with; only the optimiser name must match.
        """
        name = state["hyperparams"]["name"]
        if name != self.name:
            raise ValueError(f"state_dict is for optimizer {name!r}, not {self.name!r}")
        if (
            not self._bound
            or self._n != state["n_params"]
            or self._nw != state["n_weight_params"]
            or self._dtype != np.dtype(state["dtype"])
        ):
            self.bind(state["n_params"], state["n_weight_params"], state["dtype"])
        for key in self.state_names:
            np.copyto(self._buffers[key], state["state"][key])
        self.t = int(state["t"])
        self.set_epoch(int(state["epoch"]))

    def __repr__(self) -> str:
        settings = ", ".join(
            f"{k}={v!r}" for k, v in self.hyperparams().items() if k != "name"
        )
        return f"{type(self).__name__}({settings})"


class SGD(Optimizer):
    """Plain gradient descent: ``p -= lr * g``."""

    name = "sgd"

    def _update(self, params: np.ndarray, g: np.ndarray, lr: float) -> None:
        tmp = self._tmp
        np.multiply(g, lr, out=tmp)
        np.subtract(params, tmp, out=params)


class Momentum(Optimizer):
    """Classical (heavy-ball) momentum in PyTorch's form.

    ``buf = momentum * buf + g; p -= lr * buf``. With a constant lr this is the same
    trajectory as scikit-learn's ``v = momentum * v - lr * g; p += v``; keeping lr out of
    the buffer makes a schedule act immediately.
    """

    name = "momentum"
    defaults = {"momentum": 0.9}
    state_names = ("velocity",)

    def _update(self, params: np.ndarray, g: np.ndarray, lr: float) -> None:
        buf, tmp = self._velocity, self._tmp
        buf *= self.hyper["momentum"]
        buf += g
        np.multiply(buf, lr, out=tmp)
        np.subtract(params, tmp, out=params)


class Nesterov(Momentum):
    """Nesterov momentum as PyTorch's ``SGD(nesterov=True)`` (and scikit-learn) write it.

    ``buf = momentum * buf + g; p -= lr * (g + momentum * buf)``: the gradient at the
    current point stands in for the look-ahead gradient (Sutskever et al. 2013).
    """

    name = "nesterov"

    def _update(self, params: np.ndarray, g: np.ndarray, lr: float) -> None:
        mu = self.hyper["momentum"]
        buf, tmp = self._velocity, self._tmp
        buf *= mu
        buf += g
        np.multiply(buf, mu, out=tmp)
        tmp += g
        tmp *= lr
        np.subtract(params, tmp, out=params)


class AdaGrad(Optimizer):
    """AdaGrad (Duchi et al. 2011) as PyTorch: ``s += g**2; p -= lr * g / (sqrt(s) + eps)``."""

    name = "adagrad"
    defaults = {"eps": 1e-10}
    state_names = ("sum_sq",)

    def _update(self, params: np.ndarray, g: np.ndarray, lr: float) -> None:
        s, tmp = self._sum_sq, self._tmp
        np.multiply(g, g, out=tmp)
        s += tmp
        np.sqrt(s, out=tmp)
        tmp += self.hyper["eps"]
        np.divide(g, tmp, out=tmp)
        tmp *= lr
        np.subtract(params, tmp, out=params)


class RMSProp(Optimizer):
    """RMSprop (Tieleman & Hinton 2012), eps outside the root as PyTorch.

    ``v = rho * v + (1 - rho) * g**2; p -= lr * g / (sqrt(v) + eps)``.
    """

    name = "rmsprop"
    defaults = {"rho": 0.9, "eps": 1e-8}
    state_names = ("mean_sq",)

    def _update(self, params: np.ndarray, g: np.ndarray, lr: float) -> None:
        rho = self.hyper["rho"]
        v, tmp = self._mean_sq, self._tmp
        v *= rho
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - rho
        v += tmp
        np.sqrt(v, out=tmp)
        tmp += self.hyper["eps"]
        np.divide(g, tmp, out=tmp)
        tmp *= lr
        np.subtract(params, tmp, out=params)


class Adam(Optimizer):
    """Adam, Kingma & Ba (2015) Algorithm 1, with its bias correction.

    ``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g**2; m_hat = m / (1-b1**t);
    v_hat = v / (1-b2**t); p -= lr * m_hat / (sqrt(v_hat) + eps)``.
    """

    name = "adam"
    default_lr = 0.001
    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    state_names = ("m", "v")

    def bind(self, n_params: int, n_weight_params: int, dtype: Any = np.float64) -> Adam:
        super().bind(n_params, n_weight_params, dtype)
        # The betas, and the two scalars of a step, as 0-d arrays of the dtype: numpy
        # converts a Python float operand on every call (0.3 us each), a 0-d array it
        # takes as is; the same numbers (a Python float meets float32 arrays as float32).
        b1, b2 = self.hyper["beta1"], self.hyper["beta2"]
        consts = (b1, 1.0 - b1, b2, 1.0 - b2)
        self._b1, self._1_b1, self._b2, self._1_b2 = (np.array(c, self._dtype) for c in consts)
        self._eps_t = np.zeros((), self._dtype)  # eps * sqrt(1 - b2**t)
        self._step_size = np.zeros((), self._dtype)  # lr * sqrt(1 - b2**t) / (1 - b1**t)
        self._step_vector = None
        self._decay = np.zeros((), self._dtype)  # 1 - lr * weight_decay (AdamW)
        # (params, grad, step scalars, their bound calls): rebuilt when the arrays change.
        self._bound_ops: tuple = (None, None, None, [])
        return self

    def _update(self, params: np.ndarray, g: np.ndarray, lr: float) -> None:
        step = self._scalars(lr)
        # The calls are bound to the arrays once, and reused while the caller passes the
        # same ones (a training run always does).
        bound = self._bound_ops
        if params is not bound[0] or g is not bound[1] or step is not bound[2]:
            bound = self._bound_ops = (params, g, step, self._ops(params, g, step))
        for op in bound[3]:
            op()

    def _program(self, params: np.ndarray, grad: np.ndarray) -> list:
        if (
            type(self)._update is not Adam._update
            or type(self)._step is not Optimizer._step
            or isinstance(self.current_lr, np.ndarray)
        ):
            return super()._program(params, grad)
        ops: list = [self._advance]
        g = grad
        if self._needs_grad_copy:
            ops.append(partial(self._penalised_grad, params, grad))
            g = self._g
        if self._decoupled_l2:
            w = params[: self._nw]
            ops.append(partial(np.multiply, w, self._decay, w))
        return ops + self._ops(params, g, self._step_size)

    def _advance(self) -> None:
        """What :meth:`_step` does before the update's numpy calls, for a scalar lr."""
        self.t += 1
        self._scalars(self.current_lr)
        if self._decoupled_l2:
            self._decay[()] = 1.0 - self.current_lr * self.weight_decay

    def _scalars(self, lr: float | np.ndarray) -> np.ndarray:
        """Set the step's scalars for step ``t``; returns the step size operand."""
        hyper, t = self.hyper, self.t
        bc1 = 1.0 - hyper["beta1"] ** t
        root_bc2 = math.sqrt(1.0 - hyper["beta2"] ** t)
        # lr m_hat / (sqrt(v_hat) + eps) = (lr root_bc2 / bc1) m / (sqrt(v) + eps root_bc2):
        # the bias corrections become two scalars, so the update is five passes over the
        # parameters (PyTorch's form of the same expression).
        self._eps_t[()] = hyper["eps"] * root_bc2
        if not isinstance(lr, np.ndarray):
            self._step_size[()] = lr * root_bc2 / bc1
            return self._step_size
        # One lr per parameter (replicas trained with one lr each): a step size vector.
        step = self._step_vector
        if step is None:
            step = self._step_vector = np.empty(self._n, dtype=self._dtype)
        np.multiply(lr, root_bc2, out=step)
        np.divide(step, bc1, out=step)
        return step

    def _ops(self, params: np.ndarray, g: np.ndarray, step: np.ndarray) -> list:
        m, v, tmp = self._m, self._v, self._tmp
        mul, add = np.multiply, np.add
        # m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g**2, in the reference's order of
        # operations; then params -= step * m / (sqrt(v) + eps_t).
        return [
            partial(mul, m, self._b1, m), partial(mul, g, self._1_b1, tmp),
            partial(add, m, tmp, m),
            partial(mul, v, self._b2, v), partial(mul, g, self._1_b2, tmp),
            partial(mul, tmp, g, tmp), partial(add, v, tmp, v),
            partial(np.sqrt, v, tmp), partial(add, tmp, self._eps_t, tmp),
            partial(np.divide, m, tmp, tmp), partial(mul, tmp, step, tmp),
            partial(np.subtract, params, tmp, params),
        ]


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as PyTorch's AdamW.

    ``w -= lr * weight_decay * w`` on the weights, then the Adam step on the gradient
    without the L2 term. Default ``weight_decay`` is 0.01.
    """

    name = "adamw"
    default_weight_decay = 0.01
    decoupled_weight_decay = True


#: Optimiser classes keyed by the names users type in ``optimizer.name``.
OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam, AdamW)
}


def make_optimizer(
    name: str,
    lr: float | None = None,
    weight_decay: float | None = None,
    l1: float = 0.0,
    schedule: str = "constant",
    schedule_params: Mapping[str, Any] | None = None,
    **hyper: Any,
) -> Optimizer:
    """Build an optimiser by name (a key of :data:`OPTIMIZERS`).

    Parameters
    ----------
    name : str
        ``sgd``, ``momentum``, ``nesterov``, ``adagrad``, ``rmsprop``, ``adam``, ``adamw``.
    lr : float, optional
        Base learning rate (> 0); default 0.01, or 0.001 for ``adam``/``adamw``.
    weight_decay : float, optional
        L2 penalty on the weights (>= 0); default 0.0, or 0.01 for ``adamw`` (decoupled).
    l1 : float, default 0.0
        L1 penalty on the weights (>= 0).
    schedule : str, default "constant"
        A key of :data:`SCHEDULES`.
    schedule_params : mapping, optional
        The schedule's parameters.
    **hyper
        The optimiser's hyper-parameters: ``momentum`` (momentum, nesterov; 0.9),
        ``eps`` (adagrad 1e-10; rmsprop, adam, adamw 1e-8), ``rho`` (rmsprop; 0.9),
        ``beta1`` / ``beta2`` (adam, adamw; 0.9 / 0.999).

    Returns
    -------
    Optimizer
        Unbound; call :meth:`Optimizer.bind` before stepping.

    Raises
    ------
    ValueError
        Unknown name, schedule or hyper-parameter, or a value out of range; the message
        is one line ``<argument>=<value>: <what is allowed>`` (``lr=-1: must be a
        positive number``, ``schedule_params.gamma=2: ...``).
    """
    _known("optimizer", "name", name, OPTIMIZERS)
    return OPTIMIZERS[name](
        lr=lr,
        weight_decay=weight_decay,
        l1=l1,
        schedule=schedule,
        schedule_params=schedule_params,
        **hyper,
    )
