"""Speed table: seconds per iteration, iterations used, seconds of the loop and of the
preparation (validation split, starts, NL-means) and peak memory, for napari-ngr's defaults
and for a configuration that mirrors the reference code (three independent 128-channel,
5-level U-Nets, no guide, float32), on the core issue's two cases, and for the precision the
default does not use (``precision="auto"`` runs the network in bfloat16 for a single image on a
CPU with native bfloat16, else in float32: the other one is timed too); then a 200-band 256 x 256
hyperspectral cube (issue 6: many bands in reasonable memory), inpainting (10 % of entries
observed) and mixed-noise denoising, timed over a few iterations and projected to the default
budget; then the denoising of a 24 x 256² video (sigma 0.1), whose "finish" is the NL-means
fallback of stacks (a low-rank pilot and six NL-means candidates scored on the held-out entries).
"finish s" is ``result()`` after the loop: the final data weight and the fallback's candidates
(denoising), the start rebuilt from every observed entry (inpainting). On a CPU without native bfloat16 (AVX512-BF16 or AMX; most laptops), where bfloat16 is
emulated and about 8x slower, the bfloat16 rows are likewise timed over ``--bf16-iterations``
and projected, so that the script ends in minutes, not hours. The header names the CPU's vector
extension (torch's ``get_cpu_capability``): per-iteration times differ about 3x between an
AVX2-only and an AMX CPU with the same number of cores.

    python benchmarks/speed.py [--device cuda] [--ref-iterations 3] [--band-iterations 10] [--bf16-iterations 20]
"""

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _data  # noqa: E402

import napari_ngr  # noqa: E402
from napari_ngr.solver import cpu_has_native_bfloat16, resolve_precision  # noqa: E402

REFERENCE = dict(channels=128, levels=5, skip_channels=4, shared_trunk=False, guide=0.0, guide_refresh=0,
                 warmup=0, input_channels=3, precision="float32")
REF_ITERS = {"inpaint": 15000, "denoise": 4000}


def peak_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process (Linux: KiB)


