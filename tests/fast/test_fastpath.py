"""The optimised training path against the straightforward reference path.

``fit(..., fast=True)`` (the default) runs forward and backward in preallocated
workspaces with in-place kernels; ``fast=False`` runs the allocating reference
(:meth:`MLP._value_and_grad_reference`). Both must train to the same parameters, for
every optimiser and every batching mode; float32 training must agree with float64 to
float32 tolerance; and a run must leave the BLAS thread settings as it found them.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.engine.activations import ACTIVATIONS, HIDDEN_ACTIVATIONS, get_activation
from pipeline.engine.loop import (
    PARALLEL_MIN_MACS,
    DivergenceError,
    blas_threads,
    blas_threads_for,
    current_blas_threads,
    fit,
)
from pipeline.engine.losses import LOSSES, get_loss
from pipeline.engine.mlp import MLP, RULES_WITHOUT_Z
from pipeline.engine.optim import OPTIMIZERS, make_optimizer


def _data(n: int = 90, d: int = 3, k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 > 0.3).astype(int) if k == 2 else rng.integers(0, k, n)
    return X, y


def _train(fast: bool, *, optimizer: str = "adam", dtype=np.float64, sizes=(3, 8, 6, 1),
           activation="tanh", output="sigmoid", loss="bce", batch_size=None, epochs=12,
           k: int = 2, bias: bool = True, **opt_kwargs):
    X, y = _data(k=k)
    model = MLP(list(sizes), activation=activation, output=output, bias=bias, seed=3,
                dtype=dtype)
    opt = make_optimizer(optimizer, lr=0.05 if optimizer not in ("adam", "adamw") else 0.01,
                         **opt_kwargs)
    history = fit(model, X, y, loss=loss, optimizer=opt, epochs=epochs,
                  batch_size=batch_size, seed=7, fast=fast, X_val=X[:30], y_val=y[:30])
    return model, history


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("batch_size", [None, 16, 1])
def test_fast_path_equals_reference_for_every_optimizer(optimizer, batch_size):
    epochs = 3 if batch_size == 1 else 12
    fast, h_fast = _train(True, optimizer=optimizer, batch_size=batch_size, epochs=epochs)
    ref, h_ref = _train(False, optimizer=optimizer, batch_size=batch_size, epochs=epochs)
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)
    assert h_fast.epochs == h_ref.epochs
    assert h_fast.metrics.keys() == h_ref.metrics.keys()
    for key in h_ref.metrics:
        np.testing.assert_allclose(h_fast.metrics[key], h_ref.metrics[key], rtol=1e-7,
                                   atol=1e-10, err_msg=key)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fast_path_with_penalties_and_schedule(optimizer):
    kwargs = dict(weight_decay=0.01, l1=0.001, schedule="cosine", schedule_params={"t_max": 10})
    fast, _ = _train(True, optimizer=optimizer, batch_size=32, **kwargs)
    ref, _ = _train(False, optimizer=optimizer, batch_size=32, **kwargs)
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)


# Every hidden activation, and every (output, loss) pair the losses accept, with and
# without biases: the in-place kernels and fused deltas must match the reference rules.
PAIRS = [
    ("sigmoid", "bce", 1),
    ("softmax", "cross_entropy", 3),
    ("identity", "mse", 1),
    ("identity", "half_sse", 2),
    ("tanh", "hinge", 1),
    ("identity", "hinge", 3),
    ("sigmoid", "mse", 2),
]


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize(("output", "loss", "units"), PAIRS)
@pytest.mark.parametrize("bias", [True, False])
def test_fast_gradient_equals_reference(activation, output, loss, units, bias):
    rng = np.random.default_rng(1)
    # 200 rows of narrow layers use the column-major workspace, 20 rows the row-major one.
    for n in (20, 200):
        model = MLP([4, 5, 3, units], activation=activation, output=output, bias=bias,
                    seed=2, activation_params={"slope": 0.1, "alpha": 0.7})
        X = rng.normal(size=(n, 4)) * 2
        y = rng.integers(0, max(units, 2), n)
        T = model.encode_targets(y)
        L = get_loss(loss)
        v_fast = model._value_and_grad(X, T, L, True)
        g_fast = model.grad.copy()
        v_ref = model._value_and_grad_reference(X, T, L, True)
        np.testing.assert_allclose(v_fast, v_ref, rtol=1e-12)
        np.testing.assert_allclose(g_fast, model.grad, rtol=1e-9, atol=1e-13)


@pytest.fixture
def fold_everything(monkeypatch):
    """Make every column-major workspace fold its biases into the products, with the
    backward rules run on blocks of 2 columns (a ragged last block on odd widths)."""
    import pipeline.engine.mlp as nn_module

    monkeypatch.setattr(nn_module, "FOLD_MIN_ELEMENTS", 0)
    monkeypatch.setattr(nn_module, "FOLD_BLOCK_ELEMENTS", 400)


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize(("output", "loss", "units"), PAIRS)
@pytest.mark.parametrize("bias", [True, False])
def test_folded_bias_workspace_equals_reference(fold_everything, activation, output, loss,
                                                units, bias):
    rng = np.random.default_rng(4)
    n = 200
    model = MLP([4, 5, 3, units], activation=activation, output=output, bias=bias,
                seed=2, activation_params={"slope": 0.1, "alpha": 0.7})
    assert model._workspace(n).fold is bias
    X = rng.normal(size=(n, 4)) * 2
    y = rng.integers(0, max(units, 2), n)
    T = model.encode_targets(y)
    # Two steps: the second call reuses the packed buffers.
    _assert_steps_equal_reference(model, X, T, get_loss(loss), steps=2, step_size=0.01)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_folded_bias_training_equals_reference(fold_everything, optimizer):
    # 90 rows of layers up to 5 wide: the full batch takes the column-major workspace.
    kw = dict(optimizer=optimizer, sizes=(3, 5, 4, 1), activation="relu")
    fast, h_fast = _train(True, **kw)
    ref, h_ref = _train(False, **kw)
    assert fast._workspace(90).fold
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)
    for key in h_ref.metrics:
        np.testing.assert_allclose(h_fast.metrics[key], h_ref.metrics[key], rtol=1e-7,
                                   atol=1e-10, err_msg=key)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_kernels_match_the_allocating_ones(name, dtype):
    act = get_activation(name, slope=0.2, alpha=0.5)
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(40, 5)) * 6).astype(dtype)
    z[0] = [0.0, 1e4, -1e4, 80.0, -80.0]
    tol = 1e-6 if dtype == np.float32 else 1e-14
    out = np.empty_like(z)
    # Finite and free of overflow warnings, like the reference (underflow to 0 is fine).
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        act.forward_to(z, out)
    a = act.forward(z)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, a, rtol=tol, atol=tol)
    if act.output_only:
        return
    g = rng.normal(size=z.shape).astype(dtype)
    expected = act.backward(z, a, g)
    scratch = np.empty_like(z)
    act.backward_to(z, a, g, scratch)
    np.testing.assert_allclose(g, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", [n for n, loss in LOSSES.items() if loss.fused])
def test_fused_delta_into_matches_delta(name):
    loss = get_loss(name)
    rng = np.random.default_rng(0)
    for output in loss.fused:
        units = 3 if output == "softmax" else 2
        z = rng.normal(size=(10, units))
        act = ACTIVATIONS[output]
        a = act.forward(z)
        T = np.eye(units)[rng.integers(0, units, 10)]
        out = np.empty_like(z)
        loss.delta_into(z, a, T, act, out)
        np.testing.assert_array_equal(out, loss.delta(z, a, T, act))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_float32_training_agrees_with_float64(optimizer):
    m32, h32 = _train(True, optimizer=optimizer, dtype=np.float32, batch_size=16, epochs=10)
    m64, h64 = _train(True, optimizer=optimizer, dtype=np.float64, batch_size=16, epochs=10)
    assert m32.params.dtype == np.float32
    np.testing.assert_allclose(m32.params, m64.params, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(h32.metrics["train/loss"], h64.metrics["train/loss"],
                               rtol=1e-3, atol=1e-5)


def test_softmax_network_trains_the_same_on_both_paths():
    kw = dict(sizes=(3, 8, 3), activation="relu", output="softmax", loss="cross_entropy", k=3,
              batch_size=25)
    fast, _ = _train(True, **kw)
    ref, _ = _train(False, **kw)
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)


def test_workspaces_are_reused_not_pickled_and_bounded():
    X, y = _data(n=50)
    model = MLP([3, 4, 1], seed=0)
    T = model.encode_targets(y)
    loss = get_loss("bce")
    model._value_and_grad(X, T, loss, False)
    ws = model._workspaces[50]
    model._value_and_grad(X, T, loss, False)
    assert model._workspaces[50] is ws
    for n in range(1, 10):
        model._value_and_grad(X[:n], T[:n], loss, False)
    assert len(model._workspaces) <= 4
    clone = pickle.loads(pickle.dumps(model))
    assert clone._workspaces == {}
    np.testing.assert_array_equal(clone.params, model.params)
    # A copy trains on its own buffers.
    assert model.copy()._workspaces == {}


def test_blas_threads_for_picks_one_thread_for_small_problems():
    assert blas_threads_for(64, [2, 32, 32, 1], cores=2) == 1
    assert blas_threads_for(1000, [2, 16, 16, 1], cores=2) == 1
    assert blas_threads_for(100_000, [2, 256, 256, 1], cores=2) == 2
    big_batch = PARALLEL_MIN_MACS // (64 * 64) + 1
    assert blas_threads_for(big_batch, [64, 64], cores=8) == 8


def test_thread_settings_are_restored_after_a_run():
    before = current_blas_threads()
    X, y = _data()
    for threads in ("auto", 1, 2, None):
        fit(MLP([3, 4, 1], seed=0), X, y, loss="bce", optimizer="sgd", epochs=2,
            threads=threads)
        assert current_blas_threads() == before


def test_threads_inside_fit_follow_the_setting_and_an_outer_cap():
    X, y = _data()
    seen = []

    def record(epoch, metrics):
        seen.append(current_blas_threads())

    with blas_threads(1):
        # "auto" never raises a limit set outside (one thread per job in a sweep).
        fit(MLP([3, 4, 1], seed=0), X, y, loss="bce", optimizer="sgd", epochs=1,
            callbacks=[record])
        assert seen[-1] == 1
    fit(MLP([3, 4, 1], seed=0), X, y, loss="bce", optimizer="sgd", epochs=1, threads=1,
        callbacks=[record])
    assert seen[-1] == 1


def test_thread_setting_is_restored_when_training_fails():
    before = current_blas_threads()
    X, y = _data()

    def boom(epoch, metrics):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        fit(MLP([3, 4, 1], seed=0), X, y, loss="bce", optimizer="sgd", epochs=3, threads=1,
            callbacks=[boom])
    assert current_blas_threads() == before


@pytest.mark.parametrize("bad", [0, -1, "many", 1.5, True])
def test_bad_threads_setting_is_refused(bad):
    X, y = _data()
    with pytest.raises(ValueError, match="threads="):
        fit(MLP([3, 4, 1], seed=0), X, y, loss="bce", optimizer="sgd", epochs=1, threads=bad)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_full_batch_divergence_is_dated_the_same_whatever_eval_every(fast):
    # Identity output with MSE and a huge learning rate: the outputs overflow the loss
    # (float32 squares) while the parameters are still finite.
    X, y = _data()

    def diverged_at(every: int) -> int:
        model = MLP([3, 8, 1], activation="relu", output="identity", seed=0, dtype="float32")
        with pytest.raises(DivergenceError) as info:
            fit(model, X * 10, y, loss="mse", optimizer=make_optimizer("sgd", lr=3.0),
                epochs=200, eval_every=every, diagnostics=False, fast=fast)
        return info.value.epoch

    first = diverged_at(1)
    assert diverged_at(7) == first
    assert diverged_at(50) == first


# ----------------------------------------------------------------- bound step programs


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_programs_equal_the_in_place_kernels(name, dtype, order):
    act = get_activation(name, slope=0.2, alpha=0.5)
    rng = np.random.default_rng(5)
    z = np.asarray(rng.normal(size=(30, 4)) * 4, dtype=dtype, order=order)
    out, want = np.empty_like(z), np.empty_like(z)
    for op in act.forward_program(z, out):
        op()
    act.forward_to(z, want)
    np.testing.assert_array_equal(out, want)
    if act.output_only:
        return
    g = np.asarray(rng.normal(size=z.shape), dtype=dtype, order=order)
    g_want = g.copy()
    for op in act.backward_program(z, out, g, np.empty_like(z)):
        op()
    act.backward_to(z, want, g_want, np.empty_like(z))
    np.testing.assert_array_equal(g, g_want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 32), (300, 64)])
def test_relu_backward_is_the_straightforward_mask(dtype, shape):
    # Small arrays take ceil(fmin(a, 1)), large ones the comparison: both must give
    # grad * (z > 0), also at 0, -0, denormals, the largest floats and (z, a) in place.
    from pipeline.engine.activations import RELU_CEIL_MAX_SIZE

    assert (shape[0] * shape[1] <= RELU_CEIL_MAX_SIZE) == (shape == (64, 32))
    act = ACTIVATIONS["relu"]
    info = np.finfo(dtype)
    rng = np.random.default_rng(6)
    z = rng.normal(size=shape).astype(dtype)
    z.flat[:8] = [0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal,
                  info.tiny, info.max, -info.max, 1.0]
    g = rng.normal(size=shape).astype(dtype)
    want = g * (z > 0)
    a = act.forward(z)
    for zz in (z, a):  # the workspace passes relu(z) as z (computed in place)
        _assert_in_place_rules_give(act, zz, a, g, want)


def _assert_in_place_rules_give(act, z, a, g, want) -> None:
    """``act.backward_to`` and the calls of ``act.backward_program`` on (z, a) turn the
    gradient ``g`` into ``want``, exactly."""
    got = g.copy()
    act.backward_to(z, a, got, np.empty_like(z))
    np.testing.assert_array_equal(got, want)
    got = g.copy()
    for op in act.backward_program(z, a, got, np.empty_like(z)):
        op()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", [n for n, loss in LOSSES.items() if loss.fused])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_delta_program_equals_delta(name, dtype):
    loss = get_loss(name)
    rng = np.random.default_rng(8)
    for output in {*loss.fused, "sigmoid", "identity"}:
        if not _fits(loss, output):
            continue
        units = 3 if output == "softmax" else 2
        z = rng.normal(size=(12, units)).astype(dtype)
        act = ACTIVATIONS[output]
        a = act.forward(z)
        T = np.eye(units, dtype=dtype)[rng.integers(0, units, 12)]
        T[0] *= 0.5  # row sums other than 1
        out = np.empty_like(z)
        for op in loss.delta_program(z, a, T, act, out):
            op()
        np.testing.assert_array_equal(out, loss.delta(z, a, T, act))


def _fits(loss, output: str) -> bool:
    try:
        loss.check_output(output, 3 if output == "softmax" else 2)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
@pytest.mark.parametrize(("output", "loss", "units"), PAIRS[:3])
def test_unfolded_bias_workspace_equals_reference(monkeypatch, activation, output, loss,
                                                  units):
    # Biases added after the products instead of folded into them (the path a model takes
    # below FOLD_MIN_ELEMENTS).
    import pipeline.engine.mlp as nn_module

    monkeypatch.setattr(nn_module, "FOLD_MIN_ELEMENTS", 10**9)
    rng = np.random.default_rng(9)
    model = MLP([4, 5, 3, units], activation=activation, output=output, seed=2)
    assert not model._workspace(40).fold
    X = rng.normal(size=(40, 4))
    T = model.encode_targets(rng.integers(0, max(units, 2), 40))
    L = get_loss(loss)
    v_fast = model._value_and_grad(X, T, L, True)
    g_fast = model.grad.copy()
    v_ref = model._value_and_grad_reference(X, T, L, True)
    np.testing.assert_allclose(v_fast, v_ref, rtol=1e-12)
    np.testing.assert_allclose(g_fast, model.grad, rtol=1e-9, atol=1e-13)


def test_workspace_buffers_are_aligned_column_major_views_of_one_block():
    from pipeline.engine.mlp import _arena

    class Owner:
        pass

    owner = Owner()
    arrays = _arena(owner, 7, [3, 1, 5], np.float32)
    base = arrays[0].base
    for a, w in zip(arrays, [3, 1, 5], strict=True):
        assert a.shape == (7, w) and a.flags.f_contiguous
        assert a.ctypes.data % 64 == 0
        assert a.base is base
    # No overlap: writing each array leaves the others intact.
    for k, a in enumerate(arrays):
        a[...] = k
    for k, a in enumerate(arrays):
        assert np.all(a == k)


def test_a_workspace_does_not_keep_its_model_alive():
    import gc
    import weakref

    model = MLP([3, 4, 1], seed=0)
    X, y = _data(n=20)
    model._value_and_grad(model.check_input(X), model.encode_targets(y), get_loss("bce"),
                          False)
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None  # freed by reference counting, no cycle through a workspace
    finally:
        gc.enable()


def test_memory_of_a_dead_workspace_is_reused_and_never_shared():
    from pipeline.engine.mlp import _SPARE_BLOCKS

    X, y = _data(n=300)
    loss = get_loss("bce")

    def train_and_forward(seed):
        model = MLP([3, 40, 1], seed=seed)
        T = model.encode_targets(y)
        model._value_and_grad(model.check_input(X), T, loss, False)
        ws = model._workspaces[300]
        return model, ws.Ain[0].base, model.grad.copy()

    first, block, grad_first = train_and_forward(0)
    second, block_second, _ = train_and_forward(1)
    assert block_second is not block  # both alive: never shared
    del first
    assert any(b is block for b in _SPARE_BLOCKS.free)
    third, block_third, grad_third = train_and_forward(0)
    assert block_third is block  # warm memory, same numbers
    np.testing.assert_array_equal(grad_third, grad_first)
    assert not any(b is block for b in _SPARE_BLOCKS.free)
    del second, third


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("batch_size", [None, 16, 1])
@pytest.mark.parametrize("penalties", [{}, {"weight_decay": 0.01, "l1": 0.001}])
def test_bound_step_programs_train_like_the_reference(monkeypatch, optimizer, batch_size,
                                                      penalties):
    # Without diagnostics (and between evaluations) the trainer runs each step as one
    # list of bound calls, the model's and the optimiser's (Adam's own, the others' _step).
    import pipeline.engine.mlp as nn_module

    built = []
    original = nn_module._Workspace.train_program

    def counting(self, loss, update, packed=None):
        built.append(self.n)
        return original(self, loss, update, packed)

    monkeypatch.setattr(nn_module._Workspace, "train_program", counting)
    epochs = 3 if batch_size == 1 else 8
    kw = dict(optimizer=optimizer, batch_size=batch_size, epochs=epochs, diagnostics=False,
              eval_every=3, **penalties)
    fast, h_fast = _fit_with(True, **kw)
    assert built  # the programs ran
    ref, h_ref = _fit_with(False, **kw)
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)
    for key in h_ref.metrics:
        np.testing.assert_allclose(h_fast.metrics[key], h_ref.metrics[key], rtol=1e-7,
                                   atol=1e-10, err_msg=key)


def test_bound_step_programs_for_softmax_in_float32():
    kw = dict(sizes=(3, 8, 3), activation="relu", output="softmax", loss="cross_entropy", k=3,
              batch_size=25, dtype=np.float32, diagnostics=False, eval_every=4)
    fast, _ = _fit_with(True, **kw)
    ref, _ = _fit_with(False, **kw)
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-5, atol=1e-6)


def _fit_with(fast: bool, *, optimizer: str = "adam", dtype=np.float64, sizes=(3, 8, 6, 1),
              activation="relu", output="sigmoid", loss="bce", batch_size=None, epochs=12,
              k: int = 2, diagnostics=True, eval_every=1, **opt_kwargs):
    X, y = _data(k=k)
    model = MLP(list(sizes), activation=activation, output=output, seed=3, dtype=dtype)
    opt = make_optimizer(optimizer, lr=0.05 if optimizer not in ("adam", "adamw") else 0.01,
                         **opt_kwargs)
    history = fit(model, X, y, loss=loss, optimizer=opt, epochs=epochs, batch_size=batch_size,
                  seed=7, fast=fast, diagnostics=diagnostics, eval_every=eval_every)
    assert opt.t == epochs * -(-len(X) // (batch_size or len(X)))
    return model, history


def _recorded_run(fast: bool, fail_at: int | None = None, **opt_kwargs):
    """Train with the packed working copy where possible (no diagnostics), recording what
    callbacks see: parameters, gradient and optimiser state after each evaluation."""
    X, y = _data()
    model = MLP([3, 8, 6, 1], activation="relu", seed=3)
    opt = make_optimizer("adam", lr=0.01, **opt_kwargs)
    seen = []

    def record(epoch, metrics):
        seen.append((model.params.copy(), model.grad.copy(),
                     {k: v.copy() for k, v in opt.state_dict()["state"].items()}))
        if epoch == fail_at:
            raise RuntimeError("stop here")

    try:
        fit(model, X, y, loss="bce", optimizer=opt, epochs=9, batch_size=16, seed=7,
            fast=fast, diagnostics=False, eval_every=3, callbacks=[record])
    except RuntimeError:
        pass
    return model, opt, seen


@pytest.mark.parametrize("fail_at", [None, 6])
def test_packed_working_copy_is_invisible_outside_the_steps(monkeypatch, fail_at):
    used = _record_packed_epochs(monkeypatch)
    fast, opt_fast, seen_fast = _recorded_run(True, fail_at)
    assert used and all(used)  # every epoch ran on the packed copy
    ref, opt_ref, seen_ref = _recorded_run(False, fail_at)
    assert len(seen_fast) == len(seen_ref) == (2 if fail_at else 3)
    for (p, g, state), (p_ref, g_ref, state_ref) in zip(seen_fast, seen_ref, strict=True):
        np.testing.assert_allclose(p, p_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-12)
        for key in state_ref:
            np.testing.assert_allclose(state[key], state_ref[key], rtol=1e-9, atol=1e-15)
    # Also after a run ended by an exception: parameters and state in the model's order.
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)
    for key, value in opt_ref.state_dict()["state"].items():
        np.testing.assert_allclose(opt_fast.state_dict()["state"][key], value, rtol=1e-9,
                                   atol=1e-15)
    assert opt_fast.t == opt_ref.t


def test_penalties_keep_the_model_order(monkeypatch):
    used = _record_packed_epochs(monkeypatch)
    fast, _, _ = _recorded_run(True, weight_decay=0.01)
    assert used and not any(used)  # the decay needs the weights first
    ref, _, _ = _recorded_run(False, weight_decay=0.01)
    np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)


def test_packed_order_gives_each_layer_one_block():
    from pipeline.engine.mlp import packed_blocks, packed_order

    model = MLP([3, 4, 2], seed=0)
    packed = model.params[packed_order(model)]
    for block, W, b in zip(packed_blocks(packed, model.sizes), model.weights, model.biases,
                           strict=True):
        np.testing.assert_array_equal(block[:-1], W)
        np.testing.assert_array_equal(block[-1], b)
    assert sorted(packed_order(model)) == list(range(model.n_params))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_bound_step_programs_without_biases(optimizer):
    # No biases: nothing to fold or pack; the programs read the model's weights directly.
    def run(fast):
        X, y = _data()
        model = MLP([3, 5, 4, 1], activation="tanh", bias=False, seed=1)
        fit(model, X, y, loss="bce", optimizer=make_optimizer(optimizer, lr=0.01), epochs=6,
            batch_size=16, seed=7, fast=fast, diagnostics=False, eval_every=2)
        return model.params

    np.testing.assert_allclose(run(True), run(False), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ gradients in dead buffers
# On long batches (n * width > FOLD_BLOCK_ELEMENTS) a hidden layer's G = dLoss/dZ is written
# into a forward buffer that is dead by then (_Workspace._grad_homes). The threshold is
# lowered here so that 40 rows count as long: blocks of 2 columns, a ragged last one on
# the 5-wide layers. A wrong aliasing would overwrite a value before it is read.
ALIAS_ROWS = 40
ALIAS_SIZES = [
    [4, 5, 5, 1],        # the top relu layer in place; below it a dead A above, or none
    [4, 5, 6, 5, 1],     # three hidden layers: a dead buffer for the lowest one
    [4, 5, 6, 6, 3],     # several output units: full products all the way down
    [4, 5, 1, 5, 2],     # a one-unit hidden layer (short) over a long one
]
ALIAS_PAIRS = [("sigmoid", "bce"), ("softmax", "cross_entropy"), ("identity", "mse"),
               ("identity", "half_sse")]


@pytest.fixture
def long_batches(monkeypatch):
    import pipeline.engine.mlp as nn_module

    monkeypatch.setattr(nn_module, "FOLD_BLOCK_ELEMENTS", 100)


def _shared_grads(ws) -> int:
    """How many of the workspace's G arrays live in a forward buffer (builds them)."""
    if ws.G is None:
        ws._grad_buffers()
    forward = [*ws.Ain, *ws.Z, *ws.A[1:]]
    return sum(any(np.shares_memory(g, f) for f in forward) for g in ws.G)


