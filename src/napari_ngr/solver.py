"""The NGR ADMM loop, written once for every task, device and caller.

Model (Eq. 7 of the paper, with a split for the data term)::

    min_{x, Theta}  data(u; y) + sum_i lambda_i / 2 * || D_i x - f_Theta,i(z) ||^2   s.t.  x = u

Each iteration:

1. **network step** - one Adam step on ``sum_i lambda_i * mean((D_i x - f_i)^2)``: the untrained
   network regresses the gradient maps of the current estimate from a fixed random code ``z``
   (perturbed every iteration); its inductive bias keeps what is image-like.
2. **x-update** - closed form: ``(mu + sum_i lambda_i D_i^T D_i) x = sum_i lambda_i D_i^T f_i
   + mu (u - w)`` in one DCT pair (Neumann boundaries on every axis). Operators with a fused
   quadratic data term (denoising) put it in place of ``mu`` and skip steps 3-4.
3. **u-update** - the operator's data prox, ``u = prox(x + w, mu)`` (inpainting: the observed
   entries).
4. **dual update** - ``w += x - u``.

No ground truth is used anywhere. Which iterate is returned (see :class:`Restoration`):

* inpainting: a ``holdout`` fraction of the observed entries (shaped like the mask, see
  :meth:`~napari_ngr.operators.Inpainting.holdout`) is hidden from the data term
  and used as a validation set. Every ``check_every`` iterations the validation error of ``x`` is
  measured; the iterate with the lowest error is kept, and the loop stops early after
  ``patience`` checks without improvement, or, while no iterate has beaten the start, once
  ``start_deadline`` of the budget has run. The returned image re-inserts *all* observed entries.
  The same held-out entries choose the start (``Inpainting(start="auto")``): the biharmonic fill,
  or its sparse block-DCT or nonlocal patch-group refinement where that predicts them clearly
  better (``START_MARGIN``).
* denoising: an exponential moving average of the iterates (as in the reference code). The loop
  stops by the *discrepancy principle* (``discrepancy``): the network learns fine detail last, so
  the residual ``y - x`` shrinks as the iterations go on; once its variance falls to what exact
  gradients would leave (``sigma^2`` times :meth:`~napari_ngr.gradients.GradientSolver.residual_factor`),
  further iterations fit noise. Otherwise the budget ends it, or (``tol``) the relative change of
  the average falling under ``tol``. The returned image solves the X-update once more with the
  averaged network fields and the data weight times ``final_weight``; ``final_weight="auto"``
  chooses that multiplier on a ``holdout`` fraction of the noisy entries, left out of the data
  term from the start (:meth:`Restoration.final_weight`). With ``select="holdout"`` that estimated
  error is measured every ``check_every`` iterations; the check with the lowest one is returned
  and the loop stops after ``patience`` checks without a new best. ``prefilter="nlmeans"`` starts
  from, and guides the network by, the NL-means of the observation (held-out entries imputed);
  ``prefilter="lowrank"`` by its low-rank patch-group denoising, patches matched on that NL-means.
  ``fallback="nlmeans"`` returns NL-means of the observation, or a mix of it and the NGR image,
  where that predicts the held-out entries clearly better (:meth:`Restoration.nlmeans_weight`);
  the best mix among leave-one-out NL-means (on a stack also NL-means weighted on a low-rank
  pilot) and each of them with the weight 1 on an entry's own value
  (:meth:`Restoration._fallback_candidates`).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .gradients import GradientSolver, forward_difference
from .network import GradientNet, SeparateGradientNets
from .operators import Denoising, Inpainting, Operator, low_rank_denoise, nl_means_planes, nl_means_stack

__all__ = ["SolverOptions", "Progress", "Restoration", "FINAL_WEIGHTS", "NLMEANS_WEIGHTS", "resolve_precision"]

#: Candidates of ``final_weight="auto"``, from trusting the data most to trusting the network most.
FINAL_WEIGHTS = (4.0, 2.0, 1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.025, 0.01)
#: ``final_weight="auto"`` without enough held-out entries (fewer than ``MIN_HELD``) uses this.
FALLBACK_FINAL_WEIGHT = 0.5
MIN_HELD = 64
#: ``fallback="nlmeans"``: the NL-means shares of the returned image that are scored on the held-out entries.
NLMEANS_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: ``fallback="nlmeans"`` on stacks: the ``h`` (times sigma) of the NL-means weighted on the low-rank
#: pilot (:meth:`Restoration._fallback_candidates`) that are scored on the held-out entries, with plain NL-means:
#: 0.325, 0.46, 0.65, 0.92 and 1.3, a factor sqrt(2) apart, so that each weight is the square of the
#: next one's (one exponential for the five).
GUIDED_H = tuple(1.3 / 2 ** (k / 2) for k in range(4, -1, -1))
#: ``fallback="nlmeans"``: the key (``state.fallback_h``) of the single image's NL-means candidate that
#: gives an entry's own value the weight 1 (:func:`~napari_ngr.operators.nl_means_stack`'s ``self_weight``);
#: on a stack ``(OWN, h)`` is the pilot-weighted candidate ``h`` with that weight.
OWN = "own"
#: ... offered only where the noise does not grow with the signal: where the variance of the finest
#: Haar diagonal detail (its median absolute value, squared) in the brightest third of the image is
#: at most this many times that in the darkest third (:func:`_noise_variance_ratio`; Gaussian noise on
#: 12 photos at sigma >= 0.05: 0.57-1.37; shot noise: 1.4-17, the synthetic Z-stack's planes 2.3-3.1).
OWN_MAX_NOISE_RATIO = 1.5
#: Inpainting with ``start="auto"``: how much lower (relative) another fill's held-out error must
#: be to replace the biharmonic one (differences of a few % are within the held-out sampling noise:
#: measured on a time-lapse and a Z-stack, where the DCT fill was 0.3 / 0.8 dB worse at 1 % / 6 %
#: lower held-out error).
START_MARGIN = 0.10


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside napari_ngr."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def cpu_has_native_bfloat16(unknown: bool = True) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as torch reports it;
    ``unknown`` when torch cannot tell (``True`` for the warning: no warning is better than a wrong
    one; ``False`` for ``precision="auto"``: float32 unless bfloat16 is known to be fast)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # private torch helpers: absent in some versions
        return unknown


def resolve_precision(precision: str, device, single_image: bool = True) -> str:
    """The network's arithmetic for ``precision`` on ``device``.

    ``"auto"`` is ``"bfloat16"`` for a single image (one plane of up to 4 channels: grey, RGB,
    RGBA) on a CPU with native bfloat16 (AVX512-BF16 or AMX), and ``"float32"`` everywhere else.
    Measured on a 2-core AVX512-BF16 CPU (docs/measurements.md): single 256^2 photos run
    1.6x faster per iteration at -0.08 to +0.25 dB; stacks and spectra (the planes enter the network
    as channels) gain only 14-16 % per iteration and lose 0.06-0.10 dB, and on a 31-band cube the
    held-out stop fired at 310 iterations in bfloat16 (36.07 dB) against 1 100 in float32 (42.54).
    CPUs that emulate bfloat16 run it about 8x slower; GPUs are not measured in bfloat16.
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
    if precision != "auto":
        return precision
    native = single_image and torch.device(device).type == "cpu" and cpu_has_native_bfloat16(unknown=False)
    return "bfloat16" if native else "float32"


