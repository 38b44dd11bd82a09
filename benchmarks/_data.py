"""Benchmark data, rebuilt exactly as defined in shared/research/peers_quality.md."""

import numpy as np
from skimage import data
from skimage.transform import resize


def astronaut256():
    return resize(data.astronaut(), (256, 256), anti_aliasing=True).astype(np.float64)


def observed_mask(rate, shape=(256, 256)):
    """True = observed; the same mask for all channels (nested across rates)."""
    return np.random.default_rng(2024).random(shape) < rate


def noisy(gt, sigma):
    return gt + np.random.default_rng(2024).normal(0, sigma, gt.shape)


def camera_pan(T=16, size=128):
    cam = resize(data.camera().astype(np.float64) / 255.0, (256, 256), anti_aliasing=True)
    return np.stack([cam[t:t + size, 2 * t:2 * t + size] for t in range(T)])


def psnr(gt, x):
    from skimage.metrics import peak_signal_noise_ratio

    return peak_signal_noise_ratio(gt, np.asarray(x, np.float64), data_range=1)
