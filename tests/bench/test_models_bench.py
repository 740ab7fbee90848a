"""`bench models`: rows for every (model, mode, phase, batch, side), failures as notes, growth and the figure."""

import dataclasses
import inspect
import json
import math
import re

import pytest
import torch
from torch import nn

from rwkvseg import devices
from rwkvseg.bench import models as bench_models_module
from rwkvseg.bench.models import (
    PHASES,
    ModelBenchConfig,
    bench_models,
    failure_note,
    growth_rows,
    make_step,
    measure,
    models_of_dims,
    plot_growth,
)
from rwkvseg.cli import main
from rwkvseg.devices import cpu_has_native_bf16
from rwkvseg.models import create_model, list_models


def test_models_of_dims_splits_the_registry():
    two, three = models_of_dims(2, list_models(), create_model), models_of_dims(3, list_models(), create_model)
    assert {"urwkv", "urwkv_s", "unet", "cmunext"} <= set(two)
    assert {"mmsegrwkv", "segresnet", "dynunet", "swinunetr"} <= set(three)
    assert not set(two) & set(three)
    assert not any(name.endswith("_test") for name in two + three)


def test_rows_growth_and_figure(tmp_path):
    config = ModelBenchConfig(
        dims=2, models=("urwkv_test", "unet_test"), sides=(16, 32), modes=("eager",), repeats=1, warmup=0
    )
    seen = []
    rows = bench_models(config, create_model, on_row=seen.append)
    assert rows == seen
    # 2 models x (infer at batch 1 and 8 + train at batch 8) x 2 sides
    assert len(rows) == 2 * 3 * 2
    # side by side, every model at a side before the next: a run cut short compares every model where it got to
    assert [(r["side"], r["model"]) for r in rows] == [
        (s, m) for s in (16, 32) for m in config.models for _ in range(3)
    ]
    assert all(r["ms"] > 0 and r["peak_mb"] is None and r["compile_s"] is None for r in rows)
    assert {r["tokens"] for r in rows} == {16**2, 32**2}
    growth = growth_rows(rows)
    assert len(growth) == 2 * 3 and all(g["time_exponent"] is not None for g in growth)
    figure = tmp_path / "growth.png"
    plot_growth(rows, str(figure), "test")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_growth_gives_the_exponent_and_the_line_through_the_end_sides():
    def row(tokens, ms, mib):
        return {
            "model": "m",
            "mode": "compiled",
            "phase": "infer",
            "batch": 1,
            "tokens": tokens,
            "ms": ms,
            "peak_mb": mib,
        }

    # time 2 + 3 ms per million tokens; memory 40 MiB fixed + 100 MiB per million tokens; a middle side off the line
    rows = [row(10**6, 5.0, 140.0), row(2 * 10**6, 9.0, 500.0), row(4 * 10**6, 14.0, 440.0)]
    (g,) = growth_rows(rows)
    assert g["time_per_mtoken"] == pytest.approx(3.0) and g["time_fixed_ms"] == pytest.approx(2.0)
    assert g["memory_per_mtoken"] == pytest.approx(100.0) and g["memory_fixed_mib"] == pytest.approx(40.0)
    assert g["memory_exponent"] == pytest.approx(math.log(440 / 140) / math.log(4))  # below 1: the fixed 40 MiB
    (alone,) = growth_rows(rows[:1])  # one side: no growth to read
    assert alone["time_per_mtoken"] is None and alone["memory_fixed_mib"] is None and alone["time_exponent"] is None


def test_a_refused_size_is_a_row_with_a_note():
    config = ModelBenchConfig(
        dims=3,
        models=("unetr",),
        sides=(16,),
        modes=("eager",),
        phases=("infer",),
        repeats=1,
        overrides={"unetr": dict(img_size=32, hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8)},
    )
    (row,) = bench_models(config, create_model)
    assert "ms" not in row and row["note"].startswith("ValueError: unetr was built for inputs of exactly (32, 32, 32)")
    assert re.search(r" at rwkvseg/models/baselines\.py:\d+ in \w+$", row["note"])  # our file, from the package on


