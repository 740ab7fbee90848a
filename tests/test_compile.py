"""torch.compile(model, fullgraph=True) of every registered model on the CPU: forward and backward trace without a
graph break (Bi-WKV is one registered operator, `rwkvseg::bi_wkv` / `bi_wkv_ordered`), and the compiled model's
outputs and parameter gradients equal eager's.

Backends: "aot_eager" is the whole trace (Dynamo with fullgraph=True, then AOTAutograd's joint forward-backward
graph over the fake implementations and the registered autograd) with eager kernels; "inductor" (what users run)
adds code generation, which on two CPU cores takes minutes per model (a C++ compile per kernel). The default run
takes the RWKV test variants and one baseline per dimension under aot_eager; Inductor, and every other registered
model, run under `-m slow`. The inputs are tiny: tracing is the slow part.
"""

import copy

import pytest
import torch
import torch._dynamo

from rwkvseg.models import create_model, list_models

# name -> (in_channels, num_classes, overrides, input shape [B, M, *spatial]), the test-size settings of
# tests/models (narrow widths at each model's smallest legal input)
CASES = {
    "urwkv_test": (1, 2, {}, (2, 1, 20, 28)),
    "urwkv_s": (1, 2, {}, (1, 1, 32, 32)),
    "urwkv": (1, 2, {}, (1, 1, 32, 32)),
    "cmunext_test": (1, 2, {}, (2, 1, 20, 28)),
    "cmunext_s": (1, 2, {}, (1, 1, 32, 32)),
    "cmunext": (1, 2, {}, (1, 1, 32, 32)),
    "cmunext_l": (1, 2, {}, (1, 1, 32, 32)),
    "unet_test": (1, 2, {}, (2, 1, 20, 28)),
    "unet_small": (1, 2, {}, (1, 1, 32, 32)),
    "unet": (1, 2, {}, (1, 1, 32, 32)),
    "mmsegrwkv_test": (2, 3, {}, (1, 2, 5, 7, 3)),
    "mmsegrwkv": (2, 3, dict(widths=(8, 8, 16, 16), decoder_hidden=16, full_res_width=4), (1, 2, 5, 7, 3)),
    "mmsegrwkv_lite": (2, 3, dict(widths=(8, 8, 16, 16), decoder_hidden=16, full_res_width=4), (1, 2, 5, 7, 3)),
    "segresnet": (2, 3, dict(init_filters=8), (1, 2, 8, 8, 16)),
    "basicunet": (2, 3, dict(features=(4, 4, 8, 8, 16, 4)), (1, 2, 33, 17, 19)),
    "dynunet": (2, 3, dict(filters=(4, 8, 8, 16, 16, 16)), (1, 2, 64, 32, 32)),
    "swinunetr": (2, 3, dict(feature_size=12, depths=(1, 1, 1, 1)), (1, 2, 64, 32, 32)),
    "unetr": (2, 3, dict(img_size=32, hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8), (1, 2, 32, 32, 32)),
}
# in the default run: the RWKV test variants and one baseline per dimension
DEFAULT = ("urwkv_test", "mmsegrwkv_test", "unet_test", "segresnet")
# Inductor reorders sums (fused reductions, decomposed norms): float32 noise, far below any real mismatch
RTOL, ATOL = 1e-4, 1e-4
# ...except where the model itself amplifies rounding beyond that: CMUNeXt's training-mode batch norms (batch
# statistics over a few values per channel at these sizes, after a GELU). Largest gradient error over the largest
# gradient (2 threads), for cmunext_test, cmunext_s, cmunext, cmunext_l: eager float32 against float64 2.6e-5, 1.0e-4,
# 2.3e-4, 3.6e-2 (all under 3e-7 with the norms in eval mode); Inductor float32 against eager float32 3.3e-4, 4.4e-4,
# 3.9e-4, 3.7e-2; the same compiled graph in float64 against eager float64 1.2e-12, 2.3e-13, 3.5e-13, 7.2e-12. So the
# graph is right, and float32 cannot show it at 1e-4: these compare under Inductor in float64 (1e-9: over 100x the
# largest measured). U-RWKV's float32 cases check Inductor's float32 kernels for the layers it shares with CMUNeXt
# (convs, batch norms, GELU, pooling, skip fusion), all but the bilinear upsampling.
FLOAT64_UNDER_INDUCTOR = ("cmunext_test", "cmunext_s", "cmunext", "cmunext_l")
RTOL64, ATOL64 = 1e-9, 1e-9


