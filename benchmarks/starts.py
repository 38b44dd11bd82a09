"""The inpainting start: biharmonic interpolation against the sparse block-DCT fill and the nonlocal
patch-group fill, and which one ``start="auto"`` keeps (judged on the held-out entries only). Cheap:
no NGR iteration is run.

    python benchmarks/starts.py        # about 5 minutes on 2 CPU cores

For each case, both fills are built as the solver builds them (the held-out entries imputed, their
values unseen), then every observed entry is re-inserted and the PSNR (dB, over the whole image,
data range of the clean image) is taken against the ground truth, which only scores. Printed: the
PSNRs, the fill chosen, the held-out mean squared errors ("-": the nonlocal fill does not apply,
e.g. more than 16 channels), and the seconds `prepare_inpaint` took (all fills, the held-out choice,
the network; the script then builds the fills once more to score them, untimed).

Cases (no download): the astronaut and two other scikit-image colour photos with whole pixels
observed at random, the astronaut with entries observed independently per channel, four grey
photos, the camera-pan video, the plugin's synthetic Z-stack, time-lapse and RGB samples (random
pixels, dropped scan lines, painted scratches) and a 31-band synthetic hyperspectral cube.
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


def _resized(name):
    from skimage import data
    from skimage.transform import resize

    a = getattr(data, name)()
    a = a / 255.0 if a.dtype == np.uint8 else a
    return resize(a, (256, 256), anti_aliasing=True).astype(np.float64)


def _score(gt, x, missing, rng):
    x = np.where(missing, x, gt)
    return 10 * np.log10(rng**2 / np.mean((np.asarray(gt, np.float64) - x) ** 2))


def measure(label, gt, missing, **kw):
    """The fills and the choice for one case; ``missing`` has ``gt``'s shape (True = missing)."""
    gt = np.asarray(gt, np.float64)
    rng = gt.max() - gt.min()
    t = time.perf_counter()
    job = napari_ngr.prepare_inpaint(np.where(missing, 0.0, gt), missing, iterations=1, **kw)
    seconds = time.perf_counter() - t  # the solver's preparation: fills, choice, network
    r = job._r
    cands = r.operator.start_candidates()  # built again to score them (the solver keeps only its choice)
    psnr = {k: _score(gt, job._to_user(v), missing, rng) for k, v in cands.items()}
    err = r.start_errors
    nl = f"{psnr['nonlocal']:.2f}" if "nonlocal" in psnr else "-"
    errs = " / ".join(f"{err[k] * 1e4:.2f}" if k in err else "-" for k in ("biharmonic", "dct", "nonlocal"))
    print(f"| {label} | {psnr['biharmonic']:.2f} | {psnr['dct']:.2f} | {nl} | {r.start_name} | {errs} | "
          f"{seconds:.1f} |", flush=True)
    return psnr, r.start_name


def main():
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    print(f"napari-ngr {napari_ngr.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| case | biharmonic dB | DCT fill dB | nonlocal fill dB | chosen | held-out MSE x1e-4 "
          "(biharmonic / DCT / nonlocal) | s to prepare |")
    print("|---|---|---|---|---|---|---|")
    gt = _data.astronaut256()
    for rate in (0.1, 0.3, 0.5):
        miss = np.broadcast_to(~_data.observed_mask(rate)[..., None], gt.shape)
        measure(f"astronaut RGB, {int(rate * 100)} % of pixels observed", gt, miss, channel_axis=-1)
    for rate in (0.1, 0.3):
        measure(f"astronaut RGB, {int(rate * 100)} % of entries observed (per channel)", gt,
                ~_data.observed_entries(rate), channel_axis=-1)
    for name in ("chelsea", "coffee"):
        img = _resized(name)
        for rate in (0.1, 0.3):
            obs = np.random.default_rng(3).random(img.shape[:2]) < rate
            measure(f"{name} RGB, {int(rate * 100)} % of pixels observed", img,
                    np.broadcast_to(~obs[..., None], img.shape), channel_axis=-1)
    for name in ("camera", "moon", "coins", "brick"):
        img = _resized(name)
        measure(f"{name} grey, 20 % observed", img, np.random.default_rng(4).random(img.shape) >= 0.2)
    vid = _data.camera_pan()
    measure("camera-pan video 16 x 128², 20 % observed", vid, np.random.default_rng(7).random(vid.shape) >= 0.2,
            axes="TYX")
    z = _sample_data.make_zstack(128)["clean"].astype(np.float64)
    measure("Z-stack sample (clean) 21 x 128², 20 % observed", z, np.random.default_rng(5).random(z.shape) >= 0.2,
            axes="ZYX")
    d = _sample_data.make_timelapse(128)
    tl = d["clean"].astype(np.float64)
    measure("time-lapse sample 16 x 128², 20 % observed", tl, np.random.default_rng(5).random(tl.shape) >= 0.2,
            axes="TYX")
    measure("time-lapse sample, dropped scan lines", tl, np.broadcast_to(d["mask"] > 0, tl.shape), axes="TYX")
    d = _sample_data.make_rgb_photo(256)
    ph = d["clean"].astype(np.float64)
    m = d["mask"] > 0
    measure("RGB photo sample, painted scratches", ph, np.broadcast_to(m[..., None] if m.ndim == 2 else m, ph.shape),
            channel_axis=-1)
    cube = _data.hsi_cube(31, 128, seed=1)
    measure("HSI 31 bands 128², 10 % of entries observed", cube, np.random.default_rng(6).random(cube.shape) >= 0.1,
            channel_axis=0)


if __name__ == "__main__":
    main()