def finite_number(v, integer: bool = False) -> bool:
    """Whether ``v`` is a finite real number (an integer with ``integer``), not a bool or a string."""
    kind = numbers.Integral if integer else numbers.Real
    return isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SolverOptions:
    """Numerical options of the loop (the public functions set task defaults)."""

    iterations: int = 300
    mu: float = 1.0
    lr: float = 0.01
    channels: int = 32
    levels: int = 4
    skip_channels: int = 8
    input_channels: int = 16
    input_noise: float = 0.03
    guide: float = 0.0
    guide_refresh: int = 0
    # fused data terms: "nlmeans" starts from, and guides by, NL-means of y; "lowrank" by its
    # low-rank patch-group denoising (operators.low_rank_denoise), patches matched on the NL-means
    prefilter: str = "none"
    # fused data terms: "holdout" returns the check with the lowest held-out error (needs
    # final_weight="auto" and enough held-out entries; else as "last"; replaces discrepancy)
    select: str = "last"
    # fused Gaussian data terms with held-out entries: "nlmeans" mixes NL-means of y into (or returns
    # it instead of) the NGR estimate where the held-out error is clearly lower (Restoration.nlmeans_weight)
    fallback: str = "none"
    warmup: int = 0
    shared_trunk: bool = True
    pad_mode: str = "zeros"  # convolution padding: "zeros" (fused, fast) or "reflect"
    upsample: str = "nearest"  # decoder upsampling: "nearest" (as the reference code) or "bilinear"
    weight_decay: float = 0.0
    holdout: float = 0.03
    check_every: int = 10
    patience: int = 6
    patience_tol: float = 0.0  # held-out error gain (relative) that counts as progress for patience
    ema: float = 0.0
    tol: float = 0.0
    discrepancy: float = 0.0  # fused data terms: stop when residual / expected residual <= this (0: off)
    min_iterations: int = 0
    start_margin: float = 0.02  # relative held-out error gain an iterate needs to replace the start
    # held-out selection: stop (returning the start) once this fraction of the budget, and at least
    # min_iterations, has run without an iterate beating the start (0: never give up)
    start_deadline: float = 0.0
    final_weight: float | str = 1.0  # fused data terms: data-weight multiplier of the returned image, or "auto"
    # the network's arithmetic: "float32", "bfloat16" (autocast; see Restoration) or "auto" (resolve_precision)
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        """Clear errors for numbers out of range (strings are checked where they are used)."""
        checks = {  # name: (integer?, lowest, highest, lowest included)
            "mu": (False, 0.0, math.inf, False), "lr": (False, 0.0, math.inf, False),
            "channels": (True, 1, math.inf, True), "levels": (True, 0, 8, True),
            "skip_channels": (True, 1, math.inf, True), "input_channels": (True, 1, math.inf, True),
            "input_noise": (False, 0.0, math.inf, True), "guide": (False, 0.0, math.inf, True),
            "guide_refresh": (True, 0, math.inf, True), "warmup": (True, 0, math.inf, True),
            "weight_decay": (False, 0.0, math.inf, True), "holdout": (False, 0.0, 0.5, True),
            "check_every": (True, 1, math.inf, True), "patience": (True, 1, math.inf, True),
            "patience_tol": (False, 0.0, 1.0, True), "ema": (False, 0.0, 1.0, True),
            "tol": (False, 0.0, math.inf, True), "discrepancy": (False, 0.0, math.inf, True),
            "min_iterations": (True, 0, math.inf, True), "start_margin": (False, 0.0, 1.0, True),
            "start_deadline": (False, 0.0, 1.0, True),
        }
        for name, (integer, lo, hi, closed) in checks.items():
            v = getattr(self, name)
            ok = finite_number(v, integer) and v <= hi and (v >= lo if closed else v > lo)
            if not ok:
                what = "an integer" if integer else "a number"
                rng = f"{'>=' if closed else '>'} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
                raise ValueError(f"option {name} must be {what} {rng}, got {v!r}")
        if self.final_weight != "auto" and not (finite_number(self.final_weight) and self.final_weight > 0):
            raise ValueError(f"option final_weight must be 'auto' or a number > 0, got {self.final_weight!r}")


