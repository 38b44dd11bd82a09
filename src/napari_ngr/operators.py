"""Forward (degradation) operators and their data terms.

Each operator describes how the observation ``y`` was produced from the clean image ``x``
and knows how to solve its own data subproblem

.. math::  \\operatorname{prox}(v, \\mu) = \\arg\\min_u\\ \\mathrm{data}(u; y) + \\tfrac{\\mu}{2}\\|u - v\\|^2 ,

which is all the ADMM loop in :mod:`napari_ngr.solver` needs. A new degradation (a
blur, a downsampling, another noise model) is one new subclass; the loop is unchanged.
All tensors are in the solver's internal layout ``(S, C, H, W)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Operator", "Inpainting", "Denoising", "MixedNoise"]


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


class Inpainting(Operator):
    """Missing entries: ``y = P_Omega(x)``, observed entries are kept exactly.

    Parameters
    ----------
    y : tensor
        Observation (values at missing entries are ignored).
    observed : bool tensor
        True where ``y`` was observed; broadcastable to ``y``.
    """

    def __init__(self, y: torch.Tensor, observed: torch.Tensor):
        super().__init__(y)
        self.observed = observed.expand_as(y)

    def prox(self, v, mu):
        return torch.where(self.observed, self.y, v)

    def compose(self, x):
        return torch.where(self.observed, self.y, x)

    #: Largest number of missing entries filled with the biharmonic initialisation; beyond
    #: it the faster normalized-convolution fill is used.
    biharmonic_limit = 2_000_000

    def initial_estimate(self) -> torch.Tensor:
        """Initial fill: biharmonic per plane (smooth, accurate), or normalized convolution for
        very large problems."""
        n_missing = int((~self.observed).sum())
        if n_missing <= self.biharmonic_limit:
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
        empty = ~obs.reshape(S * C, -1).any(axis=1).reshape(S, C)
        if empty.any():  # planes with nothing observed: the mean of the observed data
            out[empty] = y[obs].mean()
        return torch.from_numpy(out.astype(np.float32)).to(self.y.device)

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
        rest = todo & ~filled
        if rest.any():  # planes with no observed entry at all: the mean of the observed data
            out[rest] = (y * m).sum() / max(m.sum(), 1.0)
        return torch.from_numpy(out.astype(np.float32)).to(self.y.device)

    def holdout(self, fraction: float, generator: torch.Generator) -> tuple["Inpainting", torch.Tensor]:
        """Split off about ``fraction`` of the observed entries as a validation set.

        Returns the operator that sees only the remaining entries and the boolean mask of the
        held-out entries. Used to stop and to choose the returned iterate without ground truth.

        The held-out entries should be as hard to predict as the truly missing ones, so they copy
        the mask's own pattern: the missing mask is shifted (rolled in Y and X) onto observed
        areas, and kept inside random tiles until the fraction is reached. Dead lines give
        held-out line segments, painted blobs give blobs, scattered pixels give scattered
        pixels. When most entries are missing (over half), the shifted pattern would empty whole
        regions, so whole pixels (every plane at one Y, X position) are drawn at random instead.
        """
        obs = self.observed
        S, C, H, W = obs.shape
        n_obs = int(obs.sum())
        miss = ~obs
        if float(miss.float().mean()) <= 0.5 and min(H, W) >= 16:
            dy = int(torch.randint(H // 4, max(H // 4 + 1, 3 * H // 4), (1,), generator=generator))
            dx = int(torch.randint(W // 4, max(W // 4 + 1, 3 * W // 4), (1,), generator=generator))
            cand = obs & torch.roll(miss, (dy, dx), dims=(2, 3))
            tile = max(8, min(H, W) // 4)
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
                return Inpainting(self.y, obs & ~held), held
        draw = torch.rand((1, 1, H, W), generator=generator, device="cpu").to(obs.device)
        held = obs & (draw < fraction)
        return Inpainting(self.y, obs & ~held), held


class Denoising(Operator):
    """Additive white Gaussian noise: ``y = x + n``, ``n ~ N(0, sigma^2)``.

    The data term ``1/(2 sigma^2) ||x - y||^2`` times ``strength`` is fused into the
    X-update, which is then exact in one DCT solve.
    """

    def __init__(self, y: torch.Tensor, sigma: float, weight: float = 1.0):
        super().__init__(y)
        self.sigma = float(sigma)
        self.fused_weight = weight / max(self.sigma, 1e-4) ** 2

    def prox(self, v, mu):
        w = self.fused_weight
        return (w * self.y + mu * v) / (w + mu)


def median3(y: np.ndarray) -> np.ndarray:
    """3 x 3 median filter of every plane of an ``(S, C, H, W)`` array (reflecting borders)."""
    from scipy import ndimage

    return ndimage.median_filter(y, size=(1, 1, 3, 3), mode="reflect")


class MixedNoise(Operator):
    """Gaussian plus sparse impulse noise: ``y = x + s + n``, ``n ~ N(0, sigma^2)``, ``s`` sparse
    (salt-and-pepper, outliers, hot pixels).

    The sparse part is found first: entries farther than ``threshold * sigma`` from the 3 x 3
    median of their plane are outliers (the hard-threshold form of the reference code's
    soft-thresholded sparse term, decided once instead of at every iteration: with an untrained
    network that learns to reproduce its targets, a sparse term that is re-estimated each
    iteration lets the impulses back in). Outliers carry no information about ``x`` and are
    treated as missing; the other entries keep the Gaussian data term
    ``w/2 ||M (y - x)||^2``, ``w = weight / sigma^2``, whose proximal operator is elementwise.
    """

    def __init__(self, y: torch.Tensor, sigma: float, weight: float = 1.0, threshold: float = 3.0,
                 median: np.ndarray | None = None):
        super().__init__(y)
        self.sigma = float(sigma)
        self.w = weight / max(self.sigma, 1e-4) ** 2
        yn = y.detach().cpu().numpy()
        self._median = median3(yn) if median is None else median
        out = np.abs(yn - self._median) > float(threshold) * max(self.sigma, 1e-4)
        self.outliers = torch.from_numpy(out).to(y.device)

    def initial_estimate(self) -> torch.Tensor:
        """The observation with its outliers replaced by the 3 x 3 median."""
        med = torch.from_numpy(self._median).to(self.y.device)
        return torch.where(self.outliers, med, self.y)

    def prox(self, v, mu):
        return torch.where(self.outliers, v, (self.w * self.y + mu * v) / (self.w + mu))

    def sparse(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse component for the estimate ``x`` (zero away from the outliers)."""
        return torch.where(self.outliers, self.y - x, torch.zeros_like(x))
