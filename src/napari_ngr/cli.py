"""The ``napari-ngr`` command: batch restoration of TIFF / NumPy files without napari.

``napari-ngr inpaint ...``, ``napari-ngr denoise ...`` and ``napari-ngr decloud ...`` drive the same
:class:`~napari_ngr.RestorationJob` loop as the Python API and the napari widget. See
``napari-ngr --help`` (or :data:`RULES` below) for the rules on inputs, masks, outputs, dtypes,
resuming and memory.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["main", "build_parser"]

PROG = "napari-ngr"
OUTPUT_SUFFIX = "_ngr"
GRADIENT_INFIX = "_grad-"
DEFAULT_MASK_SUFFIX = "_mask"
EXTENSIONS = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".npy")  # longest first
TIFF_EXTENSIONS = (".ome.tiff", ".ome.tif", ".tiff", ".tif")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MASK_TASKS = ("inpaint", "decloud")  # tasks that read a mask (nonzero = missing / clouded)

RULES = """\
inputs:
  Each INPUT is a file (.tif, .tiff, .ome.tif, .npy), a folder (every .tif/.tiff/.npy
  directly inside it) or a glob such as "data/*.tif" (expanded by napari-ngr itself, so
  quoting it works on Windows too; "**" recurses). Folders and globs leave out masks
  (NAME_mask.*), earlier outputs (NAME_ngr.*, NAME_ngr_grad-*.*) and hidden files.

outputs:
  -o FILE           only with a single input;
  otherwise         NAME_ngr.EXT in --output-dir (created if needed), or beside the
                    input when --output-dir is not given. EXT is the input's extension.
  --gradients       also NAME_ngr_grad-y.EXT, NAME_ngr_grad-x.EXT and one per other
                    regularized axis (_grad-c, _grad-z or _grad-t), always float32.
  No output (image or gradient) is ever an input or a mask (given or paired), whatever
  --overwrite says: such a file fails (with -o: a usage error).
  Metadata: ImageJ TIFFs are written as ImageJ (axes, resolution, unit, spacing,
  finterval, labels, ranges, ...); OME-TIFFs as OME (axes, PhysicalSizeX/Y/Z and units,
  TimeIncrement, channel names); other TIFFs keep axes and resolution. .npy carries no
  metadata. A TIFF with several series: the first is restored (the log says so).

axes (first that applies):
  --axes (letters T Z C Y X, e.g. TCYX, YXC), then --channel-axis, then the file's
  ImageJ/OME/tifffile axes (samples S count as channels C), then the defaults: 2-D is YX,
  3-D is ZYX, 4-D needs --channel-axis or --axes. A file whose axes cannot be mapped
  (e.g. "E" or "A") fails with a message unless --axes or --channel-axis is given.
  decloud: the dates are --time-axis N, else the T of --axes or of the file's axes, else
  axis 0; the bands are --channel-axis N, else the C of --axes or of the file's axes, else
  none; the other two axes are Y, X. A single date (no axis left for T, or T of length 1)
  fails: use inpaint.

dtype:
  --dtype input     (default) the input's dtype. Integer types: the restored values are
                    rounded half to even (numpy.rint) and clipped to the dtype's range
                    (e.g. 0..65535 for uint16). Float types: a plain cast. Observed
                    (inpaint) and clear (decloud) entries are the input's own values.
  --dtype float32   the restored float32 values, unrounded (ImageJ reads float32).

existing outputs, resuming, nothing lost:
  An existing output is never replaced without --overwrite: the file is skipped with a
  message. So re-running the same command resumes an interrupted batch (--resume says
  this explicitly; it is the default). With --gradients, a file counts as done when its
  output and all its gradient files exist; missing ones are computed, existing ones are
  kept. Every file is written to a hidden temporary file in the output's folder
  (.NAME_ngr.partial-XXXXXXXX.EXT) and renamed when complete, so Ctrl-C, a crash or a
  killed job never leaves a half-written output (after a SIGKILL a hidden .partial file
  may remain; it is safe to delete). One bad file (unreadable, wrong shape, mask
  mismatch, refused for memory) is reported and the batch goes on.

memory:
  Before any work the command prints the estimated peak memory of the largest job and
  refuses, with a message, every file whose estimate exceeds --max-memory (GB, 1e9
  bytes; default: the available RAM, or the free GPU memory for CUDA jobs).

threads:
  --threads N sets torch's CPU threads. On a busy or shared machine, or for small images,
  1 or 2 is often much faster than the default (idle threads spin and compete).

progress:
  On a terminal: one bar for the files and one for the iterations of the current file.
  Otherwise (or with --quiet) no bars; one log line per file on stderr unless --quiet
  (which prints failures only).

exit status:
  0 every file done or skipped; 1 at least one file failed (see the summary);
  2 usage error; 130 interrupted (Ctrl-C or SIGTERM; no partial output is left).
"""

MASK_RULES = """\
masks (inpaint, decloud; nonzero = missing or clouded):
  --mask FILE       one mask for every input;
  otherwise         NAME_mask.tif (.tiff, .ome.tif or .npy) beside NAME.tif;
                    --mask-suffix changes "_mask".
  inpaint: a mask has the image's shape, the image's shape without its channel axis, or
  (Y, X) (the same mask on every plane). decloud: the cloud and shadow mask has the
  stack's shape without its band axis, i.e. (T, Y, X) in the stack's axis order (the same
  for every band), or the stack's shape.

"""

EXAMPLES = """\
examples:
  napari-ngr inpaint scan.tif --mask scan_mask.tif -o scan_filled.tif
  napari-ngr inpaint "tiles/*.tif" --output-dir restored/ --gradients
  napari-ngr inpaint movie.tif --mask scratches.tif --axes TCYX --iterations 400 -o out.tif
  napari-ngr decloud series.tif -o series_clear.tif       # clouds in series_mask.tif, (T, Y, X)
  napari-ngr decloud "scenes/*.tif" --time-axis 0 --channel-axis 1 --output-dir clear/
  napari-ngr denoise stack.ome.tif --sigma 12 --device cuda -o stack_dn.ome.tif
  napari-ngr denoise data/ --output-dir denoised/ --dtype float32 --quiet
  napari-ngr denoise rgb.npy --channel-axis -1 --seed 1 -o rgb_dn.npy
  napari-ngr denoise nuclei.tif --noise poisson -o nuclei_dn.tif   # shot noise (photon counts)
  python -m napari_ngr --version
