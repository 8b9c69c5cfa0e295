"""The report of a sweep, rebuilt from MLflow alone: summary table, heatmaps, boundaries.

    python -m pipeline.report --experiment backprop                 # the latest sweep
    python -m pipeline.report --experiment backprop --sweep ID      # a parent run id or name
    python -m pipeline.report --experiment backprop --sweep A --sweep B   # compare sweeps
    python -m pipeline.report --experiment backprop --list          # the sweeps there are

The sweep callback (:mod:`pipeline.app.sweep`) calls :func:`build_report` at the end of every
sweep and logs the result on the sweep's parent run; this command does the same for any
sweep already in the store and writes the files into ``--out`` (``--log`` also attaches
them to the parent run again). What it reads:

- the parent run (tag ``sweep.role=parent``): tag ``sweep.params``, the swept keys in the
  order they were given, with their values for grid sweeps (JSON);
- its children (tag ``mlflow.parentRunId``): status, tag ``failure_reason``, params (the
  swept values), the latest value of each metric (the final one: metrics are logged with
  step = epoch), tag ``sweep.job`` (Hydra's job number, the row order);
- each finished child's model weights (``model/artifacts/weights.npz``, loaded without
  pickle) and its ``data/dataset.csv`` for the decision-boundary panels.

The table is the data behind every figure: one row per job with the swept values, the
final metrics, status, failure reason and run id. Figures by number of swept parameters
that vary: 1 -> metric lines, 2 -> heatmaps, 3 or more -> faceted heatmaps (the first
three; cells holding several jobs show their mean); search sweepers (Optuna) -> the
objective per trial. Failed jobs are hatched cells / marked panels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Final metrics shown in the summary table, in this order (those present).
METRICS = ("test/accuracy", "test/loss", "val/accuracy", "val/loss", "train/accuracy",
           "train/loss")
#: Statuses that count as a finished job; anything else (FAILED, KILLED, RUNNING) failed.
OK_STATUS = "FINISHED"
#: The status shown for a search trial that Optuna's pruner stopped (a finished run tagged
#: ``sweep.trial_state=pruned``): neither finished with final metrics nor failed.
PRUNED_STATUS = "PRUNED"
TAG_TRIAL_STATE = "sweep.trial_state"
TAG_PRUNED_EPOCH = "sweep.pruned_epoch"
#: Parent-run tags written by pipeline.app.sweep and read here.
TAG_ROLE = "sweep.role"
TAG_NAME = "sweep.name"
TAG_PARAMS = "sweep.params"
TAG_SWEEPER = "sweep.sweeper"
TAG_JOB = "sweep.job"
TAG_BEST = "best_in_sweep"
PARENT_TAG = "mlflow.parentRunId"
REASON_TAG = "failure_reason"
WEIGHTS_ARTIFACT = "model/artifacts/weights.npz"
DATASET_ARTIFACT = "data/dataset.csv"
#: Objective that picks the best run by default (what the task function returns and Optuna
#: minimises).
DEFAULT_BEST = ("val/loss", "min")


@dataclass
class SweptParam:
    """One swept key: ``model.hidden_sizes`` with spec ``"[4],[8]"`` and values, or an Optuna
    distribution (``tag(log, interval(0.001, 1.0))``) whose values are not enumerable."""

    key: str
    spec: str
    values: list[Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "spec": self.spec, "values": self.values}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweptParam:
        return cls(str(d["key"]), str(d.get("spec", "")), d.get("values"))


@dataclass
class SweepReport:
    """A sweep's table and figures.

    Attributes
    ----------
    table : DataFrame
        One row per job: ``job``, the swept keys, :data:`METRICS`, ``status``,
        ``failure_reason``, ``run_name``, ``run_id``, ``best`` (plus ``sweep`` when several
        sweeps are combined).
    params : list of str
        The swept keys that vary, in the order they were given (the table's key columns).
    figures : dict
        Artifact file name (``test_accuracy.png`` ...) -> matplotlib Figure.
    best_run_id : str or None
        The finished job with the best ``best_metric``.
    """

    table: pd.DataFrame
    params: list[str]
    figures: dict[str, Any] = field(default_factory=dict)
    best_run_id: str | None = None
    best_metric: str = DEFAULT_BEST[0]
    best_mode: str = DEFAULT_BEST[1]
    notes: list[str] = field(default_factory=list)
    grids: dict[str, pd.DataFrame] = field(default_factory=dict)
    pages: dict[str, str] = field(default_factory=dict)  # name -> self-contained HTML
    _pngs: dict[tuple[str, int], bytes] = field(default_factory=dict, repr=False)

    @property
    def failed(self) -> pd.DataFrame:
        """The rows of jobs that did not finish (pruned trials are not failures)."""
        return self.table[~self.table["status"].isin((OK_STATUS, PRUNED_STATUS))]

    @property
    def best(self) -> pd.Series | None:
        if self.best_run_id is None:
            return None
        return self.table[self.table["run_id"] == self.best_run_id].iloc[0]

    def files(self) -> dict[str, Any]:
        """Artifact name -> content (DataFrame for CSV, Figure for PNG, str for HTML)."""
        out: dict[str, Any] = {"summary.csv": self.table}
        out.update({f"{name}.csv": grid for name, grid in self.grids.items()})
        out.update(self.figures)
        out.update(self.pages)
        return out

    def png(self, name: str, dpi: int = 100) -> bytes:
        """Figure ``name`` as PNG bytes. Drawn once: a sweep writes its report to MLflow
        and next to Hydra's outputs, and drawing is most of what a report costs."""
        key = (name, dpi)
        if key not in self._pngs:
            from pipeline.viz.plots import png_bytes

            self._pngs[key] = png_bytes(self.figures[name], dpi=dpi)
        return self._pngs[key]

    def save(self, directory: str | os.PathLike, dpi: int = 100) -> list[Path]:
        """Write the table (CSV) and the figures (PNG) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, content in self.files().items():
            path = directory / name
            if isinstance(content, pd.DataFrame):
                content.to_csv(path, index=name != "summary.csv")
            elif isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(self.png(name, dpi))
            written.append(path)
        return written

    def text(self, max_reason: int = 60) -> str:
        """The table for a terminal: swept values, accuracy, loss, status, reason."""
        cols = ["sweep", "job", *self.params, *[m for m in METRICS[:2] if m in self.table],
                "status", "failure_reason", "best"]  # "sweep" when several are compared
        view = self.table[[c for c in cols if c in self.table]].copy()
        failed = view["status"] != OK_STATUS
        for m in METRICS[:2]:
            if m not in view:
                continue
            spread = self.table.get(f"{m}/std")
            if spread is not None:  # replicated jobs: mean ± standard deviation
                view[m] = [f"{v:.4f}" if pd.isna(sd) else f"{v:.4f} ± {sd:.4f}"
                           for v, sd in zip(view[m], spread, strict=True)]
            # A diverged job's last values mean nothing.
            view[m] = view[m].astype(object).where(~failed, "-")
        view["failure_reason"] = view["failure_reason"].fillna("").map(
            lambda s: s if len(s) <= max_reason else s[: max_reason - 3] + "...")
        view["best"] = view["best"].map({True: "*", False: ""})
        for key in self.params:
            view[key] = view[key].map(_fmt)
        return view.to_string(index=False, float_format=lambda v: f"{v:.4f}")

    def summary(self) -> str:
        """:meth:`text`, then the notes and the best run: what a terminal shows at the end."""
        lines = [self.text(), *(f"note: {note}" for note in self.notes)]
        if self.best is not None:
            lines.append(f"best ({self.best_metric}, {self.best_mode}): "
                         f"{self.best['run_name']} (run {self.best['run_id']})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ values


def parse_param(text: Any) -> Any:
    """A logged param back to a value: ``"[16, 16]"`` -> [16, 16], ``"0.1"`` -> 0.1,
    ``"relu"`` -> ``"relu"`` (params are JSON for non-strings, see pipeline.tracking.tracker)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _norm(value: Any) -> Any:
    """A hashable stand-in that equates 1 and 1.0, [16, 16] and (16, 16)."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ----------------------------------------------------------------------- finding runs


def _tracking():
    from pipeline.tracking import tracker as tracking

    return tracking


def find_sweeps(uri: str, experiment_id: str) -> pd.DataFrame:
    """The sweep parent runs of an experiment, newest first."""
    runs = _tracking().search_runs(
        uri, [experiment_id], f"tags.`{TAG_ROLE}` = 'parent'", ["attributes.start_time DESC"]
    )
    return runs


def _find_parent(uri: str, experiment_id: str, sweep: str | None) -> pd.Series:
    parents = find_sweeps(uri, experiment_id)
    if parents.empty:
        raise LookupError(f"experiment {experiment_id} holds no sweep (no run tagged "
                          f"{TAG_ROLE}=parent); run one with `python train.py -m ...`")
    if sweep is None:
        return parents.iloc[0]
    names = parents.get(f"tags.{TAG_NAME}", pd.Series(index=parents.index, dtype=object))
    run_names = parents.get("tags.mlflow.runName", pd.Series(index=parents.index, dtype=object))
    hit = parents[(parents["run_id"] == sweep) | (names == sweep) | (run_names == sweep)]
    if hit.empty:
        known = ", ".join(f"{r} ({n})" for r, n in zip(parents["run_id"], names, strict=True))
        raise LookupError(f"--sweep {sweep!r}: no such sweep in experiment {experiment_id}; "
                          f"known: {known}")
    return hit.iloc[0]


def swept_params_of(parent: pd.Series, uri: str | None = None) -> list[SweptParam]:
    """The parent's record of what was swept (tag ``sweep.params``, or its artifact copy
    ``sweep/params.json`` when the tag was too long)."""
    text = parent.get(f"tags.{TAG_PARAMS}")
    try:
        items = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        items = None
    if items is None and uri is not None:
        with tempfile.TemporaryDirectory(prefix="bp-report-") as tmp:
            try:
                path = _tracking().download_artifact(uri, parent["run_id"], "sweep/params.json",
                                                     tmp)
                items = json.loads(Path(path).read_text())
            except Exception:
                items = []
    return [SweptParam.from_dict(d) for d in items or []]


def _child_value(row: pd.Series, key: str) -> Any:
    """The value of swept ``key`` in a child run: its param, or ``<group>.name`` for a
    swept config group (``optimizer=adam,sgd``), or the override in its tag."""
    bare = key.lstrip("+~")
    for column in (f"params.{bare}", f"params.{bare}.name"):
        value = row.get(column)
        if isinstance(value, str):
            return parse_param(value)
    overrides = row.get("tags.overrides")
    if isinstance(overrides, str):
        m = re.search(rf"(?:^|\s)\+*{re.escape(bare)}=(\S+)", overrides)
        if m:
            return parse_param(m.group(1))
    return None


# ------------------------------------------------------------------------------- table


def sweep_table(
    runs: pd.DataFrame, params: Sequence[SweptParam], sweeper: str = "basic"
) -> pd.DataFrame:
    """One row per child run, ordered as the sweep ran its jobs.

    Parameters
    ----------
    runs : DataFrame
        Child runs as :func:`pipeline.tracking.tracker.search_runs` returns them.
    params : sequence of SweptParam
    sweeper : str
        ``basic`` orders rows by the swept values (the order of the command line, which is
        Hydra's job order); other sweepers by job number (trial order).
    """
    # Jobs with replicas (trainer.replicas) log each metric's spread across them.
    spreads = [f"{m}/std" for m in METRICS if f"metrics.{m}/std" in runs
               and runs[f"metrics.{m}/std"].notna().any()]
    rows = []
    for _, run in runs.iterrows():
        job = run.get(f"tags.{TAG_JOB}")
        row: dict[str, Any] = {
            "job": int(job) if isinstance(job, str) and job.isdigit() else None,
        }
        for p in params:
            row[p.key] = _child_value(run, p.key)
        for m in (*METRICS, *spreads):
            value = run.get(f"metrics.{m}")
            row[m] = float(value) if value is not None and not pd.isna(value) else np.nan
        reason = run.get(f"tags.{REASON_TAG}")
        row.update(
            status=run["status"],
            failure_reason=reason if isinstance(reason, str) else "",
            run_name=run.get("tags.mlflow.runName"),
            run_id=run["run_id"],
            start_time=run.get("start_time"),
        )
        if run["status"] == OK_STATUS and run.get(f"tags.{TAG_TRIAL_STATE}") == "pruned":
            row["status"] = PRUNED_STATUS
            row["failure_reason"] = f"pruned at epoch {run.get(f'tags.{TAG_PRUNED_EPOCH}')}"
        if run["status"] == "RUNNING":
            row["failure_reason"] = (row["failure_reason"]
                                     or "still RUNNING (in progress, or its process died)")
        rows.append(row)
    columns = ["job", *[p.key for p in params], *METRICS, *spreads, "status",
               "failure_reason", "run_name", "run_id", "start_time"]
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table.drop(columns="start_time").assign(best=pd.Series(dtype=bool))

    def order_key(row: pd.Series) -> tuple:
        if sweeper == "basic":
            ranks = []
            for p in params:
                values = [_norm(v) for v in (p.values or [])]
                v = _norm(row[p.key])
                ranks.append(values.index(v) if v in values else len(values))
            return (*ranks, row["job"] if row["job"] is not None else math.inf)
        return (row["job"] if row["job"] is not None else math.inf, row["start_time"] or 0)

    order = sorted(table.index, key=lambda i: order_key(table.loc[i]))
    table = table.loc[order].reset_index(drop=True).drop(columns="start_time")
    if table["job"].isna().any():  # runs from before job numbers were tagged
        table["job"] = range(len(table))
    table["job"] = table["job"].astype(int)
    table["best"] = False
    return table


def pick_best(table: pd.DataFrame, metric: str = "val/loss", mode: str = "min") -> str | None:
    """Run id of the finished job with the best final ``metric`` (None if there is none)."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: must be 'min' or 'max'")
    if metric not in table:
        return None
    ok = table[(table["status"] == OK_STATUS) & np.isfinite(table[metric].astype(float))]
    if ok.empty:
        return None
    i = ok[metric].astype(float).idxmin() if mode == "min" else ok[metric].astype(float).idxmax()
    return str(table.loc[i, "run_id"])


