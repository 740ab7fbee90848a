"""Rewrites of an exported ONNX graph that onnxruntime's optimizer does not make.

`fold_batch_norms`: rwkvseg's conv blocks run conv -> activation -> BatchNorm, so no BatchNorm follows a Conv
directly and onnxruntime's Conv+BN fusion never fires; it runs every BatchNorm as its own pass over the map (as a
1x1 depthwise convolution in its blocked layout). Where a BatchNorm's only consumer is a 1x1 convolution without
groups or padding, the affine map folds into that convolution exactly up to rounding:
W (s y + t) + b = (W diag(s)) y + (W t + b), with s = gamma / sqrt(var + eps), t = beta - mean s.

`mean_of_members`: the exported members of an ensemble joined into one model whose output is the logits of their
mean probability (infer.ensemble.ProbabilityMean in standard operators).
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


def mean_of_members(members: list, activation: str, input_name: str, output_name: str):
    """One ONNX model from the exported members of an ensemble (ModelProtos with one input and one output of the
    same names and shapes, no local functions): each member's graph, its names prefixed `m<k>.`, reads the shared
    input, and the output is the logits of the members' mean probability, as infer.ensemble.ProbabilityMean
    computes them with logsumexp: sigmoid, log mean(sigmoid) - log (1 - mean(sigmoid)); softmax over axis 1, log
    mean(softmax). Exporting the members one by one and joining them keeps the ONNX exporter's graph passes, which
    grow faster than the graph, at one member's size."""
    import math

    from onnx import TensorProto, compose, helper, numpy_helper

    first = members[0]
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation {activation!r} unknown; choose sigmoid or softmax")
    for k, member in enumerate(members):
        inputs, outputs = [i.name for i in member.graph.input], len(member.graph.output)
        if member.functions or inputs != [input_name] or outputs != 1:
            raise ValueError(
                f"member {k}: a graph of one input {input_name!r}, one output and no local functions is expected, "
                f"not inputs {inputs}, {outputs} outputs and {len(member.functions)} functions"
            )
        if list(member.opset_import) != list(first.opset_import):
            raise ValueError(f"member {k} was exported with other opsets than member 0; export them alike")
    nodes, initializers, value_info, logs = [], [], [], []
    for k, member in enumerate(members):
        graph = compose.add_prefix_graph(member.graph, f"m{k}.", rename_inputs=False)
        nodes += graph.node
        initializers += graph.initializer
        value_info += graph.value_info
        (out,) = graph.output
        x, m = out.name, f"mean{k}."  # apart from the members' names, which all start m<k>.
        if activation == "sigmoid":  # log sigmoid(x) = -softplus(-x), log (1 - sigmoid(x)) = -softplus(x)
            nodes.append(helper.make_node("Neg", [x], [m + "neg"]))
            nodes.append(helper.make_node("Softplus", [m + "neg"], [m + "softplus_neg"]))
            nodes.append(helper.make_node("Neg", [m + "softplus_neg"], [m + "log_p"]))
            nodes.append(helper.make_node("Softplus", [x], [m + "softplus"]))
            nodes.append(helper.make_node("Neg", [m + "softplus"], [m + "log_q"]))
            logs.append([m + "log_p", m + "log_q"])
        else:
            nodes.append(helper.make_node("LogSoftmax", [x], [m + "log_p"], axis=1))
            logs.append([m + "log_p"])
    axes = numpy_helper.from_array(np.array([0], np.int64), "mean.axis0")
    log_n = numpy_helper.from_array(np.array(math.log(len(members)), np.float32), "mean.log_n")
    initializers += [axes, log_n]
    means = []
    for j in range(len(logs[0])):  # [N, B, K, *S] -> log of the mean over the members [B, K, *S]
        stacked = []
        for k, pair in enumerate(logs):
            nodes.append(helper.make_node("Unsqueeze", [pair[j], axes.name], [f"mean{k}.stack{j}"]))
            stacked.append(f"mean{k}.stack{j}")
        nodes.append(helper.make_node("Concat", stacked, [f"mean.stacked{j}"], axis=0))
        nodes.append(helper.make_node("ReduceLogSumExp", [f"mean.stacked{j}", axes.name], [f"mean.lse{j}"], keepdims=0))
        nodes.append(helper.make_node("Sub", [f"mean.lse{j}", log_n.name], [f"mean.log{j}"]))
        means.append(f"mean.log{j}")
    if activation == "sigmoid":
        nodes.append(helper.make_node("Sub", means, [output_name]))  # the logit of the mean
    else:
        nodes.append(helper.make_node("Identity", means, [output_name]))
    (template,) = first.graph.output
    output = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, None)
    output.type.CopyFrom(template.type)
    graph = helper.make_graph(
        nodes, f"mean of {len(members)} members", list(first.graph.input), [output], initializers, value_info=value_info
    )
    return helper.make_model(graph, opset_imports=list(first.opset_import), ir_version=first.ir_version)
