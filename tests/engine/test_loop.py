"""pipeline.engine.loop.fit: the reference examples of issue 2, every optimiser, batching,
callbacks and their metrics, stopping, divergence, evaluation cadence and precision.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.data.datasets import make_dataset
from pipeline.engine.loop import DivergenceError, History, StopTraining, fit
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import OPTIMIZERS, make_optimizer


@pytest.fixture(scope="module")
def moons():
    return make_dataset("moons", n_samples=200, noise=0.2, seed=0)


def _sgd(lr: float = 0.1, **kwargs):
    return make_optimizer("sgd", lr=lr, **kwargs)


# ------------------------------------------------------------ reference examples


XOR_X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = np.array([0, 1, 1, 0])


def test_reference_xor_2_2_1_sigmoid():
    """2-2-1 sigmoid network, half sum of squares, SGD lr 1.0, full batch, 5000 epochs."""
    model = MLP([2, 2, 1], activation="sigmoid", output="sigmoid", seed=0)
    before = model.forward(XOR_X)[:, 0]
    history = fit(
        model, XOR_X, XOR_Y, loss="half_sse", optimizer=_sgd(1.0), epochs=5000,
        diagnostics=False,
    )
    out = model.forward(XOR_X)[:, 0]
    assert not np.array_equal(np.round(before), XOR_Y)
    # Measured for seed 0: [0.043, 0.950, 0.961, 0.038], loss 9.3e-4.
    np.testing.assert_array_equal(np.round(out), [0, 1, 1, 0])
    assert np.all(np.abs(out - XOR_Y) < 0.1)
    assert history.metrics["train/loss"][-1] < 2e-3
    assert history.metrics["train/accuracy"][-1] == 1.0
    assert len(history) == 5000 and not history.stopped_early


def test_reference_circles_2_3_1_sigmoid_bce():
    """2-3-1 sigmoid network with binary cross-entropy, SGD lr 1, 2000 epochs."""
    ds = make_dataset("circles", n_samples=400, seed=0)
    model = MLP([2, 3, 1], activation="sigmoid", output="sigmoid", seed=0)
    history = fit(
        model, ds.X_train, ds.y_train, loss="bce", optimizer=_sgd(1.0), epochs=2000,
        X_test=ds.X_test, y_test=ds.y_test, eval_every=100, diagnostics=False,
    )
    # Measured: 0.977 train, 0.98 test.
    assert history.metrics["train/accuracy"][-1] >= 0.9
    assert history.metrics["test/accuracy"][-1] >= 0.9
    assert np.mean(model.predict(ds.X_test) == ds.y_test) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("model_seed", range(6))
def test_reference_quadrants_2_3_2_leaky_relu_online(model_seed):
    """2-3-2 leaky-ReLU network (hidden and output, slope 0.01, he_uniform), MSE on
    one-hot targets, online SGD lr 0.05, 300 epochs on the quadrant (sign of x*y) data.
    """
    ds = make_dataset("quadrants", n_samples=300, classes=2, seed=0)
    model = MLP(
        [2, 3, 2], activation="leaky_relu", output="leaky_relu",
        activation_params={"slope": 0.01}, init="he_uniform", seed=model_seed,
    )
    assert model.output_activation.params == {"slope": 0.01}
    before = np.mean(model.predict(ds.X_test) == ds.y_test)
    history = fit(
        model, ds.X_train, ds.y_train, loss="mse", optimizer=_sgd(0.05), epochs=300,
        batch_size=1, seed=0, X_test=ds.X_test, y_test=ds.y_test, eval_every=50,
        diagnostics=False,
    )
    after = history.metrics["test/accuracy"][-1]
    # Measured: 0.43 to 0.63 before training, 0.933 after for model seeds 0-5 (with
    # shuffle seed 0; other shuffle seeds give 0.80-0.97).
    assert abs(before - 0.5) <= 0.15, "an untrained network should be near chance"
    assert after >= 0.9
    assert after - before >= 0.25


# --------------------------------------------------------------------- optimisers


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_reduces_the_loss(moons, name):
    model = MLP([2, 8, 1], activation="tanh", output="sigmoid", seed=0)
    initial = model.compute_loss(moons.X_train, moons.y_train, "bce")
    history = fit(
        model, moons.X_train, moons.y_train, loss="bce", optimizer=make_optimizer(name),
        epochs=30, batch_size=16, diagnostics=False,
    )
    losses = history.metrics["train/loss"]
    # With its default settings each optimiser takes 0.71 to below 0.40 (measured).
    assert losses[-1] < 0.7 * initial
    assert losses[-1] < losses[0]
    assert history.metrics["train/accuracy"][-1] >= 0.8


def test_optimizer_by_name(moons):
    model = MLP([2, 4, 1], activation="tanh", seed=0)
    history = fit(model, moons.X_train, moons.y_train, loss="bce", optimizer="adam", epochs=2)
    assert history.metrics["lr"] == [0.001, 0.001]


def test_schedule_sets_the_reported_lr(moons):
    model = MLP([2, 4, 1], activation="tanh", seed=0)
    opt = make_optimizer(
        "sgd", lr=0.1, schedule="step", schedule_params={"step_size": 2, "gamma": 0.5}
    )
    history = fit(model, moons.X_train, moons.y_train, loss="bce", optimizer=opt, epochs=5)
    np.testing.assert_allclose(history.metrics["lr"], [0.1, 0.1, 0.05, 0.05, 0.025])


# ----------------------------------------------------------------------- batching


class RecordingMLP(MLP):
    """Records the sample ids (column 0 of X) of every batch the trainer steps on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []

    def backward(self, Zs, As, delta):
        self.batches.append(As[0][:, 0].astype(int).tolist())  # As[0] is the batch's X
        return super().backward(Zs, As, delta)


