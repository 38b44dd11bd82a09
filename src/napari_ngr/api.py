"""Public functions: :func:`inpaint`, :func:`denoise` and the jobs underneath them."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ._device import resolve_device
from ._layout import Layout, resolve_layout
from .operators import Denoising, Inpainting, MixedNoise, fit_noise_variance, noise_rms
from .solver import Progress, Restoration, SolverOptions, finite_number

__all__ = ["inpaint", "denoise", "decloud", "prepare_inpaint", "prepare_denoise", "prepare_decloud", "RestorationJob",
           "RestorationResult", "DEFAULTS", "estimate_memory"]

#: Task defaults (normalized [0, 1] intensities). Tuned on the method, not on one image:
#: see ``benchmarks/quality.py`` and docs/design.md.
DEFAULTS = {
    # Inpainting: the held-out error typically rises for the first ~100-150 ADMM iterations
    # (the network has not yet fitted the start's gradients) before it falls below the start,
    # so early stopping only starts after ``min_iterations``. Patience counts from the last gain of
    # at least 1 % in held-out error (``patience_tol``): later gains of a few hundredths of a dB
    # are not worth minutes (astronaut 10 %: stops at 490 instead of 600 iterations, -0.01 dB).
    # Patience 30 checks (300 iterations), not 15: on stacks the held-out error falls slowly and
    # unevenly to the end of the budget, and with 15 the stop fired early where it paused (scan
    # lines: 740 iterations, 50.30 dB, 52.13 with 30; 31-band cube with dead columns: 500, 44.91 dB,
    # 47.03 with 30); the best held-out iterate is returned either way, so it costs only time.
    # More than 4 channels are spectral bands: their gradient gets ``band_weight`` (see denoise).
    # Budget 1200, but the loop gives up on the start at half of it (``start_deadline``): on stacks
    # the held-out error rises to 1.3-2.7x the start's before it falls below it (camera-pan video
    # at 20 %: at iteration 260; synthetic Z-stack at 20 %: about 480) and still falls at 1200
    # (Z-stack 43.91 dB at 600, 45.48 at 1200; video 28.42 -> 28.75), while on the photos no
    # iterate beats the nonlocal start in 600 iterations (held-out error 0.99-1.1x the start's at
    # 600), so they stopped at 600 as under the former budget. See docs/design.md (traces).
    # ``planar_options``: a single image (no Z or T axis, at most 4 channels) gives up on the start
    # at a quarter of the budget (300 of 1200). Traced on 12 photos and masks (camera at 10 and 50 %,
    # coffee per entry and blobs, moon, chelsea, rocket, brick, immunohistochemistry with dropped
    # lines, coins with blobs, astronaut per entry, Hubble field; /tmp driver, start_deadline off,
    # 600 iterations): where an iterate beat the start (5 of 12) it did so by iteration 60-200;
    # where none had by 300, none did by 600. The astronaut's rows return the start either way,
    # 18-22 s sooner on 2 cores. On 512^2 planes the first beat came later (camera 50 %: 430, brick
    # 30 %: 400; coffee with blobs: none), so the quarter holds up to 256^2 pixels
    # (``PLANAR_DEADLINE_PIXELS``) and grows with the pixel count above, up to half the budget.
    "inpaint": dict(iterations=1200, spatial_weight=1.0, channel_weight=0.5, stack_weight=1.0, band_weight=2.0,
                    options=dict(mu=5.0, holdout=0.03, check_every=10, patience=30, patience_tol=0.01,
                                 min_iterations=250, start_deadline=0.5, guide=0.6, guide_refresh=0, warmup=50),
                    planar_options=dict(start_deadline=0.25)),
    # Decloud: inpainting of the clouded entries, started from the temporal fill (nearest clear
    # date after a per-band gain/offset fit). Tuned on 10 scenes of benchmarks/decloud.py's
    # generator (5 images, 2 seeds): the error on the clouds still falls at 600 iterations and
    # the held-out error is noisy, so the whole budget runs and its best held-out iterate is kept;
    # clouds often sit on one date, so 2 % held out (not 3 %) keeps more of that date's clear pixels.
    # Bilinear upsampling: the fields must carry smooth illumination changes across whole clouds;
    # nearest upsampling cost 0.9-2.4 dB on the three scenes of benchmarks/decloud.py.
    "decloud": dict(iterations=800, spatial_weight=1.0, channel_weight=0.5, stack_weight=1.0,
                    options=dict(mu=5.0, holdout=0.02, check_every=10, patience=15, min_iterations=800,
                                 guide=0.6, guide_refresh=0, warmup=50, upsample="bilinear")),
    # Denoising: more than 4 channels are bands of a spectrum (multi-/hyperspectral), whose
    # neighbours are far more alike than R, G and B: their gradient gets ``band_weight``.
    # ``final_weight="auto"``: the returned image re-solves the X-update with the averaged network
    # gradients and the data weight times a multiplier chosen without ground truth, by the
    # estimated error on ``holdout`` (5 %) of the noisy entries, left out of the data term from the
    # start (Restoration.final_weight). The best multiplier differs by image: 0.1-0.15 on smooth
    # photos and dark-background fluorescence, 0.25-0.5 on the astronaut and coins, 0.7 on the
    # camera-pan video, 2-4 on grass; the former fixed 0.5 (photos) and 1.0 (stacks) lost up to
    # 5.9 dB (synthetic Z-stack sample), 1.7 dB (time-lapse crop) and 0.4 dB (grass).
    # ``guide``: the network's input carries the current estimate smoothed by a Gaussian of this
    # many pixels (refreshed every ``guide_refresh`` iterations). 1.0 rather than 0.6: measured on
    # 8 photos (5 grayscale, 3 RGB) and the camera-pan video at sigma 0.1, and 2 photos at sigma 0.05
    # and 0.2, it gains on 10 of 13 cases (moon +1.6, camera +0.6, chelsea +0.6 dB; +3.9 dB in all)
    # and loses on fine texture (grass -0.8), the astronaut (-0.4) and the video (-0.1): with 0.6
    # the network could copy the noise through its input.
    # ``discrepancy``: Gaussian denoising stops when the residual y - x has the variance that exact
    # gradients would leave (the discrepancy principle; SolverOptions.discrepancy), within the
    # ``iterations`` budget. The best iteration count differs by image: 25-50 on a smooth photo
    # (moon), 600 and more on the astronaut and the camera-pan video, which were still improving
    # at the former fixed 250. Measured on 8 photos at sigma 0.1 and 3 at 0.05/0.2 and the video:
    # never worse than the fixed 250 by more than 0.03 dB, up to +3.8 dB (moon, sigma 0.2). It needs the RMS
    # noise level: sigma=None estimates it with noise_rms (shot noise: Z-stack sample 33.57 dB, was 32.96).
    # ``noise="mixed"`` has no closed-form residual level: it keeps a fixed ``mixed_iterations``.
    # ``planar_options``: Gaussian denoising of images without a stack axis and with at most 4
    # channels (grey and colour photographs, single planes) starts from, and guides the network by,
    # a low-rank patch-group denoising of the observation, its patches matched on its NL-means
    # (``prefilter="lowrank"``, operators.low_rank_denoise; measured at sigma 0.1 against the
    # NL-means prefilter: astronaut 31.01 / 29.83 dB, coffee 31.05 / 29.97, brick 32.04 / 31.01,
    # camera 30.50 / 30.24, moon 34.74 / 34.92; sigma 0.2: astronaut 27.08 / 25.95, camera
    # 26.99 / 26.96; it costs 2-3 s per 256 x 256 RGB image), and returns the check (every 25
    # iterations) whose held-out error, as final_weight="auto" estimates it, is lowest (``select=
    # "holdout"``; stop after 4 checks without a new best). The discrepancy stop fires too early from
    # that start; it remains the fallback where nothing is held out (fixed final_weight, tiny images).
    # Measured at sigma 0.1 (benchmarks/quality.py; docs/design.md): +1.0 dB on the astronaut, +1.9 dB on
    # camera, -0.1 dB on brick (NL-means start against none, before the low-rank one). From the
    # low-rank start the network adds little (astronaut sigma 0.1: the start alone 31.09 dB, the
    # returned check 30.82 at 250 iterations, 30.90 at 300, 31.01 at 425; most photos stop before
    # 300), so single images get ``planar_iterations``: 250, not 300 since the 2-core Intel Xeon ran
    # 300 in 34-38 s (12 photo cases, sigma 0.05-0.2: 250 against 300 -0.025 dB on average, at most -0.10).
    # Stacks and spectra keep the Gaussian guide of the estimate,
    # refreshed: a per-plane NL-means ignores the third axis that NGR uses there (synthetic Z-stack:
    # -0.9 dB with it).
    # ``fallback="nlmeans"``: a leave-one-out NL-means (nl_means_stack; on stacks with 2-D patches
    # matched across +-2 planes) and mixes of it with the NGR image compete with the NGR image on the
    # held-out entries (Restoration.nlmeans_weight). On stacks the NL-means may instead take its
    # weights from a low-rank pilot matched across +-2 planes (operators.low_rank_denoise), h chosen
    # on the held-out entries (solver.GUIDED_H). Measured (docs/design.md): on the camera-pan video NL-means
    # returned, 32.64 dB (31.66 before the pilot; NGR 28.44); Z-stack 25 % mixed, 40.07 (39.34).
    # Each candidate also comes with the weight 1 on an entry's own value (solver.OWN, unless the
    # noise grows with the signal), and the mixes of every candidate are scored: 6 photos at sigma
    # 0.05 / 0.1, +0.0 to +1.2 dB; camera-pan video at sigma 0.05 / 0.1 / 0.2, +0.55 / +0.27 / +0.09.
    # Not for spectra (``band_options``).
    "denoise": dict(iterations=600, mixed_iterations=250, planar_iterations=250, spatial_weight=1.0, channel_weight=0.5, stack_weight=0.5,
                    band_weight=2.0,
                    options=dict(ema=0.9, holdout=0.05, guide=1.0, guide_refresh=25, data_weight=0.01,
                                 final_weight="auto", discrepancy=1.0, min_iterations=20, fallback="nlmeans"),
                    planar_options=dict(prefilter="lowrank", select="holdout", check_every=25, patience=4),
                    band_options=dict(fallback="none")),
}


@dataclass
class RestorationResult:
    """What a finished (or cancelled) restoration returns.

    Attributes
    ----------
    image : ndarray, float32
        The restored image, input's shape and intensity units.
    gradients : dict of str to ndarray
        Forward-difference gradient maps of ``image`` along each regularized axis
        (``"y"``, ``"x"``, and ``"c"``, ``"z"`` or ``"t"`` when present), each the input's shape.
    iteration : int
        Iterations run.
    best_iteration : int
        The iteration whose estimate was returned.
    stop_reason : str
        Why the loop ended ("iteration budget reached", "validation error stopped improving",
        "cancelled", ...).
    sigma : float or None
        For denoising, the noise level used (input units; where the channels were whitened, the
        root mean square of ``channel_sigmas``).
    channel_sigmas : tuple of float or None
        Gaussian denoising of 2-4 channels whose estimated noise levels differ by more than
        ``CHANNEL_SIGMA_RATIO`` (1.5): each channel's level (input units); the channels were
        scaled to one level for the solver and back. None otherwise.
    noise_variance : tuple of (float, float) or None
        ``noise="poisson"``: for each channel, the fitted ``(gain, offset)`` of the noise model
        ``variance = gain * value + offset`` (input units; a gain of 0 where the channel's noise was
        found not to grow with the signal). None otherwise.
    history : list of dict
        The progress records without previews.
    final_weight : float or None
        For Gaussian denoising, the multiplier of the data weight the returned image was solved
        with (chosen on held-out noisy entries by ``final_weight="auto"``, the default).
    method : str
        What the returned image is: ``"NGR"``; ``"NL-means"`` where Gaussian denoising found
        NL-means of the observation better on the held-out entries than the network's estimate
        (``fallback="nlmeans"``, the default for images and stacks of up to 4 channels; then
        ``best_iteration`` is 0 and ``final_weight`` is None); ``"NGR + NL-means"`` where a mix of
        the two was better than either (``nlmeans_weight`` says how much NL-means).
    nlmeans_weight : float
        NL-means' share of the returned image, ``(1 - w) NGR + w NL-means``: 0, 0.25, 0.5, 0.75
        or 1, chosen on the held-out entries (0 without ``fallback="nlmeans"``).
    start : str or None
        For inpainting, the solver's initial fill: ``"biharmonic"``, ``"dct"``, ``"nonlocal"``, ``"stack"``
        (see :func:`inpaint`) or ``"temporal"`` (:func:`decloud`); None for denoising.
    precision : str
        The network's arithmetic that was used, ``"float32"`` or ``"bfloat16"`` (the default
        ``precision="auto"`` chooses bfloat16 for a single image on a CPU with native bfloat16,
        float32 elsewhere).
    seed : int
        The seed that was used (drawn from the operating system for ``seed=None``): passing it
        again gives the same result on the same device.
    """

    image: np.ndarray
    gradients: dict
    iteration: int
    best_iteration: int
    stop_reason: str
    sigma: float | None = None
    history: list = field(default_factory=list)
    final_weight: float | None = None
    method: str = "NGR"
    nlmeans_weight: float = 0.0
    start: str | None = None
    precision: str = "float32"
    seed: int = 0
    channel_sigmas: tuple | None = None
    noise_variance: tuple | None = None

    @property
    def nlmeans_note(self) -> str:
        """How NL-means entered the returned image, in words (``""`` where it did not)."""
        if self.nlmeans_weight >= 1:
            return "NL-means of the observation was returned (lower held-out error than the network's)"
        if self.nlmeans_weight > 0:
            return (f"{self.nlmeans_weight:.0%} NL-means of the observation was mixed into the network's "
                    "estimate (lower held-out error than either)")
        return ""


def _check_image(image, finite: bool = True) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
                                 or a.dtype == bool):
        raise ValueError(f"image must be a real numeric array, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"image is empty (shape {a.shape})")
    if finite and np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise ValueError("image contains NaN or inf values; replace them first (inpaint accepts them "
                         "where the mask marks entries missing)")
    if np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize > 4:
        where = True if finite else np.isfinite(a)  # inpaint: NaN/inf may stand at missing entries
        top = max(abs(float(a.max(where=where, initial=0.0))), abs(float(a.min(where=where, initial=0.0))))
        if top > float(np.finfo(np.float32).max):
            raise ValueError(f"image has values up to {top:.3g}, beyond float32's range (3.4e38), in which "
                             "the result is returned; rescale it first")
    return a


class _Scaler:
    """Maps intensities to about [0, 1] (robust percentiles of the observed values) and back."""

    def __init__(self, a: np.ndarray, valid: np.ndarray | None):
        vals = a[valid] if valid is not None else a
        vals = vals.astype(np.float64).ravel()
        if vals.size > 2_000_000:
            vals = vals[:: vals.size // 1_000_000]
        lo, hi = np.percentile(vals, [0.1, 99.9]) if vals.size else (0.0, 1.0)
        if not hi > lo:
            lo, hi = float(vals.min(initial=0.0)), float(vals.max(initial=1.0))
        if not hi > lo:
            hi = lo + 1.0
        self.lo, self.scale = float(lo), float(hi - lo)
        self.dtype = a.dtype
        self.gain = self.mid = None  # per-channel noise whitening (see whiten), (1, C, 1, 1)
        self.vst = None  # per-channel variance-stabilizing transform (see stabilize)

    def forward(self, a):
        return ((a.astype(np.float32) - np.float32(self.lo)) / np.float32(self.scale)).astype(np.float32)

    def whiten(self, y: np.ndarray, gain: np.ndarray) -> np.ndarray:
        """Scale each channel of the normalized ``(S, C, H, W)`` image ``y`` about its mean by
        ``gain`` (one per channel), so that its noise has one level in every channel;
        :meth:`back` and :meth:`unwhiten` undo it."""
        self.gain = np.asarray(gain, np.float32).reshape(1, -1, 1, 1)
        self.mid = y.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
        return ((y - self.mid) * self.gain + self.mid).astype(np.float32)

    def stabilize(self, y: np.ndarray, fits, flat_variance=None) -> tuple[np.ndarray, float]:
        """Variance-stabilize the normalized ``(S, C, H, W)`` image ``y`` whose noise has the variance
        ``a * value + b`` in channel ``c`` (``fits[c] = (a, b)``, normalized units).

        The generalized Anscombe transform ``2 sqrt(value / a + 3/8 + b / a**2)`` (unit variance) where
        the noise grows with the signal; ``value / sqrt(v)`` where it does not (``a <= 0``, or ``a``
        times the channel's mean under 10 % of its variance or under 1e-8, a noise-free image), ``v``
        being ``flat_variance(c)`` if given (a direct estimate of that noise's variance, asked only
        for such channels), else ``b``. The result is shifted per
        channel and scaled by one factor to about [0, 1]; returns it and its noise level.
        :meth:`back` and :meth:`unwhiten` undo it (Makitalo and Foi's closed-form approximation of the exact unbiased
        inverse, which corrects the bias the transform puts on the mean at low counts).
        """
        from scipy import ndimage

        C = y.shape[1]
        gat = np.zeros(C, bool)
        a = np.ones(C)
        b = np.ones(C)
        t = np.empty(y.shape, np.float64)
        for c, (ac, bc) in enumerate(fits):
            yc = y[:, c].astype(np.float64)
            m = float(yc.mean())
            # the shot part: at least 10 % of the variance at the mean, and a noise of 1e-4 of the range
            if ac > 0 and ac * max(m, 0.0) >= max(0.1 * (ac * m + bc), 1e-8):
                gat[c], a[c], b[c] = True, ac, bc
                t[:, c] = 2.0 * np.sqrt(np.maximum(yc / ac + 0.375 + bc / ac ** 2, 0.0))
            else:
                b[c] = max(bc if flat_variance is None else flat_variance(c), 1e-6)
                t[:, c] = yc / np.sqrt(b[c])
        smooth = ndimage.gaussian_filter(t, (0, 0, 1.5, 1.5), mode="reflect")
        lo = np.percentile(smooth, 0.1, axis=(0, 2, 3))
        scale = float(max(np.max(np.percentile(smooth, 99.9, axis=(0, 2, 3)) - lo), 1e-6))
        self.vst = dict(gat=gat.reshape(1, -1, 1, 1), a=a.reshape(1, -1, 1, 1), b=b.reshape(1, -1, 1, 1),
                        lo=lo.reshape(1, -1, 1, 1), scale=scale)
        return ((t - self.vst["lo"]) / scale).astype(np.float32), 1.0 / scale

    def noise_variance(self) -> tuple:
        """After :meth:`stabilize`: ``(gain, offset)`` of ``variance = gain * value + offset`` per
        channel, in the input's units (gain 0 for a channel that was only scaled)."""
        v, sc, lo = self.vst, self.scale, self.lo
        return tuple((float(a * sc), float(b * sc ** 2 - a * sc * lo)) if g else (0.0, float(b * sc ** 2))
                     for g, a, b in zip(v["gat"].ravel(), v["a"].ravel(), v["b"].ravel()))

    def _unstabilize(self, t: torch.Tensor) -> torch.Tensor:
        v = self.vst
        gat, a, b, lo = (torch.from_numpy(np.asarray(v[k])) for k in ("gat", "a", "b", "lo"))
        # float64 on the CPU (MPS has none): the transform's offsets reach 1e4 and more at small gains
        dev, dt = t.device, t.dtype
        tt = t.detach().cpu().to(torch.float64) * v["scale"] + lo
        d = tt.clamp(min=1.0)
        r = math.sqrt(1.5)
        inv = d ** 2 / 4 + 0.25 * r / d - 11 / 8 / d ** 2 + 5 / 8 * r / d ** 3 - 1 / 8
        return torch.where(gat, a * inv - b / a, tt * b.sqrt()).to(dev, dt)

    def unwhiten(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`whiten` or :meth:`stabilize` undone on an internal ``(S, C, H, W)`` tensor
        (identity without them)."""
        if self.vst is not None:
            return self._unstabilize(t)
        if self.gain is None:
            return t
        mid, gain = (torch.from_numpy(v).to(t.device, t.dtype) for v in (self.mid, self.gain))
        return (t - mid) / gain + mid

    def back(self, t: np.ndarray, offset: bool = True) -> np.ndarray:
        """Normalized values to the input's units; ``offset=False`` for differences (gradient
        maps, taken after :meth:`unwhiten`)."""
        if offset and self.gain is not None:
            t = (t - self.mid) / self.gain + self.mid
        if offset and self.vst is not None:
            t = self._unstabilize(torch.from_numpy(np.ascontiguousarray(t))).numpy()
        out = t.astype(np.float32) * np.float32(self.scale)
        if offset:
            out += np.float32(self.lo)
            _clip_to_dtype(out, self.dtype)
        return out


def _clip_to_dtype(out: np.ndarray, dtype) -> np.ndarray:
    """Clip the float32 array ``out`` in place to an integer ``dtype``'s range, as float32 holds it:
    float32(2**31 - 1) is 2**31, which ``astype(np.int32)`` would wrap to -2**31."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = np.float32(info.min), np.float32(info.max)
        if int(hi) > info.max:
            hi = np.nextafter(hi, np.float32(-np.inf))
        np.clip(out, lo, hi, out=out)
    return out


class RestorationJob:
    """A prepared restoration: iterate it (for progress, previews and cancel) or run it.

    Made by :func:`prepare_inpaint` or :func:`prepare_denoise`. The widget and the command
    line drive the same object as :func:`inpaint` and :func:`denoise`.

    Examples
    --------
    >>> job = prepare_inpaint(image, mask, iterations=50)          # doctest: +SKIP
    >>> for rec in job.iterate():                                  # doctest: +SKIP
    ...     print(rec.iteration, rec.total, rec.loss)
    ...     if want_to_stop: break                                 # cancel: best so far is kept
    >>> result = job.result()                                      # doctest: +SKIP
    """

    def __init__(self, restoration: Restoration, layout: Layout, scaler: _Scaler, *, sigma=None, keep=None):
        self._r = restoration
        self.layout = layout
        self.scaler = scaler
        self.sigma = sigma
        self.channel_sigmas = None  # denoising: per-channel noise levels, where the channels were whitened
        self.noise_variance = None  # noise="poisson": per-channel (gain, offset), input units
        self._cancelled = False
        #: ``(observed, image)`` in the user's layout: observed entries re-inserted exactly by :meth:`result`.
        self.keep = keep
        self._r.to_user = self._to_user

    # progress --------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return int(self._r.opt.iterations)

    @property
    def axis_names(self) -> list[str]:
        """Regularized axes, in the order of the returned gradients (e.g. ``["c", "y", "x"]``)."""
        return list(self._r.dims)

    @property
    def device(self) -> torch.device:
        return self._r.device

    def _to_user(self, t: torch.Tensor, offset: bool = True) -> np.ndarray:
        return self.layout.to_user(self.scaler.back(t.detach().float().cpu().numpy(), offset))

    def iterate(self) -> Iterator[Progress]:
        """Yield one :class:`~napari_ngr.solver.Progress` per iteration (with ``preview`` every k).

        Closing the generator early counts as a cancel: :meth:`result` returns the best estimate
        so far and ``stop_reason == "cancelled"``.
        """
        finished = False
        try:
            for rec in self._r.iterate():
                yield rec
            finished = True
            self._cancelled = False  # iterated again to the end after a cancel: not cancelled
        finally:
            if not finished:
                self._cancelled = True

    def run(self, callback: Callable | None = None) -> RestorationResult:
        for rec in self.iterate():
            if callback is not None:
                callback(rec)
        return self.result()

    def result(self) -> RestorationResult:
        """The restored image and gradient maps (the best estimate so far if cancelled)."""
        r = self._r
        with torch.no_grad():
            est = r.estimate()
            image = self._to_user(est)
            if self.keep is not None:  # exactly the input's values (no round trip through [0, 1])
                image = _clip_to_dtype(np.where(self.keep[0], self.keep[1], image).astype(np.float32),
                                       self.keep[1].dtype)
            grads = {k: self._to_user(v, offset=False) for k, v in r.gradients(self.scaler.unwhiten(est)).items()}
        reason = "cancelled" if self._cancelled else r.state.stop_reason
        alpha = r.nlmeans_weight()
        if alpha >= 1:
            return RestorationResult(image, grads, r.state.iteration, 0, reason, self.sigma,
                                     list(r.state.history), None, method="NL-means", nlmeans_weight=1.0,
                                     start=r.start_name, precision=r.precision, seed=r.opt.seed,
                                     channel_sigmas=self.channel_sigmas, noise_variance=self.noise_variance)
        return RestorationResult(image, grads, r.state.iteration, r.state.best_iteration, reason,
                                 self.sigma, list(r.state.history), r.final_weight(),
                                 method="NGR + NL-means" if alpha > 0 else "NGR", nlmeans_weight=alpha,
                                 start=r.start_name, precision=r.precision, seed=r.opt.seed,
                                 channel_sigmas=self.channel_sigmas, noise_variance=self.noise_variance)


def _axes_weights(layout: Layout, spatial_weight, channel_weight, stack_weight) -> dict:
    out = {}
    for name, dim in layout.axis_names().items():
        w = {"y": spatial_weight, "x": spatial_weight, "c": channel_weight}.get(name, stack_weight)
        if not finite_number(w) or w < 0:
            raise ValueError(f"the weight of axis {name!r} must be a finite number >= 0, got {w!r}")
        out[name] = (dim, float(w))
    return out


def _options(task: str, iterations, seed, extra: dict, planar: bool = False, bands: bool = False) -> SolverOptions:
    d = DEFAULTS[task]
    opts = dict(d["options"])
    if planar:
        opts.update(d.get("planar_options", {}))
    if bands:
        opts.update(d.get("band_options", {}))
    opts.pop("data_weight", None)
    unknown = set(extra) - set(SolverOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    opts.update(extra)
    it = d["iterations"] if iterations is None else iterations
    if not finite_number(it) or int(it) != it or it < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    opts["iterations"] = int(it)
    if seed is None:  # fresh entropy, as numpy's default_rng(None); RestorationResult.seed reports it
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    opts["seed"] = int(seed)
    return SolverOptions(**opts)


#: Largest noise level :func:`denoise` accepts, in units of the image's intensity range: a larger
#: ``sigma`` is almost surely given in other units (and would flatten the image to its mean).
MAX_SIGMA = 4.0

#: Above this many channels, the channel axis is a spectrum and gets ``band_weight`` by default.
BAND_CHANNELS = 4
#: Pixels of a single image up to which inpainting gives up on an unbeaten start at the
#: ``planar_options`` deadline (a quarter of the budget); above, that fraction grows with the
#: pixel count, up to the stacks' half (see ``DEFAULTS``).
PLANAR_DEADLINE_PIXELS = 256 * 256


def default_weights(task: str, n_channels: int = 1) -> dict:
    """The default penalty weights of ``task`` for an image with ``n_channels`` channels.

    Returns ``{"spatial_weight", "channel_weight", "stack_weight"}``. With more than
    ``BAND_CHANNELS`` (4) channels the channel axis is a spectrum of bands, and its weight is the
    task's ``band_weight`` when it defines one.
    """
    d = DEFAULTS[task]
    ch = d["channel_weight"]
    if n_channels > BAND_CHANNELS and "band_weight" in d:
        ch = d["band_weight"]
    return dict(spatial_weight=d["spatial_weight"], channel_weight=ch, stack_weight=d["stack_weight"])


def _weights_or_default(task, spatial_weight, channel_weight, stack_weight, n_channels=1):
    d = default_weights(task, n_channels)
    return (d["spatial_weight"] if spatial_weight is None else spatial_weight,
            d["channel_weight"] if channel_weight is None else channel_weight,
            d["stack_weight"] if stack_weight is None else stack_weight)


def prepare_inpaint(image, mask, *, channel_axis=None, axes=None, iterations=None, spatial_weight=None,
                    channel_weight=None, stack_weight=None, seed=0, device=None, preview_every=0,
                    start="auto", **options) -> RestorationJob:
    """Prepare :func:`inpaint` without running it; see :func:`inpaint` for the parameters."""
    a = _check_image(image, finite=False)  # NaN/inf allowed where the mask marks entries missing
    layout = resolve_layout(a.shape, channel_axis, axes)
    if start not in ("auto", "nonlocal", "dct", "biharmonic", "stack"):
        raise ValueError(f"start must be 'auto', 'nonlocal', 'dct', 'biharmonic' or 'stack', got {start!r}")
    return _prepare_missing("inpaint", a, layout, _check_mask(mask), iterations=iterations,
                            spatial_weight=spatial_weight, channel_weight=channel_weight, stack_weight=stack_weight,
                            seed=seed, device=device, preview_every=preview_every, options=options, start=start)


def _check_mask(mask, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if not (m.dtype == bool or np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise ValueError(f"{name} must be a boolean or real numeric array (nonzero = missing), got dtype {m.dtype}")
    return m


def _prepare_missing(task, a, layout, m, *, iterations, spatial_weight, channel_weight, stack_weight, seed,
                     device, preview_every, options, start="biharmonic", name="mask") -> RestorationJob:
    """The inpainting job shared by :func:`prepare_inpaint` and :func:`prepare_decloud`: ``m`` is
    the checked mask (nonzero = missing) of the image ``a`` with layout ``layout``."""
    missing = layout.mask_to_internal(m != 0, name)
    missing = np.broadcast_to(missing, layout.internal_shape)
    n_missing = int(missing.sum())
    if n_missing == 0:
        raise ValueError(f"{name} marks no entry as missing (nonzero = missing): nothing to {task}")
    if n_missing == missing.size:
        raise ValueError(f"{name} marks every entry as missing: there is nothing to {task} from")
    dev = resolve_device(device)
    internal = layout.to_internal(a)
    if np.issubdtype(internal.dtype, np.floating) and not np.all(np.isfinite(internal[~missing])):
        raise ValueError("image contains NaN or inf values at entries the mask does not mark missing; "
                         "mark them in the mask (nonzero = missing) or replace them")
    scaler = _Scaler(internal, ~missing)
    y = np.where(missing, 0.0, scaler.forward(internal)).astype(np.float32)
    S, C, H, W = layout.internal_shape
    planar = task == "inpaint" and S == 1 and C <= BAND_CHANNELS  # decloud always has dates
    if start == "stack" and planar:
        raise ValueError(f"start='stack' interpolates along Z/T or the bands of a spectrum (more than "
                         f"{BAND_CHANNELS} channels); this image has neither (axes {layout.axes})")
    opt = _options(task, iterations, seed, options, planar=planar)
    if planar and "start_deadline" not in options:
        # The iteration at which an iterate first beats the start grows with the plane's pixels
        # (256^2: by 200; 512^2: 400-430): scale the single-image deadline with them, up to the
        # stacks' half of the budget (reached from about 362^2).
        half = DEFAULTS[task]["options"]["start_deadline"]
        opt.start_deadline = min(half, opt.start_deadline * max(1.0, H * W / PLANAR_DEADLINE_PIXELS))
    weights = _axes_weights(layout, *_weights_or_default(task, spatial_weight, channel_weight, stack_weight, C))
    op = Inpainting(torch.from_numpy(y).to(dev), torch.from_numpy(~missing).to(dev), start=start)
    r = Restoration(op, weights, opt, device=dev, preview_every=preview_every)
    return RestorationJob(r, layout, scaler, keep=(layout.to_user(~missing), a))


def inpaint(image, mask, *, channel_axis=None, axes=None, iterations=None, spatial_weight=None,
            channel_weight=None, stack_weight=None, seed=0, device=None, callback=None,
            return_gradients=False, start="auto", **options):
    """Fill missing entries of an image or stack with the Neural Gradient Regularizer.

    Parameters
    ----------
    image : (Y, X), (Y, X, C), (C, Y, X), (Z, Y, X) or (T, C, Y, X) ndarray
        Any real dtype. Values at missing entries are ignored.
    mask : ndarray
        Nonzero (True) where the image is missing, as in
        :func:`skimage.restoration.inpaint_biharmonic` and as painted in a napari Labels layer.
        Shape: the image's, the image's without the channel axis (same mask on every channel),
        or (Y, X) (same mask on every plane of a stack).
    channel_axis : int, optional
        Axis of the channels (colours, bands). ``None``: no channel axis.
    axes : str, optional
        Explicit axis letters from ``TZCYX`` (e.g. ``"TCYX"``, ``"ZYX"``, ``"YXC"``). Default:
        2-D is ``YX``, 3-D without ``channel_axis`` is ``ZYX``, 4-D needs ``channel_axis``
        and its other leading axis is ``T``.
    iterations : int, optional
        Iteration budget (default ``DEFAULTS["inpaint"]["iterations"]``). The loop may stop
        earlier (see Notes).
    spatial_weight, channel_weight, stack_weight : float, optional
        The penalty weights lambda of the Y/X gradients, of the channel gradient and of the
        Z/T gradient. Defaults are in ``napari_ngr.DEFAULTS``.
    seed : int or None
        Seeds the network, its random input and the validation split: the same seed gives the
        same output on the same device. ``None`` draws a seed from the operating system (reported
        by :attr:`RestorationResult.seed`). torch's global random state is left as it was.
    device : {None, "auto", "cpu", "cuda", "mps"}
        ``None``/``"auto"``: CUDA when present, else MPS, else CPU.
    callback : callable, optional
        Called with a :class:`~napari_ngr.solver.Progress` record after every iteration.
    return_gradients : bool
        Also return the per-axis gradient maps of the result.
    start : {"auto", "nonlocal", "dct", "biharmonic", "stack"}
        The solver's initial fill: biharmonic interpolation of every plane; that fill refined
        by sparsity in overlapping 8 x 8 block DCTs (``"dct"``,
        :func:`napari_ngr.operators.dct_fill`); the DCT fill refined by the low rank of groups
        of similar 8 x 8 patches (``"nonlocal"``, :func:`napari_ngr.operators.nonlocal_fill`; planes
        of at least 8 x 8 pixels with at most 16 channels); or, on a stack, linear interpolation
        along Z/T (on a spectrum of more than 4 bands, along the bands) between the nearest
        observed entries of each pixel (``"stack"``,
        :meth:`napari_ngr.operators.Inpainting.stack_fill`). ``"auto"`` computes them all (the
        stack fill only where a few planes lost more than half of their entries, whose defects are
        then held out in other planes: ``Inpainting.planes_lost``; a large hole is held out whole,
        in one other plane, for this choice: ``Inpainting.holdout_planes``) and
        leaves biharmonic only for a fill whose error on the held-out entries (see Notes) is at
        least 10 % lower, and lower beyond one standard error (``napari_ngr.solver.START_MARGIN``),
        taking the lowest such; the refined fills gain most on texture, repeated structure and
        colour, and on entries missing in some channels only; the stack fill on large defects of
        a few planes of a stack (a bubble in one Z slice, a glitch in one frame). A plane with
        nothing observed is interpolated from its neighbours in every fill and in the result.
    **options
        Advanced solver options (:class:`~napari_ngr.solver.SolverOptions`), e.g. ``channels``,
        or ``precision``: ``"auto"`` (default) runs the network in bfloat16 for a single image
        (one plane of up to 4 channels) on a CPU with native bfloat16 (AVX512-BF16 or AMX; about
        1.6x faster), in float32 for stacks and spectra and on other CPUs and devices;
        ``"float32"`` or ``"bfloat16"`` force one (``result.precision`` says which ran).

    Returns
    -------
    restored : ndarray of float32
        The input's shape, in the input's intensity units (integer inputs are clipped to their
        dtype's range). Observed entries are returned unchanged (as float32 holds them: integers
        above 2**24 and float64 values are rounded to float32; the command line writes the
        input's own values there).
    gradients : dict of str to ndarray
        Only with ``return_gradients=True``: ``{"y": ..., "x": ..., ["c"|"z"|"t"]: ...}``.

    Raises
    ------
    ValueError
        For NaN/inf in the image (or values beyond float32's range), a mask that does not
        broadcast or is not numeric, an empty or all-missing mask, a bad ``channel_axis``, 1-D or
        empty input, ``start="stack"`` without a stack or spectrum, an unavailable device, or an
        argument or advanced option that is not a number in its range.

    Notes
    -----
    Stopping without ground truth: about 3 % of the observed entries, in the mask's own pattern
    (see :meth:`napari_ngr.operators.Inpainting.holdout`), are held back from the data term;
    every 10 iterations their reconstruction error is measured, the iterate with the lowest error
    is returned (all observed entries re-inserted), and after ``min_iterations`` (250) the loop
    stops once 30 checks in a row bring no gain of at least 1 % in held-out error
    (``patience_tol``; the best iterate is still kept), provided an iterate has beaten the start.
    While none has, the loop runs until half the budget on a stack (``start_deadline``, 600 of the
    default 1200 iterations), a quarter on a single image (no Z or T axis, at most 4 channels) of
    up to 256 x 256 pixels (300), a fraction growing with the pixel count on larger ones (half
    from about 362 x 362), and then returns the start (rebuilt from all observed entries): on
    stacks the held-out error typically rises above the start's for a few hundred iterations,
    then falls below it and keeps falling; on 256 x 256 photos an iterate that beats the start did
    so by iteration 200 in every case traced, on 512 x 512 ones by 400-430. ``result.best_iteration`` (from :func:`prepare_inpaint`)
    reports the iteration chosen, ``result.start`` the initial fill (``start="auto"`` chooses it on the same
    held-out entries, before the loop; biharmonic where too few entries can be held out).
    """
    job = prepare_inpaint(image, mask, channel_axis=channel_axis, axes=axes, iterations=iterations,
                          spatial_weight=spatial_weight, channel_weight=channel_weight,
                          stack_weight=stack_weight, seed=seed, device=device, start=start, **options)
    res = job.run(callback)
    return (res.image, res.gradients) if return_gradients else res.image


def _decloud_layout(shape, time_axis, channel_axis) -> Layout:
    """The layout of a multi-temporal stack: T at ``time_axis``, C at ``channel_axis``, then Y, X."""
    ndim = len(shape)
    if ndim not in (3, 4):
        raise ValueError(f"stack must be 3-D (T, Y, X) or 4-D (T, C, Y, X) in any axis order, got shape {shape}")
    if ndim == 4 and channel_axis is None:
        raise ValueError(f"a 4-D stack of shape {shape} needs channel_axis (the band axis)")
    if ndim == 3 and channel_axis is not None:
        raise ValueError(f"a 3-D stack is (T, Y, X): it has no room for channel_axis={channel_axis}")
    letters = [None] * ndim
    for name, ax, letter in (("time_axis", time_axis, "T"), ("channel_axis", channel_axis, "C")):
        if ax is None and letter == "C":
            continue
        if not isinstance(ax, (int, np.integer)) or isinstance(ax, bool) or not -ndim <= ax < ndim:
            raise ValueError(f"{name}={ax!r} is not an axis of a {ndim}-D stack")
        if letters[int(ax) % ndim] is not None:
            raise ValueError(f"time_axis and channel_axis are the same axis ({ax})")
        letters[int(ax) % ndim] = letter
    rest = iter("YX")
    axes = "".join(letter or next(rest) for letter in letters)
    if shape[axes.index("T")] < 2:
        raise ValueError(f"decloud needs at least 2 dates along time_axis={time_axis} (shape {shape}); "
                         "for a single date use inpaint")
    return resolve_layout(shape, axes=axes)


def prepare_decloud(stack, cloud_mask, *, time_axis=0, channel_axis=None, iterations=None, spatial_weight=None,
                    channel_weight=None, stack_weight=None, seed=0, device=None, preview_every=0,
                    **options) -> RestorationJob:
    """Prepare :func:`decloud` without running it; see :func:`decloud` for the parameters."""
    a = _check_image(stack, finite=False)  # NaN/inf allowed where the mask marks entries clouded
    layout = _decloud_layout(a.shape, time_axis, channel_axis)
    m = _check_mask(cloud_mask, "cloud_mask")
    sub = layout.mask_layout(m.shape)
    if sub is None or "T" not in sub.axes:  # the image's shape, or without its band axis; not (Y, X)
        fits = [layout.shape]
        if "C" in layout.axes:
            ci = layout.axes.index("C")
            fits.append(layout.shape[:ci] + layout.shape[ci + 1:])
        raise ValueError(f"cloud_mask of shape {m.shape} does not fit the stack of shape {layout.shape} (axes "
                         f"{layout.axes}): give {' or '.join(map(str, fits[::-1]))}")
    job = _prepare_missing("decloud", a, layout, m, iterations=iterations, spatial_weight=spatial_weight,
                           channel_weight=channel_weight, stack_weight=stack_weight, seed=seed, device=device,
                           preview_every=preview_every, options=options, start="temporal", name="cloud_mask")
    never = int((~job._r.full_operator.observed).all(dim=0).any(dim=0).sum())
    if never:
        warnings.warn(f"{never} pixel(s) are clouded on every date: nothing to learn from along time: "
                      "filled spatially", UserWarning, stacklevel=2)
    return job


def decloud(stack, cloud_mask, *, time_axis=0, channel_axis=None, iterations=None, spatial_weight=None,
            channel_weight=None, stack_weight=None, seed=0, device=None, callback=None,
            return_gradients=False, **options):
    """Remove clouds (and their shadows) from a multi-temporal stack with the Neural Gradient Regularizer.

    Every date is restored where it is clouded; the clear dates inform the clouded ones
    through the gradient along time. This is :func:`inpaint` of the clouded entries with a
    multi-temporal start (see Notes).

    Parameters
    ----------
    stack : (T, Y, X) or (T, C, Y, X) ndarray, in any axis order
        A time series of images (at least 2 dates), with bands on ``channel_axis`` if present.
        Any real dtype. Values at clouded entries are ignored (NaN is accepted there).
    cloud_mask : ndarray
        Nonzero (True) where a date is clouded or shadowed (= missing). Shape: the stack's
        without the channel axis, i.e. (T, Y, X) in the stack's axis order (the same mask for
        every band), or the stack's full shape.
    time_axis : int
        Axis of the dates (default 0).
    channel_axis : int, optional
        Axis of the bands; required for a 4-D stack. The remaining two axes are Y, X in order.
    iterations : int, optional
        Iteration budget (default ``DEFAULTS["decloud"]["iterations"]``); the loop may stop
        earlier, as in :func:`inpaint`.
    spatial_weight, channel_weight, stack_weight : float, optional
        The penalty weights lambda of the Y/X gradients, of the band gradient and of the time
        gradient (``stack_weight``). Defaults are in ``napari_ngr.DEFAULTS["decloud"]``.
    seed, device, callback, return_gradients, **options
        As in :func:`inpaint`.

    Returns
    -------
    restored : ndarray of float32
        The stack's shape, in its intensity units (integer inputs are clipped to their dtype's
        range). Clear entries are returned exactly unchanged.
    gradients : dict of str to ndarray
        Only with ``return_gradients=True``: ``{"t": ..., ["c": ...,] "y": ..., "x": ...}``.

    Raises
    ------
    ValueError
        For fewer than 2 dates (use :func:`inpaint` for a single image), a ``cloud_mask`` that
        does not fit the stack, an empty or all-clouded mask, NaN/inf at clear entries, bad
        ``time_axis``/``channel_axis``, or an unavailable device.

    Warns
    -----
    UserWarning
        When some pixels are clouded on every date (for at least one band): there is nothing
        to learn from along time for them, so they are filled spatially; the warning says
        how many.

    Notes
    -----
    Time and bands are separate axes of the solver: the gradient along time compares each
    band with the same band at the next date, bands are never differenced across dates, and
    the time axis has Neumann boundaries (the last date is never differenced against the
    first).

    Start (temporal fill): each clouded entry takes the value of the same pixel at the nearest
    date where it is clear, after a per-band linear gain/offset fit between the two dates
    (least squares on the pixels clear at both); when the previous and the next clear dates
    are equally near, their corrected values are averaged. Pixels clouded on every date are
    filled spatially (biharmonic interpolation of their plane). As in :func:`inpaint`, about
    2 % of the clear entries, shaped like the clouds, are held out to choose the iterate
    without ground truth: the whole budget runs and the iterate with the lowest held-out error
    is returned; if NGR does not beat the temporal fill on them, the temporal fill is returned
    (``result.best_iteration`` from :func:`prepare_decloud` says which).
    """
    job = prepare_decloud(stack, cloud_mask, time_axis=time_axis, channel_axis=channel_axis, iterations=iterations,
                          spatial_weight=spatial_weight, channel_weight=channel_weight, stack_weight=stack_weight,
                          seed=seed, device=device, **options)
    res = job.run(callback)
    return (res.image, res.gradients) if return_gradients else res.image


def _estimate_sigma_normalized(y: np.ndarray) -> float:
    """Median over (up to 16) planes of :func:`~napari_ngr.operators.noise_rms` (wavelet MAD in
    intensity bins: the RMS level, also under shot noise)."""
    planes = y.reshape(-1, *y.shape[-2:])
    idx = np.linspace(0, len(planes) - 1, min(len(planes), 16)).round().astype(int)
    return float(np.median([noise_rms(planes[i]) for i in idx]))


#: Gaussian denoising of 2-4 channels with ``sigma=None``: where one channel's estimated noise level
#: exceeds another's by more than this factor, every channel is scaled to one level first
#: (:meth:`_Scaler.whiten`) and back after; one global level left most of a noisier channel's noise.
CHANNEL_SIGMA_RATIO = 1.5


def _channel_sigma_normalized(y: np.ndarray, c: int) -> float:
    """:func:`~napari_ngr.operators.noise_rms` of channel ``c`` of ``(S, C, H, W)``: the median over
    (up to 16) of its planes."""
    S = y.shape[0]
    idx = np.linspace(0, S - 1, min(S, 16)).round().astype(int)
    return float(np.median([noise_rms(y[i, c]) for i in idx]))


def _channel_sigmas_normalized(y: np.ndarray) -> np.ndarray:
    """:func:`_channel_sigma_normalized` of every channel."""
    return np.array([_channel_sigma_normalized(y, c) for c in range(y.shape[1])], dtype=np.float64)


def prepare_denoise(image, *, channel_axis=None, axes=None, sigma=None, noise="gaussian", iterations=None,
                    spatial_weight=None, channel_weight=None, stack_weight=None, seed=0, device=None,
                    preview_every=0, data_weight=None, destripe=True, **options) -> RestorationJob:
    """Prepare :func:`denoise` without running it; see :func:`denoise` for the parameters."""
    if noise not in ("gaussian", "mixed", "poisson"):
        raise ValueError(f"noise must be 'gaussian', 'poisson' or 'mixed', got {noise!r}")
    if noise == "poisson" and sigma is not None:
        raise ValueError("sigma must be None with noise='poisson': the noise model (variance = gain * value + "
                         "offset, per channel) is fitted to the image")
    a = _check_image(image)
    layout = resolve_layout(a.shape, channel_axis, axes)
    dev = resolve_device(device)
    internal = layout.to_internal(a)
    # Intensity range from a lightly smoothed copy: the noise must not widen it (a wider range
    # would compress the image and shift the balance between data and gradient terms).
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(internal.astype(np.float32), (0, 0, 1.5, 1.5), mode="reflect")
    scaler = _Scaler(smooth, None)
    scaler.dtype = a.dtype
    y = np.ascontiguousarray(scaler.forward(internal), dtype=np.float32)
    if sigma is not None and not (finite_number(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number (input units) or None, got {sigma!r}")
    s = None if sigma is None else max(float(sigma) / scaler.scale, 1e-3)
    if s is not None and s > MAX_SIGMA:
        raise ValueError(f"sigma={sigma!r} is more than {MAX_SIGMA:g} times the image's intensity range "
                         f"({scaler.scale:.4g}): give it in the image's units (e.g. 25 for uint8 data, "
                         "0.1 for data in [0, 1]), or None to estimate it")
    if data_weight is not None and not (finite_number(data_weight) and data_weight > 0):
        raise ValueError(f"data_weight must be a positive number, got {data_weight!r}")
    S, C = layout.internal_shape[:2]
    planar = noise != "mixed" and S == 1 and C <= BAND_CHANNELS
    if iterations is None and noise == "mixed":
        iterations = DEFAULTS["denoise"]["mixed_iterations"]
    elif iterations is None and planar:
        iterations = DEFAULTS["denoise"]["planar_iterations"]
    opt = _options("denoise", iterations, seed, options, planar=planar, bands=C > BAND_CHANNELS)
    weights = _axes_weights(layout, *_weights_or_default("denoise", spatial_weight, channel_weight, stack_weight,
                                                         layout.internal_shape[1]))
    if not any(w > 0 for _, w in weights.values()):
        raise ValueError("every gradient weight is 0: denoising needs a positive weight on at least one "
                         f"axis ({', '.join(weights)}); with none the result would be the input")
    dw = DEFAULTS["denoise"]["options"]["data_weight"] if data_weight is None else float(data_weight)
    channel_sigmas = None
    if noise == "gaussian" and s is None and 1 < C <= BAND_CHANNELS:
        sc = np.maximum(_channel_sigmas_normalized(y), 1e-3)
        if sc.max() > CHANNEL_SIGMA_RATIO * sc.min():  # channels of different noise: whiten them
            s = float(np.sqrt(np.mean(sc ** 2)))
            y = scaler.whiten(y, s / sc)
            channel_sigmas = tuple(float(v) * scaler.scale for v in sc)
    noise_variance = None
    if noise == "poisson":  # variance-stabilized: Gaussian noise of one level s in every channel
        idx = np.linspace(0, S - 1, min(S, 16)).round().astype(int)
        fits = [fit_noise_variance(y[idx, c]) for c in range(C)]
        flat = y  # a channel without shot noise is scaled by its Gaussian level, as below
        y, s = scaler.stabilize(y, fits, lambda c: _channel_sigma_normalized(flat, c) ** 2)
        noise_variance = scaler.noise_variance()
    yt = torch.from_numpy(y).to(dev)
    if noise in ("gaussian", "poisson"):
        if s is None:
            s = max(_estimate_sigma_normalized(y), 1e-3)
        op = Denoising(yt, s, weight=dw)
    else:
        op = MixedNoise(yt, s, weight=dw, stripes=bool(destripe))
        s = op.sigma
    r = Restoration(op, weights, opt, device=dev, preview_every=preview_every)
    job = RestorationJob(r, layout, scaler, sigma=None if noise == "poisson" else s * scaler.scale)
    job.channel_sigmas = channel_sigmas
    job.noise_variance = noise_variance
    return job


def denoise(image, *, channel_axis=None, axes=None, sigma=None, noise="gaussian", iterations=None,
            spatial_weight=None, channel_weight=None, stack_weight=None, seed=0, device=None, callback=None,
            return_gradients=False, destripe=True, **options):
    """Remove noise (Gaussian, shot noise, or mixed with impulses, stripes and dead lines) with the
    Neural Gradient Regularizer.

    Parameters
    ----------
    image : ndarray
        As in :func:`inpaint`.
    sigma : float, optional
        Noise standard deviation in the image's units. ``None`` estimates it: for
        ``noise="gaussian"`` the median over (up to 16) planes of
        :func:`~napari_ngr.operators.noise_rms`, the wavelet-domain MAD of
        :func:`skimage.restoration.estimate_sigma` taken in intensity bins, so that shot noise is
        measured at its RMS level; for ``noise="mixed"`` one level per plane (band, channel,
        frame) by ``estimate_sigma``, after impulses are set aside. A value above ``MAX_SIGMA``
        (4) times the image's intensity range is refused as given in other units. Must be None
        with ``noise="poisson"``, whose noise model is fitted.
    noise : {"gaussian", "poisson", "mixed"}
        ``"gaussian"``: additive white Gaussian noise. ``"poisson"``: shot noise, which grows with
        the signal, plus read noise (photon counts, as in fluorescence microscopy and low-light
        images): each channel's noise model ``variance = gain * value + offset`` is fitted to the
        image (:func:`~napari_ngr.operators.fit_noise_variance`, from up to 16 of its planes), the
        generalized Anscombe transform makes that noise Gaussian of one level, the image is denoised
        as with ``"gaussian"`` and transformed back (Makitalo and Foi's closed-form unbiased inverse;
        ``result.noise_variance`` reports the fit). Channels whose noise does not grow with the
        signal are only scaled. ``"mixed"``: Gaussian noise (its own level in
        every plane) plus sparse and structured noise, as in hyperspectral and push-broom data
        (:class:`~napari_ngr.operators.MixedNoise`): impulses (salt-and-pepper, hot pixels: entries
        farther than 3 sigma from their 3 x 3 median) and dead lines (whole columns or rows stuck at
        one value) are treated as missing; stripes (offsets constant along whole columns or rows)
        are estimated robustly and subtracted.
    destripe : bool
        With ``noise="mixed"``: look for stripes and dead lines (default True). Turn off when the
        image has genuine column- or row-wide structure that must be kept.
    channel_weight : float, optional
        As in :func:`inpaint`; the default is 0.5 up to 4 channels (colours) and 2.0 above
        (spectral bands, see :func:`default_weights`).
    iterations : int, optional
        Iteration budget; the loop may stop earlier (see Notes). Default:
        ``DEFAULTS["denoise"]["iterations"]`` (600) for stacks and spectra,
        ``["planar_iterations"]`` (250) for single grey or colour images with Gaussian noise,
        ``["mixed_iterations"]`` (250) with ``noise="mixed"``.
    channel_axis, axes, spatial_weight, stack_weight, seed, device, callback, return_gradients, **options
        As in :func:`inpaint`.

    Returns
    -------
    restored : ndarray of float32
        The input's shape and units.
    gradients : dict of str to ndarray
        Only with ``return_gradients=True``.

    Raises
    ------
    ValueError
        As :func:`inpaint` for the image, the layout and the device; for a ``sigma`` that is not a
        positive number or far beyond the image's range, every gradient weight 0 (nothing would be
        removed), a ``data_weight`` that is not positive, or an advanced option out of range
        (:class:`~napari_ngr.solver.SolverOptions`).

    Notes
    -----
    No ground truth is involved anywhere. The returned image is the moving average of the
    iterates, solved once more with the averaged network gradients and the data weight times
    ``final_weight``. ``final_weight="auto"`` (default) chooses that multiplier between 0.01 and
    4: 5 % of the noisy entries (``holdout=0.05``) are left out of the data term from the start,
    and the multiplier whose estimate predicts them best (corrected for the weight each entry's
    own value has in the returned image) is used; ``result.final_weight`` (from
    :func:`prepare_denoise`) reports it. A number fixes it (``holdout`` is then unused).

    When and from where Gaussian denoising starts and stops depends on the data:

    * single images with at most 4 channels (grey, RGB; no Z or T axis): the start and the
      network's guide are a low-rank patch-group denoising of the image
      (:func:`~napari_ngr.operators.low_rank_denoise`: groups of 32 similar 8 x 8 patches, matched
      on its non-local means, keep their singular components above the noise's;
      ``prefilter="lowrank"``; ``"nlmeans"`` starts from the non-local means themselves,
      :func:`skimage.restoration.denoise_nl_means` with ``h = 0.8 sigma``).
      Every 25 iterations (``check_every``) the held-out error of the image that would be returned
      is estimated, the best check is kept and returned (``select="holdout"``;
      ``result.best_iteration`` says which), and the run stops after 4 checks (``patience``)
      without a new best, or after ``iterations`` (default 300 here, 600 elsewhere). With a fixed ``final_weight``,
      or an image too small to hold out 64 entries, nothing is held out and the discrepancy stop
      below applies;
    * stacks (Z, T) and spectra (more than 4 channels), where a per-plane filter would ignore the
      third axis: the run starts from the image, the guide is the current estimate smoothed, and
      it stops by the discrepancy principle, once the residual ``image - restored`` has the
      variance that exact gradients would leave at the noise level ``sigma``
      (``discrepancy=1.0``; ``discrepancy=0`` runs the whole budget), or after ``iterations``.

    At the end, with at most 4 channels and entries held out, NL-means of the image (held-out
    entries imputed; leave-one-out, with 2-D patches matched across the two planes on either side
    on a stack, :func:`~napari_ngr.operators.nl_means_stack`; on a stack also NL-means weighted
    on a pilot, the low-rank patch-group denoising of the stack matched across planes, for five
    ``h``; unless the noise grows with the signal, each also with the weight 1 on an entry's own
    value, as :func:`skimage.restoration.denoise_nl_means`, which keeps fine and unique structure)
    and their mixes ``(1 - w) NGR + w NL-means``, ``w`` in 0.25, 0.5, 0.75, 1, are scored on them
    like the network's estimate; where the best is lower by more than twice the standard error of the
    difference, it is returned (``fallback="nlmeans"``; ``result.method`` is then ``"NL-means"``
    or ``"NGR + NL-means"``, else ``"NGR"``; ``result.nlmeans_weight`` is ``w``;
    ``fallback="none"`` always returns the network's estimate). On a CPU budget NL-means wins on
    videos with motion, where NGR needs more iterations than it gets.

    ``noise="mixed"`` runs a fixed budget (default 250) and returns the moving average.
    """
    job = prepare_denoise(image, channel_axis=channel_axis, axes=axes, sigma=sigma, noise=noise, iterations=iterations,
                          spatial_weight=spatial_weight, channel_weight=channel_weight, stack_weight=stack_weight,
                          seed=seed, device=device, destripe=destripe, **options)
    res = job.run(callback)
    return (res.image, res.gradients) if return_gradients else res.image


def estimate_memory(shape, *, channel_axis=None, axes=None, channels=None, levels=None) -> int:
    """Rough peak memory in bytes of one restoration of an array of ``shape`` (float32).

    Counts the solver's state (about 14 image-sized buffers plus three per regularized axis, DCT
    work space) and the network's activations and gradients. Used by the command line to refuse
    jobs that cannot fit.
    """
    layout = resolve_layout(shape, channel_axis, axes)
    S, C, H, W = layout.internal_shape
    n_axes = len(layout.axis_names())
    planes = S * C
    ch = channels or SolverOptions.channels
    lv = levels or SolverOptions.levels
    image = planes * H * W * 4
    state = image * (14 + 3 * n_axes)
    act_per_level = ch * H * W * 4 * 14
    net = sum(act_per_level / 4 ** i for i in range(lv + 1)) + planes * n_axes * H * W * 4 * 3
    return int(state + net + 200e6)
