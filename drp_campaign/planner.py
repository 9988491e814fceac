"""Run the campaign plan: overlaps with Dask over chunks of visits, then partition, assignment and
transfers, streamed through parquet parts on disk so memory stays bounded at DR1 scale.

Three passes over the chunks, each a ``client.map``:

1. overlaps of each chunk's detectors with the patches (written as a part) + work per patch;
2. after the partition (driver side, small): each visit's cost at every site;
3. after the assignment: detector regions with their home, and the transfer rows.

The pure pieces live in :mod:`drp_campaign.model`; this module only sequences them and does I/O.

Detector regions come from our focal-plane model for preset and CSV surveys, and from the
registry for ``survey: {butler: REPO}`` (`drp_campaign.backends.registry_survey`): there each
pass-1 task reads its own chunk's ``visit_detector_region`` polygons from the registry, in pages,
and keeps them in a parquet part for pass 3, so the driver only ever holds the visit table.

``detectors.parquet`` holds each region as a list of [ra, dec] vertices (degrees, the registry's
order and count for a registry survey; the four corners of the focal-plane model otherwise).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .model.assign import assign_visits
from .model.focalplane import focal_plane
from .model.groups import groups_document, plan_groups
from .model.overlaps import (
    OverlapTable,
    compute_overlaps,
    compute_polygon_overlaps,
    patch_key,
    split_patch_key,
)
from .model.partition import SHARE_TOLERANCE, Partition, partition_patches
from .model.sky import sky_map_for
from .model.spec import CampaignSpec, SkymapSpec
from .model.survey import survey_from_spec
from .model.transfers import (
    NOMINAL_BYTES,
    detector_needs,
    link_bytes,
    transfer_rows,
    visit_costs,
)

__all__ = ["PLAN_FILES", "PlanResult", "dask_client", "run_plan"]

#: Every file ``drp-campaign plan`` writes (documented in the README).
PLAN_FILES = (
    "summary.json",
    "patches.parquet",
    "visits.parquet",
    "detectors.parquet",
    "overlaps.parquet",
    "transfers.parquet",
    "groups.json",
    "partition.png",
    "transfers.png",
)

#: Target of the issue: planned bytes within 2 % of the lower bound.
BYTES_TOLERANCE = 1.02

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class _Geometry:
    # The whole skymap spec (not only rings and builder), so Dask workers build the same sky.
    skymap: SkymapSpec
    instrument: str
    # The repository of a registry survey: its detector regions replace the focal-plane model.
    registry: str | None = None


#: Type of the ``region`` column of ``detectors.parquet``: a variable-length list of [ra, dec].
REGION_TYPE = pa.list_(pa.list_(pa.float64(), 2))


def _region_array(offsets: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> pa.Array:
    """Regions as lists of [ra, dec] vertices, built without Python loops."""
    flat = pa.array(np.column_stack([ra, dec]).reshape(-1), type=pa.float64())
    vertices = pa.FixedSizeListArray.from_arrays(flat, 2)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), vertices)


@dataclass(frozen=True)
class PlanResult:
    """What a plan run produced: the output directory and the summary it wrote."""

    out_dir: Path
    summary: dict[str, Any]


# --- chunk functions (run on Dask workers; module-level so they pickle by reference) -----------


def _regions_part(part: str) -> str:
    """Where pass 1 of a registry survey keeps a chunk's detector regions for pass 3."""
    return part.replace("overlaps-", "regions-")


def _registry_overlaps(geom: _Geometry, chunk: pd.DataFrame, part: str) -> tuple[OverlapTable, int]:
    """Overlaps of the chunk's stored regions; the regions go to a part in the chunk's order."""
    from .backends.registry_survey import read_detector_regions

    assert geom.registry is not None
    visits = chunk["visit"].to_numpy()
    regions = read_detector_regions(geom.registry, geom.instrument, visits)
    table = compute_polygon_overlaps(
        sky_map_for(geom.skymap),
        regions.visit,
        regions.detector,
        regions.offsets,
        regions.ra,
        regions.dec,
        visits,
        chunk["ra"].to_numpy(),
        chunk["dec"].to_numpy(),
    )
    # Regions come sorted by (visit, detector); write them in the chunk's (sky) visit order, as
    # every other file, keeping detectors ascending within a visit.
    order = np.argsort(pd.Index(visits).get_indexer(regions.visit), kind="stable")
    counts = np.diff(regions.offsets)[order]
    starts = regions.offsets[:-1][order]
    take = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    pq.write_table(
        pa.table(
            {
                "visit": regions.visit[order],
                "detector": regions.detector[order],
                "region": _region_array(offsets, regions.ra[take], regions.dec[take]),
            }
        ),
        _regions_part(part),
    )
    return table, len(regions)


