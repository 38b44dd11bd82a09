"""Decloud table: napari-ngr's ``decloud`` (defaults only) against per-date biharmonic
inpainting and the temporal fill, on synthetic multi-temporal scenes, peers computed in the same run.

    python benchmarks/decloud.py             # every case (about 2-3 min on 1 CPU thread)
    python benchmarks/decloud.py --quick     # the first case only

No satellite series ships offline, so the scenes are built in code from bundled scikit-image
images (:func:`make_scene`): a colour photo crop gives three bands (a fourth, "near-infrared"
band mixes them with the grass texture), and every date differs from the others by

* a per-band gain and offset (season, sensor calibration),
* a smooth multiplicative illumination field (haze, sun angle), different per date,
* land-cover changes: a few patches that change to another texture (gravel, brick, grass) from
  a random date on,
* Gaussian noise (sigma = 0.01).

Clouds are smooth random blobs (thresholded low-pass noise) plus their shadows (the blobs shifted
and darkened); clouds and shadows are both masked. One case clouds 20-40 % of one date, one
clouds three dates. Peers: ``skimage.restoration.inpaint_biharmonic`` per date, the temporal
fill (nearest clear date after a per-band gain/offset fit, :func:`temporal_fill`), and, as an
extra, the temporal fill plus the interpolated residual on the clear pixels of the clouded date
(:func:`temporal_fill_corrected`). Prints a markdown table: PSNR (dB, data range 1, against the
noise-free scene) on the clouded entries and on the whole clouded date(s), seconds, and NGR's
chosen iteration (chosen without ground truth).
"""

import argparse
import time

import numpy as np
import torch
from scipy import ndimage
from skimage import data
from skimage.transform import resize

import napari_ngr


def _smooth_field(rng, shape, sigma):
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _texture(name, size, rng):
    img = getattr(data, name)().astype(np.float64) / 255.0
    y0, x0 = rng.integers(0, img.shape[0] - 2 * size), rng.integers(0, img.shape[1] - 2 * size)
    return resize(img[y0:y0 + 2 * size, x0:x0 + 2 * size], (size, size), anti_aliasing=True)


def make_scene(image="coffee", *, T=5, C=4, size=96, seed=0, noise=0.01):
    """A clean (T, C, size, size) multi-temporal scene in about [0, 1] and its noisy observation."""
    rng = np.random.default_rng(seed)
    photo = getattr(data, image)().astype(np.float64) / 255.0
    side = min(photo.shape[:2])
    y0 = rng.integers(0, photo.shape[0] - side + 1)
    x0 = rng.integers(0, photo.shape[1] - side + 1)
    base = resize(photo[y0:y0 + side, x0:x0 + side], (size, size), anti_aliasing=True)
    bands = [base[..., 0], base[..., 1], base[..., 2]]
    if C > 3:  # a "near-infrared" band: vegetation-like texture mixed with the green band
        bands.append(0.5 * base[..., 1] + 0.5 * _texture("grass", size, rng))
    base = np.stack(bands[:C])
    clean = np.empty((T, C, size, size))
    yy, xx = np.mgrid[:size, :size]
    changes = []
    for k in range(3):  # land-cover changes: an ellipse turns into another texture from date t0 on
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        ry, rx = rng.uniform(0.06, 0.15, 2) * size
        patch = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        tex = _texture(("gravel", "brick", "grass")[k], size, rng)
        colour = rng.uniform(0.3, 0.9, C)[:, None, None]
        changes.append((int(rng.integers(1, T)), patch, colour * (0.3 + 0.7 * tex)))
    for t in range(T):
        scene = base.copy()
        for t0, patch, tex in changes:
            if t >= t0:
                scene[:, patch] = tex[:, patch]
        gain = rng.uniform(0.85, 1.15, C)[:, None, None]
        offset = rng.uniform(-0.05, 0.05, C)[:, None, None]
        light = 1.0 + 0.08 * _smooth_field(rng, (size, size), size / 5)
        clean[t] = np.clip(gain * scene * light + offset, 0, 1)
    noisy = clean + rng.normal(0, noise, clean.shape)
    return clean, noisy


