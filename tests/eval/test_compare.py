"""rwkvseg.eval.compare and `rwkvseg compare`: two evaluations of the same cases, case by case."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from rwkvseg.eval.compare import (
    MEAN_DICE,
    as_json,
    compare_evaluations,
    comparison_table,
    read_groups,
    read_per_case,
)


def write_per_case(path: Path, rows: dict[str, dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["case", *next(iter(rows.values()))]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for case, row in rows.items():
            writer.writerow({"case": case, **row})
    return path


def by_column(comparisons):
    return {c.column: c for c in comparisons}


def test_a_constant_gain_on_six_cases_has_the_exact_wilcoxon_p_and_an_interval_on_the_gain(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, 6)
    gain = 0.05 + rng.uniform(-0.01, 0.01, 6)  # every case better in B
    a = write_per_case(tmp_path / "a.csv", {f"c{i}": {"dice": base[i], "hd95": 10.0} for i in range(6)})
    b = write_per_case(
        tmp_path / "b.csv", {f"c{i}": {"dice": base[i] + gain[i], "hd95": 10.0 - i} for i in reversed(range(6))}
    )  # B's rows in another order: matched by case name
    got = by_column(compare_evaluations(read_per_case(a), read_per_case(b)))
    dice = got["dice"]
    assert dice.cases == 6 and dice.difference == pytest.approx(gain.mean())
    assert dice.mean_a == pytest.approx(base.mean()) and dice.mean_b == pytest.approx((base + gain).mean())
    assert gain.min() <= dice.ci_low < gain.mean() < dice.ci_high <= gain.max()
    # the exact two-sided signed-rank test: all 6 of 6 signs positive has probability 2 / 2^6
    assert dice.p_value == pytest.approx(2 / 64)
    assert (dice.b_better, dice.ties, dice.a_better) == (6, 0, 0)
    # HD95 is better lower: B's 0 to 5 mm less wins 5 cases and ties one
    hd = got["hd95"]
    assert not hd.higher_is_better and hd.difference == pytest.approx(-2.5)
    assert (hd.b_better, hd.ties, hd.a_better) == (5, 1, 0)
    assert MEAN_DICE not in got  # one Dice column: no mean over regions


def test_identical_evaluations_tie_everywhere_and_undefined_cases_are_left_out(tmp_path):
    rows = {f"c{i}": {"WT_dice": 0.9 - i / 100, "TC_dice": 0.7, "TC_hd95": "", "WT_iou": 0.8} for i in range(5)}
    rows["c0"]["TC_hd95"] = 4.0
    a = write_per_case(tmp_path / "a" / "per_case.csv", rows)
    b = write_per_case(tmp_path / "b" / "per_case.csv", rows)
    got = by_column(compare_evaluations(read_per_case(a.parent), read_per_case(b), metrics=("dice", "hd95")))
    assert set(got) == {"WT_dice", "TC_dice", "TC_hd95", MEAN_DICE}  # iou not asked for
    for column in ("WT_dice", "TC_dice", MEAN_DICE):
        assert got[column].difference == 0 and got[column].ci_low == got[column].ci_high == 0
    assert got["WT_dice"].p_value == 1.0 and got["WT_dice"].ties == 5
    assert got["TC_hd95"].cases == 1  # defined in one case only: no interval, no test
    assert np.isnan(got["TC_hd95"].p_value)
    record = as_json(got["TC_hd95"])  # as strict JSON: null, not NaN
    assert record["p_value"] is None and record["ci_low"] is None and record["mean_a"] == 4.0
    json.dumps(record, allow_nan=False)
    assert got[MEAN_DICE].mean_a == pytest.approx(np.mean([(0.9 - i / 100 + 0.7) / 2 for i in range(5)]))


def test_mean_over_regions_is_the_per_case_mean_of_the_dice_columns(tmp_path):
    a = write_per_case(
        tmp_path / "a.csv", {"x": {"WT_dice": 0.8, "ET_dice": 0.4}, "y": {"WT_dice": 0.9, "ET_dice": 0.6}}
    )
    b = write_per_case(
        tmp_path / "b.csv", {"x": {"WT_dice": 0.9, "ET_dice": 0.2}, "y": {"WT_dice": 0.9, "ET_dice": 0.9}}
    )
    mean = by_column(compare_evaluations(read_per_case(a), read_per_case(b)))[MEAN_DICE]
    assert (mean.mean_a, mean.mean_b) == pytest.approx((0.675, 0.725))
    assert mean.difference == pytest.approx(0.05)
    assert (mean.b_better, mean.ties, mean.a_better) == (1, 0, 1)  # x: 0.55 < 0.6; y: 0.9 > 0.75


def test_a_multi_class_evaluation_gives_a_column_per_class_and_their_mean(tmp_path):
    """2D with several classes: one row per case and class (`class` column); a class missing for a case is
    undefined there."""
    a = tmp_path / "a.csv"
    a.write_text("case,class,dice,tp\nx,1,0.8,5\nx,2,0.4,5\ny,1,0.9,5\ny,2,0.6,5\n")
    b = tmp_path / "b.csv"
    b.write_text("case,class,dice,tp\ny,1,0.9,5\ny,2,0.9,5\nx,1,0.9,5\n")  # x has no class-2 row
    got = by_column(compare_evaluations(read_per_case(a), read_per_case(b)))
    assert set(got) == {"1_dice", "2_dice", MEAN_DICE}
    assert got["1_dice"].cases == 2 and got["1_dice"].difference == pytest.approx(0.05)
    assert got["2_dice"].cases == 1 and got["2_dice"].difference == pytest.approx(0.3)
    assert got[MEAN_DICE].cases == 1 and got[MEAN_DICE].mean_a == pytest.approx(0.75)  # y only
    twice = tmp_path / "twice.csv"
    twice.write_text("case,class,dice\nx,1,0.8\nx,1,0.7\n")
    with pytest.raises(ValueError, match="lists cases more than once"):
        read_per_case(twice)


def test_refusals_name_the_file_and_the_fix(tmp_path):
    a = write_per_case(tmp_path / "a.csv", {"c1": {"dice": 0.5}, "c2": {"dice": 0.6}})
    other = write_per_case(tmp_path / "b.csv", {"c1": {"dice": 0.5}, "c3": {"dice": 0.6}})
    with pytest.raises(ValueError, match=r"score different cases \(1 only in the first, e.g. \['c2'\]; 1 only in"):
        compare_evaluations(read_per_case(a), read_per_case(other))
    no_metric = write_per_case(tmp_path / "n.csv", {"c1": {"tp": 3}, "c2": {"tp": 4}})
    with pytest.raises(ValueError, match="share no column of the metrics"):
        compare_evaluations(read_per_case(a), read_per_case(no_metric))
    with pytest.raises(ValueError, match="unknown metrics"):
        compare_evaluations(read_per_case(a), read_per_case(a), metrics=("dsc",))
    twice = tmp_path / "twice.csv"
    twice.write_text("case,dice\nc1,0.5\nc1,0.6\n")
    with pytest.raises(ValueError, match=r"twice.csv lists cases more than once \(\['c1'\]\)"):
        read_per_case(twice)
    text = tmp_path / "text.csv"
    text.write_text("case,dice\nc1,high\n")
    with pytest.raises(ValueError, match="column 'dice' holds a value that is not a number"):
        read_per_case(text)
    with pytest.raises(FileNotFoundError, match=r"rwkvseg evaluate PRED GT --out FOLDER"):
        read_per_case(tmp_path / "nowhere")


def test_command_line_compares_two_evaluate_folders_and_writes_json_without_replacing_inputs(tmp_path, capsys):
    from rwkvseg.cli import main
    from writers import save_png

    truth = np.zeros((24, 24), np.uint8)
    truth[4:16, 4:16] = 255
    for i in range(4):
        save_png(tmp_path / "gt" / f"m{i}.png", truth)
        for name, shift in (("good", 0), ("off", 2 + i)):
            guess = np.zeros_like(truth)
            guess[4 + shift : 16 + shift, 4:16] = 255
            save_png(tmp_path / name / f"m{i}.png", guess)
    for name in ("good", "off"):
        assert (
            main(["evaluate", str(tmp_path / name), str(tmp_path / "gt"), "--out", str(tmp_path / f"ev-{name}")]) == 0
        )
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    args = ["compare", str(tmp_path / "ev-off"), str(tmp_path / "ev-good"), "--out", str(out), "--resamples", "500"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| dice | 4 | " in table and "ev-good - ev-off" in table and "| 4 / 0 / 0 |" in table
    record = json.loads(out.read_text())
    assert record["written_by"] == "rwkvseg compare" and record["bootstrap"]["resamples"] == 500
    dice = next(m for m in record["metrics"] if m["column"] == "dice")
    assert dice["mean_a"] == pytest.approx(np.mean([1 - (2 + i) / 12 for i in range(4)]))  # overlap 12 - shift of 12
    assert dice["mean_b"] == 1.0 and dice["difference"] > 0
    # an existing output stays without --overwrite; --overwrite replaces only a comparison
    assert main(args) == 2 and "exists; choose another file or pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    summary = tmp_path / "ev-good" / "summary.json"
    before = summary.read_bytes()
    assert main([*args[:3], "--out", str(summary), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is not a comparison rwkvseg wrote" in err and summary.read_bytes() == before
    # without --overwrite, a file --overwrite would not replace either is refused without offering it
    assert main([*args[:3], "--out", str(summary)]) == 2
    err = capsys.readouterr().err
    assert "is not a comparison rwkvseg wrote" in err and "pass --overwrite" not in err
    per_case = tmp_path / "ev-good" / "per_case.csv"
    before = per_case.read_bytes()
    assert main([*args[:3], "--out", str(per_case), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err and per_case.read_bytes() == before
    assert main(["compare", str(tmp_path / "ev-good"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing not found: give a per_case.csv" in err


def write_groups(path: Path, groups: dict[str, str]) -> Path:
    path.write_text("case,group\n" + "".join(f"{case},{group}\n" for case, group in groups.items()))
    return path


def test_groups_of_near_copies_are_resampled_and_tested_as_units(tmp_path):
    """Four sequences of ten near-identical frames, three better in B and one worse: counted frame by frame the
    gain looks certain; counted by sequence (what was actually sampled) it does not."""
    rng = np.random.default_rng(1)
    shift = {"s0": 0.1, "s1": 0.1, "s2": 0.1, "s3": -0.1}
    cases = {f"f{i:02d}": f"s{i // 10}" for i in range(40)}
    base = {c: 0.6 + rng.uniform(-0.05, 0.05) for c in cases}
    b_dice = {c: base[c] + shift[g] + rng.uniform(-0.001, 0.001) for c, g in cases.items()}
    a = read_per_case(write_per_case(tmp_path / "a.csv", {c: {"dice": v} for c, v in base.items()}))
    b = read_per_case(write_per_case(tmp_path / "b.csv", {c: {"dice": v} for c, v in b_dice.items()}))
    groups = read_groups(write_groups(tmp_path / "groups.csv", cases))
    by_case = compare_evaluations(a, b, ("dice",), resamples=2000)[0]
    by_group = compare_evaluations(a, b, ("dice",), resamples=2000, groups=groups)[0]
    assert by_group.difference == pytest.approx(by_case.difference) and by_group.cases == by_case.cases == 40
    assert (by_case.groups, by_group.groups) == (0, 4)
    assert by_case.p_value < 0.01 and (by_case.b_better, by_case.a_better) == (30, 10)
    # the exact signed-rank test of 4 group means, ranks 1-4 with one negative: p >= 2 * 2 / 2^4
    assert by_group.p_value >= 0.25 and (by_group.b_better, by_group.ties, by_group.a_better) == (3, 0, 1)
    assert by_group.ci_high - by_group.ci_low > 2 * (by_case.ci_high - by_case.ci_low)  # ten copies: about sqrt(10)
    assert by_group.ci_low < 0 < by_case.ci_low  # frame by frame the interval leaves out no gain; by sequence not
    table = "\n".join(comparison_table([by_group], "A", "B", 0.95))
    assert "| dice | 40 (4) |" in table and "groups B better / tie / A better" in table and "| 3 / 0 / 1 |" in table


def test_one_case_per_group_is_the_case_by_case_comparison(tmp_path):
    """Groups of one case resample exactly what the ungrouped comparison resamples: the same interval and test."""
    rng = np.random.default_rng(2)
    rows_a = {f"c{i}": {"dice": rng.uniform(0.5, 0.9), "hd95": rng.uniform(2, 9)} for i in range(15)}
    rows_b = {c: {"dice": r["dice"] + rng.normal(0.01, 0.03), "hd95": r["hd95"] - 0.5} for c, r in rows_a.items()}
    a = read_per_case(write_per_case(tmp_path / "a.csv", rows_a))
    b = read_per_case(write_per_case(tmp_path / "b.csv", rows_b))
    plain = compare_evaluations(a, b, resamples=1000, seed=3)
    grouped = compare_evaluations(a, b, resamples=1000, seed=3, groups={c: c for c in rows_a})
    for p, g in zip(plain, grouped, strict=True):
        assert g.groups == 15 and p.groups == 0
        assert (g.ci_low, g.ci_high, g.p_value) == pytest.approx((p.ci_low, p.ci_high, p.p_value), rel=1e-9)
        assert (g.t_low, g.t_high) == pytest.approx((p.t_low, p.t_high), rel=1e-9)
        assert (g.b_better, g.ties, g.a_better) == (p.b_better, p.ties, p.a_better)


def test_bad_groups_are_refused_naming_the_file_and_the_fix(tmp_path):
    a = read_per_case(write_per_case(tmp_path / "a.csv", {"c1": {"dice": 0.5}, "c2": {"dice": 0.6}}))
    with pytest.raises(ValueError, match=r"1 of the 2 cases have no group \(e.g. \['c2'\]\)"):
        compare_evaluations(a, a, groups={"c1": "g"})
    with pytest.raises(ValueError, match="all 2 cases are in one group \\('g'\\)"):
        compare_evaluations(a, a, groups={"c1": "g", "c2": "g"})
    bad = tmp_path / "bad.csv"
    for text, message in (
        ("case,sequence\nc1,1\n", "needs the columns case and group"),
        ("case,group\nc1,g\nc1,h\n", "line 3: case 'c1' is listed twice"),
        ("case,group\nc1,\n", "line 2: case 'c1' has no group"),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_groups(bad)
    with pytest.raises(ValueError, match="not found: give a CSV of case,group for every case"):
        read_groups(tmp_path / "nowhere.csv")


def test_command_line_compares_by_group_and_records_it(tmp_path, capsys):
    from rwkvseg.cli import main

    rows = {f"c{i}": {"dice": 0.5 + i / 100} for i in range(6)}
    a = write_per_case(tmp_path / "a.csv", rows)
    b = write_per_case(tmp_path / "b.csv", {c: {"dice": r["dice"] + 0.02} for c, r in rows.items()})
    groups = write_groups(tmp_path / "groups.csv", {f"c{i}": f"g{i % 3}" for i in range(6)})
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--groups", str(groups), "--out", str(out), "--resamples", "200"]) == 0
    assert "| dice | 6 (3) |" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["groups"] == str(groups) and record["bootstrap"]["resampled"] == "group"
    assert record["metrics"][0]["groups"] == 3 and record["metrics"][0]["difference"] == pytest.approx(0.02)
    before = groups.read_bytes()  # the groups file is an input: never an output
    assert main(["compare", str(a), str(b), "--groups", str(groups), "--out", str(groups), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err and groups.read_bytes() == before
    assert main(["compare", str(a), str(b), "--groups", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.csv not found" in err


def test_the_t_interval_over_cases_is_the_one_sample_t_interval(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 0.9, 18)
    d = rng.normal(0.01, 0.04, 18) * (1 + rng.standard_exponential(18))  # heavy-tailed, as BraTS differences are
    a = read_per_case(write_per_case(tmp_path / "a.csv", {f"c{i}": {"dice": base[i]} for i in range(18)}))
    b = read_per_case(write_per_case(tmp_path / "b.csv", {f"c{i}": {"dice": base[i] + d[i]} for i in range(18)}))
    for confidence in (0.95, 0.8):
        c = compare_evaluations(a, b, ("dice",), confidence=confidence, resamples=500)[0]
        expected = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
        assert (c.t_low, c.t_high) == pytest.approx((expected.low, expected.high), rel=1e-9)
    table = "\n".join(comparison_table([c], "A", "B", 0.8))
    assert "| 80% CI, bootstrap | 80% CI, t |" in table and f"[{c.t_low:+.4f}, {c.t_high:+.4f}]" in table
    record = as_json(c)
    assert record["t_low"] == pytest.approx(c.t_low) and record["t_high"] == pytest.approx(c.t_high)


def test_the_t_interval_over_groups_is_cluster_robust(tmp_path):
    """Equal groups: the t interval over the groups' mean differences. Unequal groups: the mean over cases with a
    CR1 standard error from the groups' residuals, with t on groups - 1 degrees of freedom (written out here)."""
    from scipy import stats

    rng = np.random.default_rng(5)
    for sizes in ((10, 10, 10, 10, 10, 10, 10), (25, 17, 23, 11, 22, 25, 3)):
        group_of = {f"f{i:03d}": f"s{g}" for i, g in enumerate(np.repeat(np.arange(len(sizes)), sizes))}
        shift = rng.normal(0.0, 0.05, len(sizes))
        base = {c: rng.uniform(0.5, 0.9) for c in group_of}
        d = {c: shift[int(g[1:])] + rng.normal(0, 0.01) for c, g in group_of.items()}
        a = read_per_case(write_per_case(tmp_path / "a.csv", {c: {"dice": v} for c, v in base.items()}))
        b = read_per_case(write_per_case(tmp_path / "b.csv", {c: {"dice": base[c] + d[c]} for c in group_of}))
        c = compare_evaluations(a, b, ("dice",), resamples=500, groups=group_of)[0]
        diffs = np.array(list(d.values()))
        index = np.array([int(g[1:]) for g in group_of.values()])
        sums, counts = np.bincount(index, weights=diffs), np.bincount(index).astype(float)
        g, mean = len(sizes), diffs.mean()
        se = np.sqrt(g / (g - 1) * np.sum(((sums - counts * mean) / counts.sum()) ** 2))
        half = stats.t.ppf(0.975, g - 1) * se
        assert c.difference == pytest.approx(mean) and (c.t_low, c.t_high) == pytest.approx((mean - half, mean + half))
        if len(set(sizes)) == 1:
            means = sums / counts
            expected = stats.ttest_1samp(means, 0.0).confidence_interval(0.95)
            assert (c.t_low, c.t_high) == pytest.approx((expected.low, expected.high), rel=1e-9)
        # over 7 groups the t interval is wider than the bootstrap's: the bootstrap over few units is too narrow
        assert c.t_high - c.t_low > c.ci_high - c.ci_low


def test_a_single_difference_everywhere_gives_a_point_t_interval_and_one_case_none(tmp_path):
    a = read_per_case(write_per_case(tmp_path / "a.csv", {f"c{i}": {"dice": 0.5 + i / 10} for i in range(4)}))
    b = read_per_case(write_per_case(tmp_path / "b.csv", {f"c{i}": {"dice": 0.52 + i / 10} for i in range(4)}))
    c = compare_evaluations(a, b, ("dice",), resamples=200)[0]
    assert c.t_low == pytest.approx(0.02) and c.t_high == pytest.approx(0.02)
    one = read_per_case(write_per_case(tmp_path / "one.csv", {"c0": {"dice": 0.5}}))
    single = compare_evaluations(one, one, ("dice",), resamples=200)[0]
    assert np.isnan(single.t_low) and as_json(single)["t_high"] is None