"""


# ---------------------------------------------------------------------------- argument parsing
class _UsageError(Exception):
    """A problem with the command line as a whole (exit status 2)."""


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seed(text):
    v = _int(text)
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return v


def _float_ge0(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _float_gt0(text):
    v = _float_ge0(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _axes_arg(text):
    t = str(text).upper()
    if not t or set(t) - set("TZCYX") or len(set(t)) != len(t) or "Y" not in t or "X" not in t:
        raise argparse.ArgumentTypeError(
            f"--axes {text!r}: use distinct letters from T, Z, C, Y, X including Y and X (e.g. TCYX, YXC, ZYX)")
    return t


def _device_arg(text):
    return str(text).strip().lower()  # CPU, Cuda:1, MPS: device names are case-insensitive


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=100)


def _epilog(masks: bool) -> str:
    head, tail = RULES.split("outputs:\n", 1)
    return head + (MASK_RULES if masks else "") + "outputs:\n" + tail + "\n" + EXAMPLES


def build_parser() -> argparse.ArgumentParser:
    from . import DEFAULTS, __version__

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Zero-shot restoration of TIFF and NumPy images and stacks with the Neural Gradient\n"
                    "Regularizer: no training data, no downloads. 'napari-ngr TASK --help' lists a task's options.",
        epilog=_epilog(masks=True))
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="task", metavar="TASK", title="tasks")
    sub.required = True

    def common(p, task):
        d = DEFAULTS[task]
        p.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="image files (.tif, .tiff, .ome.tif, .npy), folders or globs")
        out = p.add_argument_group("output")
        out.add_argument("-o", "--output", metavar="FILE", help="output file (only with a single input)")
        out.add_argument("--output-dir", metavar="DIR",
                         help=f"folder for NAME{OUTPUT_SUFFIX}.EXT outputs (default: beside each input)")
        out.add_argument("--dtype", choices=("input", "float32"), default="input",
                         help="output dtype: the input's (integers rounded half to even and clipped; "
                              "default) or float32")
        out.add_argument("--gradients", action="store_true",
                         help=f"also write NAME{OUTPUT_SUFFIX}{GRADIENT_INFIX}AXIS.EXT per regularized axis (float32)")
        ex = out.add_mutually_exclusive_group()
        ex.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        ex.add_argument("--resume", action="store_true",
                        help="skip inputs whose outputs exist (the default; stated explicitly)")
        lay = p.add_argument_group("layout")
        lay.add_argument("--channel-axis", type=_int, metavar="N",
                         help="axis of the channels/bands (e.g. -1 for Y,X,C; 1 for T,C,Y,X)")
        lay.add_argument("--axes", type=_axes_arg, metavar="AXES",
                         help="axis letters from T Z C Y X, e.g. TCYX, ZYX, YXC (overrides the file's axes)")
        if task == "decloud":
            lay.add_argument("--time-axis", type=_int, metavar="N",
                             help="axis of the dates (default: the T of --axes or of the file's axes, else 0)")
        sol = p.add_argument_group("restoration")
        sol.add_argument("--iterations", type=_positive_int, metavar="N",
                         help=f"iteration budget (default {d['iterations']}"
                              + (f"; {d['planar_iterations']} for a single grey or colour image"
                                 if "planar_iterations" in d else "")
                              + (f"; {d['mixed_iterations']} with --noise mixed" if "mixed_iterations" in d else "")
                              + ")")
        sol.add_argument("--spatial-weight", type=_float_ge0, metavar="W",
                         help=f"weight of the Y/X gradients (default {d['spatial_weight']})")
        sol.add_argument("--channel-weight", type=_float_ge0, metavar="W",
                         help=f"weight of the channel gradient (default {d['channel_weight']}"
                              + (f"; {d['band_weight']} above 4 channels" if "band_weight" in d else "") + ")")
        sol.add_argument("--stack-weight", type=_float_ge0, metavar="W",
                         help=f"weight of the Z/T gradient (default {d['stack_weight']})")
        sol.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
        sol.add_argument("--device", default="auto", type=_device_arg,
                         help="auto (CUDA, then MPS, then CPU; default), cpu, cuda, cuda:1, mps")
        sol.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                         help="the network's arithmetic (default auto: bfloat16 for a single image on a CPU "
                              "with native bfloat16, AVX512-BF16/AMX, where it is about 1.6x faster; float32 for "
                              "stacks and elsewhere); bfloat16 is about 8x slower on CPUs without it")
        run = p.add_argument_group("run")
        run.add_argument("--threads", type=_positive_int, metavar="N",
                         help="CPU threads for torch (default: torch's choice; 1-2 on a shared machine)")
        run.add_argument("--max-memory", type=_float_gt0, metavar="GB",
                         help="refuse files whose estimated peak memory exceeds this many GB "
                              "(default: available RAM, or free GPU memory for CUDA)")
        run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines; failures only")

    p_in = sub.add_parser("inpaint", formatter_class=_Formatter, epilog=_epilog(masks=True),
                          help="fill missing pixels given by a mask (nonzero = missing)",
                          description="Fill the missing entries (mask nonzero) of images or stacks.")
    common(p_in, "inpaint")

    def mask_options(p, what):
        m = p.add_argument_group("mask")
        m.add_argument("--mask", metavar="FILE", help=f"one mask for every input (nonzero = {what})")
        m.add_argument("--mask-suffix", default=DEFAULT_MASK_SUFFIX, metavar="SUFFIX",
                       help=f"pair NAME.tif with NAME{{SUFFIX}}.tif (default {DEFAULT_MASK_SUFFIX!r}; "
                            f"write --mask-suffix=-m for a suffix that starts with '-')")

    mask_options(p_in, "missing")

    p_dc = sub.add_parser("decloud", formatter_class=_Formatter, epilog=_epilog(masks=True),
                          help="remove clouds and shadows from a time series given a cloud mask (nonzero = clouded)",
                          description="Restore the clouded entries (mask nonzero) of multi-temporal stacks, (T, Y, X) or\n"
                                      "(T, C, Y, X) in any axis order, from their clear dates; clear entries are kept.")
    common(p_dc, "decloud")
    mask_options(p_dc, "clouded")

    p_dn = sub.add_parser("denoise", formatter_class=_Formatter, epilog=_epilog(masks=False),
                          help="remove Gaussian or shot (Poisson) noise",
                          description="Remove additive Gaussian noise, shot (Poisson-Gaussian) noise, or mixed noise "
                                      "from images or stacks.")
    common(p_dn, "denoise")
    g_noise = p_dn.add_argument_group("noise")
    g_noise.add_argument(
        "--sigma", type=_float_gt0, metavar="S",
        help="Gaussian noise: its standard deviation in the input's units (default: estimated per file)")
    g_noise.add_argument(
        "--noise", choices=("gaussian", "poisson", "mixed"), default="gaussian",
        help="gaussian (default); poisson: shot noise that grows with the signal (photon counts plus read "
             "noise, as in fluorescence and low-light images; variance = gain * value + offset, fitted per "
             "file and channel, stabilized by the generalized Anscombe transform; not with --sigma); or mixed: "
             "Gaussian (its own level per band) plus impulses (salt-and-pepper), stripes and dead lines, as in "
             "hyperspectral data")
    g_noise.add_argument(
        "--no-destripe", dest="destripe", action="store_false",
        help="with --noise mixed: do not look for stripes and dead lines (keeps genuine column-wide structure)")
    g_noise.add_argument(
        "--no-fallback", dest="fallback", action="store_const", const="none", default=None,
        help="Gaussian noise: always return the network's estimate, even where NL-means of the input, or a "
             "mix of the two, predicts the held-out noisy pixels better (by default that is then returned, "
             "and the log says so)")

    return parser


# ---------------------------------------------------------------------------- names and paths
def split_name(path) -> tuple[str, str]:
    """``'a/b.ome.tif'`` -> ``('b', '.ome.tif')``; unknown extensions give ``(stem, suffix)``."""
    name = Path(path).name
    low = name.lower()
    for ext in EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    p = Path(name)
    return p.stem, p.suffix


def _is_supported(path) -> bool:
    return split_name(path)[1].lower() in EXTENSIONS


def _is_tiff(path) -> bool:
    return split_name(path)[1].lower() in TIFF_EXTENSIONS


def _is_derived(path, mask_suffix) -> bool:
    """Masks, outputs, gradient outputs and hidden (temporary) files: never inputs of a folder/glob."""
    stem, _ = split_name(path)
    if Path(path).name.startswith("."):
        return True
    if mask_suffix and stem.endswith(mask_suffix):
        return True
    if stem.endswith(OUTPUT_SUFFIX):
        return True
    head, sep, tail = stem.rpartition(OUTPUT_SUFFIX + GRADIENT_INFIX)
    return bool(sep) and tail.isalpha() and len(tail) == 1


def _has_magic(text) -> bool:
    return any(ch in text for ch in "*?[")


def expand_inputs(items, mask_suffix=DEFAULT_MASK_SUFFIX, exclude=()):
    """Paths from files, folders and globs, in order, without duplicates.

    Returns ``(paths, problems)`` where ``problems`` is a list of ``(item, reason)``.
    """
    exclude = {os.path.normcase(os.path.abspath(e)) for e in exclude if e}
    out, seen, problems = [], set(), []

    def add(p, explicit):
        key = os.path.normcase(os.path.abspath(p))
        if key in seen or (not explicit and key in exclude):
            return
        seen.add(key)
        out.append(Path(p))

    for item in items:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found = sorted(p for p in Path(item).iterdir()
                           if p.is_file() and _is_supported(p) and not _is_derived(p, mask_suffix))
            if not found:
                problems.append((item, "folder holds no .tif/.tiff/.npy image"))
            for p in found:
                add(p, False)
        elif os.path.exists(item):
            add(Path(item), True)
        elif _has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True))
            found = [p for p in found if p.is_file() and _is_supported(p) and not _is_derived(p, mask_suffix)]
            if not found:
                problems.append((item, "no .tif/.tiff/.npy image matches this pattern"))
            for p in found:
                add(p, False)
        else:
            problems.append((item, "no such file or folder"))
    return out, problems


def find_mask(path, mask_suffix=DEFAULT_MASK_SUFFIX):
    """``NAME{mask_suffix}.EXT`` beside ``path`` (its own extension first), or ``None``."""
    path = Path(path)
    stem, ext = split_name(path)
    candidates = [ext] + [e for e in (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".npy") if e != ext.lower()]
    for e in candidates:
        for cand in (e, e.upper()):
            p = path.with_name(stem + mask_suffix + cand)
            if p.is_file():
                return p
    return None


def output_path(path, output_dir=None) -> Path:
    stem, ext = split_name(path)
    folder = Path(output_dir) if output_dir else Path(path).parent
    return folder / f"{stem}{OUTPUT_SUFFIX}{ext}"


def gradient_path(out, axis) -> Path:
    stem, ext = split_name(out)
    return Path(out).with_name(f"{stem}{GRADIENT_INFIX}{axis}{ext}")


# ---------------------------------------------------------------------------- reading
_GENERIC_AXES = set("IQ")  # tifffile's "image sequence" / "unknown": fall back to the defaults
_AXIS_NAMES = {"A": "angle", "P": "phase", "R": "tile", "H": "lifetime", "E": "lambda", "L": "exposure",
               "V": "event", "O": "other", "M": "mosaic"}


@dataclass
class ImageInfo:
    """What a file holds, read from its header (no pixels), and the metadata to write back."""

    path: Path
    shape: tuple
    dtype: np.dtype
    flavour: str                      # "imagej", "ome", "tiff" or "npy"
    file_axes: str | None = None      # tifffile's axes, e.g. "TCYX", "YXS"
    axes: str | None = None           # mapped to T Z C Y X, or None (use the defaults)
    axes_problem: str | None = None   # why file_axes cannot be mapped
    imagej: dict = field(default_factory=dict)
    ome: dict = field(default_factory=dict)
    resolution: tuple | None = None
    resolutionunit: object = None
    photometric_rgb: bool = False
    compress: bool = False
    n_series: int = 1

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def map_axes(file_axes: str):
    """tifffile axes -> (``TZCYX`` string or None, problem or None). ``S`` (samples) is a channel axis."""
    letters = []
    for a in file_axes.upper():
        if a in "TZCYX":
            letters.append(a)
        elif a == "S":
            letters.append("C")
        elif a in _GENERIC_AXES:
            return None, None
        else:
            what = _AXIS_NAMES.get(a, "unknown")
            return None, (f"the file's axes {file_axes!r} hold {a!r} ({what}), which napari-ngr cannot map to "
                          f"T, Z, C, Y, X; give --axes (e.g. --axes {'C' + 'YX' if len(file_axes) == 3 else 'TCYX'}) "
                          f"or --channel-axis")
    if letters.count("C") > 1:
        return None, (f"the file's axes {file_axes!r} have both channels (C) and samples (S); "
                      f"give --axes to say which is the channel axis")
    if "Y" not in letters or "X" not in letters:
        return None, None
    return "".join(letters), None


def _ome_image_meta(xml: str) -> dict:
    import tifffile

    try:
        d = tifffile.xml2dict(xml)
    except Exception:
        return {}
    image = d.get("OME", {}).get("Image", {})
    if isinstance(image, list):
        image = image[0] if image else {}
    pixels = image.get("Pixels", {}) or {}
    meta = {}
    if image.get("Name"):
        meta["Name"] = image["Name"]
    for k in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeZ", "TimeIncrement"):
        if pixels.get(k) is not None:
            meta[k] = pixels[k]
            if pixels.get(k + "Unit") is not None:
                meta[k + "Unit"] = pixels[k + "Unit"]
    channels = pixels.get("Channel")
    if isinstance(channels, dict):
        channels = [channels]
    if channels:
        names = [c.get("Name") if isinstance(c, dict) else None for c in channels]
        if all(n is not None for n in names):
            meta["Channel"] = {"Name": [str(n) for n in names]}
    return meta


_IJ_STRUCTURAL = {"ImageJ", "images", "channels", "slices", "frames", "hyperstack", "axes"}
_IJ_SPECIAL = {"Info", "Labels", "Ranges", "LUTs", "Properties", "ROI", "Overlays", "Plot"}


class _TiffLog(logging.Handler):
    """Collects tifffile's log records (e.g. "invalid offset to first page") while a file is read, so
    that they do not reach stderr on their own: a read that fails says them in its one error message."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        msg = re.sub(r"^<tifffile\.\w+[^>]*>\s*", "", msg).strip()  # "<tifffile.TiffPages @8> ..."
        if msg and msg not in self.messages:
            self.messages.append(msg)

    def __enter__(self):
        self.logger = logging.getLogger("tifffile")
        self.propagate = self.logger.propagate
        self.logger.addHandler(self)
        self.logger.propagate = False
        return self

    def __exit__(self, kind, exc, tb):
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate
        if isinstance(exc, Exception) and not isinstance(exc, MemoryError) and self.messages:
            note = "; ".join(self.messages)
            if note not in str(exc):
                raise ValueError(f"{_describe(exc)} ({note})") from None
        return False


