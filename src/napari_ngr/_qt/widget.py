"""The "Restore (NGR)" dock widget: inpainting, denoising and cloud removal of napari layers.

The widget is a thin shell around :func:`napari_ngr.prepare_inpaint`,
:func:`napari_ngr.prepare_denoise` and :func:`napari_ngr.prepare_decloud`: it drives the same :class:`~napari_ngr.RestorationJob` loop
as the library and the command line, in a :func:`napari.qt.threading.create_worker` generator
so the viewer stays responsive.

Result layers
-------------
A run on layer ``"name"`` adds

* ``"name restored"`` (``"name restored (cancelled)"`` when cancelled: the best estimate so far),
* one hidden gradient map per regularized axis, ``"name ∇y"``, ``"name ∇x"`` and ``"name ∇z"`` /
  ``"∇t"`` / ``"∇c"``, with a diverging colormap dark at 0 (blue < 0 < orange, "ngr diverging")
  and contrast limits symmetric around 0 (RGB inputs get ``(C, Y, X)`` gradient layers, not RGB ones),
* while running, ``"name preview"``, updated every *preview* iterations and removed at the end.

All of them copy the input's scale, translate, rotation/shear/affine, axis labels, units and
metadata (plus a ``"napari_ngr"`` metadata entry recording the settings); an RGB input's
gradient layers keep its rotation/shear/affine for Y and X (their leading ``c`` axis is left
as is), so every result layer overlays the input. The input layer is never modified.
**Running again on the same input replaces** the result layers of the earlier run (the layers
the widget added then, whatever napari named them, and layers this plugin made under the names
above): rename a result layer to keep it. Layers the plugin did not make are never removed.

Closing the panel (its title-bar button, ``viewer.window.remove_dock_widget``) or the viewer
during a run abandons the run: it stops at the next iteration and adds no layers.

Settings (task, iterations per task, strength, device, seed, preview interval, early stopping) persist between
napari sessions in ``QSettings("napari-ngr", "napari-ngr")`` (on Linux
``~/.config/napari-ngr/napari-ngr.conf``); the environment variable ``NAPARI_NGR_SETTINGS``
may name another (INI) file instead, e.g. for tests.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QSettings, Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QPushButton,
                            QSizePolicy, QSpinBox, QVBoxLayout, QWidget)

from .._layer_utils import axes_choices, error_message, guess_axes, mask_fits, output_names, symmetric_limits

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["RestoreWidget"]

log = logging.getLogger(__name__)

#: Name of the gradient layers' colormap: diverging, dark at 0 (blue < 0 < orange), so the maps
#: read well on napari's dark canvas and in additive blending (like matplotlib's "berlin").
GRADIENT_COLORMAP = "ngr diverging"
_GRADIENT_COLORS = [[0.60, 0.82, 1.00, 1.0], [0.10, 0.45, 0.80, 1.0], [0.04, 0.04, 0.04, 1.0],
                    [0.85, 0.32, 0.10, 1.0], [1.00, 0.80, 0.52, 1.0]]
_GRADIENT_CMAP = None


def gradient_colormap():
    """The diverging colormap of the gradient layers (a napari ``Colormap``, made once)."""
    global _GRADIENT_CMAP
    if _GRADIENT_CMAP is None:
        from napari.utils.colormaps import Colormap

        _GRADIENT_CMAP = Colormap(_GRADIENT_COLORS, name=GRADIENT_COLORMAP, display_name="NGR diverging")
    return _GRADIENT_CMAP
_NONE = "(none)"
_TASKS = ("inpaint", "denoise", "decloud")
#: Tasks that need a mask layer (nonzero = missing / clouded) and hold out pixels for early stopping.
_MASK_TASKS = ("inpaint", "decloud")


def show_error(message: str) -> None:
    """Show ``message`` as a napari error notification (a module function so tests can spy)."""
    from napari.utils.notifications import show_error as _show_error

    _show_error(message)


def _settings() -> QSettings:
    path = os.environ.get("NAPARI_NGR_SETTINGS")
    if path:
        return QSettings(path, QSettings.Format.IniFormat)
    return QSettings("napari-ngr", "napari-ngr")


def _setting(s: QSettings, key: str, default, kind):
    try:
        v = s.value(key, default)
        return kind(v) if v is not None else default
    except (TypeError, ValueError):
        return default


def _is_output(layer) -> bool:
    md = getattr(layer, "metadata", None) or {}
    info = md.get("napari_ngr") if isinstance(md, dict) else None
    return isinstance(info, dict) and "role" in info


def _is_image(layer) -> bool:
    """Image layers that can be restored (boolean images are masks, not images)."""
    from napari.layers import Image

    return isinstance(layer, Image) and np.dtype(layer.dtype) != bool


def _is_mask(layer) -> bool:
    from napari.layers import Image, Labels

    if isinstance(layer, Labels):
        return not getattr(layer, "multiscale", False)
    return isinstance(layer, Image) and np.dtype(layer.dtype) == bool and not layer.multiscale


# --------------------------------------------------------------------------- worker messages
@dataclass
class _Started:
    device: str
    total: int
    axis_names: list


@dataclass
class _Failure:
    message: str
    exc: BaseException | None = None


@dataclass
class _Done:
    result: Any
    device: str
    cancelled: bool


class _RunState:
    """What one run shares between the worker thread and the widget."""

    def __init__(self, source_name: str, task: str, params: dict, layer_kwargs: dict, rgb: bool):
        self.cancel = threading.Event()
        self.job = None
        self.source_name = source_name
        self.task = task
        self.params = params
        self.layer_kwargs = layer_kwargs
        self.rgb = rgb
        self.device = params.get("device") or "cpu"
        self.total = int(params.get("iterations") or 0)
        self.finished = False
        self.last_bar_update = 0.0
        self.discard = False  # the panel or the viewer was closed: add no layers, show nothing
        self.source_ref = None  # weak reference to the input layer


class _Lifetime:
    """Whether the widget's Qt object was deleted (e.g. with its viewer), and its running run.

    A plain Python object, told by the widget's ``destroyed`` signal: that signal must not call
    the widget itself, whose Qt part is gone by then.
    """

    def __init__(self):
        self.deleted = False
        self.state: _RunState | None = None

    def on_destroyed(self, *_):
        self.deleted = True
        st = self.state
        if st is not None:
            st.discard = True
            st.cancel.set()


def _fail(exc: BaseException) -> _Failure:
    """Log ``exc`` (unless it is a plain input error), drop its traceback (its frames may hold
    GPU tensors), release cached GPU memory and wrap a plain message for the user."""
    if not isinstance(exc, ValueError):
        log.error("napari-ngr: restoration failed", exc_info=exc)
    exc.__traceback__ = None
    _free_gpu()
    return _Failure(error_message(exc), exc)


def _restore_generator(task: str, image, mask, kwargs: dict, state: _RunState):
    """Runs in the worker thread: prepare the job, yield its progress records, return the result.

    Errors are caught here and returned as :class:`_Failure` (with a plain message), so the
    widget shows one notification and returns to idle. Cancel (``state.cancel``) is checked
    after every iteration; the best estimate so far is then returned.
    """
    import napari_ngr

    try:
        arr = np.asarray(image)  # dask / zarr -> numpy; the layer's data is never written
        if task == "inpaint":
            job = napari_ngr.prepare_inpaint(arr, mask, **kwargs)
        elif task == "decloud":
            kw = dict(kwargs)
            axes = kw.pop("axes")  # checked by RestoreWidget.run: it holds T
            job = napari_ngr.prepare_decloud(arr, mask, time_axis=axes.index("T"),
                                             channel_axis=axes.index("C") if "C" in axes else None, **kw)
        else:
            job = napari_ngr.prepare_denoise(arr, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the user
        return _fail(exc)
    state.job = job
    yield _Started(str(job.device), job.total, job.axis_names)
    cancelled = state.cancel.is_set()
    it = job.iterate()
    try:
        if not cancelled:
            for rec in it:
                yield rec
                if state.cancel.is_set():
                    cancelled = True
                    break
        it.close()  # early close = cancel: the job keeps the best estimate so far
        res = job.result()
    except Exception as exc:  # noqa: BLE001
        it.close()
        state.job = job = it = None
        return _fail(exc)
    return _Done(res, str(job.device), cancelled)


def _free_gpu():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001  pragma: no cover
        pass


# --------------------------------------------------------------------------- layer combo
class _LayerCombo(QComboBox):
    """A combo box of viewer layers passing ``accept``; keeps its choice by layer identity."""

    def __init__(self, accept, allow_none=False, parent=None):
        super().__init__(parent)
        self._accept = accept
        self._allow_none = allow_none
        self._refs: list = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)

    def value(self):
        i = self.currentIndex()
        if i < 0 or i >= len(self._refs):
            return None
        ref = self._refs[i]
        return ref() if ref is not None else None

    def set_value(self, layer) -> bool:
        for i, ref in enumerate(self._refs):
            if (ref() if ref is not None else None) is layer:
                self.setCurrentIndex(i)
                return True
        return False

    def candidates(self):
        return [r() for r in self._refs if r is not None and r() is not None]

    def refresh(self, layers) -> None:
        current = self.value()
        self.blockSignals(True)
        try:
            self.clear()
            self._refs = []
            for layer in reversed(list(layers)):  # topmost first, as in the layer list
                if self._accept(layer):
                    self._refs.append(weakref.ref(layer))
                    self.addItem(layer.name)
            if self._allow_none:
                self._refs.append(None)
                self.addItem(_NONE)
            if current is not None and self.set_value(current):
                pass
            elif self.count():
                self.setCurrentIndex(self.count() - 1 if self._allow_none else 0)
        finally:
            self.blockSignals(False)


# --------------------------------------------------------------------------- the widget
class RestoreWidget(QWidget):
    """Dock widget: restore (inpaint, denoise or decloud) an image layer with the Neural Gradient Regularizer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it when the widget is opened from the Plugins or
        Layers > Filter menu).

    Notes
    -----
    Inputs are prefilled: the image is the active image layer; the mask is the topmost Labels
    (or boolean image) layer whose shape fits the image (the image's shape, without its channel
    axis, or (Y, X)); the axis roles come from the layer (``rgb``: colour last; axis labels
    such as ``c``/``band``/``z``/``t``; ``metadata["axes"]`` or ``metadata["channel_axis"]``).

    *Strength* multiplies the default penalty weights λ of every regularized axis
    (``spatial_weight``, ``channel_weight`` and ``stack_weight`` of :func:`napari_ngr.inpaint`):
    1 is the library default, larger values give smoother results.

    *Early stopping* (inpainting) on is the library default (held-out pixels choose the returned
    iterate, which may be the biharmonic start); off passes ``holdout=0``: the whole budget runs
    and the last iterate is returned.

    *decloud* (:func:`napari_ngr.prepare_decloud`) restores the clouded pixels of a time series:
    one axis role must be T (the dates; ``time_axis``), C is the band axis (``channel_axis``;
    an RGB time series is ``TYXC``), and the mask (nonzero = clouded) is (T, Y, X) or the image's
    shape. Its mask and early stopping work as for inpainting.

    Running again on the same input replaces the result layers of the previous run (see the
    module docstring); rename a result layer to keep it. Closing the panel or the viewer during
    a run abandons it: it stops at the next iteration and adds no layers.
    """

    def __init__(self, napari_viewer: "napari.Viewer", parent=None):
        super().__init__(parent)
        import napari_ngr

        self.viewer = napari_viewer
        self.worker = None
        self._state: _RunState | None = None
        self._pbar = None
        self._preview_layer = None
        # the layers each run added: (weak reference to the input layer, [(weak reference to a result
        # layer, the name napari gave it)]); a re-run on the same input removes them (unless renamed)
        self._outputs: list = []
        self._mask_auto = True  # the mask is the default pick (not the user's choice): re-pick it freely
        self._picking_mask = False
        self._lifetime = _Lifetime()
        # a partial of a plain object, not a method of the widget: see _Lifetime
        self.destroyed.connect(functools.partial(_Lifetime.on_destroyed, self._lifetime))
        self._settings = _settings()
        self.last_result = None  # the RestorationResult of the last run (for scripting)

        # ---- widgets
        self.image_combo = _LayerCombo(_is_image)
        self.image_combo.setToolTip("The image layer to restore (the active image layer by default).")
        self.mask_combo = _LayerCombo(_is_mask, allow_none=True)
        self.mask_combo.setToolTip("Inpainting: a Labels (or boolean image) layer, nonzero = missing.\n"
                                   "Its shape: the image's, the image's without the channel axis, or (Y, X).\n"
                                   "Cloud removal: the cloud and shadow mask, nonzero = clouded; its shape:\n"
                                   "the image's without the channel axis (T, Y, X), or the image's.\n"
                                   "Ignored when denoising.")
        self.task_combo = QComboBox()
        self.task_combo.addItems(list(_TASKS))
        self.task_combo.setToolTip("inpaint: fill the masked pixels; denoise: remove Gaussian noise;\n"
                                   "decloud: restore the clouded pixels (mask) of a time series (an axis set to T)\n"
                                   "from its other dates.")
        self.axes_combo = QComboBox()
        self.axes_combo.setToolTip("Role of each axis of the image, in order: C channel (colour, band),\n"
                                   "Z depth or T time (the stack axis), Y and X. Gradients are regularized\n"
                                   "along every axis (channels separately from Z/T).")
        self.axes_hint = QLabel("")
        self.axes_hint.setStyleSheet("color: gray;")
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(0, 100_000)
        self.iterations_spin.setSingleStep(50)
        self.iterations_spin.setSpecialValueText("auto")  # 0: the library's default for the data
        self.iterations_spin.setToolTip("Iteration budget (the run may stop earlier when the held-out\n"
                                        "pixels stop improving). auto (0): the library's default for the\n"
                                        "task and the data, e.g. denoising 250 for a single image, 600\n"
                                        "for a stack (napari_ngr.DEFAULTS).")
        self.noise_combo = QComboBox()
        self.noise_combo.addItem("Gaussian", "gaussian")
        self.noise_combo.addItem("Poisson (shot noise)", "poisson")
        self.noise_combo.setToolTip("Denoising: the noise model.\n"
                                    "Gaussian: one level everywhere (estimated from the image).\n"
                                    "Poisson (shot noise): the noise grows with the signal, as in fluorescence and\n"
                                    "low-light images (photon counts plus read noise); its model, variance = gain x\n"
                                    "value + offset, is fitted to the image and stabilized before the restoration.")
        self.strength_spin = QDoubleSpinBox()
        self.strength_spin.setRange(0.01, 100.0)
        self.strength_spin.setDecimals(2)
        self.strength_spin.setSingleStep(0.1)
        self.strength_spin.setSuffix(" ×")
        self.strength_spin.setToolTip("Regularization strength: multiplies the default penalty weights λ of\n"
                                      "all axes (Y/X, channel, Z/T). 1 = library default; larger = smoother.")
        self.device_combo = QComboBox()
        for dev in napari_ngr.available_devices():
            self.device_combo.addItem(_device_label(dev), dev)
        self.device_combo.setToolTip("Where the restoration runs. CUDA/MPS appear when present.")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("Seeds the network, its input and the validation split: the same seed\n"
                                  "gives the same result on the same device.")
        self.preview_spin = QSpinBox()
        self.preview_spin.setRange(0, 100_000)
        self.preview_spin.setSpecialValueText("off")
        self.preview_spin.setSuffix(" it.")
        self.preview_spin.setToolTip("Update a preview layer every this many iterations (0 = off).")
        self.early_stop_check = QCheckBox("held-out pixels")
        self.early_stop_check.setToolTip(
            "On (library default). Inpainting and cloud removal: about 3 % of the observed pixels, in the mask's own\n"
            "pattern (line segments for dead lines, blobs for painted defects), are held out; the iterate\n"
            "that predicts them best is returned and the run stops when they stop improving (the\n"
            "biharmonic start is returned when no iterate beats it). Denoising: single images (up to 4\n"
            "channels) return the check (every 25 iterations) that predicts 5 % held-out noisy pixels best\n"
            "and stop when it stops improving; stacks stop once the residual (input - estimate) is down\n"
            "to the noise level (the discrepancy principle). Where NL-means of the input, or a mix of it and the\n"
            "network's estimate, predicts the held-out noisy pixels better (videos with motion), that is returned.\n"
            "Off: the whole budget runs and the last iterate (denoising: the moving average) is returned.")
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Start the restoration; while it runs, this button cancels it\n"
                                   "(the best result so far is kept).")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Image", self.image_combo)
        form.addRow("Mask", self.mask_combo)
        form.addRow("Task", self.task_combo)
        axes_row = QHBoxLayout()
        axes_row.addWidget(self.axes_combo)
        axes_row.addWidget(self.axes_hint, 1)
        form.addRow("Axes", axes_row)
        form.addRow("Iterations", self.iterations_spin)
        form.addRow("Noise", self.noise_combo)
        form.addRow("Strength", self.strength_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Preview every", self.preview_spin)
        form.addRow("Early stopping", self.early_stop_check)
        outer = QVBoxLayout(self)
        outer.addLayout(form)
        outer.addWidget(self.run_button)
        outer.addWidget(self.status_label)
        outer.addStretch(1)

        self._load_settings()

        # ---- signals
        self.run_button.clicked.connect(self._on_run_clicked)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.mask_combo.currentIndexChanged.connect(self._on_mask_chosen)
        self.axes_combo.currentIndexChanged.connect(self._on_axes_changed)
        self.task_combo.currentIndexChanged.connect(self._on_task_changed)
        self.iterations_spin.valueChanged.connect(self._save_settings)
        self.strength_spin.valueChanged.connect(self._save_settings)
        self.noise_combo.currentIndexChanged.connect(self._save_settings)
        self.device_combo.currentIndexChanged.connect(self._on_device_changed)
        self.seed_spin.valueChanged.connect(self._save_settings)
        self.preview_spin.valueChanged.connect(self._save_settings)
        self.early_stop_check.toggled.connect(self._save_settings)
        layers = self.viewer.layers
        for ev in ("inserted", "removed", "moved", "reordered"):
            emitter = getattr(layers.events, ev, None)
            if emitter is not None:
                emitter.connect(self._on_layers_changed)
        layers.selection.events.active.connect(self._on_active_changed)
        for layer in layers:
            self._watch(layer)

        self._refresh_layers()
        active = layers.selection.active
        if active is not None and _is_image(active):
            self.image_combo.set_value(active)
        self._on_image_changed()
        self._on_task_changed(save=False)
        self._set_idle(self._idle_text())
        try:  # the napari console gets the library, as in the README
            self.viewer.update_console({"napari_ngr": napari_ngr})
        except Exception:  # noqa: BLE001 - no console (e.g. headless): nothing to do
            pass

    # ------------------------------------------------------------------ properties
    @property
    def is_running(self) -> bool:
        return self._state is not None

    @property
    def task(self) -> str:
        return self.task_combo.currentText()

    @property
    def axes(self) -> str:
        return self.axes_combo.currentText()

    @property
    def device(self) -> str:
        return self.device_combo.currentData() or "cpu"

    # ------------------------------------------------------------------ settings
    def _load_settings(self):
        s = self._settings
        task = _setting(s, "task", None, str)
        self.task_combo.blockSignals(True)
        if task in _TASKS:
            self.task_combo.setCurrentText(task)
        else:  # first use: inpaint when a mask layer is there, else denoise
            has_mask = any(_is_mask(layer) for layer in self.viewer.layers)
            self.task_combo.setCurrentText("inpaint" if has_mask else "denoise")
        self.task_combo.blockSignals(False)
        self._load_iterations()
        self.strength_spin.setValue(_setting(s, "strength", 1.0, float))
        self.noise_combo.setCurrentIndex(max(self.noise_combo.findData(_setting(s, "noise", "gaussian", str)), 0))
        dev = _setting(s, "device", None, str)
        idx = self.device_combo.findData(dev) if dev else -1
        self.device_combo.setCurrentIndex(max(idx, 0))
        self.seed_spin.setValue(_setting(s, "seed", 0, int))
        self.preview_spin.setValue(_setting(s, "preview_every", 25, int))
        self.early_stop_check.setChecked(_setting(s, "early_stopping", "true", str).lower() in ("true", "1"))

    def _load_iterations(self):
        self.iterations_spin.blockSignals(True)  # remembered per task; 0 ("auto", the default): the library's
        self.iterations_spin.setValue(_setting(self._settings, f"{self.task}/iterations", 0, int))
        self.iterations_spin.blockSignals(False)

    def _save_settings(self, *_):
        s = self._settings
        s.setValue("task", self.task)
        s.setValue(f"{self.task}/iterations", int(self.iterations_spin.value()))
        s.setValue("strength", float(self.strength_spin.value()))
        s.setValue("noise", self.noise_combo.currentData())
        s.setValue("device", self.device)
        s.setValue("seed", int(self.seed_spin.value()))
        s.setValue("preview_every", int(self.preview_spin.value()))
        s.setValue("early_stopping", "true" if self.early_stop_check.isChecked() else "false")
        s.sync()

    # ------------------------------------------------------------------ layer bookkeeping
    def _watch(self, layer):
        try:
            layer.events.name.connect(self._on_layer_renamed)
        except Exception:  # noqa: BLE001  pragma: no cover
            pass

    def _on_layers_changed(self, event=None):
        if event is not None and getattr(event, "type", "") == "inserted":
            self._watch(event.value)
        self._refresh_layers()

    def _on_layer_renamed(self, event=None):
        self._refresh_layers()

    def _refresh_layers(self):
        layers = self.viewer.layers
        before = self.image_combo.value()
        mask_before = self.mask_combo.value()
        self.image_combo.refresh(layers)
        if before is None or self.image_combo.value() is not before:
            if before is None:
                active = layers.selection.active
                if active is not None and _is_image(active) and not _is_output(active):
                    self.image_combo.set_value(active)
            self._on_image_changed()
            return
        self.mask_combo.refresh(layers)
        # a chosen mask layer is kept while it exists; '(none)' is re-picked unless the user chose it
        if self.mask_combo.value() is None and (mask_before is not None or self._mask_auto):
            self._pick_default_mask()

    def _on_active_changed(self, event=None):
        if self.is_running:
            return
        layer = self.viewer.layers.selection.active
        if layer is None or not _is_image(layer) or _is_output(layer) or layer is self.image_combo.value():
            return
        if self.image_combo.set_value(layer):
            self._on_image_changed()

    def _on_image_changed(self, *_):
        layer = self.image_combo.value()
        self.axes_combo.blockSignals(True)
        self.axes_combo.clear()
        if layer is not None:
            ndim = layer.data.ndim if not layer.multiscale else len(layer.data[0].shape)
            rgb = bool(getattr(layer, "rgb", False))
            guess = guess_axes(_layer_shape(layer), rgb=rgb, axis_labels=tuple(layer.axis_labels),
                               metadata=layer.metadata)
            choices = axes_choices(ndim, rgb)
            if guess not in choices:
                choices = [guess] + choices
            self.axes_combo.addItems(choices)
            self.axes_combo.setCurrentText(guess)
        self.axes_combo.blockSignals(False)
        self.mask_combo.refresh(self.viewer.layers)
        self._pick_default_mask()
        self._on_axes_changed()

    def _on_axes_changed(self, *_):
        layer = self.image_combo.value()
        if layer is None:
            self.axes_hint.setText("")
            return
        shape = _layer_shape(layer)
        axes = self.axes
        if len(axes) == len(shape):
            self.axes_hint.setText(" · ".join(f"{a}={n}" for a, n in zip(axes, shape)))
        else:
            self.axes_hint.setText(str(shape))
        # the axis roles decide which masks fit: re-pick a mask that no longer fits, and a default '(none)'
        self._repick_mask_if_unfit()

    def _repick_mask_if_unfit(self):
        """Re-pick the mask when the chosen one no longer fits (the axes or the task changed), or
        when '(none)' is the default pick rather than the user's choice."""
        image, mask = self.image_combo.value(), self.mask_combo.value()
        if image is None:
            return
        if (mask is None and self._mask_auto) or (mask is not None and not self._mask_fits(mask, image)):
            self._pick_default_mask()

    def _mask_fits(self, mask, image) -> bool:
        return mask_fits(mask.data.shape, _layer_shape(image), self.axes, per_date=self.task == "decloud")

    def _pick_default_mask(self):
        """The topmost mask layer whose shape fits the image; '(none)' when there is none."""
        image = self.image_combo.value()
        if image is None:
            return
        choice = None
        for layer in self.mask_combo.candidates():
            if self._mask_fits(layer, image):
                choice = layer
                break
        self._picking_mask = True
        try:
            self.mask_combo.set_value(choice)
        finally:
            self._picking_mask = False
        self._mask_auto = True

    def _on_mask_chosen(self, *_):
        """The user (or a script) chose the mask: keep it, '(none)' included, when layers change."""
        if not self._picking_mask:
            self._mask_auto = False

    def _on_task_changed(self, *_, save=True):
        masked = self.task in _MASK_TASKS
        self.mask_combo.setEnabled(masked and not self.is_running)
        self.early_stop_check.setEnabled(not self.is_running)
        self.noise_combo.setEnabled(self.task == "denoise" and not self.is_running)
        self.early_stop_check.setText("held-out pixels" if masked else "held-out pixels / noise level")
        self._load_iterations()
        if save:
            self._save_settings()
        if not self.is_running:
            self.status_label.setText(self._idle_text())
            if masked:  # decloud needs a mask per date: a (Y, X) one chosen for inpainting no longer fits
                self._repick_mask_if_unfit()

    def _on_device_changed(self, *_):
        self._save_settings()
        if not self.is_running:
            self.status_label.setText(self._idle_text())

    def _idle_text(self) -> str:
        return f"Ready · device: {self.device}"

    # ------------------------------------------------------------------ run / cancel
    def _on_run_clicked(self, *_):
        if self.is_running:
            self.cancel()
        else:
            self.run()

    def run(self):
        """Start a restoration with the current settings (what the Run button does).

        Returns the worker, or None when the inputs are invalid (an error notification is shown).
        """
        import napari_ngr

        if self.is_running:
            return self.worker
        image = self.image_combo.value()
        if image is None or image not in self.viewer.layers:
            show_error("Choose an image layer to restore: there is none (open an image first).")
            return None
        if not _is_image(image):
            show_error(f"Layer {image.name!r} is not an image layer.")
            return None
        if image.multiscale:
            show_error(f"Layer {image.name!r} is multiscale: restore one resolution level "
                       "(e.g. viewer.add_image(layer.data[1])) instead.")
            return None
        task = self.task
        mask = None
        if task == "decloud" and "T" not in (self.axes or ""):
            show_error(f"Cloud removal needs a time axis: layer {image.name!r} has axes {self.axes!r}; "
                       "set the role of its dates axis to T under Axes (e.g. TYX, TCYX or TYXC).")
            return None
        if task in _MASK_TASKS:
            mask_layer = self.mask_combo.value()
            if mask_layer is None or mask_layer not in self.viewer.layers:
                if task == "decloud":
                    show_error("Cloud removal needs a cloud mask: paint a Labels layer over the clouds and their "
                               "shadows (nonzero = clouded; shape (T, Y, X)) and choose it as the mask.")
                else:
                    show_error("Inpainting needs a mask: paint a Labels layer over the defects (nonzero = "
                               "missing) and choose it as the mask, or choose the 'denoise' task.")
                return None
            if not _is_mask(mask_layer):
                show_error(f"Layer {mask_layer.name!r} cannot be a mask: use a Labels or boolean image layer.")
                return None
            mask = np.asarray(mask_layer.data) != 0  # a copy: painting during the run does not race
        self._save_settings()
        axes = self.axes or ""
        n_channels = _layer_shape(image)[axes.index("C")] if "C" in axes else 1
        d = napari_ngr.default_weights(task, n_channels)
        s = float(self.strength_spin.value())
        params = dict(axes=self.axes, iterations=int(self.iterations_spin.value()) or None,  # 0: auto
                      spatial_weight=d["spatial_weight"] * s, channel_weight=d["channel_weight"] * s,
                      stack_weight=d["stack_weight"] * s, seed=int(self.seed_spin.value()),
                      device=self.device, preview_every=int(self.preview_spin.value()))
        if task == "denoise" and self.noise_combo.currentData() != "gaussian":
            params["noise"] = self.noise_combo.currentData()
        if not self.early_stop_check.isChecked():
            # run the budget: no validation (inpainting: the last iterate), no discrepancy stop and no
            # held-out choice of the returned check or of NL-means (denoising)
            if task in _MASK_TASKS:
                params["holdout"] = 0.0
            else:
                params.update(discrepancy=0.0, select="last", fallback="none")
        rgb = bool(image.rgb)
        state = _RunState(image.name, task, dict(params, strength=s), _layer_kwargs(image), rgb)
        state.source_ref = weakref.ref(image)
        from napari.qt.threading import create_worker

        worker = create_worker(_restore_generator, task, image.data, mask, params, state,
                               _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._only_from(worker, self._on_yielded, last=False))
        for signal, handler in ((worker.returned, self._on_returned), (worker.errored, self._on_errored),
                                (worker.aborted, self._on_aborted), (worker.finished, self._on_finished)):
            signal.connect(self._only_from(worker, handler))
        self.worker, self._state = worker, state
        self._lifetime.state = state
        self._set_running(f"Preparing {task} of {image.name!r} on {self.device}…")
        from napari.utils import progress

        self._pbar = progress(total=params["iterations"], desc=f"NGR {task} {image.name!r}")
        worker.start()
        return worker

    def cancel(self):
        """Stop the running restoration at the next iteration; the best result so far is kept
        as ``"<name> restored (cancelled)"``."""
        if self._state is None:
            return
        self._state.cancel.set()
        self.run_button.setText("Cancelling…")
        self.run_button.setEnabled(False)
        self.status_label.setText("Cancelling at the next iteration…")

    # ------------------------------------------------------------------ worker signals
    def _only_from(self, worker, handler, last=True):
        """``handler``, called only while ``worker`` is this widget's current worker: a cancelled
        run's thread can deliver its last signals (e.g. ``finished``) after a new run has started,
        and they must not end the new run. An abandoned run (panel or viewer closed) ends quietly
        at its first ``last`` signal (returned, aborted, errored or finished)."""

        def call(*args):
            if self.worker is not worker:
                return
            st = self._state
            if st is not None and st.discard:
                if last and not st.finished:
                    st.finished = True
                    self._end_discarded(st)
                return
            handler(*args)

        return call

    def _abandon(self, why: str):
        """The panel was closed (or removed from the window) during a run: stop it at the next
        iteration, remove its preview and add no layers (see :meth:`_end_discarded`)."""
        st = self._state
        if st is None or st.discard:
            return
        st.discard = True
        st.cancel.set()
        self._remove_preview()
        self.run_button.setText("Cancelling…")
        self.run_button.setEnabled(False)
        self.status_label.setText(f"Cancelling: {why}")

    def _end_discarded(self, st: _RunState):
        """The end of an abandoned run: no layers and no notification. When the widget itself was
        deleted (with its viewer), neither its Qt widgets nor the viewer are touched."""
        if not self._lifetime.deleted:
            self._remove_preview()
        self._preview_layer = None
        self._finish("Cancelled: the panel was closed")

    def _on_yielded(self, msg):
        # napari's progress bar calls QApplication.processEvents() when it changes, so the run
        # may end (returned/aborted handled) inside any pbar call: the bar is updated last, and
        # ``self._state is st`` is checked after anything that can process events.
        st = self._state
        if st is None:
            return
        if isinstance(msg, _Started):
            st.device, st.total = msg.device, msg.total
            if not st.cancel.is_set():
                self.status_label.setText(f"Running on {msg.device}: iteration 0 of {msg.total}")
            pbar = self._pbar
            if pbar is not None:
                pbar.total = msg.total
                pbar.set_description(f"NGR {st.task} {st.source_name!r} on {msg.device}")
            return
        rec = msg
        if not st.cancel.is_set():
            text = f"Running on {st.device}: iteration {rec.iteration} of {rec.total}"
            if rec.validation is not None:
                text += f" · best so far: {rec.best_iteration}"
            self.status_label.setText(text)
        if rec.preview is not None:
            self._show_preview(st, rec.preview)
        self._update_progress(st, rec.iteration, rec.total)

    def _update_progress(self, st: _RunState, iteration: int, total: int):
        """Move the activity-dock bar (at most ~10 times a second: each move repaints)."""
        pbar = self._pbar
        if pbar is None or self._state is not st or iteration <= pbar.n:
            return
        now = time.monotonic()
        if iteration < total and now - st.last_bar_update < 0.1:
            return
        st.last_bar_update = now
        pbar.update(iteration - pbar.n)

    def _on_returned(self, msg):
        st = self._state
        if st is None or st.finished:
            return
        st.finished = True
        if isinstance(msg, _Failure):
            self._remove_preview()
            show_error(msg.message)
            self._finish(f"Failed: {msg.message}")
            return
        self._add_results(msg.result, msg.cancelled, msg.device)

    def _add_results(self, res, cancelled: bool, device: str):
        try:
            return self._add_result_layers(res, cancelled, device)
        except Exception as exc:  # noqa: BLE001 - e.g. the viewer refused a layer
            st = self._state
            if st is not None and st.discard:  # closed meanwhile (adding a layer processes events)
                self._end_discarded(st)
                return []
            log.error("napari-ngr: could not add the result layers", exc_info=exc)
            show_error(f"Could not add the result layers: {exc}")
            self._finish("Failed to add the result layers")
            return []

    def _on_aborted(self):
        """``worker.quit()`` (e.g. napari's task manager): keep the best estimate so far."""
        st = self._state
        if st is None or st.finished:
            return
        st.finished = True
        if st.job is None:
            self._remove_preview()
            self._finish("Cancelled before the first iteration")
            return
        try:
            res = st.job.result()
        except Exception as exc:  # noqa: BLE001
            show_error(error_message(exc))
            self._finish("Failed")
            return
        self._add_results(res, True, st.device)

    def _on_errored(self, exc):
        st = self._state
        if st is not None and not st.finished:
            st.finished = True
            self._remove_preview()
            show_error(error_message(exc))
            self._finish(f"Failed: {error_message(exc)}")

    def _on_finished(self):
        st = self._state
        if st is not None and not st.finished:  # neither returned nor aborted: should not happen
            st.finished = True
            self._remove_preview()
            self._finish("Stopped")
        # else: the returned/aborted handler (possibly still adding layers) finishes the run

    # ------------------------------------------------------------------ results
    def _add_result_layers(self, res, cancelled: bool, device: str):
        st = self._state
        self.last_result = res
        self._remove_preview()
        self._remove_previous_outputs(st)
        names = output_names(st.source_name)
        info = dict(source=st.source_name, task=st.task, device=device, iterations_run=int(res.iteration),
                    best_iteration=int(res.best_iteration), stop_reason=res.stop_reason,
                    sigma=None if res.sigma is None else float(res.sigma),
                    channel_sigmas=None if res.channel_sigmas is None else [float(v) for v in res.channel_sigmas],
                    noise_variance=None if res.noise_variance is None else [list(v) for v in res.noise_variance],
                    final_weight=res.final_weight, method=res.method, nlmeans_weight=float(res.nlmeans_weight),
                    start=res.start, precision=res.precision, **{k: v for k, v in st.params.items() if k != "device"})
        kw = st.layer_kwargs
        added = []
        for axis, g in res.gradients.items():
            gkw = _gradient_kwargs(kw, st.rgb)
            data = np.moveaxis(g, -1, 0) if st.rgb else g
            gkw["metadata"] = dict(gkw["metadata"], napari_ngr=dict(info, role="gradient", axis=axis))
            added.append(self.viewer.add_image(
                data, name=names.get(f"grad_{axis}", f"{st.source_name} \u2207{axis}"),
                colormap=gradient_colormap(), contrast_limits=symmetric_limits(data), visible=False, **gkw))
        rkw = _image_kwargs(kw)
        rkw["metadata"] = dict(rkw["metadata"], napari_ngr=dict(info, role="restored"))
        added.append(self.viewer.add_image(res.image, name=names["cancelled" if cancelled else "restored"], **rkw))
        name = added[-1].name  # napari's, e.g. "... [1]" when a layer of the user's has the name
        self._outputs.append((st.source_ref, [(weakref.ref(layer), layer.name) for layer in added]))
        how = "cancelled" if cancelled else res.stop_reason
        sigma = f", σ={res.sigma:.3g}" if res.sigma is not None else ""
        if getattr(res, "channel_sigmas", None) is not None:  # channels of different noise, whitened
            sigma = ", σ per channel " + " / ".join(f"{v:.3g}" for v in res.channel_sigmas)
        if getattr(res, "noise_variance", None) is not None:  # noise="poisson": the fitted model
            sigma = ", noise variance " + " / ".join(f"{g:.3g}·value{o:+.3g}" for g, o in res.noise_variance)
        if res.final_weight is not None:
            sigma += f", data weight ×{res.final_weight:g}"
        if res.nlmeans_weight >= 1:
            what = "returned NL-means of the input (lower held-out error)"
        elif res.nlmeans_weight > 0:
            what = (f"returned iteration {res.best_iteration} mixed with {res.nlmeans_weight:.0%} NL-means "
                    "of the input (lower held-out error)")
        else:
            what = f"returned iteration {res.best_iteration}"
        self._finish(f"Done on {device}: {res.iteration} iterations, {what} ({how}{sigma}) → {name!r}")
        return added

    def _remove_previous_outputs(self, st: _RunState):
        """Remove the result layers of earlier runs on the same input: those this widget added (by
        identity: napari may have renamed them, e.g. "name restored [1]"), and this plugin's layers
        with the output names (e.g. from a panel since closed). Renamed results are kept."""
        source = st.source_ref() if st.source_ref is not None else None
        doomed, kept = [], []
        for ref, layers in self._outputs:
            src = ref() if ref is not None else None
            if src is None:  # the input layer is gone: no run replaces its results
                continue
            if src is source:
                doomed += [lay for lref, name in layers if (lay := lref()) is not None and lay.name == name]
            else:
                kept.append((ref, layers))
        self._outputs = kept
        names = set(output_names(st.source_name).values())
        doomed += [lay for lay in self.viewer.layers if lay.name in names and _is_output(lay)
                   and lay.metadata["napari_ngr"].get("source") == st.source_name]
        for layer in doomed:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def _show_preview(self, st: _RunState, data):
        if self._state is not st:  # the run ended meanwhile
            return
        layer = self._preview_layer
        if layer is not None and layer in self.viewer.layers and layer.data.shape == data.shape:
            layer.data = data
            return
        kw = _image_kwargs(st.layer_kwargs)
        kw["metadata"] = dict(kw["metadata"], napari_ngr=dict(source=st.source_name, role="preview"))
        name = output_names(st.source_name)["preview"]
        for old in [lay for lay in self.viewer.layers if lay.name == name and _is_output(lay)]:
            self.viewer.layers.remove(old)
        self._preview_layer = self.viewer.add_image(data, name=name, **kw)

    def _remove_preview(self):
        layer = self._preview_layer
        self._preview_layer = None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    # ------------------------------------------------------------------ state
    def _set_running(self, text):
        for w in (self.image_combo, self.mask_combo, self.task_combo, self.axes_combo, self.iterations_spin,
                  self.strength_spin, self.noise_combo, self.device_combo, self.seed_spin, self.preview_spin,
                  self.early_stop_check):
            w.setEnabled(False)
        self.run_button.setText("Cancel")
        self.run_button.setEnabled(True)
        self.status_label.setText(text)

    def _set_idle(self, text=None):
        for w in (self.image_combo, self.task_combo, self.axes_combo, self.iterations_spin,
                  self.strength_spin, self.device_combo, self.seed_spin, self.preview_spin):
            w.setEnabled(True)
        self.mask_combo.setEnabled(self.task in _MASK_TASKS)
        self.early_stop_check.setEnabled(True)
        self.noise_combo.setEnabled(self.task == "denoise")
        self.run_button.setText("Run")
        self.run_button.setEnabled(True)
        if text is not None:
            self.status_label.setText(text)

    def _finish(self, text):
        pbar, self._pbar = self._pbar, None
        st, self._state = self._state, None
        self.worker = None
        self._lifetime.state = None
        if st is not None and st.job is not None:
            st.job = None
            _free_gpu()
        if self._lifetime.deleted:  # closed with the viewer: its Qt widgets are gone
            if pbar is not None:
                try:
                    pbar.close()
                except Exception:  # noqa: BLE001 - the viewer's activity dock may be gone too
                    log.debug("napari-ngr: could not close the progress bar", exc_info=True)
            return
        self._set_idle(text)
        if pbar is not None:
            pbar.close()  # last: it may process events

    def event(self, event):  # noqa: D102 - Qt API
        # napari's panel close button (and viewer.window.remove_dock_widget) only take the widget out
        # of its dock (setParent(None)): closeEvent is not called, so that is the hook that ends a run
        if event.type() == QEvent.Type.ParentChange and self.parent() is None and self._state is not None:
            self._abandon("the panel was closed")
        return super().event(event)

    def closeEvent(self, event):  # noqa: N802 - Qt API
        if self._state is not None:
            self._abandon("the panel was closed")
        super().closeEvent(event)


