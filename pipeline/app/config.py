"""The configuration schema, its value checks, and helpers shared by ``train.py`` and the app.

The YAML files under ``conf/`` hold the values; the dataclasses here hold the types. They
are registered in Hydra's ConfigStore by :func:`register_configs`: ``base_config`` (the
whole tree, first in ``conf/config.yaml``'s defaults list) and one schema per dataset and
optimiser option (``schema/dataset/<name>``, ``schema/optimizer/<name>``, pulled in by
each option's own defaults list), so omegaconf converts and type-checks every value and
refuses an override of a key that does not exist.

Two things the schema alone cannot do, :func:`validate` does before anything is trained
or logged:

- refuse keys added with ``+`` (Hydra opens the struct flag for them, so
  ``+trainer.epoch=5`` would otherwise be accepted silently and ignored);
- check values: ranges, known names (from the engine's registries), a loss that fits the
  output layer, a batch that fits in the training split.

Every error is a :class:`ConfigError` whose ``str`` is one line,
``<key>=<bad value>: <what is allowed>``; :func:`as_config_error` turns omegaconf's and
Hydra's own composition errors into the same form, so ``train.py`` can print one line
instead of a traceback.

Hydra is imported lazily (only :func:`register_configs`, :func:`load_config` and
:func:`as_config_error` need it); the rest works on any ``DictConfig`` or plain mapping.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from pipeline.paths import project_root

__all__ = [
    "CONF_DIR",
    "Config",
    "ConfigError",
    "DATASET_SCHEMAS",
    "DatasetConfig",
    "ModelConfig",
    "OPTIMIZER_SCHEMAS",
    "OptimizerConfig",
    "TrackingConfig",
    "TrainerConfig",
    "as_config_error",
    "dataset_kwargs",
    "expected_classes",
    "flat_params",
    "load_config",
    "optimizer_kwargs",
    "project_root",
    "register_configs",
    "resolve_head",
    "run_name",
    "validate",
]

#: numpy's and sklearn's seeds must lie in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1


# ======================================================================================
# Paths
# ======================================================================================
#: Directory of the YAML configs (``conf/config.yaml`` is the primary one).
CONF_DIR = project_root() / "conf"


# ======================================================================================
# Schema. Defaults mirror the YAML files; the YAML is what users read and edit.
# ======================================================================================
@dataclass
class DatasetConfig:
    """Options every dataset takes (``moons`` and ``xor`` take only these)."""

    name: str = MISSING  # key of pipeline.data.datasets.DATASETS; set by the option file
    n_samples: int | None = 500  # rows before the split; null only for csv (= every row)
    noise: float = 0.2  # generator-specific noise level, >= 0
    test_fraction: float = 0.25  # share held out for testing, in (0, 1); stratified
    # Share of the training part held out for validation, in [0, 1): what early stopping,
    # a sweep's best run and a search's objective are chosen on. 0 = none (nothing is
    # selected; training stops only on epochs).
    val_fraction: float = 0.2
    seed: int = 0  # generator and split seed (the model has trainer.seed)


@dataclass
class CirclesConfig(DatasetConfig):
    factor: float = 0.5  # inner radius / outer radius, in (0, 1)


@dataclass
class QuadrantsConfig(DatasetConfig):
    classes: int = 4  # 4 = by quadrant, 2 = by the sign of x*y


@dataclass
class SpiralsConfig(DatasetConfig):
    classes: int = 2  # number of arms, >= 2
    turns: float = 1.0  # full turns per arm, > 0


@dataclass
class BlobsConfig(DatasetConfig):
    classes: int = 3  # number of blobs, >= 2


@dataclass
class LinearConfig(DatasetConfig):
    margin: float = 0.1  # gap between each class and the separating line, >= 0


@dataclass
class CsvConfig(DatasetConfig):
    path: str = "data/example.csv"  # relative to the project root, or absolute
    label_column: str = "label"
    feature_columns: list[str] | None = None  # null = the two columns besides the label
    classes: int | None = None  # null = whatever the file holds
    n_samples: int | None = None  # null = every row
    noise: float = 0.0


#: Schema of each dataset option, keyed by ``dataset.name``.
DATASET_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "moons": DatasetConfig,
    "circles": CirclesConfig,
    "xor": DatasetConfig,
    "quadrants": QuadrantsConfig,
    "spirals": SpiralsConfig,
    "blobs": BlobsConfig,
    "linear": LinearConfig,
    "csv": CsvConfig,
}

#: Number of classes of the generators whose class count is fixed.
_FIXED_CLASSES = {"moons": 2, "circles": 2, "xor": 2, "linear": 2}


@dataclass
class ActivationParams:
    """Parameters of the parametrised activations (ignored by the others)."""

    slope: float = 0.01  # leaky_relu: slope for z < 0
    alpha: float = 1.0  # elu: value approached as z -> -inf


@dataclass
class ModelConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [16, 16])  # >= 1 layer
    # A name for every hidden layer, or a list with one name per layer. Typed Any because
    # omegaconf 2.3 has no Union[str, list[str]]; validate() checks it.
    activation: Any = "tanh"
    activation_params: ActivationParams = field(default_factory=ActivationParams)
    output: str = "auto"  # auto = sigmoid for 2 classes, softmax for more; or a name
    loss: str = "auto"  # auto = the loss that fits the output (bce, cross_entropy, mse)
    init: str = "xavier_uniform"  # key of pipeline.engine.init.INITIALIZERS
    bias: bool = True


@dataclass
class ScheduleParams:
    """Learning-rate schedule parameters; null = the schedule's default (pipeline.engine.optim)."""

    step_size: int | None = None  # step: epochs between decays
    gamma: float | None = None  # step, exponential: factor per decay, in (0, 1]
    t_max: int | None = None  # cosine: epoch reaching min_lr (null = trainer.epochs)
    min_lr: float | None = None  # cosine: final lr, in [0, lr]
    power_t: float | None = None  # inverse_scaling: lr / epoch**power_t, >= 0


