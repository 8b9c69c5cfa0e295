"""Tests for pipeline.viz.plots against analytic models whose probabilities are known exactly."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot, so the "nothing is shown" check needs no display

import matplotlib.pyplot as plt  # noqa: E402  (only to assert that no figure is registered)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.viz import plots  # noqa: E402

# ------------------------------------------------------------------------------ models


def logistic_proba(X: np.ndarray, scale: float = 2.0) -> np.ndarray:
    """P(class 1) = sigmoid(scale * (x1 + x2)): the 0.5 boundary is the line x1 + x2 = 0."""
    p = 1.0 / (1.0 + np.exp(-scale * (X[:, 0] + X[:, 1])))
    return np.column_stack([1.0 - p, p])


W3 = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]])  # (2, 3): class scores x1, x2, -x1-x2


def softmax3_proba(X: np.ndarray) -> np.ndarray:
    """Three classes from linear scores X @ W3; argmax regions meet at the origin."""
    s = 3.0 * X @ W3
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """Every test must leave pyplot without figures: the module never registers any."""
    plt.close("all")
    yield
    assert plt.get_fignums() == []


@pytest.fixture(scope="module")
def data2():
    rng = np.random.default_rng(0)
    X_tr, X_te = rng.normal(size=(120, 2)), rng.normal(size=(40, 2))
    return X_tr, (X_tr.sum(1) > 0).astype(int), X_te, (X_te.sum(1) > 0).astype(int)


@pytest.fixture(scope="module")
def data3():
    rng = np.random.default_rng(1)
    X_tr, X_te = rng.normal(size=(150, 2)), rng.normal(size=(50, 2))
    return (X_tr, softmax3_proba(X_tr).argmax(1), X_te, softmax3_proba(X_te).argmax(1))


def _image(ax) -> AxesImage:
    images = [im for im in ax.get_images() if isinstance(im, AxesImage)]
    assert len(images) == 1
    return images[0]


def _boundary(ax) -> LineCollection:
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(lines) == 1
    return lines[0]


# ------------------------------------------------------------------------------ grid


def test_boundary_grid_covers_data_with_margin_relative_to_spread():
    X = np.array([[0.0, -1.0], [2.0, 3.0]])  # feature std: 1 and 2
    xx, yy, pts = plots.boundary_grid(X, resolution=11, margin=0.5)
    assert xx.shape == yy.shape == (11, 11)
    assert pts.shape == (121, 2)
    assert xx.min() == -0.5 and xx.max() == 2.5
    assert yy.min() == -2.0 and yy.max() == 4.0
    # the same picture at any scale (raw units)
    xx_small, yy_small, _ = plots.boundary_grid(X * 1e-3, resolution=11, margin=0.5)
    np.testing.assert_allclose(xx_small, xx * 1e-3)
    np.testing.assert_allclose(yy_small, yy * 1e-3)
    # points are the raveled meshgrid, so predict_proba(points).reshape(res, res, k) maps back
    np.testing.assert_array_equal(pts[:, 0].reshape(11, 11), xx)
    np.testing.assert_array_equal(pts[:, 1].reshape(11, 11), yy)


@pytest.mark.parametrize(
    ("X", "kwargs", "match"),
    [
        (np.zeros((5, 3)), {}, "shape"),
        (np.array([[0.0, np.nan]]), {}, "NaN"),
        (np.zeros((5, 2)), {"resolution": 1}, "resolution"),
        (np.zeros((5, 2)), {"margin": -1.0}, "margin"),
    ],
)
def test_boundary_grid_rejects_bad_input(X, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plots.boundary_grid(X, **kwargs)


# ------------------------------------------------------------------ decision boundary


def test_binary_boundary_image_is_the_analytic_probability(data2):
    X_tr, y_tr, X_te, y_te = data2
    grid = plots.boundary_grid(np.vstack([X_tr, X_te]), resolution=60)
    fig = plots.plot_decision_boundary(logistic_proba, X_tr, y_tr, X_te, y_te,
                                       title="t", grid=grid)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # the plot and its colour bar
    ax = fig.axes[0]
    xx, yy, pts = grid
    im = _image(ax)
    np.testing.assert_allclose(im.get_array(), logistic_proba(pts)[:, 1].reshape(xx.shape))
    # pixel centres sit exactly on the grid points
    x0, x1, y0, y1 = im.get_extent()
    dx = xx[0, 1] - xx[0, 0]
    assert x0 == pytest.approx(xx.min() - dx / 2) and x1 == pytest.approx(xx.max() + dx / 2)
    assert y0 < yy.min() < yy.max() < y1
    assert ax.get_title() == "t"


def test_binary_boundary_has_the_half_contour_on_the_true_line(data2):
    X_tr, y_tr, X_te, y_te = data2
    fig = plots.plot_decision_boundary(logistic_proba, X_tr, y_tr, X_te, y_te, resolution=80)
    line = _boundary(fig.axes[0])
    assert line.get_label() == "p = 0.5"
    vertices = np.vstack(line.get_segments())
    assert len(vertices) > 10
    # on x1 + x2 = 0, up to linear interpolation between grid points (step ~0.1)
    np.testing.assert_allclose(vertices.sum(axis=1), 0.0, atol=1e-3)


def test_points_train_filled_test_hollow_and_legend(data2):
    X_tr, y_tr, X_te, y_te = data2
    fig = plots.plot_decision_boundary(logistic_proba, X_tr, y_tr, X_te, y_te, resolution=30)
    ax = fig.axes[0]
    def hollow_marker(ln):
        return isinstance(ln.get_markerfacecolor(), str) and ln.get_markerfacecolor() == "none"

    filled = [ln for ln in ax.lines if not hollow_marker(ln)]
    hollow = [ln for ln in ax.lines if hollow_marker(ln)]
    assert sum(len(ln.get_xdata()) for ln in filled) == len(X_tr)
    assert sum(len(ln.get_xdata()) for ln in hollow) == len(X_te)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["class 0", "class 1", "train", "test"]


def test_precomputed_probabilities_equal_callable(data2):
    X_tr, y_tr, _, _ = data2
    grid = plots.boundary_grid(X_tr, resolution=25)
    P = logistic_proba(grid[2])
    a = _image(plots.plot_decision_boundary(logistic_proba, X_tr, y_tr, grid=grid).axes[0])
    for pre in (P, P.reshape(25, 25, 2), P[:, 1].reshape(25, 25), P[:, 1]):
        b = _image(plots.plot_decision_boundary(pre, X_tr, y_tr, grid=grid).axes[0])
        np.testing.assert_allclose(b.get_array(), a.get_array())


def test_k_class_regions_are_argmax_coloured_with_borders(data3):
    X_tr, y_tr, X_te, y_te = data3
    grid = plots.boundary_grid(np.vstack([X_tr, X_te]), resolution=50)
    fig = plots.plot_decision_boundary(softmax3_proba, X_tr, y_tr, X_te, y_te, grid=grid)
    assert len(fig.axes) == 1  # no colour bar for class regions
    ax = fig.axes[0]
    rgb = np.asarray(_image(ax).get_array())
    assert rgb.shape == (50, 50, 3)
    label = softmax3_proba(grid[2]).argmax(1).reshape(50, 50)
    colours = plots._class_colours(3)
    # each pixel is its argmax class colour blended with white: the closest class colour
    # direction (1 - rgb is proportional to 1 - colour) identifies the class
    fade = 1.0 - rgb.reshape(-1, 3)
    direction = fade / np.linalg.norm(fade, axis=1, keepdims=True)
    ref = (1.0 - colours) / np.linalg.norm(1.0 - colours, axis=1, keepdims=True)
    np.testing.assert_array_equal((direction @ ref.T).argmax(1).reshape(50, 50), label)
    # confident pixels are more saturated than uncertain ones
    conf = softmax3_proba(grid[2]).max(1)
    strength = np.linalg.norm(fade, axis=1)
    assert strength[conf.argmax()] > strength[conf.argmin()]
    assert len(_boundary(ax).get_segments()) >= 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["class 0", "class 1", "class 2"]


def test_draws_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    X = np.array([[-1.0, -1.0], [1.0, 1.0]])
    out = plots.plot_decision_boundary(logistic_proba, X, [0, 1], ax=ax, resolution=10,
                                       colorbar=False, legend=False)
    assert out is fig
    assert len(_image(ax).get_array()) == 10


@pytest.mark.parametrize(
    ("proba", "match"),
    [
        (lambda X: np.ones((len(X) - 1, 2)), "rows"),
        (lambda X: np.ones((len(X), 1, 1, 1)), "do not fit"),
    ],
)
def test_bad_predict_proba_output_is_a_clear_error(proba, match):
    X = np.array([[-1.0, -1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=match):
        plots.plot_decision_boundary(proba, X, [0, 1], resolution=10)


def test_missing_labels_for_test_points_is_an_error():
    X = np.array([[-1.0, -1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="y_test"):
        plots.plot_decision_boundary(logistic_proba, X, [0, 1], X_test=X, resolution=10)


def test_nan_probabilities_are_drawn_not_fatal():
    X = np.array([[-1.0, -1.0], [1.0, 1.0]])
    fig = plots.plot_decision_boundary(lambda Z: np.full((len(Z), 2), np.nan), X, [0, 1],
                                       resolution=10)
    assert np.ma.getmaskarray(_image(fig.axes[0]).get_array()).all()
    assert _boundary(fig.axes[0]).get_segments() == []


# -------------------------------------------------------------------- training curves


def test_training_curves_panels_and_log_scale():
    n = 50
    h = {
        "train/loss": np.exp(-np.linspace(0, 9, n)),  # spans ~4 decades -> log scale
        "test/loss": np.exp(-np.linspace(0, 8, n)),
        "train/accuracy": np.linspace(0.5, 1.0, n),
        "test/accuracy": np.linspace(0.5, 0.95, n),
    }
    epochs = list(range(1, n + 1))
    fig = plots.plot_training_curves(h, epochs, best_epoch=30)
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    assert [ln.get_label() for ln in loss_ax.lines[:2]] == ["train", "test"]
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), h["train/loss"])
    np.testing.assert_allclose(acc_ax.lines[1].get_xdata(), epochs)


def test_training_curves_linear_when_narrow_and_skip_nan():
    h = {"train/loss": [1.0, 0.5, 0.4], "test/loss": [1.1, np.nan, 0.45]}
    fig = plots.plot_training_curves(h, [1, 2, 3])
    loss_ax = fig.axes[0]
    assert loss_ax.get_yscale() == "linear"
    np.testing.assert_array_equal(loss_ax.lines[1].get_xdata(), [1, 3])  # not-evaluated gap


def test_training_curves_validation():
    with pytest.raises(ValueError, match="train/loss"):
        plots.plot_training_curves({"lr": [0.1]}, [1])
    with pytest.raises(ValueError, match="epochs"):
        plots.plot_training_curves({"train/loss": [1.0, 0.5]}, [1, 2, 3])


# ------------------------------------------------------------------------ animation


@pytest.mark.parametrize(("total", "n"), [(300, 40), (1000, 40), (41, 40), (10, 40), (5, 1)])
def test_frame_epochs_dense_early_and_ends_on_last(total, n):
    e = plots.frame_epochs(total, n)
    assert len(e) == min(n, total)
    assert e[-1] == total
    assert all(b > a for a, b in zip(e, e[1:], strict=False))
    if n > 1:
        assert e[0] == 1
    if n >= 5 and total > 2 * n:
        assert e[:5] == [1, 2, 3, 4, 5]  # early learning is captured epoch by epoch
        gaps = np.diff(e)
        assert gaps[-1] > gaps[0]


def test_frame_epochs_start_zero_and_validation():
    assert plots.frame_epochs(100, 10, start=0)[0] == 0
    with pytest.raises(ValueError, match="n_frames"):
        plots.frame_epochs(100, 0)
    with pytest.raises(ValueError, match="total_epochs"):
        plots.frame_epochs(0)


def test_animation_stores_arrays_and_writes_gif_with_all_frames(tmp_path, data2):
    X_tr, y_tr, X_te, y_te = data2
    anim = plots.BoundaryAnimation(X_tr, y_tr, X_te, y_te, resolution=50)
    epochs = plots.frame_epochs(300, 40)
    calls = []

    def model(X):
        calls.append(len(X))
        return logistic_proba(X, scale=len(calls) / 10)

    for e in epochs:
        anim.add_frame(model, e, {"train/loss": 1.0 / e, "test/accuracy": 0.9})
    assert calls == [2500] * 40  # one vectorised call per frame
    assert len(anim) == 40
    assert all(isinstance(f, np.ndarray) and f.shape == (50, 50) for f in anim.frames)
    np.testing.assert_allclose(anim.frames[0], logistic_proba(anim.grid[2], 0.1)[:, 1]
                               .reshape(50, 50), rtol=1e-6)
    path = anim.save_gif(tmp_path / "sub" / "boundary.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 40
        assert gif.is_animated
        assert gif.info["loop"] == 0
        assert gif.info["duration"] == 100


def test_animation_k_class_and_callback(tmp_path, data3):
    X_tr, y_tr, X_te, y_te = data3
    anim = plots.BoundaryAnimation(X_tr, y_tr, X_te, y_te, resolution=30)
    cb = anim.callback(softmax3_proba, epochs=[1, 3])
    for epoch in range(1, 5):
        cb(epoch, {"train/loss": 1.0})
    assert anim.epochs == [1, 3]
    assert anim.frames[0].shape == (30, 30, 3)
    with Image.open(anim.save_gif(tmp_path / "k.gif")) as gif:
        assert gif.n_frames == 2


def test_animation_rejects_changing_class_count_and_empty_save(tmp_path, data2):
    X_tr, y_tr, _, _ = data2
    anim = plots.BoundaryAnimation(X_tr, y_tr, resolution=10)
    with pytest.raises(ValueError, match="no frames"):
        anim.save_gif(tmp_path / "x.gif")
    anim.add_frame(logistic_proba, 1)
    with pytest.raises(ValueError, match="class count"):
        anim.add_frame(softmax3_proba, 2)


def test_fast_raster_matches_matplotlib_imshow(data2):
    """The animation paints pixels itself; it must agree with imshow (no flips/offsets)."""
    X_tr, y_tr, _, _ = data2
    grid = plots.boundary_grid(X_tr, resolution=40)
    # asymmetric in both axes, so a flip or transpose would show
    D = 1.0 / (1.0 + np.exp(-(grid[0] + 0.4 * grid[1] ** 2 - 0.5)))
    fig = plots._new_figure((4.0, 4.0))
    fig.set_dpi(80)
    ax = fig.add_subplot()
    layer = plots._BoundaryLayer(ax, grid, D, plots._class_colours(2))
    layer.boundary.set_visible(False)
    ax.set_xlim(layer.image.get_extent()[:2])
    ax.set_ylim(layer.image.get_extent()[2:])
    ax.set_axis_off()
    fig.canvas.draw()
    reference = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    painted = np.asarray(fig.canvas.buffer_rgba()).copy()
    raster = plots._AxesRaster(ax, grid, plots._class_colours(2), painted.shape[0])
    raster.paint(painted, D.astype(np.float32))
    rows, cols = raster.rows, raster.cols
    inner = (slice(rows.start + 2, rows.stop - 2), slice(cols.start + 2, cols.stop - 2))
    diff = np.abs(painted[..., :3].astype(int)[inner] - reference[inner])
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8


# ------------------------------------------------------------------------------ renderer


def _pixel(renderer, image, x, y):
    """The RGB colour of ``image`` at data point (x, y) of the renderer's axes."""
    ax = renderer._canvas.fig.axes[0]
    px, py = ax.transData.transform((x, y))
    return np.asarray(image.convert("RGB"))[image.height - 1 - int(py), int(px)].astype(int)


