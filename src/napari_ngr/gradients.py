"""Finite-difference gradient operators along named axes, with Neumann boundaries.

Convention (used for every exported gradient map): the forward difference
``(D x)[k] = x[k + 1] - x[k]`` for ``k < n - 1`` and ``0`` at the last index, i.e. a
reflective (Neumann) boundary. Unlike the periodic differences of the reference code,
the last band, frame or date is never differenced against the first, and the image
border is never differenced against the opposite border.

``D.T @ D`` along an axis of length ``n`` is diagonalised by the orthonormal DCT-II
with eigenvalues ``4 sin^2(pi k / (2 n))``; :func:`laplacian_eigenvalues` builds the
separable sum used by the closed-form X-update.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ._dct import dctn, idctn

__all__ = ["forward_difference", "forward_difference_adjoint", "laplacian_eigenvalues", "GradientSolver"]


def forward_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Forward difference along ``dim`` with a zero last entry (Neumann boundary)."""
    d = torch.zeros_like(x)
    n = x.shape[dim]
    if n > 1:
        d.narrow(dim, 0, n - 1).copy_(x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1))
    return d


def forward_difference_adjoint(d: torch.Tensor, dim: int) -> torch.Tensor:
    """Adjoint of :func:`forward_difference`: ``<D x, d> == <x, D^T d>`` for all ``x, d``."""
    n = d.shape[dim]
    out = torch.zeros_like(d)
    if n == 1:
        return out
    body = d.narrow(dim, 0, n - 1)
    out.narrow(dim, 0, n - 1).sub_(body)
    out.narrow(dim, 1, n - 1).add_(body)
    return out


def laplacian_eigenvalues(shape: Sequence[int], weights: Mapping[int, float], *, device=None,
                          dtype=torch.float32) -> torch.Tensor:
    """Eigenvalues of ``sum_i w_i D_i^T D_i`` in the DCT-II basis, broadcastable to ``shape``."""
    eig = torch.zeros([1] * len(shape), device=device, dtype=dtype)
    for dim, w in weights.items():
        n = shape[dim]
        k = torch.arange(n, device=device, dtype=torch.float64)
        lam = (4.0 * torch.sin(math.pi * k / (2 * n)) ** 2).to(dtype)
        view = [1] * len(shape)
        view[dim] = n
        eig = eig + float(w) * lam.reshape(view)
    return eig


class GradientSolver:
    """Solves ``(mu I + sum_i w_i D_i^T D_i) x = b`` exactly with one DCT pair.

    Parameters
    ----------
    shape : tuple of int
        Shape of the unknown.
    weights : dict
        ``{dim: w}``, the weight of each regularized axis.
    device, dtype
        Where the eigenvalues live.
    """

    def __init__(self, shape, weights: Mapping[int, float], *, device=None, dtype=torch.float32):
        self.shape = tuple(shape)
        self.weights = dict(weights)
        self.dims = [d for d in range(len(self.shape)) if self.shape[d] > 1]
        self._eig = laplacian_eigenvalues(self.shape, self.weights, device=device, dtype=dtype)

    def solve(self, b: torch.Tensor, mu) -> torch.Tensor:
        """Return ``(mu + L)^{-1} b``; ``mu`` is a scalar or a tensor broadcastable in DCT space."""
        return idctn(dctn(b, self.dims) / (mu + self._eig), self.dims)

    def residual_factor(self, w: float) -> float:
        """``E||y - x||^2 / (N sigma^2)`` for ``x = (w + L)^-1 (w y + L g)``, ``y = g + n``, white ``n``.

        The X-update leaves this much of the noise in the residual ``y - x`` when the gradient
        term is exact (``D_i^T f_i`` built from the clean image ``g``): the mean over the DCT
        basis of ``(lambda / (w + lambda))^2``. The denoising stop rule (the discrepancy principle,
        ``SolverOptions.discrepancy``) compares the measured residual with it.
        """
        lam = self._eigenvalues()
        return float(torch.mean((lam / (float(w) + lam)) ** 2))

    def hat_trace(self, w: float) -> float:
        """Mean diagonal of the hat matrix ``w (w + L)^-1``: the weight an entry's own observed value
        has in ``x = (w + L)^-1 (w y + g)`` (its trace over the number of entries, the mean over the
        DCT basis of ``w / (w + lambda)``)."""
        lam = self._eigenvalues()
        return float(torch.mean(float(w) / (float(w) + lam)))

    def _eigenvalues(self) -> torch.Tensor:
        """Every eigenvalue of ``L`` (the image's shape), in float64 on the CPU (MPS has no float64)."""
        return torch.broadcast_to(self._eig.detach().cpu().double(), self.shape)

    def divergence_term(self, fields: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``sum_i w_i D_i^T f_i`` for the gradient fields ``{dim: f_i}``."""
        out = None
        for dim, f in fields.items():
            t = self.weights[dim] * forward_difference_adjoint(f, dim)
            out = t if out is None else out + t
        return out
