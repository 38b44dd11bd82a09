"""Benchmark data, rebuilt exactly as defined in shared/research/peers_quality.md."""

import numpy as np
from skimage import data
from skimage.transform import resize


def astronaut256():
    return resize(data.astronaut(), (256, 256), anti_aliasing=True).astype(np.float64)


def observed_mask(rate, shape=(256, 256)):
    """True = observed; the same mask for all channels (nested across rates)."""
    return np.random.default_rng(2024).random(shape) < rate


def observed_entries(rate, shape=(256, 256, 3)):
    """True = observed; drawn independently per entry (per channel), as the NGR paper samples."""
    return np.random.default_rng(2024).random(shape) < rate


def noisy(gt, sigma):
    return gt + np.random.default_rng(2024).normal(0, sigma, gt.shape)


def camera_pan(T=16, size=128):
    cam = resize(data.camera().astype(np.float64) / 255.0, (256, 256), anti_aliasing=True)
    return np.stack([cam[t:t + size, 2 * t:2 * t + size] for t in range(T)])


def astronaut_pan(T=24, size=256):
    """A (T, size, size) grey video panning down and right over the 512² astronaut (3 and 2 px a frame)."""
    img = data.astronaut().astype(np.float64).mean(-1) / 255.0
    return np.stack([img[3 * t:3 * t + size, 100 + 2 * t:100 + 2 * t + size] for t in range(T)])


def psnr(gt, x):
    from skimage.metrics import peak_signal_noise_ratio

    return peak_signal_noise_ratio(gt, np.asarray(x, np.float64), data_range=1)


def hsi_cube(bands=31, size=128, endmembers=5, seed=0):
    """A synthetic hyperspectral cube (bands, size, size) in [0, 1].

    No real cube ships offline, so one is built the way such scenes are usually modelled: a
    linear mixture of ``endmembers`` smooth reflectance spectra (sums of broad Gaussian bumps
    over the wavelength axis) with abundance maps that are smooth random fields (Gaussian-filtered
    noise through a softmax, so they sum to one) plus sharp objects (rectangles and disks of a
    single material: fields, roofs, roads, ponds), and a smooth illumination field.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    wl = np.linspace(0, 1, bands)
    spectra = []
    for _ in range(endmembers):
        s = np.full(bands, rng.uniform(0.05, 0.2))
        for _ in range(3):
            c, w, a = rng.uniform(-0.1, 1.1), rng.uniform(0.08, 0.35), rng.uniform(0.1, 0.6)
            s = s + a * np.exp(-0.5 * ((wl - c) / w) ** 2)
        spectra.append(s)
    spectra = np.array(spectra)  # (E, B)
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 12, mode="wrap") for _ in
                       range(endmembers)])
    logits = 4.0 * logits / logits.std()
    ab = np.exp(logits - logits.max(0))
    ab /= ab.sum(0)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(12):  # sharp objects of one material
        e = rng.integers(endmembers)
        if rng.random() < 0.5:
            y0, x0 = rng.integers(0, size - size // 8, 2)
            h, w = rng.integers(size // 16, size // 4, 2)
            obj = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        else:
            cy, cx = rng.integers(0, size, 2)
            obj = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(size // 32 + 1, size // 8) ** 2
        ab[:, obj] = 0.0
        ab[e, obj] = 1.0
    illum = 0.8 + 0.2 * ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 4, mode="wrap") / 0.05
    illum = np.clip(illum, 0.6, 1.2)
    cube = np.einsum("eb,eyx->byx", spectra, ab) * illum
    cube = (cube - cube.min()) / (cube.max() - cube.min())
    return cube.astype(np.float64)


def mixed_noise(cube, seed=0, sigma=(0.1, 0.2), impulse=0.1, stripe_bands=1 / 3, stripes=(20, 40),
                stripe_amp=0.25, dead_bands=0.0, dead_lines=(5, 15)):
    """The paper's mixed noise on a (B, H, W) cube in [0, 1].

    Gaussian noise with a per-band sigma drawn from ``sigma``; salt-and-pepper impulses on a
    fraction ``impulse`` of all entries; on a fraction ``stripe_bands`` of the bands, between
    ``stripes`` columns shifted by a constant drawn from U[-stripe_amp, stripe_amp]; on a fraction
    ``dead_bands`` of the bands, ``dead_lines`` whole columns set to 0 (dead lines). Returns the noisy
    cube and the per-band sigma.
    """
    rng = np.random.default_rng(seed)
    B, H, W = cube.shape
    sig = rng.uniform(sigma[0], sigma[1], B)
    y = cube + sig[:, None, None] * rng.normal(size=cube.shape)
    imp = rng.random(cube.shape) < impulse
    y[imp] = rng.integers(0, 2, int(imp.sum())).astype(np.float64)
    for b in rng.permutation(B)[: int(round(stripe_bands * B))]:
        cols = rng.choice(W, rng.integers(stripes[0], stripes[1] + 1), replace=False)
        y[b][:, cols] += rng.uniform(-stripe_amp, stripe_amp, len(cols))
    for b in rng.permutation(B)[: int(round(dead_bands * B))]:
        cols = rng.choice(W, rng.integers(dead_lines[0], dead_lines[1] + 1), replace=False)
        y[b][:, cols] = 0.0
    return y, sig
