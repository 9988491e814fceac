"""Campaign spec: the shipped examples load, and every bad spec gets its exact message."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from drp_campaign.model.spec import (
    CampaignSpec,
    SpecError,
    load_spec,
    parse_spec,
)

REPO = Path(__file__).resolve().parents[2]
CAMPAIGNS = REPO / "deployments" / "campaigns"
GOOD = (CAMPAIGNS / "dc2-test-med-1.yaml").read_text()

SHARE_FIX = "Fix: set each site's share to its fraction of the work; the shares must sum to 1."
YAML_FIX = (
    "Fix: correct the YAML there (indentation, a ':' after each key, matching brackets in "
    "{...} and [...], quotes around values containing ': ' or '#')."
)

SITES = """\
sites:                                   # 1..8 sites, any names
  USDF: {compute_site: SLAC, cloud: US, share: 0.35}
  FrDF: {compute_site: CC-IN2P3, cloud: EU, share: 0.40}
  UKDF: {compute_site: LANCS, cloud: EU, share: 0.25}
"""


def edit(old: str, new: str, text: str = GOOD) -> str:
    """Replace exactly one occurrence of ``old`` in the good example."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def with_sites(sites: dict[str, float], hub: str) -> str:
    """The good example with other sites (and hub)."""
    lines = ["sites:"] + [
        f"  {name}: {{compute_site: SITE{i}, cloud: EU, share: {share}}}"
        for i, (name, share) in enumerate(sites.items())
    ]
    return edit("hub: USDF", f"hub: {hub}", edit(SITES, "\n".join(lines) + "\n"))


# --------------------------------------------------------------------------------------------
# Shipped examples
# --------------------------------------------------------------------------------------------


