import pytest
import torch

import rwkvseg.layers.dualview as dualview
from rwkvseg.bench.complexity import count_macs, count_parameters
from rwkvseg.models import create_model
from rwkvseg.models.mmsegrwkv import RESFM_MODES, VARIANTS, MMSegRWKV


def _tiny(resfm: str = "modal", in_channels: int = 4, num_classes: int = 3, seed: int = 0) -> MMSegRWKV:
    torch.manual_seed(seed)
    return create_model("mmsegrwkv_test", in_channels, num_classes, resfm=resfm)


@pytest.fixture
def wkv_free_on_meta(monkeypatch):
    """MACs exclude the WKV; on the meta device it only has to return a tensor of v's shape."""
    real = dualview.bi_wkv_ordered

    def wkv(w, u, k, v, orders):
        return torch.empty(k.shape, dtype=v.dtype, device=v.device) if k.is_meta else real(w, u, k, v, orders)

    monkeypatch.setattr(dualview, "bi_wkv_ordered", wkv)


def test_forward_backward_on_the_issue_volume():
    model = _tiny()
    x = torch.randn(1, 4, 32, 48, 40)
    y = model(x)
    assert y.shape == (1, 3, 32, 48, 40)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every encoder stage and the ResFM embedding learn from this loss
    assert model.encoder.modal_fm.embed.weight.grad.abs().sum() > 0
    assert model.encoder.stages[3].blocks[0].spatial.decay.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("resfm", "in_channels", "size"),
    [("stage", 2, (33, 17, 21)), ("none", 1, (5, 7, 3))],
)
def test_odd_sizes_modalities_and_resfm_modes(resfm, in_channels, size):
    model = _tiny(resfm, in_channels, num_classes=2).eval()
    with torch.no_grad():
        y = model(torch.randn(1, in_channels, *size))
    assert y.shape == (1, 2, *size)
    assert torch.isfinite(y).all()


def test_padding_reaches_the_stride_and_a_two_voxel_bottleneck():
    model = _tiny()
    assert model.cfg.stride == 32
    assert model.padded_size((32, 48, 40)) == (32, 64, 64)
    assert model.padded_size((9, 13, 11)) == (32, 32, 64)  # a 1-voxel bottleneck breaks instance norm
    assert model.padded_size((64, 32, 32)) == (64, 32, 32)


def test_golden_output():
    """Seeded mmsegrwkv_test on a fixed input; numbers recorded from this implementation (float32, CPU)."""
    model = _tiny().eval()
    x = torch.randn(1, 4, 9, 13, 11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).double()
    torch.testing.assert_close(y.mean().item(), 1.103816067435393, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.std().item(), 3.789746699777025, rtol=1e-4, atol=1e-5)
    expected = torch.tensor(
        [[-4.169390678405762, -0.7732734084129333, 0.06301170587539673],
         [0.6313674449920654, 5.259239196777344, 1.5126068592071533],
         [0.23545372486114502, 1.7313640117645264, 0.2471984624862671]],
        dtype=torch.float64,
    )  # fmt: skip
    got = torch.stack([y[0, :, 4, 6, 5], y[0, :, 0, 0, 0], y[0, :, 8, 12, 10]])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_paper_configuration_parameters_and_macs(wkv_free_on_meta):
    with torch.device("meta"):
        model = create_model("mmsegrwkv", 4, 4, resfm="none")
    assert model.cfg.widths == (32, 64, 128, 256) and model.cfg.windows == (8, 8, 4, 4)
    assert model.cfg.depths == (2, 2, 2, 2) and model.cfg.decoder_hidden == 768
    assert abs(count_parameters(model) / 37e6 - 1) < 0.05
    macs = count_macs(model, (1, 4, 128, 128, 128))
    assert abs(macs / 410e9 - 1) < 0.05


def test_variants_and_modes_build_and_order_by_size():
    counts = {}
    for name in VARIANTS:
        for mode in RESFM_MODES:
            with torch.device("meta"):
                counts[name, mode] = count_parameters(create_model(name, 4, 4, resfm=mode))
    for mode in RESFM_MODES:
        assert counts["mmsegrwkv_test", mode] < counts["mmsegrwkv_lite", mode] < counts["mmsegrwkv", mode]
    assert counts["mmsegrwkv", "none"] < counts["mmsegrwkv", "stage"] < counts["mmsegrwkv", "modal"]


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown overrides"):
        create_model("mmsegrwkv_test", 4, 3, widht=(8,))
    with pytest.raises(ValueError, match="resfm"):
        create_model("mmsegrwkv_test", 4, 3, resfm="channels")
    with pytest.raises(ValueError, match="one entry per stage"):
        create_model("mmsegrwkv_test", 4, 3, windows=(2, 2))
    with pytest.raises(ValueError, match=r"\[B, 4, T, H, W\]"):
        _tiny()(torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match=r"drop_path = 1.0 must be in \[0, 1\)"):
        create_model("mmsegrwkv_test", 4, 3, drop_path=1.0)


