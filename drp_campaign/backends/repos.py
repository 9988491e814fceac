"""The operator's repositories: open them, adopt them, and find what the pipeline reads.

A real campaign starts from what exists (DESIGN.md section 10): a hub Butler holding the raws
with their visits defined, the calibrations and the skymap; a Butler at each site. The campaign
never writes raws or calibrations into any of them. What it does, per site:

- **check** that the repository named by the site's `DataFacility` Block opens (`check_repo`);
- at the hub, **check** that the instrument, the visits of the plan, the skymap (with its
  hash) and the tracts the plan touches are registered, and that the spec's input collections
  exist (`check_hub`);
- elsewhere, **adopt** (`adopt_repo`): copy from the hub the dimension records the campaign's
  visits and tracts need, with daf_butler's own ``transfer_dimension_records_from`` (which
  also brings the records that refer to them: ``visit_definition``, ``visit_detector_region``,
  ``visit_system_membership``), refuse a skymap registered under the same name with another
  hash, and mirror the *structure* of the hub's input collections (empty RUN, CALIBRATION and
  CHAINED collections of the same names) so the replicated inputs land where the graphs look;
- everywhere, create the campaign's own input chain ``<campaign>/inputs``.

Rerunning any of it changes nothing. What the pipeline reads is found from the pipeline itself
(`drp_campaign.backends.pipeline.pipeline_inputs`: its overall inputs), and where each of those
lives from the spec's input collections (`classify_inputs`), so no DRP dataset type is named here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lsst.daf.butler import (
    Butler,
    CollectionType,
    DataCoordinate,
    DatasetRef,
    MissingCollectionError,
    MissingDatasetTypeError,
    Timespan,
)
from lsst.resources import ResourcePath

from ..model.spec import ResolvedInputs, SkymapSpec
from .butler import has_collection, open_repo, register_run
from .skymaps import SkymapMismatch, check_registered_skymap, registered_skymap_hash

__all__ = [
    "EMBEDDED_SOURCE",
    "CampaignInputs",
    "RepoError",
    "RepoUnavailable",
    "adopt_repo",
    "calib_associations",
    "certify_associations",
    "check_hub",
    "check_repo",
    "classify_inputs",
    "ensure_chain",
    "mirror_collections",
    "repo_root",
]

#: Visits per dimension-record transfer: bounded memory and transaction size at DR1 scale.
_VISITS_PER_BATCH = 500


class RepoError(RuntimeError):
    """A repository is not what the campaign needs; the message names it, what and the fix."""


# Where a site's repository comes from when no DataFacility Block names one.
EMBEDDED_SOURCE = "the embedded default (no DataFacility Block for this site)"


class RepoUnavailable(RepoError):
    """A site's repository cannot be opened."""

    def __init__(self, site: str, uri: str, block: str, cause: BaseException | str) -> None:
        self.site, self.uri, self.block = site, uri, block
        if block == EMBEDDED_SOURCE:
            # Nobody wrote a Block: the operator most likely forgot to seed the demo.
            fix = (
                f"It is {block}: seed the embedded default's repositories first "
                "('drp-campaign seed SPEC --workdir WORKDIR'), or save a DataFacility Block "
                f"for {site} whose 'butler_repo' names its repository."
            )
        else:
            fix = (
                f"Fix 'butler_repo' in the Block {block} (a repository directory, its "
                "butler.yaml or any URI daf_butler opens), or create the repository there "
                f"('butler create {uri}')."
            )
        super().__init__(
            f"the Butler repository of site {site} cannot be opened: {uri} ({cause}). {fix}"
        )


def repo_root(uri: str | Path) -> Path:
    """The local directory of a repository named by a directory, a config file or a URI.

    The datastore's files (and the graphs the campaign writes beside them) are under it, and
    the embedded catalog's RSEs link to it.

    Parameters
    ----------
    uri : `str` or `pathlib.Path`
        ``/path/repo``, ``/path/repo/butler.yaml``, ``file:///path/repo``...

    Returns
    -------
    root : `pathlib.Path`
        The directory.

    Raises
    ------
    RepoError
        If the URI is not on a local file system.
    """
    path = ResourcePath(str(uri), forceAbsolute=True)
    if path.scheme not in ("", "file"):
        raise RepoError(
            f"repository {uri}: the embedded default moves files on a local file system, and "
            f"{path.scheme}:// is not one; use a local repository or the Rucio backend"
        )
    local = Path(path.ospath)
    if local.suffix in (".yaml", ".yml", ".json") or local.is_file():
        return local.parent
    return local


