"""rwkvseg.cli.bench_row: the arguments and checks shared by the scripts that explain one bench row."""

import argparse

import pytest

from rwkvseg.cli.bench_row import add_row_arguments, bench_row


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="row")
    add_row_arguments(parser, out_help="a new folder")
    return parser


def test_inductor_options_reach_the_rows_config_and_its_title(tmp_path):
    parser = _parser()
    argv = ["unet_test", "--out", str(tmp_path / "o"), "--device", "cpu", "--side", "16"]
    plain = bench_row(parser.parse_args(argv), parser)
    assert plain.config.inductor == {}
    assert "Inductor options" not in plain.title(parser.parse_args(argv))
    args = parser.parse_args([*argv, "--inductor", "reorder_for_peak_memory=false", "--inductor", "max_fusion_size=8"])
    row = bench_row(args, parser)
    assert row.config.inductor == {"reorder_for_peak_memory": False, "max_fusion_size": 8}
    assert row.title(args).endswith("Inductor options {'reorder_for_peak_memory': False, 'max_fusion_size': 8}")
    assert row.shape == (1, 3, 16, 16) and row.dims == 2


def test_an_unknown_inductor_option_is_a_usage_error(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["unet_test", "--out", str(tmp_path), "--device", "cpu", "--inductor", "no_such=1"])
    with pytest.raises(SystemExit) as exit_info:
        bench_row(args, parser)
    assert exit_info.value.code == 2 and "no setting 'no_such'" in capsys.readouterr().err
