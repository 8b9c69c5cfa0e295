"""pipeline.app.heap: the collector paused during start-up imports, then the heap frozen."""

from __future__ import annotations

import gc

import pytest

from pipeline.app import heap


@pytest.fixture
def restore_gc():
    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    yield
    heap._paused = False
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_settle_without_pause_leaves_the_collector_alone(restore_gc):
    gc.enable()
    frozen = gc.get_freeze_count()
    heap.settle()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_pause_then_settle_freezes_what_is_alive_and_collects_again(restore_gc):
    heap.pause()
    assert heap.paused() and not gc.isenabled()
    kept = [object() for _ in range(100)]  # alive at settle: frozen with everything else
    heap.settle()
    assert not heap.paused() and gc.isenabled()
    assert gc.get_freeze_count() >= len(kept)
    frozen = gc.get_freeze_count()
    heap.settle()  # once only
    assert gc.get_freeze_count() == frozen

    class Cycle:
        pass

    # What the run creates afterwards is collected as before.
    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2


def test_a_run_settles_a_paused_heap(config, restore_gc):
    from pipeline.app import job as app

    frozen = gc.get_freeze_count()
    heap.pause()
    result = app.run(config("tracking=none", "trainer.epochs=3"), echo=False)
    assert result.status == "FINISHED" and result.history.epochs == [1, 2, 3]
    assert gc.isenabled() and not heap.paused() and gc.get_freeze_count() > frozen


@pytest.mark.parametrize("launcher", ["basic", "other"])
def test_a_sweep_settles_a_paused_heap_before_its_jobs(tmp_path, restore_gc, launcher):
    # The launching process of a sweep (train.py -m) must collect again before the jobs:
    # a long sweep would otherwise keep everything its jobs and Hydra leave behind.
    from omegaconf import OmegaConf

    from pipeline.app import sweep

    target = sweep.BASIC_LAUNCHER if launcher == "basic" else "x.SubmititLauncher"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)},
                                         "launcher": {"_target_": target}},
                               "tracking": {"kind": "none"}})
    heap.pause()
    sweep.MlflowSweepCallback().on_multirun_start(config)
    assert gc.isenabled() and not heap.paused()
