"""The garbage collector in our own short-lived processes (``train.py``, the tracking
service, a sweep's joblib workers).

Such a process imports Hydra, scikit-learn, matplotlib (and MLflow where it tracks): a
few hundred thousand objects that live as long as the process. CPython's collector
traverses all of them on every full collection, and the heap's growth during those
imports triggers one again and again: 8 full collections, 0.83-0.89 s of a default
in-process run, and 4 (0.2-0.26 s) in the training process of a run with the tracking
service (measured with ``gc.callbacks``). :func:`pause` at start-up and :func:`settle`
once the imports are done (everything alive then moved out of the collector's reach with
``gc.freeze``, the collector back on) leave the collector only the objects the run itself
creates, which it collects as before.

:func:`settle` does nothing in a process that did not call :func:`pause`: an interactive
session that calls :func:`pipeline.app.job.run` keeps its collector as it is.
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Stop automatic collection while the process imports what it needs."""
    global _paused
    _paused = True
    gc.disable()


def settle() -> None:
    """Freeze what is alive now and turn collection back on (once, after :func:`pause`)."""
    global _paused
    if not _paused:
        return
    _paused = False
    gc.freeze()
    gc.enable()


def paused() -> bool:
    """Whether :func:`pause` is in effect."""
    return _paused
