"""Replicas: K networks trained side by side equal K separate fit() runs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import pipeline.fast.replicas as replicas_module
from pipeline.engine.activations import ACTIVATIONS
from pipeline.engine.loop import SATURATION_THRESHOLD, DivergenceError, StopTraining, fit
from pipeline.engine.losses import LOSSES, encode_targets
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import make_optimizer
from pipeline.fast import fit_replicas
from pipeline.fast.replicas import (
    ReplicaHistory,
    ReplicaMLP,
    _ReplicaWorkspace,
    _stacked_values,
    _UnitFractions,
    replicas_from_config,
)

K = 3


def _data(n: int = 80, k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int) if k == 2 else rng.integers(0, k, n)
    return X, y


ARCH = {
    "binary": dict(sizes=[2, 6, 5, 1], activation="tanh", output="sigmoid", loss="bce"),
    "relu": dict(sizes=[2, 7, 1], activation="relu", output="sigmoid", loss="bce"),
    "softmax": dict(sizes=[2, 5, 4, 3], activation=["relu", "sigmoid"], output="softmax",
                    loss="cross_entropy"),
    "mse": dict(sizes=[2, 4, 2], activation="elu", output="identity", loss="mse"),
}


def _separate(arch, optimizer, lrs, *, batch_size, epochs, seed=5, **opt_kw):
    X, y = _data(k=max(arch["sizes"][-1], 2))
    out = []
    for k, lr in enumerate(lrs):
        model = MLP(arch["sizes"], activation=arch["activation"], output=arch["output"],
                    seed=seed + k)
        h = fit(model, X, y, loss=arch["loss"], optimizer=make_optimizer(optimizer, lr=lr,
                                                                          **opt_kw),
                epochs=epochs, batch_size=batch_size, seed=1, X_val=X[:25], y_val=y[:25])
        out.append((model, h))
    return out


def _together(arch, optimizer, lrs, *, batch_size, epochs, seed=5, same_lr=False, **opt_kw):
    X, y = _data(k=max(arch["sizes"][-1], 2))
    reps = ReplicaMLP(arch["sizes"], activation=arch["activation"], output=arch["output"],
                      seed=seed, n_replicas=len(lrs))
    opt = make_optimizer(optimizer, lr=lrs[0], **opt_kw)
    h = fit_replicas(reps, X, y, loss=arch["loss"], optimizer=opt, epochs=epochs,
                     batch_size=batch_size, seed=1, X_val=X[:25], y_val=y[:25],
                     learning_rates=None if same_lr else lrs)
    return reps, h


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("batch_size", [None, 16])
@pytest.mark.parametrize("block", [True, False])
def test_replicas_equal_separate_runs(optimizer, batch_size, block, monkeypatch):
    if not block:
        # The one-unit output layer through K small products and a broadcast outer
        # product instead of the block-diagonal ones.
        monkeypatch.setattr(_ReplicaWorkspace, "BLOCK_FORWARD_MACS", 0)
        monkeypatch.setattr(_ReplicaWorkspace, "BLOCK_PROPAGATE_MACS", 0)
    arch = ARCH["binary"]
    lr = 0.01 if optimizer.startswith("adam") else 0.1
    lrs = [lr] * K
    alone = _separate(arch, optimizer, lrs, batch_size=batch_size, epochs=8)
    reps, hist = _together(arch, optimizer, lrs, batch_size=batch_size, epochs=8,
                           same_lr=True)
    models = reps.replica_models()
    for k, (model, h) in enumerate(alone):
        np.testing.assert_allclose(models[k].params, model.params, rtol=1e-8, atol=1e-11)
        assert models[k].seed == model.seed
        mine = hist.replicas[k]
        assert mine.epochs == h.epochs
        assert list(mine.metrics) == list(h.metrics)  # fit()'s keys, in fit()'s order
        for key in h.metrics:
            np.testing.assert_allclose(mine.metrics[key], h.metrics[key], rtol=1e-6,
                                       atol=1e-9, err_msg=key)


@pytest.mark.parametrize("name", ["relu", "softmax", "mse"])
@pytest.mark.parametrize("one_replica_at_a_time", [False, True])
def test_replicas_equal_separate_runs_for_other_architectures(name, one_replica_at_a_time,
                                                              monkeypatch):
    if one_replica_at_a_time:  # the replicas' losses and accuracies scored group by group
        monkeypatch.setattr(replicas_module, "STACK_VALUES", 1)
    arch = ARCH[name]
    lrs = [0.05, 0.02, 0.1]
    alone = _separate(arch, "adam", lrs, batch_size=20, epochs=6)
    reps, hist = _together(arch, "adam", lrs, batch_size=20, epochs=6)
    for k, (model, h) in enumerate(alone):
        np.testing.assert_allclose(reps.replica_params(k), model.params, rtol=1e-8,
                                   atol=1e-11)
        np.testing.assert_allclose(hist.replicas[k].metrics["train/loss"],
                                   h.metrics["train/loss"], rtol=1e-8)
        assert hist.replicas[k].metrics["lr"] == h.metrics["lr"]
        # Every other metric too: accuracy through each output's class mapping (softmax,
        # clipped squared-error scores), norms, dead and saturated fractions.
        assert list(hist.replicas[k].metrics) == list(h.metrics)
        for key in h.metrics:
            np.testing.assert_allclose(hist.replicas[k].metrics[key], h.metrics[key],
                                       rtol=1e-6, atol=1e-9, err_msg=key)


def test_per_replica_learning_rates_follow_their_schedules():
    arch = ARCH["binary"]
    lrs = [0.2, 0.05, 0.01]
    kw = dict(schedule="step", schedule_params={"step_size": 2, "gamma": 0.5})
    alone = _separate(arch, "sgd", lrs, batch_size=None, epochs=5, **kw)
    reps, hist = _together(arch, "sgd", lrs, batch_size=None, epochs=5, **kw)
    for k, (model, h) in enumerate(alone):
        np.testing.assert_allclose(reps.replica_params(k), model.params, rtol=1e-9)
        np.testing.assert_allclose(hist.replicas[k].metrics["lr"], h.metrics["lr"])


def test_summary_holds_mean_and_spread_of_every_metric():
    X, y = _data()
    reps = ReplicaMLP([2, 5, 1], activation="relu", seed=0, n_replicas=4)
    seen = []
    hist = fit_replicas(reps, X, y, loss="bce", optimizer="adam", epochs=3, X_test=X, y_test=y,
                        callbacks=[lambda e, m: seen.append((e, m))])
    assert isinstance(hist, ReplicaHistory) and len(hist.replicas) == 4
    keys = list(hist.replicas[0].metrics)
    assert {"train/loss", "test/accuracy", "lr", "grad_norm/layer_1",
            "dead_fraction/layer_1"} <= set(keys)
    for key in keys:
        per = np.array([h.metrics[key] for h in hist.replicas])
        np.testing.assert_allclose(hist.metrics[key], per.mean(axis=0))
        np.testing.assert_allclose(hist.metrics[f"{key}/std"], per.std(axis=0), atol=1e-12)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert seen[-1][1] == hist.last()
    table = hist.final_table()
    assert [row["replica"] for row in table] == [0, 1, 2, 3]
    assert table[2]["train/loss"] == hist.replicas[2].metrics["train/loss"][-1]


def test_replicas_differ_and_predict_stacked():
    X, y = _data()
    reps = ReplicaMLP([2, 8, 1], activation="tanh", seed=10, n_replicas=3, dtype="float32")
    fit_replicas(reps, X, y, loss="bce", optimizer=make_optimizer("adam", lr=0.05), epochs=20,
                 batch_size=16)
    proba = reps.predict_proba(X)
    assert proba.shape == (3, len(X), 2) and proba.dtype == np.float32
    assert not np.allclose(proba[0], proba[1])
    assert reps.predict(X).shape == (3, len(X))
    np.testing.assert_allclose(reps.mean_predict_proba(X), proba.mean(axis=0))
    for k, model in enumerate(reps.replica_models()):
        assert model.seed == 10 + k
        np.testing.assert_allclose(model.predict_proba(X), proba[k], rtol=1e-5, atol=1e-6)


def test_from_models_round_trip_and_checks():
    models = [MLP([3, 4, 2], activation="relu", output="softmax", seed=s) for s in (4, 9)]
    reps = ReplicaMLP.from_models(models)
    assert reps.seeds == [4, 9]
    for k, m in enumerate(models):
        np.testing.assert_array_equal(reps.replica_params(k), m.params)
    back = reps.replica_models()
    np.testing.assert_array_equal(back[1].params, models[1].params)
    with pytest.raises(ValueError, match="different architecture"):
        ReplicaMLP.from_models([models[0], MLP([3, 5, 2], output="softmax")])
    with pytest.raises(ValueError, match="n_replicas"):
        ReplicaMLP([2, 1], n_replicas=0)
    clone = pickle.loads(pickle.dumps(reps))
    np.testing.assert_array_equal(clone.params, reps.params)


def test_replicas_from_config_keeps_the_model_as_replica_zero():
    model = MLP([2, 3, 1], activation="sigmoid", seed=7, dtype="float32")
    model.params[:] = 0.25
    reps = replicas_from_config(model, 3)
    assert reps.seeds == [7, 8, 9] and reps.dtype == np.float32
    np.testing.assert_array_equal(reps.replica_params(0), model.params)
    np.testing.assert_array_equal(reps.replica_params(1), MLP([2, 3, 1], activation="sigmoid",
                                                               seed=8).params.astype(np.float32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bad_arguments_and_divergence():
    X, y = _data()
    reps = ReplicaMLP([2, 3, 1], seed=0, n_replicas=2)
    with pytest.raises(ValueError, match="learning_rates"):
        fit_replicas(reps, X, y, loss="bce", optimizer="sgd", epochs=1, learning_rates=[0.1])
    with pytest.raises(ValueError, match="patience"):
        fit_replicas(reps, X, y, loss="bce", optimizer="sgd", epochs=1, patience=2)
    with pytest.raises(DivergenceError, match="replica"):
        fit_replicas(reps, X * 1e3, y, loss="bce", optimizer="sgd", epochs=50,
                     learning_rates=[0.1, 1e30])


def test_early_stopping_and_stop_training():
    X, y = _data()
    reps = ReplicaMLP([2, 16, 1], activation="relu", seed=0, n_replicas=2)

    def stop_at_3(epoch, metrics):
        if epoch == 3:
            raise StopTraining

    hist = fit_replicas(reps, X, y, loss="bce", optimizer="adam", epochs=10,
                        callbacks=[stop_at_3])
    assert hist.epochs == [1, 2, 3] and hist.stopped_early
    hist = fit_replicas(reps, X[:40], y[:40], loss="bce",
                        optimizer=make_optimizer("adam", lr=0.3), epochs=200,
                        X_val=X[40:], y_val=y[40:], patience=3)
    assert hist.stopped_early and hist.best_epoch is not None


def test_evaluation_in_blocks_of_rows_equals_separate_runs(monkeypatch):
    # Blocks of 64 rows: 80 training samples make a block and a remainder of 16, the
    # 25 validation samples one short block; every metric (loss, accuracy, dead and
    # saturated fractions) gathered over the blocks equals fit()'s over the whole set.
    monkeypatch.setattr(ReplicaMLP, "EVAL_BLOCK_VALUES", 1)
    for name in ("relu", "binary"):
        arch = ARCH[name]
        lrs = [0.05, 0.02, 0.1]
        alone = _separate(arch, "adam", lrs, batch_size=16, epochs=4)
        reps, hist = _together(arch, "adam", lrs, batch_size=16, epochs=4)
        for k, (model, h) in enumerate(alone):
            np.testing.assert_allclose(reps.replica_params(k), model.params, rtol=1e-8,
                                       atol=1e-11)
            assert list(hist.replicas[k].metrics) == list(h.metrics)
            for key in h.metrics:
                np.testing.assert_allclose(hist.replicas[k].metrics[key], h.metrics[key],
                                           rtol=1e-10, atol=1e-12, err_msg=key)


def test_forward_in_blocks_equals_each_replica_alone(monkeypatch):
    monkeypatch.setattr(ReplicaMLP, "EVAL_BLOCK_VALUES", 1)
    X, _ = _data(n=150)
    reps = ReplicaMLP([2, 5, 4, 3], activation=["tanh", "relu"], output="softmax", seed=3,
                      n_replicas=4)
    proba = reps.predict_proba(X)
    assert proba.shape == (4, 150, 3)
    for k, model in enumerate(reps.replica_models()):
        np.testing.assert_allclose(proba[k], model.predict_proba(X), rtol=1e-12)
    assert reps.forward(X[:0]).shape == (4, 0, 3)


def test_unit_fractions_gathered_over_blocks_equal_the_formula_on_all_rows():
    rng = np.random.default_rng(2)
    reps = ReplicaMLP([2, 6, 5, 1], activation=["relu", "sigmoid"], seed=0, n_replicas=3)
    relu = np.maximum(rng.normal(size=(6, 3, 50)), 0.0)
    relu[:2, :, :30] = 0.0  # flat on the first block only: alive
    relu[3, :, 30:] = 0.0  # flat on the second block only: alive
    relu[2, 1, :] = 0.0  # flat everywhere: dead in replica 1
    sig = 1.0 / (1.0 + np.exp(-4.0 * rng.normal(size=(5, 3, 50))))
    out = rng.random(size=(1, 3, 50))
    fractions = _UnitFractions(reps)
    for rows in (slice(0, 30), slice(30, 50)):
        fractions.add([None, relu[:, :, rows], sig[:, :, rows], out[:, :, rows]])
    got = fractions.result()
    dead = np.mean(np.all(relu <= 0, axis=2), axis=0)
    np.testing.assert_array_equal(got["dead_fraction/layer_1"], dead)
    assert dead.tolist() == [0.0, 1 / 6, 0.0]
    saturated = np.mean(sig * (1 - sig) < SATURATION_THRESHOLD * 0.25, axis=(0, 2))
    np.testing.assert_array_equal(got["saturated_fraction/layer_2"], saturated)


@pytest.mark.parametrize("arch", [
    # A hidden one-unit layer (its propagation a broadcast outer product) before a
    # one-unit output (a padded batched product).
    dict(sizes=[2, 5, 1, 4, 1], activation="tanh", output="sigmoid", loss="bce"),
    # A one-unit identity output, whose values are its pre-activations.
    dict(sizes=[2, 3, 1], activation="sigmoid", output="identity", loss="half_sse"),
    # No hidden layer: the output's delta feeds the shared first-layer product.
    dict(sizes=[2, 1], activation="relu", output="sigmoid", loss="bce"),
])
@pytest.mark.parametrize("batch_size", [None, 16])
def test_replicas_with_one_unit_layers_equal_separate_runs(arch, batch_size):
    lrs = [0.05, 0.02, 0.1]
    alone = _separate(arch, "adam", lrs, batch_size=batch_size, epochs=5)
    reps, hist = _together(arch, "adam", lrs, batch_size=batch_size, epochs=5)
    for k, (model, h) in enumerate(alone):
        np.testing.assert_allclose(reps.replica_params(k), model.params, rtol=1e-8,
                                   atol=1e-11)
        for key in h.metrics:
            np.testing.assert_allclose(hist.replicas[k].metrics[key], h.metrics[key],
                                       rtol=1e-6, atol=1e-9, err_msg=key)


def test_full_batch_with_eval_every_equals_separate_runs():
    # Unevaluated full-batch epochs of a loss that can overflow (mse) check the loss on
    # the per-step path, between bound epochs; the result must not depend on it.
    arch = ARCH["mse"]
    X, y = _data(k=2)
    lrs = [0.05, 0.02]
    alone = []
    for k, lr in enumerate(lrs):
        model = MLP(arch["sizes"], activation=arch["activation"], output=arch["output"],
                    seed=5 + k)
        h = fit(model, X, y, loss="mse", optimizer=make_optimizer("adam", lr=lr), epochs=7,
                seed=1, eval_every=3)
        alone.append((model, h))
    reps = ReplicaMLP(arch["sizes"], activation=arch["activation"], output=arch["output"],
                      seed=5, n_replicas=2)
    hist = fit_replicas(reps, X, y, loss="mse", optimizer=make_optimizer("adam", lr=0.05),
                        epochs=7, seed=1, eval_every=3, learning_rates=lrs)
    assert hist.epochs == [3, 6, 7]
    for k, (model, h) in enumerate(alone):
        np.testing.assert_allclose(reps.replica_params(k), model.params, rtol=1e-8,
                                   atol=1e-11)
        np.testing.assert_allclose(hist.replicas[k].metrics["train/loss"],
                                   h.metrics["train/loss"], rtol=1e-8)


# output activation and units each loss is scored on below
STACK_OUTPUTS = {"mse": ("identity", 2), "half_sse": ("identity", 2), "bce": ("sigmoid", 1),
                 "cross_entropy": ("softmax", 3), "hinge": ("identity", 3)}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("stack_values", [2**16, 150])
def test_values_of_a_stack_are_each_batchs_value(name, dtype, stack_values, monkeypatch):
    """The replicas' losses score a stack of batches (replicas) at once, or in groups when the
    stack is large: each entry is exactly what value() gives that batch alone."""
    monkeypatch.setattr(replicas_module, "STACK_VALUES", stack_values)
    output = STACK_OUTPUTS[name][0]
    n_units = STACK_OUTPUTS[name][1]
    act = ACTIVATIONS[output]
    rng = np.random.default_rng(3)
    z = rng.normal(scale=3.0, size=(2, 4, 50, n_units)).astype(dtype)  # (stack, batch)
    a = act.forward(z.reshape(-1, n_units)).reshape(z.shape)
    labels = rng.integers(0, max(n_units, 2), size=50)
    T = encode_targets(labels, n_units, dtype=dtype)
    loss = LOSSES[name]
    got = _stacked_values(loss, z, a, T)
    assert got.shape == (2, 4)
    for i in range(2):
        for k in range(4):
            assert got[i, k] == loss.value(z[i, k], a[i, k], T), (i, k)


