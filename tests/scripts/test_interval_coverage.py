"""scripts/interval_coverage.py: how often `rwkvseg compare`'s intervals hold a known difference."""

import json

import pytest

from writers import load_script


def test_a_small_run_counts_coverage_per_scenario_and_writes_its_settings(tmp_path, capsys):
    script = load_script("interval_coverage")
    out = tmp_path / "coverage.json"
    argv = ["--draws", "60", "--resamples", "200", "--groups", "5", "--cases", "18", "--json", str(out)]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "5 groups of 10-25 cases" in printed and "18 cases, failures" in printed
    record = json.loads(out.read_text())
    assert record["settings"]["draws"] == 60 and record["settings"]["groups"] == [5]
    rows = {r["scenario"]: r for r in record["rows"]}
    assert list(rows) == ["5 groups of 10-25 cases", "18 cases, heavy", "18 cases, skewed", "18 cases, failures"]
    for row in rows.values():
        assert 0 <= row["bootstrap"] <= 1 and 0 <= row["t"] <= 1 and row["draws"] == 60
        assert row["bootstrap_width"] > 0 and row["t_width"] > 0
    grouped = rows["5 groups of 10-25 cases"]
    # over five groups the t interval (t on 4 degrees of freedom) is wider and holds the truth more often
    assert grouped["t_width"] > 1.3 * grouped["bootstrap_width"] and grouped["t"] > grouped["bootstrap"]
    assert grouped["t"] >= 0.85  # about 0.95 expected; 60 draws (binomial sd 0.03)
    with pytest.raises(SystemExit):  # the record is never replaced
        script.main(argv)
    assert "exists; choose a new file" in capsys.readouterr().err
