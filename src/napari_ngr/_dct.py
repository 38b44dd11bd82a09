"""Orthonormal DCT-II / DCT-III along one axis of a torch tensor, computed with FFTs.

The Neumann (reflective) finite-difference Laplacian is diagonal in the DCT-II basis,
so the X-update of the solver is one forward and one inverse DCT per regularized axis.
torch has no DCT, so it is built from an FFT of the even/odd reordered signal
(Makhoul, 1980), which works on every device torch supports.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dct", "idct", "dctn", "idctn"]


def _twiddle(n: int, device, dtype) -> torch.Tensor:
    k = torch.arange(n, device=device, dtype=dtype)
    return torch.exp(torch.complex(torch.zeros_like(k), -math.pi * k / (2 * n)))


def _scale(n: int, device, dtype) -> torch.Tensor:
    s = torch.full((n,), math.sqrt(2.0 / n), device=device, dtype=dtype)
    s[0] = math.sqrt(1.0 / n)
    return s


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (equal to ``scipy.fft.dct(norm="ortho")``)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    if n == 1:
        return x.movedim(-1, dim).clone()
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spec = torch.fft.fft(v, dim=-1)
    out = (spec * _twiddle(n, x.device, x.dtype)).real * 2.0
    out = out * _scale(n, x.device, x.dtype) * 0.5
    return out.movedim(-1, dim)


def idct(y: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`dct` (the orthonormal DCT-III) along ``dim``."""
    y = y.movedim(dim, -1)
    n = y.shape[-1]
    if n == 1:
        return y.movedim(-1, dim).clone()
    c = y / (_scale(n, y.device, y.dtype) * 0.5)  # undo the orthonormal scaling -> 2*sum x cos
    # Rebuild the FFT of the reordered signal: V_k = 0.5 * conj(W_k) * (C_k - i C_{n-k}), C_n = 0
    c_rev = torch.cat([torch.zeros_like(c[..., :1]), c[..., 1:].flip(-1)], dim=-1)
    spec = 0.5 * torch.complex(c, -c_rev) * _twiddle(n, y.device, y.dtype).conj()
    v = torch.fft.ifft(spec, dim=-1).real
    x = torch.empty_like(v)
    half = (n + 1) // 2
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x.movedim(-1, dim)


def _use_scipy(x: torch.Tensor) -> bool:
    # On the CPU, scipy's pocketfft DCT is 10-100x faster than the FFT construction below
    # (measured: 0.2 s vs 2.5 s for a DCT pair of 200 x 256 x 256); tensors that need autograd
    # and other devices take the torch path.
    return x.device.type == "cpu" and not x.requires_grad and x.dtype in (torch.float32, torch.float64)


def _scipy_dctn(x: torch.Tensor, dims, inverse: bool) -> torch.Tensor:
    import scipy.fft

    fn = scipy.fft.idctn if inverse else scipy.fft.dctn
    dims = [d % x.ndim for d in dims]
    out = fn(x.numpy(), type=2, axes=dims, norm="ortho", workers=max(1, torch.get_num_threads()))
    return torch.from_numpy(out)


def dctn(x: torch.Tensor, dims) -> torch.Tensor:
    """Orthonormal DCT-II over several axes."""
    dims = list(dims)
    if dims and _use_scipy(x):
        return _scipy_dctn(x, dims, inverse=False)
    for d in dims:
        x = dct(x, d)
    return x


def idctn(y: torch.Tensor, dims) -> torch.Tensor:
    """Inverse of :func:`dctn`."""
    dims = list(dims)
    if dims and _use_scipy(y):
        return _scipy_dctn(y, dims, inverse=True)
    for d in dims:
        y = idct(y, d)
    return y
