"""Register the block types and save the embedded-default blocks of a campaign.

Used by ``drp-campaign blocks register`` and ``drp-campaign blocks local``. Both talk to the
Prefect API named by ``PREFECT_API_URL`` and refuse to run without one: Prefect would otherwise
start a throw-away ephemeral server, which loses records and would hold the blocks nowhere
anyone else can reach (DESIGN.md section 8).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from .credentials import PandaCredentials, RucioCredentials
from .facility import (
    DataFacility,
    data_facility_document_name,
    embedded_data_facility,
    load_data_facility_document,
)

if TYPE_CHECKING:
    from drp_campaign.model.spec import CampaignSpec

__all__ = [
    "BLOCK_TYPES",
    "BlockConflict",
    "NoPrefectAPI",
    "SavedBlock",
    "register_block_types",
    "require_api_url",
    "save_embedded_blocks",
]

#: Every block type drp-campaign defines.
BLOCK_TYPES: tuple[type[Block], ...] = (RucioCredentials, PandaCredentials, DataFacility)


class NoPrefectAPI(RuntimeError):
    """``PREFECT_API_URL`` is not set: there is no server to hold the blocks."""


def require_api_url() -> str:
    """The configured Prefect API URL.

    Returns
    -------
    url : `str`
        ``PREFECT_API_URL``.

    Raises
    ------
    NoPrefectAPI
        If it is not set; the message says how to start a server.
    """
    url = get_current_settings().api.url
    if not url:
        raise NoPrefectAPI(
            "PREFECT_API_URL is not set, so Prefect would use a throw-away ephemeral server. "
            "Start a server with 'python scripts/prefect_server.py start --home <workdir>/prefect' "
            "and 'source <workdir>/prefect/env.sh', or set PREFECT_API_URL to your server."
        )
    return url


def register_block_types() -> list[str]:
    """Register every drp-campaign block type and schema with the Prefect API (idempotent).

    Returns
    -------
    slugs : `list` [`str`]
        The block type slugs registered.
    """
    require_api_url()
    for block_type in BLOCK_TYPES:
        block_type.register_type_and_schema(_sync=True)  # type: ignore[call-arg]
    return [block_type.get_block_type_slug() for block_type in BLOCK_TYPES]


@dataclass(frozen=True)
class SavedBlock:
    """What `save_embedded_blocks` did with one site's block."""

    site: str
    name: str  # block document name; the reference is data-facility/<name>
    action: Literal["created", "unchanged", "overwritten"]


class BlockConflict(ValueError):
    """A block exists with other values and overwriting was not asked for."""


def _values(block: Block) -> Any:
    """The field values of a block, secrets revealed, without Prefect's bookkeeping.

    A loaded block also dumps its private document id and name (and nested blocks theirs):
    those say where it is stored, not what it holds. Secrets are compared in clear because two
    blocks differing only in a password are different.
    """

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if not k.startswith("_") and k != "block_type_slug"
            }
        return value

    return strip(block.model_dump(mode="json", context={"include_secrets": True}))


def save_embedded_blocks(
    spec: CampaignSpec,
    workdir: Path,
    *,
    overwrite: bool = False,
    rucio: RucioCredentials | None = None,
    repos: Mapping[str, str] | None = None,
) -> list[SavedBlock]:
    """Save the embedded-default `DataFacility` block of every site of a campaign.

    Saving again with the same values is a no-op, so reruns need no flag; a block holding
    other values is replaced only with ``overwrite``.

    Parameters
    ----------
    spec : `~drp_campaign.model.spec.CampaignSpec`
        The campaign.
    workdir : `pathlib.Path`
        Work directory of the embedded default.
    overwrite : `bool`, optional
        Replace blocks that hold other values.
    rucio : `RucioCredentials`, optional
        Use this Rucio as every site's data catalog instead of the embedded one (the local
        Rucio of ``make demo-rucio``).
    repos : mapping of `str` to `str`, optional
        Site -> ``butler_repo`` (a directory, a ``butler.yaml`` or any URI daf_butler opens) for
        the sites whose repositories exist already; the others get ``<workdir>/repos/<site>``.

    Returns
    -------
    saved : `list` [`SavedBlock`]
        One entry per site, in spec order.

    Raises
    ------
    BlockConflict
        If two sites share a block name, or a block differs and ``overwrite`` is false (no
        block is written then).
    NoPrefectAPI
        If ``PREFECT_API_URL`` is not set.
    """
    require_api_url()
    unknown = sorted(set(repos or {}) - set(spec.site_names))
    if unknown:
        raise ValueError(
            f"--repo names site(s) {unknown} the campaign does not have; its sites are "
            + ", ".join(spec.site_names)
        )
    names: dict[str, str] = {}
    for site in spec.site_names:
        name = data_facility_document_name(spec.campaign, site)
        if name in names:
            raise BlockConflict(
                f"sites {names[name]!r} and {site!r} both map to block name {name!r}; "
                "rename one of them in the spec"
            )
        names[name] = site

    DataFacility.register_type_and_schema(_sync=True)  # type: ignore[call-arg]
    plan: list[tuple[str, str, DataFacility, Literal["created", "unchanged", "overwritten"]]] = []
    for name, site in names.items():
        facility = embedded_data_facility(spec, site, workdir)
        if repos and site in repos:
            facility = facility.model_copy(update={"butler_repo": str(repos[site])})
        if rucio is not None:
            facility = facility.model_copy(update={"catalog_backend": "rucio", "rucio": rucio})
        try:
            existing = load_data_facility_document(name)
        except ValueError as exc:
            # Prefect reports a missing document as a ValueError from ObjectNotFound; any
            # other ValueError (a document that no longer validates) is a block to replace.
            missing = isinstance(exc.__cause__, ObjectNotFound)
            plan.append((site, name, facility, "created" if missing else "overwritten"))
            continue
        if _values(existing) == _values(facility):
            plan.append((site, name, facility, "unchanged"))
        else:
            plan.append((site, name, facility, "overwritten"))
    conflicts = [name for _, name, _, action in plan if action == "overwritten"]
    if conflicts and not overwrite:
        raise BlockConflict(
            "blocks with other values exist: "
            + ", ".join(f"data-facility/{name}" for name in conflicts)
            + "; pass --overwrite to replace them"
        )
    saved: list[SavedBlock] = []
    for site, name, facility, action in plan:
        if action != "unchanged":
            facility.save(name, overwrite=True, _sync=True)  # type: ignore[call-arg]
        saved.append(SavedBlock(site, name, action))
    return saved
