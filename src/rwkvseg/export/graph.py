"""Rewrites of an exported ONNX graph that onnxruntime's optimizer does not make.

`fold_batch_norms`: rwkvseg's conv blocks run conv -> activation -> BatchNorm, so no BatchNorm follows a Conv
directly and onnxruntime's Conv+BN fusion never fires; it runs every BatchNorm as its own pass over the map (as a
1x1 depthwise convolution in its blocked layout). Where a BatchNorm's only consumer is a 1x1 convolution without
groups or padding, the affine map folds into that convolution exactly up to rounding:
W (s y + t) + b = (W diag(s)) y + (W t + b), with s = gamma / sqrt(var + eps), t = beta - mean s.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def fold_batch_norms(graph) -> int:
    """Fold every BatchNormalization whose only consumer is a 1x1 (1x1x1) Conv (group 1, no padding, constant
    weights) into that Conv, in place on an onnx GraphProto; returns how many were folded. Computed in float64."""
    from onnx import helper, numpy_helper

    constants = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}
    folded, replaced = [], set()
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or bn.output[0] in outputs:
            continue
        users = consumers[bn.output[0]]
        if len(users) != 1 or users[0].op_type != "Conv" or not all(i in constants for i in bn.input[1:5]):
            continue
        conv = users[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        if conv.input[1] not in constants or (bias_name and bias_name not in constants):
            continue
        weight = numpy_helper.to_array(constants[conv.input[1]]).astype(np.float64)  # [K, C, 1, ...]
        if any(k != 1 for k in weight.shape[2:]) or attrs.get("group", 1) != 1 or any(attrs.get("pads", ())):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(constants[i]).astype(np.float64) for i in bn.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        bias = numpy_helper.to_array(constants[bias_name]).astype(np.float64) if bias_name else 0.0
        dtype = numpy_helper.to_array(constants[conv.input[1]]).dtype
        tag = f"rwkvseg_bn_folded_{len(folded)}"  # weights may be shared: new names, never edits in place
        per_input = scale.reshape(1, -1, *[1] * (weight.ndim - 2))
        new_weight = numpy_helper.from_array((weight * per_input).astype(dtype), f"{tag}_w")
        new_bias = numpy_helper.from_array((bias + weight.reshape(weight.shape[:2]) @ shift).astype(dtype), f"{tag}_b")
        graph.initializer.extend([new_weight, new_bias])
        replaced.update([*bn.input[1:5], conv.input[1], bias_name])
        conv.input[0] = bn.input[0]
        conv.input[1] = new_weight.name
        if bias_name:
            conv.input[2] = new_bias.name
        else:
            conv.input.append(new_bias.name)
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    used = {name for node in graph.node for name in node.input}
    stale = [t for t in graph.initializer if t.name in replaced and t.name not in used]
    for t in stale:
        graph.initializer.remove(t)
    return len(folded)
