"""The paper's other tasks (issue 6): mixed-noise hyperspectral denoising, and video and
many-band inpainting with random pixels and dead lines. Defaults only; peers in the same run.

    python benchmarks/tasks.py                 # everything (about 30 min on 2 CPU cores)
    python benchmarks/tasks.py --quick         # 31 bands and the video only (about 12 min)
    python benchmarks/tasks.py --no-bm4d       # skip BM4D (non-commercial licence, slow)
    python benchmarks/tasks.py --inpainting    # only the inpainting rows (13 min on 2 AVX512-BF16 cores)
    python benchmarks/tasks.py --precision bfloat16  # the network's arithmetic for every row (default: auto)

Data (no download; ``_data.py``): hyperspectral cubes are synthetic (``hsi_cube``: 5 smooth
reflectance spectra mixed by smooth random abundance maps, plus sharp single-material objects and
an illumination field), 128 x 128 px, 31 and 191 bands; mixed noise at the paper's settings
(``mixed_noise``: Gaussian sigma per band in [0.1, 0.2], 10 % salt-and-pepper, stripes on a third of
the bands; optionally dead columns). The video is the camera-pan stack of
``shared/research/peers_quality.md`` (16 frames, 128 x 128).

Prints a markdown table: PSNR (dB, data range 1, unclipped), seconds, and notes (for NGR the
returned iteration). Peers: median 3x3, median + 3-D TV with an oracle weight (best of a grid,
scored against the ground truth: an upper bound for TV), BM4D (``pip install bm4d``, benchmark only)
on the median-filtered cube with the true mean sigma (31 bands only: on 191 bands it is too slow
for this table); per-slice biharmonic for inpainting
(N-D biharmonic did not finish in 5 min on the 16 x 128 x 128 video: not run).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _data  # noqa: E402

import napari_ngr  # noqa: E402
import _precision  # noqa: E402


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def hsi_denoise_rows(bands, dead_bands, use_bm4d, device):
    from scipy import ndimage
    from skimage.restoration import denoise_tv_chambolle

    gt = _data.hsi_cube(bands, 128)
    y, sig = _data.mixed_noise(gt, dead_bands=dead_bands)
    case = f"HSI {bands} bands 128^2, mixed noise" + (f" + dead lines on {int(dead_bands * 100)} % of bands"
                                                      if dead_bands else "")
    rows = [(case, "noisy", _data.psnr(gt, y), float("nan"), "")]
    job = napari_ngr.prepare_denoise(y, channel_axis=0, noise="mixed", device=device)
    res, tn = timed(job.run)
    rows.append(("", "NGR (noise='mixed', sigma estimated)", _data.psnr(gt, res.image), tn,
                 f"it {res.iteration}; sigma^ median {res.sigma:.3f}"))
    job = napari_ngr.prepare_denoise(y, channel_axis=0, noise="mixed", destripe=False, device=device)
    res, tn = timed(job.run)
    rows.append(("", "NGR, impulses only (no stripe/dead-line model)", _data.psnr(gt, res.image), tn, "ablation"))
    med, tm = timed(ndimage.median_filter, y, size=(1, 3, 3))
    rows.append(("", "median 3x3", _data.psnr(gt, med), tm, ""))
    best = max((_data.psnr(gt, denoise_tv_chambolle(med, weight=w)), w) for w in (0.05, 0.1, 0.15, 0.2, 0.3))
    rows.append(("", "median 3x3 + 3-D TV, oracle weight", best[0], float("nan"), f"w={best[1]}"))
    if use_bm4d:
        try:
            import bm4d
        except ImportError:
            rows.append(("", "BM4D", float("nan"), float("nan"), "not installed"))
        else:
            out, tb = timed(bm4d.bm4d, med.transpose(1, 2, 0), float(np.mean(sig)))
            rows.append(("", "median 3x3 + BM4D (true mean sigma)", _data.psnr(gt, out.transpose(2, 0, 1)), tb, ""))
            out, tb = timed(bm4d.bm4d, y.transpose(1, 2, 0), float(np.mean(sig)))
            rows.append(("", "BM4D on the noisy cube (true mean sigma)", _data.psnr(gt, out.transpose(2, 0, 1)), tb, ""))
    return rows


def inpaint_rows(label, gt, observed, device, **kw):
    from skimage.restoration import inpaint_biharmonic

    img = np.where(observed, gt, 0.0)
    job = napari_ngr.prepare_inpaint(img, ~observed, device=device, **kw)
    res, tn = timed(job.run)
    bh, tb = timed(lambda: np.stack([inpaint_biharmonic(f, ~o) if (~o).any() else f for f, o in zip(img, observed)]))
    return [(label, "NGR", _data.psnr(gt, res.image), tn, f"it {res.best_iteration}/{res.iteration}, start {res.start}"),
            ("", "biharmonic per slice", _data.psnr(gt, bh), tb, "")]


def dead_columns(shape, band_fraction, n_cols, rng):
    """True = missing: ``n_cols`` whole columns on a fraction of the slices."""
    miss = np.zeros(shape, bool)
    for b in rng.permutation(shape[0])[: int(round(band_fraction * shape[0]))]:
        miss[b][:, rng.choice(shape[2], n_cols, replace=False)] = True
    return miss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bm4d", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--inpainting", action="store_true", help="only the inpainting rows")
    _precision.add_argument(ap)
    args = ap.parse_args(argv)
    _precision.apply(args)
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = _Rows()
    print(f"napari-ngr {napari_ngr.__version__}, device={args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {_precision.describe(args)}\n")
    print("| case | method | PSNR dB | s | note |")
    print("|---|---|---|---|---|", flush=True)
    bands = [31] if args.quick else [31, 191]
    if not args.inpainting:  # the denoising rows draw nothing from the inpainting rows' generator
        for b in bands:
            rows += hsi_denoise_rows(b, 0.0, b < 100 and not args.no_bm4d, args.device)
        rows += hsi_denoise_rows(31, 0.2, False, args.device)

    vid = _data.camera_pan()
    rng = np.random.default_rng(7)
    for rate in (0.1, 0.2):
        obs = rng.random(vid.shape) < rate
        rows += inpaint_rows(f"camera pan 16x128^2, {int(rate * 100)} % observed", vid, obs, args.device, axes="TYX")
    miss = dead_columns(vid.shape, 1.0, 26, rng)
    rows += inpaint_rows("camera pan 16x128^2, 20 % of columns dead in every frame", vid, ~miss, args.device, axes="TYX")

    for b in bands:
        cube = _data.hsi_cube(b, 128, seed=1)
        for rate in (0.1, 0.2) if b < 100 else (0.1,):
            obs = rng.random(cube.shape) < rate
            rows += inpaint_rows(f"HSI {b} bands 128^2, {int(rate * 100)} % of entries observed", cube, obs,
                                 args.device, channel_axis=0)
        miss = dead_columns(cube.shape, 1 / 3, 15, rng) | (rng.random(cube.shape) < 0.5)
        if b < 100:
            rows += inpaint_rows(f"HSI {b} bands 128^2, 50 % observed + 15 dead columns on 1/3 of bands", cube,
                                 ~miss, args.device, channel_axis=0)


class _Rows(list):
    """Prints each group of rows as soon as it is measured."""

    def __iadd__(self, new):
        for case, m, p, t, note in new:
            ts = "" if t != t else f"{t:.1f}"
            print(f"| {case} | {m} | {p:.2f} | {ts} | {note} |", flush=True)
        self.extend(new)
        return self


if __name__ == "__main__":
    main()