class _Asserts(nn.Module):
    """Fails as a compiled SwinUNETR did on the GPU: an assert with no message (raised, since pytest would give
    an assert statement in a test file a message)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[1] != 2:
            raise AssertionError
        return y


def test_a_failure_note_names_where_it_failed():
    config = ModelBenchConfig(
        dims=2, models=("asserts",), sides=(16,), infer_batches=(1,), modes=("eager",), phases=("infer",)
    )
    (row,) = bench_models(config, _Asserts)
    line = inspect.getsourcelines(_Asserts.forward)[1] + 3
    assert row["note"] == f"AssertionError at tests/bench/test_models_bench.py:{line} in forward"


def _raised(outer):
    """outer raised while torch.load reads a missing file (the innermost frame is then in torch's own code)."""
    try:
        torch.load("/absent/model.pt")
    except FileNotFoundError as err:
        try:
            outer(err)
        except Exception as raised:
            return raised
    raise AssertionError("torch.load read a missing file")


def test_a_failure_note_follows_the_cause_and_keeps_to_one_short_line():
    def wrap(err):  # as torch.compile's BackendCompilerFailed: the message on two lines, the inner traceback
        raise RuntimeError(f"backend='inductor' raised:\n{type(err).__name__}: {err}").with_traceback(
            err.__traceback__
        ) from None

    def cause(err):
        raise ValueError("weights missing") from err

    where = r" at torch/serialization\.py:\d+ in \w+"  # the innermost frame, named from its package on
    lost = r"\[Errno 2\] No such file or directory: '/absent/model.pt'"
    note = failure_note(_raised(wrap))
    assert re.fullmatch(rf"RuntimeError: backend='inductor' raised: FileNotFoundError: {lost}{where}", note)
    note = failure_note(_raised(cause))
    assert re.fullmatch(rf"ValueError: weights missing <- FileNotFoundError: {lost}{where}", note)
    long = failure_note(ValueError("size " * 100))
    assert long.startswith("ValueError: size size") and long.endswith("...") and len(long) < 200


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dims=4),
        dict(dims=2, modes=("fast",)),
        dict(dims=2, phases=()),
        dict(dims=2, repeats=0),
        dict(dims=2, memory_format="nhwc"),
        dict(dims=3, cpu_convs="mkl"),
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="bench models"):
        ModelBenchConfig(**kwargs)


class _Spy(nn.Module):
    """Records whether its input and its weight are channels-last when it runs and when it is compiled."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append(("input", x.is_contiguous(memory_format=torch.channels_last)))
        return self.conv(x)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_the_step_runs_model_and_input_in_the_memory_format_converted_before_compiling(
    monkeypatch, phase, compiled, memory_format
):
    def compile_(model, **settings):  # as torch.compile but without Inductor: what would be compiled, and when
        model.seen.append(("compiled", model.conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return model

    monkeypatch.setattr(torch, "compile", compile_)
    model = _Spy()
    config = ModelBenchConfig(dims=2, memory_format=memory_format)
    make_step(model, phase, (2, 3, 8, 8), config, compiled)()
    expected = [("compiled", memory_format == "channels_last")] if compiled else []
    assert model.seen == [*expected, ("input", memory_format == "channels_last")]


def test_command_prints_the_table_and_writes_json_and_figure(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "32"]
    argv += ["--modes", "eager", "--phases", "infer", "--repeats", "1", "--json", str(out), "--png", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "unet_test" in printed and "eager ms" in printed and "cost growth" in printed
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 * 2 and result["environment"]["threads"] == 2 and result["complete"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 2 and "pass --resume" in capsys.readouterr().err  # the file is not overwritten
    assert json.loads(out.read_text()) == result


def test_command_lists_the_failure_notes_under_the_table(monkeypatch, capsys):
    """A compile error's note is long: the table shows a reference, each distinct note follows the table once."""
    import rwkvseg.bench.models as bench

    def measure(model, phase, shape, config, compiled):
        if shape[-1] != 16:
            raise AssertionError
        return real(model, phase, shape, config, compiled)

    real = bench.measure
    monkeypatch.setattr(bench, "measure", measure)
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "24", "32"]
    assert main([*argv, "--modes", "eager", "--phases", "infer", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("eager ms") :].splitlines()[2:9]  # batch 1 and 8 at sides 16, 24, 32
    assert [row.split()[-1] for row in table[:6]] == ["-", "[1]", "[1]", "-", "[1]", "[1]"]
    line = inspect.getsourcelines(measure)[1] + 2
    assert table[6] == f"[1] eager: AssertionError at tests/bench/test_models_bench.py:{line} in measure"
    assert printed.count("[1] eager") == 1


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """The JSON is rewritten after every row; --resume measures only the rows it lacks (same settings, same
    machine) and ends with the table of all of them."""
    import rwkvseg.bench.models as bench

    out = tmp_path / "bench.json"
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "24", "32"]
    argv += ["--modes", "eager", "--phases", "infer", "--repeats", "1", "--json", str(out)]
    measured, real = [], bench.measure

    def measure(model, phase, shape, config, compiled):
        if len(measured) == 4:
            raise KeyboardInterrupt  # the device call ends mid-run
        measured.append(tuple(shape))
        return real(model, phase, shape, config, compiled)

    monkeypatch.setattr(bench, "measure", measure)
    assert main(argv) == 130
    partial = json.loads(out.read_text())
    assert len(partial["rows"]) == 4 and partial["complete"] is False
    measured.clear()
    monkeypatch.setattr(bench, "measure", real)
    bad = [*argv[:-2], "--no-amp", "--json", str(out), "--resume"]
    assert main([*argv[:8], "16", *argv[11:], "--resume"]) == 2
    assert "holds rows this run would not make" in capsys.readouterr().err
    assert main(bad) == 2 and "other settings or on another machine (amp" in capsys.readouterr().err
    monkeypatch.setattr(bench, "measure", lambda *a: measured.append(a[2]) or real(*a))
    assert main([*argv, "--resume"]) == 0
    assert "4 rows kept from" in capsys.readouterr().out
    assert measured == [(1, 3, 32, 32), (8, 3, 32, 32)]  # side 32, the rows it lacked (sides are measured in turn)
    result = json.loads(out.read_text())
    assert result["complete"] and result["rows"][:4] == partial["rows"] and len(result["rows"]) == 2 * 3
    assert main([*argv[:-2], "--resume"]) == 2 and "give --json FILE" in capsys.readouterr().err


