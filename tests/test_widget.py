"""The Restore dock widget in a real napari viewer (pytest-qt + ``make_napari_viewer``).

Run under a display; headless: ``xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest -q``.
Never on the offscreen Qt platform (napari cannot draw layers there). Skipped cleanly when
napari, a Qt binding, pytest-qt or a display is missing. Small data (48 px), few iterations.
"""

import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui

napari = pytest.importorskip("napari")
pytest.importorskip("qtpy.QtWidgets", reason="no Qt binding")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")
if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    pytest.skip("no display: run under xvfb-run", allow_module_level=True)
if os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
    pytest.skip("napari cannot draw layers on the offscreen Qt platform; use Xvfb", allow_module_level=True)

from qtpy.QtCore import Qt  # noqa: E402

from napari_ngr import _sample_data as sd  # noqa: E402
from napari_ngr._layer_utils import OOM_MESSAGE  # noqa: E402
from napari_ngr._qt import widget as widget_mod  # noqa: E402
from napari_ngr._qt.widget import RestoreWidget  # noqa: E402

SIZE = 48


def psnr(ref, x):
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    rng = ref.max() - ref.min()
    return 10 * np.log10(rng**2 / np.mean((ref - x) ** 2))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: the GUI thread and Mesa's renderer share the (small) CPU; torch's
    spinning OpenMP workers slow a contended 2-core machine down by an order of magnitude."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Keep the widget's persistent settings out of the user's ~/.config."""
    path = tmp_path / "napari-ngr.ini"
    monkeypatch.setenv("NAPARI_NGR_SETTINGS", str(path))
    return path


@pytest.fixture
def errors(monkeypatch):
    """Error notifications the widget shows (still forwarded to napari)."""
    seen = []
    real = widget_mod.show_error

    def spy(message):
        seen.append(message)
        real(message)

    monkeypatch.setattr(widget_mod, "show_error", spy)
    return seen


def dock(viewer, **settings) -> RestoreWidget:
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w, name="Restore (NGR)", area="right")
    w.device_combo.setCurrentIndex(w.device_combo.findData("cpu"))  # same on GPU machines
    w.iterations_spin.setValue(settings.get("iterations", 20))
    w.preview_spin.setValue(settings.get("preview", 0))
    if "task" in settings:
        w.task_combo.setCurrentText(settings["task"])
        w.iterations_spin.setValue(settings.get("iterations", 20))
    return w


def click_run(qtbot, w, timeout=30_000):
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.is_running, timeout=timeout)


def add_sample(viewer, layer_data, **override):
    out = []
    for data, kw, kind in layer_data:
        kw = dict(kw, **override.get(kind, {}))
        out.append(getattr(viewer, f"add_{kind}")(data, **kw))
    return out


