"""Offline sample data for the napari plugin (and for tests, scripts and the screenshot).

Everything is built here, from images bundled with scikit-image or synthesized: nothing is
downloaded, so the samples work from an installed wheel without a network.

Each ``make_*`` function returns a dict with the ground truth (``"clean"``), the degraded
data and, for inpainting, the defect mask (nonzero = missing), so tests can measure PSNR.
The ``*_sample`` functions are the napari ``sample_data`` contributions: they return lists
of napari ``LayerData`` tuples ``(data, kwargs, layer_type)``. All take a ``size`` (the Y and
X extent in pixels) so tests can ask for small versions.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "make_rgb_photo", "make_zstack", "make_timelapse", "make_hyperspectral",
    "rgb_photo_sample", "zstack_sample", "timelapse_sample", "hyperspectral_sample",
]


# --------------------------------------------------------------------------- helpers
def _resize(a: np.ndarray, shape) -> np.ndarray:
    from skimage.transform import resize

    return resize(a, shape, anti_aliasing=True, preserve_range=True)


def _strokes(shape, n, width, rng) -> np.ndarray:
    """Random thick strokes, like scratches painted over a photo (True = defect)."""
    from skimage import draw

    h, w = shape
    mask = np.zeros(shape, bool)
    for _ in range(n):
        r0, r1 = rng.integers(0, h, 2)
        c0, c1 = rng.integers(0, w, 2)
        rr, cc = draw.line(int(r0), int(c0), int(r1), int(c1))
        for d in range(-(width // 2), width - width // 2):
            mask[np.clip(rr + d, 0, h - 1), cc] = True
    return mask


# --------------------------------------------------------------------------- generators
def make_rgb_photo(size: int = 256, seed: int = 0) -> dict:
    """scikit-image's astronaut (bundled), ``size`` x ``size`` RGB uint8, with scratches and
    a few blotches painted over it in white; ``mask`` marks them (the painted defect mask)."""
    from skimage import data, draw

    rng = np.random.default_rng(seed)
    clean = np.clip(np.round(_resize(data.astronaut(), (size, size, 3))), 0, 255).astype(np.uint8)
    width = max(1, size // 96)
    mask = _strokes((size, size), n=10, width=width, rng=rng)
    for _ in range(3):  # a few blotches (dust)
        r, c = rng.integers(size // 8, size - size // 8, 2)
        rr, cc = draw.disk((int(r), int(c)), max(1.5, size / 64), shape=(size, size))
        mask[rr, cc] = True
    damaged = clean.copy()
    damaged[mask] = 255
    return {"clean": clean, "damaged": damaged, "mask": mask.astype(np.uint8)}


def _spheres(shape, n, rmin, rmax, rng) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    vol = np.zeros(shape, np.float32)
    for _ in range(n):
        c = [rng.uniform(0, s) for s in shape]
        r = rng.uniform(rmin, rmax)
        rz = r * shape[0] / shape[1] * 1.5  # the stack is thinner than it is wide
        d = ((z - c[0]) / max(rz, 1.0)) ** 2 + ((y - c[1]) / r) ** 2 + ((x - c[2]) / r) ** 2
        vol = np.maximum(vol, (d <= 1.0) * rng.uniform(0.5, 1.0))
    return vol


def make_zstack(size: int = 128, depth: int | None = None, seed: int = 0) -> dict:
    """A synthetic fluorescence Z-stack (nuclei and small spots, blurred by an anisotropic PSF)
    with Poisson (shot) and Gaussian (read-out) noise, as uint16 camera counts."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    depth = depth or max(8, size // 6)
    shape = (depth, size, size)
    nuclei = _spheres(shape, n=max(6, size // 5), rmin=size / 16, rmax=size / 9, rng=rng)
    chromatin = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), (1, size / 64, size / 64))
    chromatin = (chromatin - chromatin.mean()) / (chromatin.std() + 1e-9)
    spots = np.zeros(shape, np.float32)
    idx = tuple(rng.integers(0, s, max(10, size // 2)) for s in shape)
    spots[idx] = 6.0
    obj = nuclei * (0.75 + 0.12 * chromatin) + spots
    clean = ndimage.gaussian_filter(obj, (max(0.8, depth / 16), size / 128 * 1.2, size / 128 * 1.2))
    clean = np.clip(clean / np.percentile(clean, 99.95), 0, 1.5)
    photons, background, offset, read = 60.0, 4.0, 100.0, 2.0
    expected = photons * clean + background
    noisy = rng.poisson(expected).astype(np.float64) + rng.normal(0, read, shape) + offset
    noisy = np.clip(np.round(noisy), 0, 65535).astype(np.uint16)
    return {"clean": (expected + offset).astype(np.float32), "noisy": noisy}


def make_timelapse(size: int = 128, frames: int | None = None, seed: int = 0) -> dict:
    """A (T, Y, X) time-lapse of drifting, textured fluorescent cells in which whole scan lines
    dropped out (recorded as 0), singly and in bursts; ``mask`` marks the missing lines.

    The cells carry bright granules that move with them, so a missing line is best filled from
    the neighbouring frames (where it was observed), not by smooth interpolation in the frame.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    frames = frames or max(6, size // 8)
    n = max(5, size // 12)
    pos = rng.uniform(0.15 * size, 0.85 * size, (n, 2))
    vel = rng.normal(0, size / 160, (n, 2))
    rad = rng.uniform(size / 18, size / 10, n)
    amp = rng.uniform(0.4, 0.8, n)
    # granules: fixed offsets inside each cell (they travel with it)
    n_gran = 6
    g_off = rng.normal(0, 0.45, (n, n_gran, 2))
    g_amp = rng.uniform(0.3, 0.7, (n, n_gran))
    g_rad = max(0.8, size / 110)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    texture = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), size / 40)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-9)
    clean = np.empty((frames, size, size), np.float32)
    for t in range(frames):
        f = 0.06 + 0.08 * texture
        for i in range(n):
            cy, cx = pos[i] + t * vel[i]
            r = rad[i]
            body = 1.0 / (1.0 + np.exp((np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r) / (0.08 * r + 0.3)))
            f = f + amp[i] * body
            for (oy, ox), ga in zip(g_off[i] * r, g_amp[i]):
                f = f + ga * np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * g_rad**2))
        clean[t] = f
    clean = ndimage.gaussian_filter(clean, (0, 0.6, 0.6))
    clean = clean / clean.max()
    mask = np.zeros(clean.shape, np.uint8)
    for t in range(frames):
        rows = rng.choice(size, size=max(1, size // 14), replace=False)
        mask[t, rows, :] = 1
        for _ in range(2):  # bursts of adjacent lines
            h = int(rng.integers(max(2, size // 24), max(3, size // 10) + 1))
            r0 = int(rng.integers(0, size - h))
            mask[t, r0:r0 + h, :] = 1
    damaged = np.where(mask > 0, 0.0, clean).astype(np.float32)
    return {"clean": clean, "damaged": damaged, "mask": mask}


def make_hyperspectral(size: int = 96, bands: int = 16, sigma: float = 0.08, seed: int = 0) -> dict:
    """A small synthetic hyperspectral cube (bands, Y, X): four materials with smooth spectra,
    mixed by smooth abundance maps, plus Gaussian noise (``sigma`` of the [0, 1] range)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    wl = np.linspace(450.0, 900.0, bands)
    spectra = np.stack([
        0.2 + 0.6 * np.exp(-0.5 * ((wl - 550) / 40) ** 2),          # "vegetation green peak"
        0.1 + 0.7 / (1 + np.exp(-(wl - 700) / 20)),                  # red edge
        0.5 + 0.2 * np.sin((wl - 450) / 80),                          # soil
        0.3 + 0.5 * np.exp(-0.5 * ((wl - 820) / 60) ** 2),           # water-ish / mineral
    ])
    k = spectra.shape[0]
    seeds = ndimage.gaussian_filter(rng.random((k, size, size)).astype(np.float32), (0, size / 10, size / 10))
    seeds = (seeds - seeds.mean(axis=(1, 2), keepdims=True)) / (seeds.std(axis=(1, 2), keepdims=True) + 1e-9)
    ab = np.exp(6.0 * seeds)  # soft-max: fairly crisp regions with mixed borders
    ab /= ab.sum(axis=0, keepdims=True)
    clean = np.tensordot(spectra.T, ab, axes=1).astype(np.float32)  # (bands, Y, X)
    clean = (clean - clean.min()) / (np.ptp(clean) + 1e-9)
    noisy = (clean + rng.normal(0, sigma, clean.shape)).astype(np.float32)
    return {"clean": clean, "noisy": noisy, "wavelengths": wl}


# --------------------------------------------------------------------------- napari samples
def rgb_photo_sample(size: int = 256):
    """RGB photo with painted scratches + the defect mask as a Labels layer (inpainting)."""
    d = make_rgb_photo(size)
    meta = {"description": "scikit-image astronaut with painted scratches; inpaint with the 'defects' mask"}
    return [
        (d["damaged"], {"name": "photo (scratched)", "rgb": True, "metadata": meta}, "image"),
        (d["mask"], {"name": "defects", "opacity": 0.5}, "labels"),
    ]


def zstack_sample(size: int = 128):
    """Noisy fluorescence Z-stack (denoising), anisotropic voxels in micrometres."""
    d = make_zstack(size)
    scale = (0.5, 0.2, 0.2)
    return [(d["noisy"], {
        "name": "nuclei (noisy)", "scale": scale, "axis_labels": ("z", "y", "x"),
        "units": "um", "colormap": "green", "blending": "additive",
        "metadata": {"description": "synthetic nuclei, Poisson + read noise, uint16 counts"},
    }, "image")]


def timelapse_sample(size: int = 128):
    """Time-lapse with dropped scan lines + the missing-line mask as a Labels layer (inpainting)."""
    d = make_timelapse(size)
    return [
        (d["damaged"], {"name": "time-lapse", "axis_labels": ("t", "y", "x"),
                        "colormap": "magma",
                        "metadata": {"description": "synthetic drifting cells; dropped lines are 0"}}, "image"),
        (d["mask"], {"name": "missing lines", "axis_labels": ("t", "y", "x"), "opacity": 0.4}, "labels"),
    ]


def hyperspectral_sample(size: int = 96):
    """Small noisy hyperspectral cube (band, Y, X) as one layer (denoising across bands)."""
    d = make_hyperspectral(size)
    return [(d["noisy"], {
        "name": "hyperspectral (noisy)", "axis_labels": ("band", "y", "x"), "colormap": "gray",
        "metadata": {"description": "synthetic 4-material cube, Gaussian noise sigma 0.08",
                     "axes": "CYX", "wavelengths_nm": d["wavelengths"].tolist()},
    }, "image")]
