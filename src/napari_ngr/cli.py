"""The ``napari-ngr`` command: batch restoration of TIFF and NumPy stacks.

Run ``napari-ngr --help`` (or ``python -m napari_ngr --help``) for the rules; they are also in
the README. Everything here is I/O and bookkeeping around :func:`napari_ngr.prepare_inpaint` and
:func:`napari_ngr.prepare_denoise`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EXTENSIONS = (".tif", ".tiff", ".npy")

EPILOG = """\
examples:
  napari-ngr inpaint scan.tif --mask scan_mask.tif -o scan_restored.tif
  napari-ngr inpaint data/ --output-dir restored/ --gradients      # pairs NAME_mask.tif with NAME.tif
  napari-ngr inpaint "plates/*.tif" --mask dust.tif --output-dir out/ --device cuda
  napari-ngr denoise movie.tif --axes TYX --iterations 400 -o movie_denoised.tif
  napari-ngr denoise cube.npy --channel-axis 0 --sigma 0.05 --dtype float32 -o cube_dn.npy

inputs:
  Several files, glob patterns (quoted or not) and folders; a folder contributes its .tif, .tiff
  and .npy files. Files whose name ends with the mask suffix (default "_mask") are masks, not inputs.

masks (inpaint):
  --mask FILE       one mask for every input;
  otherwise         NAME_mask.tif / NAME_mask.tiff / NAME_mask.npy beside NAME.tif (see --mask-suffix).
  Nonzero = missing. A mask has the image's shape, the image's shape without the channel axis, or (Y, X).

outputs:
  -o FILE           only with a single input;
  otherwise         OUTPUT_DIR/NAME_ngr.EXT (--output-dir; default: beside the input), same format as the input.
  --gradients       also NAME_ngr_grad-y.EXT, NAME_ngr_grad-x.EXT and one per third axis (c, z or t).
  Outputs are written to a hidden temporary file in the same folder and renamed when complete, so an
  interrupted run never leaves a half-written file. An existing output is skipped (reported as
  "skipped": re-running a batch resumes it) unless --overwrite is given.

axes and metadata:
  ImageJ and OME-TIFF axes are read from the file (RGB samples count as the channel axis); --axes or
  --channel-axis override them. ImageJ metadata (axes, spacing, unit, frame interval, labels, X/Y
  resolution) and OME metadata (axes, physical sizes and units, channel names) are written back in
  the same flavour.

dtypes:
  By default the output has the input's dtype: integers are rounded half to even and clipped to the
  dtype's range. --dtype float32 keeps the floating-point result. ImageJ files only hold uint8,
  uint16 and float32: other dtypes are written as float32.

exit status:
  0 all files done or skipped; 1 at least one file failed (each failure is reported with its reason
  and the batch goes on); 2 usage error; 130 interrupted (Ctrl-C).
