"""Does the spec's skymap match the one a repository has registered under that name?

A Butler identifies a skymap by name, and lsst.skymap records the SHA1 of its config with it.
Planning with one geometry against a repository whose tracts and patches were registered with
another would give data ids that mean different pixels at different sites, so the hub's record is
checked against the spec before anything is planned or registered (DESIGN.md section 10).
"""

from __future__ import annotations

from typing import Any

from lsst.daf.butler import Butler

from ..model.sky import sky_map_for
from ..model.skyconfig import SKYMAP_CONFIG_KEYS, resolve_skymap
from ..model.spec import SkymapSpec

__all__ = ["SkymapMismatch", "check_registered_skymap", "registered_skymap_hash"]


class SkymapMismatch(ValueError):
    """The spec's skymap config hashes differently from the registered skymap of that name.

    Parameters
    ----------
    name : `str`
        Skymap name.
    repo : `str`
        The repository, as the caller labels it (site name, path or URI).
    registered_hash, spec_hash : `str`
        The two SHA1s, hex.
    message : `str`
        The operator message.
    """

    def __init__(
        self, name: str, repo: str, registered_hash: str, spec_hash: str, message: str
    ) -> None:
        super().__init__(message)
        self.name = name
        self.repo = repo
        self.registered_hash = registered_hash
        self.spec_hash = spec_hash


def _record(butler: Butler, name: str) -> Any | None:
    # All skymap records, filtered here: a query constrained on an unknown name raises rather
    # than returning nothing, and a registry holds only a handful of skymaps.
    for record in butler.registry.queryDimensionRecords("skymap"):
        if record.name == name:
            return record
    return None


def registered_skymap_hash(butler: Butler, name: str) -> str | None:
    """Return the hash a registry holds for a skymap name.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Any Butler (read-only is enough).
    name : `str`
        Skymap name.

    Returns
    -------
    sha1 : `str` or `None`
        40 hex digits, or `None` if no skymap of that name is registered.
    """
    record = _record(butler, name)
    return None if record is None else bytes(record.hash).hex()


def check_registered_skymap(butler: Butler, skymap: SkymapSpec, repo: str) -> bool:
    """Check that a repository's skymap of the spec's name has the spec's geometry.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The repository's Butler (read-only is enough); in production the hub's.
    skymap : `~drp_campaign.model.spec.SkymapSpec`
        The spec's skymap (``spec.skymap``).
    repo : `str`
        How to name the repository in the message (site name, path or URI).

    Returns
    -------
    registered : `bool`
        `True` if a skymap of that name is registered with the same hash, `False` if none of
        that name is registered (the caller may register it).

    Raises
    ------
    SkymapMismatch
        If the registered skymap of that name has another hash. The message names the skymap,
        the repository, both hashes, the spec's resolved config and the keys to check.
    """
    record = _record(butler, skymap.name)
    if record is None:
        return False
    registered = bytes(record.hash).hex()
    sky = sky_map_for(skymap)
    ours = sky.hash_hex()
    if registered == ours:
        return True
    config = resolve_skymap(skymap)
    keys = ", ".join(f"skymap.{key}" if i == 0 else key for i, key in enumerate(SKYMAP_CONFIG_KEYS))
    tracts = int(record.tract_max)
    rings_hint = (
        f" The registered skymap has {tracts} tracts and the spec's {len(sky)}, so 'rings' differs."
        if tracts != len(sky)
        else ""
    )
    message = (
        f"skymap {skymap.name!r} in {repo} has hash {registered}, but the spec's skymap hashes to "
        f"{ours} ({config.describe()}; keys left out take the {config.builder} builder's "
        f"defaults).{rings_hint} Check {keys} against the config the skymap was registered "
        f"with (the skyMap dataset in the 'skymaps' collection of {repo}). Fix: set those keys "
        "to that config (floats to every digit: the hash packs the exact values), or give the "
        "spec's skymap another name if it is meant to be a different skymap."
    )
    raise SkymapMismatch(skymap.name, repo, registered, ours, message)
