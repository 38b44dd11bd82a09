"""The Qt (napari) face of napari-ngr. Nothing outside this package imports Qt."""

from .widget import RestoreWidget

__all__ = ["RestoreWidget"]
