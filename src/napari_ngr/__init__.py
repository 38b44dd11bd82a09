"""napari-ngr: zero-shot image restoration with the Neural Gradient Regularizer (NGR).

Qt-free core: ``inpaint`` and ``denoise`` work on NumPy arrays; the napari widget and the
command line drive the same :class:`RestorationJob` loop.
"""

from ._device import available_devices, resolve_device
from ._version import __version__
from .api import (DEFAULTS, RestorationJob, RestorationResult, decloud, default_weights, denoise, estimate_memory, inpaint,
                  prepare_decloud, prepare_denoise, prepare_inpaint)
from .solver import Progress, SolverOptions

__all__ = [
    "__version__", "inpaint", "denoise", "decloud", "prepare_inpaint", "prepare_denoise", "prepare_decloud",
    "RestorationJob",
    "RestorationResult", "Progress", "SolverOptions", "DEFAULTS", "available_devices", "resolve_device",
    "estimate_memory", "default_weights",
]