def test_show_prints_the_table_and_draws_the_figure_of_a_file_measured_elsewhere(tmp_path, monkeypatch, capsys):
    """`bench show` renders an interrupted run's file as the run itself would have: the same table, growth and
    figure, without measuring anything and without writing to the file."""
    import rwkvseg.bench.models as bench

    out, png = tmp_path / "bench.json", tmp_path / "growth.png"
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "32"]
    argv += ["--modes", "eager", "--phases", "infer", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    finished = capsys.readouterr().out
    before = out.read_bytes()
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("show measured a row"))
    assert main(["bench", "show", str(out), "--png", str(png)]) == 0
    shown = capsys.readouterr().out
    assert shown[shown.index("    model  phase") :] == finished[finished.index("    model  phase") :]
    assert png.read_bytes()[:4] == b"\x89PNG" and out.read_bytes() == before
    doc = json.loads(before)
    doc.update(complete=False, rows=doc["rows"][:3])
    out.write_text(json.dumps(doc))
    assert main(["bench", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "an interrupted run: 3 rows measured" in shown and "unet_test  infer      8    32" not in shown


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{}", "is not a bench models JSON file"),
        ('{"rows": [], "environment": {}}', "no measured rows"),
        ('{"rows": [{"model": "m"}], "environment": {}}', "a row without mode, phase, batch, side, tokens"),
        ('{"rows": [3], "environment": {}}', "is not a bench models JSON file"),
    ],
)
def test_show_refuses_what_is_not_a_bench_file_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    assert main(["bench", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and err.count("\n") == 1


def test_show_does_not_draw_over_its_input_or_an_existing_figure_unless_asked(tmp_path, capsys):
    path, figure = tmp_path / "b.json", tmp_path / "b.png"
    row = {"model": "m", "mode": "eager", "phase": "infer", "batch": 1, "side": 16, "tokens": 256, "ms": 1.0}
    path.write_text(json.dumps({"environment": {}, "rows": [row], "complete": True}))
    before = path.read_bytes()
    for overwrite in ([], ["--overwrite"]):  # the input is never an output
        assert main(["bench", "show", str(path), "--png", str(path), *overwrite]) == 2
        assert "is the input file" in capsys.readouterr().err and path.read_bytes() == before
    figure.write_bytes(b"mine")
    assert main(["bench", "show", str(path), "--png", str(figure)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and figure.read_bytes() == b"mine"
    assert main(["bench", "show", str(path), "--png", str(figure), "--overwrite"]) == 0
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_models_refuses_an_existing_figure_before_measuring(tmp_path, monkeypatch, capsys):
    import rwkvseg.bench.models as bench

    figure = tmp_path / "b.png"
    figure.write_bytes(b"mine")
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured a row"))
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "--png", str(figure)]
    assert main(argv) == 2
    assert "exists; choose a new file" in capsys.readouterr().err and figure.read_bytes() == b"mine"


def test_command_runs_in_the_memory_format_and_resumes_only_in_it(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "--modes", "eager"]
    argv += ["--repeats", "1", "--threads", "1", "--json", str(out)]
    assert main([*argv, "--memory-format", "channels_last"]) == 0
    printed = capsys.readouterr().out
    assert "memory_format=channels_last" in printed.splitlines()[0]  # the settings line
    assert "parameters and inputs in channels_last memory format\n    model  phase" in printed  # above the table
    result = json.loads(out.read_text())
    assert result["environment"]["memory_format"] == "channels_last" and result["complete"]
    assert [(r["phase"], r["batch"]) for r in result["rows"]] == [("infer", 1), ("infer", 8), ("train", 8)]
    assert all(r["memory_format"] == "channels_last" and r["ms"] > 0 for r in result["rows"])
    assert main([*argv, "--resume"]) == 2  # contiguous, the default: not to be mixed into that file
    err = capsys.readouterr().err
    assert "other settings or on another machine (memory_format: ['channels_last'] there, ['contiguous'] here)" in err
    assert err.count("\n") == 1 and json.loads(out.read_text()) == result
    # a file written before the option existed (no memory_format anywhere) measured contiguous maps: it resumes so
    contiguous = tmp_path / "old.json"
    assert main([*argv[:-1], str(contiguous)]) == 0
    old = json.loads(contiguous.read_text())
    del old["environment"]["memory_format"]
    old["rows"] = [{k: v for k, v in r.items() if k != "memory_format"} for r in old["rows"][:1]]
    contiguous.write_text(json.dumps({**old, "complete": False}))
    assert main([*argv[:-1], str(contiguous), "--resume"]) == 0
    assert "1 rows kept from" in capsys.readouterr().out


def test_command_refuses_unknown_models_and_bad_overrides():
    assert main(["bench", "models", "2", "--device", "cpu", "--models", "nope"]) == 2
    assert main(["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--override", "x"]) == 2


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_freeze_compiles_only_the_inference_rows_frozen_in_the_same_mode(monkeypatch, phase, compile_mode):
    settings_seen = []

    def compile_(model, **settings):
        settings_seen.append(settings)
        return model

    monkeypatch.setattr(torch, "compile", compile_)
    config = ModelBenchConfig(dims=2, compile_mode=compile_mode, freeze=True)
    make_step(_Spy(), phase, (2, 3, 8, 8), config, compiled=True)()
    (settings,) = settings_seen
    assert "mode" not in settings  # torch.compile takes a mode or options: the mode's own options, plus freezing
    if phase == "infer":
        assert settings["options"] == {**torch._inductor.list_mode_options(compile_mode), "freezing": True}
    else:
        assert settings["options"] == torch._inductor.list_mode_options(compile_mode)


@pytest.mark.parametrize("conv_layouts", ["inductor", "eager"])
def test_conv_layouts_eager_adds_the_layout_pass_to_every_compiled_row(monkeypatch, conv_layouts):
    from rwkvseg.inductor_passes import KeepChannelsLast3d

    settings_seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **settings: settings_seen.append(settings) or model)
    config = ModelBenchConfig(dims=2, compile_mode="reduce-overhead", conv_layouts=conv_layouts)
    for phase in PHASES:
        make_step(_Spy(), phase, (2, 3, 8, 8), config, compiled=True)()
    for settings in settings_seen:
        layout_pass = settings["options"].get("post_grad_custom_post_pass")
        assert isinstance(layout_pass, KeepChannelsLast3d) == (conv_layouts == "eager")
        assert settings["options"]["triton.cudagraphs"]  # the mode's own options stay
    with pytest.raises(ValueError, match="conv layouts"):
        ModelBenchConfig(dims=3, conv_layouts="cudnn")


def test_inductor_settings_reach_every_compiled_row_after_the_modes_own(monkeypatch):
    settings_seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **settings: settings_seen.append(settings) or model)
    extra = {"reorder_for_peak_memory": False, "triton.cudagraphs": False}
    config = ModelBenchConfig(dims=2, compile_mode="reduce-overhead", inductor=extra)
    for phase in PHASES:
        make_step(_Spy(), phase, (2, 3, 8, 8), config, compiled=True)()
    assert len(settings_seen) == len(PHASES)
    for settings in settings_seen:  # the mode turns CUDA graphs on; the extra option, applied last, wins
        assert settings["options"] == {**torch._inductor.list_mode_options("reduce-overhead"), **extra}


def test_an_unknown_inductor_option_fails_before_any_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "--json", str(out)]
    assert main([*argv, "--inductor", "reorder_for_peak_memroy=false"]) == 2
    err = capsys.readouterr().err
    assert "no setting 'reorder_for_peak_memroy'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_frozen_inference_matches_eager():
    # a real Inductor compile on the CPU of a convolution, an inference BatchNorm (what freezing folds) and a GELU
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        expected = model(x)
    config = ModelBenchConfig(dims=2, freeze=True, amp=False)
    torch._dynamo.reset()
    torch.manual_seed(1)  # make_step draws its input first: the same x
    try:
        got = make_step(model, "infer", x.shape, config, compiled=True)()
    finally:
        torch._dynamo.reset()
    assert got.shape == expected.shape and not torch.equal(got, torch.zeros_like(got))
    assert torch.allclose(got, expected, atol=1e-5)