# --------------------------------------------------------------------------- main flow
def test_run_timelapse_inpainting_end_to_end(make_napari_viewer, qtbot, errors):
    from napari.utils import progress

    viewer = make_napari_viewer()
    d = sd.make_timelapse(SIZE)
    geometry = dict(scale=(2.0, 0.5, 0.5), translate=(0.0, 10.0, -4.0))
    image, mask = add_sample(viewer, sd.timelapse_sample(SIZE), image=dict(geometry, metadata={"lab": "x"}),
                             labels=geometry)
    before = image.data.copy()
    w = dock(viewer, iterations=30, preview=10)

    # prefilled from the layers: image (no image is active: the topmost), mask, task, axis roles
    assert w.image_combo.value() is image
    assert w.mask_combo.value() is mask
    assert w.task == "inpaint" and w.axes == "TYX"
    assert w.device == "cpu" and w.device_combo.currentText().startswith("cpu (")  # device shown
    assert "cpu" in w.status_label.text()

    previews = []
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    assert w.is_running and w.run_button.text() == "Cancel"
    assert w.worker is not None
    w.worker.yielded.connect(lambda m: previews.append(getattr(m, "preview", None) is not None))
    qtbot.waitUntil(lambda: not w.is_running, timeout=30_000)
    assert errors == []
    assert w.run_button.text() == "Run" and w.image_combo.isEnabled()

    name = image.name
    names = [layer.name for layer in viewer.layers]
    assert f"{name} restored" in names and f"{name} preview" not in names
    restored = viewer.layers[f"{name} restored"]
    assert restored.data.shape == image.data.shape
    np.testing.assert_allclose(restored.scale, image.scale)
    np.testing.assert_allclose(restored.translate, image.translate)
    assert restored.axis_labels == image.axis_labels
    assert restored.metadata["lab"] == "x" and restored.metadata["napari_ngr"]["role"] == "restored"
    assert restored.metadata["napari_ngr"]["start"] == w.last_result.start in ("biharmonic", "dct", "nonlocal", "stack")
    assert restored.metadata["napari_ngr"]["precision"] == w.last_result.precision in ("float32", "bfloat16")
    for axis in "tyx":
        g = viewer.layers[f"{name} \u2207{axis}"]
        assert g.data.shape == image.data.shape and not g.visible and not g.rgb
        np.testing.assert_allclose(g.scale, image.scale)
        lo, hi = g.contrast_limits
        assert lo == pytest.approx(-hi) and hi > 0
        assert g.colormap.name == widget_mod.GRADIENT_COLORMAP
    # better than the damaged input
    gain = psnr(d["clean"], restored.data) - psnr(d["clean"], image.data)
    assert gain > 5, gain
    # the input layer is untouched
    np.testing.assert_array_equal(image.data, before)
    # a preview came every 10 iterations; the progress bar is closed
    assert sum(previews) >= 2
    assert not [p for p in progress._all_instances if not getattr(p, "disable", False) and p.n < p.total]

    # running again replaces the previous results instead of piling up duplicates
    n_layers = len(viewer.layers)
    click_run(qtbot, w)
    assert len(viewer.layers) == n_layers
    assert sorted(layer.name for layer in viewer.layers) == sorted(names)
    np.testing.assert_array_equal(image.data, before)


@pytest.mark.parametrize("how", ["button", "quit"])
def test_cancel_keeps_best_so_far(make_napari_viewer, qtbot, errors, how):
    viewer = make_napari_viewer()
    image, _mask = add_sample(viewer, sd.timelapse_sample(SIZE))
    before = image.data.copy()
    w = dock(viewer, iterations=5000, preview=5)
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    worker = w.worker
    qtbot.waitUntil(lambda: w._pbar is not None and w._pbar.n >= 8, timeout=30_000)
    if how == "button":
        qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)  # "Cancel"
    else:
        worker.quit()  # what napari's task manager does
    qtbot.waitUntil(lambda: not w.is_running, timeout=30_000)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    assert errors == []
    assert w.run_button.text() == "Run" and w.run_button.isEnabled()
    names = [layer.name for layer in viewer.layers]
    assert f"{image.name} restored (cancelled)" in names
    assert f"{image.name} restored" not in names and f"{image.name} preview" not in names
    assert w.last_result.iteration < 5000
    part = viewer.layers[f"{image.name} restored (cancelled)"]
    assert part.data.shape == image.data.shape and np.isfinite(part.data).all()
    np.testing.assert_array_equal(image.data, before)
    # and it is ready to run again
    w.iterations_spin.setValue(10)
    click_run(qtbot, w)
    assert f"{image.name} restored" in [layer.name for layer in viewer.layers]
    assert f"{image.name} restored (cancelled)" not in [layer.name for layer in viewer.layers]


def _start_long_run(qtbot, viewer, preview=5):
    """A long time-lapse inpainting (32 px), started and a few iterations in: (widget, worker)."""
    add_sample(viewer, sd.timelapse_sample(32))
    w = dock(viewer, iterations=3000, preview=preview)
    w.early_stop_check.setChecked(False)
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w._pbar is not None and w._pbar.n >= preview + 1, timeout=30_000)
    return w, w.worker


def test_closing_the_viewer_during_a_run_is_quiet(make_napari_viewer, qtbot, errors):
    """The widget is deleted with its viewer: the run stops, no notification, no layer added, and
    no error from the progress messages still queued for its (deleted) Qt widgets."""
    from napari.utils import progress

    viewer = make_napari_viewer()
    w, worker = _start_long_run(qtbot, viewer)
    added = []
    viewer.layers.events.inserted.connect(lambda event: added.append(event.value.name))
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    qtbot.wait(300)  # the worker's last (queued) signals
    assert errors == []
    assert not w.is_running and w.last_result is None
    assert added == []
    assert not [p for p in progress._all_instances if not getattr(p, "disable", False) and p.n < p.total]


