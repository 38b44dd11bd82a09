"""Shot (Poisson-Gaussian) noise: the noise-model fit, the variance-stabilizing transform and
``denoise(noise="poisson")`` on photon-count images."""

import numpy as np
import pytest

import napari_ngr
from conftest import psnr
from napari_ngr.api import _Scaler
from napari_ngr.operators import fit_noise_variance

GAIN, OFFSET, READ = 2.0, 100.0, 2.0  # counts per photon, dark level and read noise (counts)


def _counts(clean01, peak, seed=0):
    """A uint16 detector image: ``OFFSET + GAIN * Poisson(peak * clean) + N(0, READ)``; its noise
    variance is ``GAIN * (value - OFFSET) + READ**2``."""
    rng = np.random.default_rng(seed)
    photons = rng.poisson(peak * clean01)
    y = OFFSET + GAIN * photons + rng.normal(0.0, READ, clean01.shape)
    return np.clip(np.round(y), 0, 65535).astype(np.uint16), OFFSET + GAIN * peak * clean01


@pytest.fixture(scope="module")
def camera64():
    from skimage import data
    from skimage.transform import resize

    return resize(data.camera()[40:360, 100:420] / 255.0, (64, 64), anti_aliasing=True)


def test_fit_recovers_the_gain_of_shot_noise_and_finds_none_in_gaussian_noise():
    from skimage import data
    from skimage.transform import resize

    clean = resize(data.camera() / 255.0, (128, 128), anti_aliasing=True)
    rng = np.random.default_rng(0)
    for peak in (20, 100):
        a, b = fit_noise_variance([rng.poisson(peak * clean) / peak])
        assert abs(a * peak - 1) < 0.15, f"peak {peak}: fitted gain {a:.4g}, true {1 / peak:.4g}"
    a, b = fit_noise_variance([clean + rng.normal(0, 0.1, clean.shape)])
    assert b == pytest.approx(0.01, rel=0.2)
    assert abs(a) * clean.mean() < 0.1 * b  # the signal-dependent part: under 10 % of the variance
    with pytest.raises(ValueError, match="too few pixels"):
        fit_noise_variance([clean[:12, :12]])


@pytest.mark.parametrize("lam", [3.0, 10.0, 40.0])
def test_inverse_transform_is_unbiased_at_low_counts(lam):
    """The mean of the transformed Poisson counts maps back to their mean (Makitalo and Foi's
    unbiased inverse): the algebraic inverse of the Anscombe transform is off by about 1/4 count."""
    z = np.random.default_rng(1).poisson(lam, (1, 1, 256, 256)).astype(np.float32)
    sc = _Scaler(z, None)
    y = sc.forward(z)
    t, _ = sc.stabilize(y, [(1.0 / sc.scale, 0.0)])  # Poisson: variance = value (counts)
    back = sc.back(np.full((1, 1, 1, 1), t.mean(), np.float32))
    assert abs(float(back.ravel()[0]) - lam) < 0.05 * lam + 0.05, f"{float(back.ravel()[0]):.3f} vs {lam}"
    # and the transform's round trip at high counts is within the inverse's 1/4-count shift
    smooth = np.linspace(200, 400, 64 * 64, dtype=np.float32).reshape(1, 1, 64, 64)
    sc2 = _Scaler(smooth, None)
    t2, _ = sc2.stabilize(sc2.forward(smooth), [(1.0 / sc2.scale, 0.0)])
    np.testing.assert_allclose(sc2.back(t2), smooth, atol=0.5)