def read_header(path) -> ImageInfo:
    """Shape, dtype, axes and metadata of an image file, without reading its pixels."""
    path = Path(path)
    if not _is_supported(path):
        raise ValueError(f"unsupported file type {split_name(path)[1]!r}; use .tif, .tiff, .ome.tif or .npy")
    if not _is_tiff(path):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return ImageInfo(path, tuple(arr.shape), arr.dtype, "npy")
    with _TiffLog():
        return _read_tiff_header(path)


def _read_tiff_header(path: Path) -> ImageInfo:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        if not tf.series:
            raise ValueError("the TIFF holds no image")
        s = tf.series[0]
        page = s.keyframe if s.keyframe is not None else tf.pages.first
        flavour = "imagej" if tf.is_imagej else "ome" if tf.is_ome else "tiff"
        info = ImageInfo(path, tuple(s.shape), np.dtype(s.dtype), flavour, file_axes=s.axes,
                         n_series=len(tf.series))
        info.axes, info.axes_problem = map_axes(s.axes)
        try:
            res = page.resolution
            if res and all(r and math.isfinite(r) for r in res) and tuple(res) != (1.0, 1.0):
                info.resolution = (float(res[0]), float(res[1]))
                info.resolutionunit = page.resolutionunit
        except Exception:
            pass
        info.photometric_rgb = int(page.photometric) == 2  # RGB
        info.compress = int(page.compression) in (8, 32946)  # (ADOBE_)DEFLATE: zlib, no extra codec
        if flavour == "imagej":
            md = tf.imagej_metadata or {}
            info.imagej = {k: v for k, v in md.items()
                           if k not in _IJ_STRUCTURAL and (k in _IJ_SPECIAL or isinstance(v, (str, int, float, bool)))}
        elif flavour == "ome":
            info.ome = _ome_image_meta(tf.ome_metadata or "")
    return info