def _overlaps_chunk(
    geom: _Geometry, chunk: pd.DataFrame, part: str
) -> tuple[np.ndarray, np.ndarray, int, int]:
    sky = sky_map_for(geom.skymap)
    if geom.registry is not None:
        table, n_regions = _registry_overlaps(geom, chunk, part)
    else:
        plane = focal_plane(geom.instrument)
        n_regions = len(chunk) * len(plane.detectors)
        table = compute_overlaps(
            sky,
            plane,
            chunk["visit"].to_numpy(),
            chunk["ra"].to_numpy(),
            chunk["dec"].to_numpy(),
            chunk["rotation"].to_numpy(),
        )
    # Rows follow the chunk's (sky) visit order, so concatenated parts do not depend on chunking.
    rank = pd.Index(chunk["visit"].to_numpy()).get_indexer(table.visit)
    order = np.argsort(rank, kind="stable")
    table = OverlapTable(
        table.visit[order], table.detector[order], table.tract[order], table.patch[order]
    )
    pq.write_table(
        pa.table(
            {
                "visit": table.visit,
                "detector": table.detector,
                "tract": table.tract,
                "patch": table.patch,
            }
        ),
        part,
    )
    keys, counts = np.unique(patch_key(table.tract, table.patch), return_counts=True)
    return keys, counts, len(table), n_regions


def _read_part(part: str) -> OverlapTable:
    t = pq.read_table(part)
    return OverlapTable(
        t["visit"].to_numpy(),
        t["detector"].to_numpy(),
        t["tract"].to_numpy(),
        t["patch"].to_numpy(),
    )


