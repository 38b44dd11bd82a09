"""Axis layouts: from the user's array to the solver's ``(S, C, H, W)`` and back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STACK = "TZ"


@dataclass(frozen=True)
class Layout:
    """How the axes of a user array map to the solver layout ``(S, C, H, W)``.

    ``axes`` is a string of letters from ``TZCYX``, one per array axis, e.g. ``"YXC"`` or
    ``"TCYX"``. ``S`` is the stack axis (``T`` or ``Z``), ``C`` the channel axis.
    """

    axes: str
    shape: tuple

    @property
    def stack_letter(self):
        for a in self.axes:
            if a in _STACK:
                return a
        return None

    def _order(self):
        order = []
        for letter in (self.stack_letter, "C", "Y", "X"):
            order.append(self.axes.index(letter) if letter and letter in self.axes else None)
        return order

    @property
    def internal_shape(self):
        return tuple(1 if i is None else self.shape[i] for i in self._order())

    def axis_names(self):
        """Names of the regularized axes, internal dim first: e.g. ``{"z": 0, "c": 1, "y": 2, "x": 3}``."""
        S, C, H, W = self.internal_shape
        names = {}
        if S > 1:
            names[self.stack_letter.lower()] = 0
        if C > 1:
            names["c"] = 1
        names["y"] = 2
        names["x"] = 3
        return names

    def to_internal(self, a: np.ndarray) -> np.ndarray:
        """User array (this layout's shape) -> ``(S, C, H, W)``."""
        present = [i for i in self._order() if i is not None]
        t = np.transpose(a, present)
        return t.reshape(self.internal_shape)

    def to_user(self, t: np.ndarray) -> np.ndarray:
        """``(S, C, H, W)`` -> user layout, C-contiguous (as NumPy and scikit-image return)."""
        order = self._order()
        present = [i for i in order if i is not None]
        squeezed = t.reshape([self.shape[i] for i in present])
        inv = np.argsort(present)
        return np.ascontiguousarray(np.transpose(squeezed, inv))

    def mask_layout(self, shape) -> "Layout | None":
        """The layout of a mask of ``shape`` given in the image's shape, without its channel
        axis, or as (Y, X); None if the mask does not fit this image."""
        shape = tuple(shape)
        if shape == self.shape:
            return self
        if "C" in self.axes:
            ci = self.axes.index("C")
            no_c = self.shape[:ci] + self.shape[ci + 1:]
            if shape == no_c:
                return Layout(self.axes.replace("C", ""), no_c)
        yx = (self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")])
        if shape == yx:
            return Layout("YX", yx)
        return None

    def mask_to_internal(self, mask: np.ndarray, name: str = "mask") -> np.ndarray:
        """Broadcast a mask given in the image's shape, without its channel axis, or as (Y, X)."""
        sub = self.mask_layout(mask.shape)
        if sub is None:
            yx = (self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")])
            raise ValueError(
                f"{name} of shape {tuple(mask.shape)} does not match the image of shape {self.shape} (axes "
                f"{self.axes}): give the image's shape, the image's shape without the channel axis, or (Y, X) = {yx}"
            )
        return sub.to_internal(mask)


def resolve_layout(shape, channel_axis=None, axes=None) -> Layout:
    """Work out the :class:`Layout` of an array, with scikit-image's ``channel_axis`` convention.

    Defaults: 2-D is ``YX``; 3-D is ``ZYX`` (a stack) unless ``channel_axis`` is given; 4-D needs
    ``channel_axis`` (the other leading axis is time, ``T``) or an explicit ``axes``.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"image must be at least 2-D (Y, X); got {ndim}-D with shape {shape}")
    if ndim > 4:
        raise ValueError(f"images of more than 4 dimensions are not supported; got shape {shape}")
    if channel_axis is not None:
        if not isinstance(channel_axis, (int, np.integer)) or isinstance(channel_axis, bool):
            raise ValueError(f"channel_axis must be an integer or None, got {channel_axis!r}")
        if not -ndim <= channel_axis < ndim:
            raise ValueError(f"channel_axis={channel_axis} is out of range for a {ndim}-D image")
        channel_axis = int(channel_axis) % ndim
    if axes is not None:
        axes = str(axes).upper()
        if len(axes) != ndim:
            raise ValueError(f"axes={axes!r} has {len(axes)} letters but the image is {ndim}-D")
        if set(axes) - set("TZCYX") or len(set(axes)) != len(axes):
            raise ValueError(f"axes={axes!r} must use distinct letters from T, Z, C, Y, X")
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"axes={axes!r} must contain Y and X")
        if "T" in axes and "Z" in axes:
            raise ValueError(f"axes={axes!r}: only one of T or Z is supported")
        if channel_axis is not None and axes[channel_axis] != "C":
            raise ValueError(f"channel_axis={channel_axis} disagrees with axes={axes!r}")
    else:
        letters = [None] * ndim
        if channel_axis is not None:
            if ndim == 2:
                raise ValueError("a 2-D image has no room for a channel axis; use channel_axis=None")
            letters[channel_axis] = "C"
        rest = [i for i in range(ndim) if letters[i] is None]
        if len(rest) == 4 or (ndim == 4 and channel_axis is None):
            raise ValueError(
                f"a 4-D image of shape {shape} is ambiguous: give channel_axis (e.g. 1 for TCYX) or axes='TCYX'"
            )
        names = {2: "YX", 3: "ZYX"}[len(rest)] if len(rest) in (2, 3) else None
        if names is None:
            raise ValueError(f"cannot infer the axes of shape {shape}; pass axes=")
        if ndim == 4:
            names = "TYX"
        for i, n in zip(rest, names):
            letters[i] = n
        axes = "".join(letters)
    for letter in "YX":
        if shape[axes.index(letter)] < 2:
            raise ValueError(f"axis {letter} of shape {shape} has size < 2")
    return Layout(axes, shape)
