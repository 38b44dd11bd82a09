"""The gradient network f_Theta: an untrained U-Net that outputs one gradient map per axis.

The reference code fits three independent 2.2M-parameter DIP "skip" U-Nets, one per axis.
Here one U-Net trunk is shared and a 1x1 head per regularized axis reads it out: the
gradient maps of one image along different axes share their edges, so one trunk learns
them together for a third of the cost (``benchmarks/network_ablation.py`` measures it).
Planes of the stack (channels, bands, Z slices, frames) enter as convolution channels, as
in the reference; the spatial size is reflect-padded to a multiple of ``2**levels`` and
cropped back, so any size works (the reference fails below 33 px).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["GradientNet", "SeparateGradientNets"]


def _block(cin: int, cout: int, k: int = 3, stride: int = 1, pad_mode: str = "zeros") -> nn.Sequential:
    pad = (k - 1) // 2
    layers = []
    if pad and pad_mode == "reflect":
        layers.append(nn.ReflectionPad2d(pad))
        pad = 0
    layers += [nn.Conv2d(cin, cout, k, stride=stride, padding=pad), nn.BatchNorm2d(cout),
               nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers)


def _batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, channels: slice = slice(None)) -> torch.Tensor:
    """Training-mode batch norm of ``x`` with the parameters (and running statistics) of
    ``bn``'s ``channels``."""
    stats = (None, None) if bn.running_mean is None else (bn.running_mean[channels], bn.running_var[channels])
    return F.batch_norm(x, *stats, bn.weight[channels], bn.bias[channels], True, bn.momentum, bn.eps)


