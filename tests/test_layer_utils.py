"""Qt-free helpers behind the napari widget (no display needed)."""

import numpy as np
import pytest

from napari_ngr._layer_utils import (OOM_MESSAGE, axes_choices, error_message, guess_axes, mask_fits,
                                     output_names, symmetric_limits)


@pytest.mark.parametrize("shape, kw, expected", [
    ((48, 48), {}, "YX"),
    ((48, 48, 3), {"rgb": True}, "YXC"),
    ((5, 48, 48, 3), {"rgb": True}, "TYXC"),
    ((8, 48, 48), {}, "ZYX"),
    ((8, 48, 48), {"axis_labels": ("band", "y", "x")}, "CYX"),
    ((8, 48, 48), {"axis_labels": ("t", "y", "x")}, "TYX"),
    ((8, 48, 48), {"axis_labels": ("-3", "-2", "-1")}, "ZYX"),          # napari's default labels
    ((48, 48, 4), {"metadata": {"channel_axis": -1}}, "YXC"),
    ((5, 3, 48, 48), {"metadata": {"channel_axis": 1}}, "TCYX"),
    ((5, 3, 48, 48), {"metadata": {"axes": "zcyx"}}, "ZCYX"),
    ((5, 3, 48, 48), {"axis_labels": ("time", "channel", "y", "x")}, "TCYX"),
    ((3, 5, 48, 48), {"axis_labels": ("c", "z", "row", "col")}, "CZYX"),
    ((5, 3, 48, 48), {"axis_labels": ("t", "?", "y", "x")}, "TCYX"),    # partly known
])
def test_guess_axes(shape, kw, expected):
    assert guess_axes(shape, **kw) == expected


def test_axes_choices_are_valid_for_the_library():
    from napari_ngr._layout import resolve_layout

    sizes = {"T": 4, "Z": 5, "C": 3, "Y": 8, "X": 9}
    for ndim in (2, 3, 4):
        for rgb in (False, True):
            for axes in axes_choices(ndim, rgb):
                assert len(axes) == ndim
                resolve_layout(tuple(sizes[a] for a in axes), axes=axes)


def test_mask_fits():
    assert mask_fits((48, 48), (48, 48, 3), "YXC")
    assert mask_fits((5, 48, 48), (5, 3, 48, 48), "TCYX")
    assert mask_fits((48, 48), (5, 3, 48, 48), "TCYX")
    assert not mask_fits((40, 48), (48, 48), "YX")
    assert not mask_fits((3, 48, 48), (5, 3, 48, 48), "TCYX")
    # decloud: a cloud mask per date, never one (Y, X) plane for all of them
    assert mask_fits((5, 48, 48), (5, 3, 48, 48), "TCYX", per_date=True)
    assert not mask_fits((48, 48), (5, 3, 48, 48), "TCYX", per_date=True)
    assert not mask_fits((48, 48), (5, 48, 48), "TYX", per_date=True)


def test_names_limits_and_messages():
    import torch

    names = output_names("cells")
    assert names["restored"] == "cells restored" and names["grad_y"] == "cells \u2207y"
    assert names["cancelled"] == "cells restored (cancelled)"
    lo, hi = symmetric_limits(np.array([-3.0, 0.0, 1.0]))
    assert lo == -hi and hi > 0
    assert symmetric_limits(np.zeros(4)) == (-1.0, 1.0)
    assert error_message(torch.cuda.OutOfMemoryError("CUDA out of memory")) == OOM_MESSAGE
    assert error_message(RuntimeError("MPS backend out of memory")) == OOM_MESSAGE
    assert error_message(ValueError("mask of shape (3,) does not match")) == "Mask of shape (3,) does not match"
    assert error_message(KeyError("x")).startswith("Restoration failed: KeyError")