@pytest.mark.parametrize("activation", [*HIDDEN_ACTIVATIONS, ("relu", "tanh", "relu"),
                                        ("tanh", "identity", "relu")])
@pytest.mark.parametrize("sizes", ALIAS_SIZES)
@pytest.mark.parametrize(("output", "loss"), ALIAS_PAIRS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_in_dead_buffers_equal_the_reference(long_batches, activation, sizes, output,
                                                       loss, bias):
    if not isinstance(activation, str):
        activation = list(activation)[: len(sizes) - 2]
    if output == "softmax":
        sizes = [*sizes[:-1], max(sizes[-1], 2)]
    model = MLP(sizes, activation=activation, output=output, bias=bias, seed=2,
                activation_params={"slope": 0.1, "alpha": 0.7})
    assert _shared_grads(model._workspace(ALIAS_ROWS)) > 0
    rng = np.random.default_rng(5)
    X = rng.normal(size=(ALIAS_ROWS, 4)) * 2
    T = model.encode_targets(rng.integers(0, model.n_classes, ALIAS_ROWS))
    # Steps on the same buffers, the parameters moving in between; a forward pass after
    # a step gives every layer's values back.
    _assert_steps_equal_reference(model, X, T, get_loss(loss), steps=3, step_size=-0.05)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "identity"])
