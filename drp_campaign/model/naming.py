"""Names of things that belong to a campaign outside the Butler: its Prefect Block documents.

Pure (the standard library only): the engine names a site's Block in its errors without
importing Prefect, and the blocks package saves and loads documents under the same names.
"""

from __future__ import annotations

import re

__all__ = ["data_facility_block", "data_facility_document_name", "data_facility_slug"]

_NOT_NAME_CHARACTERS = re.compile(r"[^a-z0-9-]+")


def data_facility_slug(site: str) -> str:
    """The site part of a block document name: lower case, ``_`` and others become ``-``.

    Parameters
    ----------
    site : `str`
        Site name (``USDF``, ``Fr_DF``).

    Returns
    -------
    slug : `str`
        ``usdf``, ``fr-df``: what Prefect allows in block document names (``[a-z0-9-]``).
    """
    slug = _NOT_NAME_CHARACTERS.sub("-", site.lower()).strip("-")
    if not slug:
        raise ValueError(f"site name {site!r} leaves nothing usable in a block name")
    return slug


def data_facility_document_name(campaign: str, site: str) -> str:
    """Name of the `DataFacility` block document of one site of one campaign.

    Parameters
    ----------
    campaign : `str`
        Campaign name (``[a-z0-9-]+``).
    site : `str`
        Site name from the spec.

    Returns
    -------
    name : `str`
        ``<campaign>-<site slug>``, e.g. ``dc2-test-med-1-usdf``; the full reference is
        ``data-facility/<name>``.
    """
    return f"{campaign}-{data_facility_slug(site)}"


def data_facility_block(campaign: str, site: str) -> str:
    """The full reference of a site's `DataFacility` Block: ``data-facility/<document name>``.

    Parameters
    ----------
    campaign : `str`
        Campaign name.
    site : `str`
        Site name from the spec.

    Returns
    -------
    reference : `str`
        What ``prefect block inspect`` and the UI show, e.g. ``data-facility/dc2-test-med-1-usdf``.
    """
    return f"data-facility/{data_facility_document_name(campaign, site)}"