# ----------------------------------------------------------------------------- figures


def _varying(table: pd.DataFrame, params: Sequence[SweptParam]) -> list[str]:
    return [p.key for p in params if table[p.key].map(_norm).nunique(dropna=False) > 1]


def _has_duplicates(table: pd.DataFrame, keys: Sequence[str]) -> bool:
    if not keys:
        return len(table) > 1
    return bool(table[list(keys)].map(_norm).duplicated().any())


def metric_figures(
    table: pd.DataFrame, keys: Sequence[str], sweeper: str = "basic",
    best_run_id: str | None = None, best_metric: str | None = None,
) -> tuple[dict[str, Any], dict[str, pd.DataFrame], list[str]]:
    """Figures of final test accuracy and test loss over the swept keys that vary; the
    best run (``best_run_id``, chosen by ``best_metric``) is the one outlined.

    Returns (figures, grids, notes): ``grids`` holds the matrices behind 2-parameter
    heatmaps (rows x columns, NaN for failed cells), keyed like the figures.
    """
    from pipeline.viz import plots

    figures: dict[str, Any] = {}
    grids: dict[str, pd.DataFrame] = {}
    notes: list[str] = []
    failed = (table["status"] != OK_STATUS).to_numpy()
    wanted = [(m, m.startswith("test/accuracy")) for m in ("test/accuracy", "test/loss")
              if m in table]
    name = {m: m.replace("/", "_") for m, _ in wanted}
    # Jobs with replicas: each metric's spread across them, for the line plots' bands.
    spreads = {m: f"{m}/std" if f"{m}/std" in table else None for m, _ in wanted}
    if sweeper != "basic" or not keys:
        # A search (Optuna): the objective per trial, in trial order.
        trials = table.assign(trial=table["job"])
        for m, higher in wanted:
            figures[f"{name[m]}.png"] = plots.plot_sweep_lines(
                trials, "trial", m, failed_mask=failed, higher_is_better=higher,
                title=f"final {m} per trial ({'higher' if higher else 'lower'} is better)",
                spread=spreads[m])
        return figures, grids, notes
    agg = "mean" if _has_duplicates(table, keys[:3]) else None
    if agg:
        notes.append(f"several jobs share a cell of {', '.join(keys[:3])}: cells show the mean")
    if len(keys) > 3:
        notes.append(f"{len(keys)} swept parameters: the figures facet the first three "
                     f"({', '.join(keys[:3])}) and average over the others")
    for m, higher in wanted:
        if len(keys) == 1:
            fig = plots.plot_sweep_lines(table, keys[0], m, failed_mask=failed,
                                         higher_is_better=higher, spread=spreads[m])
        elif len(keys) == 2:
            best_job = None
            if best_run_id is not None and not agg:
                best_job = int(np.flatnonzero((table["run_id"] == best_run_id).to_numpy())[0])
            fig = plots.plot_sweep_heatmap(table, keys[0], keys[1], m, failed_mask=failed,
                                           higher_is_better=higher, agg=agg,
                                           fmt=".3f" if higher else ".4f",
                                           best_job=best_job, best_by=best_metric)
            grids[f"{name[m]}_grid"] = heatmap_grid(table, keys[0], keys[1], m, agg)
        else:
            fig = plots.plot_sweep_facets(table, keys[0], keys[1], keys[2], m,
                                          failed_mask=failed, higher_is_better=higher,
                                          agg=agg or ("mean" if len(keys) > 3 else None),
                                          fmt=".3f" if higher else ".4f")
        figures[f"{name[m]}.png"] = fig
    return figures, grids, notes


