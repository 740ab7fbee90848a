"""Inductor graph passes of rwkvseg's compiled paths (rwkvseg.compiling.inductor_options puts them in).

Imported only when something compiles: importing Inductor costs about a second.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor import inductor_prims
from torch._inductor.custom_graph_pass import CustomGraphPass


class KeepChannelsLast3d(CustomGraphPass):
    """Inductor post-grad pass: the maps and weights of every 3D convolution (forward and backward) in the strides
    eager execution gives them, where those are channels-last (NDHWC).

    Inductor decides the layout of an intermediate buffer (a pointwise result, the bf16 cast of a weight under
    autocast) when an operation first asks for one. For 2D convolutions its layout optimisation asks for
    channels-last; for 3D ones (torch 2.13, `_inductor/kernel/conv.py`) it asks for the layout the convolution
    returns on the buffer's default channels-first strides, so a channels-last 3D model runs most of its
    convolutions channels-first once compiled (scripts/conv_layouts.py on an H200: 39 of MMSegRWKV's 49) while the
    eager model runs 48 of them on channels-last maps and returns all 49 so. Inductor's own
    `prims.inductor_force_stride_order` before each of those arguments fixes the layout where it is still free (no
    copy) and copies where it is not. A channels-first model, and any 2D one, is left as it is.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        arguments = {aten.convolution.default: (0, 1), aten.convolution_backward.default: (0, 1, 2)}
        for node in list(graph.nodes):
            for i in arguments.get(node.target, ()):
                arg = node.args[i]
                val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
                if arg.target is inductor_prims.force_stride_order or not _channels_last_3d(val):
                    continue  # pinned already (one node in two places of the call), or not channels-last 3D
                with graph.inserting_before(node):
                    pinned = graph.call_function(inductor_prims.force_stride_order, (arg, list(val.stride())))
                pinned.meta["val"] = val
                node.replace_input_with(arg, pinned)

    def uuid(self) -> str:
        return "rwkvseg.inductor_passes.KeepChannelsLast3d/1"  # part of Inductor's cache key: change it with the pass


def _channels_last_3d(val: Any) -> bool:
    """val is a 5-D tensor with static strides laid out channels-last and not also channels-first (one channel or
    one voxel satisfies both)."""
    if not isinstance(val, torch.Tensor) or val.dim() != 5 or not all(isinstance(s, int) for s in val.stride()):
        return False
    return val.is_contiguous(memory_format=torch.channels_last_3d) and not val.is_contiguous()
