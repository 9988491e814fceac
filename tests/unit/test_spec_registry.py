"""Campaign spec: the registry survey form ``survey: {butler: REPO, where: QUERY}``."""

from __future__ import annotations

from pathlib import Path

import pytest

from drp_campaign.model.spec import SpecError, SurveySpec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
GOOD = (REPO / "deployments" / "campaigns" / "dc2-test-med-1.yaml").read_text()
PRESET = "{preset: dc2-test-med-1, seed: 1}"


def registry_spec(survey: str, instrument: str = "LSSTCam-imSim") -> str:
    """The shipped example with another survey (and instrument)."""
    assert GOOD.count(PRESET) == 1
    text = GOOD.replace(PRESET, survey)
    return text.replace("instrument: LSSTCam-imSim", f"instrument: {instrument}")


def test_relative_repo_resolves_against_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "campaigns" / "spec.yaml"
    path.parent.mkdir()
    path.write_text(registry_spec("{butler: ../repos/hub, where: \"band = 'r'\"}", "HSC"))
    spec = load_spec(path)
    assert spec.instrument == "HSC"
    assert spec.survey.is_registry
    assert spec.survey.butler == "../repos/hub"
    assert spec.survey.butler_uri == str(tmp_path / "repos" / "hub")
    assert spec.survey.where == "band = 'r'"


@pytest.mark.parametrize(
    "uri",
    ["postgresql://butler@db.example.org:5432/dr1", "s3://bucket/repo/butler.yaml", "file:///r"],
)
def test_uris_are_kept_as_written(uri: str) -> None:
    spec = parse_spec(registry_spec(f"{{butler: '{uri}'}}", "LSSTComCam"))
    assert spec.survey.butler_uri == uri
    assert spec.survey.where is None


def test_absolute_butler_yaml_path_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "repo" / "butler.yaml"
    spec = parse_spec(registry_spec(f"{{butler: {config}}}", "FakeCam"))
    assert spec.survey.butler_uri == str(config)


BAD: dict[str, tuple[str, str, str]] = {
    "preset-and-butler": (
        "{preset: dr1, butler: repo}",
        "LSSTCam",
        "survey: {'preset': 'dr1', 'butler': 'repo'} is not valid: give exactly one visit "
        "source (preset, visits or butler), not butler and preset. Fix: remove 'preset' to read "
        "the visits from the registry, or remove 'butler' (and 'where').",
    ),
    "csv-and-butler": (
        "{visits: v.csv, butler: repo}",
        "LSSTCam",
        "survey: {'visits': 'v.csv', 'butler': 'repo'} is not valid: give exactly one visit "
        "source (preset, visits or butler), not butler and visits. Fix: remove 'visits' to read "
        "the visits from the registry, or remove 'butler' (and 'where').",
    ),
    "where-without-butler": (
        "{preset: dr1, where: \"band = 'r'\"}",
        "LSSTCam",
        "survey.where: \"band = 'r'\" is not valid: a query only selects visits of a Butler "
        "registry. Fix: add 'butler: path/to/repo' to read the visits from a registry, or remove "
        "'where'.",
    ),
    "empty-where": (
        "{butler: repo, where: ' '}",
        "HSC",
        "survey.where: ' ' is not valid: the query is empty. Fix: remove 'where' to take every "
        "visit of the instrument, or write a query such as \"band = 'r'\".",
    ),
    "empty-butler": (
        "{butler: ''}",
        "HSC",
        "survey.butler: '' is not valid: must be a Butler repository: a path relative to the "
        "spec, or a URI. Fix: give the repository root (or its butler.yaml) relative to the "
        "spec, or a URI such as 'postgresql://host/db' or 's3://bucket/repo/butler.yaml'.",
    ),
    "unmodelled-instrument-with-preset": (
        PRESET,
        "HSC",
        "instrument: 'HSC' is not valid: must be one of LSSTCam, LSSTCam-imSim, LSSTComCam. "
        "Fix: set instrument to LSSTCam, LSSTCam-imSim or LSSTComCam, or read the survey from a "
        "registry ('survey: {butler: REPO}') to plan any instrument registered there.",
    ),
    "empty-instrument": (
        "{butler: repo}",
        "''",
        "instrument: '' is not valid: must be one of LSSTCam, LSSTCam-imSim, LSSTComCam. "
        "Fix: set instrument to LSSTCam, LSSTCam-imSim or LSSTComCam, or read the survey from a "
        "registry ('survey: {butler: REPO}') to plan any instrument registered there.",
    ),
}


@pytest.mark.parametrize(("survey", "instrument", "message"), list(BAD.values()), ids=list(BAD))
def test_bad_registry_survey_message(
    tmp_path: Path, survey: str, instrument: str, message: str
) -> None:
    (tmp_path / "v.csv").write_text("visit,band,ra,dec,rotation\n1,r,0,0,0\n")
    path = tmp_path / "spec.yaml"
    path.write_text(registry_spec(survey, instrument))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {message}"
    assert len(info.value.problems) == 1


def test_model_built_in_code_applies_the_same_rules() -> None:
    assert SurveySpec(butler="repo", where="band = 'r'").is_registry
    with pytest.raises(ValueError, match="give exactly one visit source"):
        SurveySpec(butler="repo", preset="dr1")
