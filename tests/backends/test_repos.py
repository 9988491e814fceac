"""Adopting an operator's repositories (`drp_campaign.backends.repos`), against real Butlers.

The hub is seeded as the observatory would hold it (`drp_campaign.seed.seed_hub`); the sites are
empty repositories. Setup must copy only what a site lacks, change nothing when rerun, and refuse
with a message naming repository, problem and fix what it cannot repair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lsst.daf.butler import Butler

from drp_campaign.backends.butler import create_repo, open_repo, register_skymap
from drp_campaign.backends.pipeline import pipeline_inputs
from drp_campaign.backends.repos import (
    EMBEDDED_SOURCE,
    RepoError,
    RepoUnavailable,
    adopt_repo,
    check_hub,
    check_repo,
    classify_inputs,
    ensure_chain,
    mirror_collections,
)
from drp_campaign.campaign import is_product, product_filter
from drp_campaign.model.sky import skymap_hash
from drp_campaign.model.spec import CampaignSpec, load_spec
from drp_campaign.seed import seed_hub

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
PIPELINE = ROOT / "pipelines" / "DRP-mock.yaml"


@dataclass(frozen=True)
class Hub:
    spec: CampaignSpec
    root: Path
    visits: list[int]
    tracts: list[int]


def _spec(directory: Path, temporaries: str | None = None) -> Path:
    text = (
        DEMO.read_text()
        .replace("visits: 8}", "visits: 3}")
        .replace("yaml: pipelines/", f"yaml: {ROOT}/pipelines/")
    )
    if temporaries is not None:
        shipped = "temporaries: [postISRCCD, directWarp, psfMatchedWarp]\n"
        assert shipped in text
        text = text.replace(shipped, temporaries)
    path = directory / f"spec-{abs(hash(temporaries))}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    base = tmp_path_factory.mktemp("repos")
    spec = load_spec(_spec(base))
    seed_hub(spec, base / "hub")
    with open_repo(base / "hub", writeable=False) as butler:
        visits = sorted(
            int(r.id) for r in butler.query_dimension_records("visit", instrument=spec.instrument)
        )
        tracts = sorted(
            int(r.id) for r in butler.query_dimension_records("tract", skymap=spec.skymap.name)
        )
    yield Hub(spec, base / "hub", visits, tracts)


def _counts(butler: Butler, hub: Hub) -> dict[str, int]:
    spec = hub.spec
    by_instrument = ("detector", "visit", "visit_detector_region", "exposure")
    counts = {
        element: len(
            butler.query_dimension_records(element, instrument=spec.instrument, explain=False)
        )
        for element in by_instrument
    }
    counts["patch"] = len(
        butler.query_dimension_records("patch", skymap=spec.skymap.name, explain=False)
    )
    return counts


def _adopt(site: Butler, hub_butler: Butler, hub: Hub) -> dict[str, int]:
    return adopt_repo(
        site,
        hub_butler,
        instrument=hub.spec.instrument,
        visits=hub.visits,
        skymap=hub.spec.skymap.name,
        tracts=hub.tracts,
        label="FrDF test repository",
    )


def test_adopt_copies_what_a_site_lacks_and_a_rerun_changes_nothing(
    hub: Hub, tmp_path: Path
) -> None:
    inputs = hub.spec.input_collections
    with (
        open_repo(hub.root, writeable=False) as hub_butler,
        create_repo(tmp_path / "site") as site,
    ):
        assert _counts(site, hub)["visit"] == 0
        _adopt(site, hub_butler, hub)
        adopted = _counts(site, hub)
        assert adopted == _counts(hub_butler, hub)  # the hub holds only the campaign's visits
        assert adopted["visit"] == 3 and adopted["visit_detector_region"] == 3 * 9
        # The skymap record came with its hash: the same skymap, not one of the same name.
        (record,) = site.query_dimension_records("skymap", skymap=hub.spec.skymap.name)
        assert bytes(record.hash).hex() == skymap_hash(hub.spec.skymap)
        mirrored = mirror_collections(hub_butler, site, inputs.all, label="FrDF")
        assert set(inputs.all) <= set(site.collections.query("*"))
        assert ensure_chain(site, "c/inputs", inputs.all) is True
        # No dataset was written: the inputs arrive through the catalog.
        assert list(site.registry.queryDatasets(..., collections=...)) == []

        _adopt(site, hub_butler, hub)
        assert _counts(site, hub) == adopted
        assert mirror_collections(hub_butler, site, inputs.all, label="FrDF") == []
        assert ensure_chain(site, "c/inputs", inputs.all) is False
        assert mirrored  # the first call did create them


def test_a_site_skymap_of_another_geometry_is_refused(hub: Hub, tmp_path: Path) -> None:
    other = hub.spec.skymap.model_copy(update={"pixel_scale": 0.168})
    with (
        open_repo(hub.root, writeable=False) as hub_butler,
        create_repo(tmp_path / "site") as site,
    ):
        register_skymap(site, other, tracts=())
        with pytest.raises(RepoError) as info:
            _adopt(site, hub_butler, hub)
    message = str(info.value)
    assert "FrDF test repository" in message and repr(hub.spec.skymap.name) in message
    assert skymap_hash(other) in message and skymap_hash(hub.spec.skymap) in message
    assert "another name" in message


def test_check_hub_names_what_is_missing(hub: Hub) -> None:
    spec = hub.spec
    with open_repo(hub.root, writeable=False) as butler:

        def check(**changes: object) -> None:
            args: dict[str, object] = {
                "instrument": spec.instrument,
                "visits": hub.visits,
                "skymap": spec.skymap,
                "tracts": hub.tracts,
                "inputs": spec.input_collections,
                "label": "hub X",
            }
            check_hub(butler, **{**args, **changes})  # type: ignore[arg-type]

        check()  # the seeded hub holds everything
        with pytest.raises(RepoError, match=r"hub X: 1 of the campaign's 4 visits.*define-visits"):
            check(visits=[*hub.visits, 999_999])
        with pytest.raises(RepoError, match=r"skymap.*hash.*pixel_scale"):
            check(skymap=spec.skymap.model_copy(update={"pixel_scale": 0.168}))
        with pytest.raises(RepoError, match=r"skymap 'nope' is not registered"):
            check(skymap=spec.skymap.model_copy(update={"name": "nope"}))
        with pytest.raises(RepoError, match=r"lacks 1 tract"):
            check(tracts=[*hub.tracts, 99_999])
        wrong = spec.inputs.model_copy(update={"raws": "LSSTComCam/raw/nope"})
        with pytest.raises(RepoError, match=r"no collection 'LSSTComCam/raw/nope'.*'inputs'"):
            check(inputs=wrong.collections(spec.instrument))


def test_an_unopenable_repository_names_site_uri_and_block(tmp_path: Path) -> None:
    uri = str(tmp_path / "missing")
    with pytest.raises(RepoUnavailable) as info:
        check_repo("FrDF", uri, "data-facility/c-frdf")
    message = str(info.value)
    assert "site FrDF" in message and uri in message
    assert "Fix 'butler_repo' in the Block data-facility/c-frdf" in message
    with pytest.raises(RepoUnavailable, match=r"drp-campaign seed SPEC --workdir WORKDIR"):
        check_repo("FrDF", uri, EMBEDDED_SOURCE)


def test_what_moves_is_what_the_pipeline_reads(hub: Hub) -> None:
    names = pipeline_inputs(str(PIPELINE), [s.subset for s in hub.spec.steps])
    with open_repo(hub.root, writeable=False) as butler:
        kinds = classify_inputs(butler, hub.spec.input_collections, names)
    assert set(kinds.raws) | set(kinds.calibs) | set(kinds.extra) | set(kinds.absent) == set(names)
    # Found by where they are at the hub, not by name: raws, certified calibrations, the rest.
    assert kinds.raws == ("raw",)
    assert set(kinds.calibs) == {"bias", "flat"}
    assert kinds.extra == ("skyMap",)
    # Only the steps run count: step1 (isr, calibrateImage) reads no skymap.
    step1 = pipeline_inputs(str(PIPELINE), ["step1"])
    assert "raw" in step1 and "skyMap" not in step1


def test_temporaries_come_from_the_spec(tmp_path: Path) -> None:
    default = load_spec(_spec(tmp_path, ""))  # the key left out: the emulated pipeline's
    assert not is_product("directWarp", default.temporaries)
    assert is_product("calexp", default.temporaries)
    custom = load_spec(_spec(tmp_path, "temporaries: [post_isr_image, direct_warp]\n"))
    keep = product_filter(custom)
    assert not keep("post_isr_image") and not keep("direct_warp")
    assert keep("directWarp")  # not a temporary of this spec's pipeline
    assert not keep("calexp_config") and not keep("packages")  # bookkeeping never is
