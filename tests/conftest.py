import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def rgb48():
    """A 48x48 RGB crop of skimage's astronaut, float in [0, 1]."""
    from skimage import data
    from skimage.transform import resize

    return resize(data.astronaut()[30:330, 100:400], (48, 48), anti_aliasing=True).astype(np.float64)


@pytest.fixture(scope="session")
def gray48():
    from skimage import data
    from skimage.transform import resize

    return resize(data.camera()[60:360, 120:420] / 255.0, (48, 48), anti_aliasing=True)


@pytest.fixture(scope="session")
def stack():
    """A (6, 40, 44) stack: camera crop panning 1 px per plane (a Z-stack / time-lapse stand-in)."""
    from skimage import data
    from skimage.transform import resize

    cam = resize(data.camera() / 255.0, (128, 128), anti_aliasing=True)
    return np.stack([cam[30 + t:70 + t, 40 + t:84 + t] for t in range(6)])


def psnr(ref, x, mask=None):
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    if mask is not None:
        ref, x = ref[mask], x[mask]
    rng = ref.max() - ref.min()
    return 10 * np.log10(rng**2 / np.mean((ref - x) ** 2))
