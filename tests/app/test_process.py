"""pipeline.app.process: the collector paused while a process imports, then its heap
frozen; joblib's workers started warm; the exit without interpreter teardown."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.app import process

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_gc():
    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    yield
    process._paused = False
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_settle_without_start_leaves_the_collector_alone(restore_gc):
    gc.enable()
    frozen = gc.get_freeze_count()
    process.settle()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_start_then_settle_freezes_what_is_alive_and_collects_again(restore_gc):
    process.start()
    assert process.paused() and not gc.isenabled()
    kept = [object() for _ in range(100)]  # alive at settle: frozen with everything else
    process.settle()
    assert not process.paused() and gc.isenabled()
    assert gc.get_freeze_count() >= len(kept)
    frozen = gc.get_freeze_count()
    process.settle()  # once only
    assert gc.get_freeze_count() == frozen

    class Cycle:
        pass

    # What the run creates afterwards is collected as before.
    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2


def test_the_pause_can_be_switched_off_for_benchmarks(restore_gc, monkeypatch):
    monkeypatch.setenv("BACKPROP_GC_PAUSE", "0")
    gc.enable()
    process.start()
    assert not process.paused() and gc.isenabled()


def test_a_job_in_a_paused_process_settles_it_after_the_imports(restore_gc):
    frozen = gc.get_freeze_count()
    process.start()
    process.ready_for_a_job(tracked=False)
    assert "pipeline.app.job" in sys.modules and "matplotlib" in sys.modules
    assert gc.isenabled() and not process.paused() and gc.get_freeze_count() > frozen


@pytest.mark.parametrize("launcher", ["basic", "other"])
def test_a_sweep_settles_a_paused_heap_before_its_jobs(tmp_path, restore_gc, launcher):
    # The launching process of a sweep (train.py -m) must collect again before the jobs:
    # a long sweep would otherwise keep everything its jobs and Hydra leave behind.
    from omegaconf import OmegaConf

    from pipeline.app import sweep

    target = process.BASIC_LAUNCHER if launcher == "basic" else "x.SubmititLauncher"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)},
                                         "launcher": {"_target_": target}},
                               "tracking": {"kind": "none"}})
    process.start()
    sweep.MlflowSweepCallback().on_multirun_start(config)
    assert gc.isenabled() and not process.paused()


@pytest.mark.parametrize("fast", ["1", "0"])
def test_exit_runs_the_exit_hooks_and_flushes_the_output(tmp_path, fast):
    """With or without the interpreter's teardown, exit hooks run, buffered output is
    written and the status is the one given."""
    script = (
        "import atexit, sys\n"
        "from pipeline.app import process\n"
        "atexit.register(lambda: print('hook ran', flush=True))\n"
        "sys.stdout.write('buffered ')\n"
        "process.exit(3, single_run=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "BACKPROP_FAST_EXIT": fast}, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered hook ran\n"


@pytest.mark.slow
def test_joblib_workers_warmed_before_the_sweep_are_the_ones_its_jobs_run_in(monkeypatch):
    """The warm-up starts joblib's reusable loky workers with the launcher's own settings:
    a Parallel call made the way the launcher makes it runs in those same processes."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed

    launcher = {"_target_": process.JOBLIB_LAUNCHER, "n_jobs": 2, "backend": None,
                "prefer": "processes", "require": None, "verbose": 0, "timeout": None,
                "pre_dispatch": "2*n_jobs", "batch_size": "auto", "temp_folder": None,
                "max_nbytes": None, "mmap_mode": "r"}
    from joblib.externals.loky.backend import context as loky_context

    # Nothing chose a start method in this process; the one chosen here is undone after.
    monkeypatch.setattr(loky_context, "_DEFAULT_START_METHOD", None)
    thread = process.prewarm_joblib_workers(launcher)
    assert thread is not None
    thread.join(120)
    assert not thread.is_alive() and len(thread.pids) == 2, thread.pids
    assert set(process.joblib_worker_pids()) == set(thread.pids)
    # Forked from one warm fork server (not this process), in the server's own process
    # group: a terminal's Ctrl-C reaches the launching process alone.
    assert loky_context.get_start_method() == "forkserver"
    if sys.platform.startswith("linux"):
        servers = {_parent_pid(pid) for pid in thread.pids}
        assert len(servers) == 1 and os.getpid() not in servers, servers
        assert {os.getpgid(pid) for pid in thread.pids} == servers != {os.getpgrp()}
    settings = {k: v for k, v in launcher.items() if k != "_target_"}
    settings["backend"] = "loky"
    process_joblib_cfg(settings)
    # Jobs long enough that both workers take one.
    pids = Parallel(**settings)(delayed(_pid_after)(0.5) for _ in range(4))
    assert set(pids) <= set(thread.pids), (pids, thread.pids)
    assert process.prewarm_joblib_workers({"_target_": process.BASIC_LAUNCHER}) is None

    # At the sweep's end the workers are shut down in the background, and only once they
    # have exited may train.py skip the interpreter's teardown.
    closing = process.close_joblib_workers(process.JOBLIB_LAUNCHER)
    assert closing is not None
    assert process.sweep_closed(timeout=60)
    assert not closing.is_alive()
    for pid in thread.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert process.close_joblib_workers("x.SubmititLauncher") is None
    assert not process.sweep_closed(timeout=1)
    assert process.close_joblib_workers(process.BASIC_LAUNCHER) is None
    assert process.sweep_closed(timeout=1)


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_start_method_chosen_before_is_left_alone(monkeypatch):
    """Workers come from our warm fork server only if nothing chose loky's start method."""
    pytest.importorskip("joblib")
    from joblib.externals.loky.backend import context as loky_context

    monkeypatch.setattr(loky_context, "_DEFAULT_START_METHOD", "loky")
    assert process._fork_workers_from_a_warm_server() is False
    assert loky_context.get_start_method() == "loky"
    monkeypatch.setattr(loky_context, "_DEFAULT_START_METHOD", "forkserver")
    assert process._fork_workers_from_a_warm_server() is True  # (a user's own fork server)


def _pid_after(seconds: float) -> int:
    import os
    import time as _time

    _time.sleep(seconds)
    return os.getpid()