def test_drop_path_rises_over_the_blocks_is_identity_in_eval_and_loads_the_same_weights():
    plain = _tiny()
    torch.manual_seed(0)
    dropped = create_model("mmsegrwkv_test", 4, 3, drop_path=0.3, depths=(1, 2, 1, 2))
    rates = [getattr(block.drop, "drop_prob", 0.0) for stage in dropped.encoder.stages for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.06, 0.12, 0.18, 0.24, 0.3])  # linear over the encoder's 6 blocks
    # no parameters of its own: the paper model's weights load into it, and in eval it computes the same
    dropped = create_model("mmsegrwkv_test", 4, 3, drop_path=0.3)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x), plain.eval()(x))
        reference = plain.train()(x)
    torch.manual_seed(1)
    trained = dropped.train()(x)
    assert not torch.allclose(trained, reference)  # in training it drops branches
    trained.square().mean().backward()
    assert dropped.encoder.stages[3].blocks[0].spatial.decay.grad is not None


def test_deep_supervision_adds_upsampled_heads_in_training_only_and_keeps_the_main_output():
    plain = _tiny()
    torch.manual_seed(0)
    supervised = create_model("mmsegrwkv_test", 4, 3, deep_supervision=2)
    extra = set(supervised.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("aux_heads.") for k in extra)  # only the two heads' parameters are new
    supervised.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 4, 20, 30, 50)  # padded to 32 x 32 x 64 inside: the heads are cropped back
    with torch.no_grad():
        main = plain.eval()(x)
        assert torch.equal(supervised.eval()(x), main)  # eval: the main logits alone
    outputs = supervised.train()(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3
    assert all(o.shape == (1, 3, 20, 30, 50) for o in outputs)
    torch.testing.assert_close(outputs[0], plain.train()(x))  # the heads do not change the main path
    # the 1/4 head: its 1x1x1 logits on the 1/4 decoder map, upsampled trilinearly to the padded size and cropped
    captured = {}
    supervised.dec2.register_forward_hook(lambda module, args, out: captured.setdefault("y4", out))
    outputs = supervised(x)
    expected = torch.nn.functional.interpolate(
        supervised.aux_heads[0](captured["y4"]), size=(32, 32, 64), mode="trilinear"
    )
    torch.testing.assert_close(outputs[1], expected[:, :, :20, :30, :50])
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in supervised.aux_heads.parameters())
    one = create_model("mmsegrwkv_test", 4, 3, deep_supervision=1)
    assert len(one.train()(x)) == 2 and len(one.aux_heads) == 1
    with pytest.raises(ValueError, match=r"deep_supervision = 3: 0 \(off, the paper's model\), 1 .* or 2"):
        create_model("mmsegrwkv_test", 4, 3, deep_supervision=3)


def test_stem_stride_two_runs_every_stage_twice_as_fine_with_the_paper_sizes_elsewhere():
    paper = _tiny()
    torch.manual_seed(0)
    fine = create_model("mmsegrwkv_test", 4, 3, stem_stride=2)
    assert (paper.cfg.stride, fine.cfg.stride) == (32, 16)
    assert fine.padded_size((32, 48, 40)) == (32, 48, 48)
    assert fine.padded_size((9, 13, 11)) == (16, 16, 32)  # a 1-voxel bottleneck still gets one more stride
    # the stem's k7 stride-2 convolution and LayerNorm as published; its k2 stride-2 patch convolution is 1x1x1;
    # the decoder's last up block upsamples x2; every other weight has the paper's shape
    shapes = {k: v.shape for k, v in fine.state_dict().items()}
    paper_shapes = {k: v.shape for k, v in paper.state_dict().items()}
    assert shapes.keys() == paper_shapes.keys()
    differ = {k for k in shapes if shapes[k] != paper_shapes[k]}
    assert differ == {"encoder.downsample.0.2.weight", "dec1.transp_conv.conv.weight"}
    assert shapes["encoder.downsample.0.2.weight"][2:] == (1, 1, 1)
    assert shapes["dec1.transp_conv.conv.weight"][2:] == (2, 2, 2)
    x = torch.randn(1, 4, 32, 48, 40)
    skips = fine.encoder(x)
    assert [s.shape[2:] for s in skips] == [(16, 24, 20), (8, 12, 10), (4, 6, 5), (2, 3, 2)]  # 1/2 ... 1/16
    y = fine(x)
    assert y.shape == (1, 3, 32, 48, 40) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert fine.encoder.downsample[0][2].weight.grad.abs().sum() > 0
    assert fine.encoder.stages[0].blocks[0].spatial.decay.grad.abs().sum() > 0
    supervised = create_model("mmsegrwkv_test", 4, 3, stem_stride=2, deep_supervision=2).train()
    assert all(o.shape == (1, 3, 20, 30, 50) for o in supervised(torch.randn(1, 4, 20, 30, 50)))
    with pytest.raises(ValueError, match=r"stem_stride = 8: 4 \(the paper's stem, stage 1 at 1/4\) or 2"):
        create_model("mmsegrwkv_test", 4, 3, stem_stride=8)


