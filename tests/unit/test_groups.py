"""Groups (`drp_campaign.model.groups`): bounded, deterministic, contiguous cuts of a site-step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drp_campaign.model.groups import (
    DEFAULT_GROUP_TRACTS,
    DEFAULT_GROUP_VISITS,
    Bounds,
    equal_ranges,
    groups_document,
    plan_groups,
    site_groups,
    sky_order,
    step_bounds,
)
from drp_campaign.model.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml").read_text()
STEP1 = "{name: step1, subset: step1, shard: visit, placement: per-site}"
STEP3 = "{name: step3, subset: step3, shard: tract, placement: per-site}"
STEP2C = "{name: step2c, subset: step2c, shard: none, placement: gather}"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 600))
def test_equal_ranges_cover_in_order_with_the_fewest_bounded_ranges(n: int, size: int) -> None:
    ranges = equal_ranges(n, size)
    assert len(ranges) == math.ceil(n / size)
    if ranges:
        assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]]  # contiguous
        assert ranges[-1][1] == n
        sizes = [b - a for a, b in ranges]
        assert max(sizes) <= size and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)


def test_equal_ranges_examples() -> None:
    assert equal_ranges(10, 4) == [(0, 4), (4, 7), (7, 10)]
    assert equal_ranges(3, 500) == [(0, 3)]
    assert equal_ranges(0, 5) == []
    with pytest.raises(ValueError, match="at least one"):
        equal_ranges(5, 0)


def _grid(n_ra: int, n_dec: int) -> pd.DataFrame:
    ra, dec = np.meshgrid(np.arange(n_ra) * 1.5 + 50.0, np.arange(n_dec) * 4.0 - 40.0)
    ids = np.arange(ra.size) * 7 + 1000
    rng = np.random.default_rng(3)
    order = rng.permutation(ra.size)
    return pd.DataFrame({"visit": ids[order], "ra": ra.ravel()[order], "dec": dec.ravel()[order]})


def test_sky_order_walks_neighbours_and_ignores_input_order() -> None:
    visits = _grid(12, 5)
    order = sky_order(visits["visit"], visits["ra"], visits["dec"])
    assert sorted(order) == sorted(visits["visit"])
    shuffled = visits.sample(frac=1.0, random_state=9)
    assert np.array_equal(order, sky_order(shuffled["visit"], shuffled["ra"], shuffled["dec"]))
    # Back and forth along the strips: every step is to a neighbour on the grid (1.5 deg in RA,
    # or one strip up at the end of a strip).
    pos = visits.set_index("visit").loc[order]
    steps = np.hypot(np.diff(pos["ra"].to_numpy()), np.diff(pos["dec"].to_numpy()))
    assert steps.max() <= 4.0 + 1e-9
    # A random order is not like that.
    assert np.hypot(np.diff(visits["ra"]), np.diff(visits["dec"])).max() > 4.0


def test_visit_groups_are_bounded_disjoint_and_labelled() -> None:
    visits = _grid(7, 1)
    groups = site_groups("step1", "FrDF", "visit", visits=visits, bounds=Bounds(visits=3))
    assert [len(g.visits or ()) for g in groups] == [3, 2, 2]
    assert [g.label for g in groups] == ["step1@FrDF#000", "step1@FrDF#001", "step1@FrDF#002"]
    assert [g.name for g in groups] == ["g000", "g001", "g002"]
    flat = [v for g in groups for v in g.visits or ()]
    assert flat == list(sky_order(visits["visit"], visits["ra"], visits["dec"]))
    assert all(g.patches is None and not g.everything for g in groups)
    # Nothing assigned to the site: no group.
    assert site_groups("step1", "FrDF", "visit", visits=visits.iloc[:0]) == []


def _patches(tracts: list[int], per: int) -> pd.DataFrame:
    rows = [(t, p) for t in tracts for p in range(per)]
    return pd.DataFrame(rows[::-1], columns=["tract", "patch"])  # any input order


def test_tract_groups_keep_each_tract_whole() -> None:
    patches = _patches([9813, 9812, 10054, 9814, 10055], per=4)
    groups = site_groups("step3", "UKDF", "tract", patches=patches, bounds=Bounds(tracts=2))
    assert [g.tracts for g in groups] == [(9812, 9813), (9814, 10054), (10055,)]
    assert all(len(g.patches or ()) == 4 * len(g.tracts) for g in groups)
    by_patch = site_groups("step3", "UKDF", "tract", patches=patches, bounds=Bounds(patches=6))
    assert [len(g.patches or ()) for g in by_patch] == [5, 5, 5, 5]
    assert [p for g in by_patch for p in g.patches or ()] == sorted(
        zip(patches["tract"], patches["patch"], strict=True)
    )


def test_a_gathered_step_is_one_group_of_everything() -> None:
    (group,) = site_groups("step2c", "USDF", "none")
    assert group.everything and group.label == "step2c@USDF#000"
    (whole,) = site_groups("step1", "USDF", "visit", visits=_grid(3, 3), whole=True)
    assert whole.everything


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_spec_group_bounds_and_defaults(tmp_path: Path) -> None:
    text = GOOD.replace(STEP1, STEP1[:-1] + ", group: {visits: 40}}").replace(
        STEP3, STEP3[:-1] + ", group: {patches: 25}}"
    )
    spec = load_spec(_spec(tmp_path, text))
    assert step_bounds(spec.step("step1").group) == Bounds(visits=40)
    assert step_bounds(spec.step("step3").group) == Bounds(patches=25)
    assert step_bounds(spec.step("step2").group) == Bounds(
        visits=DEFAULT_GROUP_VISITS, tracts=DEFAULT_GROUP_TRACTS
    )


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"),
    [
        (STEP1, STEP1[:-1] + ", group: {tracts: 2}}", "steps[0].group.tracts", "visit-sharded"),
        (STEP3, STEP3[:-1] + ", group: {visits: 2}}", "steps[3].group.visits", "tract-sharded"),
        (STEP2C, STEP2C[:-1] + ", group: {visits: 2}}", "steps[2].group", "one group"),
        (STEP3, STEP3[:-1] + ", group: {tracts: 2, patches: 9}}", "steps[3].group", "exactly one"),
        (STEP1, STEP1[:-1] + ", group: {visit: 20}}", "steps[0].group.visit", "did you mean"),
        (STEP1, STEP1[:-1] + ", group: {visits: 0}}", "steps[0].group.visits", ""),
    ],
)
def test_spec_group_errors_name_the_key(
    tmp_path: Path, old: str, new: str, key: str, reason: str
) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_spec(tmp_path, GOOD.replace(old, new)))
    assert key in {p.key for p in info.value.problems}, str(info.value)
    assert reason in str(info.value)


def test_plan_groups_cover_every_site_step(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml")
    rng = np.random.default_rng(1)
    sites = np.array(spec.site_names)
    visits = pd.DataFrame(
        {
            "visit": np.arange(1200),
            "ra": rng.uniform(50, 70, 1200),
            "dec": rng.uniform(-45, -30, 1200),
            "site": sites[rng.integers(0, 3, 1200)],
        }
    )
    patches = _patches(list(range(3000, 3025)), per=3)
    patches["site"] = sites[patches["tract"].to_numpy() % 3]
    groups = plan_groups(spec, visits, patches)
    assert set(groups) == {
        f"{s.name}@{site}"
        for s in spec.steps
        for site in ([spec.hub] if s.placement == "gather" else spec.site_names)
    }
    for site in spec.site_names:
        step1 = groups[f"step1@{site}"]
        n = int((visits["site"] == site).sum())
        assert len(step1) == math.ceil(n / DEFAULT_GROUP_VISITS)
        assert sorted(v for g in step1 for v in g.visits or ()) == sorted(
            visits.loc[visits["site"] == site, "visit"]
        )
    assert groups["step2c@USDF"][0].everything
    doc = groups_document(groups)
    assert doc["step3@FrDF"][0]["tracts"] == sorted(
        set(patches.loc[patches["site"] == "FrDF", "tract"])
    )
    assert plan_groups(spec, visits.sample(frac=1.0, random_state=2), patches) == groups