def _ids_data(n: int = 10):
    X = np.column_stack([np.arange(n, dtype=float), np.zeros(n)])
    return X, np.arange(n) % 2


def _record(batch_size, seed, epochs=3, n=10):
    X, y = _ids_data(n)
    model = RecordingMLP([2, 3, 1], activation="tanh", seed=0)
    fit(model, X, y, loss="bce", optimizer=_sgd(1e-3), epochs=epochs, batch_size=batch_size,
        seed=seed, diagnostics=False)
    return model.batches


def test_mini_batches_are_a_fresh_permutation_every_epoch():
    batches = _record(batch_size=4, seed=0)
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    epochs = [sum(batches[i : i + 3], []) for i in range(0, 9, 3)]
    for order in epochs:
        assert sorted(order) == list(range(10))  # every sample once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(10))


def test_shuffling_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert _record(batch_size=3, seed=7) == _record(batch_size=3, seed=7)
    assert _record(batch_size=3, seed=7) != _record(batch_size=3, seed=8)


def test_full_batch_takes_one_step_per_epoch_in_order():
    assert _record(batch_size=None, seed=0) == [list(range(10))] * 3
    assert _record(batch_size=10, seed=0) == [list(range(10))] * 3


def test_online_training(moons):
    batches = _record(batch_size=1, seed=0, epochs=2)
    assert len(batches) == 20 and all(len(b) == 1 for b in batches)
    model = MLP([2, 8, 1], activation="tanh", seed=0)
    history = fit(
        model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(0.05), epochs=5,
        batch_size=1, diagnostics=False,
    )
    losses = history.metrics["train/loss"]
    assert losses[-1] < losses[0] < 0.7
    assert history.metrics["train/accuracy"][-1] >= 0.8


def test_same_seed_same_training(moons):
    def run(seed):
        model = MLP([2, 6, 1], activation="relu", seed=0)
        fit(model, moons.X_train, moons.y_train, loss="bce", optimizer="adam", epochs=3,
            batch_size=20, seed=seed)
        return model.params

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


# ---------------------------------------------------------------------- callbacks