def test_renderer_picture_is_the_boundary_figure(data2):
    """Painted instead of drawn, the picture must still be plot_decision_boundary's."""
    X_tr, y_tr, X_te, y_te = data2
    title = "logistic: after 300 epochs"
    renderer = plots.BoundaryRenderer(X_tr, y_tr, X_te, y_te, resolution=80)
    picture = renderer.render(logistic_proba, title)
    assert picture.mode == "RGB" and picture.size == (560, 500)  # 5.6 x 5.0 in at 100 dpi
    fig = plots.plot_decision_boundary(logistic_proba, X_tr, y_tr, X_te, y_te, title=title,
                                       grid=renderer.grid)
    fig.canvas.draw()
    reference = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    diff = np.abs(np.asarray(picture).astype(int) - reference)
    # Same layout, ticks, colour bar, legend, points and boundary; the image is resampled
    # by Pillow instead of Agg.
    body = diff[40:]
    assert body.mean() < 0.5 and np.percentile(body, 99.9) < 40
    # The title is drawn by Pillow from the same font file at the same size, centred in
    # the same place (its glyphs are hinted differently, and sit up to 4 pixels lower).
    def ink(rgb):  # rows and columns of the title's dark pixels, above the axes
        dark = rgb[:25, :450].min(axis=-1) < 128
        rows, cols = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
        return np.array([rows[0], rows[-1], cols[0], cols[-1]])

    got, want = ink(np.asarray(picture)), ink(reference)
    assert np.all(np.abs(got[2:] - want[2:]) <= 2), (got, want)  # left and right ends
    assert 0 <= got[0] - want[0] <= 4 and abs((got[1] - got[0]) - (want[1] - want[0])) <= 1