def _costs_chunk(part: str, partition: Partition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    needs = detector_needs(_read_part(part), partition)
    return visit_costs(needs, len(partition.sites))


def _final_chunk(
    geom: _Geometry,
    chunk: pd.DataFrame,
    part: str,
    home: np.ndarray,
    det_part: str,
    xfer_part: str,
    partition: Partition,
) -> np.ndarray:
    """Write the chunk's detector regions and transfer rows; return PVIs per (src, dst) link."""
    n_sites = len(partition.sites)
    visits = chunk["visit"].to_numpy()
    sites = np.asarray(partition.sites)
    if geom.registry is not None:
        stored = pq.read_table(_regions_part(part))
        det_visit = stored["visit"].to_numpy()
        det_ids = stored["detector"].to_numpy()
        regions = stored["region"].combine_chunks()
        det_home = home[pd.Index(visits).get_indexer(det_visit)]
    else:
        plane = focal_plane(geom.instrument)
        corners = plane.corners_sky_many(
            chunk["ra"].to_numpy(), chunk["dec"].to_numpy(), chunk["rotation"].to_numpy()
        )
        n_det = len(plane.detectors)
        det_visit = np.repeat(visits, n_det)
        det_ids = np.tile(np.array([d.id for d in plane.detectors], dtype=np.int16), visits.size)
        det_home = np.repeat(home, n_det)
        regions = _region_array(
            np.arange(0, 4 * det_visit.size + 1, 4, dtype=np.int64),
            corners[..., 0].reshape(-1),
            corners[..., 1].reshape(-1),
        )
    pq.write_table(
        pa.table(
            {
                "visit": det_visit,
                "detector": det_ids,
                "site": sites[det_home],
                "region": regions,
            }
        ),
        det_part,
    )
    needs = detector_needs(_read_part(part), partition)
    order = np.argsort(visits, kind="stable")  # transfer_rows looks visits up by bisection
    v, d, src, dst = transfer_rows(needs, home[order], visits[order])
    # Rows follow the chunk's (sky) visit order, as the other files do.
    rank = np.argsort(pd.Index(visits).get_indexer(v), kind="stable")
    v, d, src, dst = v[rank], d[rank], src[rank], dst[rank]
    pq.write_table(
        pa.table(
            {
                "visit": v,
                "detector": d,
                "src_site": sites[src.astype(np.int64)] if v.size else np.array([], dtype=str),
                "dst_site": sites[dst.astype(np.int64)] if v.size else np.array([], dtype=str),
                "bytes": np.full(v.size, NOMINAL_BYTES["pvi"], dtype=np.int64),
            }
        ),
        xfer_part,
    )
    links = np.zeros((n_sites, n_sites), dtype=np.int64)
    np.add.at(links, (src.astype(np.int64), dst.astype(np.int64)), 1)
    return links


# --- Dask -----------------------------------------------------------------------------------


@contextmanager
def dask_client(address: str | None = None, workers: int = 1) -> Iterator[Any]:
    """A Dask client: the given cluster, else a local one listening on 127.0.0.1 only.

    With one worker the cluster runs in this process (threads, ``inproc://``): no sockets and no
    start-up cost of worker processes. With more, one single-threaded process per worker, since the
    chunk work is numpy-heavy Python that holds the GIL part of the time.
    """
    import dask
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            yield client
        return
    processes = workers > 1
    kwargs: dict[str, Any] = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": processes,
        "dashboard_address": None,
    }
    if processes:
        # LocalCluster listens on every interface by default; keep it on loopback.
        kwargs.update(host="127.0.0.1", worker_dashboard_address=None)
    # No event-loop profiler: it is what Dask's dashboard shows (off here), and its thread took
    # 18 % of the orchestrating process's CPU (py-spy, the demo), in every worker too.
    with (
        dask.config.set({"distributed.worker.profile.enabled": False}),
        LocalCluster(**kwargs) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _run_map(
    client: Any,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    stage: str,
    progress: ProgressFn | None,
    **kwargs: Any,
) -> list[Any]:
    from distributed import as_completed

    # Large shared arguments (the partition, the homes) are scattered once, not pickled per task.
    shared = {k: client.scatter(v, broadcast=True, hash=False) for k, v in kwargs.items()}
    futures = [client.submit(fn, *a, **shared, pure=False) for a in args]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    if progress:
        progress(stage, 0, len(futures))
    for done, fut in enumerate(as_completed(futures), start=1):
        results[index[fut.key]] = fut.result()
        if progress:
            progress(stage, done, len(futures))
    return results


#: Rows per parquet row group of the merged files: fixed, so the bytes written do not depend on
#: how the visits were chunked (same inputs, same plan, byte for byte).
ROW_GROUP_ROWS = 1 << 20


def _concat_parts(parts: Sequence[Path], dest: Path) -> int:
    """Stream parquet parts into one file in fixed-size row groups (bounded memory).

    Returns the number of rows written.
    """
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = []
    buffered = 0
    rows = 0

    def flush(final: bool) -> None:
        nonlocal pending, buffered
        if not pending:
            return
        table = pa.concat_tables(pending)
        cut = table.num_rows if final else (table.num_rows // ROW_GROUP_ROWS) * ROW_GROUP_ROWS
        for start in range(0, cut, ROW_GROUP_ROWS):
            assert writer is not None
            writer.write_table(table.slice(start, min(ROW_GROUP_ROWS, cut - start)))
        rest = table.slice(cut)
        pending, buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    try:
        for p in parts:
            t = pq.read_table(p)
            if writer is None:
                writer = pq.ParquetWriter(dest, t.schema)
            pending.append(t)
            buffered += t.num_rows
            rows += t.num_rows
            if buffered >= ROW_GROUP_ROWS:
                flush(final=False)
        flush(final=True)
    finally:
        if writer is not None:
            writer.close()
    return rows


def chunk_size_for(n_visits: int, workers: int) -> int:
    """Visits per chunk: enough chunks to balance the workers, small enough to bound memory."""
    return int(max(20, min(1000, math.ceil(n_visits / max(1, 4 * workers)))))


def run_plan(
    spec: CampaignSpec,
    out_dir: Path,
    *,
    visits: pd.DataFrame | None = None,
    dask_address: str | None = None,
    workers: int = 1,
    chunk_visits: int | None = None,
    progress: ProgressFn | None = None,
    plots: bool = True,
) -> PlanResult:
    """Plan a campaign and write the plan directory (see :data:`PLAN_FILES`).

    Parameters
    ----------
    spec : `CampaignSpec`
        The validated campaign spec.
    out_dir : `pathlib.Path`
        Directory to (re)write.
    visits : `pandas.DataFrame`, optional
        The visit table; by default the spec's survey.
    dask_address : str, optional
        Address of an existing Dask scheduler; by default a local cluster.
    workers : int
        Workers of the local cluster (1: in-process).
    chunk_visits : int, optional
        Visits per chunk; by default from the campaign size.
    progress : callable, optional
        ``progress(stage, done, total)`` after each chunk.
    plots : bool
        Write the PNGs (``partition.png``, ``transfers.png``).

    Returns
    -------
    result : `PlanResult`
    """
    registry = (spec.survey.butler_uri or spec.survey.butler) if spec.survey.is_registry else None
    if visits is None:
        if registry is not None:
            from .backends.registry_survey import read_registry_visits

            visits = read_registry_visits(spec)
        else:
            visits = survey_from_spec(spec)
    visits = visits.sort_values("visit", kind="stable").reset_index(drop=True)
    geom = _Geometry(spec.skymap, spec.instrument, registry)
    sites = spec.site_names
    shares = spec.shares
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLAN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    parts_dir = out_dir / ".parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir()
    size = chunk_visits or chunk_size_for(len(visits), workers)
    # Chunks are compact on the sky (ordered by the tract of the boresight, then visit id), so a
    # chunk's visits share tracts and each tract is projected once for many visits. The order is
    # a pure function of the visits, so the files do not depend on chunk size or input order.
    sky = sky_map_for(geom.skymap)
    spatial = visits.assign(
        _tract=sky.find_tracts(visits["ra"].to_numpy(), visits["dec"].to_numpy())
    )
    spatial = spatial.sort_values(["_tract", "visit"], kind="stable").drop(columns="_tract")
    chunks = [spatial.iloc[i : i + size] for i in range(0, len(spatial), size)]
    ov_parts = [parts_dir / f"overlaps-{i:05d}.parquet" for i in range(len(chunks))]
    det_parts = [parts_dir / f"detectors-{i:05d}.parquet" for i in range(len(chunks))]
    xf_parts = [parts_dir / f"transfers-{i:05d}.parquet" for i in range(len(chunks))]

    with dask_client(dask_address, workers) as client:
        first = _run_map(
            client,
            _overlaps_chunk,
            [(geom, c, str(p)) for c, p in zip(chunks, ov_parts, strict=True)],
            "overlaps",
            progress,
        )
        # Work per patch: merge the chunks' (key, count) pairs.
        all_keys = np.concatenate([r[0] for r in first]) if first else np.empty(0, np.int64)
        all_counts = np.concatenate([r[1] for r in first]) if first else np.empty(0, np.int64)
        keys, inv = np.unique(all_keys, return_inverse=True)
        work = np.zeros(keys.size, dtype=np.int64)
        np.add.at(work, inv, all_counts)
        n_overlaps = int(sum(r[2] for r in first))
        n_regions = int(sum(r[3] for r in first))
        partition = partition_patches(sky, keys, work, shares, spec.partition.policy)

        costs = _run_map(
            client,
            _costs_chunk,
            [(str(p),) for p in ov_parts],
            "costs",
            progress,
            partition=partition,
        )
        vid = visits["visit"].to_numpy()
        cost = np.zeros((vid.size, len(sites)), dtype=np.int64)
        ovl = np.zeros((vid.size, len(sites)), dtype=np.int64)
        for cv, cc, co in costs:
            pos = np.searchsorted(vid, cv)
            cost[pos] = cc
            ovl[pos] = co
        assignment = assign_visits(vid, cost, ovl, [shares[s] for s in sites], SHARE_TOLERANCE)
        home = assignment.home

        home_of = pd.Series(home, index=vid)
        links_list = _run_map(
            client,
            _final_chunk,
            [
                (geom, c, str(p), home_of.loc[c["visit"]].to_numpy(), str(dp), str(xp))
                for c, p, dp, xp in zip(chunks, ov_parts, det_parts, xf_parts, strict=True)
            ],
            "transfers",
            progress,
            partition=partition,
        )
    links = np.sum(links_list, axis=0) if links_list else np.zeros((len(sites),) * 2, np.int64)

    # The three merges are independent and pyarrow releases the GIL while it reads and writes.
    with ThreadPoolExecutor(max_workers=3) as pool:
        merges = [
            pool.submit(_concat_parts, parts, out_dir / name)
            for parts, name in (
                (ov_parts, "overlaps.parquet"),
                (det_parts, "detectors.parquet"),
                (xf_parts, "transfers.parquet"),
            )
        ]
        n_transfers = [m.result() for m in merges][2]
    shutil.rmtree(parts_dir, ignore_errors=True)

    ptract, ppatch = split_patch_key(partition.keys)
    pq.write_table(
        pa.table(
            {
                "tract": ptract,
                "patch": ppatch,
                "site": np.asarray(sites)[partition.owner.astype(np.int64)],
            }
        ),
        out_dir / "patches.parquet",
    )
    vis_out = visits[["visit", "band", "ra", "dec", "rotation"]].copy()
    vis_out["site"] = np.asarray(sites)[home.astype(np.int64)]
    pq.write_table(pa.Table.from_pandas(vis_out, preserve_index=False), out_dir / "visits.parquet")

    # How each site-step's work is cut (model.groups): decided here, from the plan alone, so a
    # rerun of any stage finds the same groups.
    groups = plan_groups(
        spec,
        vis_out,
        pd.DataFrame(
            {"tract": ptract, "patch": ppatch, "site": np.asarray(sites)[partition.owner]}
        ),
    )
    (out_dir / "groups.json").write_text(json.dumps(groups_document(groups)) + "\n")
    summary = _summary(
        spec,
        visits,
        partition,
        assignment,
        links,
        n_overlaps,
        n_transfers,
        n_regions,
    )
    summary["groups"] = {key: len(site_step) for key, site_step in groups.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    if plots:
        from .report.plots import plot_partition, plot_transfers

        plot_partition(out_dir, sky, spec.instrument)
        plot_transfers(out_dir, summary)
    return PlanResult(out_dir, summary)


def _summary(
    spec: CampaignSpec,
    visits: pd.DataFrame,
    partition: Partition,
    assignment: Any,
    links: np.ndarray,
    n_overlaps: int,
    n_transfers: int,
    n_regions: int,
) -> dict[str, Any]:
    sites = spec.site_names
    pvi = NOMINAL_BYTES["pvi"]
    n_vis = len(visits)
    counts = assignment.counts
    planned = int(assignment.planned) * pvi
    lower = int(assignment.lower_bound) * pvi
    naive = int(assignment.naive_round_robin) * pvi
    ratio = planned / lower if lower else 1.0
    visit_share = {s: float(counts[i] / n_vis) if n_vis else 0.0 for i, s in enumerate(sites)}
    share_dev = max(abs(visit_share[s] / spec.shares[s] - 1.0) for s in sites) if n_vis else 0.0
    return {
        "campaign": spec.campaign,
        "instrument": spec.instrument,
        # Config keys the spec sets are recorded; left-out ones are not, so the summary of an
        # existing spec stays byte-identical.
        "skymap": spec.skymap.model_dump(exclude_none=True),
        "hub": spec.hub,
        "sites": {
            s: {
                "compute_site": spec.sites[s].compute_site,
                "cloud": spec.sites[s].cloud,
                "share": spec.sites[s].share,
            }
            for s in sites
        },
        "partition": {
            "policy": partition.policy,
            "tracts": {s: partition.tracts_by_site[s] for s in sites}
            if len(partition.keys) <= 100_000
            else {s: len(partition.tracts_by_site[s]) for s in sites},
            "max_share_deviation": round(partition.max_deviation, 6),
            "note": partition.note,
        },
        "counts": {
            "visits": n_vis,
            "visit_detectors": n_regions,
            "overlaps": n_overlaps,
            "patches": int(partition.keys.size),
            "tracts": int(np.unique(split_patch_key(partition.keys)[0]).size),
            "transfers": n_transfers,
            "visits_per_site": {s: int(counts[i]) for i, s in enumerate(sites)},
        },
        "bytes": {
            "planned": planned,
            "lower_bound": lower,
            "naive_round_robin": naive,
            "planned_over_lower_bound": round(ratio, 6),
            "links": link_bytes(sites, links),
        },
        "work_share": {
            s: {
                "target": spec.shares[s],
                "single_visit": round(visit_share[s], 6),
                "coadd": round(partition.shares[s], 6),
            }
            for s in sites
        },
        "targets": {
            "bytes_within_2pct_of_lower_bound": bool(ratio <= BYTES_TOLERANCE),
            "single_visit_shares_within_5pct": bool(share_dev <= SHARE_TOLERANCE + 1e-9),
            "max_single_visit_share_deviation": round(share_dev, 6),
        },
        "nominal_bytes": dict(NOMINAL_BYTES),
    }
