"""scripts/triton_variants.py: the Triton Bi-WKV variants a model's eager calls need, counted with recording
stand-ins for the kernels (no GPU), and the kernels restored after."""

import json

import pytest

from rwkvseg.ops.bi_wkv import triton as bi_wkv_triton
from writers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("triton_variants")


def test_specialization_is_what_triton_tells_variants_apart_by(script):
    assert script.specialization(1) == ("int", True, False)
    assert script.specialization(48) == ("int", False, True)
    assert script.specialization(50) == ("int", False, False)
    assert script.specialization((1, 32)) == (("int", True, False), ("int", False, True))
    assert script.specialization(True) is True and script.specialization(None) is None


def test_counts_new_variants_per_shape_and_restores_the_kernels(script, tmp_path, capsys):
    kernels = {name: getattr(bi_wkv_triton, name) for name in bi_wkv_triton.KERNELS}
    out = tmp_path / "v.json"
    assert script.main(["mmsegrwkv_test", "32:1:infer", "32:1:infer", "32:2:train", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    first, again, train = result["steps"]
    assert first["new"] > 0 and again["new"] == 0  # the same shape twice: nothing new to compile
    assert train["per_kernel"]["_bwd_output_kernel"] > 0  # training adds the backward's variants
    assert sum(k["variants"] for k in result["kernels"].values()) == first["new"] + train["new"]
    assert "variants in all" in capsys.readouterr().out
    assert {name: getattr(bi_wkv_triton, name) for name in bi_wkv_triton.KERNELS} == kernels


def test_unspecialized_arguments_leave_fewer_variants(script, tmp_path):
    """--unspecialized counts what a do_not_specialize change would leave: never more variants, and none of them
    told apart by the named arguments."""
    shapes = [script.parse_shape(s) for s in ("32:1:infer", "48:1:infer", "32:2:train")]
    plain = script.count("mmsegrwkv_test", shapes, {})
    fewer = script.count("mmsegrwkv_test", shapes, {}, frozenset({"dims", "orders", "NCB", "n"}))
    assert sum(k["variants"] for k in fewer["kernels"].values()) < sum(k["variants"] for k in plain["kernels"].values())
    assert not any({"dims", "orders"} & set(k["differ_in"]) for k in fewer["kernels"].values())
    assert fewer["unspecialized"] == ["NCB", "dims", "n", "orders"]
    with pytest.raises(ValueError, match="--unspecialized nope: no such kernel parameter"):
        script.count("mmsegrwkv_test", shapes[:1], {}, frozenset({"nope"}))


def test_bad_arguments_are_refused_in_one_line(script, tmp_path, capsys):
    bad = [["nope", "32:1:infer"], ["mmsegrwkv_test", "32:1"], ["mmsegrwkv_test", "32:1:eval"]]
    for argv in [*bad, ["mmsegrwkv_test", "32:1:infer", "--set", "nope=1"]]:
        with pytest.raises(SystemExit) as stop:
            script.main(argv)
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "must be SIDE:BATCH:PHASE" in err and "PHASE is infer or train" in err
    assert "--set: mmsegrwkv_test: unknown overrides ['nope']" in err
    taken = tmp_path / "taken.json"
    taken.write_text("mine")
    with pytest.raises(SystemExit):
        script.main(["mmsegrwkv_test", "32:1:infer", "--json", str(taken)])
    assert taken.read_text() == "mine"