@pytest.mark.parametrize("sizes", [[4, 5, 5, 1], [4, 5, 6, 6, 3]])
def test_gradients_in_dead_buffers_with_unfolded_biases(monkeypatch, long_batches, activation,
                                                        sizes):
    # Biases added after the products (no ones column), the layout of FOLD_MIN_ELEMENTS.
    import pipeline.engine.mlp as nn_module

    monkeypatch.setattr(nn_module, "FOLD_MIN_ELEMENTS", 10**9)
    model = MLP(sizes, activation=activation, output="identity", seed=2)
    ws = model._workspace(ALIAS_ROWS)
    assert not ws.fold and _shared_grads(ws) > 0
    rng = np.random.default_rng(6)
    X = rng.normal(size=(ALIAS_ROWS, 4)) * 2
    T = rng.normal(size=(ALIAS_ROWS, sizes[-1]))
    L = get_loss("mse")
    for _ in range(3):
        v_fast = model._value_and_grad(X, T, L, True)
        g_fast = model.grad.copy()
        v_ref = model._value_and_grad_reference(X, T, L, True)
        np.testing.assert_allclose(v_fast, v_ref, rtol=1e-12)
        np.testing.assert_allclose(g_fast, model.grad, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(model._forward_fast(X)[1][-1], model._forward(X)[1][-1],
                                   rtol=1e-12, atol=1e-14)
        model.params[...] -= 0.05 * model.grad


@pytest.mark.parametrize(("sizes", "activation", "in_place", "own_z", "elsewhere"), [
    ([3, 6, 6, 1], "relu", [1], [], []),        # config 4's shape: the top layer in place
    ([3, 6, 6, 1], "leaky_relu", [], [], [0]),  # G[0] into the dead A[2] (or Z[1])
    ([3, 6, 6, 1], "tanh", [], [0, 1], []),     # the rules read A only: G over Z
    ([3, 6, 6, 1], ["sigmoid", "relu"], [1], [0], []),
    ([3, 6, 6, 6, 1], "relu", [2], [], [0]),    # G[1] on its own, G[0] into A[2]
    ([3, 6, 6, 6, 2], "relu", [], [], [0, 1]),  # full products: G[1] into A[3], G[0] A[2]
    ([3, 6, 6, 1], "identity", [0, 1], [], []),
    ([3, 7, 6, 1], "elu", [], [], []),          # nothing above wide enough for G[0]
])
def test_where_the_gradients_live(long_batches, sizes, activation, in_place, own_z, elsewhere):
    model = MLP(sizes, activation=activation, seed=0)
    ws = model._workspace(ALIAS_ROWS)
    ws._grad_buffers()
    forward = [*ws.Ain, *ws.Z, *ws.A[1:]]
    for k, g in enumerate(ws.G):
        shared = [f for f in forward if np.shares_memory(g, f)]
        if k in in_place:
            assert g is ws.Z[k] and ws.Z[k] is ws.A[k + 1]
        elif k in own_z:
            assert g is ws.Z[k] and not np.shares_memory(g, ws.A[k + 1])
        elif k in elsewhere:
            assert shared and not np.shares_memory(g, ws.A[k + 1])
            assert not np.shares_memory(g, ws.Z[k]) and not np.shares_memory(g, ws.G[k + 1])
        else:
            assert not shared
    # The ones columns of the folded products are never written.
    loss = get_loss("bce") if sizes[-1] == 1 else get_loss("mse")
    model._value_and_grad(np.zeros((ALIAS_ROWS, sizes[0])), np.ones((ALIAS_ROWS, sizes[-1])),
                          loss, False)
    for a, fan_in in zip(ws.Ain[1:], sizes[1:-1], strict=True):
        np.testing.assert_array_equal(a[:, fan_in], 1.0)


def test_short_batches_keep_gradients_of_their_own():
    model = MLP([3, 6, 6, 1], activation="relu", seed=0)
    # 240 values per layer, below FOLD_BLOCK_ELEMENTS: the rules are not blocked.
    assert _shared_grads(model._workspace(ALIAS_ROWS)) == 0


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid",
                                        ("tanh", "relu", "relu")])