def test_a_new_renderer_of_the_same_pictures_takes_the_laid_out_figure_of_a_gone_one(
        data2, data3, monkeypatch):
    """The jobs of a sweep draw the same data: a renderer takes the canvas of a collected
    renderer of the same pictures instead of laying a figure out again, and draws exactly
    what a renderer building its own figure draws."""
    import gc

    X_tr, y_tr, X_te, y_te = data2

    def renderer(**kwargs):
        return plots.BoundaryRenderer(X_tr, y_tr, X_te, y_te, resolution=40, dpi=60, **kwargs)

    plots._CANVASES.clear()
    built = []
    build = plots.BoundaryRenderer._build

    def counted(self, D, reserve):
        built.append(reserve)
        return build(self, D, reserve)

    monkeypatch.setattr(plots.BoundaryRenderer, "_build", counted)
    first = renderer()
    first.render(lambda X: logistic_proba(X, 5.0), "job 1: before training")
    # In use by a live renderer: another one builds its own.
    other = renderer()
    other.render(logistic_proba, "job 2: before training")
    canvases = {id(first._canvas), id(other._canvas)}
    assert len(canvases) == 2 and len(built) == 2
    del first, other
    gc.collect()
    again = renderer()
    picture = again.render(logistic_proba, "job 3: after 300 epochs")
    assert len(built) == 2, built  # no layout: an idle canvas was taken
    assert id(again._canvas) in canvases
    # Other points, another size or more title lines: a figure of its own.
    renderer(marker_size=2.0).render(logistic_proba, "x")
    plots.BoundaryRenderer(*data3, resolution=40, dpi=60).render(softmax3_proba, "x")
    renderer().render(logistic_proba, "two\nlines")
    assert len(built) == 5, built
    monkeypatch.undo()
    plots._CANVASES.clear()
    fresh = renderer().render(logistic_proba, "job 3: after 300 epochs")
    assert np.array_equal(np.asarray(picture), np.asarray(fresh))


