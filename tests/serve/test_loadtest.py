import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install rwkvseg[serve])")
from serve_support import png, running_server, square_image, write_case

from rwkvseg.serve import ServeConfig, create_app
from rwkvseg.serve.loadtest import LoadTestConfig, malformed_burst, malformed_requests, markdown, run_load_test


def test_load_test_measures_levels_and_survives_a_malformed_burst(test_models, tmp_path):
    (tmp_path / "a.png").write_bytes(png(square_image()))
    case, _ = write_case(tmp_path / "case")
    app = create_app(
        ServeConfig(models=(f"bright={test_models['bright']}", f"ball={test_models['ball']}"), max_unpacked_bytes=2**20)
    )
    with running_server(app) as url:
        config = LoadTestConfig(
            images=(tmp_path / "a.png",),
            model_2d="bright",
            case=tuple(case),
            model_3d="ball",
            concurrency=(1, 3),
            concurrency_3d=(1,),
            requests=9,
            requests_3d=2,
            seconds=30,
            malformed=13,
            zip_bomb_mib=2,
            warmup=2,
            url=url,
        )
        report = run_load_test(config, log_path=tmp_path / "log")
        burst = malformed_burst(url, malformed_requests("bright", "ball", png(square_image()), bomb_mib=2), 10)
    levels = [(lv["kind"], lv["clients"], lv["requests"], lv["errors"]) for lv in report["levels"]]
    assert levels == [("2D", 1, 9, 0), ("2D", 3, 9, 0), ("2D after burst", 1, 20, 0), ("3D", 1, 2, 0)]
    assert all(lv["p99_ms"] >= lv["p50_ms"] > 0 and lv["throughput_rps"] > 0 for lv in report["levels"])
    assert report["malformed"] == {"4xx": 13, "other": 0} and report["ready_after_burst"]
    assert burst == {"4xx": 10, "other": 0}
    text = markdown(report)
    assert "| 2D | 3 | 9 | 0 |" in text
    # a service given by --url was started elsewhere: no claim about its runtime, threads or memory
    assert f"the service at {url} (started elsewhere" in text and "RSS: not measured" in text
    assert "service runtime torch" not in text


def test_load_test_stays_on_this_machine():
    with pytest.raises(ValueError, match="only targets this machine"):
        LoadTestConfig(images=(), model_2d=None, url="http://example.org:8000")


def test_missing_or_empty_inputs_are_one_line_each(tmp_path, capsys):
    from rwkvseg.serve.loadtest import main

    for argv, message in (
        (["--images", str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'} does not exist"),
        (["--images", str(tmp_path)], f"{tmp_path} holds no .png/.jpg/.jpeg files"),
        (["--case", str(tmp_path / "t1.nii.gz")], f"--case {tmp_path / 't1.nii.gz'}: no such file"),
    ):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--url", "http://127.0.0.1:9"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
