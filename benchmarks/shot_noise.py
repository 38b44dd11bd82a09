"""Shot (Poisson-Gaussian) noise: ``denoise(noise="poisson")`` against the Gaussian default.

    python benchmarks/shot_noise.py        # about 8 minutes on 2 CPU cores

For each case the same noisy image is denoised twice with the defaults (``sigma=None``): as
Gaussian noise (``noise="gaussian"``, one level estimated by ``noise_rms``) and as shot noise
(``noise="poisson"``: the model ``variance = gain * value + offset`` fitted per channel, the
generalized Anscombe transform, Gaussian denoising, the unbiased inverse). PSNR (dB) against the
clean image over its data range; the ground truth only scores. Printed: the fitted gain (input
units) next to the true one, and the seconds of each run.

Cases (no download): scikit-image photos in [0, 1] with Poisson noise of peak 30 and 100 photons
(``Poisson(peak * clean) / peak``, true gain ``1 / peak``); the plugin's synthetic fluorescence
Z-stack (uint16 counts: 60 photons at the brightest, background 4, offset 100, read noise 2, gain
1), whole and one plane; and two photos with Gaussian noise, to show what ``noise="poisson"``
does where the noise does not grow with the signal (it should find a gain of 0 and change little).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _data  # noqa: E402

import napari_ngr  # noqa: E402
from napari_ngr import _sample_data  # noqa: E402


def _photo(name):
    from skimage import data
    from skimage.transform import resize

    a = getattr(data, name)()
    a = a / 255.0 if a.dtype == np.uint8 else a
    shape = (256, 256) + a.shape[2:]
    return resize(a, shape, anti_aliasing=True).astype(np.float32)


def _psnr(gt, x):
    gt = np.asarray(gt, np.float64)
    return 10 * np.log10((gt.max() - gt.min()) ** 2 / np.mean((gt - np.asarray(x, np.float64)) ** 2))


def measure(label, gt, noisy, true_gain, **kw):
    t = time.perf_counter()
    gauss = napari_ngr.denoise(noisy, **kw)
    t_g = time.perf_counter() - t
    t = time.perf_counter()
    res = napari_ngr.prepare_denoise(noisy, noise="poisson", **kw).run()
    t_p = time.perf_counter() - t
    gains = " / ".join(f"{g:.3g}" for g, _ in res.noise_variance)
    pg, pp = _psnr(gt, gauss), _psnr(gt, res.image)
    cells = [f"**{v:.2f}**" if v == max(pg, pp) else f"{v:.2f}" for v in (pg, pp)]  # the better one in bold
    print(f"| {label} | {_psnr(gt, noisy):.2f} | {cells[0]} | {cells[1]} | {gains} ({true_gain}) | {res.method} | "
          f"{t_g:.0f} / {t_p:.0f} |", flush=True)


def main():
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    print(f"napari-ngr {napari_ngr.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| case | noisy dB | noise=\"gaussian\" dB | noise=\"poisson\" dB | fitted gain (true) | poisson: method "
          "| s (gaussian / poisson) |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in ("coffee", "astronaut", "camera", "moon"):
        gt = _photo(name)
        for peak in (30, 100):
            noisy = (rng.poisson(gt * peak) / peak).astype(np.float32)
            measure(f"{name} 256², Poisson peak {peak}", gt, noisy, f"{1 / peak:.3g}",
                    channel_axis=-1 if gt.ndim == 3 else None)
    d = _sample_data.make_zstack(128)
    measure("Z-stack sample 21 x 128² (uint16)", d["clean"], d["noisy"], "1", axes="ZYX")
    measure("Z-stack sample, plane 10", d["clean"][10], d["noisy"][10], "1")
    gt = _data.astronaut256()
    measure("astronaut RGB, Gaussian σ = 0.1", gt, _data.noisy(gt, 0.1), "0", channel_axis=-1)
    gt = _photo("camera")
    measure("camera, Gaussian σ = 0.05", gt, (gt + rng.normal(0, 0.05, gt.shape)).astype(np.float32), "0")


if __name__ == "__main__":
    main()