@pytest.mark.parametrize(("output", "loss", "k"), [("sigmoid", "bce", 2),
                                                   ("softmax", "cross_entropy", 3)])
@pytest.mark.parametrize("batch_size", [None, 35])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])  # the packed working copy, or not
def test_training_with_gradients_in_dead_buffers_equals_reference(
        monkeypatch, long_batches, activation, output, loss, k, batch_size, bias, weight_decay):
    used = _record_packed_epochs(monkeypatch)
    sizes = [3, 5, 6, 5, 1 if k == 2 else k]
    if not isinstance(activation, str):
        activation = list(activation)
    X, y = _data(n=ALIAS_ROWS, k=k)

    def run(fast, diagnostics):
        model = MLP(sizes, activation=activation, output=output, bias=bias, seed=3)
        opt = make_optimizer("adam", lr=0.01, weight_decay=weight_decay)
        history = fit(model, X, y, loss=loss, optimizer=opt, epochs=6, batch_size=batch_size,
                      seed=7, fast=fast, diagnostics=diagnostics, eval_every=2,
                      X_val=X[:10], y_val=y[:10])
        return model, history

    ref, h_ref = run(False, True)
    for diagnostics in (False, True):
        used.clear()
        fast, h_fast = run(True, diagnostics)
        if not diagnostics:  # the bound step programs ran
            assert used and all(p == (bias and weight_decay == 0.0) for p in used)
        assert _shared_grads(fast._workspaces[batch_size or ALIAS_ROWS]) > 0
        np.testing.assert_allclose(fast.params, ref.params, rtol=1e-9, atol=1e-12)
        for key in h_fast.metrics:
            np.testing.assert_allclose(h_fast.metrics[key], h_ref.metrics[key], rtol=1e-7,
                                       atol=1e-10, err_msg=key)
        # Evaluation after training: the outputs of a fresh model with these parameters.
        fresh = MLP(sizes, activation=activation, output=output, bias=bias, seed=0)
        fresh.set_params(fast.params)
        np.testing.assert_allclose(fast._forward_fast(X)[1][-1], fresh.forward(X),
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(fast.predict(X), fresh.predict(X))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_rule_in_place_equals_the_blocked_rule(dtype):
    from pipeline.engine.mlp import _blocked_relu_in_place, _blocked_rule

    rng = np.random.default_rng(0)
    n, w = 30, 7
    z = rng.normal(size=(n, w)).astype(dtype)
    z[0] = [0.0, -0.0, np.nan, 1e-40, -1e-40, np.inf, -np.inf]
    a = np.asfortranarray(np.maximum(z, 0))
    g = np.asfortranarray(rng.normal(size=(n, 1)).astype(dtype))
    wv = rng.normal(size=w).astype(dtype)
    scratch = np.empty((n, 3), dtype=dtype, order="F")  # blocks of 3, 3 and 1
    G = np.empty((n, w), dtype=dtype, order="F")
    _blocked_rule(get_activation("relu").backward_to, a, a, G, scratch, (g, wv))()
    _blocked_relu_in_place(a, scratch, (g, wv))()
    # The straightforward rule (relu'(z) = z > 0: 0 at 0 and at NaN, like the comparison
    # the blocked rule makes on long batches; on blocks this small it takes NaN as 1).
    np.testing.assert_array_equal(a, np.where(z > 0, g * wv, 0.0).astype(dtype))
    np.testing.assert_array_equal(a[~np.isnan(z)], G[~np.isnan(z)])


@pytest.mark.parametrize("name", sorted(RULES_WITHOUT_Z))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rules_said_not_to_read_z_do_not(name, dtype):
    # Their G is written over Z before the rule runs (_Workspace._grad_homes).
    act = get_activation(name)
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(40, 5)) * 3).astype(dtype)
    a = act.forward(z)
    g = rng.normal(size=z.shape).astype(dtype)
    expected = g.copy()
    act.backward_to(z, a, expected, np.empty_like(z))
    garbage = np.full_like(z, np.nan)
    _assert_in_place_rules_give(act, garbage, a, g, expected)
    np.testing.assert_array_equal(act.backward(garbage, a, g), act.backward(z, a, g))