def test_frozen_inference_holds_the_weights_as_graph_constants():
    # what freezing is: the weights become constants of the compiled graph, so a weight changed after the first
    # call leaves the frozen graph's output as it was, where the graph compiled without freezing reads the new
    # weight (torch.compile's options={"freezing": True} alone left them graph inputs: nothing was frozen)
    unchanged = {}
    for freeze in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU()).eval()
        config = ModelBenchConfig(dims=2, freeze=freeze, amp=False)
        torch._dynamo.reset()
        try:
            step = make_step(model, "infer", (1, 3, 8, 8), config, compiled=True)
            before = step().clone()
            with torch.no_grad():
                model[0].weight.mul_(2)
            unchanged[freeze] = torch.equal(step(), before)
        finally:
            torch._dynamo.reset()
    assert unchanged == {False: False, True: True}


def test_compiled_rows_get_a_static_graph_per_shape(monkeypatch):
    # torch's own default (dynamic=None) would compile the second shape with symbolic sizes and reuse that graph
    # for the third: the rows after a model's first would not run what training and prediction compile
    from torch._dynamo.testing import CompileCounter

    counter, original = CompileCounter(), torch.compile

    def compile_(model, **settings):
        assert settings["dynamic"] is False
        return original(model, backend=counter, dynamic=settings["dynamic"], fullgraph=settings["fullgraph"])

    monkeypatch.setattr(torch, "compile", compile_)
    model, config = _Spy(), ModelBenchConfig(dims=2, amp=False)
    torch._dynamo.reset()
    try:
        for batch in (1, 2, 3):
            make_step(model, "infer", (batch, 3, 8, 8), config, compiled=True)()
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 3


