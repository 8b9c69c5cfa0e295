"""The fast path's kernels: the engine's math as bound in-place programs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.fast.kernels import row_reduce_ops, run


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