def test_denoise_poisson_beats_the_input_and_reports_the_fitted_model(camera64):
    noisy, clean = _counts(camera64, peak=20)
    before = noisy.copy()
    job = napari_ngr.prepare_denoise(noisy, noise="poisson", iterations=40, seed=0)
    res = job.run()
    assert res.image.dtype == np.float32 and res.image.shape == noisy.shape
    np.testing.assert_array_equal(noisy, before)
    assert res.sigma is None and len(res.noise_variance) == 1
    gain, offset = res.noise_variance[0]
    assert gain == pytest.approx(GAIN, rel=0.3)
    # the variance at the dark level is the read noise's (4 counts^2), up to the fit's error
    assert abs(gain * OFFSET + offset - READ ** 2) < 0.3 * GAIN * OFFSET
    gain_db = psnr(clean, res.image) - psnr(clean, noisy)
    assert gain_db > 6, f"only {gain_db:.1f} dB over the noisy counts"
    assert 100 < float(res.image.mean()) < 200  # input units (counts), not the transformed domain
    again = napari_ngr.denoise(noisy, noise="poisson", iterations=40, seed=0)
    np.testing.assert_array_equal(again, res.image)
    _, grads = napari_ngr.denoise(noisy, noise="poisson", iterations=4, return_gradients=True)
    out = napari_ngr.denoise(noisy, noise="poisson", iterations=4)
    np.testing.assert_allclose(grads["x"][:, :-1], np.diff(out, axis=1), atol=1e-3 * float(np.ptp(out)))


def test_denoise_poisson_on_a_stack_and_channels(camera64, stack):
    zs, zclean = _counts(stack, peak=30, seed=2)
    out = napari_ngr.denoise(zs, noise="poisson", iterations=30)
    assert psnr(zclean, out) > psnr(zclean, zs) + 5
    # two channels of different gain, each fitted on its own
    rng = np.random.default_rng(3)
    two = np.stack([rng.poisson(30 * camera64) / 30, rng.poisson(10 * camera64) * 2.0], axis=-1).astype(np.float32)
    job = napari_ngr.prepare_denoise(two, channel_axis=-1, noise="poisson", iterations=4)
    gains = [g for g, _ in job.noise_variance]
    assert gains[0] == pytest.approx(1 / 30, rel=0.3) and gains[1] == pytest.approx(2.0, rel=0.3)


def test_gaussian_noise_through_the_poisson_model_is_only_scaled(gray48):
    """Noise that does not grow with the signal: the channel is scaled, not transformed, and the
    result matches Gaussian denoising closely."""
    noisy = (gray48 + np.random.default_rng(0).normal(0, 0.1, gray48.shape)).astype(np.float32)
    job = napari_ngr.prepare_denoise(noisy, noise="poisson", iterations=30)
    assert job.noise_variance[0][0] == 0.0 and job.noise_variance[0][1] == pytest.approx(0.01, rel=0.3)
    out = job.run().image
    ref = napari_ngr.denoise(noisy, iterations=30)
    assert psnr(gray48, out) > psnr(gray48, ref) - 0.5 and psnr(gray48, out) > psnr(gray48, noisy) + 5


def test_poisson_argument_errors(gray48):
    with pytest.raises(ValueError, match="sigma must be None with noise='poisson'"):
        napari_ngr.denoise(gray48, noise="poisson", sigma=0.1, iterations=2)
    with pytest.raises(ValueError, match="'gaussian', 'poisson' or 'mixed'"):
        napari_ngr.denoise(gray48, noise="shot", iterations=2)
    with pytest.raises(ValueError, match="too few pixels"):
        napari_ngr.denoise(gray48[:16, :16], noise="poisson", iterations=2)


def test_noise_free_images_through_the_poisson_model_come_back():
    """A noise-free ramp fits a vanishing gain (1e-33 here before the floor): it must be scaled,
    not transformed (the transform's offsets would swamp float precision), and come back intact."""
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    job = napari_ngr.prepare_denoise(ramp, noise="poisson", iterations=3)
    assert job.noise_variance[0][0] == 0.0
    np.testing.assert_allclose(job.run().image, ramp, atol=1e-3)
    flat = np.full((40, 40), 7.0, np.float32)
    np.testing.assert_allclose(napari_ngr.denoise(flat, noise="poisson", iterations=3), flat, atol=1e-3)