@dataclass
class OptimizerConfig:
    """Options every optimiser takes (``sgd`` takes only these)."""

    name: str = MISSING  # key of pipeline.engine.optim.OPTIMIZERS; set by the option file
    lr: float = 0.01  # base learning rate, > 0
    weight_decay: float = 0.0  # L2 on the weights (decoupled for adamw), >= 0
    l1: float = 0.0  # L1 on the weights, >= 0
    schedule: str = "constant"  # key of pipeline.engine.optim.SCHEDULES
    schedule_params: ScheduleParams = field(default_factory=ScheduleParams)


@dataclass
class MomentumConfig(OptimizerConfig):
    momentum: float = 0.9  # in [0, 1)


@dataclass
class AdaGradConfig(OptimizerConfig):
    eps: float = 1e-10  # > 0


@dataclass
class RMSPropConfig(OptimizerConfig):
    rho: float = 0.9  # in [0, 1)
    eps: float = 1e-8  # > 0


@dataclass
class AdamConfig(OptimizerConfig):
    beta1: float = 0.9  # in [0, 1)
    beta2: float = 0.999  # in [0, 1)
    eps: float = 1e-8  # > 0


#: Schema of each optimiser option, keyed by ``optimizer.name``.
OPTIMIZER_SCHEMAS: dict[str, type[OptimizerConfig]] = {
    "sgd": OptimizerConfig,
    "momentum": MomentumConfig,
    "nesterov": MomentumConfig,
    "adagrad": AdaGradConfig,
    "rmsprop": RMSPropConfig,
    "adam": AdamConfig,
    "adamw": AdamConfig,
}


@dataclass
class TrainerConfig:
    epochs: int = 300  # >= 1
    batch_size: int | None = None  # null = full batch; at most the training split
    seed: int = 0  # initial weights and batch order
    dtype: str = "float32"  # float32 or float64
    eval_every: int = 1  # evaluate and log every n epochs
    patience: int | None = None  # early stopping on the validation loss; null = off
    gradcheck: bool = False  # finite-difference gradient check before training
    explain: bool = False  # the first step worked by the numbers (explain.md)
    replicas: int = 1  # independent copies of the run, >= 1
    # One base learning rate per replica (a learning-rate comparison in one run); null =
    # optimizer.lr for every replica.
    replica_lrs: list[float] | None = None
    progress: Any = "auto"  # auto (terminal only), true or false
    animation_frames: int = 40  # frames of the decision-boundary GIF, >= 1
    threads: Any = "auto"  # BLAS threads: auto or an integer >= 1


@dataclass
class TrackingConfig:
    kind: str = "local"  # local, server or none
    uri: str | None = None  # null = sqlite mlflow.db at the project root (local)
    experiment: str = "backprop"
    run_name: str | None = None  # null = built from the config (run_name())
    log_model: bool = True
    animation: bool = True
    explorer: bool = True  # explorer.html: the run played back, epoch by epoch


@dataclass
class Config:
    """The whole tree; the group nodes are filled by the option files."""

    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING


#: Schema of each top-level section; dataset and optimizer depend on the option chosen.
SECTION_SCHEMAS: dict[str, type] = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "tracking": TrackingConfig,
}


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore and the ``project_root`` resolver.

    Safe to call more than once. ``train.py`` calls it at import; call it before
    composing ``conf/`` yourself (:func:`load_config` does).
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # Schemas live outside the option groups so they are not listed as options.
    for name, schema in DATASET_SCHEMAS.items():
        cs.store(group="schema/dataset", name=name, node=schema)
    for name, schema in OPTIMIZER_SCHEMAS.items():
        cs.store(group="schema/optimizer", name=name, node=schema)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))