def test_renderer_colours_each_side_and_reuses_its_figure(data2):
    X_tr, y_tr, X_te, y_te = data2
    renderer = plots.BoundaryRenderer(X_tr, y_tr, X_te, y_te, resolution=60, dpi=80)
    first = renderer.render(logistic_proba, "first")
    assert first.size == (448, 400)
    xx, yy, _ = renderer.grid
    # Grid corners, away from the data: class 1 (x1 + x2 > 0) is red, class 0 blue.
    r1, _, b1 = _pixel(renderer, first, xx.max() - 0.05, yy.max() - 0.05)
    r0, _, b0 = _pixel(renderer, first, xx.min() + 0.05, yy.min() + 0.05)
    assert r1 > b1 + 25 and b0 > r0 + 25
    flipped = renderer.render(lambda X: logistic_proba(X, scale=-2.0), "first")
    r1f, _, b1f = _pixel(renderer, flipped, xx.max() - 0.05, yy.max() - 0.05)
    assert b1f > r1f + 25
    fig = renderer._canvas.fig
    again = renderer.render(logistic_proba, "first")
    assert renderer._canvas.fig is fig  # laid out once
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))  # nothing left over


def test_renderer_k_classes_title_lines_and_errors(data3):
    X_tr, y_tr, X_te, y_te = data3
    renderer = plots.BoundaryRenderer(X_tr, y_tr, X_te, y_te, resolution=40, dpi=60)
    one = renderer.render(softmax3_proba, "one line")
    colours = plots._class_colours(3)
    xx, yy, _ = renderer.grid
    # Near a corner the most probable class is certain: its colour, faded by at most 25 %.
    pixel = _pixel(renderer, one, xx.max() - 0.05, yy.min() + 0.05)  # x1 large: class 0
    expected = 255 * (1.0 - 0.75 * (1.0 - colours[0]))
    np.testing.assert_allclose(pixel, expected, atol=12)
    # A title with more lines than the layout made room for: laid out again, same size.
    fig = renderer._canvas.fig
    two = renderer.render(softmax3_proba, "two\nlines")
    assert renderer._canvas.fig is not fig and two.size == one.size
    top = np.asarray(two)[: 30].min(axis=-1)
    assert (top < 100).sum() > 20  # text was drawn in the title strip
    with pytest.raises(ValueError, match="number of classes"):
        renderer.render(logistic_proba)


