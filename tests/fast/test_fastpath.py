"""The optimised training path against the straightforward reference path.

``fit(..., fast=True)`` (the default) runs forward and backward in preallocated
workspaces with in-place kernels; ``fast=False`` runs the allocating reference
(:class:`pipeline.engine.loop.PlainStepper`). Both must train to the same parameters, for
every optimiser and every batching mode; float32 training must agree with float64 to
float32 tolerance; and a run must leave the BLAS thread settings as it found them.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.engine.activations import HIDDEN_ACTIVATIONS
from pipeline.engine.loop import DivergenceError
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import OPTIMIZERS, make_optimizer
from pipeline.fast import fit
from pipeline.fast.threads import (
    PARALLEL_MIN_MACS,
    blas_threads,
    blas_threads_for,
    current_blas_threads,
)
from pipeline.fast.workspace import RULES_WITHOUT_Z


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




def _assert_same_run(sizes, activation, output, loss, batch_size, *, bias=True, epochs=4,
                     n=ALIAS_ROWS, optimizer="adam"):
    """fit() with the compiled stepper and with the engine's plain one, from the same
    seed: the same parameters after every step and the same metrics every epoch."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, max(sizes[-1], 2), n)
    runs = []
    for fast in (True, False):
        model = MLP(sizes, activation=activation, output=output, bias=bias, seed=2)
        history = fit(model, X, y, loss=loss, optimizer=make_optimizer(optimizer, lr=0.05),
                      epochs=epochs, batch_size=batch_size, seed=4, fast=fast,
                      X_val=X[:10], y_val=y[:10])
        runs.append((model, history))
    (fast_model, fast_history), (plain_model, plain_history) = runs
    # Adam divides by root mean squares: rounding differences of gradients near zero
    # (products in another order) grow to about 1e-10 over a few epochs.
    np.testing.assert_allclose(fast_model.params, plain_model.params, rtol=1e-8, atol=1e-9)
    assert list(fast_history.metrics) == list(plain_history.metrics)
    for key, values in plain_history.metrics.items():
        np.testing.assert_allclose(fast_history.metrics[key], values, rtol=1e-7, atol=1e-10,
                                   err_msg=key)


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("output,loss,units", PAIRS)
@pytest.mark.parametrize("batch_size", [None, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_every_activation_and_loss_trains_the_same_on_both_steppers(activation, output, loss,
                                                                    units, batch_size, bias):
    _assert_same_run([3, 6, 5, units], activation, output, loss, batch_size, bias=bias)


@pytest.fixture
def long_batches(monkeypatch):
    """Blocked backward rules and gradients in dead forward buffers from 40 rows on."""
    import pipeline.fast.workspace as workspace

    monkeypatch.setattr(workspace, "FOLD_BLOCK_ELEMENTS", 100)


@pytest.mark.parametrize("sizes", ALIAS_SIZES)
@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("output,loss", ALIAS_PAIRS)
def test_long_batches_train_the_same_on_both_steppers(long_batches, sizes, activation, output,
                                                      loss):
    if output == "softmax" and sizes[-1] < 2:
        pytest.skip("softmax needs two units")
    _assert_same_run(sizes, activation, output, loss, None)


@pytest.mark.parametrize("name", sorted(RULES_WITHOUT_Z))
def test_rules_said_not_to_read_z_train_the_same(long_batches, name):
    # Their G is written over Z before the rule runs: a rule that read Z would differ.
    _assert_same_run([4, 5, 6, 1], name, "sigmoid", "bce", None)
    _assert_same_run([4, 5, 6, 1], name, "sigmoid", "bce", 20)


def _cube(z):
    return z**3


def _cube_backward(z, a, grad_a):
    return grad_a * 3.0 * z * z


def test_an_activation_without_a_kernel_trains_through_the_generic_one(monkeypatch):
    """A newly registered activation has no in-place kernel: it still trains, to the
    engine's numbers."""
    from pipeline.engine import activations
    from pipeline.engine.activations import Activation

    cube = Activation("cube", _cube, _cube_backward)
    monkeypatch.setitem(activations.ACTIVATIONS, "cube", cube)
    _assert_same_run([3, 4, 1], "cube", "sigmoid", "bce", None, epochs=3)
    _assert_same_run([3, 4, 1], "cube", "sigmoid", "bce", 16, epochs=3)


def test_a_loss_without_a_kernel_trains_through_the_generic_one(monkeypatch):
    from pipeline.engine import losses

    custom = losses.Loss("custom_half_sse", losses.LOSSES["half_sse"].value,
                         losses.LOSSES["half_sse"].grad_output)
    monkeypatch.setitem(losses.LOSSES, "custom_half_sse", custom)
    _assert_same_run([3, 4, 2], "tanh", "identity", "custom_half_sse", None, epochs=3)


def test_a_model_reused_by_fit_keeps_training_from_where_it_stopped():
    # The packed working copy is the stepper's: after fit() the model holds its params.
    X, y = _data()
    a, b = MLP([3, 5, 1], seed=0), MLP([3, 5, 1], seed=0)
    opt = make_optimizer("sgd", lr=0.1)
    fit(a, X, y, loss="bce", optimizer=opt, epochs=2, seed=1)
    fit(a, X, y, loss="bce", optimizer=opt, epochs=2, seed=2)
    opt = make_optimizer("sgd", lr=0.1)
    fit(b, X, y, loss="bce", optimizer=opt, epochs=2, seed=1, fast=False)
    fit(b, X, y, loss="bce", optimizer=opt, epochs=2, seed=2, fast=False)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-10)


def test_compile_step_is_a_stepper_for_the_engine_fit():
    from pipeline.engine.loop import fit as engine_fit
    from pipeline.fast import compile_step

    X, y = _data()
    a, b = MLP([3, 5, 1], seed=0), MLP([3, 5, 1], seed=0)
    engine_fit(a, X, y, loss="bce", optimizer="adam", epochs=3, batch_size=32,
               stepper=compile_step)
    engine_fit(b, X, y, loss="bce", optimizer="adam", epochs=3, batch_size=32)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-10)


