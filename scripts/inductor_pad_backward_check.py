"""Does Inductor compile the backward of a replicate F.pad after a convolution on the CPU? (torch only, no rwkvseg)

Usage: python scripts/inductor_pad_backward_check.py

The PyTorch bug behind the strict xfails of the 2D MONAI BasicUNet cases (unet_test, unet_small, unet) under
Inductor in tests/test_compile.py. MONAI's UpCat pads the upsampled features with mode="replicate" (padding 0 or 1
per axis, always called), so every BasicUNet has an aten.replication_pad2d_backward in its backward graph:

1. On the CPU with oneDNN, Inductor lays convolution outputs out channels-last (torch/_inductor/graph.py,
   decide_layout_opt: "For cpu backend and mkldnn enabled, we always use channels_last").
2. The eager CPU kernel aten.replication_pad2d_backward returns its gradient in the input's memory format
   (channels-last in, channels-last out); Inductor runs it as a fallback kernel.
3. Its meta kernel (torch/_meta_registrations.py, meta_pad2d_backward) returns `self.new_empty(self.shape)`:
   contiguous whatever the input's layout. Inductor plans with the meta strides and asserts them on the fallback's
   output, so the compiled backward stops with "AssertionError: expected size 4==4, stride 1==36 at dim=1; ...
   Error in op: torch.ops.aten.replication_pad2d_backward.default".

(meta_pad3d_backward has the same defect, but the compiled 3D case of this script runs, and so does basicunet.)
Upstream: no report of the backward meta kernels found (2026-12-04); the forward meta kernels had the same defect,
fixed in pytorch/pytorch#179366 ("Fix reflection_pad2d and replication_pad2d meta to preserve channels_last
format"); pytorch/pytorch#179442 is the open issue on F.pad's layout under torch.compile. Prints one line per check
and exits 1 while the bug is present, 0 once it is fixed.
"""

import sys

import torch
import torch.nn.functional as F


def meta_matches_eager() -> bool:
    """Step 2 against step 3: the strides of the eager CPU kernel and of its meta kernel on a channels-last input."""
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    eager = torch.ops.aten.replication_pad2d_backward(grad, x, [0, 0, 0, 0])
    meta = torch.ops.aten.replication_pad2d_backward(grad.to("meta"), x.to("meta"), [0, 0, 0, 0])
    print(f"replication_pad2d_backward on channels-last: eager CPU strides {eager.stride()}, meta {meta.stride()}")
    return eager.stride() == meta.stride()


def compiled_backward_runs() -> bool:
    """Steps 1 to 3 through torch.compile: a convolution, then a replicate pad of zero (as MONAI's UpCat does)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    x = torch.randn(2, 1, 6, 6)

    def f(x):
        return F.pad(conv(x), [0, 0, 0, 0], mode="replicate")

    try:
        torch.compile(f, backend="inductor", fullgraph=True)(x).square().sum().backward()
    except AssertionError as error:
        print(f"compiled conv + replicate pad, backward: {str(error).splitlines()[0]}")
        return False
    print("compiled conv + replicate pad, backward: runs")
    return True


def main() -> int:
    print(f"torch {torch.__version__}, oneDNN available: {torch.backends.mkldnn.is_available()}")
    checks = [meta_matches_eager(), compiled_backward_runs()]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
