"""Shared trunk with one head per axis vs three independent networks (the reference's choice),
at the same width and iterations, on astronaut 256² RGB denoising (sigma 0.1) and on the
camera-pan video (denoising sigma 0.1, inpainting with 20 % observed).

    python benchmarks/network_ablation.py
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _data  # noqa: E402

import napari_ngr  # noqa: E402


def run(img, gt, kw, shared):
    kw = dict(kw)
    mask = kw.pop("mask", None)
    if mask is None:
        # a fixed budget (the former default), not the discrepancy stop: the same iterations for both
        job = napari_ngr.prepare_denoise(img, sigma=0.1, shared_trunk=shared, iterations=250, discrepancy=0, **kw)
    else:
        job = napari_ngr.prepare_inpaint(img, mask, shared_trunk=shared, **kw)
    params = sum(p.numel() for p in job._r.net.parameters())
    t = time.perf_counter()
    res = job.run()
    return _data.psnr(gt, res.image), time.perf_counter() - t, params, res.iteration


def main():
    torch.set_num_threads(2)
    gt = _data.astronaut256()
    vid = _data.camera_pan()
    cases = [("astronaut RGB sigma 0.1", _data.noisy(gt, 0.1), gt, dict(channel_axis=-1)),
             ("camera pan TYX sigma 0.1", _data.noisy(vid, 0.1), vid, dict(axes="TYX"))]
    missing = np.random.default_rng(7).random(vid.shape) >= 0.2
    cases.append(("camera pan TYX inpaint 20% observed", np.where(missing, 0.0, vid), vid,
                  dict(axes="TYX", mask=missing)))
    print("| case | network | parameters | PSNR dB | s | iterations |")
    print("|---|---|---|---|---|---|")
    for name, img, g, kw in cases:
        for shared in (True, False):
            p, t, n, it = run(img, g, kw, shared)
            label = "shared trunk + 1 head per axis" if shared else "3 separate nets (reference)"
            print(f"| {name} | {label} | {n:,} | {p:.2f} | {t:.1f} | {it} |")


if __name__ == "__main__":
    main()