def _eager_run(tmp_path):
    """A complete eager run of unet_test's two inference rows into tmp_path/bench.json: (the file, the command
    without --modes, the file's content)."""
    out = tmp_path / "bench.json"
    argv = ["bench", "models", "2", "--device", "cpu", "--models", "unet_test", "--sides", "16", "--phases", "infer"]
    argv += ["--repeats", "1", "--threads", "1", "--json", str(out)]
    assert main([*argv, "--modes", "eager"]) == 0
    return out, argv, json.loads(out.read_text())


def test_a_file_of_eager_rows_resumes_whatever_the_compile_settings(tmp_path, capsys):
    out, argv, doc = _eager_run(tmp_path)
    # as an interrupted file written before the static-graph default: dynamic left to torch, another compile mode
    doc["environment"].update(dynamic=None, compile_mode="reduce-overhead")
    doc["rows"], doc["complete"] = doc["rows"][:1], False
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main([*argv, "--modes", "eager", "--resume"]) == 0
    assert "1 rows kept from" in capsys.readouterr().out
    assert json.loads(out.read_text())["environment"]["dynamic"] is False  # the file now says how it goes on
    # a compiled row is another matter: it was measured with those settings
    doc["rows"] = [{**doc["rows"][0], "mode": "compiled"}]
    out.write_text(json.dumps(doc))
    assert main([*argv, "--modes", "compiled", "--resume"]) == 2
    assert "compile_mode, dynamic" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "default", "option", "message"),
    [
        ("conv_layouts", "inductor", ["--conv-layouts", "eager"], "(conv_layouts: ['inductor'] there, ['eager'] here)"),
        (
            "inductor",
            {},
            ["--inductor", "reorder_for_peak_memory=false"],
            "(inductor: [{}] there, [{'reorder_for_peak_memory': False}] here)",
        ),
    ],
)
def test_a_file_from_before_a_compile_option_resumes_only_with_its_default(
    key, default, option, message, tmp_path, capsys
):
    # compiled rows measured before the option existed ran with what is now its default (Inductor's layouts, no
    # other Inductor option): they resume under that setting only (the rows are made compiled by hand here: every
    # one is kept, so nothing compiles)
    out, argv, old = _eager_run(tmp_path)
    assert old["environment"][key] == default  # the default, recorded
    del old["environment"][key]
    old["rows"] = [{**r, "mode": "compiled"} for r in old["rows"]]
    out.write_text(json.dumps({**old, "complete": False}))
    capsys.readouterr()
    assert main([*argv, "--modes", "compiled", *option, "--resume"]) == 2
    assert message in capsys.readouterr().err
    assert main([*argv, "--modes", "compiled", "--resume"]) == 0
    assert "2 rows kept from" in capsys.readouterr().out