def test_callbacks_receive_epoch_and_documented_metrics(moons):
    model = MLP(
        [2, 6, 5, 4, 3, 1], activation=["relu", "tanh", "sigmoid", "leaky_relu"], seed=0
    )
    calls = []
    history = fit(
        model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(0.1), epochs=3,
        batch_size=32, X_val=moons.X_test[:25], y_val=moons.y_test[:25],
        X_test=moons.X_test[25:], y_test=moons.y_test[25:],
        callbacks=[lambda epoch, metrics: calls.append((epoch, dict(metrics)))],
    )
    assert [epoch for epoch, _ in calls] == [1, 2, 3] == history.epochs
    expected = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "test/loss",
                "test/accuracy", "lr"}
    expected |= {f"grad_norm/layer_{i}" for i in range(1, 6)}
    expected |= {f"update_ratio/layer_{i}" for i in range(1, 6)}
    expected |= {"dead_fraction/layer_1", "dead_fraction/layer_4"}  # relu family
    expected |= {"saturated_fraction/layer_2", "saturated_fraction/layer_3"}  # tanh, sigmoid
    for _, metrics in calls:
        assert set(metrics) == expected
        assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
        for key, value in metrics.items():
            if "fraction" in key or "accuracy" in key:
                assert 0.0 <= value <= 1.0
    assert set(history.metrics) == expected
    assert history.metrics["train/loss"] == [m["train/loss"] for _, m in calls]


def test_metrics_without_validation_or_diagnostics(moons):
    model = MLP([2, 4, 1], activation="relu", seed=0)
    seen = []
    fit(model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(), epochs=1,
        callbacks=[lambda e, m: seen.append(set(m))], diagnostics=False)
    assert seen == [{"train/loss", "train/accuracy", "lr"}]


def test_grad_norm_and_update_ratio_values(moons):
    # One full-batch SGD step: grad_norm is the norm of that gradient per layer (weights
    # and bias together) and update_ratio is |lr * grad| / |params after the step|.
    X, y = moons.X_train, moons.y_train
    model = MLP([2, 5, 1], activation="tanh", seed=3)
    _, dW, db = model.copy().loss_and_grads(X, y, "bce")
    history = fit(model, X, y, loss="bce", optimizer=_sgd(0.5), epochs=1)
    for i, (gW, gb) in enumerate(zip(dW, db, strict=True), start=1):
        norm = np.sqrt(np.sum(gW**2) + np.sum(gb**2))
        after = np.sqrt(np.sum(model.weights[i - 1] ** 2) + np.sum(model.biases[i - 1] ** 2))
        assert history.metrics[f"grad_norm/layer_{i}"][0] == pytest.approx(norm, rel=1e-10)
        assert history.metrics[f"update_ratio/layer_{i}"][0] == pytest.approx(
            0.5 * norm / after, rel=1e-8
        )


def test_dead_and_saturated_fractions(moons):
    X, y = moons.X_train, moons.y_train
    relu = MLP([2, 4, 1], activation="relu", seed=0)
    relu.biases[0][:2] = -1e3  # two of four units never fire on this data
    relu.weights[0][:, 2:] = 0.0
    relu.biases[0][2:] = 1.0  # two always do
    history = fit(relu, X, y, loss="bce", optimizer=_sgd(1e-6), epochs=1)
    assert history.metrics["dead_fraction/layer_1"] == [0.5]

    tanh = MLP([2, 4, 1], activation="tanh", seed=0)
    tanh.biases[0][:3] = 50.0  # tanh'(50) ~ 0: saturated
    tanh.weights[0][:, 3] = 0.0  # tanh'(0) = 1: not
    tanh.biases[0][3] = 0.0
    history = fit(tanh, X, y, loss="bce", optimizer=_sgd(1e-6), epochs=1)
    assert history.metrics["saturated_fraction/layer_1"] == [0.75]


# ----------------------------------------------------------------------- stopping


def test_stop_training_from_a_callback(moons):
    def stop_at_3(epoch, metrics):
        if epoch == 3:
            raise StopTraining

    model = MLP([2, 4, 1], activation="tanh", seed=0)
    later = []
    history = fit(
        model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(), epochs=50,
        callbacks=[stop_at_3, lambda e, m: later.append(e)],
    )
    assert history.epochs == [1, 2, 3]
    assert history.stopped_early
    # Every callback still sees the epoch that stopped.
    assert later == [1, 2, 3]