def test_half_res_width_adds_a_decoder_level_at_one_half_and_leaves_the_rest_of_the_model():
    paper = _tiny()
    assert paper.enc_half is None and paper.dec_half is None
    torch.manual_seed(0)
    model = create_model("mmsegrwkv_test", 4, 3, half_res_width=6)
    keys, paper_keys = set(model.state_dict()), set(paper.state_dict())
    # new: the stride-2 block on enc1's map and the 1/2 -> full up block; dec1 now ends at 1/2 with 6 channels
    assert {k.split(".")[0] for k in keys - paper_keys} == {"enc_half", "dec_half"}
    assert paper_keys <= keys
    changed = {k for k in paper_keys if model.state_dict()[k].shape != paper.state_dict()[k].shape}
    assert changed and all(k.startswith("dec1.") for k in changed)
    assert model.dec1.transp_conv.conv.weight.shape[1:] == (6, 2, 2, 2)  # [in 16, out 6, 2, 2, 2]: x2, not x4
    assert model.state_dict().keys() >= {"enc_half.layer.conv1.conv.weight", "dec_half.transp_conv.conv.weight"}
    seen = {}
    for name in ("enc_half", "dec1"):  # a hook that returns something would replace the output: return None
        getattr(model, name).register_forward_hook(lambda module, args, out, name=name: seen.update({name: out.shape}))
    x = torch.randn(1, 4, 20, 30, 50)  # padded to 32 x 32 x 64 inside
    y = model(x)
    assert y.shape == (1, 3, 20, 30, 50) and torch.isfinite(y).all()
    assert seen["enc_half"] == seen["dec1"] == (1, 6, 16, 16, 32)  # both at 1/2 of the padded grid
    y.square().mean().backward()
    for name in ("enc_half", "dec_half", "dec1", "enc1"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    supervised = create_model("mmsegrwkv_test", 4, 3, half_res_width=6, deep_supervision=2).train()
    assert [o.shape for o in supervised(x)] == [(1, 3, 20, 30, 50)] * 3
    with pytest.raises(ValueError, match=r"half_res_width = 6 needs stem_stride = 4: with stem_stride = 2"):
        create_model("mmsegrwkv_test", 4, 3, half_res_width=6, stem_stride=2)
    with pytest.raises(ValueError, match=r"half_res_width = -1: 0 \(off, the paper's decoder\)"):
        create_model("mmsegrwkv_test", 4, 3, half_res_width=-1)


def test_fine_heads_supervise_the_one_half_and_one_quarter_decoder_maps():
    torch.manual_seed(0)
    model = create_model("mmsegrwkv_test", 4, 3, half_res_width=6, deep_supervision=2, fine_heads=True).train()
    coarse = create_model("mmsegrwkv_test", 4, 3, half_res_width=6, deep_supervision=2)
    widths = [head.conv.conv.in_channels for head in model.aux_heads]
    assert widths == [6, model.cfg.widths[1]]  # the 1/2 map's half_res_width channels, then the 1/4 map's
    assert [head.conv.conv.in_channels for head in coarse.aux_heads] == list(model.cfg.widths[1:3])
    maps = {}
    model.dec1.register_forward_hook(lambda module, args, out: maps.update(half=out))
    model.dec2.register_forward_hook(lambda module, args, out: maps.update(quarter=out))
    x = torch.randn(1, 4, 20, 30, 50)  # padded to 32 x 32 x 64 inside
    outputs = model(x)
    assert [o.shape for o in outputs] == [(1, 3, 20, 30, 50)] * 3
    assert maps["half"].shape[2:] == (16, 16, 32) and maps["quarter"].shape[2:] == (8, 8, 16)
    for head, name, out in zip(model.aux_heads, ("half", "quarter"), outputs[1:], strict=True):
        expected = torch.nn.functional.interpolate(head(maps[name]), size=(32, 32, 64), mode="trilinear")
        torch.testing.assert_close(out, expected[:, :, :20, :30, :50])
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_heads.parameters())
    model.eval()
    assert model(x).shape == (1, 3, 20, 30, 50)  # inference: the main output alone
    for settings in ({"deep_supervision": 2}, {"half_res_width": 6}):
        with pytest.raises(ValueError, match=r"fine_heads puts the deep-supervision heads on the 1/2 decoder level"):
            create_model("mmsegrwkv_test", 4, 3, fine_heads=True, **settings)


def test_fast_norm_swaps_every_instance_norm_and_keeps_the_state_dict_keys():
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in _tiny().modules())
    torch.manual_seed(0)
    fast = create_model("mmsegrwkv_test", 4, 3, fast_norm=True)
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in fast.modules())
    assert fast.state_dict().keys() == _tiny().state_dict().keys()