# --------------------------------------------------------------------------- layer kwargs
def _layer_shape(layer) -> tuple:
    data = layer.data[0] if layer.multiscale else layer.data
    return tuple(int(s) for s in data.shape)


def _device_label(dev: str) -> str:
    if dev.startswith("cuda"):
        try:
            import torch

            idx = int(dev.split(":")[1]) if ":" in dev else 0
            return f"{dev} ({torch.cuda.get_device_name(idx)})"
        except Exception:  # noqa: BLE001
            return dev
    if dev == "cpu":
        try:
            import torch

            n = torch.get_num_threads()
            return f"cpu ({n} thread{'s' if n != 1 else ''})"
        except Exception:  # noqa: BLE001  pragma: no cover
            return dev
    return dev


def _copy_metadata(md) -> dict:
    try:
        return copy.deepcopy(dict(md or {}))
    except Exception:  # noqa: BLE001 - unpicklable entries: a shallow copy then
        return dict(md or {})


def _layer_kwargs(layer) -> dict:
    """What the result layers copy from the input (captured when the run starts)."""
    kw = dict(
        scale=tuple(float(v) for v in layer.scale), translate=tuple(float(v) for v in layer.translate),
        rotate=np.array(layer.rotate), shear=np.array(layer.shear), affine=np.array(layer.affine.affine_matrix),
        axis_labels=tuple(layer.axis_labels), units=tuple(layer.units), metadata=_copy_metadata(layer.metadata),
        rgb=bool(layer.rgb), contrast_limits=tuple(float(v) for v in layer.contrast_limits),
        gamma=float(layer.gamma), blending=layer.blending, colormap=layer.colormap,
        interpolation2d=getattr(layer, "interpolation2d", None),
    )
    return kw