def load_config(
    overrides: Iterable[str] = (),
    *,
    check: bool = True,
    return_hydra_config: bool = False,
    config_dir: str | Path | None = None,
) -> DictConfig:
    """Compose ``conf/config.yaml`` with command-line style overrides, as ``train.py`` would.

    For tests and notebooks; must not be called inside a running Hydra app.

    Parameters
    ----------
    overrides : iterable of str
        E.g. ``["dataset=spirals", "optimizer.lr=0.1", "+experiment=xor_2_2_1"]``.
    check : bool
        Run :func:`validate` on the result.
    return_hydra_config : bool
        Keep the ``hydra`` node (sweeper params, output dirs).
    config_dir : path, optional
        Another config directory (default :data:`CONF_DIR`).

    Raises
    ------
    ConfigError
        For any composition error (unknown option or key, wrong type) or a failed check.
    """
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    register_configs()
    try:
        with initialize_config_dir(
            config_dir=str(Path(config_dir or CONF_DIR).resolve()), version_base="1.3"
        ):
            cfg = compose(
                config_name="config", overrides=overrides, return_hydra_config=return_hydra_config
            )
    except Exception as exc:
        err = as_config_error(exc, overrides)
        if err is None:
            raise
        raise err from exc
    if check:
        try:
            validate(cfg)
        except ConfigError as exc:
            raise as_config_error(exc, overrides) from None  # quote values as typed
    return cfg


# ======================================================================================
# Errors
# ======================================================================================
def format_value(value: Any) -> str:
    """A config value as a user would type it in an override (``null``, ``[16, 16]``)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value.strip() else repr(value)
    return str(value)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ConfigError(ValueError):
    """A bad configuration value; ``str(err)`` is one line ``key=value: what is allowed``.

    Attributes
    ----------
    key : str
        Dotted config key (``optimizer.lr``), or a group (``optimizer``) for an option.
    value : str
        The bad value as typed (formatted with :func:`format_value` if not a string).
    allowed : str
        What would be accepted.
    """

    def __init__(
        self, key: str, value: Any, allowed: str, *, raw: bool = False, message: str = ""
    ) -> None:
        self.key = key
        self.value = value if raw and isinstance(value, str) else format_value(value)
        self.allowed = _one_line(allowed)
        # `message` keeps the wording of an engine ValueError that already names its key.
        super().__init__(_one_line(message) or f"{self.key}={self.value}: {self.allowed}")


#: ``<argument>=<value>: <what is allowed>``, how the constructors word a bad value.
_ARGUMENT_ERROR = re.compile(r"^([A-Za-z_][\w.]*)=(.*?): (.+)$")


def keyed_error(
    exc: ValueError, section: str, keys: Mapping[str, str] | None = None
) -> ConfigError | None:
    """A constructor's ``ValueError`` as a :class:`ConfigError` naming the config key.

    The library checks the values it is given and words a bad one as
    ``<argument>=<value>: <what is allowed>`` (``lr=-1: must be a positive number``); it
    knows no config keys. The edge puts them in: ``keys`` maps an argument to its key
    (``{"sizes": "model.hidden_sizes"}``), and any other argument ``a`` is ``section.a``.
    Other arguments named in the message (``must be <= lr=0.1``) get their keys too.
    Returns None for a message not worded that way.
    """
    text = _one_line(str(exc))
    m = _ARGUMENT_ERROR.match(text)
    if m is None:
        return None
    keys = dict(keys or {})
    schema = SECTION_SCHEMAS.get(section)
    section_fields = {name for option in ([schema, *schema.__subclasses__()] if schema else [])
                      for name in _schema_fields(option)}

    def key_of(argument: str) -> str:
        return keys.get(argument) or f"{section}.{argument}"

    argument, value_text, allowed = m.groups()
    named = set(keys) | section_fields
    allowed = re.sub(r"(?<![\w.])([A-Za-z_]\w*)(?==)",
                     lambda w: key_of(w.group(1)) if w.group(1) in named else w.group(1),
                     allowed)
    try:
        value: Any = ast.literal_eval(value_text)  # the constructor shows repr(value)
    except (ValueError, SyntaxError):
        return ConfigError(key_of(argument), value_text, allowed, raw=True)
    return ConfigError(key_of(argument), value, allowed)


@contextmanager
def config_keys(section: str, keys: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise a constructor's bad-value ``ValueError`` as a :class:`ConfigError` naming
    the config key (see :func:`keyed_error`)::

        with config_keys("optimizer"):
            make_optimizer(**optimizer_kwargs(cfg))
    """
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        err = keyed_error(exc, section, keys)
        if err is None:
            raise
        raise err from exc


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _typed_overrides(overrides: Iterable[str] | None) -> dict[str, str]:
    """Map each override's key (without ``+``/``++``/``~``) to its value as typed."""
    out: dict[str, str] = {}
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if sep and not _is_sweep(value):
            out[key.lstrip("+~").strip()] = value
    return out