"""


class FileError(Exception):
    """A problem with one file: reported, and the batch goes on."""


# ---------------------------------------------------------------------------------------- I/O
@dataclass
class Image:
    data: np.ndarray
    axes: str | None = None          # letters from TZCYX, or None (let the core infer)
    flavour: str = "plain"           # "imagej", "ome", "plain", "npy"
    file_axes: str | None = None     # axes as written in the file (for writing back)
    meta: dict = field(default_factory=dict)
    resolution: tuple | None = None
    photometric: str | None = None


def _map_axes(axes: str) -> str | None:
    """File axes (tifffile letters) to core letters, or None when they say nothing useful."""
    a = axes.upper()
    if a.endswith("S"):
        a = a[:-1] + "C"
    if set(a) <= set("TZCYX") and len(set(a)) == len(a):
        return a
    return None


def read_image(path: Path) -> Image:
    """Read a .npy or TIFF file with its axes and metadata; FileError when it cannot be read."""
    try:
        if path.suffix.lower() == ".npy":
            return Image(np.load(path, allow_pickle=False), flavour="npy")
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            file_axes = series.axes
            page = tif.pages[0]
            res = None
            try:
                xr, yr = page.tags["XResolution"].value, page.tags["YResolution"].value
                res = (xr[0] / xr[1], yr[0] / yr[1])
            except (KeyError, ZeroDivisionError, TypeError):
                pass
            photometric = "rgb" if file_axes.endswith("S") and data.shape[-1] in (3, 4) else None
            if tif.is_imagej:
                ij = dict(tif.imagej_metadata or {})
                meta = {k: ij[k] for k in ("spacing", "unit", "finterval", "Labels", "Ranges", "mode")
                        if k in ij and ij[k] is not None}
                return Image(data, _map_axes(file_axes), "imagej", file_axes, meta, res, photometric)
            if tif.is_ome:
                meta = {}
                try:
                    ome = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
                    pixels = (ome[0] if isinstance(ome, list) else ome)["Pixels"]
                    for k, v in pixels.items():
                        if k.startswith("PhysicalSize") or k.startswith("TimeIncrement"):
                            meta[k] = v
                    ch = pixels.get("Channel")
                    ch = ch if isinstance(ch, list) else [ch] if ch else []
                    names = [c.get("Name") for c in ch if isinstance(c, dict)]
                    if names and all(names):
                        meta["Channel"] = {"Name": names}
                except Exception:  # metadata we cannot parse is dropped, the pixels still count
                    meta = {}
                return Image(data, _map_axes(file_axes), "ome", file_axes, meta, res, photometric)
            axes = _map_axes(file_axes) if photometric else None
            return Image(data, axes, "plain", file_axes, {}, res, photometric)
    except FileError:
        raise
    except Exception as exc:  # unreadable, corrupt, not an image
        raise FileError(f"cannot read {path.name}: {exc.__class__.__name__}: {exc}") from exc


def _atomic_write(path: Path, write) -> None:
    """Write through a hidden temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def write_image(path: Path, data: np.ndarray, like: Image) -> None:
    """Write ``data`` in ``like``'s flavour and metadata, atomically."""
    if path.suffix.lower() == ".npy":
        def w(tmp):
            with open(tmp, "wb") as fh:
                np.save(fh, data)
        return _atomic_write(path, w)
    import tifffile

    kw = {}
    if like.resolution is not None:
        kw["resolution"] = like.resolution
    axes = like.file_axes
    if like.flavour == "imagej":
        if data.dtype not in (np.uint8, np.uint16, np.float32):
            data = data.astype(np.float32)
        meta = dict(like.meta)
        if axes is not None:
            meta["axes"] = axes
        if data.dtype == np.float32:
            meta.pop("Ranges", None)
        kw.update(imagej=True, metadata=meta)
    elif like.flavour == "ome":
        meta = dict(like.meta)
        if axes is not None:
            meta["axes"] = axes
        kw.update(ome=True, metadata=meta)
    else:
        kw["metadata"] = None
    if like.photometric and data.shape[-1] in (3, 4) and data.dtype in (np.uint8, np.uint16):
        kw["photometric"] = like.photometric
    elif data.ndim >= 2 and like.flavour != "imagej":
        kw["photometric"] = "minisblack"

    def w(tmp):
        tifffile.imwrite(tmp, data, **kw)

    _atomic_write(path, w)


