"""The fast path's kernels: the engine's math as bound in-place programs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.engine.activations import ACTIVATIONS, HIDDEN_ACTIVATIONS, Activation
from pipeline.engine.losses import LOSSES, encode_targets
from pipeline.fast.kernels import (
    FUSED_KINDS,
    backward_program,
    delta_program,
    forward_program,
    fused_delta_kind,
    row_reduce_ops,
    run,
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_row_reduce_ops_equal_numpy_reduction_bit_for_bit(dtype, order):
    rng = np.random.default_rng(3)
    for k in range(1, 12):
        z = np.asarray(rng.standard_normal((257, k)) * 10, dtype=dtype, order=order)
        for ufunc in (np.add, np.maximum):
            want = ufunc.reduce(z, axis=1, keepdims=True)
            got = np.empty((257, 1), dtype=dtype)
            run(row_reduce_ops(ufunc, z, got))
            assert got.shape == want.shape == (257, 1)
            assert np.array_equal(got, want), (k, ufunc.__name__)


# Each kernel against the engine's own function of the same name, on arrays shaped and
# ordered as the workspaces hold them (column-major) and as users pass them (row-major).
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_forward_kernels_equal_the_engine_functions(name, dtype, order):
    act = ACTIVATIONS[name]
    rng = np.random.default_rng(1)
    z = np.asarray(rng.normal(scale=4.0, size=(37, 5)), dtype=dtype, order=order)
    out = np.empty_like(z, order=order)
    run(forward_program(act, z, out))
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, act.forward(z), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(set(HIDDEN_ACTIVATIONS)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 5), (3000, 4)])  # both sides of the relu switch
def test_backward_kernels_equal_the_engine_rules(name, dtype, shape):
    act = ACTIVATIONS[name]
    rng = np.random.default_rng(2)
    z = np.asarray(rng.normal(scale=3.0, size=shape), dtype=dtype, order="F")
    z[0, 0] = 0.0  # the derivative at exactly 0
    a = np.asarray(act.forward(z), order="F")
    g = np.asarray(rng.normal(size=shape), dtype=dtype, order="F")
    want = act.backward(z, a, g)
    got = g.copy(order="F")
    run(backward_program(act, z, a, got, np.empty_like(z, order="F")))
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_kernel_runs_on_its_output_in_place(dtype):
    # A hidden relu layer is computed in place (z is a): the kernel must then read the
    # mask from a alone.
    act = ACTIVATIONS["relu"]
    z = np.asarray(np.random.default_rng(3).normal(size=(50, 6)), dtype=dtype, order="F")
    a = np.asarray(act.forward(z), order="F")
    g = np.ones_like(a, order="F")
    run(backward_program(act, a, a, g, np.empty_like(a, order="F")))
    np.testing.assert_array_equal(g, (z > 0).astype(dtype))


PAIRS = [(loss, output) for loss in sorted(LOSSES) for output in sorted(ACTIVATIONS)
         if LOSSES[loss].outputs is None or output in LOSSES[loss].outputs]


@pytest.mark.parametrize("loss,output", PAIRS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_delta_kernels_equal_the_engine_delta(loss, output, dtype):
    L, act = LOSSES[loss], ACTIVATIONS[output]
    units = 3
    rng = np.random.default_rng(4)
    z = np.asarray(rng.normal(scale=2.0, size=(40, units)), dtype=dtype, order="F")
    a = np.asarray(act.forward(z), order="F")
    T = np.asarray(encode_targets(rng.integers(0, units, 40), units, dtype), order="F")
    out = np.empty_like(z, order="F")
    run(delta_program(L, act, z, a, T, out))
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, L.delta(z, a, T, act), rtol=tol, atol=tol)


def test_fused_kernels_are_the_engines_fused_pairs():
    # Every pair a kernel collapses is one the engine collapses too.
    for (loss, output), kind in FUSED_KINDS.items():
        assert output in LOSSES[loss].fused, (loss, output)
        assert fused_delta_kind(LOSSES[loss], ACTIVATIONS[output]) == kind


def _cube(z):
    return z**3


def _cube_backward(z, a, grad_a):
    return grad_a * 3.0 * z * z


def test_an_activation_without_a_kernel_gets_the_generic_one():
    cube = Activation("cube", _cube, _cube_backward)
    z = np.linspace(-2, 2, 12).reshape(4, 3)
    out = np.empty_like(z)
    run(forward_program(cube, z, out))
    np.testing.assert_array_equal(out, z**3)
    g = np.ones_like(z)
    run(backward_program(cube, z, out, g, np.empty_like(z)))
    np.testing.assert_array_equal(g, 3.0 * z * z)


def test_a_function_registered_under_a_known_name_is_not_given_its_kernel():
    # Someone else's "tanh" is not the kernel's tanh.
    fake = Activation("tanh", _cube, _cube_backward)
    z = np.linspace(-2, 2, 12).reshape(4, 3)
    out = np.empty_like(z)
    run(forward_program(fake, z, out))
    np.testing.assert_array_equal(out, z**3)