def _image_kwargs(kw: dict) -> dict:
    out = {k: kw[k] for k in ("scale", "translate", "rotate", "shear", "affine", "axis_labels", "units",
                              "rgb", "contrast_limits", "gamma", "blending")}
    out["metadata"] = copy.copy(kw["metadata"])
    if not kw["rgb"]:
        out["colormap"] = kw["colormap"]
    if kw.get("interpolation2d"):
        out["interpolation2d"] = kw["interpolation2d"]
    return out


def _gradient_kwargs(kw: dict, rgb: bool) -> dict:
    """Gradient layers: the input's geometry. For RGB inputs a leading channel axis is added
    (the gradients are ``(C, ..., Y, X)``, not RGB): it gets scale 1 and no translation, and
    the input's rotation, shear and affine act on the other axes only, so each pixel of a
    gradient layer lands where the input's pixel does."""
    if not rgb:
        out = {k: kw[k] for k in ("scale", "translate", "rotate", "shear", "affine", "axis_labels", "units")}
    else:
        from napari.utils.transforms.transform_utils import expand_upper_triangular

        shear = np.asarray(kw["shear"], dtype=float)
        if shear.ndim == 1:  # napari's upper-triangular entries
            shear = expand_upper_triangular(shear)
        out = dict(scale=(1.0,) + tuple(kw["scale"]), translate=(0.0,) + tuple(kw["translate"]),
                   rotate=_lead_identity(kw["rotate"]), shear=_lead_identity(shear),
                   affine=_lead_identity(kw["affine"]),
                   axis_labels=("c",) + tuple(kw["axis_labels"]), units=("pixel",) + tuple(kw["units"]))
    out["metadata"] = copy.copy(kw["metadata"])
    return out


def _lead_identity(matrix) -> np.ndarray:
    """``matrix`` (n x n, e.g. a rotation or an (n-1)-D homogeneous affine) with a leading axis
    that it leaves as is: ``[[1, 0], [0, matrix]]``."""
    m = np.asarray(matrix, dtype=float)
    out = np.eye(m.shape[0] + 1)
    out[1:, 1:] = m
    return out