def test_renderer_paints_nan_grey(data2):
    X_tr, y_tr, _, _ = data2
    renderer = plots.BoundaryRenderer(X_tr, y_tr, resolution=30)
    P = logistic_proba(renderer.grid[2])
    P[renderer.grid[2][:, 0] < 0] = np.nan  # a diverged model, on half of the plane
    picture = renderer.render(P)
    xx, yy, _ = renderer.grid
    grey = (np.array(plots.mcolors.to_rgb(plots._BAD_COLOUR)) * 255).round()
    np.testing.assert_allclose(_pixel(renderer, picture, xx.min() + 0.05, yy.max() - 0.05),
                               grey, atol=2)


def _gif_frames(path):
    with Image.open(path) as gif:
        frames, durations = [], []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")).astype(int))
            durations.append(gif.info["duration"])
    return frames, durations


def test_gif_frames_are_the_rendered_frames(tmp_path, data2):
    """Unchanged pixels are written transparent; decoded, every frame must still be whole."""
    X_tr, y_tr, X_te, y_te = data2
    anim = plots.BoundaryAnimation(X_tr, y_tr, X_te, y_te, resolution=40)
    for epoch, scale in enumerate((0.2, 0.5, 1.0, 2.0, 2.0, 4.0)):
        anim.add_frame(lambda X, s=scale: logistic_proba(X, s), epoch,
                       {"train/loss": 1.0 / (epoch + 1), "test/accuracy": 0.5 + epoch / 20})
    path = anim.save_gif(tmp_path / "b.gif", fps=5, hold_last=2.0)
    frames, durations = _gif_frames(path)
    assert len(frames) == 6 and durations == [200] * 5 + [2000]
    rendered = [np.asarray(im).astype(int) for im in anim._render_frames(80)]
    assert frames[0].shape == rendered[0].shape == (400, 448, 3)
    for k, (got, want) in enumerate(zip(frames, rendered, strict=True)):
        # up to the 255-colour palette, in which the figure's white and black are exact
        assert np.abs(got - want).mean() < 1.5, k
        assert np.all(got[want.min(axis=-1) == 255] == 255), k
    # Frames 3 and 4 have the same model: only the title changed.
    changed = np.any(frames[3] != frames[4], axis=-1)
    assert changed.any() and not changed[60:].any()
    assert np.abs(frames[0] - frames[-1]).mean() > 5  # the boundary sharpened
    # One palette for all frames: what stays put (axes labels, colour bar, legend) keeps
    # exactly its colours.
    static = np.all([np.all(f == frames[0], axis=-1) for f in frames], axis=0)
    assert static.mean() > 0.4