@dataclass
class Progress:
    """One record per iteration, passed to callbacks and yielded by :meth:`Restoration.iterate`."""

    iteration: int
    total: int
    loss: float
    primal_residual: float
    change: float
    validation: float | None
    best_iteration: int
    elapsed: float
    preview: np.ndarray | None = None
    discrepancy: float | None = None  # denoising: residual variance / the variance exact gradients leave

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("preview")
        return d


@dataclass
class _State:
    best: torch.Tensor | None = None
    best_iteration: int = 0
    best_score: float = math.inf
    anchor_score: float = math.inf  # held-out error at the last real progress (patience_tol)
    anchor_iteration: int = 0
    iteration: int = 0
    stop_reason: str = "not started"
    history: list = field(default_factory=list)
    final_weight: float | None = None  # the chosen final_weight (denoising)
    final_weight_at: int = -1  # the iteration it was chosen at
    best_fields: torch.Tensor | None = None  # select="holdout": the averaged gradient term of the best check
    final_score: float = math.inf  # estimated held-out error of the returned NGR image (final_weight="auto")
    best_held: tuple | None = None  # select="holdout": (held-out prediction, hat weight) of the best check
    final_held: tuple | None = None  # the same for the final_weight="auto" choice
    fallback_score: float | None = None  # fallback="nlmeans": estimated held-out error of NL-means
    nlmeans_weight: float = 0.0  # fallback="nlmeans": NL-means' share of the returned image
    nlmeans_scores: list | None = None  # estimated held-out errors of the shares NLMEANS_WEIGHTS
    fallback_at: int = -1  # the iteration nlmeans_weight was decided at
    # the NL-means chosen: None plain, OWN own value weighted 1, h pilot-weighted, (OWN, h) both
    fallback_h: float | str | tuple | None = None
    fallback_scores: dict | None = None  # estimated held-out error of each fallback candidate, by h


def _own_score(v: torch.Tensor, own: torch.Tensor | None, y: torch.Tensor, s2: float) -> float:
    """Estimated mean squared error (against the noise-free image) of a filter whose leave-one-out
    prediction of the held-out entries ``y`` is ``v`` and that gives an entry's own value the share
    ``own`` (None: 0): ``(1 - own)^2 ((v - y)^2 - sigma^2) + own^2 sigma^2``, averaged (``y``'s
    noise is independent of ``v``; where it is not the same everywhere, as shot noise, ``sigma^2``
    understates the bright entries' and this estimate is too low: see :data:`OWN_MAX_NOISE_RATIO`)."""
    if own is None:
        return float(torch.mean((v - y) ** 2)) - s2
    return float(torch.mean((1 - own) ** 2 * ((v - y) ** 2 - s2) + own * own * s2))


def _noise_variance_ratio(x: torch.Tensor) -> float:
    """How much stronger the noise of an ``(S, C, H, W)`` image is in its brightest third than in its
    darkest: the ratio of the squared median absolute finest Haar diagonal detail
    ``(a - b - c + d) / 2`` of the 2 x 2 blocks whose mean is in the top third to that of those in
    the bottom third. About 1 for Gaussian noise (edges and texture are mostly not diagonal
    detail, and the median ignores the rest), above 1.4 for shot noise (its variance grows with
    the signal)."""
    H, W = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
    a, b = x[..., 0:H:2, 0:W:2], x[..., 0:H:2, 1:W:2]
    c, d = x[..., 1:H:2, 0:W:2], x[..., 1:H:2, 1:W:2]
    detail = ((a - b - c + d) / 2).abs().flatten().float()
    mean = ((a + b + c + d) / 4).flatten().float()
    if mean.numel() < 3:
        return math.inf
    step = max(1, mean.numel() >> 22)  # torch.quantile takes at most 2^24 entries: a sample of large images
    detail, mean = detail[::step], mean[::step]
    lo, hi = torch.quantile(mean, torch.tensor([1 / 3, 2 / 3], device=mean.device))
    dark = detail[mean <= lo].median()
    bright = detail[mean >= hi].median()
    return float((bright / dark.clamp(min=1e-12)) ** 2)


