"""The gradient network: its reordered forward computes the layers as written."""

import pytest
import torch

from napari_ngr.network import GradientNet


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
@pytest.mark.parametrize("shape", [(40, 57), (32, 32), (9, 13)])
def test_forward_matches_layer_by_layer_reference(pad_mode, upsample, shape):
    torch.manual_seed(0)
    levels = 3 if min(shape) >= 32 else 1
    net = GradientNet(5, 3, 2, channels=16, levels=levels, skip_channels=4, pad_mode=pad_mode,
                      upsample=upsample).double()
    z = torch.rand((1, 5, *shape), dtype=torch.float64)
    fast = net(z)
    ref = net.forward_reference(z)
    assert fast.shape == (2, 3, *shape)
    assert torch.allclose(fast, ref, rtol=1e-10, atol=1e-10)
    # ... and so do the parameter gradients that Adam steps on
    g_fast = torch.autograd.grad(torch.sum(fast * ref.detach().sin()), list(net.parameters()))
    g_ref = torch.autograd.grad(torch.sum(net.forward_reference(z) * ref.detach().sin()), list(net.parameters()))
    flat = torch.cat([g.flatten() for g in g_ref])
    diff = torch.cat([(a - b).flatten() for a, b in zip(g_fast, g_ref)])
    assert float(diff.norm() / flat.norm()) < 1e-10
