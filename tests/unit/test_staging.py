"""Which steps need the staging probe (pure: the spec and each step's data flow)."""

from __future__ import annotations

from pathlib import Path

from drp_campaign.model.spec import load_spec
from drp_campaign.model.staging import StepFlow, needs_probe

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml")


def flow(inputs: set[str], outputs: set[str]) -> StepFlow:
    return StepFlow(frozenset(inputs), frozenset(outputs))


FLOWS = {
    "step1": flow({"raw", "bias"}, {"postISRCCD", "pvi"}),
    "step2": flow({"pvi"}, {"visitSummary"}),
    "step2c": flow({"visitSummary"}, {"fgcmPhotoCalibCatalog"}),
    "step3": flow({"pvi", "fgcmPhotoCalibCatalog", "skyMap"}, {"deepCoadd_ref"}),
    "step4": flow({"pvi", "deepCoadd_ref"}, {"forcedSource"}),
}


def test_campaign_inputs_and_same_site_visit_products_need_no_probe() -> None:
    assert not needs_probe(SPEC, "step1", FLOWS)  # raws and calibrations: distributed
    assert not needs_probe(SPEC, "step2", FLOWS)  # PVIs of the site's own visits


def test_tract_steps_gathered_outputs_and_other_sites_catalogs_need_the_probe() -> None:
    assert needs_probe(SPEC, "step3", FLOWS)  # overlap PVIs, fgcm outputs fanned out
    assert needs_probe(SPEC, "step4", FLOWS)  # coadd catalogs of other sites' tracts


def test_a_visit_step_reading_a_gathered_steps_output_needs_the_probe() -> None:
    flows = {**FLOWS, "step4": flow({"pvi", "fgcmPhotoCalibCatalog"}, {"forcedSource"})}
    assert needs_probe(SPEC, "step4", flows)


def test_only_the_first_step_reads_campaign_inputs_alone() -> None:
    from drp_campaign.model.staging import reads_only_campaign_inputs

    assert reads_only_campaign_inputs(SPEC, "step1", FLOWS)  # raws: a re-plan may move them
    assert not any(reads_only_campaign_inputs(SPEC, s, FLOWS) for s in SPEC.step_names[1:])
