"""Restore a bundled photo end to end and write the results (the README's first command).

Takes scikit-image's astronaut (shipped with scikit-image, no download), paints scratches
over it (an explicit defect mask) and adds noise to a second copy, restores both with
napari-ngr's defaults, prints PSNR before/after and writes TIFFs and a side-by-side PNG to
``demo_output/`` (or the folder given as the first argument).

    python sample_data/demo.py [OUTPUT_DIR] [--device auto|cpu|cuda]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage import data, draw
from skimage.io import imsave
from skimage.metrics import peak_signal_noise_ratio
from skimage.transform import resize

import napari_ngr


def scratch_mask(shape, n=14, seed=0):
    """Random thick strokes, like a Labels layer painted over defects (True = missing)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for _ in range(n):
        r0, c0, r1, c1 = rng.integers(0, shape[0], 4)
        rr, cc = draw.line(r0, c0, r1, c1)
        for d in range(-1, 2):
            mask[np.clip(rr + d, 0, shape[0] - 1), cc] = True
    return mask


def _progress(task):
    """Print progress in place on a terminal, every 50 iterations otherwise."""
    tty = sys.stdout.isatty()

    def show(rec):
        if tty:
            print(f"\r{task}: iteration {rec.iteration}/{rec.total}", end="", flush=True)
        elif rec.iteration % 50 == 0:
            print(f"{task}: iteration {rec.iteration}/{rec.total}", flush=True)

    return show


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", default="demo_output")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    clean = (resize(data.astronaut(), (256, 256), anti_aliasing=True) * 255).astype(np.uint8)
    mask = scratch_mask(clean.shape[:2])
    damaged = clean.copy()
    damaged[mask] = 0
    t = time.perf_counter()
    job = napari_ngr.prepare_inpaint(damaged, mask, channel_axis=-1, device=args.device)
    res = job.run(_progress("inpaint"))
    print(f"\rinpaint: {res.iteration} iterations on {job.device} in {time.perf_counter() - t:.1f} s, "
          f"returned iteration {res.best_iteration} ({res.stop_reason}; start: {res.start})")
    psnr = lambda x: peak_signal_noise_ratio(clean, np.clip(x, 0, 255).astype(np.float64), data_range=255)  # noqa: E731
    print(f"  PSNR damaged {psnr(damaged):.2f} dB -> restored {psnr(res.image):.2f} dB")
    restored = np.clip(np.round(res.image), 0, 255).astype(np.uint8)

    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    t = time.perf_counter()
    job = napari_ngr.prepare_denoise(noisy, channel_axis=-1, device=args.device)
    dres = job.run(_progress("denoise"))
    what = f"returned iteration {dres.best_iteration}" if dres.nlmeans_weight < 1 else dres.nlmeans_note
    if 0 < dres.nlmeans_weight < 1:
        what += f"; {dres.nlmeans_note}"
    weight = f", data weight x{dres.final_weight:g} (chosen on held-out pixels)" if dres.final_weight else ""
    print(f"\rdenoise: {dres.iteration} iterations in {time.perf_counter() - t:.1f} s, {what} "
          f"({dres.stop_reason}), estimated sigma {dres.sigma:.1f} (true 20){weight}")
    print(f"  PSNR noisy {psnr(noisy):.2f} dB -> denoised {psnr(dres.image):.2f} dB")
    denoised = np.clip(np.round(dres.image), 0, 255).astype(np.uint8)

    tifffile.imwrite(out / "astronaut_scratched.tif", damaged, photometric="rgb")
    tifffile.imwrite(out / "astronaut_inpainted.tif", restored, photometric="rgb")
    tifffile.imwrite(out / "astronaut_noisy.tif", noisy, photometric="rgb")
    tifffile.imwrite(out / "astronaut_denoised.tif", denoised, photometric="rgb")
    panel = np.concatenate([np.concatenate([damaged, restored], 1), np.concatenate([noisy, denoised], 1)], 0)
    imsave(out / "demo_panel.png", panel, check_contrast=False)
    print(f"wrote {out}/astronaut_*.tif and {out}/demo_panel.png")


if __name__ == "__main__":
    main()