def test_every_registered_model_has_a_compile_case():
    assert set(CASES) == set(list_models())


def _loss_and_grads(model, x, run=None):
    y = (model if run is None else run)(x)
    y.square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


# Known graph breaks, outside rwkvseg's code: each is a finding to fix, kept visible (strict: a fix makes it fail)
KNOWN_BREAKS = {
    "swinunetr": "MONAI SwinUNETR._check_input_size branches on a numpy array of the shape (data-dependent for Dynamo)",
}


# Known Inductor failures, PyTorch bugs: strict too, so the torch release that fixes one makes it fail here.
# MONAI's 2D BasicUNet (UpCat's replicate pad): on the CPU Inductor lays convolution outputs out channels-last, the
# eager replication_pad2d_backward keeps that layout, its meta kernel answers contiguous, and the compiled backward
# stops on Inductor's stride assertion. scripts/inductor_pad_backward_check.py reproduces it with torch alone.
REPLICATION_PAD2D_BACKWARD = (
    "PyTorch 2.13: the meta kernel of aten.replication_pad2d_backward ignores the input's channels-last layout "
    "(scripts/inductor_pad_backward_check.py; no upstream report found, the forward's fix: pytorch/pytorch#179366)"
)
KNOWN_INDUCTOR_BUGS = {name: REPLICATION_PAD2D_BACKWARD for name in ("unet_test", "unet_small", "unet")}


def _cases():
    for backend in ("aot_eager", "inductor"):
        for name in sorted(CASES):
            fast = backend == "aot_eager" and name in DEFAULT
            marks = [] if fast else [pytest.mark.slow]
            if name in KNOWN_BREAKS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BREAKS[name]))
            elif backend == "inductor" and name in KNOWN_INDUCTOR_BUGS:
                marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=KNOWN_INDUCTOR_BUGS[name]))
            yield pytest.param(name, backend, marks=marks, id=f"{name}-{backend}")


@pytest.mark.parametrize(("name", "backend"), list(_cases()))
def test_compiled_model_matches_eager_forward_and_backward(name, backend):
    in_channels, num_classes, overrides, shape = CASES[name]
    float64 = backend == "inductor" and name in FLOAT64_UNDER_INDUCTOR
    dtype, rtol, atol = (torch.float64, RTOL64, ATOL64) if float64 else (torch.float32, RTOL, ATOL)
    torch.manual_seed(0)
    eager = create_model(name, in_channels, num_classes, **overrides).to(dtype)
    compiled_model = copy.deepcopy(eager)  # same weights and norm statistics, separate gradients
    x = torch.randn(shape).to(dtype)
    y_ref, grads_ref = _loss_and_grads(eager, x)
    torch._dynamo.reset()
    try:
        # fullgraph: any graph break, forward or backward, raises here
        y, grads = _loss_and_grads(compiled_model, x, torch.compile(compiled_model, fullgraph=True, backend=backend))
    finally:
        torch._dynamo.reset()
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol * y_ref.abs().max().item())
    assert grads.keys() == grads_ref.keys()
    # gradients on one scale: a conv bias before a batch norm has a gradient of pure rounding noise
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for pname, g in grads.items():
        torch.testing.assert_close(
            g, grads_ref[pname], rtol=rtol, atol=atol * scale, msg=lambda m, p=pname: f"{p}: {m}"
        )


def test_swinunetr_compiles_around_its_graph_break():
    """Without fullgraph the known break is a break, not a stop: Dynamo traces SwinUNETR in pieces (the CPU and GPU
    benches compile it so). Tracing through MONAI's skipped helpers, as BasicUNet needs, stopped Dynamo here."""
    in_channels, num_classes, overrides, shape = CASES["swinunetr"]
    torch.manual_seed(0)
    model = create_model("swinunetr", in_channels, num_classes, **overrides).eval()
    x = torch.randn(shape)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model, backend="eager")(x), model(x))
    finally:
        torch._dynamo.reset()