def cast_output(restored: np.ndarray, in_dtype, policy: str) -> np.ndarray:
    """The output dtype policy: the input's (integers rounded half to even, clipped) or float32."""
    if policy == "float32":
        return restored.astype(np.float32, copy=False)
    dt = np.dtype(in_dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return np.clip(np.rint(restored), info.min, info.max).astype(dt)
    if dt.kind == "b":
        return restored > 0.5
    return restored.astype(dt, copy=False)


# ------------------------------------------------------------------------------ the batch
def expand_inputs(items, mask_suffix: str) -> list[Path]:
    """Files from paths, glob patterns and folders, in order, without masks or duplicates."""
    out, seen = [], set()

    def add(p: Path):
        if p.suffix.lower() not in EXTENSIONS or p.name.startswith("."):
            return
        if p.stem.endswith(mask_suffix):
            return
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in items:
        p = Path(item)
        if p.is_dir():
            for q in sorted(p.iterdir()):
                if q.is_file():
                    add(q)
        elif p.exists():
            if p.suffix.lower() not in EXTENSIONS:
                raise FileError(f"{item}: not a .tif, .tiff or .npy file")
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileError(f"{item}: no such file, folder or matching pattern")
            for m in matches:
                if Path(m).is_file():
                    add(Path(m))
    return out


def find_mask(path: Path, args) -> Path:
    if args.mask:
        return Path(args.mask)
    for ext in (".tif", ".tiff", ".npy"):
        cand = path.with_name(path.stem + args.mask_suffix + ext)
        if cand.exists():
            return cand
    raise FileError(f"no mask for {path.name}: expected {path.stem}{args.mask_suffix}.tif (or .tiff, .npy) "
                    "beside it, or give --mask")


def output_paths(path: Path, args, n_inputs: int) -> Path:
    if args.output:
        return Path(args.output)
    folder = Path(args.output_dir) if args.output_dir else path.parent
    return folder / f"{path.stem}_ngr{path.suffix}"


def gradient_path(out: Path, axis: str) -> Path:
    return out.with_name(f"{out.stem}_grad-{axis}{out.suffix}")


def available_memory() -> int:
    """Bytes of memory available now (Linux /proc/meminfo, else physical pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _memory_limit(args, device) -> tuple[int, str]:
    if args.max_memory is not None:
        return int(args.max_memory * 2**30), "--max-memory"
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "free GPU memory"
    return available_memory(), "available RAM"


def _fmt_gb(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str, bar=None):
        if self.quiet:
            return
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


def process_file(path: Path, args, device, log, bar_files, use_bars) -> str:
    """Restore one file; returns "done" or "skipped"; raises FileError for a reason to report."""
    import napari_ngr

    out = output_paths(path, args, 1)
    if out.resolve() == path.resolve():
        raise FileError(f"{path.name}: the output would overwrite the input")
    if out.exists() and not args.overwrite:
        log(f"skipped {path.name}: {out} exists (use --overwrite to replace it)", bar_files)
        return "skipped"
    img = read_image(path)
    axes = args.axes.upper() if args.axes else (None if args.channel_axis is not None else img.axes)
    if axes is None and args.channel_axis is None and img.data.ndim == 3 and img.photometric:
        axes = "YXC"
    kwargs = dict(channel_axis=args.channel_axis, axes=axes, iterations=args.iterations,
                  spatial_weight=args.spatial_weight, channel_weight=args.channel_weight,
                  stack_weight=args.stack_weight, seed=args.seed, device=device)
    if img.data.ndim < 2 or img.data.size == 0:
        raise FileError(f"{path.name}: not an image (shape {img.data.shape})")
    try:
        need = napari_ngr.estimate_memory(img.data.shape, channel_axis=args.channel_axis, axes=axes)
    except ValueError as exc:
        raise FileError(f"{path.name}: {exc}") from exc
    limit, what = _memory_limit(args, device)
    log(f"{path.name}: shape {img.data.shape} {img.data.dtype}, axes {axes or 'inferred'}, "
        f"needs about {_fmt_gb(need)} ({what}: {_fmt_gb(limit)})", bar_files)
    if need > limit:
        raise FileError(f"{path.name}: needs about {_fmt_gb(need)} but only {_fmt_gb(limit)} ({what}) is "
                        "available; crop or bin the stack, or use a larger machine")
    try:
        if args.task == "inpaint":
            mpath = find_mask(path, args)
            mask = read_image(mpath).data
            job = napari_ngr.prepare_inpaint(img.data, mask, **kwargs)
        else:
            job = napari_ngr.prepare_denoise(img.data, sigma=args.sigma, **kwargs)
    except ValueError as exc:
        raise FileError(f"{path.name}: {exc}") from exc

    t0 = time.perf_counter()
    bar = None
    if use_bars:
        from tqdm import tqdm

        bar = tqdm(total=job.total, desc=path.name, unit="it", leave=False, position=1, file=sys.stderr)
    try:
        for rec in job.iterate():
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    res = job.result()
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.gradients:
        for ax, g in res.gradients.items():
            write_image(gradient_path(out, ax), g.astype(np.float32), img)
    write_image(out, cast_output(res.image, img.data.dtype, args.dtype), img)  # last: its presence = done
    note = f", sigma {res.sigma:.4g}" if res.sigma is not None else ""
    log(f"done {path.name} -> {out} ({res.iteration} iterations, returned {res.best_iteration}, "
        f"{res.stop_reason}{note}, {time.perf_counter() - t0:.1f} s on {job.device})", bar_files)
    return "done"


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="napari-ngr", description="Zero-shot restoration of images and stacks with the Neural Gradient "
        "Regularizer (NGR): inpainting of masked defects and Gaussian denoising, in batch.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"napari-ngr {__version__}")
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)

    def common(sp):
        sp.add_argument("inputs", nargs="+", metavar="INPUT", help="files (.tif, .tiff, .npy), glob patterns or folders")
        sp.add_argument("-o", "--output", help="output file (single input only)")
        sp.add_argument("--output-dir", help="folder for outputs NAME_ngr.EXT (default: beside each input)")
        sp.add_argument("--iterations", type=int, help="iteration budget (default: the library's per task)")
        sp.add_argument("--spatial-weight", type=float, help="weight of the Y and X gradients (default 1)")
        sp.add_argument("--channel-weight", type=float, help="weight of the channel/band gradient")
        sp.add_argument("--stack-weight", type=float, help="weight of the Z or T gradient")
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N or mps")
        sp.add_argument("--channel-axis", type=int, help="index of the channel axis (overrides file metadata)")
        sp.add_argument("--axes", help="axis letters from TZCYX, e.g. TCYX or ZYX (overrides file metadata)")
        sp.add_argument("--dtype", choices=("input", "float32"), default="input",
                        help="output dtype: the input's (default; integers rounded and clipped) or float32")
        sp.add_argument("--gradients", action="store_true", help="also write one gradient-map file per axis")
        sp.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
        sp.add_argument("--max-memory", type=float, metavar="GIB",
                        help="refuse jobs estimated above this many GiB (default: available RAM, or free GPU memory)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no log lines, only errors")
        sp.add_argument("--mask-suffix", default="_mask", help="suffix of paired mask files (default _mask)")

    sp = sub.add_parser("inpaint", help="fill masked (missing) pixels", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("--mask", help="one mask file for every input (nonzero = missing); default: NAME_mask.tif")
    sp = sub.add_parser("denoise", help="remove additive Gaussian noise", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("--sigma", type=float, help="noise standard deviation in the image's units (default: estimated)")
    sp.set_defaults(mask=None)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = _Log(args.quiet)
    try:
        inputs = expand_inputs(args.inputs, args.mask_suffix)
    except FileError as exc:
        parser.exit(2, f"napari-ngr: error: {exc}\n")
    if not inputs:
        parser.exit(2, "napari-ngr: error: no input files (.tif, .tiff, .npy) found\n")
    if args.output and len(inputs) > 1:
        parser.exit(2, f"napari-ngr: error: -o/--output takes a single input, got {len(inputs)}; use --output-dir\n")
    if args.mask and not Path(args.mask).exists():
        parser.exit(2, f"napari-ngr: error: mask {args.mask} does not exist\n")
    if args.iterations is not None and args.iterations < 1:
        parser.exit(2, "napari-ngr: error: --iterations must be at least 1\n")
    import napari_ngr

    try:
        device = napari_ngr.resolve_device(args.device)
    except ValueError as exc:
        parser.exit(2, f"napari-ngr: error: {exc}\n")

    use_bars = not args.quiet and sys.stderr.isatty()
    bar_files = None
    if use_bars:
        from tqdm import tqdm

        bar_files = tqdm(total=len(inputs), desc="files", unit="file", position=0, file=sys.stderr)
    done, skipped, failed = [], [], []
    try:
        for path in inputs:
            try:
                status = process_file(path, args, device, log, bar_files, use_bars)
                (done if status == "done" else skipped).append(path)
            except FileError as exc:
                failed.append((path, str(exc)))
                print(f"FAILED {exc}", file=sys.stderr, flush=True)
            except Exception as exc:  # a bug or an unexpected library error: report it, go on
                reason = f"{path.name}: {exc.__class__.__name__}: {exc}"
                if exc.__class__.__name__ == "OutOfMemoryError":
                    reason += " (out of GPU memory: use --device cpu or crop the stack)"
                failed.append((path, reason))
                print(f"FAILED {reason}", file=sys.stderr, flush=True)
                if os.environ.get("NAPARI_NGR_DEBUG"):
                    traceback.print_exc()
            if bar_files is not None:
                bar_files.update(1)
    except KeyboardInterrupt:
        if bar_files is not None:
            bar_files.close()
        print(f"\ninterrupted: {len(done)} done, {len(skipped)} skipped; no partial file was left",
              file=sys.stderr)
        return 130
    if bar_files is not None:
        bar_files.close()
    summary = f"{len(done)} done, {len(skipped)} skipped, {len(failed)} failed"
    if failed:
        print(f"napari-ngr: {summary}:", file=sys.stderr)
        for path, reason in failed:
            print(f"  {reason}", file=sys.stderr)
        return 1
    log(f"napari-ngr: {summary}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
