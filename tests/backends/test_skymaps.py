"""The spec's skymap against the one a real Butler repository registered under that name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lsst.daf.butler import Butler
from lsst.daf.butler.registry import ConflictingDefinitionError

from drp_campaign.backends.butler import create_repo, register_skymap
from drp_campaign.backends.skymaps import (
    SkymapMismatch,
    check_registered_skymap,
    registered_skymap_hash,
)
from drp_campaign.model.sky import skymap_hash
from drp_campaign.model.spec import SkymapSpec

# hsc_rings_v1 as registered in HSC repositories (lsst.skymap's getSha1 of its config).
HSC = SkymapSpec(
    name="hsc_rings_v1", rings=120, builder="legacy", pixel_scale=0.168, tract_overlap=1 / 60
)
HSC_HASH = "e29fe9f1008e359f36a3677e7d69cc439376d1e6"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Butler]:
    root = tmp_path_factory.mktemp("skymaps") / "hub"
    with create_repo(root) as butler:
        register_skymap(butler, HSC, tracts=[3828])
        yield butler


def test_register_records_the_hash_of_the_whole_config(repo: Butler) -> None:
    assert registered_skymap_hash(repo, "hsc_rings_v1") == HSC_HASH
    (record,) = repo.query_dimension_records("skymap")
    assert (record.tract_max, record.patch_nx_max, record.patch_ny_max) == (
        18938,
        9,
        9,
    )  # HSC: 9x9 patches
    (patch,) = repo.query_dimension_records("patch", skymap="hsc_rings_v1", tract=3828, patch=0)
    assert (patch.cell_x, patch.cell_y) == (0, 0)


def test_same_config_is_registered(repo: Butler) -> None:
    assert check_registered_skymap(repo, HSC, "USDF") is True
    # Spelling out the builder's defaults is the same skymap.
    spelled = SkymapSpec(
        name="hsc_rings_v1",
        rings=120,
        builder="legacy",
        pixel_scale=0.168,
        tract_overlap=0.016666666666666666,
        ra_start=0,
        patch_inner=4000,
        patch_border=100,
    )
    assert check_registered_skymap(repo, spelled, "USDF") is True


def test_missing_name_is_not_registered(repo: Butler) -> None:
    other = SkymapSpec(name="DC2_cells_v1", rings=120, builder="cells")
    assert check_registered_skymap(repo, other, "USDF") is False
    assert registered_skymap_hash(repo, "DC2_cells_v1") is None


def test_other_pixel_scale_is_a_mismatch(repo: Butler) -> None:
    wrong = SkymapSpec(name="hsc_rings_v1", rings=120, builder="legacy")  # 0.2" by default
    ours = skymap_hash(wrong)
    with pytest.raises(SkymapMismatch) as info:
        check_registered_skymap(repo, wrong, "USDF (/repo/main)")
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.name, error.repo, error.registered_hash, error.spec_hash) == (
        "hsc_rings_v1",
        "USDF (/repo/main)",
        HSC_HASH,
        ours,
    )
    message = str(error)
    assert message == (
        f"skymap 'hsc_rings_v1' in USDF (/repo/main) has hash {HSC_HASH}, but the spec's skymap "
        f"hashes to {ours} (rings=120, builder=legacy, pixel_scale=0.2, "
        "tract_overlap=0.016666666666666666, ra_start=0.0, patch_inner=4000, patch_border=100; "
        "keys left out take the legacy builder's defaults). Check skymap.rings, builder, "
        "pixel_scale, tract_overlap, ra_start, patch_inner, patch_border against the config the "
        "skymap was registered with (the skyMap dataset in the 'skymaps' collection of USDF "
        "(/repo/main)). Fix: set those keys to that config (floats to every digit: the hash "
        "packs the exact values), or give the spec's skymap another name if it is meant to be a "
        "different skymap."
    )
    # Registering over it is refused by the registry itself.
    with pytest.raises(ConflictingDefinitionError):
        register_skymap(repo, wrong, tracts=())


def test_other_rings_say_so(repo: Butler) -> None:
    wrong = HSC.model_copy(update={"rings": 119})
    with pytest.raises(SkymapMismatch, match="has 18938 tracts and the spec's 18628"):
        check_registered_skymap(repo, wrong, "USDF")