def make_clouds(shape, dates, *, coverage=(0.2, 0.4), seed=0):
    """A (T, Y, X) cloud-and-shadow mask (True = missing) over ``dates``; the stack with clouds
    painted bright and shadows dark is returned too by :func:`cloudy`."""
    T, H, W = shape
    rng = np.random.default_rng(1000 + seed)
    clouds = np.zeros(shape, bool)
    shadows = np.zeros(shape, bool)
    for t in dates:
        target = rng.uniform(*coverage)
        f = _smooth_field(rng, (H, W), H / 14)
        # cloud fraction such that clouds + shadows cover about `target` of the date
        c = f > np.quantile(f, 1 - 0.6 * target)
        dy, dx = int(rng.integers(H // 12, H // 7)), int(rng.integers(-W // 7, W // 7))
        s = np.roll(c, (dy, dx), axis=(0, 1)) & ~c
        clouds[t], shadows[t] = c, s
    return clouds, shadows


def cloudy(noisy, clouds, shadows):
    out = noisy.copy()
    out = np.where(shadows[:, None], out * 0.45, out)
    return np.where(clouds[:, None], 0.85 + 0.1 * out, out)


def temporal_fill(stack, mask, everywhere=False):
    """The peer: nearest clear date (ties: the average of both), after a per-band least-squares
    gain/offset fit between the two dates on the pixels clear at both; (T, C, Y, X), mask (T, Y, X).
    ``everywhere``: predict every pixel of the clouded dates from the other dates (clear ones too)."""
    T, C = stack.shape[:2]
    out = np.where(mask[:, None], 0.0, stack)
    clear = ~mask
    todo = mask | mask.any(axis=(1, 2), keepdims=True) if everywhere else mask

    def fit(t, u, c):
        both = clear[t] & clear[u]
        a, b = np.polyfit(stack[u, c][both], stack[t, c][both], 1)
        return a * stack[u, c] + b

    for t in range(T):
        rest = todo[t].copy()
        for d in range(1, T):
            prev = rest & clear[t - d] if t - d >= 0 else np.zeros_like(rest)
            nxt = rest & clear[t + d] if t + d < T else np.zeros_like(rest)
            for c in range(C):
                vp = fit(t, t - d, c) if prev.any() else None
                vn = fit(t, t + d, c) if nxt.any() else None
                if vp is not None and vn is not None:
                    out[t, c][prev & nxt] = 0.5 * (vp + vn)[prev & nxt]
                if vp is not None:
                    out[t, c][prev & ~nxt] = vp[prev & ~nxt]
                if vn is not None:
                    out[t, c][nxt & ~prev] = vn[nxt & ~prev]
            rest &= ~(prev | nxt)
    return out


def temporal_fill_corrected(stack, mask):
    """A stronger peer (not in the issue): the temporal fill plus the biharmonic interpolation,
    into the clouds, of its residual on the clear pixels of the clouded date (a local correction
    of illumination differences that a global gain/offset cannot follow)."""
    pred = temporal_fill(stack, mask, everywhere=True)
    resid = biharmonic(np.where(mask[:, None], 0.0, stack - pred), mask)
    return np.where(mask[:, None], pred + resid, stack)


def biharmonic(stack, mask):
    from skimage.restoration import inpaint_biharmonic

    out = stack.copy()
    for t in range(len(stack)):
        if mask[t].any():
            out[t] = np.moveaxis(inpaint_biharmonic(np.moveaxis(stack[t], 0, -1), mask[t], channel_axis=-1), -1, 0)
    return out


def psnr(gt, x, where):
    gt, x = np.asarray(gt, np.float64)[where], np.asarray(x, np.float64)[where]
    return 10 * np.log10(1.0 / np.mean((gt - x) ** 2))


CASES = [
    # (label, image, T, C, size, scene seed, clouded dates)
    ("coffee 5 x 4 x 96², clouds on date 2", "coffee", 5, 4, 96, 0, (2,)),
    ("chelsea 4 x 3 x 96², clouds on date 0", "chelsea", 4, 3, 96, 1, (0,)),
    ("astronaut 6 x 4 x 80², clouds on dates 1, 2, 4", "astronaut", 6, 4, 80, 2, (1, 2, 4)),
]


def run_case(label, image, T, C, size, seed, dates, device="cpu", **kw):
    clean, noisy = make_scene(image, T=T, C=C, size=size, seed=seed)
    clouds, shadows = make_clouds((T, size, size), dates, seed=seed)
    mask = clouds | shadows
    obs = cloudy(noisy, clouds, shadows)
    where_cloud = np.broadcast_to(mask[:, None], clean.shape)
    where_date = np.zeros(clean.shape, bool)
    where_date[list(dates)] = True
    rows = []
    t0 = time.perf_counter()
    job = napari_ngr.prepare_decloud(obs, mask, channel_axis=1, device=device, **kw)
    res = job.run()
    tn = time.perf_counter() - t0
    cover = ", ".join(f"{100 * mask[t].mean():.0f} %" for t in dates)
    rows.append((f"{label} ({cover} masked)", "NGR decloud", psnr(clean, res.image, where_cloud),
                 psnr(clean, res.image, where_date), tn, f"it {res.best_iteration}/{res.iteration}"))
    t0 = time.perf_counter()
    tf = temporal_fill(obs, mask)
    rows.append(("", "temporal fill (gain/offset)", psnr(clean, tf, where_cloud), psnr(clean, tf, where_date),
                 time.perf_counter() - t0, ""))
    t0 = time.perf_counter()
    tc = temporal_fill_corrected(obs, mask)
    rows.append(("", "temporal fill + residual interpolation", psnr(clean, tc, where_cloud),
                 psnr(clean, tc, where_date), time.perf_counter() - t0, "extra peer"))
    t0 = time.perf_counter()
    bh = biharmonic(obs, mask)
    rows.append(("", "biharmonic per date", psnr(clean, bh, where_cloud), psnr(clean, bh, where_date),
                 time.perf_counter() - t0, ""))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    for case in CASES[:1] if args.quick else CASES:
        rows += run_case(*case, device=args.device)
    print(f"\nnapari-ngr {napari_ngr.__version__}, device={args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| case | method | PSNR clouded dB | PSNR whole date dB | s | note |")
    print("|---|---|---|---|---|---|")
    for case, m, pc, pd, t, note in rows:
        print(f"| {case} | {m} | {pc:.2f} | {pd:.2f} | {t:.2f} | {note} |")


if __name__ == "__main__":
    main()
