"""Qt-free helpers behind the napari widget: axis roles, layer naming, messages.

Kept apart from :mod:`napari_ngr._qt` so they can be tested (and reused by scripts) without a
display. Nothing here imports Qt or napari at module level.
"""

from __future__ import annotations

import numpy as np

__all__ = ["axes_choices", "guess_axes", "mask_fits", "output_names", "symmetric_limits",
           "error_message", "label_to_letter", "OOM_MESSAGE"]

OOM_MESSAGE = "GPU out of memory: choose CPU or crop the image"

# Axis-label spellings (lower case) -> napari-ngr axis letter.
_LABELS = {
    "c": "C", "ch": "C", "chan": "C", "channel": "C", "channels": "C", "band": "C", "bands": "C",
    "wavelength": "C", "wavelengths": "C", "lambda": "C", "λ": "C", "spectral": "C",
    "z": "Z", "depth": "Z", "plane": "Z", "slice": "Z",
    "t": "T", "time": "T", "frame": "T", "frames": "T",
    "y": "Y", "row": "Y", "rows": "Y",
    "x": "X", "col": "X", "column": "X", "cols": "X",
}


def label_to_letter(label) -> str | None:
    """``"channel"`` -> ``"C"``, ``"z"`` -> ``"Z"``; None for labels we do not recognise."""
    return _LABELS.get(str(label).strip().lower())


def _valid(axes: str) -> bool:
    return (len(set(axes)) == len(axes) and set(axes) <= set("TZCYX") and "Y" in axes and "X" in axes
            and not ("T" in axes and "Z" in axes) and 2 <= len(axes) <= 4)


def axes_choices(ndim: int, rgb: bool = False) -> list[str]:
    """The axis strings offered for an ``ndim``-D layer, most common first.

    Y and X are the last two non-channel axes (napari displays the last two); the channel
    axis (``C``) may be anywhere; one stack axis (``Z`` or ``T``) may precede Y and X.
    """
    if ndim == 2:
        return ["YX"]
    if rgb:
        return {3: ["YXC"], 4: ["TYXC", "ZYXC"]}.get(ndim, [])
    if ndim == 3:
        return ["ZYX", "TYX", "CYX", "YXC"]
    if ndim == 4:
        return ["TCYX", "ZCYX", "CTYX", "CZYX", "TYXC", "ZYXC"]
    return []


def guess_axes(shape, *, rgb: bool = False, axis_labels=None, metadata=None) -> str:
    """Prefill the axis roles of a layer.

    In order: RGB(A) layers have their colour axis last; ``metadata["axes"]`` (a string like
    ``"CYX"``) or ``metadata["channel_axis"]`` (an int) when a reader left them; the layer's
    ``axis_labels`` when they are all recognised (``c``/``channel``/``band``, ``z``,
    ``t``/``time``, ``y``, ``x``); otherwise the library's defaults: ``YX``, ``ZYX``, ``TCYX``.
    """
    ndim = len(shape)
    md = metadata or {}
    choices = axes_choices(ndim, rgb)
    if rgb:
        return choices[0] if choices else "YX"
    axes = md.get("axes")
    if isinstance(axes, str) and len(axes) == ndim and _valid(axes.upper()):
        return axes.upper()
    ca = md.get("channel_axis")
    if isinstance(ca, (int, np.integer)) and not isinstance(ca, bool) and -ndim <= ca < ndim and ndim >= 3:
        ca = int(ca) % ndim
        rest = [i for i in range(ndim) if i != ca]
        letters = [""] * ndim
        letters[ca] = "C"
        for i, n in zip(rest, {2: "YX", 3: "TYX"}[len(rest)]):
            letters[i] = n
        return "".join(letters)
    if axis_labels is not None and len(axis_labels) == ndim:
        letters = [label_to_letter(a) for a in axis_labels]
        if all(letters):
            cand = "".join(letters)
            if _valid(cand):
                return cand
        # partly recognised: keep the recognised roles, fill the rest in library order
        known = {i: x for i, x in enumerate(letters) if x}
        if known:
            for cand in choices:
                if all(cand[i] == x for i, x in known.items()):
                    return cand
    return choices[0] if choices else "YX"


def mask_fits(mask_shape, image_shape, axes: str, per_date: bool = False) -> bool:
    """Whether a mask of ``mask_shape`` broadcasts to the image the way the library accepts:
    the image's shape, the image's shape without the channel axis, or (Y, X). ``per_date``
    (decloud): a cloud mask has its own plane for every date, so (Y, X) alone does not fit."""
    from ._layout import Layout

    image_shape = tuple(image_shape)
    if tuple(mask_shape) == image_shape:
        return True
    if len(axes) != len(image_shape) or "Y" not in axes or "X" not in axes:
        return False
    sub = Layout(axes, image_shape).mask_layout(mask_shape)
    return sub is not None and not (per_date and sub.axes == "YX" and len(sub.axes) < len(axes.replace("C", "")))


def output_names(source: str, axes=("y", "x", "z", "t", "c")) -> dict:
    """Names of the layers a run on layer ``source`` creates (and that a re-run replaces)."""
    out = {"restored": f"{source} restored", "cancelled": f"{source} restored (cancelled)",
           "preview": f"{source} preview"}
    for a in axes:
        out[f"grad_{a}"] = f"{source} \u2207{a}"
    return out


def symmetric_limits(a: np.ndarray, q: float = 99.5) -> tuple[float, float]:
    """Contrast limits ``(-m, m)`` centred on 0, ``m`` the ``q``-th percentile of ``|a|``."""
    v = np.abs(np.asarray(a, np.float32)).ravel()
    if v.size > 1_000_000:
        v = v[:: v.size // 500_000]
    m = float(np.percentile(v, q)) if v.size else 0.0
    if not np.isfinite(m) or m <= 0:
        m = float(v.max(initial=0.0))
    if not np.isfinite(m) or m <= 0:
        m = 1.0
    return (-m, m)


def error_message(exc: BaseException) -> str:
    """A plain message for an exception raised while preparing or running a restoration."""
    try:
        import torch

        ooms = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                 getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    except Exception:  # pragma: no cover - torch is a dependency
        ooms = ()
    text = str(exc)
    if (ooms and isinstance(exc, ooms)) or (isinstance(exc, RuntimeError) and "out of memory" in text.lower()
                                            and ("cuda" in text.lower() or "mps" in text.lower()
                                                 or "gpu" in text.lower())):
        return OOM_MESSAGE
    if isinstance(exc, MemoryError):
        return "Out of memory: crop the image (or close other programs) and try again"
    if isinstance(exc, ValueError):
        return text[:1].upper() + text[1:] if text else "Invalid input"
    return f"Restoration failed: {type(exc).__name__}: {text}"