def read_pixels(info: ImageInfo) -> np.ndarray:
    if info.flavour == "npy":
        return np.load(info.path, allow_pickle=False)
    import tifffile

    with _TiffLog(), tifffile.TiffFile(info.path) as tf:
        data = tf.series[0].asarray()
    if tuple(data.shape) != tuple(info.shape):
        data = data.reshape(info.shape)
    return data


def read_any(path) -> np.ndarray:
    return read_pixels(read_header(path))


# ---------------------------------------------------------------------------- writing
def convert_dtype(image: np.ndarray, dtype) -> np.ndarray:
    """The output dtype policy: integers rounded half to even and clipped to the dtype's range."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return np.clip(np.rint(image), 0, 1).astype(bool)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        work = image.astype(np.float64) if dt.itemsize >= 4 else np.asarray(image, np.float32)
        out = np.rint(work)
        # float(info.max) of a 64-bit type rounds up (to 2**63 or 2**64), which does not fit the
        # type and would wrap around: clip to the largest float that fits, then saturate exactly
        hi = float(info.max)
        top = out >= hi if int(hi) > info.max else None
        if top is not None:
            hi = float(np.nextafter(hi, -np.inf))
        np.clip(out, info.min, hi, out=out)
        res = out.astype(dt)
        if top is not None:
            res[top] = info.max
        return res
    image = np.asarray(image)
    if (np.issubdtype(dt, np.floating) and np.issubdtype(image.dtype, np.floating)
            and np.finfo(dt).max < np.finfo(image.dtype).max):
        fi = np.finfo(dt)  # e.g. float16: saturate instead of overflowing to inf
        return np.clip(image, fi.min, fi.max).astype(dt)
    return image.astype(dt, copy=False)


def _keep_observed(data: np.ndarray, keep) -> np.ndarray:
    """``data`` with its observed entries (``keep = (observed, input)``) set to the input's own values.

    The restored float32 image holds values with more than 24 bits of precision (int32 above 2**24,
    float64) only approximately: in the input's dtype the observed entries are copied from the input.
    """
    if keep is None:
        return data
    observed, original = keep
    original = np.asarray(original)
    if original.shape != data.shape or original.dtype.newbyteorder("=") != data.dtype.newbyteorder("="):
        return data  # --dtype float32: the restored image holds float32(input) there already
    observed = np.broadcast_to(np.asarray(observed, bool), data.shape)
    if not data.flags.writeable or not data.flags.owndata:
        data = data.copy()
    np.copyto(data, original, casting="unsafe", where=observed)
    return data


def write_tiff(path, data: np.ndarray, info: ImageInfo | None, *, layout_axes=None, is_gradient=False):
    """Write ``data`` (the input's shape) in the input's TIFF flavour with its metadata."""
    import tifffile

    kwargs = {}
    flavour = info.flavour if info is not None else "npy"
    if info is not None and info.resolution:
        kwargs["resolution"] = info.resolution
        if info.resolutionunit is not None:
            kwargs["resolutionunit"] = info.resolutionunit
    want_ome = split_name(path)[1].lower().startswith(".ome")
    if flavour == "imagej" and data.dtype in (np.uint8, np.uint16, np.int16, np.float32):
        md = {"axes": info.file_axes}
        md.update({k: v for k, v in info.imagej.items()
                   if not (is_gradient and k in ("min", "max", "Ranges"))})
        tifffile.imwrite(path, data, imagej=True, metadata=md, **kwargs)
        return
    from_npy = info is None or info.flavour == "npy"
    axes = None
    if not from_npy and info.file_axes and len(info.file_axes) == data.ndim:
        axes = info.file_axes
        if (flavour == "ome" or want_ome) and set(axes) - set("TZCSYX"):
            axes = None  # e.g. tifffile's "I" (page sequence): OME needs real letters
    if axes is None:  # the layout's letters; a last channel axis is stored as TIFF samples
        axes = layout_axes
        if axes and axes.endswith("C"):
            axes = axes[:-1] + "S"
    kwargs.update(_photometric(axes, data.shape, rgb_file=bool(info and info.photometric_rgb), from_npy=from_npy))
    if info is not None and info.compress:
        kwargs["compression"] = "zlib"
    if flavour == "ome" or want_ome:
        md = {"axes": axes} if axes else {}
        if info is not None:
            md.update(info.ome)
            ch = md.get("Channel", {}).get("Name")
            n_ch = data.shape[axes.index("C")] if axes and "C" in axes else \
                data.shape[axes.index("S")] if axes and "S" in axes else 1
            if ch is not None and len(ch) != n_ch:
                md.pop("Channel")
        tifffile.imwrite(path, data, ome=True, metadata=md, **kwargs)
        return
    md = {"axes": axes} if axes and len(axes) == data.ndim and not (set(axes) & _GENERIC_AXES) else {}
    tifffile.imwrite(path, data, ome=False, metadata=md, **kwargs)


def _photometric(axes, shape, *, rgb_file, from_npy) -> dict:
    """photometric/planarconfig for TIFF axes: samples (S) last are contiguous, before Y X separate.

    RGB when the input TIFF was RGB (3 or 4 samples), or for 3 samples from a .npy array.
    """
    if not axes or "S" not in axes or len(axes) != len(shape):
        return {"photometric": "minisblack"}
    i = axes.index("S")
    if i == len(axes) - 1:
        planar = "contig"
    elif i == len(axes) - 3:
        planar = "separate"
    else:
        return {"photometric": "minisblack"}
    rgb = (rgb_file and shape[i] in (3, 4)) or (from_npy and shape[i] == 3)
    return {"photometric": "rgb" if rgb else "minisblack", "planarconfig": planar}


def write_npy(path, data):
    with open(path, "wb") as fh:
        np.save(fh, data, allow_pickle=False)


def write_output(path, data, info, *, layout_axes=None, is_gradient=False):
    """Write ``data`` to ``path`` in the format of ``path``'s extension. (Replaceable in tests.)"""
    if _is_tiff(path):
        write_tiff(path, data, info, layout_axes=layout_axes, is_gradient=is_gradient)
    else:
        write_npy(path, data)


def _temp_path(final: Path) -> Path:
    stem, ext = split_name(final)
    for _ in range(100):
        p = final.with_name(f".{stem}.partial-{secrets.token_hex(4)}{ext}")
        try:
            with open(p, "xb"):
                return p
        except FileExistsError:
            continue
    raise OSError(f"cannot create a temporary file beside {final}")


def atomic_write(final, writer: Callable[[Path], None], *, overwrite=False):
    """Write through ``writer(tmp)`` to a hidden temporary file beside ``final``, then rename it.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``final`` is
    untouched. Without ``overwrite`` an output that appeared meanwhile is not replaced.
    """
    final = Path(final)
    tmp = _temp_path(final)
    try:
        writer(tmp)
        if not overwrite and final.exists():
            raise FileExistsError(f"{final} appeared while it was being written; not replaced")
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------- memory
def available_ram():
    """Bytes of memory available to a new job, or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _gpu_free(device):
    try:
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    except Exception:
        return None


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n < 100e9 else f"{n / 1e9:.0f} GB"


# ---------------------------------------------------------------------------- one batch
@dataclass
class _Item:
    src: Path
    out: Path | None = None
    mask: Path | None = None
    info: ImageInfo | None = None
    channel_axis: int | None = None
    axes: str | None = None
    axis_names: list = field(default_factory=list)
    targets: list = field(default_factory=list)   # [(kind, path)] still to write
    status: str = "todo"                          # todo, skipped, failed, done
    reason: str = ""
    needed: int = 0
    host: int = 0
    core: int = 0


class _Reporter:
    def __init__(self, quiet: bool, bars: bool):
        self.quiet, self.bars = quiet, bars
        self.file_bar = None

    def log(self, msg, *, error=False):
        if self.quiet and not error:
            return
        if self.file_bar is not None:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


def _layout_for(info: ImageInfo, args):
    if args.axes:
        return None, args.axes, "--axes"
    if args.channel_axis is not None:
        return args.channel_axis, None, "--channel-axis"
    if info.axes_problem:
        raise ValueError(info.axes_problem)
    if info.axes:
        return None, info.axes, f"the file's axes {info.file_axes!r}"
    return None, None, "the defaults"


def _decloud_axes_for(info: ImageInfo, args):
    """The axes (letters T, C, Y, X) of a file to decloud, and where they came from.

    T: ``--time-axis``, else the T of ``--axes`` or of the file's axes, else axis 0; C:
    ``--channel-axis``, else the C of those axes, else none; the other two axes are Y, X.
    """
    from .api import _decloud_layout

    shape, ndim = tuple(info.shape), len(info.shape)
    if args.axes and len(args.axes) != ndim:
        raise ValueError(f"--axes {args.axes} has {len(args.axes)} letters but the image is {ndim}-D (shape {shape})")
    explicit = args.axes or args.time_axis is not None or args.channel_axis is not None
    if info.axes_problem and not explicit:
        raise ValueError(info.axes_problem)
    named = args.axes or (None if info.axes_problem else info.axes)
    where = "--axes" if args.axes else f"the file's axes {info.file_axes!r}"
    if args.time_axis is not None:
        ta, t_src = args.time_axis, "--time-axis"
    elif named and "T" in named:
        ta, t_src = named.index("T"), where
    else:
        ta, t_src = 0, "the default"
    if args.channel_axis is not None:
        ca, c_src = args.channel_axis, "--channel-axis"
    elif named and "C" in named:
        ca, c_src = named.index("C"), where
    else:
        ca, c_src = None, None
    source = f"time axis {ta} from {t_src}" + (f", band axis {ca} from {c_src}" if ca is not None else "")
    if ndim == 2 or (ndim == 3 and ca is not None):
        raise ValueError(f"a single date (shape {shape}, {source}): decloud needs a time series of at least "
                         f"2 dates along a T axis; use inpaint for a single image")
    try:
        return _decloud_layout(shape, ta, ca).axes, source
    except ValueError as exc:
        raise ValueError(f"{exc} [{source}; set them with --time-axis and --channel-axis]") from None


def _plan(item: _Item, args, task, limit, ram, gpu_free, device):
    """Header, layout, outputs still to write, mask and memory of one input; sets status/reason."""
    from . import estimate_memory
    from ._layout import resolve_layout

    overwrite = args.overwrite
    if not args.gradients and not overwrite and item.out.exists():
        item.status, item.reason = "skipped", f"{item.out} exists (--overwrite replaces it)"
        return
    info = read_header(item.src)
    item.info = info
    if task == "decloud":
        (axes, source), ca = _decloud_axes_for(info, args), None
    else:
        ca, axes, source = _layout_for(info, args)
    try:
        layout = resolve_layout(info.shape, ca, axes)
    except ValueError as exc:
        raise ValueError(f"{exc} [shape {info.shape}, axes from {source}; set them with --axes]") from None
    item.channel_axis, item.axes = ca, axes
    item.axis_names = list(layout.axis_names())
    wanted = [("image", item.out)]
    if args.gradients:
        wanted = [(f"grad-{a}", gradient_path(item.out, a)) for a in item.axis_names] + wanted
    item.targets = [(k, p) for k, p in wanted if overwrite or not p.exists()]
    if not item.targets:
        item.status, item.reason = "skipped", f"{item.out} exists (--overwrite replaces it)"
        return
    if task in MASK_TASKS:
        if item.mask is None:  # normally found (and protected from being an output) by _run
            item.mask = Path(args.mask) if args.mask else find_mask(item.src, args.mask_suffix)
        if item.mask is None:
            stem, ext = split_name(item.src)
            raise ValueError(f"no mask for {item.src.name}: expected {stem}{args.mask_suffix}{ext} "
                             f"(or .tif, .tiff, .npy) beside it, or give --mask FILE")
    n = int(np.prod(info.shape))
    item.core = estimate_memory(info.shape, channel_axis=ca, axes=axes)
    item.host = info.nbytes + n * 4 * 3 + (n if task in MASK_TASKS else 0)
    if args.gradients:
        item.host += n * 4 * len(item.axis_names)
    item.needed = item.core + item.host
    if args.max_memory is None and device.type == "cuda":
        checks = [(item.core, gpu_free, "free GPU memory"), (item.host, ram, "available RAM")]
    else:
        checks = [(item.needed, limit, "--max-memory" if args.max_memory is not None else "available RAM")]
    for need, have, what in checks:
        if have is not None and need > have:
            item.status = "failed"
            item.reason = (f"refused: needs about {_gb(need)} of memory, more than the {_gb(have)} of {what} "
                           f"(shape {info.shape}); crop or split the stack, use a machine or GPU with more memory, "
                           f"or raise --max-memory if the estimate is too cautious")
            return


def _run_one(item: _Item, args, task, device, rep: _Reporter, prefix: str):
    import warnings

    from . import DEFAULTS, prepare_decloud, prepare_denoise, prepare_inpaint

    info = item.info
    image = read_pixels(info)
    common = dict(channel_axis=item.channel_axis, axes=item.axes, iterations=args.iterations,
                  spatial_weight=args.spatial_weight, channel_weight=args.channel_weight,
                  stack_weight=args.stack_weight, seed=args.seed, device=device, precision=args.precision)
    if task in MASK_TASKS:
        try:
            mask = read_any(item.mask)
        except Exception as exc:
            raise ValueError(f"cannot read the mask {item.mask}: {_describe(exc)}") from None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                if task == "decloud":  # item.axes: T, C, Y, X as planned (_decloud_axes_for)
                    axes = common.pop("axes")
                    common.update(time_axis=axes.index("T"), channel_axis=axes.index("C") if "C" in axes else None)
                    job = prepare_decloud(image, mask, **common)
                else:
                    job = prepare_inpaint(image, mask, **common)
        except ValueError as exc:
            raise ValueError(f"{exc} (mask {item.mask.name})") from None
        for w in caught:  # e.g. pixels clouded on every date: one log line each
            rep.log(f"{prefix} {item.src}: warning: {w.message}")
        del mask
    else:
        extra = {} if args.fallback is None else dict(fallback=args.fallback)
        job = prepare_denoise(image, sigma=args.sigma, noise=args.noise, destripe=args.destripe, **common, **extra)
    t0 = time.perf_counter()
    bar = None
    if rep.bars:
        from tqdm import tqdm

        bar = tqdm(total=job.total, desc=item.src.name[:30], unit="it", position=1, leave=False,
                   file=sys.stderr, dynamic_ncols=True)
    try:
        for rec in job.iterate():
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{rec.loss:.3g}"}
                if rec.validation is not None:
                    post["val"] = f"{rec.validation:.3g}"
                bar.set_postfix(post, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    res = job.result()
    elapsed = time.perf_counter() - t0
    keep = getattr(job, "keep", None)  # inpaint/decloud: (observed entries, the input itself)
    del job
    layout_axes = item.axes
    if layout_axes is None:
        from ._layout import resolve_layout

        layout_axes = resolve_layout(info.shape, item.channel_axis, None).axes
    out_dtype = np.float32 if args.dtype == "float32" else np.dtype(info.dtype).newbyteorder("=")
    written = []
    for kind, path in item.targets:  # gradients first, the image last
        if kind == "image":
            data = _keep_observed(convert_dtype(res.image, out_dtype), keep)
        else:
            data = res.gradients[kind[len("grad-"):]].astype(np.float32, copy=False)
        atomic_write(path, lambda tmp, d=data, g=(kind != "image"): write_output(
            tmp, d, info, layout_axes=layout_axes, is_gradient=g), overwrite=args.overwrite)
        written.append(path)
    extra = f", sigma {res.sigma:.4g}" if res.sigma is not None else ""
    if getattr(res, "channel_sigmas", None) is not None:  # channels of different noise, whitened
        extra = ", sigma per channel " + " / ".join(f"{v:.4g}" for v in res.channel_sigmas)
    if getattr(res, "noise_variance", None) is not None:  # --noise poisson: the fitted model, per channel
        extra = ", noise variance " + " / ".join(f"{g:.4g} * value {o:+.4g}" for g, o in res.noise_variance)
    if res.final_weight is not None:
        extra += f", data weight x{res.final_weight:g}"
    n_grad = sum(1 for k, _ in item.targets if k != "image")
    if any(k == "image" for k, _ in item.targets):
        target = f"{item.out}" + (f" (+{n_grad} gradient file(s))" if n_grad else "")
    else:
        target = f"{', '.join(p.name for p in written)} (missing gradient file(s); {item.out.name} kept)"
    if res.start is not None:
        extra += f", start {res.start}"
    item.reason = (f"{res.iteration} iterations in {elapsed:.1f} s on {device} ({res.precision}), returned "
                   f"iteration {res.best_iteration} ({res.stop_reason}{extra})")
    warmup = DEFAULTS[task]["options"].get("warmup", 0) if task in MASK_TASKS else 0
    start = {"temporal": "temporal-fill", "dct": "block-DCT", "nonlocal": "nonlocal-patch", "stack": "along-Z/T"}.get(res.start, "biharmonic")
    if warmup and res.iteration <= warmup:
        item.reason += f"; the budget ended within the {warmup}-iteration warm-up: the {start} start was returned"
    elif warmup and res.best_iteration <= warmup:
        item.reason += f"; the {start} start was returned (no iterate beat it on the held-out pixels)"
    if res.nlmeans_note:
        item.reason += f"; {res.nlmeans_note}"
    if info.n_series > 1:
        item.reason += f"; only the first of the file's {info.n_series} series was restored"
    rep.log(f"{prefix} {item.src} -> {target}: done, {item.reason}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, (ValueError, FileExistsError)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}" if exc.filename else str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    name = type(exc).__name__
    if name == "TiffFileError":
        return f"not a readable TIFF ({exc})"
    if name == "OutOfMemoryError":
        return f"out of GPU memory ({exc}); use --device cpu, a smaller stack or --max-memory"
    return f"{name}: {exc}"


def _check_axes_agree(args, task):
    """``--channel-axis`` / ``--time-axis`` given with ``--axes`` must name the same axes (usage error)."""
    axes = args.axes
    if not axes:
        return
    n = len(axes)
    checks = [("--channel-axis", args.channel_axis, "C", "the channels")]
    if task == "decloud":
        checks.append(("--time-axis", getattr(args, "time_axis", None), "T", "the dates"))
    for opt, ax, letter, what in checks:
        if ax is None:
            continue
        if not -n <= ax < n:
            raise _UsageError(f"{opt} {ax} is out of range for --axes {axes} ({n} axes)")
        got = axes[ax % n]
        if got == letter or (letter == "T" and "T" not in axes and got not in "CYX"):
            continue
        where = f"; {what} are axis {axes.index(letter)}" if letter in axes else f"; --axes {axes} has no {letter}"
        raise _UsageError(f"{opt} {ax} disagrees with --axes {axes} (axis {ax} is {got}{where}); "
                          f"give one of them, or make them agree")


def _check_output_folder(folder: Path, label: str):
    """Create the output folder (if needed) and check that a file can be written there: one usage error
    up front instead of one failure per file."""
    folder = folder if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temp_path(folder / ".napari-ngr-write-test")
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise _UsageError(f"{label}: cannot create the folder {folder} or write in it ({why})") from None


def _path_key(path) -> str:
    return os.path.normcase(os.path.realpath(path))


class _Protected:
    """The inputs and masks of a run, by name and (through links, case-insensitive names) by file."""

    def __init__(self):
        self.keys, self.ids = {}, {}

    def add(self, path, what: str):
        self.keys.setdefault(_path_key(path), what)
        try:
            st = os.stat(path)
        except OSError:
            return
        if st.st_ino:  # 0 where the file system has no inode numbers
            self.ids.setdefault((st.st_dev, st.st_ino), what)

    def what(self, path) -> str | None:
        """``"the input PATH"``, ``"the mask of NAME"``... when ``path`` is one of them, else None."""
        found = self.keys.get(_path_key(path))
        if found is not None:
            return found
        try:
            st = os.stat(path)
        except OSError:
            return None
        return self.ids.get((st.st_dev, st.st_ino))


class _Terminated(KeyboardInterrupt):
    pass


def _run(args) -> int:
    from . import __version__, resolve_device

    task = args.task
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if task == "denoise" and args.noise == "poisson" and args.sigma is not None:
        raise _UsageError("--sigma is for Gaussian noise: --noise poisson fits its noise model to each file")
    mask_suffix = getattr(args, "mask_suffix", DEFAULT_MASK_SUFFIX)
    mask_file = getattr(args, "mask", None)
    if mask_file is not None and not os.path.isfile(mask_file):
        raise _UsageError(f"--mask {mask_file}: no such file")
    if task in MASK_TASKS and not mask_suffix:
        raise _UsageError("--mask-suffix must not be empty")
    if args.output and args.output_dir:
        raise _UsageError("give either -o/--output (one input) or --output-dir, not both")
    if args.output and not _is_supported(args.output):
        raise _UsageError(f"-o {args.output}: the name must end with .tif, .tiff, .ome.tif or .npy")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise _UsageError(f"--output-dir {args.output_dir} exists and is not a folder")
    _check_axes_agree(args, task)

    paths, problems = expand_inputs(args.inputs, mask_suffix, exclude=[mask_file])
    if not paths:
        raise _UsageError("no input file: " + "; ".join(f"{p}: {r}" for p, r in problems))
    if args.output and len(paths) + len(problems) != 1:
        raise _UsageError(f"-o/--output names one output but {len(paths)} inputs were given; use --output-dir")
    quiet = args.quiet
    bars = not quiet and sys.stderr.isatty()
    rep = _Reporter(quiet, bars)

    failed_inputs = [(_Item(Path(p), status="failed", reason=r)) for p, r in problems]
    # no output (image or gradient) may ever be an input or a mask, whatever --overwrite says
    items = [_Item(p) for p in paths]
    protected = _Protected()
    for it in items:
        protected.add(it.src, f"the input {it.src}")
    for it in items:
        if task in MASK_TASKS:
            it.mask = Path(mask_file) if mask_file else find_mask(it.src, mask_suffix)
            if it.mask is not None:
                protected.add(it.mask, f"the mask {it.mask}" if mask_file else f"the mask of {it.src.name}")
    claimed = {}
    for it in items:
        it.out = Path(args.output) if args.output else output_path(it.src, args.output_dir)
        key = _path_key(it.out)
        clash = protected.what(it.out)
        if clash:
            if args.output:
                raise _UsageError(f"-o {args.output} is an input or the mask ({clash}); it is never overwritten")
            it.status, it.reason = "failed", f"its output {it.out} is {clash}; it is never overwritten"
        elif key in claimed:
            it.status, it.reason = "failed", f"same output {it.out} as {claimed[key]}"
        else:
            claimed[key] = it.src

    ram = available_ram()
    gpu_free = _gpu_free(device) if device.type == "cuda" else None
    if args.max_memory is not None:
        limit, limit_what = int(args.max_memory * 1e9), "--max-memory"
    elif device.type == "cuda":
        limit, limit_what = gpu_free, "free GPU memory"
    else:
        limit, limit_what = ram, "available RAM"

    for it in items:
        if it.status != "todo":
            continue
        try:
            _plan(it, args, task, limit, ram, gpu_free, device)
        except Exception as exc:
            it.status, it.reason = "failed", f"cannot read {it.src.name}: {_describe(exc)}" \
                if it.info is None else _describe(exc)
        for kind, path in it.targets if it.status == "todo" else ():
            if kind == "image":
                continue
            key, clash = _path_key(path), protected.what(path)
            if clash:
                if args.output:
                    raise _UsageError(f"-o {args.output}: its gradient file {path} is an input or the mask "
                                      f"({clash}); it is never overwritten")
                it.status, it.reason = "failed", f"its gradient output {path} is {clash}; it is never overwritten"
            elif claimed.setdefault(key, it.src) != it.src:
                it.status, it.reason = "failed", f"same output {path} as {claimed[key]}"
            if it.status != "todo":
                break

    if any(it.status == "todo" for it in items):  # one usage error, not one failure per file
        if args.output_dir:
            _check_output_folder(Path(args.output_dir), f"--output-dir {args.output_dir}")
        elif args.output:
            _check_output_folder(Path(args.output).parent, f"-o {args.output}")

    all_items = failed_inputs + items
    n = len(all_items)
    todo = [it for it in items if it.status == "todo"]
    rep.log(f"{PROG} {__version__}: {task}, {n} input(s) ({len(todo)} to do), device {device}")
    if todo:
        big = max(todo, key=lambda i: i.needed)
        lim = f"{_gb(limit)} ({limit_what})" if limit is not None else "unknown (pass --max-memory to set one)"
        rep.log(f"memory: the largest job ({big.src.name}, shape {big.info.shape}) needs about "
                f"{_gb(big.needed)}; limit {lim}")
    for it in all_items:
        if it.status == "failed" and it.reason.startswith("refused"):
            rep.log(f"{it.src}: {it.reason}", error=True)

    file_bar = None
    if bars:
        from tqdm import tqdm

        file_bar = tqdm(total=n, desc="files", unit="file", position=0, file=sys.stderr, dynamic_ncols=True)
        rep.file_bar = file_bar
    interrupted = None
    try:
        for i, it in enumerate(all_items, 1):
            prefix = f"[{i}/{n}]"
            if it.status == "skipped":
                rep.log(f"{prefix} {it.src}: skipped, {it.reason}")
            elif it.status == "failed":
                if not it.reason.startswith("refused"):
                    rep.log(f"{prefix} {it.src}: FAILED: {it.reason}", error=True)
            else:
                if file_bar is not None:
                    file_bar.set_postfix_str(it.src.name[:40], refresh=True)
                # another run on the same files may have written them meanwhile
                it.targets = [(k, p) for k, p in it.targets if args.overwrite or not p.exists()]
                if not it.targets:
                    it.status, it.reason = "skipped", f"{it.out} exists (written meanwhile by another run)"
                    rep.log(f"{prefix} {it.src}: skipped, {it.reason}")
                    if file_bar is not None:
                        file_bar.update(1)
                    continue
                try:
                    it.out.parent.mkdir(parents=True, exist_ok=True)
                    _run_one(it, args, task, device, rep, prefix)
                    it.status = "done"
                except KeyboardInterrupt as exc:
                    it.status, it.reason = "interrupted", "interrupted"
                    interrupted = exc
                    break
                except Exception as exc:
                    it.status, it.reason = "failed", _describe(exc)
                    rep.log(f"{prefix} {it.src}: FAILED: {it.reason}", error=True)
            if file_bar is not None:
                file_bar.update(1)
    finally:
        if file_bar is not None:
            file_bar.close()
            rep.file_bar = None

    done = [it for it in all_items if it.status == "done"]
    skipped = [it for it in all_items if it.status == "skipped"]
    failed = [it for it in all_items if it.status == "failed"]
    not_run = [it for it in all_items if it.status == "todo"]
    summary = f"{PROG}: {len(done)} done, {len(skipped)} skipped, {len(failed)} failed"
    if interrupted is not None:
        how = "SIGTERM" if isinstance(interrupted, _Terminated) else "Ctrl-C"
        summary += (f", 1 interrupted ({how}; no partial output left), {len(not_run)} not started; "
                    f"run the same command again to resume")
    if failed:
        summary += ":\n" + "\n".join(f"  {it.src}: {it.reason}" for it in failed)
    if interrupted is not None or failed or not quiet:
        rep.log(summary, error=bool(failed) or interrupted is not None)
    if interrupted is not None:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a file failed, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)

    threads = None
    if args.threads:  # restored afterwards: main() may be called from Python
        import torch

        threads = torch.get_num_threads()
    old = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and hasattr(signal, "SIGTERM"):
        def _term(signum, frame):
            raise _Terminated()

        try:
            old = signal.signal(signal.SIGTERM, _term)
        except (ValueError, OSError):
            old = None
    try:
        return _run(args)
    except _UsageError as exc:
        print(f"{PROG} {args.task}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before or after the batch loop (which handles its own)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
