"""lsst-rucio-register's own registration code, run on our data catalogs with injected clients.

Rubin registers Butler files in Rucio with ``lsst-rucio-register``: its
``lsst.rucio.register.rucio_interface.RucioInterface`` turns each `~lsst.daf.butler.DatasetRef`
into a DID (``name`` = the file's path below ``<rse_root>/<scope>/``, ``bytes``, ``adler32``,
``pfn``) with the metadata ``rubin_butler`` (its ``DataType``) and ``rubin_sidecar`` (the ref's
JSON), registers them with ``add_replicas`` and attaches them to a ``monotonic`` dataset. We run
that code rather than a copy of it, so our DIDs and metadata cannot drift from Rubin's.

Two things in it do not fit a multi-site orchestrator, and are replaced here without copying its
logic:

* its constructor builds ``ReplicaClient()`` and ``DIDClient()`` from the process's Rucio
  configuration (one Rucio identity per process): `SiteRucioInterface` takes the client instead;
* it asks the Butler for each file's URI and expects the repository to *be* at
  ``<rse_root>/<scope>/``, while ours is reached through the ``<rse_root>/<scope>`` symlink
  (`.ingest.ensure_site_storage`): `SiteRucioInterface` is given the paths below the RSE root.

`CatalogClient` is the client it is given: it answers the Rucio client calls ``RucioInterface``
makes with a `~drp_campaign.backends.interfaces.DataCatalog`, so the same package code registers
into the embedded catalog and, through `~drp_campaign.backends.rucio.RucioCatalog` and its
injected per-site ``rucio.client.Client``, into a real Rucio, with the catalogs' own checks (files
on disk, conflicting DIDs, errors translated) in between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lsst.daf.butler import DatasetRef
from lsst.resources import ResourcePath
from lsst.rucio.register.data_type import DataType
from lsst.rucio.register.rucio_interface import RucioInterface

from .interfaces import DID, DataCatalog, DIDNotFound, NewFile

__all__ = ["DATA_PRODUCT", "RAW_FILE", "CatalogClient", "SiteRucioInterface"]

#: ``rubin_butler`` of a Butler data product.
DATA_PRODUCT: str = DataType.DATA_PRODUCT
#: ``rubin_butler`` of a raw.
RAW_FILE: str = DataType.RAW_FILE


class CatalogClient:
    """The Rucio client calls of ``RucioInterface``, made on a `DataCatalog`.

    ``RucioInterface`` uses ``add_replicas``, ``add_files_to_datasets`` and ``add_dataset`` of
    Rucio's ``ReplicaClient`` and ``DIDClient``; this class has the same signatures. The files it
    registered are kept in `registered`, in order, as the `NewFile` the catalog received.

    Parameters
    ----------
    catalog : `DataCatalog`
        The catalog to register into.
    """

    def __init__(self, catalog: DataCatalog) -> None:
        self.catalog = catalog
        self.registered: list[NewFile] = []

    def add_replicas(self, rse: str, files: Sequence[Mapping[str, Any]]) -> None:
        """Register files already in ``rse``'s storage (``ReplicaClient.add_replicas``).

        The package's ``pfn`` is not passed on: every catalog derives a file's PFN from its RSE
        (identity LFN -> PFN, RTN-101), which `SiteRucioInterface` makes the same path.

        Parameters
        ----------
        rse : `str`
            The RSE.
        files : `~collections.abc.Sequence` [`~collections.abc.Mapping`]
            ``scope``, ``name``, ``bytes``, ``adler32``, ``pfn`` and ``meta`` of each file.
        """
        new = [
            NewFile(str(f["scope"]), str(f["name"]), int(f["bytes"]), str(f["adler32"]),
                    dict(f.get("meta") or {}))
            for f in files
        ]  # fmt: skip
        self.catalog.register_replicas(rse, new)
        self.registered.extend(new)

    def add_files_to_datasets(
        self, attachments: Sequence[Mapping[str, Any]], ignore_duplicate: bool = False
    ) -> None:
        """Attach files to datasets (``DIDClient.add_files_to_datasets``).

        Attaching twice is a no-op in every catalog, whatever ``ignore_duplicate`` says.

        Parameters
        ----------
        attachments : `~collections.abc.Sequence` [`~collections.abc.Mapping`]
            ``scope`` and ``name`` of a dataset, and the ``dids`` to attach to it.
        ignore_duplicate : `bool`, optional
            Accepted for the signature's sake.

        Raises
        ------
        rucio.common.exception.DataIdentifierNotFound
            If a dataset does not exist: ``RucioInterface`` then creates it and retries.
        """
        from rucio.common.exception import DataIdentifierNotFound

        for a in attachments:
            dataset = DID(str(a["scope"]), str(a["name"]))
            try:
                self.catalog.get_did(dataset)
            except DIDNotFound as exc:
                raise DataIdentifierNotFound(str(exc)) from exc
            self.catalog.attach(dataset, [DID(str(d["scope"]), str(d["name"])) for d in a["dids"]])

    def add_dataset(
        self,
        scope: str,
        name: str,
        statuses: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Create a dataset (``DIDClient.add_dataset``); every catalog makes it ``monotonic``.

        Parameters
        ----------
        scope, name : `str`
            The dataset.
        statuses : `~collections.abc.Mapping`, optional
            ``{"monotonic": True}`` from ``RucioInterface``: what the catalogs do anyway.
        meta : `~collections.abc.Mapping`, optional
            Its metadata.
        **kwargs
            Other ``add_dataset`` arguments (``rse``): ignored, no files are passed here.
        """
        self.catalog.add_dataset(DID(scope, name), meta)


