"""Forward (degradation) operators and their data terms.

Each operator describes how the observation ``y`` was produced from the clean image ``x``
and knows how to solve its own data subproblem

.. math::  \\operatorname{prox}(v, \\mu) = \\arg\\min_u\\ \\mathrm{data}(u; y) + \\tfrac{\\mu}{2}\\|u - v\\|^2 ,

which is all the ADMM loop in :mod:`napari_ngr.solver` needs. A new degradation (a
blur, a downsampling, another noise model) is one new subclass; the loop is unchanged.
All tensors are in the solver's internal layout ``(S, C, H, W)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["Operator", "Inpainting", "Denoising", "MixedNoise", "nl_means_planes", "nl_means_stack",
           "low_rank_denoise", "dct_fill"]


class Operator:
    """Base class: ``y = A(x) + noise``."""

    #: If not None, the data term is ``weight/2 * ||x - y||^2`` and the X-update solves it
    #: exactly together with the gradient term (no splitting needed).
    fused_weight: float | None = None

    def __init__(self, y: torch.Tensor):
        self.y = y

    def initial_estimate(self) -> torch.Tensor:
        """A first guess of ``x`` in the domain of the image."""
        return self.y.clone()

    def prox(self, v: torch.Tensor, mu: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def compose(self, x: torch.Tensor) -> torch.Tensor:
        """The estimate reported to the user, given the current iterate ``x``."""
        return x

    def fused_target(self, x: torch.Tensor) -> torch.Tensor:
        """What a fused data term pulls ``x`` towards (:attr:`fused_weight`): the observation."""
        return self.y


def _interpolate_along(values: np.ndarray, known: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of ``values`` along ``axis`` from the entries where ``known``
    (broadcastable to ``values``): each other entry lies between the nearest known entries before
    and after it on its line (a copy of the nearest one at an end). Returns ``(filled, reached)``,
    ``reached`` False where the line has no known entry (those keep their value)."""
    known = np.broadcast_to(known, values.shape)
    v, k = np.moveaxis(values, axis, 0), np.moveaxis(known, axis, 0)
    n = v.shape[0]
    idx = np.arange(n).reshape((n,) + (1,) * (v.ndim - 1))
    prev = np.maximum.accumulate(np.where(k, idx, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(k, idx, n)[::-1], axis=0)[::-1]
    v_prev = np.take_along_axis(v, np.clip(prev, 0, n - 1), axis=0)
    v_next = np.take_along_axis(v, np.clip(nxt, 0, n - 1), axis=0)
    has_prev, has_next = prev >= 0, nxt < n
    both = has_prev & has_next
    t = np.where(both, (idx - prev) / np.maximum(nxt - prev, 1), 0.0)
    out = np.where(has_prev, v_prev, np.where(has_next, v_next, v))
    out = np.where(both, (1 - t) * v_prev + t * v_next, out)
    out = np.where(k, v, out)
    return np.moveaxis(out, 0, axis), np.moveaxis(has_prev | has_next, 0, axis)


def _fill_empty_planes(out, obs) -> None:
    """Fill, in place, the planes of ``out`` (S, C, H, W; an ndarray or a tensor) where ``obs``
    (its shape, bool) has no observed entry: a missing Z slice or frame, a dead band or channel,
    which a fill within the plane cannot reach and the held-out entries cannot judge.

    Each such plane is interpolated linearly, pixel by pixel, between the nearest planes along the
    stack axis (S) of the same channel that have observed entries (at an end of the stack, a copy
    of the nearest one); where no plane of that channel has any, between the nearest channels of
    the same plane along C (neighbouring bands of a spectrum); where neither has, the mean of the
    observed data.
    """
    S, C = out.shape[:2]
    has = np.asarray((obs.reshape(S, C, -1).sum(-1) > 0).tolist(), dtype=bool).reshape(S, C)
    if has.all():
        return
    is_np = isinstance(out, np.ndarray)
    src = np.asarray(out if is_np else out.detach().cpu().numpy(), dtype=np.float64)
    known = has[:, :, None, None]
    res = src.copy()
    reached = np.zeros((S, C, 1, 1), bool)
    if S > 1:
        res, reached = _interpolate_along(src, known, 0)
        reached = reached[..., :1, :1]
    if C > 1:
        by_c, by_c_reached = _interpolate_along(src, known, 1)
        res = np.where(reached, res, by_c)
        reached = reached | by_c_reached[..., :1, :1]
    if not reached.all():
        o = obs if is_np else obs.detach().cpu().numpy()
        res = np.where(reached, res, float(src[o].mean()) if o.any() else 0.0)
    empty = np.broadcast_to(~known, out.shape)
    if is_np:
        out[empty] = res[empty]
    else:
        e = torch.from_numpy(np.ascontiguousarray(empty)).to(out.device)
        out[e] = torch.from_numpy(res).to(out)[e]


class Inpainting(Operator):
    """Missing entries: ``y = P_Omega(x)``, observed entries are kept exactly.

    Parameters
    ----------
    y : tensor
        Observation (values at missing entries are ignored).
    observed : bool tensor
        True where ``y`` was observed; broadcastable to ``y``.
    start : {"biharmonic", "dct", "nonlocal", "stack", "auto", "temporal"}
        The initial fill (:meth:`initial_estimate`): ``"biharmonic"`` interpolates every plane
        on its own; ``"dct"`` refines that fill by sparsity in overlapping block DCTs
        (:func:`dct_fill`); ``"nonlocal"`` refines the DCT fill by the low rank of groups of similar
        patches (:func:`nonlocal_fill`); ``"stack"`` interpolates along Z/T, or the bands of a
        spectrum (:meth:`stack_fill`);
        ``"auto"`` offers them all (``"stack"`` where :meth:`planes_lost`) to the solver, which keeps
        the one with the lowest error on its held-out entries (:meth:`start_candidates`); ``"temporal"``
        (multi-temporal stacks, time = internal dim 0) copies each missing entry from the
        nearest clear date after a per-band gain/offset fit (:meth:`temporal_fill`).
    """

    STARTS = ("biharmonic", "dct", "nonlocal", "stack", "auto", "temporal")

    def __init__(self, y: torch.Tensor, observed: torch.Tensor, start: str = "biharmonic"):
        super().__init__(y)
        if start not in self.STARTS:
            raise ValueError(f"start must be one of {', '.join(map(repr, self.STARTS))}, got {start!r}")
        self.observed = observed.expand_as(y)
        self.start = start
        self._lost = None  # planes_lost(), computed once
        S, C = y.shape[:2]
        # planes without any observed entry (a missing frame or Z slice, a dead band); decloud
        # (start="temporal") leaves a date clouded whole to its temporal fill and the network
        self.empty_planes = start != "temporal" and bool((self.observed.reshape(S, C, -1).sum(-1) == 0).any())

    def prox(self, v, mu):
        return torch.where(self.observed, self.y, v)

    def compose(self, x):
        """The observed entries, ``x`` elsewhere; planes without any observed entry are
        interpolated from their neighbours in ``x`` (:func:`_fill_empty_planes`): the held-out
        entries, all in planes with data, cannot tell whether the network does better there
        (on a 12-frame pan with one frame missing it did not: 26.6 dB after 100 iterations, 24.7
        after 600, against 27.1 for the interpolation)."""
        out = torch.where(self.observed, self.y, x)
        if self.empty_planes:
            _fill_empty_planes(out, self.observed)
        return out

    #: Largest number of missing entries filled with the biharmonic initialisation; beyond
    #: it the faster normalized-convolution fill is used.
    biharmonic_limit = 2_000_000

    def initial_estimate(self) -> torch.Tensor:
        """Initial fill: :meth:`temporal_fill` if ``start="temporal"``, else biharmonic per plane
        (smooth, accurate), or normalized convolution for very large problems; with
        ``start="dct"`` that fill refined by :func:`dct_fill`, with ``"nonlocal"`` that refined
        by :func:`nonlocal_fill`; ``"auto"``: the last one of :meth:`start_candidates`."""
        return self.fill("nonlocal" if self.start == "auto" else self.start)

    def fill(self, kind: str) -> torch.Tensor:
        """One initial fill from every observed entry: ``"temporal"``, ``"biharmonic"``, ``"dct"``
        or ``"nonlocal"`` (the DCT fill where :func:`nonlocal_fill` does not apply)."""
        if kind == "temporal":
            return self.temporal_fill()
        if kind == "stack":
            return self.stack_fill()
        if kind == "biharmonic":
            return self._spatial_fill()
        fills = self._fills(kind)
        return fills[next(reversed(fills))]

    def start_candidates(self) -> dict:
        """The initial fills the solver may choose from: for ``start="auto"``, ``{"biharmonic": ...,
        "dct": ..., "nonlocal": ...}``, each computed from the one before (``"nonlocal"`` only
        where :func:`nonlocal_fill` applies: planes of at least 8 x 8 pixels, at most 16
        channels), else the one fill."""
        if self.start != "auto":
            return {self.start: self.initial_estimate()}
        fills = self._fills("nonlocal")
        if self.planes_lost():
            fills["stack"] = self.stack_fill(fills["biharmonic"])
        return fills

    #: :meth:`planes_lost`: the share of its entries a plane must miss
    lost_plane_fraction = 0.5

    def planes_lost(self) -> bool:
        """Whether a few planes of a stack or a spectrum lost most of themselves: the most-missing
        plane (a Z slice, frame or band of one channel) misses more than
        :attr:`lost_plane_fraction` of its entries and more than twice the mean plane's share;
        never on grey or colour images (:meth:`plane_axis`). Only then does ``start="auto"`` offer
        :meth:`stack_fill`, and :meth:`holdout` hold the defect's shape out in another plane.
        From a fill within the plane, a hole over 60-90 % of one plane came out 3-12 dB worse
        than from the planes beside it; where every plane, or no plane, lost that much, the
        stack fill won the held-out comparison of starts but the loop from it ended 0.1-2 dB
        worse (docs/design.md)."""
        if self._lost is None:  # a held-out split keeps the user's mask's answer (holdout)
            per_plane = (~self.observed).float().mean(dim=(2, 3))  # (S, C): every plane of a channel
            top = float(per_plane.max())
            self._lost = (self.plane_axis() is not None and top > self.lost_plane_fraction
                          and top > 2 * float(per_plane.mean()))
        return self._lost

    #: More channels than this are bands of a spectrum (as ``api.BAND_CHANNELS``): neighbours
    #: along the channel axis are alike, as Z slices or frames are.
    spectrum_channels = 4

    def plane_axis(self) -> int | None:
        """The axis along which neighbouring planes are alike: 0 (Z or T) on a stack, else 1 on a
        spectrum (more than :attr:`spectrum_channels` bands), else None (grey, RGB)."""
        S, C = self.y.shape[:2]
        return 0 if S > 1 else (1 if C > self.spectrum_channels else None)

    def _fills(self, last: str) -> dict:
        fills = {"biharmonic": self._spatial_fill()}
        fills["dct"] = dct_fill(self.y, self.observed, fills["biharmonic"])
        if last == "nonlocal" and nonlocal_applies(self.y.shape):
            fills["nonlocal"] = nonlocal_fill(self.y, self.observed, fills["dct"])
        if self.empty_planes:  # planes without data: interpolated again from the refined ones
            for k in ("dct", "nonlocal"):
                if k in fills:
                    _fill_empty_planes(fills[k], self.observed)
        return fills

    def _spatial_fill(self) -> torch.Tensor:
        if int((~self.observed).sum()) <= self.biharmonic_limit:
            return self.biharmonic_fill()
        return self.normalized_convolution_fill()

    def biharmonic_fill(self) -> torch.Tensor:
        """:func:`skimage.restoration.inpaint_biharmonic` on every plane with missing entries."""
        from skimage.restoration import inpaint_biharmonic

        y = self.y.detach().cpu().numpy()
        obs = self.observed.detach().cpu().numpy()
        out = np.where(obs, y, 0.0).astype(np.float64)
        S, C = y.shape[:2]
        same_mask = bool((obs == obs[:, :1]).all())
        for s in range(S):
            if same_mask and C > 1:
                miss = ~obs[s, 0]
                if miss.any() and (~miss).any():
                    out[s] = np.moveaxis(inpaint_biharmonic(np.moveaxis(out[s], 0, -1), miss, channel_axis=-1), -1, 0)
                continue
            for c in range(C):
                miss = ~obs[s, c]
                if miss.any() and (~miss).any():
                    out[s, c] = inpaint_biharmonic(out[s, c], miss)
        _fill_empty_planes(out, obs)
        return torch.from_numpy(out.astype(np.float32)).to(self.y.device)

    def stack_fill(self, spatial: torch.Tensor | None = None) -> torch.Tensor:
        """Interpolation along the stack axis (Z or T; on a single spectrum, along the bands:
        :meth:`plane_axis`): each missing entry lies linearly between the nearest observed entries
        of the same pixel (and channel) in the planes before and after it (a copy of the nearest one
        at an end). A lost plane, or a large defect of one plane, is filled from the planes on
        either side, which a fill within the plane cannot do. Entries observed in no plane at their
        pixel (whole pixels missing) take ``spatial`` (default: the fill within each plane)."""
        y = self.y.detach().cpu().numpy().astype(np.float64)
        obs = self.observed.detach().cpu().numpy()
        out, reached = _interpolate_along(y, obs, self.plane_axis() or 0)
        if not reached.all():  # whole pixels missing: the fill within the plane
            if spatial is None:
                spatial = self._spatial_fill()
            out = np.where(reached, out, spatial.detach().cpu().numpy().astype(np.float64))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(self.y.device)

    def normalized_convolution_fill(self) -> torch.Tensor:
        """Normalized-convolution fill: Gaussian-weighted means of the observed entries.

        Each missing entry takes the weighted mean of the observed entries of its plane at
        the smallest scale where enough of them are near; scales double up to the image size,
        so large painted holes are filled too. N-D, O(size * log size), no tuning.
        """
        from scipy import ndimage

        y = self.y.detach().cpu().numpy().astype(np.float64)
        m = self.observed.detach().cpu().numpy().astype(np.float64)
        out = np.where(m > 0, y, 0.0)
        todo = m == 0
        if not todo.any():
            return self.y.clone()
        frac = max(m.mean(), 1e-6)
        sigma = max(0.7, 0.6 / np.sqrt(frac))
        filled = np.zeros_like(todo)
        spatial = (0, 0, 1, 1)
        while True:
            s = [sigma * a for a in spatial]
            num = ndimage.gaussian_filter(y * m, s, mode="reflect", truncate=3.0)
            den = ndimage.gaussian_filter(m, s, mode="reflect", truncate=3.0)
            ok = todo & ~filled & (den > 0.05 * (1.0 if sigma > 0.7 else 1.0) * min(1.0, frac * 4) + 1e-12)
            out[ok] = num[ok] / den[ok]
            filled |= ok
            if (filled | ~todo).all() or sigma > 2 * max(y.shape[-2:]):
                break
            sigma *= 2.0
        _fill_empty_planes(out, m > 0)
        return torch.from_numpy(out.astype(np.float32)).to(self.y.device)

    #: Fewest pixels observed at both dates for the gain/offset fit of :meth:`temporal_fill`;
    #: with fewer, the means and standard deviations of the two dates are matched instead.
    min_fit_pixels = 16

    def temporal_fill(self) -> torch.Tensor:
        """Fill from the nearest clear date: the multi-temporal start (time = internal dim 0).

        Each missing entry of date ``t`` takes the value of the same pixel and band at the
        nearest date ``u`` (in time) where it is observed, corrected by a per-band linear fit
        ``y_t ~ a * y_u + b`` (least squares on the pixels observed at both dates). When the
        previous and the next clear dates are equally near, their two corrected values are
        averaged. Entries observed at no date (a pixel clouded on every date) have nothing to
        learn from along time: they are filled spatially afterwards, from the temporally
        filled plane (biharmonic, or normalized convolution for very large problems).
        """
        y = self.y.detach().cpu().numpy().astype(np.float64)
        obs = self.observed.detach().cpu().numpy()
        S, C = y.shape[:2]
        out = np.where(obs, y, 0.0)
        todo = ~obs
        fits = {}

        def mapped(t, u, c, where):
            if (t, u, c) not in fits:
                both = obs[t, c] & obs[u, c]
                a, b = 1.0, 0.0
                if both.sum() >= self.min_fit_pixels:
                    src, dst = y[u, c][both], y[t, c][both]
                    var = src.var()
                    a = float(((src - src.mean()) * (dst - dst.mean())).mean() / var) if var > 1e-12 else 1.0
                    b = float(dst.mean() - a * src.mean())
                elif obs[t, c].sum() >= self.min_fit_pixels and obs[u, c].sum() >= self.min_fit_pixels:
                    src, dst = y[u, c][obs[u, c]], y[t, c][obs[t, c]]
                    a = float(dst.std() / src.std()) if src.std() > 1e-12 else 1.0
                    b = float(dst.mean() - a * src.mean())
                fits[t, u, c] = (a, b)
            a, b = fits[t, u, c]
            return a * y[u, c][where] + b

        for t in range(S):
            for c in range(C):
                rest = todo[t, c].copy()
                for d in range(1, S):
                    if not rest.any() or (t - d < 0 and t + d >= S):
                        break
                    prev = rest & obs[t - d, c] if t - d >= 0 else np.zeros_like(rest)
                    nxt = rest & obs[t + d, c] if t + d < S else np.zeros_like(rest)
                    tie = prev & nxt
                    for sel, u in ((prev & ~tie, t - d), (nxt & ~tie, t + d)):
                        if sel.any():
                            out[t, c][sel] = mapped(t, u, c, sel)
                    if tie.any():
                        out[t, c][tie] = 0.5 * (mapped(t, t - d, c, tie) + mapped(t, t + d, c, tie))
                    rest &= ~(prev | nxt)
                todo[t, c] = rest
        filled = torch.from_numpy(out.astype(np.float32)).to(self.y.device)
        if todo.any():  # observed at no date: fill spatially, from the temporally filled plane
            spatial = Inpainting(filled, torch.from_numpy(~todo).to(self.y.device))
            spatial.biharmonic_limit = self.biharmonic_limit
            filled = spatial.initial_estimate()
        return filled

    def holdout(self, fraction: float, generator: torch.Generator) -> tuple["Inpainting", torch.Tensor]:
        """Split off about ``fraction`` of the observed entries as a validation set.

        Returns the operator that sees only the remaining entries and the boolean mask of the
        held-out entries. Used to stop and to choose the returned iterate without ground truth.

        The held-out entries should be as hard to predict as the truly missing ones, so they copy
        the mask's own pattern: the missing mask is shifted (rolled in Y and X) onto observed
        areas, and kept inside random tiles until the fraction is reached. Dead lines give
        held-out line segments, painted blobs give blobs, scattered pixels give scattered
        pixels. Where a few planes lost most of themselves (:meth:`planes_lost`), the mask is
        also rolled along Z/T (or the bands of a spectrum). When most entries are missing (over
        half), the shifted pattern would empty whole regions, so whole pixels (every plane at one
        Y, X position) are drawn at random instead.
        """
        obs = self.observed
        S, C, H, W = obs.shape
        n_obs = int(obs.sum())
        miss = ~obs
        if float(miss.float().mean()) <= 0.5 and min(H, W) >= 16:
            dy = int(torch.randint(H // 4, max(H // 4 + 1, 3 * H // 4), (1,), generator=generator))
            dx = int(torch.randint(W // 4, max(W // 4 + 1, 3 * W // 4), (1,), generator=generator))
            # Where a few planes lost most of themselves (:meth:`planes_lost`), also rolled along
            # Z/T (or the bands of a spectrum), so that such a defect is held out in another
            # plane: rolled within its own plane, it mostly lands on itself. Held out whole and in
            # place instead of in tiles, it lost 0.4-4.9 dB on 7 of 9 stacks and 12 dB on a
            # spectrum (docs/design.md). Not for decloud (its own split, as tuned).
            lost = self.start != "temporal" and self.planes_lost()
            axis = self.plane_axis() if lost else 0
            ds = int(torch.randint(1, obs.shape[axis], (1,), generator=generator)) if lost else 0
            cand = obs & torch.roll(miss, (ds, dy, dx), dims=(axis, 2, 3))
            tile = self._tile()
            ty, tx = -(-H // tile), -(-W // tile)
            yy = torch.arange(H, device=obs.device) // tile
            xx = torch.arange(W, device=obs.device) // tile
            tid = (yy[:, None] * tx + xx[None, :]).reshape(-1)
            counts = torch.bincount(tid, weights=cand.sum(dim=(0, 1)).reshape(-1).double(), minlength=ty * tx)
            order = torch.randperm(ty * tx, generator=generator).to(obs.device)
            cum = torch.cumsum(counts[order], 0)
            k = int(torch.searchsorted(cum, torch.tensor(fraction * n_obs, dtype=cum.dtype, device=cum.device))) + 1
            chosen = torch.zeros(ty * tx, dtype=torch.bool, device=obs.device)
            chosen[order[:k]] = True
            held = cand & chosen[tid].reshape(1, 1, H, W)
            if int(held.sum()) >= 16 and int(held.sum()) <= 0.25 * n_obs:
                return self._split(held), held
        draw = torch.rand((1, 1, H, W), generator=generator, device="cpu").to(obs.device)
        held = obs & (draw < fraction)
        return self._split(held), held

    def holdout_planes(self) -> tuple["Inpainting", torch.Tensor] | None:
        """A second validation split, for the choice of start only, where a few planes lost a
        large hole (:meth:`planes_lost`, and a missing entry of a lost plane lies farther than
        half of :meth:`holdout`'s tile from any observed entry of its plane): the mask rolled
        along the plane axis only, not in Y and X and not cut into tiles, so that the hole is held
        out whole, at its place, in another plane (as far from the lost plane and from the ends
        of the stack as the roll allows). The tiles of :meth:`holdout` always have observed
        entries close by, which a large hole does not: on them the fills within the plane scored
        well and were chosen where the stack fill was far better (a 12-band cube with 77 % of
        one band missing: 21.4 dB returned against 57.8 from the stack fill's start). Planes with
        nothing observed are left out (every fill interpolates them alike). Returns None where
        no such hole exists, or the copy holds out fewer than 16 entries or more than a quarter
        of the observed ones."""
        if self.start == "temporal" or not self.planes_lost():
            return None
        from scipy import ndimage

        obs = self.observed
        S, C, H, W = obs.shape
        miss = (~obs).cpu().numpy()
        share = miss.reshape(S, C, -1).mean(-1)
        empty = share == 1.0
        tile = self._tile()
        deep = any(ndimage.distance_transform_edt(miss[s, c]).max() > tile / 2
                   for s, c in zip(*np.nonzero((share > self.lost_plane_fraction) & ~empty)))
        if not deep:
            return None
        axis = self.plane_axis()
        n = obs.shape[axis]
        lost = int(np.where(empty, 0.0, share).max(axis=1 - axis).argmax())
        # how much of the lost planes' holes each roll lands on observed entries (the lost planes
        # alone: cheap on hundreds of bands, and the rest of a mask rolled along the planes mostly
        # lands on itself)
        m = np.moveaxis(miss, axis, 0)
        holey = np.nonzero(np.moveaxis((share > self.lost_plane_fraction) & ~empty, axis, 0).any(axis=1))[0]
        counts = {ds: sum(int(np.count_nonzero(m[p] & ~m[(p + ds) % n])) for p in holey) for ds in range(1, n)}
        top = max(counts.values())
        miss[empty] = False
        roll = torch.from_numpy(miss).to(obs.device)

        def spacing(ds):
            p = (lost + ds) % n
            return min(abs(p - lost), p, n - 1 - p)

        ds = max((d for d in counts if counts[d] >= 0.8 * top), key=lambda d: (spacing(d), -d))
        held = obs & torch.roll(roll, ds, dims=axis)
        if not 16 <= int(held.sum()) <= 0.25 * int(obs.sum()):
            return None
        return self._split(held), held

    def _tile(self) -> int:
        """Side of :meth:`holdout`'s tiles (pixels)."""
        H, W = self.observed.shape[-2:]
        return max(8, min(H, W) // 4)

    def _split(self, held: torch.Tensor) -> "Inpainting":
        split = Inpainting(self.y, self.observed & ~held, start=self.start)
        split._lost = self.planes_lost()  # the user's mask decides, not the split
        return split


_CPU_ONLY_DEVICES = ("mps",)


def _cpu_if_mps(fn):
    """Run ``fn`` on the CPU when a tensor argument is on Apple's MPS, and move tensor results
    back: the patch-group filters use float64 sums and batched ``eigh``, which MPS lacks. A no-op
    on the CPU and CUDA."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if dev is None or dev.type not in _CPU_ONLY_DEVICES:
            return fn(*args, **kwargs)
        cpu = lambda a: a.cpu() if isinstance(a, torch.Tensor) else a  # noqa: E731
        out = fn(*map(cpu, args), **{k: cpu(v) for k, v in kwargs.items()})
        return [o.to(dev) for o in out] if isinstance(out, list) else out.to(dev)

    return wrapper


def _dct_matrix(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix (rows are the basis vectors)."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(device=device, dtype=dtype)


@_cpu_if_mps
def dct_fill(y: torch.Tensor, observed: torch.Tensor, start: torch.Tensor, *, block: int = 8,
             iterations: int = 100, thresholds: tuple = (0.2, 0.005), step: int | None = None,
             max_channels: int = 16, seed: int = 0) -> torch.Tensor:
    """Fill missing entries by sparsity in overlapping block DCTs (iterative hard thresholding).

    Starting from ``start``, each iteration transforms the estimate in ``block`` x ``block``
    blocks of every plane (a 2-D DCT; with 2 to ``max_channels`` channels, also an orthonormal
    DCT across the channels: for RGB, luminance and two colour differences), sets to zero the
    coefficients below a threshold (the blocks' means are kept), transforms back, averages the
    block grids shifted by multiples of ``step`` (``block // 2``: 4 grids, offset at random
    each iteration) and re-inserts the observed entries. The threshold falls geometrically from
    ``thresholds[0]`` to ``thresholds[1]`` (intensities normalized to [0, 1]) over
    ``iterations``. This is the classical sparse-inpainting scheme (Guleryuz 2006; Elad et al.
    2005): missing entries take the values whose local spectra are sparsest, which keeps edges
    and texture that a biharmonic fill smooths away.

    Parameters
    ----------
    y : (S, C, H, W) tensor
        Observation, intensities in about [0, 1].
    observed : bool tensor, broadcastable to ``y``
        True where ``y`` was observed (kept exactly).
    start : (S, C, H, W) tensor
        The initial fill (e.g. biharmonic).

    Returns
    -------
    (S, C, H, W) tensor

    Notes
    -----
    Cost: about 0.4 s for a 256 x 256 RGB image on 2 CPU cores (100 iterations; 90 s for a
    200-band 256 x 256 cube). Deterministic given ``seed``.
    """
    F = torch.nn.functional
    obs = observed.expand_as(y)
    if bool(obs.all()):
        return y.clone()
    S, C, H, W = y.shape
    b = int(block)
    step = max(1, int(step) if step else b // 2)
    dev, dt = y.device, torch.float32
    D = _dct_matrix(b, dev, dt)
    Dc = _dct_matrix(C, dev, dt) if 1 < C <= max_channels else None
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    mode = "reflect" if min(H, W) > b else "replicate"
    t0, t1 = (float(t) for t in thresholds)
    x = torch.where(obs, y, start).to(dt)
    yv = y.to(dt)
    grid = [(i, j) for i in range(0, b, step) for j in range(0, b, step)]
    for k in range(int(iterations)):
        t = t0 * (t1 / t0) ** (k / max(int(iterations) - 1, 1))
        off = torch.randint(0, step, (2,), generator=gen).tolist()
        xp = F.pad(x, (b, b, b, b), mode=mode)
        if Dc is not None:  # the channel DCT commutes with the blocks': once, not once per grid
            xp = torch.einsum("mc,schw->smhw", Dc, xp)
        acc = torch.zeros_like(x)
        for gy, gx in grid:
            dy, dx = gy + off[0], gx + off[1]
            lh, lw = -(-(H + dy) // b) * b, -(-(W + dx) // b) * b
            # (S C blocks-down, row in block, blocks-across, column in block): the 2-D DCT of every
            # block as two matrix products (columns, then rows), no transposed copies
            r = xp[:, :, b - dy:b - dy + lh, b - dx:b - dx + lw].reshape(-1, b, lw // b, b)
            c = torch.matmul(D, (r @ D.T).reshape(-1, b, lw)).reshape(r.shape)
            keep = c.abs() > t
            keep[:, 0, :, 0] = True  # the blocks' means
            c = torch.matmul(D.T, ((c * keep) @ D).reshape(-1, b, lw))
            acc += c.reshape(S, C, lh, lw)[:, :, dy:dy + H, dx:dx + W]
        if Dc is not None:
            acc = torch.einsum("mc,smhw->schw", Dc, acc)
        x = torch.where(obs, yv, acc / len(grid))
    return x.to(y.dtype)


def nonlocal_applies(shape, patch: int = 8, max_channels: int = 16) -> bool:
    """Whether :func:`nonlocal_fill` groups an ``(S, C, H, W)`` volume: planes of at least
    ``patch`` x ``patch`` pixels and at most ``max_channels`` channels."""
    return min(shape[-2:]) >= patch and shape[1] <= max_channels


def _grid_sums(d: torch.Tensor, dim: int, p: int, step: int, n_grid: int, last: int | None) -> torch.Tensor:
    """Sums of ``p`` consecutive entries of ``d`` along ``dim`` (non-negative) from each of 0,
    ``step``, ... (``n_grid`` starts) and from ``last`` when it is not None: ``p`` strided slices
    added, no cumulative sum (whose differences lose precision in float32) and no gather."""
    dim %= d.dim()
    span = step * (n_grid - 1) + 1
    pick = (slice(None),) * dim + (slice(None, None, step),)
    out = d.narrow(dim, 0, span)[pick].clone()
    for j in range(1, p):
        out += d.narrow(dim, j, span)[pick]
    if last is not None:
        out = torch.cat([out, d.narrow(dim, last, p).sum(dim, keepdim=True)], dim)
    return out


def _block_match(x: torch.Tensor, patch: int, step: int, search: int, group: int, *,
                 candidates: torch.Tensor | None = None, ref: int = 0, max_work: int = 1 << 26,
                 row_work: int = 1 << 22) -> torch.Tensor:
    """Top-left flat indices ``(N, group)`` of the patches most similar to each reference patch.

    ``x`` is one ``(C, H, W)`` plane stack; reference patches lie on a grid of ``step`` (the last
    row and column included), candidates within ``search`` pixels of the reference, and the
    distance is the squared difference summed over the patch and the channels (the reference
    itself comes first). ``candidates`` ``(P, C, H, W)``, whose plane ``ref`` is ``x``: the
    patches are searched in each of its planes (neighbouring Z slices or frames), and the indices
    are flat in ``candidates.reshape(P * H * W)``. The squared differences of a row of
    horizontal offsets are computed together (at most about ``row_work`` entries at a time) and
    summed over the patches at the references only; the distances of at most about ``max_work``
    (offset, reference) pairs are held at a time (256 MB by default), the best so far merged with
    each batch of offsets.
    """
    F = torch.nn.functional
    C, H, W = x.shape
    cand = x[None] if candidates is None else candidates
    p, R, dev = int(patch), int(search), x.device
    ny_g, nx_g = (H - p) // step + 1, (W - p) // step + 1  # references on the grid of step
    last_y = H - p if (ny_g - 1) * step != H - p else None  # and the last row and column
    last_x = W - p if (nx_g - 1) * step != W - p else None
    ry = torch.tensor([i * step for i in range(ny_g)] + ([last_y] if last_y is not None else []), device=dev)
    rx = torch.tensor([i * step for i in range(nx_g)] + ([last_x] if last_x is not None else []), device=dev)
    ny, nx = ry.numel(), rx.numel()
    N, D = ny * nx, 2 * R + 1
    nb = max(1, min(D, int(row_work) // max(1, C * H * W)))  # horizontal offsets per pass
    rows = [(t, dy) for t in range(cand.shape[0]) for dy in range(-R, R + 1)]  # offsets (t, dy, -R..R)
    per_batch = max(1, max(group, int(max_work) // max(N, 1)) // D)
    dxs = torch.arange(-R, R + 1, device=dev)
    bad_x = ((rx[None] + dxs[:, None]) < 0) | ((rx[None] + dxs[:, None]) > W - p)  # (D, nx): outside
    best_d = best_i = None
    padded = {}
    for r0 in range(0, len(rows), per_batch):
        part = rows[r0:r0 + per_batch]
        dist = torch.empty(len(part), D, ny, nx, device=dev)
        for i, (t, dy) in enumerate(part):
            if t not in padded:  # offsets run plane by plane: one padded plane at a time
                padded = {t: F.pad(cand[t][None], (R, R, R, R), mode="replicate")[0]}
            win = padded[t][:, R + dy:R + dy + H, :].unfold(2, W, 1)  # (C, H, D, W): x shifted by dy, dx
            for a in range(0, D, nb):
                b = min(D, a + nb)
                d = (x[0, :, None, :] - win[0, :, a:b]) ** 2  # (H, b - a, W)
                for k in range(1, C):
                    d = d + (x[k, :, None, :] - win[k, :, a:b]) ** 2
                rs = _grid_sums(d, 2, p, step, nx_g, last_x)  # (H, b - a, nx): rows of patches
                dist[i, a:b] = _grid_sums(rs, 0, p, step, ny_g, last_y).transpose(0, 1)
            dist[i].masked_fill_((((ry + dy) < 0) | ((ry + dy) > H - p))[None, :, None], math.inf)
            if (t, dy) == (ref, 0):
                dist[i, R] = -1.0  # the reference first
        dist.masked_fill_(bad_x[None, :, None, :], math.inf)
        dist = dist.reshape(len(part) * D, N)
        ids = torch.arange(r0 * D, (r0 + len(part)) * D, device=dev)[:, None].expand(-1, N)
        if best_d is not None:
            dist, ids = torch.cat([best_d, dist]), torch.cat([best_i, ids])
        top = dist.topk(min(group, dist.shape[0]), dim=0, largest=False).indices  # (group, N)
        best_d, best_i = dist.gather(0, top), ids.gather(0, top)
        del dist, ids
    RY, RX = (g.reshape(-1) for g in torch.meshgrid(ry, rx, indexing="ij"))
    off_t = best_i // (D * D)  # offset id = (t * D + dy + R) * D + dx + R
    off_y = (best_i // D) % D - R
    off_x = best_i % D - R
    flat = off_t * (H * W) + (off_y + RY[None]) * W + off_x + RX[None]
    return flat.T.contiguous()


@_cpu_if_mps
def nonlocal_fill(y: torch.Tensor, observed: torch.Tensor, start: torch.Tensor, *, patch: int = 8,
                  step: int = 4, search: int = 8, group: int = 16, iterations: int = 40,
                  thresholds: tuple = (0.1, 0.005), max_channels: int = 16,
                  chunk: int = 256, split: bool | None = None) -> torch.Tensor:
    """Fill missing entries by the low rank of groups of similar patches (iterative group-SVD hard thresholding).

    The nonlocal counterpart of :func:`dct_fill`, after the low-rank patch-group models of
    inpainting (Zhang et al. 2014, GSR; Gu et al. 2014, WNNM). Once, on ``start``, for reference
    patches on a grid of ``step`` pixels, the ``group`` most similar ``patch`` x ``patch``
    patches (distance summed over the channels) within ``search`` pixels are found. Each
    iteration stacks every group as a ``group`` x (patch² x channels) matrix, removes its mean
    patch, keeps the singular components whose singular value exceeds ``t (sqrt(group) +
    sqrt(patch² x channels))`` (about the largest singular value of a matrix of noise of
    standard deviation ``t``), averages the overlapping patches and re-inserts the observed
    entries. ``t`` falls geometrically from ``thresholds[0]`` to ``thresholds[1]`` (intensities
    in [0, 1]). The basis adapts to each group, so repeated structure (texture, edges along their
    length) is recovered from far fewer samples than a fixed transform needs.

    Parameters
    ----------
    y, observed, start
        As in :func:`dct_fill`; ``start`` is usually its result (groups are matched on it).
    split : bool or None
        Group the channels' orthonormal DCT components apart (for RGB: luminance and two colour
        differences, each group of patch² entries) instead of whole colour patches. Where
        channels are missing apart, this recovers a missing channel from the observed ones (the
        colour differences' groups are of very low rank); where whole pixels are missing, whole
        colour patches do slightly better. ``None`` (default): split when at least a tenth of the
        missing entries have another channel observed at the same pixel.

    Returns
    -------
    (S, C, H, W) tensor
        ``start`` unchanged for planes smaller than a patch or with more than ``max_channels``
        channels.

    Notes
    -----
    Measured (scripts outside the repository, docs/design.md): on six 256 x 256 photos
    with 10, 30 and 50 % of pixels observed, 0.3-1.3 dB above the earlier fixed-transform group
    fill (hard thresholds in a DCT of the patches, along the group and across the channels,
    groups of 8 re-matched every 10 iterations), except one photo (rocket: -0.15 to -0.20 dB at 30
    and 50 %). Matching once on the start is better than re-matching on the intermediate
    estimates, which the high early thresholds smooth. Cost: about 5 s for a 256 x 256 RGB image
    on 2 CPU cores (7 s split), linear in the number of pixels; groups are processed one chunk of
    ``chunk`` references at a time (about 13 MB of work space).
    Deterministic.
    """
    obs = observed.expand_as(y)
    S, C, H, W = y.shape
    p = int(patch)
    x = torch.where(obs, y, start).to(torch.float32)
    if bool(obs.all()) or not nonlocal_applies(y.shape, p, max_channels):
        return x.to(y.dtype)
    R = int(search)
    K = max(1, min(int(group), min(H - p + 1, R + 1) * min(W - p + 1, R + 1)))
    miss = ~obs
    if split is None:  # a tenth of the missing entries lie where another channel is observed
        split = C > 1 and int((miss & obs.any(dim=1, keepdim=True)).sum()) >= 0.1 * int(miss.sum())
    Dc = _dct_matrix(C, y.device) if split else torch.eye(C, device=y.device)
    G, c = (C, 1) if split else (1, C)  # groups of G components of c channels each
    level = math.sqrt(K) + math.sqrt(c * p * p)  # largest singular value of a K x d matrix of unit noise
    yv = y.to(torch.float32)
    t0, t1 = (float(t) for t in thresholds)
    n_it = int(iterations)
    dev = y.device
    pix = (torch.arange(p, device=dev)[:, None] * W + torch.arange(p, device=dev)[None, :]).reshape(-1)

    def project(flat, q, t):
        idx = (q[:, :, None] + pix).reshape(-1)  # the groups' entries (flat indices)
        g = flat[idx].reshape(-1, K, p * p, G, c)  # (n, K, patch entries, components, channels)
        g = g.permute(3, 0, 1, 2, 4).reshape(-1, K, p * p * c)
        r = _low_rank(g, t * level).reshape(G, -1, K, p * p, c)
        return idx, r.permute(1, 2, 3, 0, 4).reshape(-1, C)

    for s in range(S):
        if bool(obs[s].all()):
            continue
        xs = x[s]
        top = _block_match(xs, p, int(step), R, K)  # (N, K) flat indices of top-left corners
        tops = list(top.split(int(chunk)))
        cover = torch.zeros(H * W, device=dev)
        for q in tops:
            idx = (q[:, :, None] + pix).reshape(-1)
            cover.index_add_(0, idx, torch.ones(idx.numel(), device=dev))
        cover = cover[:, None]
        for k in range(n_it):
            t = t0 * (t1 / t0) ** (k / max(n_it - 1, 1))
            flat = (Dc @ xs.reshape(C, H * W)).T.contiguous()  # (H W, C): a patch's entries are rows
            acc = torch.zeros_like(flat)
            # The entries' indices are made per chunk, so the work space stays a chunk whatever
            # the image size. No worker threads: projecting chunks in a thread pool was no faster
            # on 2 cores, and while the pool lived, the main thread's own work ran 2-3x slower.
            for q in tops:
                idx, r = project(flat, q, t)
                acc.index_add_(0, idx, r)
            est = torch.where(cover > 0, acc / cover.clamp(min=1), flat)  # (a step over the patch size)
            xs = torch.where(obs[s], yv[s], (Dc.T @ est.T).reshape(C, H, W))
            x[s] = xs
    return x.to(y.dtype)


def _low_rank(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """Groups ``g`` (n, K, d) with their mean patch removed projected on the singular components
    above ``threshold``, mean restored."""
    mean = g.mean(dim=1, keepdim=True)
    g = g - mean
    # The squared singular values are the Gram matrix's eigenvalues. A shift of the diagonal by a
    # thousandth of the threshold keeps the eigenvectors and makes near-zero groups (flat or
    # saturated areas: entries of 1e-18, on which LAPACK fails or returns NaN) well-conditioned.
    shift = 1e-3 * threshold ** 2
    gram = g @ g.transpose(1, 2) + shift * torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
    try:
        ev, V = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:  # rare: decompose one by one, leaving the failures as they are
        ev, V = torch.zeros(gram.shape[:2], dtype=g.dtype, device=g.device), torch.full_like(gram, math.nan)
        for i in range(gram.shape[0]):
            try:
                ev[i], V[i] = torch.linalg.eigh(gram[i])
            except torch.linalg.LinAlgError:
                pass
    ok = torch.isfinite(V).all(dim=(1, 2)) & torch.isfinite(ev).all(dim=1)
    V = torch.where(ok[:, None, None], V, 0.0) * (ev - shift > threshold ** 2)[:, None, :]
    r = V @ (V.transpose(1, 2) @ g)
    return torch.where(ok[:, None, None], r, g) + mean  # a group LAPACK cannot decompose is left as it is


class Denoising(Operator):
    """Additive white Gaussian noise: ``y = x + n``, ``n ~ N(0, sigma^2)``.

    The data term ``weight / (2 sigma^2) ||x - y||^2`` is fused into the X-update, which is
    then exact in one DCT solve.

    Parameters
    ----------
    y : tensor
        The (normalized) observation.
    sigma : float
        Noise standard deviation (normalized units).
    weight : float
        Scale of the data term.
    excluded : bool tensor, optional
        Entries left out of the data term (held out to validate on, see :meth:`holdout`). The
        fused X-update cannot skip entries, so it pulls them towards the current estimate
        instead (:meth:`fused_target`, one step of expectation-maximization per iteration):
        their observed values never reach the estimate.
    """

    def __init__(self, y: torch.Tensor, sigma: float, weight: float = 1.0, excluded: torch.Tensor | None = None):
        super().__init__(y)
        self.sigma = float(sigma)
        self.weight = float(weight)
        self.fused_weight = weight / max(self.sigma, 1e-4) ** 2
        self.excluded = excluded

    def fused_target(self, x):
        return self.y if self.excluded is None else torch.where(self.excluded, x, self.y)

    def initial_estimate(self) -> torch.Tensor:
        """The observation, with excluded entries started at the mean of their kept 3 x 3 neighbours
        (their own values must not reach the estimate)."""
        if self.excluded is None:
            return self.y.clone()
        import torch.nn.functional as F

        S, C, H, W = self.y.shape
        keep = (~self.excluded).to(self.y.dtype).reshape(S * C, 1, H, W)
        box = torch.ones((1, 1, 3, 3), dtype=self.y.dtype, device=self.y.device)
        num = F.conv2d(self.y.reshape(S * C, 1, H, W) * keep, box, padding=1)
        den = F.conv2d(keep, box, padding=1)
        fill = torch.where(den > 0, num / den.clamp_min(1.0), self.y[~self.excluded].mean())
        return torch.where(self.excluded, fill.reshape(self.y.shape), self.y)

    def prox(self, v, mu):
        w = self.fused_weight
        out = (w * self.y + mu * v) / (w + mu)
        return out if self.excluded is None else torch.where(self.excluded, v, out)

    def holdout(self, fraction: float, generator: torch.Generator) -> tuple["Denoising", torch.Tensor]:
        """Split off about ``fraction`` of the entries, drawn independently, as a validation set.

        Returns the operator whose data term leaves them out and their boolean mask. Their noise
        is independent of everything the solver then sees, so the error of the estimate there,
        less ``sigma^2``, measures its error without ground truth (used to choose the returned
        image's data weight, :attr:`~napari_ngr.solver.SolverOptions.final_weight`).
        """
        draw = torch.rand(self.y.shape, generator=generator, device="cpu").to(self.y.device)
        held = draw < fraction
        return Denoising(self.y, self.sigma, self.weight, excluded=held), held


def nl_means_planes(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Non-local means of every plane of an ``(S, C, H, W)`` tensor with noise level ``sigma``.

    :func:`skimage.restoration.denoise_nl_means` (fast mode, 5 x 5 patches, 13 x 13 search window,
    ``h = 0.8 sigma``): the prefilter of ``SolverOptions.prefilter="nlmeans"``.
    """
    from skimage.restoration import denoise_nl_means

    a = x.detach().cpu().numpy().astype(np.float32)
    S, C, H, W = a.shape
    out = np.empty_like(a)
    for s in range(S):
        for c in range(C):
            out[s, c] = denoise_nl_means(a[s, c], h=0.8 * sigma, sigma=sigma, fast_mode=True,
                                         patch_size=5, patch_distance=6)
    return torch.from_numpy(out).to(x.device)


@_cpu_if_mps
def low_rank_denoise(x: torch.Tensor, sigma: float, *, guide: torch.Tensor | None = None, patch: int = 8,
                     step: int = 3, search: int = 10, group: int = 32, tau: float = 1.1,
                     plane_distance: int = 0, split: bool | None = None, chunk: int = 256) -> torch.Tensor:
    """Gaussian denoising of every plane of an ``(S, C, H, W)`` tensor by the low rank of groups of similar patches.

    For reference patches on a grid of ``step`` pixels, the ``group`` most similar ``patch`` x
    ``patch`` patches within ``search`` pixels are matched on ``guide`` (a first estimate, e.g.
    :func:`nl_means_planes`; default ``x`` itself). Each group of ``x`` is stacked as a ``group``
    x (patch² x channels) matrix, its mean patch removed, and only the singular components above
    ``tau * sigma * (sqrt(group) + sqrt(patch² x channels))`` are kept: that is about the largest
    singular value of a matrix of pure noise of standard deviation ``sigma``, so what remains is
    the structure the similar patches share (the group model of :func:`nonlocal_fill`, with a
    fixed threshold set by the noise, as in the low-rank denoisers of Dong et al. 2013 and Gu et
    al. 2014). Overlapping patches are averaged with equal weights.

    Parameters
    ----------
    x : (S, C, H, W) tensor
        Noisy planes (intensities about in [0, 1]).
    sigma : float
        Noise standard deviation, in ``x``'s units.
    guide : tensor, optional
        ``x``'s shape; patches are matched on it.
    plane_distance : int
        Also match 2-D patches in this many planes on either side of the reference's (Z slices,
        frames; 0: within its plane). A group's patches are put back in their own planes.
    split : bool or None
        Group the channels' orthonormal DCT components apart (for RGB: luminance and two colour
        differences); ``None`` (default): for more than one channel. An orthonormal transform
        keeps white noise white.

    Returns
    -------
    (S, C, H, W) tensor
        ``x`` unchanged for planes smaller than a patch.

    Notes
    -----
    Measured (scripts outside the repository; σ = 0.1 / 0.2, 256 x 256 photos, guided by
    :func:`nl_means_planes`): astronaut 31.09 / 27.07 dB (NL-means 27.78 / 23.70, BM3D 31.06 /
    27.32), camera 30.56 / 27.24, coffee 31.09 / 27.70, brick 31.86 / 25.40. ``tau`` 1.1-1.15 is
    best on all four (1.0 keeps noise: -0.3 to -1 dB; 1.2: -0.05 to -0.2 dB), groups of 32 beat 16
    by 0.2-0.6 dB. A second pass matched on the first one's result gains on brick at σ = 0.2 and
    loses elsewhere, so there is one. About 1.6 s for a 256 x 256 RGB plane on 2 CPU cores.
    Deterministic.
    """
    S, C, H, W = x.shape
    p = int(patch)
    xv = x.to(torch.float32)
    if min(H, W) < p:
        return x.clone()
    gv = xv if guide is None else guide.to(torch.float32)
    R = int(search)
    K = max(1, min(int(group), min(H - p + 1, R + 1) * min(W - p + 1, R + 1)))
    if split is None:
        split = C > 1
    Dc = _dct_matrix(C, x.device) if split else torch.eye(C, device=x.device)
    G, c = (C, 1) if split else (1, C)
    threshold = float(tau) * float(sigma) * (math.sqrt(K) + math.sqrt(c * p * p))
    pix = (torch.arange(p, device=x.device)[:, None] * W + torch.arange(p, device=x.device)[None, :]).reshape(-1)

    def project(flat, q):
        idx = (q[:, :, None] + pix).reshape(-1)
        g = flat[idx].reshape(-1, K, p * p, G, c).permute(3, 0, 1, 2, 4).reshape(-1, K, p * p * c)
        r = _low_rank(g, threshold).reshape(G, -1, K, p * p, c)
        return idx, r.permute(1, 2, 3, 0, 4).reshape(-1, C)

    pd = max(0, int(plane_distance))
    # (S H W, C): a patch's entries are rows; groups may take patches from other planes
    flat = (Dc @ xv.permute(1, 0, 2, 3).reshape(C, S * H * W)).T.contiguous()
    acc = torch.zeros_like(flat)
    cover = torch.zeros(S * H * W, 1, device=x.device)
    for s in range(S):
        t0, t1 = max(0, s - pd), min(S, s + pd + 1)
        top = _block_match(gv[s], p, int(step), R, K, candidates=gv[t0:t1], ref=s - t0) + t0 * H * W
        for q in top.split(int(chunk)):  # a chunk of groups at a time (no worker threads: see nonlocal_fill)
            idx, r = project(flat, q)
            acc.index_add_(0, idx, r)
            cover.index_add_(0, idx, torch.ones(idx.numel(), 1, device=x.device))
    est = torch.where(cover > 0, acc / cover.clamp(min=1), flat)
    out = (Dc.T @ est.T).reshape(C, S, H, W).permute(1, 0, 2, 3)
    return out.to(x.dtype).contiguous()


@_cpu_if_mps
def nl_means_stack(x: torch.Tensor, sigma: float, *, patch_size: int = 5, patch_distance: int = 6,
                   plane_distance: int = 2, h: float = 0.6, guide: torch.Tensor | None = None,
                   block: int = 1 << 22, self_weight: float = 0.0, return_weight_sum: bool = False):
    """Leave-one-out non-local means of an ``(S, C, H, W)`` stack, 2-D patches matched across planes.

    Every entry becomes the weighted mean of the *other* entries whose ``patch_size`` x
    ``patch_size`` neighbourhood (all ``C`` channels together) resembles its own, searched within
    ``patch_distance`` pixels in its own plane and in the ``plane_distance`` planes on either
    side (Z slices or frames). The weight of a patch at mean squared distance ``d`` is
    ``exp(-max(d - 2 sigma^2, 0) / (h sigma)^2)`` (the fast algorithm of
    :func:`skimage.restoration.denoise_nl_means`, with plain rather than Gaussian patch weights).
    Matching 2-D patches in neighbouring planes finds the same structure where it has moved (a
    panning or drifting video) and, on a Z-stack, in the next slices: five planes hold five times
    the similar patches of one. The entry's own value gets no weight, so the filter's error on
    entries held out of it is its error everywhere (an entry with no similar patch at all keeps
    its value; where the noise is stronger than ``sigma``, as in the bright parts of shot noise, a
    weight of 1 would keep it in most of them). Borders are reflected. Runs on ``x``'s device.

    With ``guide`` (``x``'s shape, a first estimate such as :func:`low_rank_denoise`), the
    patches are compared on it and weighted ``exp(-d / (h sigma)^2)`` (no noise floor: the guide
    is nearly noise-free), the values averaged are still ``x``'s and the entry's own value still
    gets no weight: the two-stage scheme of BM3D, with NL-means weights as its second stage.
    ``h`` a tuple or list: one result for each, in a list (the patch distances computed once).

    ``self_weight`` > 0 gives the entry's own value that weight (1, the largest a patch can get,
    is :func:`skimage.restoration.denoise_nl_means`' choice): where few patches resemble an
    entry's (fine or unique structure, low noise) it keeps more of its own value. The result is
    then no longer leave-one-out: its error on held-out entries is estimated from the
    leave-one-out result ``v`` and the own value's share ``a = self_weight / (weight sum +
    self_weight)`` as ``mean((1 - a)^2 ((v - y)^2 - sigma^2) + a^2 sigma^2)``, which holds where
    the noise has the variance ``sigma^2`` everywhere (not shot noise). With
    ``return_weight_sum=True`` each result comes as ``(result, weight_sum)``, ``weight_sum`` the
    ``(S, 1, H, W)`` sum of the weights of the other entries.
    """
    S, C, H, W = x.shape
    hs = tuple(float(v) for v in h) if isinstance(h, (tuple, list)) else (float(h),)
    outs = [torch.empty(x.shape, dtype=torch.float32, device=x.device) for _ in hs]
    sums = [torch.empty((S, 1, H, W), dtype=torch.float32, device=x.device) for _ in hs] if return_weight_sum else None
    # Output planes in blocks of about 4 M entries (with their partner planes), so the work space
    # stays a few block-sized buffers however large the stack; the result does not depend on it.
    n = max(1, block // (C * H * W))
    for s0 in range(0, S, n):
        s1 = min(S, s0 + n)
        a0, a1 = max(0, s0 - plane_distance), min(S, s1 + plane_distance)
        g = None if guide is None else guide[a0:a1].float()
        for j, (o, ws) in enumerate(_nl_means_block(x[a0:a1].float(), s0 - a0, s1 - a0, sigma, patch_size,
                                                    patch_distance, plane_distance, hs, g, self_weight)):
            outs[j][s0:s1] = o
            if sums is not None:
                sums[j][s0:s1] = ws
    outs = [out.to(x.dtype) for out in outs]
    if sums is not None:
        outs = list(zip(outs, sums))
    return outs if isinstance(h, (tuple, list)) else outs[0]


def _nl_means_block(x, o0, o1, sigma, patch_size, patch_distance, plane_distance, hs, guide=None, self_weight=0.0):
    """:func:`nl_means_stack` of planes ``o0:o1`` of ``x``, whose partners are the planes of ``x``,
    for each ``h`` in ``hs`` (the patch distances are computed once for all of them), as pairs
    ``(result, weight sum of the other entries)``."""
    S, C, H, W = x.shape
    p = patch_size // 2
    pad = patch_distance + p
    mode = "reflect" if pad < min(H, W) else "replicate"
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode=mode)
    gp = xp if guide is None else torch.nn.functional.pad(guide, (pad, pad, pad, pad), mode=mode)
    c = patch_distance
    ref = gp[:, :, c:c + H + 2 * p, c:c + W + 2 * p]  # every entry with its patch border
    inv_h2 = [1.0 / (h * sigma) ** 2 for h in hs]
    # Weights are made from the largest h down: where 1/h^2 doubles, the weight is the square of
    # the previous one (a multiplication instead of an exponential).
    order = sorted(range(len(hs)), key=lambda j: inv_h2[j])
    floor = 2.0 * sigma ** 2 if guide is None else 0.0
    acc = [torch.zeros((o1 - o0, C, H, W), dtype=x.dtype, device=x.device) for _ in hs]
    wsum = [torch.zeros((o1 - o0, 1, H, W), dtype=x.dtype, device=x.device) for _ in hs]
    for dt in range(-plane_distance, plane_distance + 1):
        lo, hi = max(o0, -dt), min(o1, S - dt)  # output planes s whose partner s + dt exists
        if lo >= hi:
            continue
        for dy in range(-patch_distance, patch_distance + 1):
            for dx in range(-patch_distance, patch_distance + 1):
                if dt == 0 and dy == 0 and dx == 0:
                    continue
                other = gp[lo + dt:hi + dt, :, c + dy:c + dy + H + 2 * p, c + dx:c + dx + W + 2 * p]
                d = ((ref[lo:hi] - other) ** 2).mean(dim=1, keepdim=True)
                d = (floor - _box_mean(d, patch_size)).clamp(max=0.0)
                val = xp[lo + dt:hi + dt, :, c + dy + p:c + dy + p + H, c + dx + p:c + dx + p + W]
                w, k0 = None, None
                for j in order:
                    k = inv_h2[j]
                    w = w * w if w is not None and abs(k - 2 * k0) <= 1e-6 * k else torch.exp(d * k)
                    k0 = k
                    acc[j][lo - o0:hi - o0].addcmul_(w, val)
                    wsum[j][lo - o0:hi - o0] += w
    if self_weight > 0:
        own = x[o0:o1]
        return [((a + self_weight * own) / (ws + self_weight), ws) for a, ws in zip(acc, wsum)]
    return [(torch.where(ws > 0, a / ws.clamp(min=1e-30), x[o0:o1]), ws) for a, ws in zip(acc, wsum)]


def _box_mean(d: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of every ``k`` x ``k`` window of ``d`` (..., H, W) -> (..., H - k + 1, W - k + 1):
    ``avg_pool2d(d, k, stride=1)`` as :func:`_grid_sums` with a step of 1, rows then columns (7x
    faster on a CPU; equal to rounding)."""
    H, W = d.shape[-2:]
    rows = _grid_sums(d, -1, k, 1, W - k + 1, None)
    return _grid_sums(rows, -2, k, 1, H - k + 1, None).div_(k * k)


def median3(y: np.ndarray) -> np.ndarray:
    """3 x 3 median filter of every plane of an ``(S, C, H, W)`` array (reflecting borders)."""
    from scipy import ndimage

    return ndimage.median_filter(y, size=(1, 1, 3, 3), mode="reflect")


def _robust_std(v: np.ndarray, axis=None) -> np.ndarray:
    med = np.median(v, axis=axis, keepdims=True)
    return 1.4826 * np.median(np.abs(v - med), axis=axis)


def find_dead_lines(y: np.ndarray) -> np.ndarray:
    """Dead lines: whole columns (or rows) of a plane that hold one constant value while their
    neighbours vary (a dead detector element, a dropped scan line set to 0).

    A line is dead when more than half of its entries equal its median exactly and a neighbouring
    line is not so (a constant background, e.g. zero padding, is not a dead line). Returns a boolean
    ``(S, C, H, W)`` mask, True on dead entries.
    """
    dead = np.zeros(y.shape, dtype=bool)
    for line_axis, along in ((3, 2), (2, 3)):  # columns (constant along Y), then rows
        med = np.median(y, axis=along, keepdims=True)
        flat = np.mean(y == med, axis=along, keepdims=True) > 0.5  # (S, C, 1, W) or (S, C, H, 1)
        n = flat.shape[line_axis]
        if n < 3:
            continue
        live_nb = np.zeros_like(flat)
        live_nb.swapaxes(line_axis, -1)[..., 1:] |= ~flat.swapaxes(line_axis, -1)[..., :-1]
        live_nb.swapaxes(line_axis, -1)[..., :-1] |= ~flat.swapaxes(line_axis, -1)[..., 1:]
        dead |= np.broadcast_to(flat & live_nb, y.shape)
    return dead


def estimate_stripes(y: np.ndarray, exclude: np.ndarray | None = None, *, width: int = 7,
                     threshold: float = 3.0, passes: int = 2) -> np.ndarray:
    """Stripe noise: an offset that is constant along whole columns (or rows) of a plane.

    For every plane, the residual of a ``width``-wide median filter across lines is taken, and its
    median along each line is that line's offset (robust to impulses and to the noise, whose
    contribution shrinks as 1/sqrt(line length)). Offsets that do not stand out from the others
    (``threshold`` robust deviations of the offsets of that plane) are set to zero, so clean planes
    are left alone. Columns first, then rows; ``passes`` refinements. ``exclude`` (e.g. dead lines)
    is left out of the estimate. Returns the stripe array, ``(S, C, H, W)``.
    """
    from scipy import ndimage

    work = y.astype(np.float32, copy=True)
    if exclude is not None and exclude.any():
        work = np.where(exclude, median3(work), work)
    stripes = np.zeros_like(work)
    for _ in range(passes):
        for line_axis, along in ((3, 2), (2, 3)):
            if work.shape[line_axis] < width or work.shape[along] < 8:
                continue
            size = [1, 1, 1, 1]
            size[line_axis] = width
            cur = work - stripes
            resid = cur - ndimage.median_filter(cur, size=size, mode="reflect")
            off = np.median(resid, axis=along, keepdims=True)
            spread = _robust_std(off, axis=line_axis) + 1e-12
            off = np.where(np.abs(off) > threshold * np.expand_dims(spread, line_axis), off, 0.0)
            stripes = stripes + off
    return stripes.astype(np.float32)


def _diagonal_mad_bins(planes, bins: int, min_bins: int = 1, min_count: int = 1):
    """The finest diagonal db2 wavelet coefficients (nonzero ones) of 2-D ``planes``, in bins of local
    intensity (quantiles of the approximation band smoothed over 3 x 3; at most ``bins``, at least
    ``min_bins``, about 64 coefficients each): for every bin with ``min_count`` or more of them, its
    median level (the approximation band's units: twice the image's for db2 in 2-D), MAD variance
    ``(median |d| / 0.6745)**2`` and count, as three arrays. Also returns how many nonzero
    coefficients there were."""
    import pywt
    from scipy import ndimage

    levels, dets = [], []
    for p in planes:
        approx, (_, _, diag) = pywt.dwt2(np.asarray(p, dtype=np.float64), "db2")
        levels.append(ndimage.uniform_filter(approx, 3).ravel())
        dets.append(np.abs(diag.ravel()))
    level, d = np.concatenate(levels), np.concatenate(dets)
    keep = d > 0
    level, d = level[keep], d[keep]
    out = ([], [], [])
    if d.size:
        bins = int(max(min_bins, min(bins, d.size // 64)))
        edges = np.quantile(level, np.linspace(0.0, 1.0, bins + 1))
        idx = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, bins - 1)
        for b in range(bins):
            sel = idx == b
            n = int(sel.sum())
            if n >= min_count:
                out[0].append(np.median(level[sel]))
                out[1].append((np.median(d[sel]) / 0.6744897501960817) ** 2)
                out[2].append(n)
    return tuple(np.asarray(v, dtype=np.float64) for v in out) + (d.size,)


def noise_rms(plane: np.ndarray, bins: int = 8) -> float:
    """RMS noise level of one 2-D plane, robust to edges and texture, right for shot noise too.

    As :func:`skimage.restoration.estimate_sigma`, from the median absolute deviation of the
    finest diagonal db2 wavelet coefficients (nonzero ones), but taken separately in ``bins``
    bins of local intensity (quantiles of the smoothed approximation band) and averaged as
    variances, weighted by each bin's count (``bins=1``: ``estimate_sigma`` exactly). With noise of
    one level everywhere this equals
    ``estimate_sigma`` (within 1 % on 12 scikit-image photos at sigma 0.05-0.2); with shot
    (Poisson) noise, whose variance grows with intensity, it gives the RMS level the residual of
    a denoiser carries, where one global median gives a lower, median-intensity level
    (fluorescence Z-stack sample: 3.43 counts, true RMS 3.43, ``estimate_sigma`` 3.08).
    """
    _, var, n, total = _diagonal_mad_bins([plane], bins)
    return float(np.sqrt(np.sum(n * var) / np.sum(n))) if total else 0.0


def fit_noise_variance(planes, bins: int = 16) -> tuple[float, float]:
    """Fit the Poisson-Gaussian noise model ``variance = a * value + b`` to 2-D ``planes``.

    As :func:`noise_rms`, from the median absolute deviation of the finest diagonal db2 wavelet
    coefficients (nonzero ones), in bins of local intensity (quantiles of the smoothed
    approximation band, scaled to intensity); a least-squares line through the bins' variances,
    weighted by their counts (within 10 % of the true gain in 14 of 18 channels of four 256^2
    photos with Poisson noise of peak 30 and 100, at most 38 % off; ``benchmarks/shot_noise.py``).
    Shot noise of a detector that records ``g`` units per photon gives ``a = g`` (``1 / peak`` for
    values in [0, 1]) and read noise ``sigma`` gives ``b = sigma**2`` (less ``g`` times a dark
    offset); Gaussian noise alone gives ``a`` near 0. Returns ``(a, b)``.

    Raises
    ------
    ValueError
        Too few nonzero coefficients (at least 128, about a 24 x 24 plane) for two bins.
    """
    level, var, n, total = _diagonal_mad_bins(planes, bins, min_bins=2, min_count=32)
    if total < 128:
        raise ValueError(f"too few pixels to fit a signal-dependent noise model ({total} nonzero wavelet "
                         "coefficients, at least 128 needed: planes of about 24 x 24 pixels or more)")
    if len(n) < 2:
        return 0.0, float(np.sum(n * var) / max(np.sum(n), 1))
    w = np.sqrt(n)
    rows = np.stack([w * level / 2.0, w], axis=1)  # db2's 2-D low pass has gain 2
    a, b = np.linalg.lstsq(rows, w * var, rcond=None)[0]
    return float(a), float(b)


def plane_sigmas(y: np.ndarray) -> np.ndarray:
    """Gaussian noise level of every plane of ``(S, C, H, W)``: :func:`skimage.restoration.estimate_sigma`
    (wavelet-domain median absolute deviation; :func:`noise_rms` with one bin), which impulses and
    edges barely move."""
    S, C = y.shape[:2]
    flat = y.reshape(S * C, *y.shape[2:])
    return np.array([noise_rms(p, bins=1) for p in flat], dtype=np.float64).reshape(S, C)


class MixedNoise(Operator):
    """Gaussian plus sparse and structured noise: ``y = x + n + s + l + d``.

    * ``n``: Gaussian, with its own level ``sigma_p`` in every plane (band, channel, frame);
    * ``s``: impulses (salt-and-pepper, hot pixels, outliers);
    * ``l``: stripes, offsets constant along whole columns or rows of a plane;
    * ``d``: dead lines, whole columns or rows stuck at one value.

    Each sparse part is found once, before the loop, by a robust rule, instead of the reference
    code's single soft-thresholded sparse term re-estimated every iteration (with an untrained
    network that learns to reproduce its targets, that term lets impulses back in: 17.7 dB vs
    26.6 dB on the case in docs/design.md). Dead lines (:func:`find_dead_lines`) and impulses (entries
    farther than ``threshold * sigma_p`` from the 3 x 3 median of the destriped plane) carry no
    information about ``x`` and are treated as missing; stripes (:func:`estimate_stripes`) are
    subtracted. The remaining entries keep the Gaussian data term ``w_p/2 ||y - l - x||^2`` with
    ``w_p = weight / sigma_p^2``, whose proximal operator is elementwise.

    Parameters
    ----------
    y : tensor (S, C, H, W)
        The normalized observation.
    sigma : float, array of shape (S, C), or None
        Gaussian noise level (normalized units); None estimates it in every plane.
    weight : float
        Scale of the data term.
    threshold : float
        Impulse threshold in noise standard deviations.
    stripes : bool
        Look for stripes and dead lines.
    """

    def __init__(self, y: torch.Tensor, sigma=None, weight: float = 1.0, threshold: float = 3.0,
                 stripes: bool = True):
        yn = y.detach().cpu().numpy().astype(np.float32)
        S, C = yn.shape[:2]
        self.dead = find_dead_lines(yn) if stripes else np.zeros(yn.shape, bool)
        self.stripes = estimate_stripes(yn, self.dead) if stripes else np.zeros_like(yn)
        clean = yn - self.stripes
        self._median = median3(clean)
        if sigma is None:
            r = clean - self._median  # despeckle before estimating: impulses must not inflate sigma
            mad = _robust_std(r.reshape(S, C, -1), axis=-1)[..., None, None] + 1e-12
            sig = plane_sigmas(np.where((np.abs(r) > 4 * mad) | self.dead, self._median, clean))
        else:
            sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (S, C))
        self.sigmas = np.maximum(sig, 1e-3)
        self.sigma = float(np.median(self.sigmas))
        thr = float(threshold) * self.sigmas[..., None, None]
        out = (np.abs(clean - self._median) > thr) | self.dead
        super().__init__(torch.from_numpy(clean).to(y.device))
        self.observation = y
        self.outliers = torch.from_numpy(out).to(y.device)
        self.w = (float(weight) / torch.from_numpy(self.sigmas.astype(np.float32)) ** 2).reshape(S, C, 1, 1).to(y.device)

    def initial_estimate(self) -> torch.Tensor:
        """The destriped observation with impulses and dead lines replaced by the 3 x 3 median."""
        med = torch.from_numpy(self._median).to(self.y.device)
        return torch.where(self.outliers, med, self.y)

    def prox(self, v, mu):
        return torch.where(self.outliers, v, (self.w * self.y + mu * v) / (self.w + mu))

    def sparse(self, x: torch.Tensor) -> torch.Tensor:
        """The non-Gaussian noise found for the estimate ``x``: stripes everywhere, plus
        ``y - x`` on impulses and dead lines."""
        s = torch.from_numpy(self.stripes).to(x.device)
        return torch.where(self.outliers, self.observation - x, s)
