"""Hydra's ``hydra/sweeper=optuna``, on a current Optuna (4 and 5).

The released ``hydra-optuna-sweeper`` (1.3.0) pins ``optuna<3``, which cannot open a
database storage under SQLAlchemy 2 (which MLflow 3 needs); Hydra's main branch has moved
to Optuna 4 but is unreleased. This plugin is the small piece written here instead: the
same ``hydra.sweeper`` keys and search-space syntax, plus persistent studies and pruning.

Hydra finds it by scanning the ``hydra_plugins`` namespace package. Nothing heavy is
imported here: Hydra imports every plugin module at start-up, also for single runs, so
Optuna itself is imported only when a search starts (:mod:`pipeline.app.search`).
"""