def _is_sweep(value: str) -> bool:
    """Whether an override value is a multirun sweep (``0.1,1``, ``range(...)``...)."""
    if re.match(r"^\s*(choice|range|interval|glob|tag|shuffle|sort)\(", value):
        return True
    depth = 0
    for ch in value:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            return True
    return False


def _schema_fields(schema: type | None) -> list[str]:
    if schema is None or not dataclasses.is_dataclass(schema):
        return []
    return [f.name for f in dataclasses.fields(schema)]


def _schema_for_path(path: str) -> type | None:
    """Best guess of the schema that holds the keys under ``path`` (``""`` = the root)."""
    if not path:
        return Config
    parts = path.split(".")
    schema: type | None = SECTION_SCHEMAS.get(parts[0])
    for part in parts[1:]:
        fields = {f.name: f.type for f in dataclasses.fields(schema)} if schema else {}
        hint = fields.get(part)
        schema = {
            "ActivationParams": ActivationParams,
            "ScheduleParams": ScheduleParams,
        }.get(str(hint))
    return schema


_TYPE_WORDS = {
    "Integer": "must be an integer",
    "Float": "must be a number",
    "Boolean": "must be true or false",
    "String": "must be a string",
}


def as_config_error(
    exc: BaseException, overrides: Iterable[str] | None = None
) -> ConfigError | None:
    """Turn a Hydra/omegaconf configuration error into a one-line :class:`ConfigError`.

    Parameters
    ----------
    exc : BaseException
        What composing or reading the config raised.
    overrides : iterable of str, optional
        The command-line overrides, to quote the value exactly as the user typed it.

    Returns
    -------
    ConfigError or None
        None when ``exc`` is not a configuration error (a bug, an I/O failure...): the
        caller should re-raise it.
    """
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        InterpolationResolutionError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    typed = _typed_overrides(overrides)
    if isinstance(exc, ConfigError):
        if exc.key in typed and typed[exc.key] != exc.value:
            # Quote the value as typed (`optimizer.lr=0`, not the converted `0.0`).
            return ConfigError(exc.key, typed[exc.key], exc.allowed, raw=True)
        return exc

    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        if group and exc.options:
            options = sorted(exc.options)
            return ConfigError(
                group,
                option,
                f"unknown {group} option; choose one of {', '.join(options)}"
                + _suggest(option, options),
            )
        return ConfigError("config", missing or "?", "config file not found")

    if isinstance(exc, OverrideParseException):
        key, _, value = str(exc.override).partition("=")
        detail = _one_line(exc.message).split(" See https://")[0].rstrip(". ")
        return ConfigError(
            key.lstrip("+~") or "override",
            value,
            f"cannot parse this override ({detail}); quote lists like 'key=[1,2]'",
            raw=True,
        )

    cause = exc.__cause__ if isinstance(exc, ConfigCompositionException) else exc
    if isinstance(cause, OmegaConfBaseException):
        key = str(getattr(cause, "full_key", "") or "")
        msg = str(getattr(cause, "msg", "") or str(cause)).splitlines()[0]
        # hidden_sizes[0] -> hidden_sizes: users typed the whole list
        base_key = re.sub(r"\[\d+\]$", "", key)
        value: Any = typed.get(base_key, typed.get(key, getattr(cause, "value", None)))
        raw = base_key in typed or key in typed
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in" in msg + str(
            cause
        ):
            parent, _, leaf = key.rpartition(".")
            object_type = getattr(cause, "object_type", None)
            fields = _schema_fields(object_type) or _schema_fields(_schema_for_path(parent))
            where = parent or "the config root"
            allowed = (
                f"unknown key; {where} takes {', '.join(fields)}" + _suggest(leaf, fields)
                if fields
                else f"unknown key in {where}"
            )
            return ConfigError(key or "config", value, allowed, raw=raw)
        if isinstance(cause, ValidationError):
            if "is not Optional" in msg:
                return ConfigError(base_key, "null", "must not be null", raw=True)
            m = re.search(r"could not be converted to (\w+)", msg)
            if m:
                allowed = _TYPE_WORDS.get(m.group(1), f"must be of type {m.group(1)}")
                if base_key != key:
                    allowed = allowed.replace("must be", "every item must be")
                return ConfigError(base_key, value, allowed, raw=raw)
            if "is not a ListConfig" in msg:
                return ConfigError(base_key, value, "must be a list, like [16, 16]", raw=raw)
            if "is not a subclass of" in msg or "Invalid type assigned" in msg:
                return ConfigError(base_key, value, "must be a single value, not a mapping")
            return ConfigError(base_key or "config", value, msg, raw=raw)
        if isinstance(cause, MissingMandatoryValue):
            return ConfigError(key, "???", "must be set")
        if isinstance(cause, InterpolationResolutionError):
            return ConfigError(key, value, f"cannot be resolved ({msg})", raw=raw)
        return ConfigError(key or "config", value, msg, raw=raw)

    if isinstance(exc, ValueError) and not isinstance(exc, OmegaConfBaseException):
        # The engine's own checks (pipeline.data.datasets, pipeline.engine.optim...) raise
        # ValueError messages that start with the config key: "dataset.path='x.csv': no such file".
        text = _one_line(str(exc))
        m = re.match(rf"^((?:{'|'.join(SECTION_SCHEMAS)})(?:\.\w+)+)(?:=(\S+?))?[:;,]?\s", text)
        if m:
            return ConfigError(m.group(1), m.group(2) or "", text, raw=True, message=text)
        return None

    if isinstance(exc, ConfigCompositionException):
        text = str(exc)
        first = text.splitlines()[0] if text else type(exc).__name__
        m = re.search(r"Could not (?:override|delete|append to config)[^']*'([^']+)'", text)
        if m:
            key = m.group(1)
            value = typed.get(key, "")
            if "An item is already at" in text:
                return ConfigError(
                    key, value, "already set; drop the leading '+' to change it", raw=True
                )
            if "No match in the defaults list" in text:
                groups = [n for n in _schema_fields(Config)]
                return ConfigError(
                    key,
                    value,
                    f"unknown config group; groups: {', '.join(groups)}, +experiment, +sweep"
                    + _suggest(key, groups),
                    raw=True,
                )
            if "Key" in text and "not" in text:
                return ConfigError(key, value, "unknown key", raw=True)
            return ConfigError(key, value, _one_line(first), raw=True)
        m = re.search(r"override (\S+?)=(\S*)", text)
        if m:
            return ConfigError(m.group(1).lstrip("+~"), m.group(2), _one_line(first), raw=True)
        return ConfigError("config", "", _one_line(first), raw=True)
    return None


