"""The run explorer page: what it records, its size, and how it behaves in a real browser.

The browser test opens the ``explorer.html`` of a real ``train.py`` run in Debian's
Chromium, driven by Playwright (installed by ``.ci/run``; Playwright's own browser download
is never used), moves the slider and the pointer as a person would, and saves screenshots
under the test's temporary directory.
"""

from __future__ import annotations

import base64
import glob
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.engine.mlp import MLP
from pipeline.viz.explorer import ExplorerRecorder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _recorder(sizes=(2, 16, 16, 1), epochs=(1, 2, 3)):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    model = MLP(list(sizes), activation="tanh", output="sigmoid", seed=0)
    rec = ExplorerRecorder(
        X[:150], y[:150], X[150:], y[150:],
        hidden_layers=lambda P: model.forward_layers(P)[1][1:-1],
        predict_proba=model.predict_proba, weights=lambda: model.weights,
        epochs=epochs, sizes=model.sizes, class_names=["0", "1"],
        activation_names=["tanh"] * (len(sizes) - 2))
    return model, rec


def _page_data(html: str) -> dict:
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def test_frames_hold_the_weights_and_the_units_at_the_recorded_epochs():
    model, rec = _recorder(sizes=(2, 3, 1), epochs=(2, 5))
    rec.record(0)
    for epoch in range(1, 6):
        model.weights[0][...] *= 1.5  # something changes every epoch
        rec(epoch, {})
    assert [f["epoch"] for f in rec.frames] == [0, 2, 5]
    last = rec.frames[-1]
    W = np.frombuffer(base64.b64decode(last["weights"][0]), np.int8).reshape(2, 3)
    # 8-bit weights on the frame's scale: the largest is +-127, the signs are kept.
    expected = model.weights[0] / last["weight_scale"] * 127
    assert np.abs(W - expected).max() <= 0.5 + 1e-9
    res = rec._meta["unit_res"]
    maps = np.frombuffer(base64.b64decode(last["units"][0]), np.uint8).reshape(3, res, res)
    assert maps.min() < 64 and maps.max() > 192  # a full tanh layer spans the scale


def test_a_default_sized_page_stays_small_and_escapes_its_data():
    model, rec = _recorder(epochs=range(1, 41))
    rec.record(0)
    for epoch in range(1, 41):
        rec(epoch, {})
    curves = {"train/loss": [0.5] * 40, "test/loss": [float("nan")] * 40}
    html = rec.html(curves, list(range(1, 41)), "a </script> title")
    assert len(html.encode()) < 3_000_000
    assert "<script src" not in html and "http" not in html.split("<script id")[0]
    data = _page_data(html)
    assert len(data["frames"]) == 41
    assert data["curves"]["test/loss"][0] is None  # NaN is not valid JSON
    assert "a &lt;/script&gt; title" in html


@pytest.mark.slow
def test_the_explorer_of_a_real_run_plays_in_chromium(run_train, tmp_path, new_store):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright missing: pip install -e '.[dev]'")
    uri = new_store(tmp_path / "store")
    proc = run_train("trainer.epochs=60", "tracking.log_model=false",
                     env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    pages = glob.glob(str(tmp_path / "store" / "mlruns" / "*" / "*" / "artifacts"
                          / "explorer.html"))
    assert len(pages) == 1
    assert Path(pages[0]).stat().st_size < 3_000_000

    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1320, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(Path(pages[0]).as_uri())
            page.wait_for_function("window.explorer && window.explorer.ready")
            n_frames = page.evaluate("window.explorer.frames")
            assert n_frames == 41  # the untrained model and the animation's 40 epochs
            assert "epoch 60 of 60" in page.inner_text("#epoch")
            last = {c: page.eval_on_selector(f"#{c}", "c => c.toDataURL()")
                    for c in ("boundary", "network", "curves")}
            page.screenshot(path=str(tmp_path / "explorer_last.png"))

            # Drag the slider back to the start with the keyboard, as a person could.
            page.focus("#slider")
            page.keyboard.press("Home")
            assert page.evaluate("window.explorer.frame") == 0
            assert "epoch 0 of 60" in page.inner_text("#epoch")
            assert "before training" in page.inner_text("#metrics")
            first = {c: page.eval_on_selector(f"#{c}", "c => c.toDataURL()")
                     for c in ("boundary", "network", "curves")}
            assert all(first[c] != last[c] for c in first), "a canvas did not change"
            page.keyboard.press("ArrowRight")
            assert page.evaluate("window.explorer.frame") == 1

            # Play runs to the end by itself.
            page.click("#play")
            page.wait_for_function(f"window.explorer.frame === {n_frames - 1}", timeout=30_000)
            assert page.inner_text("#play") == "Play"

            # Hovering a hidden unit enlarges its map; the margin does not.
            box = page.eval_on_selector("#network", "c => c.getBoundingClientRect().toJSON()")
            page.mouse.move(box["x"] + 1, box["y"] + 1)
            assert not page.is_visible("#zoom")
            # The first unit of layer 1 sits in the second column.
            page.mouse.move(*_unit_centre(page, box))
            assert page.is_visible("#zoom")
            assert "layer 1, unit 0" in page.inner_text("#zoomtext")
            page.screenshot(path=str(tmp_path / "explorer_hover.png"))
        finally:
            browser.close()
    assert errors == []
    assert all(url.startswith("file:") or url.startswith("data:") for url in requests), requests


def _unit_centre(page, box: dict) -> tuple[float, float]:
    x, y = page.evaluate("window.explorer.unitCentre(1, 0)")
    return box["x"] + x, box["y"] + y
