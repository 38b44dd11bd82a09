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


@pytest.fixture(scope="session")
def moving_board():
    """``(clean, noisy)``: a sharp checkerboard (6 px squares) moving 2 px per plane, (6, 40, 44),
    plus Gaussian noise sigma 0.1 (float32). NL-means (repeated patches) restores it far better
    than a network that has learnt little: the NL-means fallback's test case."""
    yy, xx = np.mgrid[:40, :44]
    board = np.stack([0.2 + 0.6 * ((yy // 6 + (xx + 2 * t) // 6) % 2) for t in range(6)])
    noisy = (board + 0.1 * np.random.default_rng(1).standard_normal(board.shape)).astype(np.float32)
    return board, noisy


@pytest.fixture(scope="session")
def brick96():
    """A 96x96 crop of skimage's brick (regular texture, grey, [0, 1]) and a 30 % observed mask."""
    from skimage import data

    img = data.brick()[100:196, 100:196] / 255.0
    return img, np.random.default_rng(0).random(img.shape) < 0.3


def psnr(ref, x, mask=None):
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    if mask is not None:
        ref, x = ref[mask], x[mask]
    rng = ref.max() - ref.min()
    return 10 * np.log10(rng**2 / np.mean((ref - x) ** 2))


@pytest.fixture(scope="session")
def cube():
    """A (12, 48, 48) hyperspectral-like cube in [0, 1]: smooth spectra mixed by smooth abundance
    maps plus sharp single-material rectangles (as in benchmarks/_data.hsi_cube)."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    bands, size = 12, 48
    wl = np.linspace(0, 1, bands)
    spectra = np.stack([0.2 + 0.6 * np.exp(-0.5 * ((wl - c) / 0.3) ** 2) for c in (0.1, 0.5, 0.9)])
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=(size, size)), 5, mode="wrap") for _ in range(3)])
    ab = np.exp(4 * logits / logits.std())
    ab /= ab.sum(0)
    ab[:, 10:22, 8:30] = np.array([1.0, 0.0, 0.0])[:, None, None]
    ab[:, 30:44, 26:40] = np.array([0.0, 0.0, 1.0])[:, None, None]
    c = np.einsum("eb,eyx->byx", spectra, ab)
    return (c - c.min()) / (c.max() - c.min())
