"""fold_batch_norms on a hand-built graph: BatchNorms before plain 1x1 convolutions fold away, the others stay, and
onnxruntime gives the same outputs before and after."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rwkvseg.export.graph import fold_batch_norms  # noqa: E402

C = 4


def _graph(rng, shape):
    dims = len(shape) - 2
    constants, nodes = [], []

    def const(name, array):
        constants.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def bn(name, x):
        params = [
            const(f"{name}_{p}", v)
            for p, v in (
                ("g", rng.uniform(0.5, 2, C)),
                ("b", rng.normal(size=C)),
                ("m", rng.normal(size=C)),
                ("v", rng.uniform(0.1, 3, C)),
            )
        ]
        nodes.append(helper.make_node("BatchNormalization", [x, *params], [name], epsilon=1e-3))
        return name

    def conv(name, x, kernel=1, bias=True, **attrs):
        groups = attrs.get("group", 1)
        inputs = [x, const(f"{name}_w", rng.normal(size=(C, C // groups, *[kernel] * dims)))]
        if bias:
            inputs.append(const(f"{name}_bias", rng.normal(size=C)))
        nodes.append(helper.make_node("Conv", inputs, [name], **attrs))
        return name

    a = conv("a", bn("bn_a", "x"))  # folds (with a bias)
    b = conv("b", bn("bn_b", a), bias=False)  # folds (bias added)
    c = conv("c", bn("bn_c", b), kernel=3, pads=[1] * 2 * dims)  # 3x3 with zero padding: stays
    shared = bn("bn_d", c)
    d = conv("d", shared)  # the BatchNorm has a second consumer: stays
    e = conv("e", bn("bn_e", d), group=2)  # grouped: stays
    nodes.append(helper.make_node("Add", [e, shared], ["y"]))
    graph = helper.make_graph(
        nodes,
        "folds",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def _run(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("shape", [(1, C, 7, 9), (2, C, 5, 6, 3)])
def test_batch_norms_fold_into_plain_1x1_convs_only(shape):
    rng = np.random.default_rng(0)
    model = _graph(rng, shape)
    x = rng.normal(size=shape).astype(np.float32)
    before = _run(model, x)
    assert fold_batch_norms(model.graph) == 2
    onnx.checker.check_model(model)
    left = sorted(n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization")
    assert left == ["bn_c", "bn_d", "bn_e"]
    names = {t.name for t in model.graph.initializer}
    assert not {"bn_a_g", "a_w", "b_w"} & names and {"bn_c_g", "c_w", "d_w"} <= names  # only the replaced go
    after = _run(model, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    assert fold_batch_norms(model.graph) == 0


def _conv_model(weight, bias):
    """One 3x3 convolution, input `image`, output `logits`, its constants named w and b in every member."""
    k, c = weight.shape[:2]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", c, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", k, "H", "W"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize(("activation", "classes"), [("sigmoid", 2), ("softmax", 3)])
def test_mean_of_members_is_the_mean_probability_even_where_members_saturate(activation, classes):
    """Three members with the same internal names join into one valid graph whose output, activated, is the mean of
    the members' probabilities; logits of +-80 (probabilities of exactly 0 or 1 in float32) stay finite."""
    from rwkvseg.export.graph import mean_of_members

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, C, 6, 5)).astype(np.float32)

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": x})[0].astype(np.float64)

    def activate(z):
        if activation == "sigmoid":
            return 0.5 * (1 + np.tanh(z / 2))  # the sigmoid, without overflow
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    weights = rng.standard_normal((3, classes, C, 3, 3)).astype(np.float32)
    for scales in ((1.0, 2.0, 40.0), (40.0, 50.0, 60.0)):  # the last member saturates; all of them do
        members = [_conv_model(s * w, np.zeros(classes, np.float32)) for s, w in zip(scales, weights, strict=True)]
        joined = mean_of_members(members, activation, "image", "logits")
        onnx.checker.check_model(joined)
        logits = [run(m) for m in members]
        assert np.abs(logits[-1]).max() > 80
        out = run(joined)
        assert out.shape == logits[0].shape and np.isfinite(out).all()
        expected = np.mean([activate(z) for z in logits], axis=0)
        np.testing.assert_allclose(activate(out), expected, atol=1e-5)
    with pytest.raises(ValueError, match="one input 'input'"):
        mean_of_members(members, activation, "input", "logits")