# ------------------------------------------------------------------ sweeps and reports


def _sweep_table():
    rows = []
    for h in ([4], [8], [16, 16]):
        for lr in (0.01, 0.1, 1.0):
            rows.append({"hidden": str(h), "lr": lr,
                         "acc": round(0.5 + 0.1 * len(rows) / 2, 4), "act": "tanh"})
    table = pd.DataFrame(rows)
    failed = np.zeros(len(table), dtype=bool)
    failed[5] = True
    table.loc[5, "acc"] = np.nan
    return table, failed


def _cell_texts(ax):
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
            for t in ax.texts}


def test_heatmap_annotations_equal_table_values_and_failed_marked():
    table, failed = _sweep_table()
    fig = plots.plot_sweep_heatmap(table, "hidden", "lr", "acc", failed_mask=failed)
    assert len(fig.axes) == 2  # heatmap + colour bar
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["[4]", "[8]", "[16, 16]"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.01", "0.1", "1"]
    texts = _cell_texts(ax)
    for k, rec in table.iterrows():
        cell = (k // 3, k % 3)
        if failed[k]:
            assert texts[cell] == "FAILED"
        else:
            assert float(texts[cell]) == pytest.approx(rec["acc"], abs=5e-4)
    # the best cell (highest accuracy) is outlined; with lower-is-better the lowest
    np.testing.assert_allclose(_image(ax).get_array()[2, 2], table["acc"].max())
    outlines = [p for p in ax.patches if p.get_linewidth() >= 3]
    assert [p.get_xy() for p in outlines] == [(1.5, 1.5)]
    fig = plots.plot_sweep_heatmap(table, "hidden", "lr", "acc", failed_mask=failed,
                                   higher_is_better=False)
    outlines = [p for p in fig.axes[0].patches if p.get_linewidth() >= 3]
    assert [p.get_xy() for p in outlines] == [(-0.5, -0.5)]


def test_heatmap_duplicates_need_agg():
    table = pd.DataFrame({"a": [1, 1, 2], "b": [1, 1, 1], "v": [0.2, 0.4, 0.9]})
    with pytest.raises(ValueError, match="agg"):
        plots.plot_sweep_heatmap(table, "a", "b", "v")
    fig = plots.plot_sweep_heatmap(table, "a", "b", "v", agg="mean")
    assert _cell_texts(fig.axes[0])[(0, 0)] == "0.300"
    with pytest.raises(ValueError, match="not a column"):
        plots.plot_sweep_heatmap(table, "a", "nope", "v")


def test_sweep_facets_one_heatmap_per_value_shared_scale():
    table, failed = _sweep_table()
    both = pd.concat([table, table.assign(act="relu", acc=table["acc"] - 0.2)],
                     ignore_index=True)
    fig = plots.plot_sweep_facets(both, "hidden", "lr", "act", "acc",
                                  failed_mask=np.concatenate([failed, failed]))
    heat = [ax for ax in fig.axes if ax.get_images() and ax.get_title().startswith("act")]
    assert [ax.get_title() for ax in heat] == ["act = tanh", "act = relu"]
    assert _image(heat[0]).norm.vmin == _image(heat[1]).norm.vmin  # one scale for both
    assert "FAILED" in _cell_texts(heat[1]).values()


def test_sweep_lines_one_line_per_hue_and_log_x():
    table, failed = _sweep_table()
    fig = plots.plot_sweep_lines(table, "lr", "acc", hue="hidden", failed_mask=failed)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    named = [ln.get_label() for ln in ax.lines if ln.get_label().startswith("hidden")]
    assert named == ["hidden = [4]", "hidden = [8]", "hidden = [16, 16]"]
    failed_marks = [ln for ln in ax.lines if ln.get_label() == "failed"]
    assert len(failed_marks) == 1 and list(failed_marks[0].get_xdata()) == [1.0]


def test_sweep_lines_seed_band():
    table = pd.DataFrame({"lr": [0.1, 0.1, 0.2, 0.2], "acc": [0.8, 0.9, 0.7, 0.7]})
    ax = plots.plot_sweep_lines(table, "lr", "acc").axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.85, 0.7])
    assert len(ax.collections) == 1  # +/- std band