def _overfitting_run(patience, restore_best=True, epochs=120):
    """A wide network on 60 noisy points: the validation loss turns up early."""
    ds = make_dataset("moons", n_samples=80, noise=0.45, seed=1)
    model = MLP([2, 64, 64, 1], activation="relu", seed=0)
    snapshots = {}
    history = fit(
        model, ds.X_train, ds.y_train, loss="bce", optimizer=make_optimizer("adam", lr=0.03),
        epochs=epochs, X_val=ds.X_test, y_val=ds.y_test, patience=patience,
        restore_best=restore_best,
        callbacks=[lambda epoch, m: snapshots.setdefault(epoch, model.params.copy())],
        diagnostics=False,
    )
    return model, history, snapshots


def test_early_stopping_stops_and_restores_the_best_params():
    model, history, snapshots = _overfitting_run(patience=5)
    val = history.metrics["val/loss"]
    best = history.epochs[int(np.argmin(val))]
    assert history.stopped_early
    assert history.best_epoch == best
    assert history.epochs[-1] == best + 5 < 120
    np.testing.assert_array_equal(model.params, snapshots[best])


def test_early_stopping_without_restore_keeps_the_last_params():
    model, history, snapshots = _overfitting_run(patience=5, restore_best=False)
    assert history.stopped_early
    np.testing.assert_array_equal(model.params, snapshots[history.epochs[-1]])


def test_restore_best_when_the_run_ends_before_patience_runs_out():
    # fit's docstring: "With patience, put back the parameters of the best evaluation at
    # the end." A run whose last evaluation is not its best, ending before patience runs
    # out, should end on the best parameters too.
    model, history, snapshots = _overfitting_run(patience=1000, epochs=40)
    best = history.best_epoch
    assert not history.stopped_early and best < 40, "the validation loss should turn up"
    np.testing.assert_array_equal(model.params, snapshots[best])


def test_best_epoch_is_tracked_with_validation_data_alone(moons):
    model = MLP([2, 4, 1], activation="tanh", seed=0)
    history = fit(model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(0.5),
                  epochs=5, X_val=moons.X_test, y_val=moons.y_test)
    assert history.best_epoch == history.epochs[int(np.argmin(history.metrics["val/loss"]))]
    assert not history.stopped_early


# --------------------------------------------------------------------- divergence


def test_divergence_error_names_the_epoch():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    y = X @ np.array([[1.0], [2.0], [-1.0]])
    model = MLP([3, 8, 1], activation="relu", output="identity", seed=0)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflow itself
        with pytest.raises(DivergenceError) as info:
            fit(model, X, y, loss="mse", optimizer=_sgd(1e3), epochs=100,
                callbacks=[lambda e, m: seen.append(e)])
    err = info.value
    assert 1 < err.epoch < 100
    assert f"at epoch {err.epoch}" in str(err)
    assert "became" in err.reason and "try a smaller optimizer.lr" in str(err)
    assert seen == list(range(1, err.epoch))  # evaluated until the divergent epoch


# -------------------------------------------------------------------- evaluation


def test_eval_every(moons):
    calls = []
    model = MLP([2, 4, 1], activation="tanh", seed=0)
    history = fit(
        model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(), epochs=10,
        eval_every=3, callbacks=[lambda e, m: calls.append(e)],
    )
    assert history.epochs == calls == [3, 6, 9, 10]  # and always the last epoch
    assert all(len(v) == 4 for v in history.metrics.values())


def test_early_stopping_selects_on_validation_and_only_reports_test(moons):
    """The test split never decides: early stopping and the kept epoch follow val/loss,
    and giving test data changes no parameter."""
    def train(**held_out):
        model = MLP([2, 8, 1], activation="tanh", seed=0, dtype="float64")
        history = fit(model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(0.5),
                      epochs=60, X_val=moons.X_test[:25], y_val=moons.y_test[:25],
                      patience=3, **held_out)
        return model, history

    with_test, history = train(X_test=moons.X_test[25:], y_test=moons.y_test[25:])
    without, plain = train()
    assert np.array_equal(with_test.params, without.params)
    assert history.epochs == plain.epochs and history.best_epoch == plain.best_epoch
    val = history.metrics["val/loss"]
    assert history.best_epoch == history.epochs[int(np.argmin(val))]
    assert "test/loss" in history.metrics and "test/loss" not in plain.metrics


