"""Sites files: BraTS institutions, seeded random sites, and clear errors for bad sites; the federated config."""

import json

import pytest

from rwkvseg.cli import main
from rwkvseg.federated.config import federated_config_from_dict
from rwkvseg.federated.sites import (
    institution,
    institution_sites,
    random_sites,
    read_sites,
    resolve_sites,
    sites_document,
    write_sites,
)

BRATS = [
    "Brats18_2013_2_1",
    "Brats18_2013_3_1",
    "Brats18_CBICA_ABM_1",
    "Brats18_CBICA_ALU_1",
    "Brats18_CBICA_AME_1",
    "Brats18_TCIA01_201_1",
    "Brats18_TCIA05_396_1",
    "Brats18_TCIA10_637_1",
]


def test_institution_sites_pool_small_institutions():
    assert institution("Brats18_CBICA_ABM_1") == "CBICA" and institution("Brats18_2013_10_1") == "2013"
    sites = institution_sites(BRATS, min_cases=2)
    assert sites == {
        "2013": ["Brats18_2013_2_1", "Brats18_2013_3_1"],
        "CBICA": ["Brats18_CBICA_ABM_1", "Brats18_CBICA_ALU_1", "Brats18_CBICA_AME_1"],
        "other": ["Brats18_TCIA01_201_1", "Brats18_TCIA05_396_1", "Brats18_TCIA10_637_1"],
    }
    with pytest.raises(ValueError, match="does not name an institution"):
        institution("lesion_001")


def test_random_sites_are_seeded_disjoint_and_complete():
    cases = [f"lesion_{i:03d}" for i in range(11)]
    a, b = random_sites(cases, 3, seed=1), random_sites(cases, 3, seed=1)
    assert a == b and list(a) == ["site1", "site2", "site3"]
    members = [c for v in a.values() for c in v]
    assert sorted(members) == cases and sorted(len(v) for v in a.values()) == [3, 4, 4]
    assert random_sites(cases, 3, seed=2) != a
    with pytest.raises(ValueError, match="cannot split 11 cases into 12 sites"):
        random_sites(cases, 12)


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        (
            {"A": ["Brats18_2013_2_1", "Brats18_nope_1_1"]},
            r"site 'A' names 1 case\(s\) not in the dataset \(Brats18_nope",
        ),
        (
            {"A": ["Brats18_2013_2_1", "Brats18_2013_3_1"], "B": ["Brats18_2013_3_1", "Brats18_CBICA_ABM_1"]},
            "case 'Brats18_2013_3_1' is in both sites 'A' and 'B'",
        ),
        ({"A": ["Brats18_2013_2_1"]}, "site 'A' has 1 case; a site needs at least 2"),
        ({"A": []}, "site 'A' has no cases"),
        ({"A": {"train": ["Brats18_2013_2_1"], "val": []}}, "site 'A' has no validation cases"),
        ({"a b": ["Brats18_2013_2_1", "Brats18_2013_3_1"]}, "site name 'a b'"),
        ({}, "defines no sites"),
    ],
)
def test_bad_sites_are_clear_errors(sites, message):
    with pytest.raises(ValueError, match=message):
        resolve_sites(sites, BRATS, 0.2, 0, "sites.json")


def test_sites_file_round_trip_and_resolved_splits(tmp_path):
    doc = sites_document({"A": BRATS[:4], "B": {"train": BRATS[4:7], "val": BRATS[7:]}}, "manual")
    path = write_sites(tmp_path / "sites.json", doc)
    with pytest.raises(FileExistsError):
        write_sites(path, doc)
    sites = resolve_sites(read_sites(path), BRATS, 0.25, 0)
    assert [s.name for s in sites] == ["A", "B"]
    assert (
        len(sites[0].val) == 1
        and len(sites[0].train) == 3
        and set(sites[0].train) | set(sites[0].val) == set(BRATS[:4])
    )
    assert sites[1].val == (BRATS[7],) and sites[1].train == tuple(sorted(BRATS[4:7]))
    (tmp_path / "bad.json").write_text(json.dumps({"sites": {}}))
    with pytest.raises(ValueError, match="not an rwkvseg sites file"):
        read_sites(tmp_path / "bad.json")


def test_sites_command_writes_institution_sites(tmp_path, capsys):
    import numpy as np

    from writers import write_brats_case

    image, seg = np.zeros((6, 6, 6), np.float32), np.zeros((6, 6, 6), np.uint8)
    for case in BRATS[:5]:
        write_brats_case(tmp_path / "data", case, [image] * 4, seg)
    out = tmp_path / "sites.json"
    assert main(["federate", "--sites-from", str(tmp_path / "data"), "--sites-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2013: 2 cases" in printed and "CBICA: 3 cases" in printed
    assert read_sites(out) == {"2013": BRATS[:2], "CBICA": BRATS[2:5]}


def test_federated_config_checks_epochs_and_reads_a_base_config(tmp_path):
    base = tmp_path / "central.toml"
    base.write_text('epochs = 6\nseed = 3\n[model]\nname = "unet_test"\n')
    fed = {"federated": {"rounds": 3, "local_epochs": 2, "train_config": "central.toml", "strategy": "fedprox"}}
    config = federated_config_from_dict(fed, tmp_path)
    assert config.train.epochs == 6 and config.train.seed == 3 and config.train.model.name == "unet_test"
    assert config.mu == 0.01
    with pytest.raises(ValueError, match=r"epochs = 6 but federated rounds x local_epochs = 2 x 2 = 4"):
        federated_config_from_dict(
            {"federated": {"rounds": 2, "local_epochs": 2, "train_config": "central.toml"}}, tmp_path
        )
    with pytest.raises(ValueError, match="needs a \\[federated\\] table"):
        federated_config_from_dict({"epochs": 2})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) federated\.round;"):
        federated_config_from_dict({"federated": {"round": 2}})
    with pytest.raises(ValueError, match=r"federated\.strategy = 'fedsgd'"):
        federated_config_from_dict({"federated": {"strategy": "fedsgd"}})
    with pytest.raises(ValueError, match=r"federated\.patches_per_case sizes 3D patch epochs; .* set it to 0"):
        federated_config_from_dict({"federated": {"patches_per_case": 38}})  # a 2D config
    with pytest.raises(ValueError, match=r"federated\.validate_every = 0 must be >= 1"):
        federated_config_from_dict({"federated": {"validate_every": 0}})
    with pytest.raises(ValueError, match=r"federated\.patches_per_case = -1 must be >= 0"):
        federated_config_from_dict({"dims": 3, "federated": {"patches_per_case": -1}})
    assert (
        federated_config_from_dict({"dims": 3, "federated": {"patches_per_case": 38}}).federated.patches_per_case == 38
    )
