"""The fused instance norm + activation: against nn.InstanceNorm3d (+ LeakyReLU / ReLU) in outputs and every
gradient. CPU: the module and MONAI's res block swap; the custom ops' output layouts (channels-last kept); the
Triton kernels, channels-first and channels-last, under TRITON_INTERPRET=1 at small, ragged shapes; the CUDA path
(custom op, torch.compile, memory) in the gpu-marked tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import nn

import rwkvseg
from rwkvseg.layers.norm import (
    FusedInstanceNormAct,
    FusedUnetResBlock,
    instance_norm_act,
    instance_norm_layout,
    use_fused_instance_norm,
)
from rwkvseg.models import create_model

SLOPES = (1.0, 0.01, 0.0)  # no activation, MONAI's LeakyReLU, ReLU


def _reference(x, weight, bias, slope, eps=1e-5):
    """nn.InstanceNorm3d then the activation, as MONAI's blocks run them."""
    y = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    return y if slope == 1.0 else F.leaky_relu(y, slope)


def _inputs(shape, affine, dtype=torch.float32, device="cpu", mean=3.0, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(device, dtype)
    c = shape[1]
    weight = (torch.rand(c, generator=g) + 0.5).to(device) if affine else None
    bias = torch.randn(c, generator=g).to(device) if affine else None
    return x, weight, bias


def _double(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _grads(fn, x, weight, bias, gy):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = fn(*leaves) if weight is not None else fn(leaves[0], None, None)
    return y, torch.autograd.grad(y, leaves, gy)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("slope", SLOPES)
def test_module_matches_instance_norm_and_activation_on_cpu(affine, slope):
    norm = nn.InstanceNorm3d(3, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    fused = FusedInstanceNormAct.replacing(norm, slope)
    assert fused.state_dict().keys() == norm.state_dict().keys()
    x = torch.randn(2, 3, 5, 6, 7, requires_grad=True)
    ref = norm(x) if slope == 1.0 else F.leaky_relu(norm(x), slope)
    y = fused(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    params = list(norm.parameters())
    torch.testing.assert_close(torch.autograd.grad(y, [x, *params], gy), torch.autograd.grad(ref, [x, *params], gy))


@pytest.mark.parametrize("slope", SLOPES)
def test_module_keeps_a_channels_last_map_channels_last_on_cpu_as_its_cuda_op_does(slope):
    """F.instance_norm returns a channels-last map contiguous on the CPU; the fused module returns it in
    instance_norm_layout(x) on every device, so a channels-last network stays channels-last on the CPU too (and its
    compiled graph has the CUDA graph's layouts). Same values and gradients as the stock ops."""
    norm = nn.InstanceNorm3d(3, affine=True)
    fused = FusedInstanceNormAct.replacing(norm, slope)
    x = torch.randn(2, 3, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ref = norm(x) if slope == 1.0 else F.leaky_relu(norm(x), slope)
    y = fused(x)
    assert not ref.is_contiguous(memory_format=torch.channels_last_3d)  # the stock op's layout
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    gy = torch.randn_like(ref)
    params = [x, *norm.parameters()]
    torch.testing.assert_close(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy))
    plain = torch.randn(2, 3, 5, 6, 7)
    assert fused(plain).is_contiguous()  # a contiguous map stays contiguous


@pytest.mark.parametrize(("cin", "cout"), [(3, 4), (4, 4)])
def test_fused_res_block_equals_monai_block(cin, cout):
    torch.manual_seed(0)
    block = UnetResBlock(3, cin, cout, kernel_size=3, stride=1, norm_name="instance")
    keys = list(block.state_dict())
    x = torch.randn(2, cin, 7, 6, 5, requires_grad=True)
    ref = block(x)
    gy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *block.parameters()], gy)
    fused = FusedUnetResBlock(block)
    assert list(fused.state_dict()) == keys
    y = fused(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y, [x, *fused.parameters()], gy), ref_grads, rtol=0, atol=0)


def test_mmsegrwkv_fused_norm_keeps_keys_and_outputs_on_cpu():
    torch.manual_seed(0)
    stock = create_model("mmsegrwkv_test", 4, 3)
    fused = create_model("mmsegrwkv_test", 4, 3, fused_norm=True)
    assert list(fused.state_dict()) == list(stock.state_dict())
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in fused.modules())
    assert sum(isinstance(m, FusedUnetResBlock) for m in fused.modules()) == 10
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(1, 4, 9, 13, 11)
    torch.testing.assert_close(fused(x), stock(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at most one"):
        create_model("mmsegrwkv_test", 4, 3, fused_norm=True, fast_norm=True)


def test_use_fused_instance_norm_leaves_other_norms_alone():
    net = nn.Sequential(
        UnetResBlock(3, 2, 2, kernel_size=3, stride=1, norm_name="batch"),
        nn.InstanceNorm3d(2, affine=True),
        nn.InstanceNorm3d(2, track_running_stats=True),
    )
    use_fused_instance_norm(net)
    assert isinstance(net[0], UnetResBlock) and isinstance(net[0].norm1, nn.BatchNorm3d)
    assert isinstance(net[1], FusedInstanceNormAct) and net[1].weight is not None
    assert isinstance(net[2], nn.InstanceNorm3d)


@pytest.mark.parametrize("affine", [False, True])
def test_custom_op_fake_and_autograd_wiring_on_meta(affine):
    """What torch.compile sees: the ops' fake implementations and the registered backward, on meta tensors."""
    x = torch.empty(2, 3, 4, 5, 6, device="meta", requires_grad=True)
    params = [torch.empty(3, device="meta", requires_grad=True) for _ in range(2)] if affine else [None, None]
    y, mean, rstd = torch.ops.rwkvseg.instance_norm_act(x, *params, 1e-5, 0.01)
    assert y.shape == x.shape and mean.shape == rstd.shape == (6,) and mean.dtype == torch.float32
    leaves = [x, *params] if affine else [x]
    grads = torch.autograd.grad(y, leaves, torch.empty_like(y))
    assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("slope", SLOPES)
def test_custom_op_off_cuda_matches_instance_norm_and_passes_opcheck(affine, slope):
    """Off CUDA the ops run the kernels' computation in torch ops: exact in float64, and torch.library's checks
    (schema, fake implementation, registered autograd, AOT dispatch) pass."""
    x, weight, bias = _inputs((2, 3, 5, 6, 7), affine, dtype=torch.float64)
    gy = torch.randn(x.shape, dtype=torch.float64)
    y, grads = _grads(lambda *t: torch.ops.rwkvseg.instance_norm_act(*t, 1e-5, slope)[0], x, *_double(weight, bias), gy)
    ref, ref_grads = _grads(lambda *t: _reference(*t, slope), x, *_double(weight, bias), gy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    leaves = [None if t is None else t.float().requires_grad_() for t in (x, weight, bias)]
    torch.library.opcheck(torch.ops.rwkvseg.instance_norm_act.default, (*leaves, 1e-5, slope))


# input layout -> (shape, how x is laid out, the layout y and gx come back in)
LAYOUTS = {
    "contiguous": ((2, 3, 4, 5, 6), torch.contiguous_format, torch.contiguous_format),
    "channels_last": ((2, 3, 5, 7), torch.channels_last, torch.channels_last),
    "channels_last_3d": ((2, 3, 4, 5, 6), torch.channels_last_3d, torch.channels_last_3d),
    "channels_last_batch_1": ((1, 4, 3, 5, 6), torch.channels_last_3d, torch.channels_last_3d),
    "channels_last_3d_c1": ((2, 1, 4, 5, 6), torch.channels_last_3d, torch.contiguous_format),  # plain contiguous too
    "permuted": ((2, 3, 4, 5, 6), "permuted", torch.contiguous_format),
}


def _laid_out(x, layout):
    return (
        x.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
        if layout == "permuted"
        else (x.contiguous(memory_format=layout))
    )


def _standard_strides(shape, layout):
    return torch.empty(shape, device="meta", memory_format=layout).stride()


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_custom_op_output_layout_follows_input(case):
    """y and gx come back channels-last for a channels-last x (gy contiguous), contiguous otherwise, in the standard
    strides of that layout; the fake implementations say the same (a mismatch made Inductor's stride assertions fail
    when MMSegRWKV was compiled on CUDA); values equal float64 nn.InstanceNorm + LeakyReLU; opcheck passes."""
    shape, layout, expected = LAYOUTS[case]
    x, weight, bias = _double(*_inputs(shape, True))
    x = _laid_out(x, layout)
    assert x.is_contiguous() == (expected == torch.contiguous_format and layout != "permuted")
    assert instance_norm_layout(x) == expected
    gy = torch.randn(shape, dtype=torch.float64)  # contiguous whatever x's layout
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y, mean, rstd = torch.ops.rwkvseg.instance_norm_act(*leaves, 1e-5, 0.01)
    grads = torch.autograd.grad(y, leaves, gy)
    mean, rstd = mean.detach(), rstd.detach()
    ref, ref_grads = _grads(lambda *t: _reference(*t, 0.01), x, weight, bias, gy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-10, atol=1e-10)
    strides = _standard_strides(shape, expected)
    assert y.stride() == strides and grads[0].stride() == strides, (y.stride(), grads[0].stride(), strides)
    gx = torch.ops.rwkvseg.instance_norm_act_backward(gy, x, weight, bias, mean, rstd, 0.01)[0]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw, fb, fgy, fmean, frstd = (mode.from_tensor(t) for t in (x, weight, bias, gy, mean, rstd))
        fake_y = torch.ops.rwkvseg.instance_norm_act(fx, fw, fb, 1e-5, 0.01)[0]
        fake_gx = torch.ops.rwkvseg.instance_norm_act_backward(fgy, fx, fw, fb, fmean, frstd, 0.01)[0]
    assert fake_y.stride() == y.stride() and fake_gx.stride() == gx.stride() == strides
    torch.library.opcheck(torch.ops.rwkvseg.instance_norm_act.default, (*leaves, 1e-5, 0.01))
    torch.library.opcheck(torch.ops.rwkvseg.instance_norm_act_backward.default, (gy, x, weight, bias, mean, rstd, 0.01))


def test_kernels_take_the_layout_the_op_chooses():
    """The kernels take the layout of layouts.instance_norm_layout (the op's rule, shared without importing the norm
    layers) on every map the op hands over, and refuse any other layout."""
    from rwkvseg.layers import instance_norm_triton

    for shape, layout, expected in LAYOUTS.values():
        x = _laid_out(torch.zeros(shape), layout)
        assert instance_norm_triton._layout(x.contiguous(memory_format=expected)) == expected, (shape, layout)
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        instance_norm_triton._layout(_laid_out(torch.zeros(2, 3, 4, 5, 6), "permuted"))


class _ConvNormConv(nn.Module):
    """conv -> the fused op (affine, LeakyReLU) -> conv, the op's output also returned: what a channels-last
    MMSegRWKV decoder block compiles into on CUDA, with the op's CPU implementation."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(2, 5, 3, padding=1), nn.Conv3d(5, 3, 1)
        self.weight, self.bias = nn.Parameter(torch.rand(5) + 0.5), nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = torch.ops.rwkvseg.instance_norm_act(self.conv1(x), self.weight, self.bias, 1e-5, 0.01)[0]
        return self.conv2(h), h


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_channels_last_op_compiles_fullgraph_and_matches_eager(backend):
    torch.manual_seed(0)
    model = _ConvNormConv().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 2, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    runs = []
    for run in (model, torch.compile(model, fullgraph=True, backend=backend)):
        leaf = x.clone().requires_grad_()
        out, h = run(leaf)
        grads = torch.autograd.grad((out.square().sum(), h.sum()), [leaf, *model.parameters()])
        runs.append((out, h, grads))
    (out, h, grads), (c_out, c_h, c_grads) = runs
    assert h.is_contiguous(memory_format=torch.channels_last_3d) and not h.is_contiguous()
    assert c_h.stride() == h.stride()
    torch.testing.assert_close((c_out, c_h), (out, h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_grads, grads, rtol=1e-4, atol=1e-4)


def test_custom_op_traces_under_compile_fullgraph():
    x, weight, bias = _inputs((1, 2, 5, 4, 3), True)
    fn = lambda *t: torch.ops.rwkvseg.instance_norm_act(*t, 1e-5, 0.01)[0]  # noqa: E731
    gy = torch.randn(x.shape)
    eager, eager_grads = _grads(fn, x, weight, bias, gy)
    compiled, compiled_grads = _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, weight, bias, gy)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grads, eager_grads)


def _interpreted(suite):
    """The JSON line of instance_norm_interpreted.py (suite channels_first or channels_last), run on the CPU in a
    process of its own."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(rwkvseg.__file__).parents[1])}
    script = Path(__file__).with_name("instance_norm_interpreted.py")
    proc = subprocess.run(
        [sys.executable, str(script), suite], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_fp32_cases(results, cases):
    assert len(results) == cases
    for case, errors in results.items():
        assert errors.pop("no_affine_grads", 0.0) == 0.0, case
        assert errors.pop("layout_kept") == 1.0, case
        torch_fp32 = errors.pop("torch_fp32")
        assert set(errors) >= {"y", "mean", "gx"}
        # within 1e-5 of float64, or where fp32 inputs alone cost more (|mean| >> std) 4x PyTorch's own fp32 error
        assert max(errors.values()) < max(1e-5, 4 * torch_fp32), (case, errors, torch_fp32)


def test_triton_kernels_under_interpreter():
    """Forward and every gradient of the channels-first kernels (contiguous maps)."""
    results = _interpreted("channels_first")
    bf16 = results.pop("bf16")
    assert bf16["dtype_is_bf16"] == 1.0 and bf16["y"] < 2e-2, bf16
    _assert_fp32_cases(results, 3)


def test_channels_last_triton_kernels_under_interpreter():
    """Forward and every gradient of the channels-last kernels, 4-D and 5-D, against float64; y and gx come back
    channels-last (gy arrives contiguous); bf16 and fp16 keep dtype and layout, within their rounding of fp32."""
    results = _interpreted("channels_last")
    for dtype, tol in (("bf16", 2e-2), ("fp16", 2e-3)):
        low = results.pop(dtype)
        assert low.pop("dtype_kept") == 1.0 and low.pop("layout_kept") == 1.0, (dtype, low)
        assert low.pop("gweight") < 1e-5 and max(low.values()) < tol, (dtype, low)  # gweight: fp32 sums
    assert sum(errors["torch_fp32"] > 1e-5 for errors in results.values()) == 1  # one case with |mean| >> std
    _assert_fp32_cases(results, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("shape", [(2, 5, 17, 18, 19), (1, 32, 64, 64, 64), (2, 80, 33, 35)])
def test_cuda_op_matches_instance_norm_with_gradients(channels_last, affine, slope, shape):
    x, weight, bias = _inputs(shape, affine, device="cuda")
    layout = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if channels_last else None
    x = x.contiguous(memory_format=layout) if layout else x
    gy = torch.randn(shape, device="cuda")
    y, grads = _grads(lambda *t: instance_norm_act(*t, slope=slope), x, weight, bias, gy)
    if layout:
        assert y.is_contiguous(memory_format=layout) and grads[0].is_contiguous(memory_format=layout)
    # the reference on a contiguous copy: PyTorch's own instance norm is not trusted with every layout (docs/speed.md)
    ref, ref_grads = _grads(lambda *t: _reference(*t, slope), *_double(x.contiguous(), weight, bias), gy.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # where the pre-activation is within fp32 rounding of 0, fp32 and float64 may fall on different sides of the
    # (leaky) ReLU's kink and the input gradient jumps by (1 - slope) * gy: compare it away from the kink
    pre = F.instance_norm(*_double(x, weight, bias), eps=1e-5)
    smooth = pre.abs() > 1e-5 if slope != 1.0 else torch.ones_like(pre, dtype=torch.bool)
    assert smooth.double().mean() > 0.999
    torch.testing.assert_close(grads[0].double()[smooth], ref_grads[0][smooth], rtol=1e-4, atol=1e-4)
    # weight and bias gradients sum over the map: each kink element may move them by |gy| (1 + |x_hat|)
    x_hat = F.instance_norm(x.double(), eps=1e-5)
    kink = (~smooth).sum().item() * gy.abs().max().item() * (1 + x_hat.abs().max().item())
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 + kink)


@pytest.mark.gpu
def test_cuda_op_passes_opcheck():
    x, weight, bias = _inputs((2, 3, 9, 10, 11), True, device="cuda")
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    for args in [(x, weight, bias, 1e-5, 0.01), (x, None, None, 1e-5, 1.0), (x_cl, weight, bias, 1e-5, 0.0)]:
        torch.library.opcheck(torch.ops.rwkvseg.instance_norm_act.default, args)


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
def test_cuda_fused_block_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    block = FusedUnetResBlock(UnetResBlock(3, 4, 8, kernel_size=3, stride=1, norm_name="instance")).cuda()
    x = torch.randn(2, 4, 24, 20, 16, device="cuda", requires_grad=True)
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(eager)
    torch.testing.assert_close(
        torch.autograd.grad(compiled, x, gy)[0], torch.autograd.grad(eager, x, gy)[0], rtol=1e-4, atol=1e-4
    )


@pytest.mark.gpu
def test_cuda_fused_norm_uses_no_more_memory_than_instance_norm():
    def peak(fn, x):
        x.grad = None
        block.zero_grad(set_to_none=True)  # both runs allocate their parameter gradients afresh
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fn(x).float().square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    torch.manual_seed(0)
    block = UnetResBlock(3, 32, 32, kernel_size=3, stride=1, norm_name="instance").cuda()
    x = torch.randn(1, 32, 96, 96, 96, device="cuda", requires_grad=True)
    stock = peak(block, x)
    fused = peak(FusedUnetResBlock(block), x)
    assert fused <= stock, (fused / 2**20, stock / 2**20)


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
def test_cuda_mmsegrwkv_fused_norm_matches_stock():
    torch.manual_seed(0)
    stock = create_model("mmsegrwkv_test", 4, 3).cuda()
    fused = create_model("mmsegrwkv_test", 4, 3, fused_norm=True).cuda()
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(1, 4, 40, 33, 37, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), rtol=1e-3, atol=1e-3)