def check_repo(site: str, uri: str, block: str) -> None:
    """Open a site's repository read-only, or raise `RepoUnavailable` naming site, URI and Block.

    Parameters
    ----------
    site : `str`
        Site name.
    uri : `str`
        The Block's ``butler_repo``.
    block : `str`
        The Block's full name (``data-facility/<campaign>-<site>``), to fix it.
    """
    try:
        with open_repo(uri, writeable=False) as butler:
            butler.collections.query("*")
    except Exception as exc:  # whatever daf_butler raises, the operator needs the same advice
        raise RepoUnavailable(site, uri, block, f"{type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class CampaignInputs:
    """Where the pipeline's overall inputs are at the hub, by kind.

    Attributes
    ----------
    raws : `tuple` [`str`]
        Dataset types found in the raws collection (moved per site, by visit).
    calibs : `tuple` [`str`]
        Calibration dataset types found in the calibration collection (moved to every site and
        certified there with the hub's validity ranges).
    extra : `tuple` [`str`]
        Other inputs found in the extra collections (moved to every site).
    absent : `tuple` [`str`]
        Overall inputs in none of them (made or staged during the campaign, or optional).
    """

    raws: tuple[str, ...]
    calibs: tuple[str, ...]
    extra: tuple[str, ...]
    absent: tuple[str, ...] = field(default=())


def _has_datasets(butler: Butler, name: str, collections: Sequence[str]) -> bool:
    try:
        return bool(butler.query_datasets(name, collections=collections, explain=False, limit=1))
    except (MissingDatasetTypeError, MissingCollectionError):
        return False


def classify_inputs(hub: Butler, inputs: ResolvedInputs, names: Iterable[str]) -> CampaignInputs:
    """Find each of the pipeline's overall inputs in the hub's input collections.

    Parameters
    ----------
    hub : `lsst.daf.butler.Butler`
        The hub's repository.
    inputs : `ResolvedInputs`
        The spec's input collections.
    names : iterable of `str`
        Dataset type names (`pipeline_inputs`).

    Returns
    -------
    inputs : `CampaignInputs`
    """
    raws: list[str] = []
    calibs: list[str] = []
    extra: list[str] = []
    absent: list[str] = []
    for name in names:
        if _has_datasets(hub, name, [inputs.raws]):
            raws.append(name)
        elif (
            _has_datasets(hub, name, [inputs.calibs]) and hub.get_dataset_type(name).isCalibration()
        ):
            calibs.append(name)
        elif inputs.extra and _has_datasets(hub, name, list(inputs.extra)):
            extra.append(name)
        else:
            absent.append(name)
    return CampaignInputs(tuple(raws), tuple(calibs), tuple(extra), tuple(absent))


def calib_associations(
    hub: Butler, calibs: str, dataset_types: Iterable[str]
) -> list[tuple[DatasetRef, str, Timespan]]:
    """Every certification of the calibrations: (ref, CALIBRATION collection, validity range).

    Parameters
    ----------
    hub : `lsst.daf.butler.Butler`
        The hub's repository.
    calibs : `str`
        The spec's calibration collection (CHAINED, or one CALIBRATION collection).
    dataset_types : iterable of `str`
        Calibration dataset types.

    Returns
    -------
    associations : `list` of `tuple`
    """
    out: list[tuple[DatasetRef, str, Timespan]] = []
    for name in dataset_types:
        for assoc in hub.registry.queryDatasetAssociations(
            name,
            collections=[calibs],
            collectionTypes={CollectionType.CALIBRATION},
            flattenChains=True,
        ):
            assert assoc.timespan is not None  # CALIBRATION associations always have one
            out.append((assoc.ref, assoc.collection, assoc.timespan))
    return out


def certify_associations(
    butler: Butler, associations: Iterable[tuple[DatasetRef, str, Timespan]]
) -> int:
    """Certify arrived calibrations as the hub did: same collections, same validity ranges.

    Idempotent: a certification already present is not repeated.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The site's repository, writeable; the calibrations are ingested.
    associations : iterable of `tuple`
        `calib_associations` of the hub.

    Returns
    -------
    n : `int`
        Certifications made now.
    """
    groups: dict[tuple[str, Timespan], list[DatasetRef]] = {}
    for ref, collection, timespan in associations:
        groups.setdefault((collection, timespan), []).append(ref)
    n = 0
    for (collection, timespan), refs in groups.items():
        present = {
            (a.ref.id, a.timespan)
            for name in {r.datasetType.name for r in refs}
            for a in butler.registry.queryDatasetAssociations(
                name, collections=[collection], collectionTypes={CollectionType.CALIBRATION}
            )
        }
        new = [r for r in refs if (r.id, timespan) not in present]
        if new:
            butler.registry.certify(collection, new, timespan)
            n += len(new)
    return n


# ------------------------------------------------------------------------------ collections
def ensure_chain(butler: Butler, name: str, children: Sequence[str]) -> bool:
    """Define a CHAINED collection with ``children``, in one transaction; unchanged if it is.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        A writeable repository.
    name : `str`
        The chain.
    children : sequence of `str`
        Its children, in order (they must exist).

    Returns
    -------
    changed : `bool`
        Whether the chain was created or redefined now.
    """
    with butler.transaction():
        created = butler.collections.register(name, CollectionType.CHAINED)
        if not created and list(butler.collections.get_info(name).children) == list(children):
            return False
        butler.collections.redefine_chain(name, list(children))
    return True


def mirror_collections(hub: Butler, dst: Butler, names: Iterable[str], *, label: str) -> list[str]:
    """Create at ``dst`` the hub's collections ``names``, empty, with their types and chains.

    Replicated inputs are ingested into their hub RUN and certified into their hub CALIBRATION
    collection: those must exist at the site, and the chains the spec names must lead to them.

    Parameters
    ----------
    hub, dst : `lsst.daf.butler.Butler`
        The hub's repository (read) and a site's (written).
    names : iterable of `str`
        Collections of the hub.
    label : `str`
        The site's repository, for errors.

    Returns
    -------
    created : `list` [`str`]
        Collections created or redefined now.

    Raises
    ------
    RepoError
        If the hub lacks a collection, or ``dst`` has one of another type.
    """
    created: list[str] = []
    done: set[str] = set()

    def mirror(name: str) -> None:
        if name in done:
            return
        done.add(name)
        try:
            info = hub.collections.get_info(name)
        except MissingCollectionError:
            raise RepoError(
                f"the hub's repository has no collection {name!r}: fix the spec's 'inputs' "
                "(raws, calibs, extra) to name the hub's input collections"
            ) from None
        if has_collection(dst, name):
            have = dst.collections.get_info(name).type
            if have != info.type:
                raise RepoError(
                    f"{label}: collection {name!r} is {have.name} there but {info.type.name} at "
                    f"the hub; the campaign replicates the hub's inputs into it. Remove or "
                    "rename it in that repository"
                )
        if info.type == CollectionType.CHAINED:
            for child in info.children:
                mirror(child)
            if ensure_chain(dst, name, info.children):
                created.append(name)
        elif info.type == CollectionType.RUN:
            if register_run(dst, name):
                created.append(name)
        elif dst.collections.register(name, info.type):
            created.append(name)

    for name in names:
        mirror(name)
    return created


# ------------------------------------------------------------------------- dimension records
def _missing_visits(butler: Butler, instrument: str, visits: Sequence[int]) -> list[int]:
    found: set[int] = set()
    for start in range(0, len(visits), _VISITS_PER_BATCH):
        batch = [int(v) for v in visits[start : start + _VISITS_PER_BATCH]]
        found.update(
            int(r.id)
            for r in butler.query_dimension_records(
                "visit",
                where="instrument = inst AND visit IN (visits)",
                bind={"inst": instrument, "visits": batch},
                explain=False,
            )
        )
    return sorted(set(int(v) for v in visits) - found)


def _missing_tracts(butler: Butler, skymap: str, tracts: Sequence[int]) -> list[int]:
    if not tracts:
        return []
    found = {
        int(r.id)
        for r in butler.query_dimension_records(
            "tract",
            where="skymap = sm AND tract IN (tracts)",
            bind={"sm": skymap, "tracts": [int(t) for t in tracts]},
            explain=False,
        )
    }
    return sorted(set(int(t) for t in tracts) - found)


def _show(ids: Sequence[int], limit: int = 8) -> str:
    return ", ".join(str(i) for i in ids[:limit]) + (" ..." if len(ids) > limit else "")


def check_hub(
    hub: Butler,
    *,
    instrument: str,
    visits: Sequence[int],
    skymap: SkymapSpec,
    tracts: Sequence[int],
    inputs: ResolvedInputs,
    label: str,
) -> None:
    """Check that the hub holds what the campaign reads; raise `RepoError` naming what is not.

    Parameters
    ----------
    hub : `lsst.daf.butler.Butler`
        The hub's repository.
    instrument : `str`
        The spec's instrument.
    skymap : `~drp_campaign.model.spec.SkymapSpec`
        The spec's skymap: its name must be registered with the same geometry hash.
    visits, tracts : sequence of `int`
        The plan's visits and the tracts they touch.
    inputs : `ResolvedInputs`
        The spec's input collections.
    label : `str`
        The hub's repository (URI and Block), for errors.
    """
    if not list(hub.query_dimension_records("instrument", instrument=instrument, explain=False)):
        raise RepoError(
            f"{label}: instrument {instrument!r} is not registered; register it there "
            f"('butler register-instrument') or fix 'instrument' in the spec"
        )
    missing = _missing_visits(hub, instrument, visits)
    if missing:
        raise RepoError(
            f"{label}: {len(missing)} of the campaign's {len(visits)} visits are not defined "
            f"({_show(missing)}); define them there ('butler define-visits') or plan from the "
            "visits the hub holds"
        )
    try:
        registered = check_registered_skymap(hub, skymap, label)
    except SkymapMismatch as err:
        raise RepoError(str(err)) from err
    if not registered:
        raise RepoError(
            f"{label}: skymap {skymap.name!r} is not registered; register it there, or fix "
            "'skymap.name' in the spec"
        )
    missing = _missing_tracts(hub, skymap.name, tracts)
    if missing:
        raise RepoError(
            f"{label}: skymap {skymap.name!r} lacks {len(missing)} tract(s) the campaign's visits "
            f"touch ({_show(missing)}); register the whole skymap there"
        )
    for name in inputs.all:
        if not has_collection(hub, name):
            raise RepoError(
                f"{label}: no collection {name!r}; fix the spec's 'inputs' to name the hub's "
                "input collections (raws, calibs, extra)"
            )


def adopt_repo(
    dst: Butler,
    hub: Butler,
    *,
    instrument: str,
    visits: Sequence[int],
    skymap: str,
    tracts: Sequence[int],
    label: str,
) -> dict[str, int]:
    """Copy from the hub the dimension records a site needs for the campaign (idempotent).

    Every site gets the records of the *whole* campaign (instrument, detectors, physical
    filters, every visit with its regions and exposures, the skymap's tracts and patches the
    plan touches): graph building needs them for the visits a site receives later, and a Butler
    refuses datasets whose records it lacks.

    Parameters
    ----------
    dst, hub : `lsst.daf.butler.Butler`
        The site's repository (written) and the hub's (read).
    instrument, skymap : `str`
        The spec's instrument and skymap names.
    visits, tracts : sequence of `int`
        The plan's visits and the tracts they touch.
    label : `str`
        The site's repository (URI and Block), for errors.

    Returns
    -------
    copied : `dict` [`str`, `int`]
        Data IDs whose records were transferred, per kind (0 on a rerun is not guaranteed:
        daf_butler skips existing records without saying).

    Raises
    ------
    RepoError
        If the site has the skymap under the same name with another hash.
    """
    here, there = registered_skymap_hash(dst, skymap), registered_skymap_hash(hub, skymap)
    if here is not None and here != there:
        raise RepoError(
            f"{label}: skymap {skymap!r} is registered with hash {here}, but the hub's "
            f"is {there}: they are different skymaps under one name. Register the hub's "
            "skymap under another name at the site, or remove the site's"
        )
    copied: dict[str, int] = {}
    # Instrument-level records first (every detector and filter, not only those the raws use:
    # calibrations are per filter and detector).
    ids: list[DataCoordinate] = list(
        hub.query_data_ids(
            ["detector", "physical_filter"], instrument=instrument, with_dimension_records=True
        )
    )
    dst.transfer_dimension_records_from(hub, ids)
    copied["instrument"] = len(ids)
    n = 0
    for start in range(0, len(visits), _VISITS_PER_BATCH):
        batch = [int(v) for v in visits[start : start + _VISITS_PER_BATCH]]
        ids = list(
            hub.query_data_ids(
                ["visit", "detector"],
                where="instrument = inst AND visit IN (visits)",
                bind={"inst": instrument, "visits": batch},
                with_dimension_records=True,
            )
        )
        dst.transfer_dimension_records_from(hub, ids)
        n += len(ids)
    copied["visit_detectors"] = n
    ids = (
        list(
            hub.query_data_ids(
                ["patch"],
                where="skymap = sm AND tract IN (tracts)",
                bind={"sm": skymap, "tracts": [int(t) for t in tracts]},
                with_dimension_records=True,
            )
        )
        if tracts
        else []
    )
    dst.transfer_dimension_records_from(hub, ids)
    copied["patches"] = len(ids)
    return copied