class Restoration:
    """One NGR restoration in the internal ``(S, C, H, W)`` layout.

    Parameters
    ----------
    operator : Operator
        The degradation, holding the (normalized) observation.
    axes : dict
        ``{name: (dim, weight)}``: the regularized axes, their tensor dimension and weight.
    options : SolverOptions
    device : torch.device
    preview_every : int
        Every this many iterations, :meth:`iterate` attaches the current estimate to its record.
    to_user : callable
        Maps an internal tensor to the array given to the user (layout and units).
    """

    def __init__(self, operator: Operator, axes: dict, options: SolverOptions, *, device,
                 preview_every: int = 0, to_user: Callable | None = None):
        self.full_operator = operator
        self.axes = {k: v for k, v in axes.items()}
        self.opt = options
        self.device = torch.device(device)
        # bfloat16: the network's forward and backward run under autocast (its convolutions in
        # bfloat16, weights, Adam and everything outside the network in float32). 1.6x faster per
        # iteration on single photos on CPUs with native bfloat16 (AVX512-BF16 / AMX) at equal
        # quality, where "auto" (the default) chooses it (resolve_precision); on CPUs without it
        # emulated and far slower (8x measured on an AVX2 CPU), and asking for it there warns.
        #: The network's arithmetic actually used (``options.precision`` with "auto" resolved).
        S, C = operator.y.shape[:2]
        self.precision = resolve_precision(options.precision, self.device, single_image=S == 1 and C <= 4)
        self._bf16 = self.precision == "bfloat16"
        if self._bf16 and self.device.type == "cpu" and not cpu_has_native_bfloat16():
            warnings.warn("precision='bfloat16' on a CPU without native bfloat16 (AVX512-BF16 or AMX) is "
                          "emulated and much slower than float32 (about 8x per iteration measured on an "
                          "AVX2 CPU); use precision='auto' or 'float32'", RuntimeWarning,
                          stacklevel=_caller_stacklevel())
        fw = options.final_weight
        if not (isinstance(fw, str) and fw == "auto" or (isinstance(fw, numbers.Real) and not isinstance(fw, bool)
                                                       and math.isfinite(fw) and fw > 0)):
            raise ValueError(f"final_weight must be a positive number or 'auto', got {fw!r}")
        sd = options.start_deadline
        if isinstance(sd, bool) or not isinstance(sd, numbers.Real) or not 0 <= sd <= 1:
            raise ValueError(f"start_deadline must be a fraction of the budget in [0, 1], got {sd!r}")
        self.preview_every = int(preview_every)
        self.to_user = to_user or (lambda t: t.detach().cpu().numpy())
        self.state = _State()
        seed = options.seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        self._gen = torch.Generator(device="cpu").manual_seed(int(seed))
        y = operator.y
        self.shape = tuple(y.shape)
        S, C, H, W = self.shape
        self.held = None  # inpainting: held-out observed entries, which pick the returned iterate
        self.noise_held = None  # denoising: held-out noisy entries, which pick the final data weight
        self.operator = operator
        if isinstance(operator, Inpainting) and options.holdout > 0:
            self.operator, self.held = operator.holdout(options.holdout, self._gen)
            if int(self.held.sum()) < 16:
                self.operator, self.held = operator, None
        elif isinstance(operator, Denoising) and options.final_weight == "auto" and options.holdout > 0:
            op, held = operator.holdout(options.holdout, self._gen)
            if int(held.sum()) >= MIN_HELD:
                self.operator, self.noise_held = op, held.to(self.device)
                self._n_kept = held.numel() - int(held.sum())
        self.dims = {name: dim for name, (dim, w) in self.axes.items()}
        self.weights = {dim: w for name, (dim, w) in self.axes.items()}
        self.grad = GradientSolver(self.shape, self.weights, device=self.device)
        planes = S * C
        #: Inpainting: the initial fill used and each candidate's mean squared error on the held-out
        #: entries. ``start="auto"``: the first candidate (biharmonic) unless another one has an error
        #: at least START_MARGIN (10 %) lower, and lower by more than one standard error of the paired
        #: difference; the first one where nothing is held out. Where a few planes lost a large hole
        #: (``Inpainting.holdout_planes``), the errors are those of the fills of a second split, which
        #: holds a copy of the hole out whole in another plane.
        self.start_name, self.start_errors = None, {}
        if isinstance(self.operator, Inpainting):
            # a large hole in a few planes: its copy, held out whole in another plane, chooses; then
            # only the chosen fill is made from the loop's split
            by_plane = operator.holdout_planes() if operator.start == "auto" and self.held is not None else None
            cands = by_plane[0].start_candidates() if by_plane is not None else self.operator.start_candidates()
            name = next(iter(cands))
            if len(cands) > 1 and self.held is not None:
                held = by_plane[1] if by_plane is not None else self.held
                y_held = operator.y[held]
                sq = {k: (v.to(self.device)[held.to(self.device)] - y_held.to(self.device)) ** 2
                      for k, v in cands.items()}
                self.start_errors = {k: float(e.mean()) for k, e in sq.items()}
                best = name
                for k, e in sq.items():
                    d = (e - sq[name]).cpu().double()  # MPS has no float64
                    if (float(d.mean() + d.std() / math.sqrt(d.numel())) < 0
                            and self.start_errors[k] <= (1 - START_MARGIN) * self.start_errors[name]
                            and self.start_errors[k] < self.start_errors[best]):
                        best = k
                name = best
            self.start_name = name
            self.x = (self.operator.fill(name) if by_plane is not None else cands[name]).to(self.device)
        else:
            self.x = self.operator.initial_estimate().to(self.device)
        if options.prefilter not in ("none", "nlmeans", "lowrank"):
            raise ValueError(f"prefilter must be 'none', 'nlmeans' or 'lowrank', got {options.prefilter!r}")
        if options.select not in ("last", "holdout"):
            raise ValueError(f"select must be 'last' or 'holdout', got {options.select!r}")
        if options.fallback not in ("none", "nlmeans"):
            raise ValueError(f"fallback must be 'none' or 'nlmeans', got {options.fallback!r}")
        self._full_fallback = None
        # fallback="nlmeans": {h: (NL-means at the held-out entries, imputed; share of an entry's own value or None)}
        self._fallback_nlm = None
        self._pilot = None  # stacks: the low-rank pilot of the fallback's NL-means weights
        self._prefiltered = None
        if options.prefilter != "none" and getattr(operator, "sigma", None):
            # Held-out entries are imputed in the initial estimate: their values stay unseen.
            pre = nl_means_planes(self.x, self.operator.sigma)
            if options.prefilter == "lowrank":  # its patches matched on the NL-means
                pre = low_rank_denoise(self.x, self.operator.sigma, guide=pre)
            self._prefiltered = self.x = pre
        n_in = options.input_channels + (planes if options.guide > 0 else 0)
        levels = max(0, min(options.levels, int(math.log2(min(H, W))) - 2))  # coarsest map >= 2 px
        net_cls = GradientNet if options.shared_trunk else SeparateGradientNets
        # The layers' initial weights come from torch's global generator: seeded here, and restored
        # afterwards, so that a restoration neither depends on nor changes the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.net = net_cls(n_in, planes, len(self.axes), channels=options.channels,
                               levels=levels, skip_channels=options.skip_channels,
                               pad_mode=options.pad_mode, upsample=options.upsample)
        self.net = self.net.to(self.device)
        self.z_code = (0.1 * torch.rand((1, options.input_channels, H, W), generator=self._gen)).to(self.device)
        g = None
        if options.guide > 0:
            g = self._prefiltered.reshape(1, planes, H, W) if self._prefiltered is not None else self._guide(self.x)
        self._set_input(g)
        # fused Adam (one kernel over every parameter): PyTorch's default on a CPU is a Python loop over
        # the 94 parameter tensors, 4-5 ms of a 90 ms iteration (256^2 RGB, 2 cores); fused, about 1 ms
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.optim = torch.optim.Adam(self.net.parameters(), lr=options.lr, weight_decay=options.weight_decay, **fused)
        self.u = self.x.clone()
        self.w = torch.zeros_like(self.x)
        self.avg = self.x.clone()
        self.gavg = None  # fused data terms: moving average of the gradient term sum_i lambda_i D_i^T f_i
        self._warm = 0
        self._full_start = None
        self.fields = {name: forward_difference(self.x, dim) for name, dim in self.dims.items()}
        # Fused data terms with select="holdout": every check_every iterations, the held-out error
        # of the returned image (as final_weight="auto" estimates it) picks the best check so far.
        self._final_index = 0  # final_weight="auto": where the next choice starts (FINAL_WEIGHTS index)
        self._select = (options.select == "holdout" and self.noise_held is not None
                        and self.operator.fused_weight is not None)
        self._disc_scale = None  # expected mean squared residual y - x with exact gradients
        op = self.operator
        if options.discrepancy > 0 and op.fused_weight is not None and getattr(op, "sigma", None):
            self._disc_scale = op.sigma ** 2 * self.grad.residual_factor(op.fused_weight)

    def _set_input(self, guide: torch.Tensor | None) -> None:
        """The network's input ``z``: the random code, then the guide's planes if any, channels-last
        (the network's layout): the input noise is then added in that layout, and the first
        convolution needs no copy (1.6 ms of an 85 ms iteration, 256^2 RGB on 2 CPU cores)."""
        z = self.z_code if guide is None else torch.cat([self.z_code, guide], dim=1)
        self.z = z.contiguous(memory_format=torch.channels_last)

    def _guide(self, x: torch.Tensor) -> torch.Tensor:
        from scipy import ndimage

        S, C, H, W = self.shape
        s = self.opt.guide
        g = ndimage.gaussian_filter(x.detach().cpu().numpy(), (0, 0, s, s), mode="reflect")
        return torch.from_numpy(g.reshape(1, S * C, H, W).astype("float32")).to(self.device)

    # ------------------------------------------------------------------ loop
    def _step(self) -> tuple[float, float, float]:
        opt = self.opt
        z = self.z
        if opt.input_noise > 0:
            z = torch.add(z, torch.randn(z.shape, generator=self._gen).to(self.device), alpha=opt.input_noise)
        if self._bf16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = self.net(z)
            out = out.float()
        else:
            out = self.net(z)
        S, C, H, W = self.shape
        loss = 0.0
        fields = {}
        for i, (name, dim) in enumerate(self.dims.items()):
            f = out[i].reshape(S, C, H, W)
            target = forward_difference(self.x, dim)
            loss = loss + self.weights[dim] * torch.mean((f - target) ** 2)
            fields[dim] = f.detach()
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()

        self.fields = {name: fields[dim] for name, dim in self.dims.items()}
        if self._warm < opt.warmup:  # fit the network to the initial estimate first
            self._warm += 1
            return float(loss.detach()), 0.0, 0.0
        x_old = self.x
        rhs = self.grad.divergence_term(fields)
        op = self.operator
        if op.fused_weight is not None:
            wgt = op.fused_weight
            self.x = self.grad.solve(rhs + wgt * op.fused_target(self.x), wgt)
            self.u = self.x
            primal = 0.0
            # Every X-update is linear in the gradient term: the moving average of the iterates is
            # one solve with the averaged term, which the returned image re-solves (estimate()).
            e = opt.ema if self.gavg is not None else 0.0
            self.gavg = rhs if e == 0 else e * self.gavg + (1 - e) * rhs
        else:
            mu = opt.mu
            self.x = self.grad.solve(rhs + mu * (self.u - self.w), mu)
            self.u = op.prox(self.x + self.w, mu)
            r = self.x - self.u
            self.w = self.w + r
            primal = float(r.norm() / (self.u.norm() + 1e-12))
        change = float((self.x - x_old).norm() / (x_old.norm() + 1e-12))
        return float(loss.detach()), primal, change

    def iterate(self) -> Iterator[Progress]:
        """Run the loop, yielding a :class:`Progress` record after every iteration.

        Closing the generator early (cancel) is safe: :meth:`result` then returns the best
        estimate so far.
        """
        opt = self.opt
        st = self.state
        t0 = time.perf_counter()
        st.stop_reason = "running"
        total = int(opt.iterations)
        for k in range(st.iteration + 1, total + 1):
            with torch.enable_grad():
                loss, primal, change = self._step()
            st.iteration = k
            if opt.guide > 0 and opt.guide_refresh and k % opt.guide_refresh == 0 and self._prefiltered is None:
                src = self.avg if opt.ema > 0 else self.x
                self._set_input(self._guide(self.operator.compose(src)))
            if opt.ema > 0:
                self.avg = opt.ema * self.avg + (1 - opt.ema) * self.x if k > 1 else self.x.clone()
                current = self.avg
            else:
                current = self.x
            val = None
            disc = None
            stop = False
            if self.held is not None:
                if k % opt.check_every == 0 or k == total:
                    err = (current - self.full_operator.y)[self.held]
                    val = float(torch.mean(err * err))
                    need = st.best_score
                    if st.best_iteration <= opt.warmup < k:
                        # The start is the best so far: an NGR iterate must beat it by a margin, not
                        # by the sampling noise of the held-out error.
                        need = st.best_score * (1.0 - opt.start_margin)
                    if val < need:
                        st.best_score, st.best_iteration = val, k
                        st.best = current.detach().clone()
                        if val < st.anchor_score * (1.0 - opt.patience_tol) or st.anchor_iteration <= opt.warmup:
                            st.anchor_score, st.anchor_iteration = val, k
                    if ((k - st.anchor_iteration) >= opt.patience * opt.check_every and k >= opt.min_iterations
                            and st.best_iteration > opt.warmup):
                        # Stop early only once an NGR iterate has beaten the start: the held-out
                        # error often rises for a while before it falls below the start's.
                        stop = True
                        st.stop_reason = "validation error stopped improving"
                    elif (opt.start_deadline > 0 and st.best_iteration <= opt.warmup
                          and k >= max(opt.min_iterations, opt.start_deadline * total)):
                        # Measured (docs/design.md): on stacks an iterate beats the start by iteration 260-480
                        # and keeps improving to 1200; on single photos an iterate that beats the
                        # start does so by 200, else none does in 600 (the API's planar deadline: 300).
                        stop = True
                        st.stop_reason = f"start_deadline: no iterate beat the start by iteration {k}"
            elif self._select:
                if k % opt.check_every == 0 or k == total:
                    score, c, held_pred = self._choose_final_weight()
                    val = score
                    if score < st.best_score:
                        st.best_score, st.best_iteration = score, k
                        st.best, st.best_fields = current.detach().clone(), self.gavg.clone()
                        st.final_weight, st.final_weight_at, st.best_held = c, k, held_pred
                    if (k - st.best_iteration) >= opt.patience * opt.check_every and k >= opt.min_iterations:
                        stop = True
                        st.stop_reason = "held-out error stopped improving"
            else:
                st.best, st.best_iteration = current.detach(), k
                if self._disc_scale is not None:
                    r2 = (self.operator.y - current) ** 2
                    if self.noise_held is None:
                        disc = float(torch.mean(r2)) / self._disc_scale
                    else:  # held-out entries are not fitted: measure the kept ones
                        disc = float(r2.sum() - r2[self.noise_held].sum()) / self._n_kept / self._disc_scale
                    if k >= opt.min_iterations and disc <= opt.discrepancy:
                        stop = True
                        st.stop_reason = "residual reached the noise level (discrepancy principle)"
                if not stop and opt.tol > 0 and k >= opt.min_iterations and change < opt.tol:
                    stop = True
                    st.stop_reason = f"relative change below tol={opt.tol:g}"
            rec = Progress(k, total, loss, primal, change, val, st.best_iteration, time.perf_counter() - t0,
                           discrepancy=disc)
            st.history.append(rec.as_dict())
            if self.preview_every and (k % self.preview_every == 0 or k == total or stop):
                rec.preview = self.to_user(self.full_operator.compose(current))
            yield rec
            if stop:
                return
        st.stop_reason = "iteration budget reached"

    def run(self, callback: Callable | None = None) -> "Restoration":
        for rec in self.iterate():
            if callback is not None:
                callback(rec)
        return self

    # ------------------------------------------------------------------ results
    def estimate(self) -> torch.Tensor:
        """The chosen estimate, observed data re-inserted: the best held-out iterate (inpainting),
        the moving average re-solved with ``final_weight`` times the data weight (denoising)."""
        alpha = self.nlmeans_weight()
        if alpha > 0:
            h = self.state.fallback_h
            if self._full_fallback is None or self._full_fallback[0] != h:  # NL-means of every entry, held-out ones too
                self._full_fallback = (h, self._nl_means(self.full_operator.initial_estimate().to(self.device), h))
            nlm = self.full_operator.compose(self._full_fallback[1])
            return nlm if alpha >= 1 else (1 - alpha) * self._network_estimate() + alpha * nlm
        return self._network_estimate()

    def _nl_means(self, x: torch.Tensor, h: float | str | None = None, weight_sum: bool = False):
        """One fallback candidate: ``h=None``, NL-means
        (:func:`~napari_ngr.operators.nl_means_stack`, leave-one-out, so that its held-out error is
        honest) with patches matched across the two planes on either side of a stack with ``h =
        0.6 sigma``, within the plane of a single image with ``0.8 sigma`` (five planes offer five
        times the candidates, each must be closer); :data:`OWN`: that NL-means of a single image
        with the weight 1 on an entry's own value; a number: NL-means of a stack weighted on the
        pilot of :meth:`_fallback_candidates` with that ``h``; ``(OWN, h)``: the same with the
        weight 1 on an entry's own value. ``weight_sum`` (``None`` and :data:`OWN`): ``(result,
        sum of the other entries' weights)``."""
        sigma = self.operator.sigma
        if h is None or h == OWN:
            return nl_means_stack(x, sigma, h=0.6 if x.shape[0] > 1 else 0.8, self_weight=1.0 if h == OWN else 0.0,
                                  return_weight_sum=weight_sum)
        own = isinstance(h, tuple)  # (OWN, h): pilot-weighted with the weight 1 on an entry's own value
        return nl_means_stack(x, sigma, h=h[1] if own else h, guide=self._pilot, self_weight=1.0 if own else 0.0)

    def _fallback_candidates(self, x: torch.Tensor, at: torch.Tensor) -> dict:
        """The fallback's candidates at the entries ``at`` (the held-out ones), keyed by ``h``, as
        ``(leave-one-out value, share of the entry's own value or None)``: ``None``,
        :meth:`_nl_means`; on a single image also :data:`OWN`, the same NL-means with the weight 1
        on the entry's own value (its share ``1 / (weight sum + 1)``; the held-out entries, imputed,
        do not see it, so its error is estimated from the leave-one-out value and that share, see
        :meth:`nlmeans_weight`); on a stack also, for each ``h`` in :data:`GUIDED_H`, NL-means
        whose weights compare patches of a pilot: the low-rank patch-group denoising of ``x``
        (:func:`~napari_ngr.operators.low_rank_denoise`, patches matched across the two planes on
        either side, on the NL-means), kept for the candidate's recomputation from all entries.
        Its values are still ``x``'s, an entry's own value still gets no weight, so its held-out
        error stays honest (unlike the pilot's own: hard thresholding keeps some of an entry's own
        noise); and ``(OWN, h)``, each of them with the weight 1 on the entry's own value, scored
        as :data:`OWN`. The :data:`OWN` candidates are offered only where the noise does not grow
        with the signal (:data:`OWN_MAX_NOISE_RATIO`). Only the values at ``at`` are kept (a large
        stack's eleven candidates are not held whole)."""
        # {h: (leave-one-out NL-means, the other entries' weight sum where it has an own-value version)}
        if x.shape[0] == 1:
            loo = {None: self._nl_means(x, weight_sum=True)}
        else:
            plain = self._nl_means(x)
            # reference patches every 4 px (3 for single images): the weighted NL-means is the same
            # to 0.01 dB on the video, time-lapse and Z-stack samples, the pilot 25-30 % faster
            self._pilot = low_rank_denoise(x, self.operator.sigma, guide=plain, plane_distance=2, step=4)
            guided = nl_means_stack(x, self.operator.sigma, h=GUIDED_H, guide=self._pilot, return_weight_sum=True)
            loo = {None: (plain, None), **dict(zip(GUIDED_H, guided))}
        cands = {h: (v[at], None) for h, (v, _) in loo.items()}
        if _noise_variance_ratio(self.full_operator.y) <= OWN_MAX_NOISE_RATIO:  # the observation as it is
            for h, (v, wsum) in loo.items():
                if wsum is not None:
                    cands[OWN if h is None else (OWN, h)] = (v[at], (1.0 / (wsum + 1.0)).expand_as(v)[at])
        return cands

    def _network_estimate(self) -> torch.Tensor:
        """:meth:`estimate` without the NL-means fallback."""
        st = self.state
        if self.held is not None and st.best is not None and st.best_iteration <= self.opt.warmup:
            # The start won the validation: rebuild it (the fill chosen) from *all* observed entries.
            if self._full_start is None:
                op = self.full_operator
                fill = op.fill(self.start_name) if isinstance(op, Inpainting) else op.initial_estimate()
                self._full_start = fill.to(self.device)
            return self.full_operator.compose(self._full_start)
        best = st.best if st.best is not None else self.x
        op = self.operator
        fw = self.final_weight()
        if fw is not None:
            wn = op.fused_weight * fw
            g = st.best_fields if st.best_fields is not None else self.gavg
            best = self.grad.solve(g + wn * self.full_operator.y, wn)  # every entry's data, held-out too
        return self.full_operator.compose(best)

    def final_weight(self) -> float | None:
        """The data-weight multiplier of the returned denoised image (``SolverOptions.final_weight``);
        ``None`` where the returned image is not re-solved (no fused data term, or no iteration yet).

        ``"auto"`` chooses it among :data:`FINAL_WEIGHTS` by the estimated mean squared error of
        the returned image, measured on the held-out noisy entries (``noise_held``), which no
        iterate has seen: for each candidate ``c`` the averaged gradient term is solved with the
        data weight ``c * w`` and those entries left out (imputed, to convergence), and ``err``,
        their mean squared difference to the observation, is ``sigma^2`` plus the error of that
        estimate (their noise is independent of it). The returned image also sees each entry's
        own observation, with the hat matrix's weight ``a = mean(c w / (c w + lambda))``, so its error is
        estimated as ``(1 - a)^2 (err - sigma^2) + a^2 sigma^2``. Without enough held-out entries
        ``"auto"`` is :data:`FALLBACK_FINAL_WEIGHT`.
        """
        if self.operator.fused_weight is None or self.gavg is None:
            return None
        fw = self.opt.final_weight
        if fw != "auto":
            return float(fw)
        st = self.state
        if self.noise_held is None:
            return FALLBACK_FINAL_WEIGHT
        if st.best_fields is not None:  # select="holdout": chosen with the best check
            return st.final_weight
        if st.final_weight_at != st.iteration:
            st.final_score, st.final_weight, st.final_held = self._choose_final_weight()
            st.final_weight_at = st.iteration
        return st.final_weight

    def fallback_chosen(self) -> bool:
        """Whether :meth:`estimate` returns NL-means of the observation alone (:meth:`nlmeans_weight` 1)."""
        return self.nlmeans_weight() >= 1.0

    def nlmeans_weight(self) -> float:
        """NL-means' share ``alpha`` of the returned image, ``(1 - alpha) NGR + alpha NL-means``.

        With ``fallback="nlmeans"`` (Gaussian denoising of images and stacks, by default), NL-means
        of the observation with the held-out entries imputed is computed (:meth:`_fallback_candidates`:
        leave-one-out, with 2-D patches matched across neighbouring planes on a stack, where it is
        also weighted on a low-rank pilot; each also with the weight 1 on an entry's own value
        where the noise allows; ``state.fallback_h`` is the candidate whose best mix below scores
        lowest). Each
        ``alpha`` in :data:`NLMEANS_WEIGHTS` is scored on those entries like the NGR estimate
        alone: with ``g`` the NGR image's prediction of a held-out entry ``y`` from the other
        entries, ``a`` the weight the returned image gives an entry's own value (its hat weight),
        ``v`` NL-means' leave-one-out prediction, ``o`` the share NL-means gives the entry's own
        value (0, or ``1 / (weight sum + 1)`` for :data:`OWN`), ``w1 = (1 - alpha)(1 - a)``, ``w2 =
        alpha (1 - o)`` and ``b = (1 - alpha) a + alpha o``, the mean squared error against the
        noise-free image is estimated as ``mean((w1 (g - y) + w2 (v - y))^2 - (w1 + w2)^2 sigma^2
        + b^2 sigma^2)`` (``alpha = 0`` is :meth:`final_weight`'s estimate, ``alpha = 1``
        NL-means' own, :func:`_own_score`). The lowest is used if it is below the
        NGR image's by more than twice the standard error of that difference,
        ``2 sigma alpha rms(nlm - ngr) / sqrt(n)`` over the ``n`` held-out entries (the noise's own
        variance cancels); else ``alpha = 0``. Within its iteration budget the network may not beat
        the classical filter (on a CPU: videos with motion, where each frame differs from its
        neighbours), and the two often err in different places.
        """
        opt, st, op = self.opt, self.state, self.operator
        if (opt.fallback != "nlmeans" or self.noise_held is None or self.gavg is None
                or op.fused_weight is None or not getattr(op, "sigma", None) or opt.final_weight != "auto"):
            return 0.0  # a fixed final weight has no held-out score to compare
        if st.fallback_at != st.iteration:
            held = self.noise_held
            y, s2 = op.y[held], op.sigma ** 2
            if self._fallback_nlm is None:  # held-out entries imputed: their values stay unseen
                cands = self._fallback_candidates(op.initial_estimate().to(self.device), held)
                scores = {h: _own_score(v, own, y, s2) for h, (v, own) in cands.items()}
                st.fallback_scores = scores
                # The mixes of every candidate are scored: the one best alone need not mix best
                # (leave-one-out NL-means errs where the network does not).
                self._fallback_nlm = cands
            if st.best_fields is not None:  # select="holdout": the best check's
                g, a = st.best_held
            else:
                self.final_weight()
                g, a = st.final_held
            mixes = {h: self._mix_scores(g, a, v, own, y, s2) for h, (v, own) in self._fallback_nlm.items()}
            h = min(mixes, key=lambda h: (min(mixes[h]), h is not None))
            scores = mixes[h]
            k = int(np.argmin(scores))
            alpha = NLMEANS_WEIGHTS[k]
            v, own = self._fallback_nlm[h]
            # Both errors are measured against the same noisy entries: their difference has the
            # standard error 2 sigma rms(diff) / sqrt(n) (the noise's own variance cancels), and the
            # mix must be better by twice that (tiny images: a few hundred entries decide).
            d = alpha * (1 - (0.0 if own is None else own)) * (v - self._network_estimate()[held])
            se = 2 * op.sigma * float(torch.sqrt(torch.mean(d * d) / d.numel()))
            st.nlmeans_weight = alpha if scores[k] + 2 * se < scores[0] else 0.0
            st.fallback_h, st.fallback_score = h, st.fallback_scores[h]
            st.nlmeans_scores = scores
            st.fallback_at = st.iteration
        return st.nlmeans_weight

    @staticmethod
    def _mix_scores(g, a, v, own, y, s2) -> list:
        """Estimated mean squared errors of the mixes :data:`NLMEANS_WEIGHTS` of the NGR image
        (held-out prediction ``g``, own-value share ``a``) and an NL-means (``v``, ``own``), see
        :meth:`nlmeans_weight`."""
        own = 0.0 if own is None else own
        scores = []
        for alpha in NLMEANS_WEIGHTS:
            w1 = (1 - alpha) * (1 - a)
            w2 = alpha * (1 - own)
            e = w1 * (g - y) + w2 * (v - y)
            b = (1 - alpha) * a + alpha * own  # the own value's share of the mix
            scores.append(float(torch.mean(e * e - (w1 + w2) ** 2 * s2 + b * b * s2)))
        return scores

    def _choose_final_weight(self) -> tuple[float, float, tuple]:
        """``(estimated mean squared error, multiplier, (held-out prediction, hat weight))`` of the
        best of :data:`FINAL_WEIGHTS`."""
        op = self.operator
        held = self.noise_held
        y, w, s2 = op.y, op.fused_weight, op.sigma ** 2
        x = self.x
        scores = {}  # index in FINAL_WEIGHTS -> estimated error
        preds = {}
        n = len(FINAL_WEIGHTS)
        i = self._final_index  # the last check's choice (the first check: the largest weight)
        while True:
            wn = w * FINAL_WEIGHTS[i]
            for _ in range(50):  # held-out entries imputed: converges geometrically (their hat weight < 1)
                x_new = self.grad.solve(self.gavg + wn * torch.where(held, x, y), wn)
                step = float((x_new - x)[held].abs().max())
                x = x_new
                if step < 1e-5:
                    break
            err = float(torch.mean((x - y)[held] ** 2))
            a = self.grad.hat_trace(wn)
            scores[i] = (1 - a) ** 2 * (err - s2) + a * a * s2
            preds[i] = (x[held].clone(), a)
            # Walk until the lowest estimate has two evaluated neighbours on each side (or the list
            # ends): from the largest weight that is the former scan down the list, stopped two
            # candidates past the minimum; from the last check's choice, 5 candidates where it stays.
            b = min(scores, key=lambda j: (scores[j], -j))  # ties: the smaller weight, as before
            todo = [j for j in range(max(0, b - 2), min(n, b + 3)) if j not in scores]
            if not todo:
                break
            i = min(todo, key=lambda j: (abs(j - b), -j))
        self._final_index = b
        return scores[b], FINAL_WEIGHTS[b], preds[b]

    def gradients(self, est: torch.Tensor | None = None) -> dict:
        """Gradient maps of ``est`` (default: the returned estimate) along each regularized axis
        (Neumann forward differences)."""
        if est is None:
            est = self.estimate()
        return {name: forward_difference(est, dim) for name, dim in self.dims.items()}

    def network_gradients(self) -> dict:
        """The network's last predicted gradient maps ``f_Theta,i(z)``."""
        return dict(self.fields)
