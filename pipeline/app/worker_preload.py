"""Preloaded by the fork server a joblib sweep's workers are forked from (multiprocessing
preloads modules by name): see :func:`pipeline.app.process.prepare_fork_server`."""

from pipeline.app import process

process.prepare_fork_server()