def test_closing_the_panel_cancels_its_run(make_napari_viewer, qtbot, errors):
    """napari's panel close button (remove_dock_widget: the widget is only unparented, closeEvent
    is not called) abandons the run: it stops at the next iteration and adds no layers."""
    viewer = make_napari_viewer()
    w, worker = _start_long_run(qtbot, viewer)
    name = w.image_combo.value().name
    assert f"{name} preview" in [layer.name for layer in viewer.layers]
    viewer.window.remove_dock_widget(w)
    assert w._state is None or w._state.cancel.is_set()
    assert f"{name} preview" not in [layer.name for layer in viewer.layers]
    qtbot.waitUntil(lambda: not w.is_running, timeout=30_000)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    assert errors == [] and w.last_result is None
    assert [layer.name for layer in viewer.layers] == [name, "missing lines"]
    assert w.run_button.text() == "Run" and "panel was closed" in w.status_label.text()
    w.deleteLater()  # no longer owned by the viewer's window


def test_rerun_replaces_its_own_results_despite_a_name_clash(make_napari_viewer, qtbot, errors):
    """A layer of the user's named "img restored" (e.g. a saved result opened again) is never
    removed, and each run replaces the layers the widget added before, whatever napari named them."""
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.random((32, 32)).astype(np.float32), name="img")
    mine = viewer.add_image(np.zeros((32, 32), np.float32), name="img restored")
    viewer.layers.selection.active = image
    w = dock(viewer, task="denoise", iterations=3)
    click_run(qtbot, w)
    first = [layer.name for layer in viewer.layers]
    assert "img restored [1]" in first and w.status_label.text().endswith("→ 'img restored [1]'")
    click_run(qtbot, w)
    assert errors == []
    assert [layer.name for layer in viewer.layers] == first
    assert viewer.layers["img restored"] is mine and w.status_label.text().endswith("→ 'img restored [1]'")
    viewer.layers["img restored [1]"].name = "keep me"  # a renamed result is kept
    click_run(qtbot, w)
    assert {"keep me", "img restored", "img restored [1]"} <= {layer.name for layer in viewer.layers}
    assert viewer.layers["img restored"] is mine


