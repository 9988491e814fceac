"""Re-planning without a lost site (pure model): contiguity, shares, nothing else moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drp_campaign.model.groups import Group, groups_document, groups_from_document
from drp_campaign.model.overlaps import split_patch_key
from drp_campaign.model.partition import contiguous, partition_patches
from drp_campaign.model.replan import (
    ReplanError,
    check_without,
    reassign_patches,
    rehome_visits,
    revised_spec,
    revision_groups,
)
from drp_campaign.model.sky import RingsSkyMap
from drp_campaign.model.spec import load_spec

SKY = RingsSkyMap(num_rings=120, builder="cells")
SHARES = {"A": 0.35, "B": 0.40, "C": 0.25}
DEMO = (
    Path(__file__).resolve().parents[2] / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
)


def _band() -> tuple[np.ndarray, np.ndarray]:
    """Three rings of 20 tracts, every patch with work (uneven, deterministic)."""
    tracts = [SKY.ring_first_tract(r) + k for r in (59, 60, 61) for k in range(20)]
    keys = np.array([t * 1024 + p for t in tracts for p in range(100)], dtype=np.int64)
    work = 1 + (np.arange(keys.size) * 7919) % 13
    return keys, work


@pytest.mark.parametrize("lost", ["A", "B", "C"])
def test_lost_patches_go_to_touching_sites_near_their_shares(lost: str) -> None:
    keys, work = _band()
    part = partition_patches(SKY, keys, work, SHARES)
    owner = np.asarray(part.sites)[part.owner]
    remaining = {s: v / (1 - SHARES[lost]) for s, v in SHARES.items() if s != lost}
    moved = reassign_patches(SKY, part.keys, owner, part.work, remaining)

    # Nothing a remaining site owned changed owner; every lost patch has a remaining owner.
    kept = owner != lost
    assert (moved.owner[kept] == owner[kept]).all()
    assert set(moved.owner) == set(remaining)
    tract = split_patch_key(part.keys)[0]
    assert set(moved.moved_tracts) == {int(t) for t in tract[~kept]}
    # Each remaining site's region is still one contiguous region, and the shares hold to
    # within one tract's work (the unit handed out).
    total = part.work.sum()
    heaviest = max(part.work[tract == t].sum() for t in np.unique(tract)) / total
    for site, share in remaining.items():
        assert contiguous(SKY, tract[moved.owner == site].tolist()), site
        achieved = part.work[moved.owner == site].sum() / total
        assert achieved == pytest.approx(moved.work[site] / total)
        assert abs(achieved - share) <= heaviest + 1e-9, (site, achieved, share)
    assert moved.note == ""


def test_patch_bands_partial_tracts_stay_contiguous() -> None:
    keys = np.array([t * 1024 + p for t in (3828, 3829) for p in range(100)], dtype=np.int64)
    work = np.ones(keys.size, dtype=np.int64)
    part = partition_patches(SKY, keys, work, SHARES, "patch-bands")
    owner = np.asarray(part.sites)[part.owner]
    moved = reassign_patches(SKY, part.keys, owner, part.work, {"A": 0.35 / 0.6, "C": 0.25 / 0.6})
    assert "B" not in set(moved.owner)
    assert (moved.owner[owner != "B"] == owner[owner != "B"]).all()


def test_rehomed_visits_fill_the_missing_shares_at_the_cheapest_site() -> None:
    visit = np.arange(100, 110)
    home = np.array(["A"] * 4 + ["B"] * 4 + ["C"] * 2, dtype=object)
    # Homed at A, visits 104 and 105 send nothing; the others are cheapest at C.
    cost = np.array([[0, 5]] * 4 + [[0, 9], [0, 9], [9, 0], [9, 0]] + [[5, 0]] * 2)
    new = rehome_visits(visit, home, cost, np.ones_like(cost), {"A": 0.6, "C": 0.4})
    assert list(new[:4]) == ["A"] * 4 and list(new[8:]) == ["C"] * 2  # the others keep theirs
    assert list(new[4:8]) == ["A", "A", "C", "C"]


def test_check_without_names_each_problem() -> None:
    spec = load_spec(DEMO)
    assert check_without(spec, (), ["UKDF", "FrDF"]) == ["FrDF", "UKDF"]
    for without, lost, message in [
        (["USDF"], (), "is the hub"),
        (["USDF", "FrDF", "UKDF"], (), "no site would be left"),
        (["FrDF"], ("UKDF",), "USDF"),  # only the hub is left: allowed
        (["XDF"], (), "has no site XDF"),
        (["UKDF"], ("UKDF",), "re-planned away already"),
        ([], (), "name the lost site"),
    ]:
        if message == "USDF":
            assert check_without(spec, lost, without) == ["FrDF"]
            continue
        with pytest.raises(ReplanError, match=message):
            check_without(spec, lost, without)


def test_revised_spec_renormalises_the_remaining_shares() -> None:
    spec = load_spec(DEMO)
    revised = revised_spec(spec, ["UKDF"])
    assert revised.site_names == ["USDF", "FrDF"]
    assert sum(revised.shares.values()) == pytest.approx(1.0)
    assert revised.shares["FrDF"] == pytest.approx(0.40 / 0.75)
    assert revised.steps == spec.steps and revised.hub == spec.hub
    assert spec.site_names == ["USDF", "FrDF", "UKDF"]  # the operator's spec is untouched


def test_revision_groups_keep_everything_done_and_redo_the_rest_as_new_groups() -> None:
    spec = load_spec(DEMO)
    revised = revised_spec(spec, ["UKDF"])
    old = {
        "step1@USDF": [Group("step1", "USDF", 0, visits=(1, 2))],
        "step1@FrDF": [Group("step1", "FrDF", 0, visits=(3,))],
        "step1@UKDF": [
            Group("step1", "UKDF", 0, visits=(4,)),
            Group("step1", "UKDF", 1, visits=(5,)),
        ],
        "step2c@USDF": [Group("step2c", "USDF", 0)],
        "step3@USDF": [Group("step3", "USDF", 0, patches=((10, 0),))],
        "step3@UKDF": [Group("step3", "UKDF", 0, patches=((11, 0), (11, 1)))],
    }
    visits = pd.DataFrame(
        {
            "visit": [1, 2, 3, 4, 5],
            "ra": [0.0] * 5,
            "dec": [0.0] * 5,
            "site": ["USDF", "USDF", "FrDF", "USDF", "FrDF"],
        }
    )
    patches = pd.DataFrame(
        {"tract": [10, 11, 11], "patch": [0, 0, 1], "site": ["USDF", "FrDF", "FrDF"]}
    )
    # step1 g000 at UKDF reached the hub before the loss; g001 did not.
    groups = revision_groups(
        revised, old, {("step1", "UKDF", "g000")}, visits, patches, ["UKDF"], 1
    )
    assert not any(key.endswith("@UKDF") for key in groups)
    assert groups["step1@USDF"] == old["step1@USDF"]  # visit 4 was published: not redone
    redo = groups["step1@FrDF"][1]
    assert (redo.name, redo.visits, redo.label) == ("r1g000", (5,), "step1@FrDF#r1-000")
    assert groups["step3@USDF"] == old["step3@USDF"]
    (redo3,) = groups["step3@FrDF"]
    assert redo3.name == "r1g000" and redo3.patches == ((11, 0), (11, 1))
    assert groups["step2c@USDF"] == old["step2c@USDF"]
    # The names survive groups.json.
    again = groups_from_document(groups_document(groups))
    assert again["step1@FrDF"] == groups["step1@FrDF"]
    with pytest.raises(ValueError, match="not a group name"):
        groups_from_document({"step1@FrDF": [{"group": "r0g000", "visits": [1]}]})
