"""The napari plugin as napari sees it: npe2 manifest via the entry point, menus, sample data.

The manifest tests need only npe2; the viewer tests (``gui``) need napari, Qt, pytest-qt and a
display (``xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest -q`` headless).
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

PLUGIN = "napari-ngr"
WIDGET = "Restore (NGR)"
SAMPLES = {"rgb_photo", "zstack", "timelapse", "hyperspectral"}
ROOT = Path(__file__).resolve().parents[1]


def _gui_missing():
    """Why the viewer tests cannot run here (None when they can). Checked before any fixture
    creates a QApplication: Qt aborts the process when there is no display."""
    import importlib

    for mod in ("napari", "qtpy.QtWidgets", "pytestqt"):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - ImportError, or qtpy's missing-binding error
            return f"{mod} is not usable: {exc}"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display: run under xvfb-run"
    if os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
        return "napari cannot draw layers on the offscreen Qt platform; use Xvfb"
    return None


_NO_GUI = _gui_missing()
gui = pytest.mark.skipif(_NO_GUI is not None, reason=_NO_GUI or "")


@pytest.fixture
def manifest():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager.instance()
    pm.discover()  # through the installed distribution's ``napari.manifest`` entry point
    return pm.get_manifest(PLUGIN)


# --------------------------------------------------------------------------- manifest (npe2 only)
def test_npe2_finds_the_manifest_through_the_entry_point(manifest):
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == PLUGIN]
    assert len(eps) == 1 and eps[0].value == "napari_ngr:napari.yaml"
    assert manifest.name == PLUGIN
    assert [w.display_name for w in manifest.contributions.widgets] == [WIDGET]
    assert {s.key for s in manifest.contributions.sample_data} == SAMPLES
    widget_cmd = manifest.contributions.widgets[0].command
    assert [m.command for m in manifest.contributions.menus["napari/layers/filter"]] == [widget_cmd]


def test_packaged_manifest_is_the_top_level_file():
    """``src/napari_ngr/napari.yaml`` is a link to the top-level ``napari.yaml`` (one source of
    truth); the installed package must resolve it to the same text."""
    from importlib.resources import files

    top = ROOT / "napari.yaml"
    if not top.exists():
        pytest.skip("not a source checkout")
    packaged = files("napari_ngr").joinpath("napari.yaml").read_text()
    assert packaged == top.read_text()


def test_manifest_commands_import(manifest):
    """Every ``python_name`` resolves (what ``npe2 validate --imports`` checks), Qt aside."""
    import importlib

    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        if "._qt" in module:
            pytest.importorskip("qtpy.QtWidgets", reason="no Qt binding")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.python_name


def test_no_qt_binding_in_runtime_dependencies():
    from importlib.metadata import requires

    runtime = [r for r in (requires(PLUGIN) or []) if "extra ==" not in r]
    assert runtime, "distribution metadata missing"
    assert not [r for r in runtime if any(q in r.lower() for q in ("pyqt", "pyside", "napari[", "qtpy"))]


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_sample_generators_small_and_offline(key):
    from napari_ngr import _sample_data as sd

    fn = getattr(sd, f"{key}_sample")
    layers = fn(48)
    assert layers and all(len(t) == 3 for t in layers)
    image = layers[0]
    assert image[2] == "image" and image[1]["name"]
    assert image[0].shape[-2:] == (48, 48) or image[0].shape[:2] == (48, 48)
    assert np.isfinite(np.asarray(image[0], np.float64)).all()
    for data, kw, kind in layers[1:]:
        assert kind == "labels" and data.dtype == np.uint8 and data.any()


# --------------------------------------------------------------------------- in napari
@pytest.mark.gui
@gui
def test_samples_open_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    for key in sorted(SAMPLES):
        viewer.open_sample(PLUGIN, key)
    names = {layer.name: layer for layer in viewer.layers}
    photo = names["photo (scratched)"]
    assert photo.rgb and photo.data.shape[-1] == 3
    assert type(names["defects"]).__name__ == "Labels"
    assert names["defects"].data.shape == photo.data.shape[:2]
    stack = names["nuclei (noisy)"]
    assert stack.data.ndim == 3 and stack.data.dtype == np.uint16
    np.testing.assert_allclose(stack.scale, (0.5, 0.2, 0.2))
    assert stack.axis_labels == ("z", "y", "x")
    movie = names["time-lapse"]
    assert names["missing lines"].data.shape == movie.data.shape
    cube = names["hyperspectral (noisy)"]
    assert cube.data.ndim == 3 and cube.axis_labels[0] == "band" and not cube.rgb


@pytest.mark.gui
@gui
def test_widget_docks_from_the_plugin_menu(make_napari_viewer):
    from napari_ngr._qt import RestoreWidget

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "hyperspectral")
    dw, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert isinstance(widget, RestoreWidget)
    assert widget.image_combo.value() is viewer.layers[0]
    assert widget.axes == "CYX"
    # the widget is offered under Layers > Filter (app-model menu of napari >= 0.5)
    try:
        from napari._app_model import get_app_model
    except ImportError:  # pragma: no cover - older napari
        return
    app = get_app_model()
    items = [getattr(getattr(i, "command", None), "id", "") for i in app.menus.get_menu("napari/layers/filter")]
    assert any(i.startswith(PLUGIN) for i in items), items