# ======================================================================================
# Registries, imported lazily: a config error is reported without loading numpy's
# heavier users (and the registries are the one source of the names users may type).
# ======================================================================================
_REGISTRIES = {
    "activations": ("engine.activations", "ACTIVATIONS"),
    "losses": ("engine.losses", "LOSSES"),
    "init": ("engine.init", "INITIALIZERS"),
    "optim": ("engine.optim", "OPTIMIZERS"),
    "schedules": ("engine.optim", "SCHEDULES"),
    "data": ("data.datasets", "DATASETS"),
}


def _names(kind: str) -> tuple[str, ...]:
    """Known names of one registry (``ACTIVATIONS``, ``LOSSES``, ``OPTIMIZERS``, ...)."""
    import importlib

    module_name, attr = _REGISTRIES[kind]
    return tuple(getattr(importlib.import_module(f"pipeline.{module_name}"), attr))


def _hidden_activations() -> tuple[str, ...]:
    from pipeline.engine.activations import HIDDEN_ACTIVATIONS

    return HIDDEN_ACTIVATIONS


def _loss_outputs(loss: str) -> tuple[str, ...] | None:
    """Output activations ``loss`` is defined on (None: any), or None for an unknown loss."""
    from pipeline.engine.losses import LOSSES

    return LOSSES[loss].outputs if loss in LOSSES else None


# ======================================================================================
# Derived settings shared by validate() and the app
# ======================================================================================
def expected_classes(dataset: Mapping[str, Any]) -> int | None:
    """Number of classes a dataset config will produce, or None when only the data knows.

    Parameters
    ----------
    dataset : mapping
        The ``dataset`` node.
    """
    name = dataset.get("name")
    if name in _FIXED_CLASSES:
        return _FIXED_CLASSES[name]
    classes = dataset.get("classes")
    return classes if isinstance(classes, int) and not isinstance(classes, bool) else None


#: What ``output: auto`` becomes when the loss is set: the output that loss needs.
_OUTPUT_FOR_LOSS = {"bce": "sigmoid", "cross_entropy": "softmax", "hinge": "identity"}


def resolve_head(output: str, loss: str, n_classes: int) -> tuple[str, str, int]:
    """Resolve ``model.output``/``model.loss`` (``auto``) and the number of output units.

    Rules: ``output: auto`` is the output the loss needs (bce -> sigmoid, cross_entropy ->
    softmax, hinge -> identity), else sigmoid for 2 classes and softmax for more.
    ``loss: auto`` is bce for sigmoid, cross_entropy for softmax, mse otherwise. For 2
    classes a sigmoid or tanh output, or a hinge loss, uses 1 unit (label 0/1 or +-1);
    everything else uses one unit per class (one-hot targets).

    Parameters
    ----------
    output, loss : str
        As configured (``auto`` or a name).
    n_classes : int
        Classes in the data (>= 2).

    Returns
    -------
    (output, loss, n_outputs) : tuple of (str, str, int)
    """
    if output == "auto":
        output = _OUTPUT_FOR_LOSS.get(loss) or ("sigmoid" if n_classes == 2 else "softmax")
    if loss == "auto":
        loss = {"sigmoid": "bce", "softmax": "cross_entropy"}.get(output, "mse")
    binary_single = output in ("sigmoid", "tanh") or loss == "hinge"
    n_outputs = 1 if n_classes == 2 and binary_single and output != "softmax" else n_classes
    return output, loss, n_outputs


