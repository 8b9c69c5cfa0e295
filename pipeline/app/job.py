"""One training job from a composed config: data, model, training, tracking, artifacts.

:func:`run` does the work from plain values (:func:`pipeline.app.cli.job` hands it the
config Hydra composed), so tests and notebooks can call it without Hydra. Whatever
happens during training (success, divergence, Ctrl-C, SIGTERM, an exception) the run
ends with the matching MLflow status and keeps what was logged and drawn so far.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.app.config import (
    config_keys,
    dataset_kwargs,
    optimizer_kwargs,
    project_root,
    resolve_head,
    run_name,
)
from pipeline.app.progress import ProgressBar, want_progress
from pipeline.data.datasets import Dataset, make_dataset
from pipeline.engine.loop import DivergenceError, History
from pipeline.engine.mlp import MLP
from pipeline.engine.optim import make_optimizer
from pipeline.fast import fit, fit_replicas
from pipeline.fast.replicas import replicas_from_config
from pipeline.fast.threads import blas_threads

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """Training ended without a result (diverged or raised); the run is recorded FAILED."""


@dataclass
class RunResult:
    """What one job produced.

    Attributes
    ----------
    status : {"FINISHED", "FAILED", "KILLED"}
    metrics : dict
        Final value of every metric.
    history : History
    model : MLP
        The trained network (on standardised inputs).
    dataset : Dataset
    run_id, experiment_id, tracking_uri : str or None
        None when tracking is off.
    reason : str or None
        Why the run did not finish.
    spool_message : str or None
        Where what could not reach the tracking store was kept, and how to upload it.
    timings : dict
        Seconds per phase (data, train, plots, logging, ...).
    n_replicas : int
        Networks trained side by side (``trainer.replicas``); above 1 the metrics are
        their means, with the spreads under ``<key>/std``.
    restored_epoch : int or None
        With early stopping, the earlier epoch whose parameters the model keeps; the
        metrics are that epoch's.
    """

    status: str
    metrics: dict[str, float]
    history: History
    model: MLP
    dataset: Dataset
    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    spool_message: str | None = None
    n_replicas: int = 1
    restored_epoch: int | None = None

    @property
    def objective(self) -> float | None:
        """Final validation loss: what hyper-parameter sweepers minimise (None without a
        validation split: a sweep cannot select on the test split)."""
        return self.metrics.get("val/loss")


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return time.perf_counter() - self._start


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a run; ``signum`` says which.

    A ``KeyboardInterrupt`` subclass, so code that handles Ctrl-C handles it too.
    ``train.py`` exits with the shell's convention for it, ``128 + signum``.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(_signal_text(self.signum))


def _signal_text(signum: int) -> str:
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def _as_interrupted(exc: KeyboardInterrupt) -> Interrupted:
    """A plain ``KeyboardInterrupt`` (Python's own Ctrl-C) is a SIGINT."""
    if isinstance(exc, Interrupted):
        return exc
    new = Interrupted(signal.SIGINT)
    new.__traceback__ = exc.__traceback__
    return new


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C for the whole run, so it ends KILLED, never RUNNING.

    Without it SIGTERM kills the process on the spot: no exit hook runs and the MLflow run
    stays RUNNING forever. Installed from before the run is created until it has ended.
    """
    if os.name != "posix":
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (e.g. a threaded launcher): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold Ctrl-C and SIGTERM back while the tracking store is written; the list it
    yields holds the signals that arrived meanwhile, for the caller to act on after.

    A signal that cuts MLflow's database transaction in the middle prints SQLAlchemy's
    traceback and can lose or repeat the metrics being sent; sending them takes well
    under a second, after which the interrupt still ends the run as it should.
    """
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    previous = {signum: signal.signal(signum, hold)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def process_age() -> float | None:
    """Seconds since this process started (Linux), to report start-up time; else None."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # Field 22 of /proc/<pid>/stat is the start time in clock ticks after boot; the
        # fields after the command name start at field 3.
        return uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def git_commit(root: Path) -> str | None:
    """The checked-out commit of the project, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


#: The config key of each :class:`MLP` argument :func:`build_model` fills (others are
#: ``model.<argument>``).
MODEL_KEYS = {"sizes": "model.hidden_sizes", "seed": "trainer.seed", "dtype": "trainer.dtype"}


def build_model(config: Mapping[str, Any], dataset: Dataset) -> MLP:
    """The network the config describes, sized for the dataset."""
    m, t = config["model"], config["trainer"]
    output, loss, n_outputs = resolve_head(m["output"], m["loss"], dataset.n_classes)
    return MLP(
        [dataset.n_features, *m["hidden_sizes"], n_outputs],
        activation=m["activation"],
        output=output,
        bias=m["bias"],
        init=m["init"],
        seed=t["seed"],
        dtype=t["dtype"],
        activation_params=m.get("activation_params") or {},
        loss=loss,
    )


def _raw_proba(predict_proba, dataset: Dataset):
    """``predict_proba`` on inputs in the data's own units (plots show real coordinates)."""

    def predict_raw(X: np.ndarray) -> np.ndarray:
        return predict_proba(dataset.transform(X))

    return predict_raw


def run(
    config: Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike | None = None,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    parallel: bool = False,
    echo: bool = True,
    startup_seconds: float | None = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
) -> RunResult:
    """Train and track one job described by a validated, resolved config.

    Parameters
    ----------
    config : mapping
        The composed config as plain values (``dataset``, ``model``, ``optimizer``,
        ``trainer``, ``tracking``), already checked by :func:`pipeline.app.config.validate`.
    overrides : sequence of str
        The command-line overrides, recorded as a tag.
    output_dir : path, optional
        Hydra's output directory for this job (spooled data goes there if the store fails).
    parent_run_id : str, optional
        Nest the run under this MLflow run (a sweep's parent).
    experiment_id : str, optional
        Log into this experiment (a sweep's, created once before its jobs start) instead of
        looking ``tracking.experiment`` up by name.
    tags : mapping, optional
        Extra run tags (a sweep's job number).
    parallel : bool
        True inside a parallel sweep: no progress bar, one BLAS thread.
    echo : bool
        Print the final summary.
    startup_seconds : float, optional
        Time from process start to this call (imports, config composition), reported
        as ``time/startup`` with the other phases.
    callbacks : sequence of callables
        More training callbacks ``callback(epoch, metrics)`` (an Optuna trial's pruning
        reporter). One with a ``run_tags()`` method tags the run with it at the end.

    Raises
    ------
    RunFailed
        When training diverged or raised; the run is recorded FAILED first.
    Interrupted
        (a ``KeyboardInterrupt``) On Ctrl-C or SIGTERM, after the run is recorded KILLED
        with the metrics and plots of the state it reached. A second Ctrl-C while those are
        saved skips the remaining artifacts; the run still ends KILLED.
    """
    timer = _Timer()
    if startup_seconds is not None:
        timer.seconds["startup"] = startup_seconds
    tcfg, trk = config["trainer"], config["tracking"]
    # In a parallel sweep every job keeps to one BLAS thread throughout (its evaluation
    # and pictures too, not only training): the other cores run the other jobs. Workers
    # forked from a warm fork server inherit its BLAS thread count, not the limit that
    # joblib sets in the environment of the workers it spawns.
    with _sigterm_as_interrupt(), blas_threads(1 if parallel else None):
        try:
            return _run(config, timer, tcfg, trk, overrides, output_dir, parent_run_id,
                        experiment_id, tags, parallel, echo, callbacks)
        except KeyboardInterrupt as exc:
            raise _as_interrupted(exc) from None


def _run(config, timer, tcfg, trk, overrides, output_dir, parent_run_id, experiment_id, tags,
         parallel, echo, extra_callbacks=()) -> RunResult:
    # The constructors check the values; a bad one is reported with its config key.
    with timer("data"), config_keys("dataset"):
        dataset = make_dataset(config["dataset"]["name"], **dataset_kwargs(config))
    with config_keys("model", MODEL_KEYS):
        model = build_model(config, dataset)
    with config_keys("optimizer"):
        optimizer = make_optimizer(**optimizer_kwargs(config))
    name = run_name(config)

    tracker = None
    tracking_uri = None
    if trk["kind"] != "none":
        # A single run starts when its process did: MLflow then shows the command's
        # duration, not only what followed the imports and the data.
        startup = timer.seconds.get("startup")
        start_ms = None if startup is None else int(1000 * (time.time() - timer.total()
                                                            - startup))
        with timer("logging"):
            tracker, tracking_uri = _start_tracking(
                config, name, overrides, output_dir, parent_run_id, experiment_id, tags,
                start_time=start_ms,
            )

    history = History()
    replica_history = None
    n_replicas = int(tcfg.get("replicas") or 1)
    replicas = replicas_from_config(model, n_replicas) if n_replicas > 1 else None
    # With replicas the pictures during training show their mean prediction.
    predict_raw = _raw_proba(replicas.mean_predict_proba if replicas else model.predict_proba,
                             dataset)
    animation = None
    explorer = None
    initial_weights = None
    before = None
    bar = None
    status, reason, error = "FINISHED", None, None
    # From here on the run exists: whatever happens, it ends FINISHED, FAILED or KILLED.
    try:
        callbacks: list = [history.append]
        if tracker is not None:
            with timer("logging"):
                tracker.log_dataset(dataset.to_frame(), name=dataset.name,
                                    source=dataset.source, targets="label")
            callbacks.append(tracker)
            if trk.get("animation", True):
                with timer("plots"):  # matplotlib's import and the first frame
                    animation = _start_animation(dataset, model, tcfg, predict_raw)
                callbacks.append(animation[1])
            initial_weights = [W.copy() for W in model.weights]
            if trk.get("explorer", True) and replicas is None:
                with timer("plots"):
                    explorer = _start_explorer(dataset, model, tcfg)
                callbacks.append(explorer)
        bar = ProgressBar(tcfg["epochs"], name,
                          enabled=want_progress(tcfg["progress"], parallel=parallel))
        callbacks.append(bar)
        callbacks.extend(extra_callbacks)

        if tcfg.get("gradcheck"):
            _run_gradcheck(model, dataset, tracker, echo)
        if tcfg.get("explain"):
            _explain_first_step(model, dataset, config, tracker, echo)

        if tracker is not None:
            with timer("plots"):
                # (renderer, picture): the renderer draws the picture after training too.
                boundary = _boundary_renderer(dataset)
                before = boundary, boundary.render(predict_raw, f"{name}: before training")

        # Overflow warnings are how a divergence starts; DivergenceError says it in one line.
        with timer("train"), _thread_limit(tcfg.get("threads"), parallel), \
                np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            threads = tcfg.get("threads")
            trainer = (partial(fit_replicas, replicas, learning_rates=tcfg.get("replica_lrs"))
                       if replicas else partial(fit, model))
            trained = trainer(
                dataset.X_train, dataset.y_train,
                loss=model.loss, optimizer=optimizer, epochs=tcfg["epochs"],
                batch_size=tcfg["batch_size"], seed=tcfg["seed"],
                X_val=dataset.X_val, y_val=dataset.y_val,
                X_test=dataset.X_test, y_test=dataset.y_test, callbacks=callbacks,
                eval_every=tcfg["eval_every"], patience=tcfg["patience"],
                threads="auto" if threads in (None, "auto") else int(threads),
            )
            history.best_epoch, history.stopped_early = trained.best_epoch, trained.stopped_early
            # Both are part of time/train: what of it went to evaluating and to callbacks.
            timer.seconds["evaluation"] = trained.eval_seconds
            timer.seconds["callbacks"] = trained.callback_seconds
            if replicas is not None:
                replica_history = trained
    except DivergenceError as exc:
        status, reason, error = "FAILED", str(exc), exc
    except KeyboardInterrupt as exc:
        error = _as_interrupted(exc)
        status, reason = "KILLED", f"interrupted by {error}"
    except Exception as exc:  # recorded on the run, then re-raised
        status, reason, error = "FAILED", f"{type(exc).__name__}: {exc}", exc
    finally:
        if bar is not None:
            bar.close()

    metrics = history.last()
    restored = history.restored_epoch(tcfg["patience"]) if status == "FINISHED" else None
    if restored is not None:
        # Early stopping kept the best epoch's parameters: the run's final metrics are that
        # epoch's, logged once more after the last epoch so that MLflow's latest values (the
        # sweep report's, the UI's) describe the model that is kept, as MLflow's own Keras
        # autologging does.
        metrics = history.at(restored)
        if tracker is not None:
            tracker.log_metrics({**metrics, "restored_epoch": restored},
                                step=history.epochs[-1] + 1)
    replica_table = replica_history.final_table(restored) if replica_history else None
    if tracker is not None:
        for callback in extra_callbacks:
            if hasattr(callback, "run_tags"):
                tracker.set_tags(callback.run_tags())
    if replicas is not None:
        # Replica 0 is the run replicas=1 would make: it stands for the run as its model.
        model.set_params(replicas.replica_params(0))
    spool = None
    if tracker is not None:
        try:
            with _signals_held() as held:
                tracker.flush()  # the training's metrics, before the slower pictures
            if held:
                raise Interrupted(held[0])  # handled below: the pictures are skipped
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                _log_outcome(tracker, timer, config, dataset, model, history, predict_raw,
                             before, animation, status, name, replicas, replica_table,
                             final=metrics, restored=restored,
                             initial_weights=initial_weights, explorer=explorer)
        except KeyboardInterrupt as exc:
            # A (second) Ctrl-C or a SIGTERM while saving: skip the remaining artifacts,
            # end the run with the metrics it has, and exit.
            if status == "FINISHED":
                status, reason = "KILLED", f"interrupted by {_as_interrupted(exc)} while saving"
            error = _as_interrupted(exc)
        except Exception as exc:
            if status == "FINISHED":
                status, reason = "FAILED", f"saving the results failed: {type(exc).__name__}: {exc}"
                error = exc
            else:  # the run already failed; report this one, raise the first
                log.warning("saving the results of a %s run failed: %s", status, exc)
        finally:
            tracker.log_metrics({f"time/{k}": v for k, v in timer.seconds.items()},
                                step=0)
            with timer("logging"), _signals_held() as held:
                spool = tracker.end(status, reason)
            if held and not isinstance(error, KeyboardInterrupt):
                error = Interrupted(held[0])  # the run is ended; exit as interrupted

    result = RunResult(
        status=status, metrics=metrics, history=history, model=model, dataset=dataset,
        run_id=tracker.run_id if tracker else None,
        experiment_id=tracker.experiment_id if tracker else None,
        tracking_uri=tracking_uri, reason=reason, timings=dict(timer.seconds),
        spool_message=tracker.spool_message if spool is not None else None,
        n_replicas=n_replicas, restored_epoch=restored,
    )
    if echo:
        _print_summary(result, name)
    if isinstance(error, KeyboardInterrupt):
        raise error
    if error is not None:
        raise RunFailed(reason) from error
    return result


# --------------------------------------------------------------------------- helpers


def _start_tracking(config, name, overrides, output_dir, parent_run_id,
                    experiment_id=None, extra_tags=None, start_time=None):
    from pipeline.tracking import stores
    from pipeline.tracking import tracker as tracking

    trk = config["tracking"]
    uri = stores.resolve_tracking_uri(trk["kind"], trk.get("uri"))
    stores.check_reachable(uri)
    experiment_id = experiment_id or os.environ.get("BACKPROP_EXPERIMENT_ID")
    spool = Path(output_dir) / "spool" if output_dir else None
    tags = {"dataset": config["dataset"]["name"],
            "overrides": " ".join(overrides) or "(defaults)", **(extra_tags or {})}
    commit = git_commit(project_root())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    experiment_id = experiment_id or tracking.prepare_experiment(uri, trk["experiment"])
    tracker = tracking.RunTracker(uri, spool_root=spool)
    try:
        tracker.start(experiment_id, name, params=config, tags=tags,
                      parent_run_id=parent_run_id, start_time=start_time)
    except KeyboardInterrupt:
        # Interrupted between creating the run and registering its exit hook.
        if tracker.run_id is not None and not tracker.active:
            with contextlib.suppress(Exception):
                tracker.client.set_terminated(tracker.run_id, "KILLED")
        raise
    return tracker, uri


def _start_animation(dataset: Dataset, model: MLP, tcfg, predict_raw):
    from pipeline.viz.plots import BoundaryAnimation, frame_epochs

    anim = BoundaryAnimation(
        dataset.X_train_raw, dataset.y_train, dataset.X_test_raw, dataset.y_test,
        resolution=80, class_names=[str(c) for c in dataset.classes],
        feature_names=dataset.feature_names,
    )
    anim.add_frame(predict_raw, 0)
    epochs = frame_epochs(tcfg["epochs"], tcfg.get("animation_frames", 40))
    return anim, anim.callback(predict_raw, epochs)


def _hidden_layers(model: MLP, dataset: Dataset):
    """``points -> [A_1, ..., A_{L-1}]``: the hidden activations for raw 2-D points."""

    def hidden(points: np.ndarray) -> list[np.ndarray]:
        return model.forward_layers(dataset.transform(points))[1][1:-1]

    return hidden


def _start_explorer(dataset: Dataset, model: MLP, tcfg):
    """The explorer's recorder, at the boundary animation's epochs, with the untrained frame."""
    from pipeline.viz.explorer import ExplorerRecorder
    from pipeline.viz.plots import frame_epochs

    recorder = ExplorerRecorder(
        dataset.X_train_raw, dataset.y_train, dataset.X_test_raw, dataset.y_test,
        hidden_layers=_hidden_layers(model, dataset),
        predict_proba=_raw_proba(model.predict_proba, dataset),
        weights=lambda: model.weights,
        epochs=frame_epochs(tcfg["epochs"], tcfg.get("animation_frames", 40)),
        sizes=model.sizes, class_names=[str(c) for c in dataset.classes],
        feature_names=dataset.feature_names,
        activation_names=[a.name for a in model.hidden_activations],
    )
    recorder.record(0)
    return recorder


def _network_pictures(tracker, model: MLP, dataset: Dataset, title: str, stage: str) -> None:
    """``plots/neurons_<stage>.png`` and ``plots/network_<stage>.png`` of ``model``."""
    from pipeline.viz.neurons import plane_grid, plot_network, plot_neurons, unit_maps

    if len(model.sizes) < 3:  # no hidden layer: nothing to show but the boundary
        return
    grid = plane_grid(np.vstack([dataset.X_train_raw, dataset.X_test_raw]))
    units = unit_maps(_hidden_layers(model, dataset), grid)
    names = [a.name for a in model.hidden_activations]
    tracker.log_figure(plot_neurons(units, title, activation_names=names),
                       f"plots/neurons_{stage}.png")
    tracker.log_figure(
        plot_network(model.weights, units, _raw_proba(model.predict_proba, dataset), title,
                     feature_names=dataset.feature_names, activation_names=names),
        f"plots/network_{stage}.png")


def _boundary_renderer(dataset: Dataset):
    from pipeline.viz.plots import BoundaryRenderer

    # One figure laid out once for the pictures before and after training.
    return BoundaryRenderer(
        dataset.X_train_raw, dataset.y_train, dataset.X_test_raw, dataset.y_test,
        class_names=[str(c) for c in dataset.classes], feature_names=dataset.feature_names,
    )


def _log_png(tracker, write, artifact_file: str) -> None:
    """Log the PNG that ``write(path)`` writes, as ``artifact_file``."""
    directory, _, filename = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(write(Path(tmp) / filename), directory)


def _replica_figure(replicas, dataset: Dataset, title: str):
    from pipeline.viz.plots import plot_replica_boundary

    return plot_replica_boundary(
        lambda X: replicas.predict_proba(dataset.transform(X)),
        dataset.X_train_raw, dataset.y_train, dataset.X_test_raw, dataset.y_test,
        title=f"{title} (mean of {replicas.n_replicas} replicas)",
        class_names=[str(c) for c in dataset.classes], feature_names=dataset.feature_names,
    )


#: Samples of the worked example (trainer.explain), and the largest network it prints.
EXPLAIN_SAMPLES = 4
EXPLAIN_PRINT_MAX_PARAMS = 40


def _explain_first_step(model: MLP, dataset: Dataset, config, tracker, echo: bool) -> None:
    """The first training step on a few samples, worked by the numbers (explain.md)."""
    from pipeline.engine.explain import explain_step

    n = min(EXPLAIN_SAMPLES, len(dataset.y_train))
    trace = explain_step(model, dataset.X_train[:n], dataset.y_train[:n], model.loss,
                         make_optimizer(**optimizer_kwargs(config)))
    trace.notes.append(
        f"the samples are the first {n} rows of the training split, standardised as the "
        "network sees them; the run's own first step uses its whole first batch")
    text = trace.to_markdown()
    if tracker is not None:
        tracker.log_text(text, "explain.md")
    if echo:
        if model.n_params <= EXPLAIN_PRINT_MAX_PARAMS:
            print(text, flush=True)
        else:
            print(f"explain: the first step worked by the numbers is in explain.md "
                  f"({model.n_params} parameters: too many to print)", flush=True)


def _run_gradcheck(model: MLP, dataset: Dataset, tracker, echo: bool) -> None:
    from pipeline.engine.gradcheck import gradcheck

    n = min(64, dataset.X_train.shape[0])
    result = gradcheck(model, dataset.X_train[:n], dataset.y_train[:n], model.loss)
    if echo:
        print(result.table())
    if tracker is not None:
        tracker.log_metrics({f"gradcheck/{k}": v for k, v in result.items()}, step=0)
        tracker.set_tags({"gradcheck": "passed" if result.passed else "FAILED"})


@contextmanager
def _thread_limit(setting: object, parallel: bool) -> Iterator[None]:
    """Cap BLAS threads: one per job in a parallel sweep, or the configured number."""
    from threadpoolctl import threadpool_limits

    limit = 1 if parallel and setting in (None, "auto") else setting
    if limit in (None, "auto"):
        yield
        return
    with threadpool_limits(limits=int(limit)):
        yield


def _log_outcome(tracker, timer, config, dataset, model, history, predict_raw, before,
                 animation, status, name, replicas, replica_table, *,
                 final: Mapping[str, float], restored: int | None,
                 initial_weights=None, explorer=None) -> None:
    """Every artifact of the run, for the state the model reached (``final``: its final
    metrics, those of epoch ``restored`` when early stopping kept an earlier epoch)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from pipeline.viz.plots import plot_training_curves, save_figure, save_image

    diverged = not np.all(np.isfinite(model.params))
    # The model, config and tables first: a tracker running in its own process logs them
    # while the figures are drawn here.
    with timer("logging"):
        _log_config(tracker, config)
        tracker.log_text(dataset.to_frame().to_csv(index=False), "data/dataset.csv")
        summary = {"status": status, "epochs_run": history.epochs[-1] if history.epochs else 0,
                   "best_epoch": history.best_epoch, "stopped_early": history.stopped_early,
                   "restored_epoch": restored,
                   **final}
        tracker.log_dict(summary, "summary.json")
        if replica_table:
            import pandas as pd

            table = pd.DataFrame(replica_table)
            table.insert(1, "seed", [replicas.seeds[k] for k in table["replica"]])
            tracker.log_text(table.to_csv(index=False), "replicas.csv")
        if status != "FAILED" and not diverged and config["tracking"].get("log_model", True):
            raw_model = model.with_input_scaling(dataset.mean, dataset.std)
            tracker.log_model(
                raw_model, dataset.X_train_raw[:5],
                class_names=[f"proba_{c}" for c in dataset.classes],
                feature_names=list(dataset.feature_names),
            )
    with timer("plots"):
        if before is not None:
            _log_png(tracker, partial(save_image, before[1]), "plots/boundary_before.png")
        title = (f"{name}: after {len(history)} epochs" if status == "FINISHED"
                 else f"{name}: {status.lower()}")
        if replicas is not None and not diverged:
            tracker.log_figure(_replica_figure(replicas, dataset, title),
                               "plots/boundary_after.png")
        elif not diverged:
            boundary = before[0] if before is not None else _boundary_renderer(dataset)
            _log_png(tracker, partial(save_image, boundary.render(predict_raw, title)),
                     "plots/boundary_after.png")
        if len(history):
            curves = plot_training_curves(history.metrics, history.epochs, title=name,
                                          best_epoch=history.best_epoch)
            _log_png(tracker, partial(save_figure, curves), "plots/curves.png")
        if animation is not None and len(animation[0]) > 1:
            with tempfile.TemporaryDirectory() as tmp:
                gif = animation[0].save_gif(Path(tmp) / "boundary.gif")
                tracker.log_artifact(gif, "plots")
        if initial_weights is not None:
            untrained = model.copy()
            for W, W0 in zip(untrained.weights, initial_weights, strict=True):
                W[...] = W0
            _network_pictures(tracker, untrained, dataset, f"{name}: before training", "before")
        if not diverged:
            _network_pictures(tracker, model, dataset, title, "after")
            _log_evaluation(tracker, model, dataset,
                            step=history.epochs[-1] if history.epochs else 0)
        if explorer is not None and len(explorer.frames) > 1:
            tracker.log_text(explorer.html(history.metrics, history.epochs, name),
                             "explorer.html")


#: The evaluation's numbers also logged as metrics ``test/<name>``, once, at the last epoch.
EVALUATION_SCALARS = ("balanced_accuracy", "log_loss", "brier", "expected_calibration_error",
                      "roc_auc", "average_precision")


def _log_evaluation(tracker, model: MLP, dataset: Dataset, step: int) -> None:
    """The test split's confusion matrix, reliability, ROC and precision-recall
    (``plots/evaluation.png``), every number behind them (``evaluation.json``), and the
    scalar ones as final ``test/*`` metrics."""
    from pipeline.viz.evaluation import evaluate_classifier

    proba = model.predict_proba(dataset.X_test)
    numbers, figure = evaluate_classifier(dataset.y_test, proba,
                                          [str(c) for c in dataset.classes])
    tracker.log_figure(figure, "plots/evaluation.png")
    tracker.log_dict(numbers, "evaluation.json")
    tracker.log_metrics({f"test/{k}": numbers[k] for k in EVALUATION_SCALARS if k in numbers},
                        step=step)


def _log_config(tracker, config: Mapping[str, Any]) -> None:
    from omegaconf import OmegaConf

    tracker.log_text(OmegaConf.to_yaml(OmegaConf.create(dict(config))), "config.yaml")


def _print_summary(result: RunResult, name: str) -> None:
    m = result.metrics
    replicas = result.n_replicas if result.n_replicas > 1 else 0

    def value(key: str, digits: int) -> str:
        # A replicated run's metrics are means; their spread says how much is luck.
        spread = m.get(f"{key}/std") if replicas else None
        return f"{m[key]:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")

    parts = [f"{k.split('/')[0]} accuracy {value(k, 3)}"
             for k in ("train/accuracy", "val/accuracy", "test/accuracy") if k in m]
    parts += [f"{k.split('/')[0]} loss {value(k, 4)}" for k in ("val/loss", "test/loss")
              if k in m]
    print(f"{name}: {result.status} after {result.history.epochs[-1] if len(result.history) else 0}"
          f" epochs ({result.timings.get('train', 0.0):.2f} s training)")
    if parts:
        print("  " + ", ".join(parts))
        if result.restored_epoch is not None:
            epoch = result.restored_epoch
            print(f"  (stopped early: no better validation loss after epoch {epoch}, whose "
                  "weights are kept and reported)" if result.history.stopped_early else
                  f"  (epoch {epoch} had the best validation loss: its weights are kept and "
                  "reported)")
        if "val/loss" not in m:
            print("  (no validation split, dataset.val_fraction=0: nothing was selected, "
                  "training ran its epochs)")
        if replicas:
            print(f"  (mean ± standard deviation over {replicas} replicas, seeds "
                  f"{result.model.seed}..{result.model.seed + replicas - 1})")
    if result.reason:
        print(f"  reason: {result.reason}")
    if result.spool_message:
        print(f"  {result.spool_message}")
    if result.run_id:
        from pipeline.tracking import stores

        print(f"  MLflow run {result.run_id} in experiment {result.experiment_id}")
        print(f"  view it: {stores.ui_command(result.tracking_uri)}")
        url = stores.run_url(result.tracking_uri, result.experiment_id, result.run_id)
        if url:
            print(f"  then open {url}")