def test_cudnn_benchmark_is_on_while_the_rows_run_and_restored_after(monkeypatch):
    seen = []

    def spy_measure(model, phase, shape, config, compiled):
        seen.append(torch.backends.cudnn.benchmark)
        return {"ms": 1.0, "min_ms": 1.0, "first_ms": 1.0, "compile_s": None, "peak_mb": None}

    monkeypatch.setattr(bench_models_module, "measure", spy_measure)
    before = torch.backends.cudnn.benchmark
    for on in (True, False):
        config = ModelBenchConfig(dims=2, models=("unet_test",), sides=(16,), modes=("eager",), phases=("infer",))
        bench_models(dataclasses.replace(config, cudnn_benchmark=on), create_model)
        assert seen[-1] is on and torch.backends.cudnn.benchmark is before


def test_a_file_from_before_cudnn_benchmark_resumes_only_with_the_heuristics(tmp_path, capsys):
    out, argv, old = _eager_run(tmp_path)
    assert old["environment"]["cudnn_benchmark"] is False  # the default, recorded
    del old["environment"]["cudnn_benchmark"]
    old["rows"] = old["rows"][:1]
    out.write_text(json.dumps({**old, "complete": False}))
    capsys.readouterr()
    assert main([*argv, "--modes", "eager", "--cudnn-benchmark", "--resume"]) == 2  # eager rows depend on it too
    assert "(cudnn_benchmark: [False] there, [True] here)" in capsys.readouterr().err
    assert main([*argv, "--modes", "eager", "--resume"]) == 0
    assert "1 rows kept from" in capsys.readouterr().out


def test_a_compile_failure_is_not_tried_again_at_the_larger_sides(monkeypatch):
    """Compiling a row can cost minutes on the GPU: once a compiled row fails where its eager twin ran, the later
    sides of that (model, phase, batch) are rows with a note, not new attempts; a size the model refuses in both
    modes and out of memory do not stop the later sides."""
    tried = []

    def measure(model, phase, shape, config, compiled):
        tried.append((compiled, phase, shape[0], shape[-1]))
        if compiled and phase == "infer" and shape[0] == 1:
            raise AssertionError  # as SwinUNETR under CUDA graphs
        if compiled and phase == "train" and shape[-1] == 16:
            raise torch.OutOfMemoryError
        if shape[-1] == 24 and phase == "train":
            raise ValueError("refused size")  # in both modes
        return {"ms": 1.0, "peak_mb": None, "compile_s": 0.0 if compiled else None}

    monkeypatch.setattr(bench_models_module, "measure", measure)
    config = ModelBenchConfig(dims=2, models=("unet_test",), sides=(16, 24, 32), repeats=1)
    rows = {(r["mode"], r["phase"], r["batch"], r["side"]): r for r in bench_models(config, create_model)}
    compiled_infer_1 = [rows[("compiled", "infer", 1, side)] for side in (16, 24, 32)]
    assert compiled_infer_1[0]["note"].startswith("AssertionError")
    assert [r["note"] for r in compiled_infer_1[1:]] == [
        "not measured: compiling it failed at side 16 (that row's note)"
    ] * 2
    assert [t for t in tried if t[:3] == (True, "infer", 1)] == [(True, "infer", 1, 16)]
    assert "ms" in rows[("compiled", "infer", 8, 24)]  # another batch is its own graph
    assert rows[("compiled", "train", 8, 16)]["note"] == "out of memory" and "ms" in rows[("compiled", "train", 8, 32)]
    assert (
        rows[("compiled", "train", 8, 24)]["note"].startswith("ValueError") and "ms" in rows[("eager", "train", 8, 32)]
    )


@pytest.mark.parametrize("cpu_convs", ["onednn", "stock"])
def test_cpu_rows_run_the_3d_convolutions_through_onednn_unless_stock(monkeypatch, cpu_convs):
    """Every model alike: the baselines' plain 3-D convolutions become OneDnnConv3d as ours do (rwkvseg.cpu_convs),
    so the CPU rows compare the models, not PyTorch's backend choice."""
    from rwkvseg.cpu_convs import OneDnnConv3d

    kinds = {}

    def measure(model, phase, shape, config, compiled):
        kinds[type(model).__name__] = {type(m) for m in model.modules() if isinstance(m, nn.Conv3d)}
        return {"ms": 1.0}

    monkeypatch.setattr(bench_models_module, "measure", measure)
    config = ModelBenchConfig(dims=3, models=("segresnet", "mmsegrwkv_test"), sides=(16,), modes=("eager",))
    bench_models(dataclasses.replace(config, phases=("infer",), cpu_convs=cpu_convs), create_model)
    expected = {OneDnnConv3d} if cpu_convs == "onednn" else {nn.Conv3d}
    assert kinds == {"MonaiBaseline": expected, "MMSegRWKV": expected}  # SegResNet in its wrapper


