"""Imported once by the fork server that a joblib sweep's workers are forked from
(:func:`pipeline.app.sweep.prewarm_joblib_workers`): it pays every job's imports, so that each
worker starts with them done instead of paying them itself.

A failure here must not take the fork server down (no worker could start then): the
workers import what they need themselves, as they would without the server's warm-up.
"""

from __future__ import annotations

import logging
import os

if hasattr(os, "setpgid"):
    # The workers forked from here inherit this process group, out of the terminal's: a
    # Ctrl-C reaches the launching process alone, which passes it on to the workers and
    # waits for their runs to end (pipeline.app.sweep._InterruptGuard). If this process and
    # its workers got it at once, joblib would kill the workers while they end their runs.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass

try:
    from pipeline.app.sweep import warm_worker

    warm_worker()
except Exception as error:  # depends on a broken environment
    logging.getLogger(__name__).debug("fork server warm-up failed: %s", error)