def test_design_example_is_shipped_verbatim() -> None:
    design = REPO.parent / "shared" / "DESIGN.md"
    if not design.exists():
        pytest.skip("DESIGN.md not beside the repository")
    text = design.read_text()
    block = text.split("## 7.", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == GOOD


def test_dc2_example_values() -> None:
    spec = load_spec(CAMPAIGNS / "dc2-test-med-1.yaml")
    assert spec.campaign == "dc2-test-med-1"
    assert spec.instrument == "LSSTCam-imSim"
    assert (spec.skymap.name, spec.skymap.rings, spec.skymap.builder) == (
        "DC2_cells_v1",
        120,
        "cells",
    )
    assert (spec.survey.preset, spec.survey.seed, spec.survey.visits) == ("dc2-test-med-1", 1, None)
    assert spec.survey.visits_csv is None
    assert spec.hub == "USDF"
    assert spec.site_names == ["USDF", "FrDF", "UKDF"]
    assert spec.shares == {"USDF": 0.35, "FrDF": 0.40, "UKDF": 0.25}
    assert spec.sites["FrDF"].compute_site == "CC-IN2P3"
    assert spec.sites["USDF"].cloud == "US"
    assert spec.partition.policy == "dec-bands"
    assert spec.pipeline.yaml == "pipelines/DRP-mock.yaml"
    # Relative to the repository root, as DESIGN.md writes it.
    assert spec.pipeline.yaml_path == REPO / "pipelines" / "DRP-mock.yaml"
    assert spec.step_names == ["step1", "step2", "step2c", "step3", "step4"]
    assert spec.step("step2c").shard == "none"
    assert spec.step("step2c").placement == "gather"
    assert spec.step("step3").shard == "tract"
    assert spec.source == CAMPAIGNS / "dc2-test-med-1.yaml"


def test_dr1_example_values() -> None:
    spec = load_spec(CAMPAIGNS / "dr1.yaml")
    assert spec.campaign == "dr1"
    assert spec.instrument == "LSSTCam"
    assert spec.skymap.name == "lsst_cells_v1"
    assert (spec.survey.preset, spec.survey.visits) == ("dr1", 240000)
    assert spec.shares == {"USDF": 0.35, "FrDF": 0.40, "UKDF": 0.25}
    assert spec.hub == "USDF"
    assert [(s.name, s.shard, s.placement) for s in spec.steps] == [
        ("step1", "visit", "per-site"),
        ("step2", "visit", "per-site"),
        ("step2c", "none", "gather"),
        ("step3", "tract", "per-site"),
        ("step4", "visit", "per-site"),
        ("step5", "tract", "per-site"),
        ("step6", "visit", "per-site"),
        ("step7", "none", "gather"),
    ]


def test_step_lookup_suggests() -> None:
    spec = load_spec(CAMPAIGNS / "dc2-test-med-1.yaml")
    with pytest.raises(KeyError, match="did you mean 'step3'"):
        spec.step("stp3")


def test_parse_spec_from_text() -> None:
    spec = parse_spec(GOOD)
    assert spec.source is None
    assert spec.site_names == ["USDF", "FrDF", "UKDF"]


@pytest.mark.parametrize(
    ("sites", "hub"),
    [
        ({"solo": 1.0}, "solo"),
        ({"a": 0.5, "B-2": 0.5}, "B-2"),
        ({f"Site_{i}": 0.125 for i in range(8)}, "Site_7"),
        ({"x": 0.1, "y": 0.2, "z": 0.3, "w": 0.4}, "w"),
    ],
)
def test_any_number_of_sites_and_names(tmp_path: Path, sites: dict[str, float], hub: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(with_sites(sites, hub))
    spec = load_spec(path)
    assert spec.site_names == list(sites)
    assert spec.shares == sites
    assert spec.hub == hub


def test_shares_within_tolerance(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(with_sites({"a": 0.3333333, "b": 0.3333333, "c": 0.3333334}, "a"))
    assert sum(load_spec(path).shares.values()) == pytest.approx(1.0)


def test_visits_csv_resolved_relative_to_spec(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "visits.csv"
    csv.write_text("visit,band,ra,dec,rotation\n1,r,56.6,-36.4,0\n")
    path = tmp_path / "spec.yaml"
    path.write_text(edit("{preset: dc2-test-med-1, seed: 1}", "{visits: data/visits.csv, seed: 3}"))
    spec = load_spec(path)
    assert spec.survey.preset is None
    assert spec.survey.visits == "data/visits.csv"
    assert spec.survey.visits_csv == csv
    assert spec.survey.seed == 3


def test_pipeline_found_beside_spec_first(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "DRP-mock.yaml").write_text("description: root\n")
    spec_dir = tmp_path / "deployments" / "campaigns"
    spec_dir.mkdir(parents=True)
    path = spec_dir / "spec.yaml"
    path.write_text(GOOD)
    # Only at the repository root: found there.
    assert load_spec(path, check_files=True).pipeline.yaml_path == (
        tmp_path / "pipelines" / "DRP-mock.yaml"
    )
    # Also beside the spec: the spec's directory wins.
    (spec_dir / "pipelines").mkdir()
    (spec_dir / "pipelines" / "DRP-mock.yaml").write_text("description: local\n")
    assert load_spec(path, check_files=True).pipeline.yaml_path == (
        spec_dir / "pipelines" / "DRP-mock.yaml"
    )


def test_pipeline_checked_only_on_request(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD)
    assert load_spec(path).pipeline.yaml_path == tmp_path / "pipelines" / "DRP-mock.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path, check_files=True)
    assert str(info.value) == (
        f"{path}: pipeline.yaml: 'pipelines/DRP-mock.yaml' is not valid: file not found: "
        f"{tmp_path}/pipelines/DRP-mock.yaml. Fix: give the pipeline YAML relative to the "
        "spec's directory or to the repository root."
    )


def test_models_built_in_code_apply_the_same_rules() -> None:
    data = parse_spec(GOOD).model_dump(exclude={"source"})
    assert CampaignSpec.model_validate(data).site_names == ["USDF", "FrDF", "UKDF"]
    data["hub"] = "CERN"
    with pytest.raises(ValidationError, match="the hub must be one of the sites"):
        CampaignSpec.model_validate(data)


# --------------------------------------------------------------------------------------------
# Bad specs: (spec text, expected message after "<file>: ")
# --------------------------------------------------------------------------------------------

NINE_SITES = with_sites({f"S{i}": 0.1 for i in range(8)} | {"S8": 0.2}, "S0")

BAD: dict[str, tuple[str, str]] = {
    "unknown-site-key": (
        edit("cloud: EU, share: 0.40", "cloud: EU, shars: 0.40"),
        "sites.FrDF.shars: unknown key 'shars' (did you mean 'share'?). "
        "Fix: rename 'shars' to 'share'.",
    ),
    "unknown-top-key": (
        edit("sites:   ", "sitse:   "),
        "sitse: unknown key 'sitse' (did you mean 'sites'?). Fix: rename 'sitse' to 'sites'.",
    ),
    "unknown-key-no-match": (
        edit("{policy: dec-bands}", "{policy: dec-bands, colour: blue}"),
        "partition.colour: unknown key 'colour'; the keys allowed here are policy. "
        "Fix: remove 'colour' or rename it to one of the allowed keys.",
    ),
    "share-sum": (
        edit("share: 0.25", "share: 0.20"),
        "sites: shares summing to 0.95 (USDF 0.35 + FrDF 0.4 + UKDF 0.2) is not valid: "
        f"the shares must sum to 1 (within 1e-6). {SHARE_FIX}",
    ),
    "share-not-a-number": (
        edit("share: 0.40", 'share: "forty"'),
        f"sites.FrDF.share: 'forty' is not valid: must be a number in (0, 1]. {SHARE_FIX}",
    ),
    "share-missing": (
        edit(", share: 0.40", ""),
        "sites.FrDF.share: required key is missing. Fix: add 'share: 0.35' under 'sites.FrDF'.",
    ),
    "hub-not-a-site": (
        edit("hub: USDF", "hub: CERN"),
        "hub: 'CERN' is not valid: the hub must be one of the sites (USDF, FrDF, UKDF). "
        "Fix: set hub to the site that gathers and holds every published product, or add that "
        "site under 'sites'.",
    ),
    "hub-misspelt": (
        edit("hub: USDF", "hub: usdf"),
        "hub: 'usdf' is not valid: the hub must be one of the sites (USDF, FrDF, UKDF) "
        "(did you mean 'USDF'?). Fix: set hub to 'USDF'.",
    ),
    "duplicate-step": (
        edit("{name: step3,", "{name: step2,"),
        "steps[3].name: 'step2' is not valid: step names must be unique; steps[1] has it too. "
        "Fix: rename one of the two steps.",
    ),
    "gather-sharded": (
        edit("shard: none, placement: gather", "shard: visit, placement: gather"),
        "steps[2].shard: 'visit' is not valid: a gather step runs once at the hub on "
        "everything, so its shard must be 'none'. Fix: set 'shard: none', or "
        "'placement: per-site' to split the step by visit.",
    ),
    "unsharded-per-site": (
        edit("shard: none, placement: gather", "shard: none, placement: per-site"),
        "steps[2].placement: 'per-site' is not valid: a step with shard 'none' is global and "
        "runs once at the hub, so its placement must be 'gather'. Fix: set 'placement: gather', "
        "or shard the step by 'visit' or 'tract'.",
    ),
    "bad-shard": (
        edit("shard: tract", "shard: tracts"),
        "steps[3].shard: 'tracts' is not valid: must be 'visit', 'tract' or 'none' "
        "(did you mean 'tract'?). Fix: use 'tract'.",
    ),
    "campaign-name": (
        edit("campaign: dc2-test-med-1", "campaign: DC2_test"),
        "campaign: 'DC2_test' is not valid: must be lower-case letters, digits and '-' only. "
        "Fix: rename the campaign using only a-z, 0-9 and '-', e.g. 'dc2-test-med-1'.",
    ),
    "zero-sites": (
        edit(SITES, "sites: {}\n"),
        "sites: 0 sites is not valid: a campaign has 1 to 8 sites. Fix: add a site.",
    ),
    "nine-sites": (
        NINE_SITES,
        "sites: 9 sites (S0, S1, S2, S3, S4, S5, S6, S7, S8) is not valid: a campaign has 1 to 8 "
        "sites. Fix: merge or drop sites until 8 remain.",
    ),
    "site-name": (
        edit("  UKDF:", "  'UK DF':"),
        "sites.UK DF: 'UK DF' is not valid: a site name must start with a letter and contain "
        "only letters, digits, '_' and '-'. Fix: rename the site (and quote it if YAML reads it "
        "as a number or a boolean, e.g. 'NO' or 'on').",
    ),
    "empty-cloud": (
        edit("cloud: US", "cloud: ''"),
        "sites.USDF.cloud: '' is not valid: must be a non-empty string. "
        "Fix: set it to the site's BPS computeCloud, e.g. US or EU.",
    ),
    "builder": (
        edit("builder: cells}", "builder: cell}"),
        "skymap.builder: 'cell' is not valid: must be 'cells' or 'legacy' "
        "(did you mean 'cells'?). Fix: use 'cells'.",
    ),
    "rings": (
        edit("rings: 120", "rings: 0"),
        "skymap.rings: 0 is not valid: must be a whole number >= 1. "
        "Fix: set it to the skymap's numRings (120 for lsst_cells_v1 and DC2_cells_v1).",
    ),
    "pixel-scale": (
        edit("builder: cells}", "builder: cells, pixel_scale: 0}"),
        "skymap.pixel_scale: 0 is not valid: must be a number > 0 (arcseconds per pixel). "
        "Fix: set it to the skymap's pixelScale in arcsec, e.g. 0.2 (the default) or 0.168 "
        "(HSC), or leave it out.",
    ),
    "pixel-scale-string": (
        edit("builder: cells}", "builder: cells, pixel_scale: 0.2arcsec}"),
        "skymap.pixel_scale: '0.2arcsec' is not valid: must be a number > 0 (arcseconds per "
        "pixel). Fix: set it to the skymap's pixelScale in arcsec, e.g. 0.2 (the default) or "
        "0.168 (HSC), or leave it out.",
    ),
    "tract-overlap": (
        edit("builder: cells}", "builder: cells, tract_overlap: -1}"),
        "skymap.tract_overlap: -1 is not valid: must be a number >= 0 (degrees). "
        "Fix: set it to the skymap's tractOverlap in degrees; the default 1/60 is "
        "0.016666666666666666 (write all the digits: the hash uses the exact float), or leave "
        "it out.",
    ),
    "ra-start": (
        edit("builder: cells}", "builder: cells, ra_start: 360}"),
        "skymap.ra_start: 360 is not valid: must be a number in [0, 360) (degrees). "
        "Fix: set it to the skymap's raStart in degrees, e.g. 0.0 (the default), or leave it "
        "out.",
    ),
    "patch-inner-float": (
        edit("builder: cells}", "builder: legacy, patch_inner: 4000.0}"),
        "skymap.patch_inner: 4000.0 is not valid: must be a whole number > 0 (pixels). "
        "Fix: set it to the patch inner size in pixels (defaults: 3000 cells, 4000 legacy), or "
        "leave it out.",
    ),
    "patch-border": (
        edit("builder: cells}", "builder: legacy, patch_border: -1}"),
        "skymap.patch_border: -1 is not valid: must be a whole number >= 0 (pixels). "
        "Fix: set it to the patch border in pixels (defaults: 200 cells, 100 legacy), or leave "
        "it out.",
    ),
    "patch-inner-not-whole-cells": (
        edit("builder: cells}", "builder: cells, patch_inner: 4000}"),
        "skymap.patch_inner: 4000 is not valid: with the cells builder patch_inner must be a "
        "positive multiple of the 150 px cell (e.g. 3000 = 20 cells), not 4000. "
        "Fix: use a size the cells builder can make (150 px cells, 50 px cell border), or "
        "'builder: legacy' for other patch sizes.",
    ),
    "patch-border-not-whole-cells": (
        edit("builder: cells}", "builder: cells, patch_border: 100}"),
        "skymap.patch_border: 100 is not valid: with the cells builder patch_border must be 50 "
        "px plus whole 150 px cells (50, 200, 350, ...), not 100. "
        "Fix: use a size the cells builder can make (150 px cells, 50 px cell border), or "
        "'builder: legacy' for other patch sizes.",
    ),
    "skymap-key-typo": (
        edit("builder: cells}", "builder: cells, pixelscale: 0.2}"),
        "skymap.pixelscale: unknown key 'pixelscale' (did you mean 'pixel_scale'?). "
        "Fix: rename 'pixelscale' to 'pixel_scale'.",
    ),
    "instrument": (
        edit("instrument: LSSTCam-imSim", "instrument: LSSTcam"),
        "instrument: 'LSSTcam' is not valid: must be one of LSSTCam, LSSTCam-imSim, LSSTComCam "
        "(did you mean 'LSSTCam'?). Fix: use 'LSSTCam'.",
    ),
    "preset": (
        edit("preset: dc2-test-med-1", "preset: dr2"),
        "survey.preset: 'dr2' is not valid: must be one of dc2-test-med-1, dp0.2, dr1 "
        "(did you mean 'dr1'?). Fix: use 'dr1'.",
    ),
    "visits-zero": (
        edit("{preset: dc2-test-med-1, seed: 1}", "{preset: dr1, visits: 0}"),
        "survey.visits: 0 is not valid: must be a positive whole number (to sub-sample a "
        "preset) or the path of a visits CSV. Fix: give a visit count such as 240000 with a "
        "preset, or a CSV path relative to the spec.",
    ),
    "count-without-preset": (
        edit("{preset: dc2-test-med-1, seed: 1}", "{seed: 1, visits: 300}"),
        "survey.visits: 300 is not valid: a visit count only sub-samples a preset. "
        "Fix: add 'preset: dr1' (or another preset), or give 'visits: path/to/visits.csv'.",
    ),
    "preset-and-csv": (
        edit("{preset: dc2-test-med-1, seed: 1}", "{preset: dr1, visits: v.csv}"),
        "survey: {'preset': 'dr1', 'visits': 'v.csv'} is not valid: give either a preset or a "
        "visits CSV, not both. Fix: remove 'preset' to use the CSV, or remove 'visits' to use "
        "the preset.",
    ),
    "no-visit-source": (
        edit("{preset: dc2-test-med-1, seed: 1}", "{seed: 1}"),
        "survey: {'seed': 1} is not valid: needs a preset or a visits CSV. "
        "Fix: add 'preset: dc2-test-med-1' (or dp0.2, dr1) or 'visits: path/to/visits.csv'.",
    ),
    "csv-columns": (
        edit("{preset: dc2-test-med-1, seed: 1}", "{visits: bad.csv}"),
        "survey.visits: 'bad.csv' is not valid: {dir}/bad.csv: line 1, column 'rotation': is "
        "missing from the header 'visit,band,ra,dec'. Fix: make the first line exactly "
        "'visit,band,ra,dec,rotation' (ra, dec and rotation in degrees).",
    ),
    "csv-missing": (
        edit("{preset: dc2-test-med-1, seed: 1}", "{visits: missing.csv}"),
        "survey.visits: 'missing.csv' is not valid: {dir}/missing.csv: file not found. "
        "Fix: check the path; survey.visits in a spec is relative to the spec file.",
    ),
    "steps-missing": (
        GOOD.split("steps:")[0],
        "steps: required key is missing. "
        "Fix: add 'steps: [{name: step1, subset: step1, shard: visit, placement: per-site}]'.",
    ),
    "steps-empty": (
        GOOD.split("steps:")[0] + "steps: []\n",
        "steps: [] is not valid: must be a non-empty list of steps. Fix: list the steps in "
        "order, e.g. '- {name: step1, subset: step1, shard: visit, placement: per-site}'.",
    ),
    "step-not-a-mapping": (
        edit("  - {name: step4, subset: step4, shard: visit, placement: per-site}", "  - step4"),
        "steps[4]: 'step4' is not valid: must be a mapping {name, subset, shard, placement}. "
        "Fix: write it as e.g. '{name: step1, subset: step1, shard: visit, "
        "placement: per-site}'.",
    ),
    "skymap-not-a-mapping": (
        edit("{name: DC2_cells_v1, rings: 120, builder: cells}", "DC2_cells_v1"),
        "skymap: 'DC2_cells_v1' is not valid: must be a mapping {name, rings, builder} "
        "(optionally pixel_scale, tract_overlap, ra_start, patch_inner, patch_border). "
        "Fix: write it as e.g. '{name: lsst_cells_v1, rings: 120, builder: cells}'.",
    ),
    "yaml-syntax": (
        edit("{name: step1, subset: step1,", "{name: step1, subset: step1"),
        "line 14, column 38: YAML syntax error: while parsing a flow mapping, expected ',' or "
        f"'}}', but got ':'. {YAML_FIX}",
    ),
    "duplicate-site": (
        edit("  UKDF:", "  FrDF:"),
        "line 10, column 3: YAML syntax error: duplicate key 'FrDF' (first at line 9). "
        "Fix: remove or rename one of the two entries.",
    ),
    "top-level-list": (
        "- campaign: x\n",
        "the top level must be a mapping of the keys campaign, instrument, skymap, survey, hub, "
        "sites, partition, pipeline, steps, inputs, temporaries, pvi, not a list. "
        "Fix: write the spec as in DESIGN.md section 7, starting with 'campaign: <name>'.",
    ),
    "empty-file": (
        "# nothing yet\n",
        "the file is empty. "
        "Fix: write the spec as in DESIGN.md section 7, starting with 'campaign: <name>'.",
    ),
}


@pytest.mark.parametrize(("text", "message"), list(BAD.values()), ids=list(BAD))
def test_bad_spec_message(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.csv").write_text("visit,band,ra,dec\n1,r,0,0\n")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    expected = f"{path}: " + message.replace("{dir}", str(tmp_path))
    assert str(info.value) == expected
    assert info.value.path == str(path)
    assert len(info.value.problems) == 1


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path}: file not found. "
        "Fix: check the path; the shipped specs are in deployments/campaigns/."
    )


def test_file_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "x.yaml").write_text(edit("share: 0.40", "share: 1.4"))
    with pytest.raises(SpecError) as info:
        load_spec("campaigns/x.yaml")
    error = info.value
    assert str(error) == (
        "campaigns/x.yaml: 2 problems:\n"
        f"  sites.FrDF.share: 1.4 is not valid: must be a number in (0, 1]. {SHARE_FIX}\n"
        "  sites: shares summing to 2 (USDF 0.35 + FrDF 1.4 + UKDF 0.25) is not valid: the "
        f"shares must sum to 1 (within 1e-6). {SHARE_FIX}"
    )
    assert (error.path, error.key, error.value) == ("campaigns/x.yaml", "sites.FrDF.share", 1.4)
    assert error.fix == SHARE_FIX.removeprefix("Fix: ")


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = edit("hub: USDF", "hub: CERN", edit("rings: 120", "rings: true"))
    text = edit("{name: step3,", "{name: step2,", edit("cloud: US,", "cloud: US, region: x,", text))
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [(p.key, p.value if p.has_value else None) for p in info.value.problems] == [
        ("sites.USDF.region", None),
        ("skymap.rings", True),
        ("hub", "CERN"),
        ("steps[3].name", "step2"),
    ]
    assert str(info.value).splitlines()[0] == f"{path}: 4 problems:"
    assert "skymap.rings: true is not valid: must be a whole number >= 1." in str(info.value)


def test_skymap_config_keys() -> None:
    # DESIGN.md section 10: the whole RingsSkyMap config; YAML ints are fine for float keys.
    text = edit(
        "{name: DC2_cells_v1, rings: 120, builder: cells}",
        "{name: hsc_rings_v1, rings: 120, builder: legacy, pixel_scale: 0.168, "
        "tract_overlap: 0.016666666666666666, ra_start: 0, patch_inner: 4000, patch_border: 100}",
    )
    skymap = parse_spec(text).skymap
    assert (skymap.pixel_scale, skymap.tract_overlap, skymap.ra_start) == (0.168, 1 / 60, 0.0)
    assert (skymap.patch_inner, skymap.patch_border) == (4000, 100)
    assert isinstance(skymap.ra_start, float)
    one = parse_spec(edit("builder: cells}", "builder: cells, pixel_scale: 1}")).skymap
    assert one.pixel_scale == 1.0 and isinstance(one.pixel_scale, float)
    cells = parse_spec(edit("builder: cells}", "builder: cells, patch_border: 350}")).skymap
    assert cells.patch_border == 350
    # Left out: None, meaning the builder's default (the existing specs are unchanged).
    default = parse_spec(GOOD).skymap
    assert (default.pixel_scale, default.tract_overlap, default.ra_start) == (None, None, None)
    assert (default.patch_inner, default.patch_border) == (None, None)


def test_skymap_spec_built_in_code_checks_cells() -> None:
    from drp_campaign.model.spec import SkymapSpec

    assert SkymapSpec(name="x", builder="legacy", patch_inner=4000).patch_inner == 4000
    with pytest.raises(ValidationError, match="multiple of the 150 px cell"):
        SkymapSpec(name="x", builder="cells", patch_inner=4000)


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^<spec>: campaign: "):
        parse_spec(edit("campaign: dc2-test-med-1", "campaign: A"))