def test_a_cpu_file_from_before_cpu_convs_resumes_only_with_the_stock_convolutions(tmp_path, capsys):
    out, argv, old = _eager_run(tmp_path)
    assert old["environment"]["cpu_convs"] == "onednn"  # the default, recorded for a CPU run
    del old["environment"]["cpu_convs"]
    old["rows"] = old["rows"][:1]
    out.write_text(json.dumps({**old, "complete": False}))
    capsys.readouterr()
    assert main([*argv, "--modes", "eager", "--resume"]) == 2
    assert "(cpu_convs: ['stock'] there, ['onednn'] here)" in capsys.readouterr().err
    assert main([*argv, "--modes", "eager", "--cpu-convs", "stock", "--resume"]) == 0
    assert "1 rows kept from" in capsys.readouterr().out


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_cpu_bf16_rows_run_under_bf16_autocast_and_resume_only_so(tmp_path, capsys, monkeypatch):
    """--cpu-bf16: the CPU rows run as `rwkvseg predict --precision bf16` does; the setting is recorded, a float32
    file (also one from before the option) does not take bf16 rows, and a CPU without native bf16 is refused."""
    config = ModelBenchConfig(dims=2, models=("unet_test",), sides=(16,), modes=("eager",), phases=("infer",))
    model = create_model("unet_test", 3, 1)
    for cpu_bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        step = make_step(model, "infer", (1, 3, 16, 16), dataclasses.replace(config, cpu_bf16=cpu_bf16), False)
        assert step().dtype == dtype
    out, argv, old = _eager_run(tmp_path)
    assert old["environment"]["cpu_bf16"] is False  # recorded for a CPU run
    del old["environment"]["cpu_bf16"]  # a CPU file from before the option measured float32
    old["rows"], old["complete"] = old["rows"][:1], False
    out.write_text(json.dumps(old))
    capsys.readouterr()
    assert main([*argv, "--modes", "eager", "--cpu-bf16", "--resume"]) == 2
    assert "(cpu_bf16: [False] there, [True] here)" in capsys.readouterr().err
    assert main([*argv, "--modes", "eager", "--resume"]) == 0
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="--cpu-bf16: this CPU has no native bfloat16"):
        dataclasses.replace(config, cpu_bf16=True)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_weight_rows_run_a_copy_with_the_same_outputs_and_resume_only_so(tmp_path, capsys):
    """--bf16-weights: an inference row runs a copy of the model whose convolution and linear weights are bfloat16,
    with the outputs of autocast's casts of the float32 weights; the model itself (which later rows and the training
    rows reuse) keeps float32 weights; the setting is recorded and a file without it does not take such rows; rows
    that run in float32 refuse it."""
    config = ModelBenchConfig(dims=2, models=("urwkv_test",), sides=(16,), modes=("eager",), cpu_bf16=True)
    torch.manual_seed(0)
    model = create_model("urwkv_test", 3, 1).eval()
    x_seed = torch.random.get_rng_state()
    casts = make_step(model, "infer", (1, 3, 16, 16), config, False)
    torch.random.set_rng_state(x_seed)  # the same random input for the second step
    held = make_step(model, "infer", (1, 3, 16, 16), dataclasses.replace(config, bf16_weights=True), False)
    assert torch.equal(casts(), held())
    (copy,) = [c.cell_contents for c in held.__closure__ if isinstance(c.cell_contents, nn.Module)]
    assert copy is not model and copy.head.weight.dtype == torch.bfloat16  # the step's model: held in bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out, argv, old = _eager_run(tmp_path)
    old["rows"], old["complete"] = old["rows"][:1], False
    old["environment"]["cpu_bf16"] = True
    del old["environment"]["bf16_weights"]  # a file from before the option: autocast cast float32 weights
    out.write_text(json.dumps(old))
    capsys.readouterr()
    assert main([*argv, "--modes", "eager", "--cpu-bf16", "--bf16-weights", "--resume"]) == 2
    assert "(bf16_weights: [False] there, [True] here)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--bf16-weights: these rows run in float32"):
        dataclasses.replace(config, cpu_bf16=False, bf16_weights=True)