def _plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a config, without its ``hydra`` node.

    The ``hydra`` node is skipped rather than resolved: outside a running job some of its
    interpolations (``hydra.job.num``) have no value.
    """
    if isinstance(cfg, DictConfig):
        out: dict[str, Any] = {}
        for key in cfg.keys():
            if key == "hydra":
                continue
            value = cfg[key]  # resolves an interpolated scalar
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            out[str(key)] = value
        return out
    if isinstance(cfg, ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def dataset_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments for ``make_dataset(name, **kwargs)`` (name excluded).

    Parameters
    ----------
    cfg : DictConfig or mapping
        The whole config or its ``dataset`` node.
    """
    node = _plain(cfg)
    node = node.get("dataset", node)
    kwargs = {k: v for k, v in node.items() if k != "name"}
    # csv: null means "whatever the file holds"; make_dataset takes absence for that.
    for key in ("classes", "feature_columns"):
        if kwargs.get(key, 0) is None:
            kwargs.pop(key)
    return kwargs


def optimizer_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments for ``pipeline.engine.optim.make_optimizer(**kwargs)`` (name included).

    Schedule parameters left null are dropped (the schedule's default applies), except
    the cosine schedule's ``t_max``, which defaults to ``trainer.epochs``.

    Parameters
    ----------
    cfg : DictConfig or mapping
        The whole config (the cosine default needs ``trainer.epochs``).
    """
    root = _plain(cfg)
    kwargs = dict(root["optimizer"])
    params = {k: v for k, v in dict(kwargs.pop("schedule_params", None) or {}).items()}
    params = {k: v for k, v in params.items() if v is not None}
    if kwargs.get("schedule") == "cosine" and "t_max" not in params:
        params["t_max"] = root["trainer"]["epochs"]
    kwargs["schedule_params"] = params
    return kwargs


def run_name(cfg: Any) -> str:
    """``tracking.run_name`` or one built from the config: ``moons-16x16-tanh-adam-lr0.01-s0``.

    A list of activations is joined with ``+``; the seed is ``trainer.seed``.
    """
    root = _plain(cfg)
    given = (root.get("tracking") or {}).get("run_name")
    if given:
        return str(given)
    model, opt = root["model"], root["optimizer"]
    sizes = "x".join(str(s) for s in model["hidden_sizes"]) or "linear"
    act = model["activation"]
    act = "+".join(act) if isinstance(act, list) else str(act)
    return (
        f"{root['dataset']['name']}-{sizes}-{act}-{opt['name']}"
        f"-lr{opt['lr']:g}-s{root['trainer']['seed']}"
    )


def flat_params(cfg: Any, *, sep: str = ".") -> dict[str, Any]:
    """The resolved config flattened to dotted keys, for ``mlflow.log_params``.

    Lists become compact JSON strings (``"[16, 16]"``) so they read as typed on the
    command line; the ``hydra`` node, if present, is left out.
    """
    root = _plain(cfg)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if not prefix and key == "hydra":
                    continue
                walk(f"{prefix}{sep}{key}" if prefix else str(key), value)
        elif isinstance(node, (list, tuple)):
            out[prefix] = json.dumps(node)
        else:
            out[prefix] = node

    walk("", root)
    return out


# ======================================================================================
# validate()
# ======================================================================================
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(key: str, v: Any, low: int, *, nullable: str = "") -> None:
    if v is None and nullable:
        return
    if not _is_int(v) or v < low:
        prefix = f"must be null ({nullable}) or" if nullable else "must be"
        raise ConfigError(key, v, f"{prefix} an integer >= {low}")


def _number(key: str, v: Any, what: str, ok: bool | None = None) -> None:
    if not _is_num(v) or (ok is not None and not ok):
        raise ConfigError(key, v, what)


def _known(key: str, v: Any, known: Sequence[str], kind: str, extra: Sequence[str] = ()) -> None:
    choices = [*extra, *known]
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(
            key, v, f"unknown {kind}; choose one of {', '.join(choices)}" + _suggest(v, choices)
        )


def _check_keys(node: Any, schema: type, path: str) -> None:
    """Refuse keys of ``node`` that ``schema`` does not declare (recursing into sub-schemas)."""
    if not isinstance(node, Mapping):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        if not path and key == "hydra":
            continue
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            where = path or "the config root"
            raise ConfigError(
                full,
                value,
                f"unknown key; {where} takes {', '.join(fields)}" + _suggest(key, fields),
            )
        sub = _schema_for_path(full) if path else None
        if sub is not None and isinstance(value, Mapping):
            _check_keys(value, sub, full)


def _schema_of(section: str, node: Mapping[str, Any], typed: Any) -> type:
    """The schema a section must follow: from its option (dataset, optimizer) or fixed."""
    if section == "dataset":
        schema: type = DATASET_SCHEMAS.get(node.get("name"), DatasetConfig)
    elif section == "optimizer":
        schema = OPTIMIZER_SCHEMAS.get(node.get("name"), OptimizerConfig)
    else:
        return SECTION_SCHEMAS[section]
    # A typed node (composed by Hydra) must carry the schema of its name: an override of
    # dataset.name / optimizer.name alone would otherwise mix two options' settings.
    actual = OmegaConf.get_type(typed) if isinstance(typed, DictConfig) else None
    if (
        actual is not None
        and dataclasses.is_dataclass(actual)
        and actual is not dict
        and actual is not schema
        and not issubclass(schema, actual)
    ):
        raise ConfigError(
            f"{section}.name",
            node.get("name"),
            f"does not match the selected {section} option; choose it with "
            f"{section}={node.get('name')} instead",
        )
    return schema


def validate(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Check a composed config before anything is trained or logged.

    Checks, in order: no unknown keys (including ones added with ``+``), then every
    section's values (types, ranges, known names, a loss that fits the output, a batch
    that fits the training split, a CSV that exists).

    Parameters
    ----------
    cfg : DictConfig or mapping
        The composed config (a ``hydra`` node, if present, is ignored).

    Raises
    ------
    ConfigError
        The first problem found, as one line ``key=value: what is allowed``.
    """
    typed = cfg if isinstance(cfg, DictConfig) else None
    try:
        root = _plain(cfg)
    except Exception as exc:  # interpolation errors, missing mandatory values
        err = as_config_error(exc)
        if err is None:
            raise
        raise err from exc
    if not isinstance(root, Mapping):
        raise ConfigError("config", root, "must be a mapping of the config groups")

    _check_keys(root, Config, "")
    for section in SECTION_SCHEMAS:
        if not isinstance(root.get(section), Mapping):
            raise ConfigError(
                section, root.get(section), f"missing; pick an option with {section}=NAME"
            )
    for section in SECTION_SCHEMAS:
        node = root[section]
        schema = _schema_of(section, node, typed[section] if typed is not None else None)
        _check_keys(node, schema, section)
        missing = [f.name for f in dataclasses.fields(schema) if f.name not in node]
        if missing:
            raise ConfigError(f"{section}.{missing[0]}", "???", "must be set")

    _check_dataset(root)
    _validate_model(root["model"], expected_classes(root["dataset"]))
    _check_optimizer(root)
    _validate_trainer(root["trainer"], root["dataset"])
    _validate_tracking(root["tracking"])


def _check_dataset(root: Mapping[str, Any]) -> None:
    """The data set's values, checked by the constructor that uses them (which makes the
    data: a few milliseconds for the generators, one read of a CSV)."""
    from pipeline.data.datasets import make_dataset

    with config_keys("dataset"):
        make_dataset(root["dataset"]["name"], **dataset_kwargs(root))


def _validate_model(m: Mapping[str, Any], n_classes: int | None) -> None:
    sizes = m["hidden_sizes"]
    if not isinstance(sizes, list) or not sizes:
        raise ConfigError(
            "model.hidden_sizes", sizes, "must be a non-empty list of widths, like [16, 16]"
        )
    if not all(_is_int(s) and s >= 1 for s in sizes):
        raise ConfigError("model.hidden_sizes", sizes, "every width must be an integer >= 1")

    hidden = _hidden_activations()
    act = m["activation"]
    acts = act if isinstance(act, list) else [act]
    if isinstance(act, list) and len(act) != len(sizes):
        raise ConfigError(
            "model.activation",
            act,
            f"must be one name, or a list of {len(sizes)} names "
            f"(one per layer of model.hidden_sizes={format_value(sizes)})",
        )
    for a in acts:
        if not isinstance(a, str) or a not in hidden:
            output_only = isinstance(a, str) and a in _names("activations")
            raise ConfigError(
                "model.activation",
                act,
                (
                    "can be used on the output layer only (model.output); "
                    if output_only
                    else "unknown activation; "
                )
                + f"hidden layers take one of {', '.join(hidden)}"
                + ("" if output_only else _suggest(a, hidden)),
            )
    params = m["activation_params"]
    _number("model.activation_params.slope", params["slope"], "must be a finite number")
    a = params["alpha"]
    _number("model.activation_params.alpha", a, "must be a number > 0", _is_num(a) and a > 0)

    outputs = _names("activations")
    _known("model.output", m["output"], outputs, "output activation", extra=("auto",))
    losses = _names("losses")
    _known("model.loss", m["loss"], losses, "loss", extra=("auto",))
    _known("model.init", m["init"], _names("init"), "initialiser")
    if not isinstance(m["bias"], bool):
        raise ConfigError("model.bias", m["bias"], "must be true or false")
    _check_head(m["output"], m["loss"], n_classes, losses)


def _check_head(output: str, loss: str, n_classes: int | None, losses: Sequence[str]) -> None:
    """Refuse a loss that is not defined on the (resolved) output layer."""
    k = n_classes or 2
    out, lossname, n_units = resolve_head(output, loss, k)
    fits = _loss_outputs(lossname)
    if fits is not None and out not in fits:
        good = [
            name for name in losses if _loss_outputs(name) is None or out in _loss_outputs(name)
        ]
        key, value = ("model.loss", loss) if loss != "auto" else ("model.output", output)
        raise ConfigError(
            key,
            value,
            f"does not fit the {out} output layer ({lossname} needs {' or '.join(fits)}); "
            f"with {out} use one of {', '.join(good)}, or set model.output={fits[0]}",
        )
    from pipeline.engine.losses import LOSSES

    if lossname in LOSSES:
        try:
            LOSSES[lossname].check_output(out, n_units)
        except ValueError as exc:
            raise ConfigError("model.loss", loss, str(exc)) from None


def _check_optimizer(root: Mapping[str, Any]) -> None:
    """The optimiser's values, checked by the constructor that uses them."""
    from pipeline.engine.optim import make_optimizer

    with config_keys("optimizer"):
        make_optimizer(**optimizer_kwargs(root))


def _validate_trainer(t: Mapping[str, Any], d: Mapping[str, Any]) -> None:
    _int_at_least("trainer.epochs", t["epochs"], 1)
    _int_at_least("trainer.batch_size", t["batch_size"], 1, nullable="full batch")
    seed = t["seed"]
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError("trainer.seed", seed, "must be an integer in [0, 2**32-1]")
    if t["dtype"] not in ("float32", "float64"):
        raise ConfigError("trainer.dtype", t["dtype"], "must be float32 or float64")
    _int_at_least("trainer.eval_every", t["eval_every"], 1)
    _int_at_least("trainer.patience", t["patience"], 1, nullable="no early stopping")
    if not isinstance(t["gradcheck"], bool):
        raise ConfigError("trainer.gradcheck", t["gradcheck"], "must be true or false")
    _int_at_least("trainer.replicas", t["replicas"], 1)
    lrs = t.get("replica_lrs")
    if lrs is not None:
        if any(not _is_num(v) or not 0 < v < math.inf for v in lrs):
            raise ConfigError("trainer.replica_lrs", list(lrs),
                              "must be null or positive learning rates, one per replica")
        if len(lrs) != t["replicas"]:
            raise ConfigError(
                "trainer.replica_lrs", list(lrs),
                f"gives {len(lrs)} learning rate(s) for trainer.replicas={t['replicas']}: "
                f"one per replica (or set trainer.replicas={len(lrs)})",
            )
    if t["progress"] not in ("auto", True, False) or _is_int(t["progress"]):
        raise ConfigError("trainer.progress", t["progress"], "must be auto, true or false")
    _int_at_least("trainer.animation_frames", t["animation_frames"], 1)
    threads = t["threads"]
    if threads != "auto" and not (_is_int(threads) and threads >= 1):
        raise ConfigError("trainer.threads", threads, "must be auto or an integer >= 1")

    batch, n, tf = t["batch_size"], d.get("n_samples"), d["test_fraction"]
    vf = d.get("val_fraction") or 0.0
    if batch is not None and n is not None:
        n_train = n - math.ceil(tf * n)  # sklearn's train_test_split sizes
        n_train -= math.ceil(vf * n_train)
        if batch > n_train:
            raise ConfigError(
                "trainer.batch_size",
                batch,
                f"must be null (full batch) or at most {n_train}, the training split of "
                f"dataset.n_samples={n} with dataset.test_fraction={format_value(tf)} and "
                f"dataset.val_fraction={format_value(vf)}",
            )
    if t["patience"] is not None and not vf:
        raise ConfigError("trainer.patience", t["patience"],
                          "early stopping needs a validation split: set dataset.val_fraction "
                          "> 0 (it never stops on the test split), or trainer.patience=null")


def _validate_tracking(tr: Mapping[str, Any]) -> None:
    kind = tr["kind"]
    _known("tracking.kind", kind, ("local", "server", "none"), "tracking kind")
    uri = tr["uri"]
    if uri is not None and (not isinstance(uri, str) or not uri.strip()):
        raise ConfigError("tracking.uri", uri, "must be null or a tracking URI")
    if kind == "server" and not (isinstance(uri, str) and re.match(r"^https?://[^/\s]+", uri)):
        raise ConfigError(
            "tracking.uri",
            uri,
            "must be an http(s) URL of an MLflow server, like http://127.0.0.1:5000",
        )
    exp = tr["experiment"]
    if not isinstance(exp, str) or not exp.strip():
        raise ConfigError("tracking.experiment", exp, "must be a non-empty name")
    name = tr["run_name"]
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(
            "tracking.run_name", name, "must be null (built from the config) or a name"
        )
    for key in ("log_model", "animation"):
        if not isinstance(tr[key], bool):
            raise ConfigError(f"tracking.{key}", tr[key], "must be true or false")
