"""Where the project lives, so stores and outputs never scatter into working directories."""

from __future__ import annotations

from pathlib import Path


def project_root() -> Path:
    """The repository root: the directory holding ``pyproject.toml`` above this package.

    Found from this file, not the working directory, because Hydra and users may start
    runs anywhere; the MLflow store, outputs and relative CSV paths must not move with
    them. Falls back to the nearest ``pyproject.toml`` above the working directory (a
    non-editable install), then to the working directory itself.
    """
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file():
        return here
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return cwd