def test_a_workspace_block_given_back_under_the_lock_waits_for_the_next_take():
    # The cyclic garbage collector can collect a workspace, and run the finalizer that
    # gives its memory back, while take() holds the lock on the same thread: that used
    # to deadlock. The block must instead wait for, and be reused by, the next take().
    import threading

    from pipeline.fast.workspace import _SpareBlocks

    class Owner:
        pass

    spare = _SpareBlocks(1 << 20)
    block = np.empty(16)
    done = threading.Event()

    def give_back_while_locked() -> None:
        with spare.lock:
            spare.give_back(block)
        done.set()

    threading.Thread(target=give_back_while_locked, daemon=True).start()
    assert done.wait(10), "give_back waited for a lock its own thread holds"
    assert spare.pending == [block] and spare.free == []
    owner = Owner()
    assert spare.take(16, np.float64, owner) is block
    assert spare.pending == [] and spare.free == []
    del owner  # its finalizer gives the block back, the lock being free
    assert spare.free == [block]


def test_a_large_workspace_block_is_reused_by_the_next_model_until_released():
    # 100,000 rows of 256-unit layers need 312 MB of workspace: the block of a model
    # that is gone must serve the next one (fresh memory costs ~2 ms/MB on a VM) and
    # release_spare_memory() must give it back.
    import gc

    from pipeline.fast.workspace import arena, release_spare_memory, spare_blocks

    class Owner:
        pass

    first = Owner()
    widths = [3, 257, 257]  # 80 MB of float32 at 40,000 rows: above the old 64 MB limit
    address = arena(first, 40_000, widths, np.float32)[0].ctypes.data
    del first
    gc.collect()
    second = Owner()
    assert arena(second, 40_000, widths, np.float32)[0].ctypes.data == address
    del second
    gc.collect()
    assert any(b.nbytes > 64 << 20 for b in spare_blocks.free)
    release_spare_memory()
    assert spare_blocks.free == [] and spare_blocks.pending == []


@pytest.mark.parametrize("batch_size", [None, 50])
def test_a_finished_fit_gives_its_workspace_memory_back_without_a_gc_pass(batch_size):
    # The steps hold no reference cycle: when fit() returns, reference counting alone
    # frees the workspaces, and their memory waits for the next model (fresh memory
    # costs first-touch page faults: 0.5 s on 100,000 rows of 256 units).
    import gc

    from pipeline.fast.workspace import release_spare_memory, spare_blocks

    X, y = _data(n=300)
    release_spare_memory()
    gc.disable()
    try:
        fit(MLP([3, 8, 1], seed=0), X, y, loss="bce", optimizer="adam", epochs=2,
            batch_size=batch_size)
        assert spare_blocks.free, "the workspace's block did not come back"
    finally:
        gc.enable()
