"""BLAS threads for training: how many pay off, and a context that sets them.

Matrix products of small networks run faster on one thread than on several (thread
start-up and synchronisation cost more than they save), so the fast path picks a thread
count per run (:func:`blas_threads_for`) and sets it through threadpoolctl for the
duration of the run (:func:`blas_threads`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

__all__ = [
    "PARALLEL_MIN_MACS", "blas_threads", "blas_threads_for", "current_blas_threads",
    "resolve_threads",
]


# BLAS threads pay off only when one matrix product is large: below about 2**27
# multiply-adds the second thread's start-up and synchronisation cost more than it saves,
# and on a busy machine far more (measured on the 2-core machine: 256x64x64 runs 2.5x
# slower on 2 threads, 2000x256x256 1.5x faster; see benchmarks/README.md). Elementwise
# numpy work is single-threaded anyway.
PARALLEL_MIN_MACS = 2**27
_CORES = os.cpu_count() or 1  # os.cpu_count() reads /sys: tens of microseconds a call


def blas_threads_for(batch: int, widths: Sequence[int], cores: int | None = None) -> int:
    """BLAS threads worth using for training steps on ``batch`` rows.

    Parameters
    ----------
    batch : int
        Rows per step (the batch size, or the data size for full batch).
    widths : sequence of int
        Layer widths from input to output, like ``model.sizes``.
    cores : int, optional
        Cores available; default ``os.cpu_count()``.

    Returns
    -------
    int
        1 when the largest matrix product of a step (``batch * fan_in * fan_out``
        multiply-adds) is below :data:`PARALLEL_MIN_MACS`, else all cores.
    """
    cores = cores if cores is not None else _CORES
    largest = max(fi * fo for fi, fo in zip(widths[:-1], widths[1:], strict=True))
    return cores if batch * largest >= PARALLEL_MIN_MACS else 1


_BLAS: dict[str, object] = {"controller": None, "n_modules": -1}


def _blas_controller():
    """A threadpoolctl controller of the loaded BLAS libraries, cached.

    Building one scans every loaded shared library (milliseconds once torch or scipy are
    loaded, as long as a short training run); a BLAS library can only appear with a new
    import, so the scan is redone only when ``sys.modules`` has grown.
    """
    n_modules = len(sys.modules)
    if _BLAS["controller"] is None or _BLAS["n_modules"] != n_modules:
        from threadpoolctl import ThreadpoolController

        _BLAS["controller"] = ThreadpoolController().select(user_api="blas")
        _BLAS["n_modules"] = n_modules
    return _BLAS["controller"]


def current_blas_threads() -> int | None:
    """The BLAS thread limit in force (the largest over loaded BLAS libraries)."""
    counts = [lib.num_threads for lib in _blas_controller().lib_controllers]
    return max(counts) if counts else None


@contextmanager
def blas_threads(limit: int | None) -> Iterator[None]:
    """Run the block with at most ``limit`` BLAS threads, restoring the settings after.

    ``None`` changes nothing. Thread counts apply to every loaded BLAS library
    (numpy's and scipy's OpenBLAS), through threadpoolctl.
    """
    if limit is None:
        yield
        return
    with _blas_controller().limit(limits=int(limit)):
        yield


def resolve_threads(threads: int | str | None, batch: int, sizes: Sequence[int]) -> int | None:
    """The limit :func:`fit` applies for its ``threads`` argument (None: leave as is)."""
    if threads is None:
        return None
    if threads == "auto":
        wanted = blas_threads_for(batch, sizes)
        current = current_blas_threads()
        if current is None or wanted >= current:
            return None  # never raise a limit set outside (one thread per sweep job)
        return wanted
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads={threads!r}: must be 'auto', None or an integer >= 1")
    return int(threads)
