"""Tests of the config tree (conf/), its schema and validate() (pipeline/app/config.py), train.py.

Most tests compose the real ``conf/`` in-process with Hydra's compose API
(``pipeline.app.config.load_config``); two run the real ``python train.py`` with a bad
override and check the one-line error, the exit status and that nothing was tracked.
"""

from __future__ import annotations

import copy
import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.app.config import (
    CONF_DIR,
    DATASET_SCHEMAS,
    OPTIMIZER_SCHEMAS,
    Config,
    ConfigError,
    as_config_error,
    dataset_kwargs,
    expected_classes,
    flat_params,
    load_config,
    optimizer_kwargs,
    project_root,
    resolve_head,
    run_name,
    validate,
)

ROOT = project_root()
GROUPS = ("dataset", "model", "optimizer", "trainer", "tracking")


def options(group: str) -> list[str]:
    """Option names of a config group: the YAML files in its folder."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUP_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


@pytest.fixture(scope="module")
def default_cfg():
    return load_config()


def changed(cfg, **values):
    """A copy of a composed config with dotted keys set (``model__loss="mse"``).

    Composing takes ~0.3 s; tables of value checks that do not depend on composition
    (every loss x output, every sweep job) change a composed copy and validate that.
    """
    new = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(new, key.replace("__", "."), value, merge=False)
    return new


# ------------------------------------------------------------------------------ defaults


def test_defaults_compose_and_validate(default_cfg):
    cfg = default_cfg
    assert OmegaConf.get_type(cfg) is Config
    assert cfg.dataset.name == "moons"
    assert list(cfg.model.hidden_sizes) == [16, 16]
    assert cfg.model.activation == "tanh"
    assert cfg.model.output == "auto" and cfg.model.loss == "auto"
    assert cfg.model.init == "xavier_uniform" and cfg.model.bias is True
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 0.01
    assert cfg.trainer.batch_size is None and cfg.trainer.dtype == "float32"
    assert cfg.trainer.epochs >= 1
    assert cfg.tracking.kind == "local" and cfg.tracking.uri is None
    assert cfg.tracking.experiment == "backprop" and cfg.tracking.run_name is None
    assert set(cfg) == set(GROUPS)
    validate(cfg)


def test_default_keys_are_the_documented_ones(default_cfg):
    assert set(default_cfg.trainer) == {
        "epochs", "batch_size", "seed", "dtype", "eval_every", "patience", "gradcheck", "explain",
        "replicas", "replica_lrs", "progress", "animation_frames", "threads",
    }
    assert set(default_cfg.model) == {
        "hidden_sizes", "activation", "activation_params", "output", "loss", "init", "bias",
    }
    assert set(default_cfg.tracking) == {
        "kind", "uri", "experiment", "run_name", "log_model", "animation", "explorer",
    }
    assert {"name", "n_samples", "noise", "test_fraction", "seed"} <= set(default_cfg.dataset)


def test_hydra_output_dirs_at_project_root():
    cfg = load_config(return_hydra_config=True)
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.run.dir.startswith(str(ROOT / "outputs") + "/")
    assert cfg.hydra.sweep.dir.startswith(str(ROOT / "multirun") + "/")


def test_root_config_lists_every_group():
    text = (CONF_DIR / "config.yaml").read_text()
    for group, default in [
        ("dataset", "moons"), ("model", "mlp"), ("optimizer", "adam"),
        ("trainer", "default"), ("tracking", "local"),
    ]:
        assert f"- {group}: {default}" in text
    assert "- _self_" in text


def test_help_lists_every_option_and_its_examples_work():
    cfg = load_config(return_hydra_config=True)
    lines = cfg.hydra.help.template.splitlines()
    for group in [*GROUPS, "experiment", "sweep"]:
        (line,) = [ln for ln in lines if ln.startswith((f"{group}=", f"+{group}="))]
        assert sorted(line.split("(")[0].split()[1:]) == options(group), group
    examples = [ln for ln in lines if ln.startswith("python train.py ") and " -m " not in ln]
    assert examples
    for line in examples:
        load_config(shlex.split(line, comments=True)[2:])  # as a shell reads it


# ------------------------------------------------------------------------------ groups


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    cfg = load_config([f"{group}={option}"])
    if group in ("dataset", "optimizer"):
        assert cfg[group].name == option
        schema = (DATASET_SCHEMAS if group == "dataset" else OPTIMIZER_SCHEMAS)[option]
        assert OmegaConf.get_type(cfg[group]) is schema


def test_dataset_options_match_the_registry():
    data = pytest.importorskip("pipeline.data.datasets")
    assert set(options("dataset")) == set(data.DATASETS) == set(DATASET_SCHEMAS)


def test_optimizer_options_match_the_registry():
    optim = pytest.importorskip("pipeline.engine.optim")
    assert set(options("optimizer")) == set(optim.OPTIMIZERS) == set(OPTIMIZER_SCHEMAS)


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_yaml_holds_the_engine_hyperparameters(name):
    optim = pytest.importorskip("pipeline.engine.optim")
    cfg = load_config([f"optimizer={name}"])
    common = {"name", "lr", "weight_decay", "l1", "schedule", "schedule_params"}
    hyper = set(cfg.optimizer) - common
    assert hyper == set(optim.OPTIMIZERS[name].defaults)
    for key in hyper:
        assert cfg.optimizer[key] == pytest.approx(optim.OPTIMIZERS[name].defaults[key])
    opt = optim.make_optimizer(**optimizer_kwargs(cfg))
    assert opt.name == name and opt.lr == cfg.optimizer.lr


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_yaml_is_accepted_by_make_dataset(name):
    data = pytest.importorskip("pipeline.data.datasets")
    cfg = load_config([f"dataset={name}"])
    ds = data.make_dataset(name, **dataset_kwargs(cfg))
    k = expected_classes(cfg.dataset)
    if k is not None:
        assert ds.n_classes == k
    if cfg.dataset.n_samples is not None:
        assert ds.n_train + ds.n_val + ds.n_test == cfg.dataset.n_samples


def test_overrides_of_every_group():
    cfg = load_config([
        "dataset=spirals", "dataset.classes=3", "dataset.n_samples=300",
        "model.hidden_sizes=[8,4]", "model.activation=[relu,tanh]", "model.output=softmax",
        "optimizer=momentum", "optimizer.lr=0.2", "optimizer.momentum=0.5",
        "optimizer.schedule=step", "optimizer.schedule_params.step_size=5",
        "trainer.epochs=7", "trainer.batch_size=32", "trainer.dtype=float64",
        "tracking=none", "tracking.experiment=other",
    ])
    assert cfg.dataset.name == "spirals" and cfg.dataset.classes == 3
    assert list(cfg.model.hidden_sizes) == [8, 4]
    assert list(cfg.model.activation) == ["relu", "tanh"]
    assert cfg.optimizer.name == "momentum" and cfg.optimizer.momentum == 0.5
    assert optimizer_kwargs(cfg)["schedule_params"] == {"step_size": 5}
    assert cfg.trainer.epochs == 7 and cfg.trainer.batch_size == 32
    assert cfg.tracking.kind == "none" and cfg.tracking.experiment == "other"


def test_tracking_server_option():
    cfg = load_config(["tracking=server"])
    assert cfg.tracking.kind == "server" and cfg.tracking.uri == "http://127.0.0.1:5000"


# ------------------------------------------------------------------------------ presets

EXPERIMENTS = {
    "circles_2_3_1": {
        "dataset.name": "circles", "model.hidden_sizes": [3], "model.activation": "sigmoid",
        "model.loss": "bce", "optimizer.name": "sgd", "optimizer.lr": 1.0,
        "trainer.epochs": 2000, "trainer.batch_size": None,
    },
    "xor_2_2_1": {
        "dataset.name": "xor", "model.hidden_sizes": [2], "model.activation": "sigmoid",
        "optimizer.name": "sgd", "optimizer.lr": 1.0, "trainer.batch_size": None,
    },
    "quadrants_leaky": {
        "dataset.name": "quadrants", "dataset.classes": 2, "model.hidden_sizes": [3],
        "model.activation": "leaky_relu", "model.loss": "mse", "optimizer.name": "sgd",
        "optimizer.lr": 0.05, "trainer.batch_size": 1,
    },
    "showcase": {"dataset.name": "spirals"},
}


def test_every_experiment_file_is_tested():
    assert set(options("experiment")) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_presets_compose_and_validate(name):
    assert (CONF_DIR / "experiment" / f"{name}.yaml").read_text().startswith(
        "# @package _global_"
    )
    cfg = load_config([f"+experiment={name}"])
    for key, expected in EXPERIMENTS[name].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert value == expected, key
    # Presets hold only what differs: untouched keys keep the group defaults.
    assert cfg.tracking.experiment == "backprop"


def test_experiment_output_layer_for_quadrants_leaky():
    cfg = load_config(["+experiment=quadrants_leaky"])
    output, loss, units = resolve_head(cfg.model.output, cfg.model.loss, 2)
    assert (loss, units) == ("mse", 2)  # one-hot targets, one unit per class


def test_experiment_then_override_wins():
    cfg = load_config(["+experiment=xor_2_2_1", "optimizer.lr=0.5", "trainer.epochs=10"])
    assert cfg.optimizer.lr == 0.5 and cfg.trainer.epochs == 10


def _sweep_values(key: str, spec: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"{key}={spec}"])
    return [f"{key}={v}" for v in override.sweep_string_iterator()]


@pytest.mark.parametrize("name", ["width_x_lr", "depth_x_activation"])
def test_sweep_presets_hold_sweeper_params(name):
    assert options("sweep") == ["depth_x_activation", "optuna", "width_x_lr"]
    cfg = load_config([f"+sweep={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert len(params) == 2
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    axes = [_sweep_values(k, str(v)) for k, v in params.items()]
    assert all(len(axis) >= 3 for axis in axes)
    # Every job of the sweep is a valid config: the first through Hydra, all by value.
    load_config(list(next(itertools.product(*axes))))
    base = load_config()
    for job in itertools.product(*axes):
        values = {}
        for item in job:
            key, _, text = item.partition("=")
            values[key.replace(".", "__")] = yaml.safe_load(text)
        validate(changed(base, **values))


# ------------------------------------------------------------------------------ bad input

# (overrides, the key the one-line message must start with)
BAD_INPUTS = [
    (["trainer.replicas=2", "trainer.replica_lrs=[0.1]"], "trainer.replica_lrs"),
    (["trainer.replicas=2", "trainer.replica_lrs=[0.1,-1]"], "trainer.replica_lrs"),
    (["+trainer.epoch=5"], "trainer.epoch"),
    (["trainer.epoch=5"], "trainer.epoch"),
    (["+model.dropout=0.5"], "model.dropout"),
    (["+optimizer.schedule_params.warmup=3"], "optimizer.schedule_params.warmup"),
    (["+trainer.epochs=5"], "trainer.epochs"),
    (["datset=moons"], "datset"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["trainer.epochs=null"], "trainer.epochs"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["model.bias=maybe"], "model.bias"),
    (["model.hidden_sizes=[a]"], "model.hidden_sizes"),
    (["model.hidden_sizes=16"], "model.hidden_sizes"),
    (["model.hidden_sizes=[0]"], "model.hidden_sizes"),
    (["model.hidden_sizes=[]"], "model.hidden_sizes"),
    (["model.hidden_sizes=[16,-2]"], "model.hidden_sizes"),
    (["model.hidden_sizes=[16"], "model.hidden_sizes"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["optimizer.lr=inf"], "optimizer.lr"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["optimizer.beta1=1.0"], "optimizer.beta1"),
    (["optimizer=sgd", "optimizer.beta1=0.5"], "optimizer.beta1"),
    (["optimizer.name=sgd"], "optimizer.name"),
    (["optimizer=lbfgs"], "optimizer"),
    (["optimizer.schedule=warmup"], "optimizer.schedule"),
    (["optimizer.schedule_params.gamma=0.5"], "optimizer.schedule_params.gamma"),
    (["optimizer.schedule=step", "optimizer.schedule_params.gamma=1.5"],
     "optimizer.schedule_params.gamma"),
    (["dataset.test_fraction=1.5"], "dataset.test_fraction"),
    (["dataset.test_fraction=0"], "dataset.test_fraction"),
    (["dataset.noise=-1"], "dataset.noise"),
    (["dataset.n_samples=3"], "dataset.n_samples"),
    (["dataset.seed=-1"], "dataset.seed"),
    (["dataset=mnist"], "dataset"),
    (["dataset=quadrants", "dataset.classes=3"], "dataset.classes"),
    (["dataset=blobs", "dataset.classes=1"], "dataset.classes"),
    (["dataset=csv", "dataset.path=no/such/file.csv"], "dataset.path"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["trainer.batch_size=301"], "trainer.batch_size"),  # moons: 500 * 0.75 * 0.8 = 300
    (["dataset.val_fraction=1"], "dataset.val_fraction"),
    (["dataset.val_fraction=-0.1"], "dataset.val_fraction"),
    (["dataset.val_fraction=0", "trainer.patience=5"], "trainer.patience"),
    (["trainer.dtype=float16"], "trainer.dtype"),
    (["trainer.replicas=0"], "trainer.replicas"),
    (["trainer.patience=0"], "trainer.patience"),
    (["trainer.eval_every=0"], "trainer.eval_every"),
    (["trainer.threads=0"], "trainer.threads"),
    (["trainer.progress=maybe"], "trainer.progress"),
    (["model.activation=swish"], "model.activation"),
    (["model.activation=softmax"], "model.activation"),
    (["model.activation=[tanh,relu,relu]"], "model.activation"),
    (["model.activation_params.alpha=0"], "model.activation_params.alpha"),
    (["model.output=swish"], "model.output"),
    (["model.loss=huber"], "model.loss"),
    (["model.init=orthogonal"], "model.init"),
    (["model.output=softmax", "model.loss=bce"], "model.loss"),
    (["model.output=identity", "model.loss=cross_entropy"], "model.loss"),
    (["model.output=sigmoid", "model.loss=hinge"], "model.loss"),
    (["+experiment=nope"], "experiment"),
    (["+sweep=nope"], "sweep"),
    (["tracking=cloud"], "tracking"),
    (["tracking.kind=cloud"], "tracking.kind"),
    (["tracking=server", "tracking.uri=null"], "tracking.uri"),
    (["tracking.experiment="], "tracking.experiment"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert "\n" not in message
    assert ": " in message and len(message) < 400
    assert info.value.key == key


def test_replica_lrs_of_the_wrong_length_say_how_to_fix_it():
    with pytest.raises(ConfigError) as info:
        load_config(["trainer.replica_lrs=[0.1,0.01,0.001]"])
    assert str(info.value) == (
        "trainer.replica_lrs=[0.1,0.01,0.001]: gives 3 learning rate(s) for "
        "trainer.replicas=1: one per replica (or set trainer.replicas=3)")
    load_config(["trainer.replicas=3", "trainer.replica_lrs=[0.1,0.01,0.001]"])  # accepted


def test_config_error_format():
    err = ConfigError("optimizer.lr", -1.0, "must be a positive number")
    assert str(err) == "optimizer.lr=-1.0: must be a positive number"
    assert isinstance(err, ValueError)
    assert str(ConfigError("trainer.batch_size", None, "x")) == "trainer.batch_size=null: x"
    assert str(ConfigError("model.hidden_sizes", [0], "x")) == "model.hidden_sizes=[0]: x"


def test_value_is_quoted_as_typed():
    with pytest.raises(ConfigError, match=r"^optimizer\.lr=0: must be a positive number$"):
        load_config(["optimizer.lr=0"])


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"did you mean epochs\?"):
        load_config(["+trainer.epoch=5"])


def test_unknown_option_lists_the_options():
    with pytest.raises(ConfigError) as info:
        load_config(["optimizer=lbfgs"])
    for name in options("optimizer"):
        assert name in str(info.value)


def test_as_config_error_leaves_other_errors_alone():
    assert as_config_error(RuntimeError("boom")) is None
    assert as_config_error(KeyError("x")) is None
    assert as_config_error(ValueError("X contains NaN")) is None


@pytest.mark.parametrize(
    ("message", "key"),
    [
        ("dataset.noise=-1 is invalid; allowed: a number >= 0", "dataset.noise"),
        ("dataset.n_samples: 3 rows are too few to put each of the 2 classes", "dataset.n_samples"),
        ("dataset.label_column='y' has 2 missing\nlabel(s) in /x.csv", "dataset.label_column"),
        ("optimizer.schedule_params.t_max is required for schedule 'cosine'",
         "optimizer.schedule_params.t_max"),
    ],
)
def test_engine_value_errors_naming_a_key_become_one_line(message, key):
    err = as_config_error(ValueError(message))
    assert isinstance(err, ConfigError) and err.key == key
    assert str(err) == " ".join(message.split())


def test_validate_works_on_plain_mappings(default_cfg):
    plain = OmegaConf.to_container(default_cfg)
    validate(plain)
    plain["trainer"]["epoch"] = 5
    with pytest.raises(ConfigError, match=r"^trainer\.epoch=5: unknown key"):
        validate(plain)
    plain = OmegaConf.to_container(default_cfg)
    plain["optimizer"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"^optimizer\.lr=fast"):
        validate(plain)
    plain = OmegaConf.to_container(default_cfg)
    del plain["trainer"]["epochs"]
    with pytest.raises(ConfigError, match=r"^trainer\.epochs"):
        validate(plain)


def test_validate_ignores_the_hydra_node():
    validate(load_config(["+sweep=width_x_lr"], return_hydra_config=True))


def test_csv_dataset_with_a_file_of_our_own(tmp_path):
    path = tmp_path / "points.csv"
    rows = ["a,b,label"] + [f"{i % 7},{i % 5},{'yes' if i % 2 else 'no'}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    cfg = load_config(["dataset=csv", f"dataset.path={path}", "trainer.batch_size=1000"])
    # n_samples: null (every row): the batch size cannot be checked before reading the file.
    assert cfg.dataset.n_samples is None
    kwargs = dataset_kwargs(cfg)
    assert "classes" not in kwargs and "feature_columns" not in kwargs


# ------------------------------------------------------------------------------ registries


def test_every_hidden_activation_is_accepted(default_cfg):
    activations = pytest.importorskip("pipeline.engine.activations")
    load_config(["model.activation=relu"])
    for name, act in activations.ACTIVATIONS.items():
        cfg = changed(default_cfg, model__activation=name)
        if act.output_only:
            with pytest.raises(ConfigError, match="output layer only"):
                validate(cfg)
        else:
            validate(cfg)
            validate(changed(default_cfg, model__activation=[name, "tanh"]))


def test_every_initialiser_and_schedule_is_accepted(default_cfg):
    init = pytest.importorskip("pipeline.engine.init")
    optim = pytest.importorskip("pipeline.engine.optim")
    for name in init.INITIALIZERS:
        validate(changed(default_cfg, model__init=name))
    for name in optim.SCHEDULES:
        cfg = changed(default_cfg, optimizer__schedule=name)
        validate(cfg)
        optim.make_optimizer(**optimizer_kwargs(cfg))  # cosine gets t_max = epochs


@pytest.mark.parametrize("dataset", ["moons", "blobs"])
def test_loss_output_fit_agrees_with_the_engine(dataset):
    losses = pytest.importorskip("pipeline.engine.losses")
    activations = pytest.importorskip("pipeline.engine.activations")
    base = load_config([f"dataset={dataset}"])
    k = expected_classes(base.dataset)
    for output in ["auto", *activations.ACTIVATIONS]:
        for loss in ["auto", *losses.LOSSES]:
            cfg = changed(base, model__output=output, model__loss=loss)
            out, lossname, units = resolve_head(output, loss, k)
            try:
                losses.LOSSES[lossname].check_output(out, units)
                engine_ok = True
            except ValueError:
                engine_ok = False
            if engine_ok:
                validate(cfg)
            else:
                with pytest.raises(ConfigError, match=r"^model\.(loss|output)="):
                    validate(cfg)


@pytest.mark.parametrize(
    ("output", "loss", "k", "expected"),
    [
        ("auto", "auto", 2, ("sigmoid", "bce", 1)),
        ("auto", "auto", 4, ("softmax", "cross_entropy", 4)),
        ("auto", "cross_entropy", 2, ("softmax", "cross_entropy", 2)),
        ("auto", "hinge", 2, ("identity", "hinge", 1)),
        ("auto", "mse", 2, ("sigmoid", "mse", 1)),
        ("softmax", "auto", 2, ("softmax", "cross_entropy", 2)),
        ("identity", "auto", 3, ("identity", "mse", 3)),
        ("leaky_relu", "mse", 2, ("leaky_relu", "mse", 2)),
        ("tanh", "auto", 2, ("tanh", "mse", 1)),
    ],
)
def test_resolve_head(output, loss, k, expected):
    assert resolve_head(output, loss, k) == expected


# ------------------------------------------------------------------------------ helpers


def test_run_name_from_config(default_cfg):
    assert run_name(default_cfg) == "moons-16x16-tanh-adam-lr0.01-s0"
    cfg = load_config(["model.activation=[relu,tanh]", "optimizer=sgd", "optimizer.lr=1",
                       "trainer.seed=3", "dataset=xor"])
    assert run_name(cfg) == "xor-16x16-relu+tanh-sgd-lr1-s3"
    assert run_name(load_config(["tracking.run_name=mine"])) == "mine"


def test_flat_params(default_cfg):
    params = flat_params(default_cfg)
    assert params["optimizer.lr"] == 0.01
    assert params["model.hidden_sizes"] == "[16, 16]"
    assert params["model.activation_params.slope"] == 0.01
    assert params["trainer.batch_size"] is None
    assert not any(k.startswith("hydra") for k in params)
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in params.values())


def test_optimizer_kwargs_cosine_defaults_t_max_to_epochs():
    cfg = load_config(["optimizer.schedule=cosine", "trainer.epochs=50"])
    kwargs = optimizer_kwargs(cfg)
    assert kwargs["schedule_params"] == {"t_max": 50}
    assert kwargs["name"] == "adam" and kwargs["beta1"] == 0.9


# ------------------------------------------------------------------------------ train.py


def _run_train(tmp_path: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    # Anything that slipped past validation would be tracked here, not in the real store.
    environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environ.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides,
         f"hydra.run.dir={tmp_path / 'out'}", f"hydra.sweep.dir={tmp_path / 'multi'}"],
        cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "key"),
    [("+trainer.epoch=5", "trainer.epoch"), ("optimizer.lr=-1", "optimizer.lr")],
)
def test_train_py_bad_override_prints_one_line(tmp_path, override, key):
    proc = _run_train(tmp_path, override)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and lines[0].startswith(f"config error: {key}=")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked


@pytest.mark.slow
def test_train_py_composition_error_and_full_error_switch(tmp_path):
    proc = _run_train(tmp_path, "trainer.epochs=abc")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: trainer.epochs=abc: must be an integer"
    proc = _run_train(tmp_path, "optimizer=lbfgs", HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


@pytest.mark.slow
def test_train_py_bad_csv_is_one_line_and_tracks_nothing(tmp_path):
    # Caught by pipeline.data.datasets when the app loads the file, before any MLflow run starts.
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,x\n3,oops,y\n4,5,x\n6,7,y\n")
    proc = _run_train(tmp_path, "dataset=csv", f"dataset.path={bad}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: dataset."), proc.stderr
    assert "oops" in lines[0] and "Traceback" not in proc.stderr
    if (tmp_path / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert client.search_runs(experiments) == []


def test_a_constructor_message_gets_the_config_key():
    """The library names its argument; the edge puts the config key in front."""
    from pipeline.app.config import keyed_error

    err = keyed_error(ValueError("lr=-1: must be a positive number"), "optimizer")
    assert err.key == "optimizer.lr" and str(err) == "optimizer.lr=-1: must be a positive number"
    # Other arguments the message names get their keys too.
    err = keyed_error(ValueError("schedule_params.min_lr=0.5: must be <= lr=0.1"), "optimizer")
    assert str(err) == "optimizer.schedule_params.min_lr=0.5: must be <= optimizer.lr=0.1"
    # The value as typed in an override: repr's quotes dropped.
    err = keyed_error(ValueError("path='x.csv': no such file"), "dataset")
    assert str(err) == "dataset.path=x.csv: no such file"
    assert keyed_error(ValueError("X contains NaN"), "dataset") is None


def test_the_models_arguments_map_to_their_config_keys():
    from pipeline.app.config import config_keys
    from pipeline.app.job import MODEL_KEYS
    from pipeline.engine.mlp import MLP

    with pytest.raises(ConfigError) as info, config_keys("model", MODEL_KEYS):
        MLP([2, 4, 1], activation="tanh", dtype="float16")
    assert info.value.key == "trainer.dtype"
    assert str(info.value).startswith("trainer.dtype=float16: ")
    with pytest.raises(ConfigError) as info, config_keys("model", MODEL_KEYS):
        MLP([2, 4, 1], activation="tanh", bias="yes")
    assert str(info.value).startswith("model.bias=yes: ")
