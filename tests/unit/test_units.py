"""Work units: a group resolved once into its query, names and paths (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drp_campaign.model.groups import Group, groups_document, groups_from_document
from drp_campaign.model.spec import load_spec
from drp_campaign.model.units import work_unit

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml")


def test_a_visit_group_carries_its_query_and_names() -> None:
    unit = work_unit(SPEC, Group("step1", "FrDF", 3, visits=(20, 10)))
    assert unit.label == "step1@FrDF#003" and unit.name == "g003"
    assert unit.where == "instrument='LSSTComCam' AND skymap='DC2_cells_v1' AND visit IN (10, 20)"
    assert unit.output_run == "dc2-test-med-1/step1/FrDF/g003"
    assert unit.output_collection == "dc2-test-med-1/FrDF/output"
    assert unit.graph_path == "graphs/step1/FrDF/g003.qg"
    assert unit.submit_file == "submit/FrDF/FrDF-step1-g003.yaml"
    assert unit.payload_name == "dc2-test-med-1-step1-FrDF-g003"
    assert unit.products_dataset == "dc2-test-med-1/products/step1/FrDF/g003"
    assert "-p step=step1 -p site=FrDF -p group=g003" in unit.rerun_hint()


def test_an_attempt_renames_what_a_fresh_submission_needs_new() -> None:
    group = Group("step1", "FrDF", 0, visits=(1,))
    first, second = work_unit(SPEC, group), work_unit(SPEC, group, 2)
    assert second.output_run == "dc2-test-med-1/step1/FrDF/g000-attempt2"
    assert second.graph_path.endswith("g000-attempt2.qg")
    assert second.submit_path != first.submit_path
    # What the group staged and published is the group's, whatever the attempt.
    assert second.products_dataset == first.products_dataset
    assert second.staged_dataset == first.staged_dataset


def test_tract_groups_query_whole_tracts_and_the_patches_of_split_ones() -> None:
    group = Group("step3", "USDF", 1, patches=((3828, 0), (3828, 1), (3829, 5)))
    unit = work_unit(SPEC, group, tract_sizes={3828: 2, 3829: 100})
    assert unit.where.endswith("AND (tract IN (3828) OR (tract = 3829 AND patch IN (5)))"), (
        unit.where
    )
    everything = work_unit(SPEC, Group("step2c", "USDF", 0))
    assert everything.where == "instrument='LSSTComCam' AND skymap='DC2_cells_v1'"


def test_groups_read_back_from_their_document_unchanged() -> None:
    groups = {
        "step1@FrDF": [
            Group("step1", "FrDF", 0, visits=(5, 4)),
            Group("step1", "FrDF", 1, visits=(9,)),
        ],
        "step3@USDF": [Group("step3", "USDF", 0, patches=((1, 2), (1, 3)))],
        "step2c@USDF": [Group("step2c", "USDF", 0)],
    }
    assert groups_from_document(groups_document(groups)) == groups
    with pytest.raises(ValueError, match="not 'step@site'"):
        groups_from_document({"step1": []})