def measure(task, device, **over):
    """One row, in a fresh process so that its peak memory is its own."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_measure, task, device, torch.get_num_threads(), over).result()


def _measure(task, device, threads, over):
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", "precision='bfloat16' on a CPU", RuntimeWarning)  # the row says so
    gt = _data.astronaut256()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_prep = time.perf_counter()
    if task.startswith("hsi"):
        gt = _data.hsi_cube(200, 256)
        if task == "hsi-inpaint":
            obs = np.random.default_rng(0).random(gt.shape) < 0.1
            job = napari_ngr.prepare_inpaint(np.where(obs, gt, 0), ~obs, channel_axis=0, device=device, **over)
        else:
            y, _ = _data.mixed_noise(gt)
            job = napari_ngr.prepare_denoise(y, channel_axis=0, noise="mixed", device=device, **over)
    elif task == "video-denoise":
        gt = _data.astronaut_pan()
        job = napari_ngr.prepare_denoise(_data.noisy(gt, 0.1), device=device, **over)
    elif task == "inpaint":
        obs = _data.observed_mask(0.1)
        job = napari_ngr.prepare_inpaint(np.where(obs[..., None], gt, 0), ~obs, channel_axis=-1, device=device, **over)
    else:
        job = napari_ngr.prepare_denoise(_data.noisy(gt, 0.1), channel_axis=-1, sigma=0.1, device=device, **over)
    t = time.perf_counter()
    prep = t - t_prep
    times = []
    last = t
    for rec in job.iterate():
        now = time.perf_counter()
        times.append(now - last)
        last = now
    total = time.perf_counter() - t
    t = time.perf_counter()
    res = job.result()
    finish = time.perf_counter() - t
    return float(np.median(times)), res.iteration, total, peak_mb(device), _data.psnr(gt, res.image), prep, finish


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ref-iterations", type=int, default=3, help="iterations timed for the reference mirror")
    ap.add_argument("--band-iterations", type=int, default=10, help="iterations timed on the 200-band cube")
    ap.add_argument("--bf16-iterations", type=int, default=20,
                    help="iterations timed for the bfloat16 rows on a CPU without native bfloat16")
    args = ap.parse_args(argv)
    cpu = ""
    emulated_bf16 = False
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
        emulated_bf16 = not cpu_has_native_bfloat16()
        cpu = (f", CPU {torch.backends.cpu.get_cpu_capability()}, "
               f"{'emulated' if emulated_bf16 else 'native'} bfloat16")
    auto = resolve_precision("auto", args.device)
    print(f"\nnapari-ngr {napari_ngr.__version__}, device={args.device}{cpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, default precision {auto} (single images; "
          f"stacks {resolve_precision('auto', args.device, False)})\n")
    print("| case | configuration | s / iteration | iterations | loop s | prepare s | finish s | peak MiB | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, name in (("inpaint", "astronaut 256² RGB, 10 % observed"), ("denoise", "astronaut 256² RGB, sigma 0.1")):
        spi, it, tot, mem, p, prep, fin = measure(task, args.device)
        print(f"| {name} | napari-ngr defaults ({auto}) | {spi:.3f} | {it} | {tot:.1f} | {prep:.1f} | {fin:.1f} | {mem:.0f} | {p:.2f} |")
        if task == "denoise":  # the single-image budget before 250 (the sixth session): what 50 more buy
            spi, it, tot, mem, p, prep, fin = measure(task, args.device, iterations=300)
            print(f"| {name} | napari-ngr, iterations=300 | {spi:.3f} | {it} | {tot:.1f} | {prep:.1f} | {fin:.1f} | {mem:.0f} | {p:.2f} |")
        # the precision the default did not choose
        if auto == "bfloat16":
            spi, it, tot, mem, p, prep, fin = measure(task, args.device, precision="float32")
            print(f"| {name} | napari-ngr, precision='float32' | {spi:.3f} | {it} | {tot:.1f} | {prep:.1f} | {fin:.1f} | {mem:.0f} | {p:.2f} |")
        elif emulated_bf16:  # about 8x slower than float32: time a few iterations, project to the budget
            n = napari_ngr.DEFAULTS[task]["iterations"]
            spi, it, tot, mem, p, prep, fin = measure(task, args.device, precision="bfloat16", iterations=args.bf16_iterations)
            print(f"| {name} | napari-ngr, precision='bfloat16' (emulated) | {spi:.3f} | {n} (timed {it}) "
                  f"| {spi * n:.0f} (projected) | {prep:.1f} | {fin:.1f} | {mem:.0f} | - |")
        else:
            spi, it, tot, mem, p, prep, fin = measure(task, args.device, precision="bfloat16")
            print(f"| {name} | napari-ngr, precision='bfloat16' | {spi:.3f} | {it} | {tot:.1f} | {prep:.1f} | {fin:.1f} | {mem:.0f} | {p:.2f} |")
        spi, it, tot, mem, p, prep, fin = measure(task, args.device, iterations=args.ref_iterations, **REFERENCE)
        est = spi * REF_ITERS[task]
        print(f"| {name} | reference mirror (3 nets x 128 ch) | {spi:.3f} | {REF_ITERS[task]} (timed {it}) "
              f"| {est:.0f} (projected) | {prep:.1f} | {fin:.1f} | {mem:.0f} | - |")
    for task, name, n in (("hsi-inpaint", "HSI 200 bands 256², 10 % observed", napari_ngr.DEFAULTS["inpaint"]["iterations"]),
                          ("hsi-denoise", "HSI 200 bands 256², mixed noise", napari_ngr.DEFAULTS["denoise"]["mixed_iterations"])):
        spi, it, tot, mem, p, prep, fin = measure(task, args.device, iterations=args.band_iterations)
        print(f"| {name} | napari-ngr defaults (float32) | {spi:.3f} | {n} (timed {it}) | {spi * n:.0f} (projected) "
              f"| {prep:.1f} | {fin:.1f} | {mem:.0f} | - |")

    spi, it, tot, mem, p, prep, fin = measure("video-denoise", args.device)
    print(f"| video 24 x 256² grey, sigma 0.1 | napari-ngr defaults ({resolve_precision('auto', args.device, False)}) "
          f"| {spi:.3f} | {it} | {tot:.1f} | {prep:.1f} | {fin:.1f} | {mem:.0f} | {p:.2f} |")


if __name__ == "__main__":
    main()