def test_sweep_lines_band_of_replicated_jobs_is_their_replicas_spread():
    table = pd.DataFrame({"lr": [0.1, 0.2, 0.2], "acc": [0.8, 0.7, 0.9],
                          "acc/std": [0.05, 0.01, 0.01]})
    ax = plots.plot_sweep_lines(table, "lr", "acc", spread="acc/std").axes[0]
    assert ax.collections[0].get_label() == "± 1 sd across seeds"
    band = ax.collections[0].get_paths()[0].vertices
    # lr 0.1: one job, its replicas' spread; lr 0.2: two jobs, their own spread.
    at = {x: sorted(band[np.isclose(band[:, 0], x), 1]) for x in (0.1, 0.2)}
    np.testing.assert_allclose([at[0.1][0], at[0.1][-1]], [0.75, 0.85])
    sd = np.std([0.7, 0.9], ddof=1)
    np.testing.assert_allclose([at[0.2][0], at[0.2][-1]], [0.8 - sd, 0.8 + sd])
    # Without the spread column a lone job has no band.
    ax = plots.plot_sweep_lines(table.iloc[:1], "lr", "acc").axes[0]
    assert not ax.collections


def test_small_multiples_one_axes_per_job_with_failed_marked(data2):
    X_tr, y_tr, _, _ = data2
    rows, cols = [[4], [8]], [0.01, 0.1, 1.0]
    grid = plots.boundary_grid(X_tr, resolution=30)
    panels = [
        ([4], 0.01, logistic_proba, "acc 0.91"),
        ([4], 0.1, logistic_proba(grid[2]), "acc 0.92"),  # precomputed
        plots.SweepPanel([4], 1.0, None, "loss became inf", failed=True),
        ([8], 0.01, lambda X: logistic_proba(X, 0.5), "acc 0.80", False),
        ([8], 0.1, logistic_proba, "acc 0.95", False),
        # ([8], 1.0) has no job: drawn blank
    ]
    fig = plots.plot_small_multiples(panels, rows, cols, "hidden", "lr", X_tr, y_tr,
                                     resolution=30)
    panel_axes = fig.axes[:6]
    assert len(fig.axes) == 7  # 2 x 3 panels + shared colour bar
    texts = [[t.get_text() for t in ax.texts] for ax in panel_axes]
    assert "FAILED" in texts[2] and "loss became inf" in texts[2]
    assert not panel_axes[2].get_images()
    assert texts[5] == ["no run"]
    for k in (0, 1, 3, 4):
        assert len(panel_axes[k].get_images()) == 1
    np.testing.assert_allclose(panel_axes[0].get_images()[0].get_array(),
                               panel_axes[1].get_images()[0].get_array())
    assert panel_axes[0].get_title() == "lr = 0.01"
    assert panel_axes[3].get_ylabel() == "hidden = [8]"


def test_small_multiples_rejects_unknown_and_duplicate_cells(data2):
    X_tr, y_tr, _, _ = data2
    with pytest.raises(ValueError, match="not in row_values"):
        plots.plot_small_multiples([(3, 1, logistic_proba)], [1], [1], "a", "b", X_tr, y_tr)
    with pytest.raises(ValueError, match="two panels"):
        plots.plot_small_multiples([(1, 1, logistic_proba), (1, 1, logistic_proba)],
                                   [1], [1], "a", "b", X_tr, y_tr)


# ------------------------------------------------------------------------ replicas