def _assert_steps_equal_reference(model, X, T, L, *, steps: int, step_size: float) -> None:
    """Fast vs reference loss and gradient for ``steps`` steps (the parameters moved by
    ``step_size`` times the gradient after each), and the fast forward pass vs the
    reference one after each step."""
    for _ in range(steps):
        v_fast = model._value_and_grad(X, T, L, True)
        g_fast = model.grad.copy()
        v_ref = model._value_and_grad_reference(X, T, L, True)
        np.testing.assert_allclose(v_fast, v_ref, rtol=1e-12)
        np.testing.assert_allclose(g_fast, model.grad, rtol=1e-9, atol=1e-13)
        Zs, As = model._forward_fast(X)
        Z_ref, A_ref = model._forward(X)
        np.testing.assert_allclose(Zs[-1], Z_ref[-1], rtol=1e-12, atol=1e-14)
        for a, a_ref in zip(As[1:], A_ref[1:], strict=True):
            np.testing.assert_allclose(a, a_ref, rtol=1e-12, atol=1e-14)
        model.params[...] += step_size * model.grad


def _record_packed_epochs(monkeypatch) -> list[bool]:
    """A list that gets, for each fast-path epoch, whether it ran on the packed copy."""
    import pipeline.engine.loop as trainer_module

    used: list[bool] = []
    original = trainer_module._BoundSteps.epoch

    def epoch(self):
        used.append(self.packed)
        return original(self)

    monkeypatch.setattr(trainer_module._BoundSteps, "epoch", epoch)
    return used