class SiteRucioInterface(RucioInterface):
    """``RucioInterface`` with an injected client and the files' paths below the RSE root.

    Parameters
    ----------
    client : `CatalogClient` or `rucio.client.Client`
        What ``RucioInterface`` would have built as ``ReplicaClient()`` and ``DIDClient()``.
    rse : `str`
        The RSE whose storage holds the files.
    scope : `str`
        Scope of the files and of the dataset they are attached to.
    rse_root : `str`
        The RSE's storage root, without a trailing ``/``: ``<rse_root>/<scope>/<name>`` is a
        file's path.
    dtn_url : `str`
        Base URL of the PFNs (``file://<rse_root>`` for a POSIX RSE).
    rubin_butler_type : `str`
        The ``rubin_butler`` metadata (`DATA_PRODUCT`, `RAW_FILE`).
    paths : `~collections.abc.Mapping` [`str`, `str`]
        Dataset UUID (as a string) -> the file's path relative to ``<rse_root>/<scope>/``, for
        every ref that will be registered.
    """

    def __init__(
        self,
        client: Any,
        *,
        rse: str,
        scope: str,
        rse_root: str,
        dtn_url: str,
        rubin_butler_type: str,
        paths: Mapping[str, str],
    ) -> None:
        # Not super().__init__(): it would build ReplicaClient() and DIDClient() from the
        # process's rucio.cfg. These are the attributes it sets (a test checks none is missing).
        # The package asks self.butler only for getURI(ref) (one registry query per ref, giving
        # the path in the repository rather than below the RSE root): answer with the paths.
        self.butler = _Locator(self._uri)
        self.rse = rse
        self.scope = scope
        self.rse_root = rse_root
        self.dtn_url = dtn_url
        self.pfn_base = f"{dtn_url}"
        self.replica_client = client
        self.did_client = client
        self.rubin_butler_type = rubin_butler_type
        self._paths = dict(paths)
        self._hashes: dict[str, tuple[int, str]] = {}

    def _uri(self, ref: DatasetRef) -> ResourcePath:
        """The file of ``ref`` at ``<rse_root>/<scope>/``: the path the package expects."""
        return ResourcePath(f"{self.rse_root}/{self.scope}/{self._paths[str(ref.id)]}")

    def prefetch_hashes(self, refs: Iterable[DatasetRef], threads: int = 4) -> None:
        """Compute the files' sizes and adler32 (the package's `compute_hashes`) in threads.

        Reading every byte dominates registration; the package does it one file at a time.

        Parameters
        ----------
        refs : iterable of `lsst.daf.butler.DatasetRef`
            The refs about to be registered.
        threads : `int`, optional
            Files read at once.
        """
        uris = [self._uri(ref) for ref in refs]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            sums = list(pool.map(super().compute_hashes, uris))
        self._hashes.update(zip((u.geturl() for u in uris), sums, strict=True))

    def compute_hashes(self, resource_path: ResourcePath) -> tuple[int, str]:
        """Size and adler32 of a file: prefetched, or computed now by the package.

        Parameters
        ----------
        resource_path : `lsst.resources.ResourcePath`
            The file.

        Returns
        -------
        hashes : `tuple` [`int`, `str`]
            Size in bytes and adler32 as 8 hex digits.
        """
        cached = self._hashes.pop(resource_path.geturl(), None)
        return cached if cached is not None else super().compute_hashes(resource_path)


class _Locator:
    """Stands in for the Butler, of which ``RucioInterface`` only asks a file's URI."""

    def __init__(self, uri: Callable[[DatasetRef], ResourcePath]) -> None:
        self._uri = uri

    def getURI(self, ref: DatasetRef) -> ResourcePath:  # the name RucioInterface calls
        """The file of ``ref``."""
        return self._uri(ref)
