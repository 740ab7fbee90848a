import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkvseg.layers.norm import InstanceNormFast, LayerNormChannelsFirst, _InstanceNormFunction, use_fast_instance_norm


def test_layer_norm_channels_first():
    x = torch.randn(2, 5, 3, 4, 6)
    norm = LayerNormChannelsFirst(5)
    ref = nn.functional.layer_norm(x.movedim(1, -1), (5,)).movedim(-1, 1)
    torch.testing.assert_close(norm(x), ref)


def test_fast_instance_norm_function_matches_torch_with_gradients():
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _InstanceNormFunction.apply(t, 1e-5), (x,))
    torch.testing.assert_close(_InstanceNormFunction.apply(x, 1e-5), F.instance_norm(x, eps=1e-5))
    xb = torch.randn(1, 4, 6, 7, 8).bfloat16()
    y = _InstanceNormFunction.apply(xb, 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.instance_norm(xb.float()), rtol=2e-2, atol=2e-2)


def test_use_fast_instance_norm_swaps_every_instance_norm_and_keeps_the_state():
    net = nn.Sequential(nn.InstanceNorm3d(3, affine=True), nn.Sequential(nn.InstanceNorm3d(2)))
    with torch.no_grad():
        net[0].weight.uniform_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 3, 4, 5, 6)
    ref = net[0](x)
    use_fast_instance_norm(net)
    assert isinstance(net[0], InstanceNormFast) and isinstance(net[1][0], InstanceNormFast)
    assert net.state_dict().keys() == before.keys()
    torch.testing.assert_close(net[0](x), ref)


@pytest.mark.gpu
def test_fast_instance_norm_on_cuda_matches_torch():
    norm = InstanceNormFast(5, affine=True).cuda()
    with torch.no_grad():
        norm.weight.uniform_()
        norm.bias.uniform_()
    x = torch.randn(2, 5, 17, 18, 19, device="cuda", requires_grad=True)
    y = norm(x)
    ref = F.instance_norm(x, weight=norm.weight, bias=norm.bias)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-4, atol=1e-4)