class _ConvLinear(nn.Module):
    """A convolution, a linear layer over the channels (cuBLAS: a workspace per handle and stream) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mix, self.head = nn.Conv2d(3, 64, 3, padding=1), nn.Linear(64, 64), nn.Conv2d(64, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # [B, 64, H, W]
        y = self.mix(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels mixed by a matmul: [B, 64, H, W]
        return self.head(y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
def test_a_rows_peak_memory_does_not_depend_on_the_rows_before_it():
    """The first compiled (CUDA-graph) row of a model peaks as high after the model's eager training row, whose
    matmuls leave cuBLAS workspaces behind on two threads, as in a process of compiled rows alone (bench.models.settle
    frees them before each row's baseline; without it the capture freed them inside the row). The second compile
    finds Inductor's caches warm: on an H100 (session 30) the cold first row peaked 50 MiB higher (98 vs 48 MiB)
    while the peak still counted the first call, where Triton's autotuner benchmarks kernels on copies of the
    buffers they write; the steady calls' peak leaves that out."""
    torch.manual_seed(0)
    model = _ConvLinear().cuda()
    config = ModelBenchConfig(dims=2, device="cuda", compile_mode="reduce-overhead", warmup=2, repeats=3)
    shape = (1, 3, 256, 256)
    alone = measure(model, "infer", shape, config, compiled=True)["peak_mb"]
    torch._dynamo.reset()
    measure(model, "train", (8, 3, 256, 256), config, compiled=False)
    after_eager = measure(model, "infer", shape, config, compiled=True)["peak_mb"]
    torch._dynamo.reset()
    assert alone > 8  # the row's activations: 64 channels of 256^2 in bf16 are 8 MiB each
    assert after_eager == pytest.approx(alone, abs=2.0)


def test_a_cuda_file_from_before_the_settled_baseline_does_not_resume(tmp_path, monkeypatch, capsys):
    """CUDA rows measured before bench.models.settle read their memory baseline as earlier rows had left it, and
    those of session 29 counted the first call's peak: a resume would mix ways of reading peaks in one table (the
    check runs before any CUDA call, so a CPU can test it)."""
    from rwkvseg.bench import wkv

    out, _, doc = _eager_run(tmp_path)
    gpu = {"torch": torch.__version__, "device": "cuda", "device_name": "a GPU"}
    monkeypatch.setattr(wkv, "environment", lambda device: dict(gpu))
    settings = dict(compile_mode="default", amp=True, fullgraph=False, dynamic=False, repeats=1, overrides={})
    settings.update(memory_format="contiguous", freeze=False, conv_layouts="inductor", cudnn_benchmark=False)
    doc["environment"], doc["rows"], doc["complete"] = {**gpu, **settings}, doc["rows"][:1], False
    out.write_text(json.dumps(doc))
    argv = ["bench", "models", "2", "--device", "cuda", "--models", "unet_test", "--sides", "16", "--phases", "infer"]
    argv += ["--repeats", "1", "--json", str(out)]
    capsys.readouterr()
    assert main([*argv, "--modes", "eager", "--resume"]) == 2
    assert "(memory_baseline: ['as left'] there, ['settled, steady calls'] here)" in capsys.readouterr().err
    doc["environment"]["memory_baseline"] = "settled"  # session 29's: settled, but the first call's peak counted
    out.write_text(json.dumps(doc))
    assert main([*argv, "--modes", "eager", "--resume"]) == 2
    assert "(memory_baseline: ['settled'] there, ['settled, steady calls'] here)" in capsys.readouterr().err
    doc["environment"]["memory_baseline"] = "settled, steady calls"  # measured since: kept, the run goes on
    out.write_text(json.dumps(doc))
    assert main([*argv, "--modes", "eager", "--resume"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


class _TunesOnce(nn.Module):
    """A convolution whose first call also allocates 64 MiB for a moment, as a compile-time autotuner does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.tuned = nn.Conv2d(3, 8, 3, padding=1), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tuned:
            scratch = torch.empty(64 * 2**20, dtype=torch.uint8, device=x.device)
            del scratch
            self.tuned = True
        return self.conv(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
def test_the_first_calls_transient_memory_is_kept_apart_from_the_rows_peak():
    """peak_mb is the steady calls' peak; first_peak_mb holds the first call's, here 64 MiB of scratch higher."""
    model = _TunesOnce().cuda()
    config = ModelBenchConfig(dims=2, device="cuda", warmup=1, repeats=2)
    row = measure(model, "infer", (1, 3, 64, 64), config, compiled=False)
    assert row["peak_mb"] < 4  # the output and cuDNN's workspace: 8 x 64^2 bf16 is 64 KiB
    assert row["first_peak_mb"] >= 64


def test_a_training_step_sums_the_outputs_of_a_model_with_deep_supervision():
    torch.manual_seed(0)
    model = create_model("mmsegrwkv_test", 4, 3, deep_supervision=2)
    step = make_step(model, "train", (1, 4, 20, 30, 50), ModelBenchConfig(dims=3), False)
    before = {n: p.detach().clone() for n, p in model.aux_heads.named_parameters()}
    step()
    assert all(not torch.equal(p, before[n]) for n, p in model.aux_heads.named_parameters())  # the heads trained