def test_history_columns_and_last(moons):
    model = MLP([2, 4, 1], activation="tanh", seed=0)
    history = fit(model, moons.X_train, moons.y_train, loss="bce", optimizer=_sgd(),
                  epochs=4, X_test=moons.X_test, y_test=moons.y_test, eval_every=2)
    assert history.epochs == [2, 4]
    # One list per metric, one value per evaluated epoch: a table as pandas reads it
    # (pd.DataFrame(history.metrics, index=history.epochs)).
    assert all(len(values) == 2 for values in history.metrics.values())
    assert history.at(4)["test/loss"] == history.metrics["test/loss"][-1]
    assert history.last()["train/loss"] == history.metrics["train/loss"][-1]
    assert len(history) == 2
    assert len(History()) == 0 and History().metrics == {} and History().last() == {}


# -------------------------------------------------------------------- precision


def test_float32_and_float64_training_agree(moons):
    runs = {}
    for dtype in ("float64", "float32"):
        model = MLP([2, 8, 1], activation="tanh", seed=0, dtype=dtype)
        history = fit(model, moons.X_train, moons.y_train, loss="bce",
                      optimizer=make_optimizer("sgd", lr=0.2), epochs=10, batch_size=30,
                      seed=0, X_test=moons.X_test, y_test=moons.y_test)
        assert model.params.dtype == np.dtype(dtype)
        runs[dtype] = (model.params.astype(np.float64), history)
    p64, h64 = runs["float64"]
    p32, h32 = runs["float32"]
    np.testing.assert_allclose(p32, p64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        h32.metrics["train/loss"], h64.metrics["train/loss"], rtol=1e-5
    )
    assert h32.metrics["test/accuracy"] == h64.metrics["test/accuracy"]


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs=0: must be an integer >= 1"),
        ({"epochs": 2.0}, "epochs=2.0"),
        ({"batch_size": 0}, "batch_size=0: must be an integer >= 1"),
        ({"batch_size": 1000}, "batch_size=1000: must be at most the 150 training samples"),
        ({"eval_every": 0}, "eval_every=0"),
        ({"patience": 3}, "patience: early stopping needs validation data"),
        ({"optimizer": "lbfgs"}, "name='lbfgs': unknown optimizer; choose one of "),
        ({"loss": "cross_entropy"}, "loss 'cross_entropy' does not fit a 'sigmoid' output"),
        ({"loss": "focal"}, "unknown loss 'focal'"),
        ({"X_val": np.zeros((3, 5)), "y_val": np.zeros(3)}, r"X has shape \(3, 5\)"),
        ({"y": np.full(150, 2)}, r"labels \[2\] do not fit a 1-unit output"),
    ],
)
def test_bad_arguments(moons, kwargs, message):
    model = MLP([2, 4, 1], activation="tanh", seed=0)
    args = {"loss": "bce", "optimizer": _sgd(), "epochs": 1, "y": moons.y_train, **kwargs}
    y = args.pop("y")
    with pytest.raises(ValueError, match=message):
        fit(model, moons.X_train, y, **args)


def test_nan_in_training_data_is_refused(moons):
    X = moons.X_train.copy()
    X[5, 0] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        fit(MLP([2, 4, 1]), X, moons.y_train, loss="bce", optimizer=_sgd(), epochs=1)


def test_empty_training_data_is_refused():
    with pytest.raises(ValueError, match="sample"):
        fit(MLP([2, 3, 1]), np.zeros((0, 2)), np.zeros(0), loss="bce", optimizer=_sgd(),
            epochs=1)


def test_history_at_an_epoch_and_the_epoch_early_stopping_keeps():
    h = History()
    for epoch, loss in ((2, 0.5), (4, 0.3), (6, 0.4)):
        h.append(epoch, {"test/loss": loss})
    assert h.at(4) == {"test/loss": 0.3}
    with pytest.raises(KeyError, match="epoch 3 was not evaluated"):
        h.at(3)
    h.best_epoch = 4
    assert h.restored_epoch(patience=2) == 4
    assert h.restored_epoch(patience=None) is None  # no early stopping: nothing restored
    h.best_epoch = 6
    assert h.restored_epoch(patience=2) is None  # the last epoch is the best