def _rotated(theta):
    def proba(X):
        z = 3.0 * (np.cos(theta) * X[:, 0] + np.sin(theta) * X[:, 1])
        p = 1.0 / (1.0 + np.exp(-z))
        return np.column_stack([1.0 - p, p])
    return proba


def test_replica_boundary_mean_and_disagreement(data2):
    X_tr, y_tr, X_te, y_te = data2
    grid = plots.boundary_grid(np.vstack([X_tr, X_te]), resolution=40)
    reps = [_rotated(t) for t in np.pi / 4 + np.linspace(-0.5, 0.5, 5)]
    fig = plots.plot_replica_boundary(reps, X_tr, y_tr, X_te, y_te, grid=grid)
    assert len(fig.axes) == 4  # mean, disagreement, then their two colour bars
    mean_ax, dis_ax = fig.axes[0], fig.axes[1]
    P = np.stack([r(grid[2])[:, 1] for r in reps])
    np.testing.assert_allclose(_image(mean_ax).get_array(), P.mean(0).reshape(40, 40))
    np.testing.assert_allclose(_image(dis_ax).get_array(), P.std(0).reshape(40, 40))
    replica_lines = [c for c in mean_ax.collections
                     if c.get_label() == "replica boundaries"]
    assert len(replica_lines) == 1 and len(replica_lines[0].get_segments()) >= 5
    # the same replicas as one stacked array give the same picture
    stacked = np.stack([r(grid[2]) for r in reps])
    fig2 = plots.plot_replica_boundary(stacked, X_tr, y_tr, grid=grid)
    np.testing.assert_allclose(_image(fig2.axes[1]).get_array(), P.std(0).reshape(40, 40))


def test_replicas_that_agree_have_zero_disagreement(data3):
    X_tr, y_tr, _, _ = data3
    fig = plots.plot_replica_boundary([softmax3_proba] * 3, X_tr, y_tr, resolution=20)
    assert np.allclose(_image(fig.axes[1]).get_array(), 0.0)
    with pytest.raises(ValueError, match="at least 2 replicas"):
        plots.plot_replica_boundary([softmax3_proba], X_tr, y_tr, resolution=20)


# ---------------------------------------------------------------------------- saving


def test_save_figure_writes_png(tmp_path, data2):
    X_tr, y_tr, _, _ = data2
    fig = plots.plot_decision_boundary(logistic_proba, X_tr, y_tr, resolution=20)
    path = plots.save_figure(fig, tmp_path / "a" / "b.png", dpi=50)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(5.6 * 50), round(5.0 * 50))


def test_save_figure_png_is_savefig_as_rgb_unless_transparent(tmp_path, data2):
    X_tr, y_tr, _, _ = data2
    fig = plots.plot_training_curves({"train/loss": [1.0, 0.5, 0.2]}, title="t")
    fig.savefig(tmp_path / "ref.png", dpi=60)
    with Image.open(plots.save_figure(fig, tmp_path / "fast.png", dpi=60)) as fast, \
            Image.open(tmp_path / "ref.png") as ref:
        assert fast.mode == "RGB" and ref.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(ref)[..., :3])
    assert fig.dpi == 100  # restored
    fig.patch.set_alpha(0.0)
    with Image.open(plots.save_figure(fig, tmp_path / "clear.png")) as clear:
        assert clear.mode == "RGBA" and np.asarray(clear)[0, 0, 3] == 0


def test_save_image_writes_png_and_other_formats(tmp_path, data2):
    X_tr, y_tr, _, _ = data2
    picture = plots.BoundaryRenderer(X_tr, y_tr, resolution=20, dpi=40).render(logistic_proba)
    for name, fmt in (("a/b.png", "PNG"), ("c.gif", "GIF")):
        with Image.open(plots.save_image(picture, tmp_path / name)) as im:
            assert im.format == fmt and im.size == picture.size


def test_save_figure_closes_pyplot_figures(tmp_path):
    fig = plt.figure()
    assert plt.get_fignums()
    plots.save_figure(fig, tmp_path / "p.png")
    assert plt.get_fignums() == []


def test_figures_can_be_made_in_parallel_threads(tmp_path, data2):
    """The object API keeps no global state: sweep workers may plot concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    X_tr, y_tr, X_te, y_te = data2

    def job(i):
        fig = plots.plot_decision_boundary(lambda X: logistic_proba(X, 0.5 + i), X_tr, y_tr,
                                           X_te, y_te, resolution=40, title=f"job {i}")
        return plots.save_figure(fig, tmp_path / f"job{i}.png", dpi=40)

    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(job, range(4)))
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG"
