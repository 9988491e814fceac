"""Seeding: play the observatory for the embedded default, never part of a campaign.

A production campaign starts from repositories that exist: the hub's Butler with the raws and
their visits defined, the calibrations and the skymap; an empty (or skymap-only) Butler at each
data facility. For the demo and the tests, `seed_hub` writes into a hub repository what an
observatory's would hold — the mock instrument, the survey's visits with their regions, one mock
raw per (visit, detector), the mock calibrations and the skymap with the tracts the survey
touches — and `create_site_repos` makes the facilities' empty Butlers. The campaign then runs
against them exactly as against an operator's (`drp-campaign seed`, then `drp-campaign run`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .backends.butler import DEFAULT_FILE_SIZE, create_repo, populate_repo, site_repo_root
from .model.focalplane import focal_plane
from .model.plan import visit_tracts
from .model.sky import sky_map_for
from .model.spec import CampaignSpec
from .model.survey import survey_from_spec

__all__ = ["SeedResult", "create_site_repos", "embedded_repos", "seed_embedded", "seed_hub"]


@dataclass(frozen=True)
class SeedResult:
    """What seeding wrote.

    Attributes
    ----------
    hub : `pathlib.Path`
        The hub's repository.
    visits, tracts, raws : `int`
        Visits defined, tracts registered, raws newly ingested.
    sites : `dict` [`str`, `pathlib.Path`]
        Empty site repositories created (or found).
    """

    hub: Path
    visits: int
    tracts: int
    raws: int
    sites: dict[str, Path]


def seed_hub(
    spec: CampaignSpec,
    repo: str | Path,
    *,
    file_size: int = DEFAULT_FILE_SIZE,
    registry_db: str | None = None,
) -> SeedResult:
    """Write an observatory's hub repository for the spec's survey (idempotent).

    Parameters
    ----------
    spec : `CampaignSpec`
        A spec whose survey is a preset or a visits CSV (the mock instruments' focal planes
        give the visits' detector regions).
    repo : `str` or `pathlib.Path`
        The hub's repository directory (created if missing).
    file_size : `int`, optional
        Size of every mock raw and calibration file.
    registry_db : `str`, optional
        PostgreSQL URL for the registry; SQLite in the repository if `None`.

    Returns
    -------
    result : `SeedResult`
    """
    visits = survey_from_spec(spec)
    tracts = visit_tracts(sky_map_for(spec.skymap), focal_plane(spec.instrument), visits)
    seeded = populate_repo(
        repo,
        spec,
        visits,
        tracts,
        with_raws=True,
        with_calibs=True,
        file_size=file_size,
        registry_db=registry_db,
        site=spec.hub,
    )
    return SeedResult(Path(repo), len(visits), len(tracts), seeded.n_raws, {})


def create_site_repos(
    repos: Mapping[str, str | Path], *, registry_db: str | None = None
) -> dict[str, Path]:
    """Create empty Butler repositories (as ``butler create`` does); existing ones are kept.

    Parameters
    ----------
    repos : mapping of `str` to path
        Site -> repository directory.
    registry_db : `str`, optional
        PostgreSQL URL (one schema per repository); SQLite if `None`.

    Returns
    -------
    repos : `dict` [`str`, `pathlib.Path`]
    """
    out: dict[str, Path] = {}
    for site, root in repos.items():
        create_repo(root, registry_db=registry_db).close()
        out[site] = Path(root)
    return out


def embedded_repos(spec: CampaignSpec, workdir: str | Path) -> dict[str, str]:
    """The embedded default's repositories: ``<workdir>/repos/<site>`` (what its Blocks name)."""
    root = Path(workdir).expanduser().absolute()
    return {site: str(site_repo_root(root, site)) for site in spec.site_names}


def seed_embedded(
    spec: CampaignSpec,
    workdir: str | Path,
    *,
    file_size: int = DEFAULT_FILE_SIZE,
    registry_db: str | None = None,
) -> SeedResult:
    """Seed the embedded default: the hub's repository and the other sites' empty ones.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign.
    workdir : `str` or `pathlib.Path`
        Its work directory (repositories at `embedded_repos`).
    file_size : `int`, optional
        Size of every mock raw and calibration file.
    registry_db : `str`, optional
        PostgreSQL URL; SQLite if `None`.

    Returns
    -------
    result : `SeedResult`
    """
    repos = embedded_repos(spec, workdir)
    hub = seed_hub(spec, repos[spec.hub], file_size=file_size, registry_db=registry_db)
    sites = create_site_repos(
        {s: r for s, r in repos.items() if s != spec.hub}, registry_db=registry_db
    )
    return SeedResult(hub.hub, hub.visits, hub.tracts, hub.raws, sites)
