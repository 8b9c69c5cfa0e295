"""A terminal progress bar as a trainer callback (tqdm), silent where nobody watches."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from tqdm.auto import tqdm


def want_progress(setting: object, *, parallel: bool = False) -> bool:
    """Resolve ``trainer.progress``: ``auto`` shows a bar on a terminal outside parallel jobs."""
    if setting in (True, "true", "on"):
        return True
    if setting in (False, "false", "off", None):
        return False
    return not parallel and sys.stderr.isatty()


class ProgressBar:
    """``callback(epoch, metrics)`` moving a bar over the epochs with loss and accuracy.

    Parameters
    ----------
    total : int
        Epochs planned.
    description : str
        Shown left of the bar (the run name).
    enabled : bool
        When False every call is a no-op, so callers need no branches.
    """

    def __init__(self, total: int, description: str = "", enabled: bool = True) -> None:
        self._bar = (
            tqdm(total=total, desc=description, unit="epoch", leave=False, dynamic_ncols=True)
            if enabled
            else None
        )
        self._done = 0

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(epoch - self._done)
        self._done = epoch
        shown = {}
        for key, label in (("train/loss", "loss"), ("train/accuracy", "acc"),
                           ("test/accuracy", "test_acc")):
            if key in metrics:
                shown[label] = f"{metrics[key]:.4g}"
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