def heatmap_grid(table: pd.DataFrame, row: str, col: str, value: str,
                 agg: str | None = None) -> pd.DataFrame:
    """The matrix a 2-parameter heatmap shows: rows x columns of ``value`` (NaN = failed)."""
    ok = table[table["status"] == OK_STATUS]
    rows = _ordered(table[row])
    cols = _ordered(table[col])
    grid = pd.DataFrame(np.nan, index=[_fmt(v) for v in rows], columns=[_fmt(v) for v in cols])
    grid.index.name, grid.columns.name = row, col
    for r in rows:
        for c in cols:
            sel = ok[(ok[row].map(_norm) == _norm(r)) & (ok[col].map(_norm) == _norm(c))]
            if len(sel):
                grid.loc[_fmt(r), _fmt(c)] = float(getattr(sel[value], agg or "mean")())
    return grid


def _ordered(values: pd.Series) -> list[Any]:
    """Distinct values, sorted when numeric, else in order of appearance (as plots does)."""
    seen: dict[Any, Any] = {}
    for v in values:
        seen.setdefault(_norm(v), v)
    keys = list(seen)
    if all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in keys):
        keys.sort()
    return [seen[k] for k in keys]


def boundary_figure(
    uri: str, table: pd.DataFrame, keys: Sequence[str], sweeper: str = "basic",
    resolution: int = 80, title: str = "", experiment_id: str | None = None,
) -> tuple[Any | None, list[str]]:
    """Small multiples of the final decision boundaries, one panel per job on the sweep's
    grid (rows: all swept keys but the last, columns: the last; trials in order for a
    search), each model loaded from its run's ``weights.npz``.

    With ``experiment_id``, one search of the experiment's logged models says where each
    job's model is (runs without one there are looked up by ``runs:/`` as before).

    Returns (figure or None when no job has a model, notes).
    """
    from pipeline.tracking import model_files as model_io
    from pipeline.viz import plots

    notes: list[str] = []
    tracking = _tracking()
    probas: dict[str, Any] = {}
    X = y = None
    finished = table[table["status"] == OK_STATUS]
    located: dict[str, str] = {}
    if experiment_id is not None and not finished.empty:
        try:
            located = tracking.logged_model_locations(
                uri, experiment_id, list(finished["run_id"]), WEIGHTS_ARTIFACT.split("/")[0])
        except Exception:  # an older server without the search: one lookup per run
            located = {}
    inside_model = WEIGHTS_ARTIFACT.split("/", 1)[1]
    with tempfile.TemporaryDirectory(prefix="bp-report-") as tmp:
        for _, row in finished.iterrows():
            run_dir = Path(tmp) / row["run_id"]
            path = None
            if row["run_id"] in located:
                try:
                    path = tracking.download_artifact_uri(
                        uri, f"{located[row['run_id']]}/{inside_model}", run_dir)
                except Exception:  # not where the search said: ask through runs:/
                    path = None
            try:
                if path is None:
                    path = tracking.download_artifact(uri, row["run_id"], WEIGHTS_ARTIFACT,
                                                      run_dir)
                probas[row["run_id"]] = model_io.load_model(path).predict_proba
            except Exception:  # no model logged (tracking.log_model=false) or unreadable
                continue
            if X is None:
                try:
                    csv = tracking.download_artifact(uri, row["run_id"], DATASET_ARTIFACT,
                                                     run_dir)
                    X, y = _training_points(pd.read_csv(csv))
                except Exception:
                    X = None
    if not probas or X is None:
        notes.append("no decision boundaries: no finished job has a logged model "
                     "(tracking.log_model=false?)")
        return None, notes
    if table.get(keys[0]) is not None and "dataset.name" not in keys and any(
            k.startswith("dataset") for k in keys):
        notes.append("the dataset is swept: every panel shows the first job's points")

    frame = table.copy()
    if sweeper != "basic" or not keys:
        ncols = max(1, math.ceil(math.sqrt(len(frame))))
        frame["_row"] = [i // ncols for i in range(len(frame))]
        frame["_col"] = [i % ncols for i in range(len(frame))]
        row_key, col_key, row_label, col_label = "_row", "_col", "", ""
    else:
        col_key = keys[-1]
        if len(keys) == 1:
            frame["_row"] = ""
            row_key, row_label = "_row", ""
        elif len(keys) == 2:
            row_key = row_label = keys[0]
        else:
            frame["_row"] = [" | ".join(_fmt(r[k]) for k in keys[:-1])
                             for _, r in frame.iterrows()]
            row_key, row_label = "_row", " | ".join(keys[:-1])
        col_label = col_key
    # Same order as the heatmaps: numbers sorted, other values as the sweep listed them.
    rows, cols = _ordered(frame[row_key]), _ordered(frame[col_key])
    panels, missing = [], []
    taken: set[tuple] = set()
    for _, r in frame.iterrows():
        cell = (_norm(r[row_key]), _norm(r[col_key]))
        if cell in taken:
            continue  # several jobs in one cell (replicas): the first is drawn
        taken.add(cell)
        text = _panel_text(r, keys if sweeper != "basic" else [])
        if r["status"] != OK_STATUS:
            reason = textwrap.shorten(r["failure_reason"] or r["status"], 90, placeholder="...")
            panels.append(plots.SweepPanel(r[row_key], r[col_key], None,
                                           textwrap.fill(reason, 30), True))
        elif r["run_id"] in probas:
            panels.append(plots.SweepPanel(r[row_key], r[col_key], probas[r["run_id"]], text))
        else:
            missing.append(cell)
    if len(taken) < len(frame):
        notes.append("several jobs share a panel: the first of each is drawn")
    fig = plots.plot_small_multiples(panels, rows, cols, row_label, col_label, X, y,
                                     resolution=resolution, title=title)
    axes = fig.axes[: len(rows) * len(cols)]
    if sweeper != "basic" or not keys:
        for ax in axes:  # trial grid: the labels would be meaningless positions
            ax.set_title("")
            ax.set_ylabel("")
    for cell in missing:
        i = [_norm(v) for v in rows].index(cell[0])
        j = [_norm(v) for v in cols].index(cell[1])
        for text in axes[i * len(cols) + j].texts:
            text.set_text("no model logged")
    return fig, notes


def _panel_text(row: pd.Series, keys: Sequence[str]) -> str:
    parts = [f"#{row['job']}"] + [
        f"{k.rsplit('.', 1)[-1]} {row[k]:.3g}" if isinstance(row[k], float) else _fmt(row[k])
        for k in keys]
    lines = [" ".join(parts)] if keys else []
    acc = row.get("test/accuracy")
    if acc is not None and np.isfinite(acc):
        lines.append(f"test acc {acc:.3f}" + ("  best" if row.get("best") else ""))
    return "\n".join(lines)


def _training_points(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    if "split" in frame:
        frame = frame[frame["split"] == "train"]
    features = [c for c in frame.columns if c not in ("label", "split")]
    return frame[features].to_numpy(dtype=float), frame["label"].to_numpy()


# ------------------------------------------------------------------------------- build


def build_report(
    uri: str,
    experiment_id: str,
    parent_run_ids: Sequence[str] | str,
    *,
    best_metric: str = DEFAULT_BEST[0],
    best_mode: str = DEFAULT_BEST[1],
    boundaries: bool = True,
) -> SweepReport:
    """Read one or more sweeps back from MLflow and build their table and figures.

    Parameters
    ----------
    uri : str
        Tracking URI.
    experiment_id : str
    parent_run_ids : str or sequence of str
        The sweeps' parent runs; with several, their jobs share one table (a ``sweep``
        column says which is which) and the swept keys are the union.
    best_metric, best_mode : str
        Which finished job is the best (default: lowest final test loss, the objective).
    boundaries : bool
        Draw the small multiples of decision boundaries (downloads every model).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    tracking = _tracking()
    ids = [parent_run_ids] if isinstance(parent_run_ids, str) else list(parent_run_ids)
    params: list[SweptParam] = []
    sweeper = "basic"
    tables = []
    names = []
    for parent_id in ids:
        parents = tracking.search_runs(uri, [experiment_id], f"attributes.run_id = '{parent_id}'")
        if parents.empty:
            raise LookupError(f"no run {parent_id} in experiment {experiment_id}")
        parent = parents.iloc[0]
        names.append(parent.get(f"tags.{TAG_NAME}") or parent.get("tags.mlflow.runName"))
        kind = parent.get(f"tags.{TAG_SWEEPER}")
        if isinstance(kind, str) and kind != "basic":
            sweeper = kind
        for p in swept_params_of(parent, uri):
            known = next((q for q in params if q.key == p.key), None)
            if known is None:
                params.append(p)
            elif known.values is not None and p.values is not None:
                known.values += [v for v in p.values
                                 if _norm(v) not in {_norm(k) for k in known.values}]
        runs = tracking.search_runs(uri, [experiment_id], f"tags.{PARENT_TAG} = '{parent_id}'")
        tables.append((names[-1], runs))
    parts = []
    for name, runs in tables:
        part = sweep_table(runs, params, sweeper)
        if len(ids) > 1:
            part.insert(0, "sweep", name)
        parts.append(part)
    table = pd.concat(parts, ignore_index=True) if parts else sweep_table(
        pd.DataFrame(), params, sweeper)
    best = pick_best(table, best_metric, best_mode)
    table["best"] = table["run_id"] == best
    keys = _varying(table, params) if not table.empty else []
    report = SweepReport(table=table, params=[p.key for p in params], best_run_id=best,
                         best_metric=best_metric, best_mode=best_mode)
    if table.empty:
        report.notes.append("the sweep has no child runs")
    elif best is None and not (best_metric in table and table[best_metric].notna().any()):
        report.notes.append(
            f"no best run: the jobs logged no {best_metric} (dataset.val_fraction=0 leaves "
            "no validation split, and nothing is selected on the test split)")
        return report
    if any(column.endswith("/std") for column in table.columns):
        report.notes.append("jobs with replicas show mean ± standard deviation across them "
                            "(the heatmaps and the best job use the means; a boundary "
                            "panel shows replica 0, the job's logged model)")
    figures, grids, notes = metric_figures(table, keys, sweeper, best, best_metric)
    report.figures.update(figures)
    report.grids.update(grids)
    report.notes.extend(notes)
    if boundaries:
        fig, notes = boundary_figure(uri, table, keys, sweeper,
                                     title="final decision boundaries",
                                     experiment_id=experiment_id)
        report.notes.extend(notes)
        if fig is not None:
            report.figures["boundaries.png"] = fig
        page = networks_page(uri, table, keys, best)
        if page is not None:
            report.pages["networks.html"] = page
    return report


def networks_page(uri: str, table: pd.DataFrame, keys: Sequence[str],
                  best_run_id: str | None) -> str | None:
    """One page with every finished job's final network drawing, to flip through or compare.

    The drawings are the jobs' own ``plots/network_after.png`` (see
    :mod:`pipeline.viz.neurons`), embedded, so the page needs nothing else; None when no
    job logged one (runs from before the drawings existed, or untracked plots).
    """
    import base64
    import html
    import tempfile

    tracking = _tracking()
    cards = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, row in table[table["status"] == OK_STATUS].iterrows():
            try:
                path = tracking.download_artifact(uri, row["run_id"], "plots/network_after.png",
                                                  Path(tmp) / row["run_id"])
            except Exception:  # an older run without the drawing: leave it out
                continue
            label = ", ".join(f"{k}={_fmt(row[k])}" for k in keys) or str(row["run_name"])
            scores = "  ".join(f"{m} {row[m]:.4f}" for m in METRICS[:2]
                               if m in row and np.isfinite(row[m]))
            cards.append({"label": label, "scores": scores, "run": str(row["run_name"]),
                          "best": row["run_id"] == best_run_id,
                          "png": base64.b64encode(path.read_bytes()).decode("ascii")})
    if not cards:
        return None
    items = "\n".join(
        f'<figure class="card{" best" if c["best"] else ""}" data-i="{i}">'
        f'<img alt="network of {html.escape(c["run"])}" src="data:image/png;base64,{c["png"]}">'
        f'<figcaption><b>{html.escape(c["label"])}</b>{" (best)" if c["best"] else ""}'
        f'<br>{html.escape(c["scores"])}</figcaption></figure>'
        for i, c in enumerate(cards))
    return _NETWORKS_PAGE.replace("__CARDS__", items).replace("__N__", str(len(cards)))


_NETWORKS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sweep: final networks</title>
<style>
 body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
 #grid { display: flex; flex-wrap: wrap; gap: 12px; }
 .card { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 6px; width: 300px;
         cursor: pointer; }
 .card.best { border-color: #2a7; box-shadow: 0 0 0 2px #2a7 inset; }
 .card img { width: 100%; }
 body.one #grid .card { display: none; }
 body.one #grid .card.on { display: block; width: min(900px, 95vw); cursor: default; }
 #bar { margin-bottom: 10px; display: flex; gap: 8px; align-items: center; }
</style></head>
<body>
<div id="bar"><button id="mode" type="button">One at a time</button>
 <button id="prev" type="button">&larr;</button><button id="next" type="button">&rarr;</button>
 <span id="pos"></span> <span>__N__ jobs: each finished job's network after training
 (click one to enlarge; arrow keys flip)</span></div>
<div id="grid">
__CARDS__
</div>
<script>
"use strict";
const cards = [...document.querySelectorAll(".card")];
let i = 0;
function show(k) {
  i = (k + cards.length) % cards.length;
  cards.forEach((c, j) => c.classList.toggle("on", j === i));
  document.getElementById("pos").textContent = document.body.classList.contains("one")
    ? `${i + 1} / ${cards.length}` : "";
}
document.getElementById("mode").onclick = () => {
  document.body.classList.toggle("one"); show(i);
  document.getElementById("mode").textContent =
    document.body.classList.contains("one") ? "All side by side" : "One at a time";
};
function flip(k) { document.body.classList.add("one"); show(k); }
document.getElementById("prev").onclick = () => flip(i - 1);
document.getElementById("next").onclick = () => flip(i + 1);
cards.forEach((c, j) => c.onclick = () => { document.body.classList.add("one"); show(j); });
document.addEventListener("keydown", e => {
  if (e.key === "ArrowRight") { document.body.classList.add("one"); show(i + 1); }
  if (e.key === "ArrowLeft") { document.body.classList.add("one"); show(i - 1); }
});
show(0);
</script></body></html>
"""


# --------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.report --experiment NAME [--sweep ID ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="Rebuild a sweep's summary table and figures from MLflow.")
    parser.add_argument("--experiment", default="backprop",
                        help="experiment name (default: backprop)")
    parser.add_argument("--sweep", action="append", default=None, metavar="ID",
                        help="parent run id or sweep name (default: the latest sweep); "
                             "repeat to compare sweeps in one table")
    parser.add_argument("--uri", default=None,
                        help="tracking URI (default: MLFLOW_TRACKING_URI, else the project's "
                             "mlflow.db)")
    parser.add_argument("--out", default=None,
                        help="directory for summary.csv and the PNGs "
                             "(default: ./sweep-reports/<sweep name>)")
    parser.add_argument("--list", action="store_true", help="list the experiment's sweeps")
    parser.add_argument("--log", action="store_true",
                        help="also attach the rebuilt files to the sweep's parent run")
    parser.add_argument("--best", default=f"{DEFAULT_BEST[0]}:{DEFAULT_BEST[1]}",
                        help="metric:min|max picking the best run (default test/loss:min)")
    parser.add_argument("--no-boundaries", action="store_true",
                        help="skip the decision-boundary panels (no model downloads)")
    args = parser.parse_args(argv)
    tracking = _tracking()
    uri = args.uri or tracking.resolve_tracking_uri("local")
    metric, _, mode = args.best.partition(":")
    try:
        tracking.check_reachable(uri)
        experiment_id = tracking.find_experiment_id(uri, args.experiment)
        if experiment_id is None:
            raise LookupError(f"--experiment {args.experiment!r}: no such experiment in {uri}")
        if args.list:
            sweeps = find_sweeps(uri, experiment_id)
            if sweeps.empty:
                print(f"no sweeps in experiment {args.experiment!r}")
            for _, s in sweeps.iterrows():
                print(f"{s['run_id']}  {s['status']:<8}  {s.get(f'tags.{TAG_NAME}')}  "
                      f"{s.get('tags.overrides', '')}")
            return 0
        parents = [_find_parent(uri, experiment_id, s) for s in (args.sweep or [None])]
        report = build_report(uri, experiment_id, [p["run_id"] for p in parents],
                              best_metric=metric, best_mode=mode or "min",
                              boundaries=not args.no_boundaries)
    except (LookupError, ValueError, tracking.TrackingUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = "+".join(str(p.get(f"tags.{TAG_NAME}") or p["run_id"]) for p in parents)
    out = Path(args.out) if args.out else Path("sweep-reports") / _safe(name)
    written = report.save(out)
    print(f"sweep {name} ({len(report.table)} jobs, {len(report.failed)} failed) in "
          f"experiment {args.experiment!r}:")
    print(report.summary())
    print(f"wrote {len(written)} files to {out}")
    if args.log:
        if len(parents) != 1:
            print("error: --log needs exactly one --sweep", file=sys.stderr)
            return 1
        log_report(uri, parents[0]["run_id"], report)
        print(f"attached to parent run {parents[0]['run_id']}")
    return 0


def log_report(uri: str, parent_run_id: str, report: SweepReport, tracker: Any = None) -> None:
    """Attach the report's files under ``sweep/`` of the parent run, tag the best run on
    the parent and on the child. ``tracker``: an open RunTracker of the parent (else one is
    attached and left running: the caller ends the parent)."""
    tracking = _tracking()
    own = tracker is None
    if own:
        tracker = tracking.RunTracker.attach(uri, parent_run_id)
    for name, content in report.files().items():
        artifact = f"sweep/{name}"
        if isinstance(content, pd.DataFrame):
            tracker.log_text(content.to_csv(index=name != "summary.csv"), artifact)
        elif isinstance(content, str):
            tracker.log_text(content, artifact)
        else:
            tracker.log_bytes(report.png(name), artifact)
    tags = {"sweep.n_jobs": len(report.table), "sweep.n_failed": len(report.failed)}
    best = report.best
    if best is not None:
        tags.update({"best_run_id": best["run_id"], "best_run_name": best["run_name"],
                     "best_metric": f"{report.best_metric} ({report.best_mode})"})
        for m in METRICS:
            if m in best and np.isfinite(best[m]):
                tags[f"best.{m}"] = f"{best[m]:.6g}"
        tracker.log_metrics({f"best/{m.replace('/', '_')}": float(best[m])
                             for m in METRICS if m in best and np.isfinite(best[m])})
        child = tracking.RunTracker.attach(uri, best["run_id"])
        child.set_tags({TAG_BEST: "true"})
        child.detach()  # the child's status stays as it is
    tracker.set_tags(tags)
    tracker.flush(force=True)
    if own:
        tracker.detach()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)[:120] or "sweep"


if __name__ == "__main__":
    sys.exit(main())