class GradientNet(nn.Module):
    """Shared U-Net trunk with one linear 1x1 head per regularized axis.

    Parameters
    ----------
    in_channels : int
        Channels of the fixed random input code.
    planes : int
        Number of planes (channels x stack) of the image; each head outputs this many maps.
    n_axes : int
        Number of regularized axes (heads).
    channels : int
        Width of the trunk.
    levels : int
        Number of down/up-sampling levels.
    skip_channels : int
        Width of the skip connections.
    pad_mode : {"zeros", "reflect"}
        Padding of the 3x3 convolutions. Zero padding is fused into the convolution; with nearest
        upsampling it makes an iteration 14 % faster on a 2-core CPU than reflection padding with
        bilinear upsampling, at equal quality (4 images, sigma = 0.1: -0.2 to +0.2 dB).
    upsample : {"nearest", "bilinear"}
        Upsampling in the decoder ("nearest", as in the reference code).
    """

    def __init__(self, in_channels: int, planes: int, n_axes: int, *, channels: int = 48,
                 levels: int = 4, skip_channels: int = 8, pad_mode: str = "zeros", upsample: str = "nearest"):
        super().__init__()
        if pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        self.levels = levels
        self.upsample = upsample
        self.planes = planes
        self.n_axes = n_axes
        self.stem = _block(in_channels, channels, pad_mode=pad_mode)
        self.down = nn.ModuleList()
        self.skip = nn.ModuleList()
        self.up = nn.ModuleList()
        for _ in range(levels):
            self.skip.append(_block(channels, skip_channels, k=1))
            self.down.append(nn.Sequential(_block(channels, channels, stride=2, pad_mode=pad_mode),
                                           _block(channels, channels, pad_mode=pad_mode)))
            self.up.append(nn.Sequential(nn.BatchNorm2d(channels + skip_channels),
                                         _block(channels + skip_channels, channels, pad_mode=pad_mode),
                                         _block(channels, channels, k=1)))
        self.head = nn.Conv2d(channels, planes * n_axes, 1)
        with torch.no_grad():  # start near zero gradients: a flat image is the neutral guess
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
        # channels-last convolutions: 15 % faster per iteration on a 2-core CPU (oneDNN)
        self.to(memory_format=torch.channels_last)

    @property
    def multiple(self) -> int:
        return 2 ** self.levels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Map the code ``z`` (1, in, H, W) to gradients (n_axes, planes, H, W).

        The layers are those of :meth:`forward_reference` (a DIP skip U-Net: skip branch
        ``conv 1x1 - BN - LReLU``; decoder ``upsample - concat - BN - conv - BN - LReLU - conv 1x1 -
        BN - LReLU``). On the CPU they are evaluated in an equal but cheaper order, where an
        iteration takes about 10 % less time on 2 cores (memory traffic at full resolution is
        what costs there); GPUs run the layers as written (fewer kernel launches: this small
        network is launch-bound there).

        * batch norm is per channel, so the decoder's norm of ``concat(upsampled, skip)`` is two
          norms; with nearest upsampling (an exact factor of 2, the size is padded to a multiple
          of ``2**levels``) a pixel and its copies have the same statistics, so the upsampled
          part is normalized *before* upsampling, at a quarter of the pixels;
        * the skip branch's few channels are normalized in NCHW layout (PyTorch's channels-last
          CPU batch norm is several times slower below 16 channels);
        * the concatenation is never built: a convolution of a concatenation is the sum of the
          convolutions of its parts, and the upsampled part's gradient then arrives contiguous.
        """
        if z.device.type != "cpu":
            return self.forward_reference(z)
        h, w = z.shape[-2:]
        z = self._pad(z)
        x = self.stem(z.contiguous(memory_format=torch.channels_last))
        c = x.shape[1]
        skips = []
        for lvl in range(self.levels):
            conv, bn, act = self.skip[lvl]
            s = conv(x).contiguous()  # NCHW
            s = _batch_norm(act(_batch_norm(s, bn)), self.up[lvl][0], slice(c, None))
            skips.append(s.contiguous(memory_format=torch.channels_last))
            x = self.down[lvl](x)
        for lvl in reversed(range(self.levels)):
            s = skips[lvl]
            bn_in, block, block1 = self.up[lvl]
            if self.upsample == "nearest":
                x = F.interpolate(_batch_norm(x, bn_in, slice(0, c)), size=s.shape[-2:], mode="nearest")
            else:
                x = _batch_norm(F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False),
                                bn_in, slice(0, c))
            conv = block[-3]
            if isinstance(block[0], nn.ReflectionPad2d):
                x, s = block[0](x), block[0](s)
            x = (F.conv2d(x, conv.weight[:, :c], conv.bias, padding=conv.padding)
                 + F.conv2d(s, conv.weight[:, c:], None, padding=conv.padding))
            x = block1(block[-1](block[-2](x)))
        return self._head(x, h, w)

    def forward_reference(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` computed layer by layer as written (on GPUs, and in tests)."""
        h, w = z.shape[-2:]
        x = self.stem(self._pad(z).contiguous(memory_format=torch.channels_last))
        skips = []
        for lvl in range(self.levels):
            skips.append(self.skip[lvl](x))
            x = self.down[lvl](x)
        for lvl in reversed(range(self.levels)):
            s = skips[lvl]
            extra = {} if self.upsample == "nearest" else {"align_corners": False}
            x = F.interpolate(x, size=s.shape[-2:], mode=self.upsample, **extra)
            x = self.up[lvl](torch.cat([x, s], dim=1))
        return self._head(x, h, w)

    def _pad(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if (ph < h and pw < w) else "replicate"
            z = F.pad(z, (0, pw, 0, ph), mode=mode)
        return z

    def _head(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        out = self.head(x)[..., :h, :w]
        return out.reshape(self.n_axes, self.planes, h, w)


class SeparateGradientNets(nn.Module):
    """One independent :class:`GradientNet` per axis, as in the reference code (for ablations)."""

    def __init__(self, in_channels: int, planes: int, n_axes: int, **kwargs):
        super().__init__()
        self.nets = nn.ModuleList(GradientNet(in_channels, planes, 1, **kwargs) for _ in range(n_axes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(z) for net in self.nets], dim=0)
