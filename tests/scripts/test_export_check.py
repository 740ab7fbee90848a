"""scripts/export_check.py: its arguments, and an exit status that says whether every source was checked."""

from __future__ import annotations

import pytest

from writers import load_script


def test_help_and_missing_arguments_write_nothing(tmp_path, monkeypatch, capsys):
    """`--help` prints the usage (it was once taken for the output folder and created `--help/`); no folder is an
    argparse error."""
    monkeypatch.chdir(tmp_path)
    script = load_script("export_check")
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0 and "SOURCE" in capsys.readouterr().out.upper()
    with pytest.raises(SystemExit) as done:
        script.main([])
    assert done.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_a_file_as_the_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(SystemExit) as done:
        load_script("export_check").main([str(tmp_path / "out"), "urwkv_s"])
    assert done.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "mine"


def test_a_failed_source_makes_the_exit_status_1(tmp_path, capsys):
    """A source that cannot be loaded gets its FAILED row, the others still run, and the status is 1, not 0."""
    code = load_script("export_check").main([str(tmp_path / "onnx"), "no-such-model"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "| no-such-model | FAILED" in out and "1 of 1 failed: no-such-model" in err