# --------------------------------------------------------------------------- layouts
def test_multichannel_cyx_layer_denoising(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    d = sd.make_hyperspectral(SIZE, bands=8)
    (cube,) = add_sample(viewer, [(d["noisy"], dict(sd.hyperspectral_sample(SIZE)[0][1], scale=(1, 0.3, 0.3)),
                                   "image")])
    before = cube.data.copy()
    w = dock(viewer, task="denoise", iterations=30)
    assert w.image_combo.value() is cube
    assert w.axes == "CYX"  # from the axis labels ("band", "y", "x")
    assert not w.mask_combo.isEnabled()
    click_run(qtbot, w)
    assert errors == []
    restored = viewer.layers[f"{cube.name} restored"]
    assert restored.data.shape == cube.data.shape
    np.testing.assert_allclose(restored.scale, cube.scale)
    for axis in "cyx":
        assert viewer.layers[f"{cube.name} \u2207{axis}"].data.shape == cube.data.shape
    assert psnr(d["clean"], restored.data) > psnr(d["clean"], cube.data) + 1.0
    np.testing.assert_array_equal(cube.data, before)


def test_zstack_denoising_keeps_geometry_and_units(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    d = sd.make_zstack(SIZE)
    (stack,) = add_sample(viewer, sd.zstack_sample(SIZE), image=dict(translate=(1.0, 2.0, 3.0)))
    w = dock(viewer, task="denoise", iterations=30)
    assert w.axes == "ZYX"
    click_run(qtbot, w)
    assert errors == []
    restored = viewer.layers[f"{stack.name} restored"]
    assert restored.data.dtype == np.float32 and restored.data.shape == stack.data.shape
    np.testing.assert_allclose(restored.scale, (0.5, 0.2, 0.2))
    np.testing.assert_allclose(restored.translate, (1.0, 2.0, 3.0))
    assert tuple(str(u) for u in restored.units) == tuple(str(u) for u in stack.units)
    assert {f"{stack.name} \u2207{a}" for a in "zyx"} <= {layer.name for layer in viewer.layers}
    assert psnr(d["clean"], restored.data) > psnr(d["clean"], stack.data) + 1.0


def test_denoising_early_stopping_checkbox(make_napari_viewer, qtbot, errors):
    """Denoising of a single image stops when its held-out error stops improving with Early
    stopping on; off, the whole budget runs."""
    from scipy import ndimage
    from skimage import data
    from skimage.transform import resize

    clean = ndimage.gaussian_filter(resize(data.camera() / 255.0, (48, 48), anti_aliasing=True), 2)
    noisy = (clean + 0.1 * np.random.default_rng(0).standard_normal(clean.shape)).astype(np.float32)
    viewer = make_napari_viewer()
    image = viewer.add_image(noisy, name="noisy")
    w = dock(viewer, task="denoise", iterations=300)
    assert w.early_stop_check.isEnabled() and w.early_stop_check.text() == "held-out pixels / noise level"
    w.early_stop_check.setChecked(True)
    click_run(qtbot, w)
    assert errors == []
    res = w.last_result
    assert res.iteration < 300 and res.stop_reason == "held-out error stopped improving"
    assert res.iteration == res.best_iteration + 100
    assert psnr(clean, viewer.layers[f"{image.name} restored"].data) > psnr(clean, noisy) + 8
    w.early_stop_check.setChecked(False)
    click_run(qtbot, w)
    assert errors == []
    assert w.last_result.iteration == 300 and w.last_result.stop_reason == "iteration budget reached"
    w.task_combo.setCurrentText("inpaint")
    assert w.early_stop_check.text() == "held-out pixels"


def test_denoising_reports_the_nlmeans_fallback(make_napari_viewer, qtbot, errors, moving_board):
    """Where NL-means of the input predicts the held-out pixels better, the widget returns it and
    says so (status line, layer metadata); Early stopping off keeps the network's estimate."""
    board, noisy = moving_board
    viewer = make_napari_viewer()
    image = viewer.add_image(noisy, name="board")
    w = dock(viewer, task="denoise", iterations=5)
    w.early_stop_check.setChecked(True)
    click_run(qtbot, w)
    assert errors == []
    assert w.last_result.method == "NL-means" and "NL-means" in w.status_label.text()
    out = viewer.layers[f"{image.name} restored"]
    assert out.metadata["napari_ngr"]["method"] == "NL-means"
    assert out.metadata["napari_ngr"]["nlmeans_weight"] == 1.0
    assert psnr(board, out.data) > psnr(board, noisy) + 6
    w.early_stop_check.setChecked(False)
    click_run(qtbot, w)
    assert errors == []
    assert w.last_result.method == "NGR" and "NL-means" not in w.status_label.text()
    assert "returned iteration 5" in w.status_label.text()


def test_poisson_noise_choice(make_napari_viewer, qtbot, errors, isolated_settings):
    """The Noise choice (denoising only) reaches the library: shot noise in photon counts is
    fitted, stabilized and removed; the fitted model is in the status line and the metadata."""
    from skimage import data
    from skimage.transform import resize

    clean = resize(data.camera()[40:360, 100:420] / 255.0, (48, 48), anti_aliasing=True)
    counts = (100 + 2 * np.random.default_rng(0).poisson(20 * clean)).astype(np.uint16)
    viewer = make_napari_viewer()
    image = viewer.add_image(counts, name="counts")
    w = dock(viewer, task="denoise", iterations=30)
    assert w.noise_combo.isEnabled() and w.noise_combo.currentData() == "gaussian"
    w.noise_combo.setCurrentIndex(w.noise_combo.findData("poisson"))
    click_run(qtbot, w)
    assert errors == []
    res = w.last_result
    assert res.noise_variance is not None and res.noise_variance[0][0] == pytest.approx(2.0, rel=0.3)
    assert "noise variance" in w.status_label.text()
    out = viewer.layers[f"{image.name} restored"]
    meta = out.metadata["napari_ngr"]
    assert meta["noise"] == "poisson" and meta["sigma"] is None and len(meta["noise_variance"]) == 1
    truth = 100 + 40 * clean
    assert psnr(truth, out.data) > psnr(truth, counts) + 5
    np.testing.assert_array_equal(image.data, counts)  # the input layer is untouched
    w.task_combo.setCurrentText("inpaint")
    assert not w.noise_combo.isEnabled()
    w2 = RestoreWidget(viewer)  # the choice persists
    try:
        assert w2.noise_combo.currentData() == "poisson"
    finally:
        w2.deleteLater()


def test_channel_axis_metadata_prefills_axes(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((SIZE, SIZE, 5), np.float32), name="yxc", metadata={"channel_axis": -1})
    w = dock(viewer)
    assert w.axes == "YXC"
    viewer.add_image(np.zeros((3, SIZE, SIZE), np.float32), name="plain")  # becomes active
    assert w.image_combo.value().name == "plain" and w.axes == "ZYX"
    w.axes_combo.setCurrentText("CYX")
    assert w.axes_hint.text().startswith("C=3")


def test_rgb_layer_inpainting(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    d = sd.make_rgb_photo(SIZE)
    photo, defects = add_sample(viewer, sd.rgb_photo_sample(SIZE), image=dict(scale=(0.5, 0.5)))
    w = dock(viewer, iterations=20, preview=10)
    assert w.image_combo.value() is photo and w.mask_combo.value() is defects
    assert w.axes == "YXC"
    w.early_stop_check.setChecked(False)  # run the whole budget, return the last iterate
    click_run(qtbot, w)
    assert errors == []
    assert w.last_result.best_iteration == 20 and w.last_result.stop_reason == "iteration budget reached"
    restored = viewer.layers[f"{photo.name} restored"]
    assert restored.rgb and restored.data.shape == photo.data.shape
    np.testing.assert_allclose(restored.scale, photo.scale)
    for axis in "cyx":
        g = viewer.layers[f"{photo.name} \u2207{axis}"]
        assert not g.rgb and g.data.shape == (3, SIZE, SIZE)  # channels first, one slider
        np.testing.assert_allclose(g.scale, (1.0, 0.5, 0.5))
    assert psnr(d["clean"], restored.data) > psnr(d["clean"], photo.data) + 3


def test_rgb_gradient_layers_overlay_the_input(make_napari_viewer, qtbot, errors):
    """The (C, Y, X) gradient layers of an RGB input keep its rotation, shear and affine for
    Y and X: every pixel lands where the input's does."""
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    affine = np.array([[1.0, 0.0, 3.0], [0.2, 1.0, -1.0], [0.0, 0.0, 1.0]])
    photo = viewer.add_image((rng.random((32, 32, 3)) * 255).astype(np.uint8), name="photo", rgb=True,
                             scale=(0.5, 0.7), translate=(10, 20), rotate=20, shear=[0.3], affine=affine)
    w = dock(viewer, task="denoise", iterations=3)
    click_run(qtbot, w)
    assert errors == []
    pixels = [(0, 0), (5, 7), (31, 2), (20, 31)]
    for name in ["photo restored"] + [f"photo \u2207{a}" for a in "cyx"]:
        layer = viewer.layers[name]
        for p in pixels:
            if layer.rgb:
                world = layer.data_to_world(p)
            else:
                assert layer.data.shape == (3, 32, 32)
                full = layer.data_to_world((2,) + p)
                assert full[0] == pytest.approx(2)  # the channel axis is left as is
                world = full[1:]
            np.testing.assert_allclose(world, photo.data_to_world(p), atol=1e-9, err_msg=f"{name} {p}")


def _cloudy_series(rgb=False):
    """A (4, 32, 32) time series in [0, 1] (grey, or RGB (4, 32, 32, 3)) with per-date gain and offset,
    clouds (0.95) on dates 1 and 2, and its (T, Y, X) uint8 cloud mask."""
    from skimage import data
    from skimage.transform import resize

    base = resize(data.astronaut()[30:330, 100:400], (32, 32), anti_aliasing=True)
    if not rgb:
        base = base.mean(-1)
    rng = np.random.default_rng(0)
    clean = np.stack([np.clip(base * g + o, 0, 1) for g, o in zip(rng.uniform(0.85, 1.0, 4),
                                                                     rng.uniform(0.0, 0.08, 4))]).astype(np.float32)
    yy, xx = np.mgrid[:32, :32]
    cloud = ((yy - 12) / 7.0) ** 2 + ((xx - 14) / 8.0) ** 2 <= 1
    mask = np.zeros((4, 32, 32), np.uint8)
    mask[1] = cloud
    mask[2] = np.roll(cloud, (12, 10), axis=(0, 1))
    where = mask[..., None] if rgb else mask
    return clean, np.where(where != 0, np.float32(0.95), clean), mask


@pytest.mark.parametrize("rgb", [False, True], ids=["TYX", "RGB-TYXC"])
def test_decloud_time_series(make_napari_viewer, qtbot, errors, rgb):
    viewer = make_napari_viewer()
    clean, cloudy, mask = _cloudy_series(rgb)
    image = viewer.add_image(cloudy, name="series", rgb=rgb, axis_labels=("t", "y", "x"), scale=(1.0, 10.0, 10.0))
    clouds = viewer.add_labels(mask, name="clouds", scale=(1.0, 10.0, 10.0))
    w = dock(viewer, task="decloud", iterations=30)
    assert w.task == "decloud" and w.axes == ("TYXC" if rgb else "TYX")
    assert w.image_combo.value() is image and w.mask_combo.value() is clouds
    assert w.mask_combo.isEnabled() and w.early_stop_check.isEnabled()
    if rgb:
        w.early_stop_check.setChecked(False)  # as for inpaint: holdout=0, the last iterate is returned
    click_run(qtbot, w, timeout=60_000)
    assert errors == []
    if rgb:
        assert w.last_result.best_iteration == 30 and w.last_result.stop_reason == "iteration budget reached"
    restored = viewer.layers["series restored"]
    assert restored.data.shape == cloudy.shape and restored.rgb == rgb
    np.testing.assert_allclose(restored.scale, image.scale)
    assert restored.metadata["napari_ngr"]["task"] == "decloud"
    assert restored.metadata["napari_ngr"]["start"] == "temporal"
    m = np.broadcast_to((mask[..., None] if rgb else mask) != 0, cloudy.shape)
    np.testing.assert_array_equal(restored.data[~m], cloudy[~m])  # clear pixels: exactly the input
    err_in, err_out = np.abs(cloudy[m] - clean[m]).mean(), np.abs(restored.data[m] - clean[m]).mean()
    assert err_out < 0.25 * err_in, (err_out, err_in)  # clouded pixels: much closer to the truth
    for axis in "tyx" + ("c" if rgb else ""):
        g = viewer.layers[f"series \u2207{axis}"]
        assert g.data.shape == ((3,) + cloudy.shape[:-1] if rgb else cloudy.shape) and not g.visible
    np.testing.assert_array_equal(image.data, cloudy)  # the input layer is untouched


def test_decloud_without_time_axis_is_reported(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    _, cloudy, mask = _cloudy_series()
    viewer.add_image(cloudy, name="stack")  # no axis labels: prefilled as ZYX
    viewer.add_labels(mask, name="clouds")
    w = dock(viewer, task="decloud", iterations=30)
    assert w.axes == "ZYX"
    snap = _snapshot(viewer)
    click_run(qtbot, w)
    assert len(errors) == 1 and "time axis" in errors[0] and "to T" in errors[0]
    _assert_unchanged(viewer, snap)
    assert not w.is_running and w.run_button.text() == "Run" and w.image_combo.isEnabled()


# --------------------------------------------------------------------------- errors
def _snapshot(viewer):
    return [(layer.name, layer.data.copy()) for layer in viewer.layers]


def _assert_unchanged(viewer, snap):
    assert [layer.name for layer in viewer.layers] == [n for n, _ in snap]
    for layer, (_, data) in zip(viewer.layers, snap):
        assert layer.data.dtype == data.dtype
        np.testing.assert_array_equal(layer.data, data)


def test_mismatched_mask_is_reported(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    viewer.add_image(sd.make_rgb_photo(SIZE)["damaged"][..., 0], name="gray")
    bad = viewer.add_labels(np.ones((SIZE - 8, SIZE), np.uint8), name="wrong mask")
    w = dock(viewer)
    assert w.mask_combo.value() is None  # the default skips masks that do not fit
    w.mask_combo.set_value(bad)
    snap = _snapshot(viewer)
    click_run(qtbot, w)
    assert len(errors) == 1 and "does not match" in errors[0]
    _assert_unchanged(viewer, snap)
    assert w.run_button.text() == "Run" and not w.is_running


def test_missing_inputs_are_reported(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((SIZE, SIZE), np.uint8), name="only labels")
    w = dock(viewer)
    snap = _snapshot(viewer)
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    assert not w.is_running
    assert len(errors) == 1 and "image layer" in errors[0]
    # an image but no mask for inpainting
    viewer.add_image(np.ones((SIZE, SIZE), np.float32), name="img")
    w.task_combo.setCurrentText("inpaint")
    w.mask_combo.set_value(None)
    snap = _snapshot(viewer)
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    assert not w.is_running and len(errors) == 2 and "mask" in errors[1]
    _assert_unchanged(viewer, snap)


def test_nan_and_gpu_oom_are_reported(make_napari_viewer, qtbot, errors, monkeypatch):
    import torch

    import napari_ngr

    viewer = make_napari_viewer()
    data = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    data[3, 4] = np.nan
    viewer.add_image(data, name="nan image")
    w = dock(viewer, task="denoise")
    snap = _snapshot(viewer)
    click_run(qtbot, w)
    assert len(errors) == 1 and "NaN" in errors[0]
    _assert_unchanged(viewer, snap)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(napari_ngr, "prepare_denoise", oom)
    click_run(qtbot, w)
    assert errors[-1] == OOM_MESSAGE
    _assert_unchanged(viewer, snap)
    assert w.run_button.text() == "Run" and w.image_combo.isEnabled()


# --------------------------------------------------------------------------- settings, defaults
def test_settings_persist_between_sessions(make_napari_viewer, isolated_settings):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((SIZE, SIZE), np.float32), name="img")
    w = dock(viewer, task="denoise", iterations=123)
    w.strength_spin.setValue(2.5)
    w.seed_spin.setValue(7)
    w.preview_spin.setValue(40)
    w.early_stop_check.setChecked(False)
    w.task_combo.setCurrentText("inpaint")
    w.iterations_spin.setValue(321)
    assert isolated_settings.exists()
    w2 = RestoreWidget(viewer)  # a new session reads them back
    try:
        assert w2.task == "inpaint" and w2.iterations_spin.value() == 321
        assert w2.strength_spin.value() == pytest.approx(2.5)
        assert w2.seed_spin.value() == 7 and w2.preview_spin.value() == 40
        assert not w2.early_stop_check.isChecked()
        w2.task_combo.setCurrentText("denoise")
        assert w2.iterations_spin.value() == 123  # iterations are remembered per task
    finally:
        w2.deleteLater()


@pytest.mark.parametrize("stack", [False, True])
def test_auto_iterations_use_the_library_default_for_the_data(make_napari_viewer, qtbot, errors, stack):
    import napari_ngr

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    shape = (4, SIZE, SIZE) if stack else (SIZE, SIZE)
    viewer.add_image((0.5 + 0.1 * rng.standard_normal(shape)).astype(np.float32), name="noisy")
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w, name="Restore (NGR)", area="right")
    w.task_combo.setCurrentText("denoise")
    # a fresh widget shows "auto" (0) and passes iterations=None: the library picks the budget
    assert w.iterations_spin.value() == 0 and w.iterations_spin.text() == "auto"
    expected = napari_ngr.DEFAULTS["denoise"]["iterations" if stack else "planar_iterations"]
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w._pbar is not None and w._pbar.total is not None and w._pbar.n >= 1, timeout=30_000)
    assert w._pbar.total == expected
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)  # Cancel
    qtbot.waitUntil(lambda: not w.is_running, timeout=30_000)
    assert errors == []
    assert "noisy restored (cancelled)" in [layer.name for layer in viewer.layers]
    assert w.last_result.iteration < expected


def test_defaults_follow_active_image_and_topmost_fitting_mask(make_napari_viewer):
    viewer = make_napari_viewer()
    a = viewer.add_image(np.zeros((SIZE, SIZE), np.float32), name="a")
    b = viewer.add_image(np.zeros((4, SIZE, SIZE), np.float32), name="b")
    m_yx = viewer.add_labels(np.zeros((SIZE, SIZE), np.uint8), name="yx mask")
    viewer.add_labels(np.zeros((5, 5), np.uint8), name="tiny")  # topmost, but does not fit
    viewer.layers.selection.active = a
    w = dock(viewer)
    assert w.image_combo.value() is a and w.mask_combo.value() is m_yx
    viewer.layers.selection.active = b  # the widget follows the active image layer
    assert w.image_combo.value() is b and w.mask_combo.value() is m_yx
    m_bool = viewer.add_image(np.zeros((4, SIZE, SIZE), bool), name="bool mask")
    assert w.mask_combo.value() is m_yx  # a user's choice is kept when layers come and go
    assert m_bool in w.mask_combo.candidates()
    assert [w.mask_combo.itemText(i) for i in range(w.mask_combo.count())][-1] == "(none)"


def test_a_chosen_no_mask_is_kept_when_layers_change(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((SIZE, SIZE), np.float32), name="img")
    w = dock(viewer)
    assert w.mask_combo.value() is None
    m = viewer.add_labels(np.zeros((SIZE, SIZE), np.uint8), name="mask")
    assert w.mask_combo.value() is m  # a default "(none)" picks a fitting mask that comes in
    w.mask_combo.setCurrentIndex(w.mask_combo.count() - 1)  # the user chooses "(none)"
    viewer.add_points([[1, 1]], name="pts")
    viewer.layers.remove("pts")
    viewer.add_labels(np.zeros((SIZE, SIZE), np.uint8), name="another mask")
    assert w.mask_combo.value() is None and w.mask_combo.currentText() == "(none)"


def test_changing_axes_repicks_a_fitting_mask(make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((SIZE, SIZE, 5), np.float32), name="bands last")  # guessed ZYX
    m = viewer.add_labels(np.zeros((SIZE, SIZE), np.uint8), name="yx mask")
    viewer.layers.selection.active = image
    w = dock(viewer)
    assert w.axes == "ZYX" and w.mask_combo.value() is None  # (48, 48) is not (Y, X) = (48, 5)
    w.axes_combo.setCurrentText("YXC")
    assert w.mask_combo.value() is m
    w.axes_combo.setCurrentText("ZYX")  # no longer fits
    assert w.mask_combo.value() is None


def test_decloud_picks_a_mask_per_date(make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((4, SIZE, SIZE), np.float32), name="series", axis_labels=("t", "y", "x"))
    dated = viewer.add_labels(np.zeros((4, SIZE, SIZE), np.uint8), name="clouds")
    yx = viewer.add_labels(np.zeros((SIZE, SIZE), np.uint8), name="scratch")  # on top: picked for inpainting
    viewer.layers.selection.active = image
    w = dock(viewer)
    w.task_combo.setCurrentText("inpaint")
    assert w.mask_combo.value() is yx
    w.task_combo.setCurrentText("decloud")  # a (Y, X) mask is refused by decloud: the per-date one
    assert w.mask_combo.value() is dated


@pytest.mark.enable_console
def test_console_has_the_library(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(sd.make_rgb_photo(32)["damaged"][..., 1], name="x")
    m = np.zeros((32, 32), np.uint8)
    m[10:14, 5:25] = 1
    viewer.add_labels(m, name="mask")
    dock(viewer)
    console = viewer.window._qt_viewer.console
    ns = console.shell.user_ns
    qtbot.waitUntil(lambda: "napari_ngr" in ns, timeout=10_000)
    console.execute("out = napari_ngr.inpaint(viewer.layers['x'].data, viewer.layers['mask'].data, iterations=5)")
    qtbot.waitUntil(lambda: "out" in ns, timeout=20_000)
    assert ns["out"].shape == (32, 32)
