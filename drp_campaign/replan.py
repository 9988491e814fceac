"""Write a plan revision without a lost site (``drp-campaign replan``; issue 13).

The pure rules are `drp_campaign.model.replan`; this module reads the current plan and the
ledger, applies them and writes revision ``n`` into ``<workdir>/plan-r{n}`` beside the plans
before it (which stay as they were): the same files as ``drp-campaign plan`` writes, with the
new owners and homes, the transfers recomputed for them, the groups (`revision_groups`) and in
``summary.json`` a ``revision`` section: what moved and the extra bytes against the first plan.
The directory is written under a temporary name and renamed, so a revision is either whole or
absent; the ledger records it (stage ``replan``, group ``r{n}``) with its reason.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .ledger import CAMPAIGN, Ledger
from .model.groups import groups_document, groups_from_document
from .model.overlaps import OverlapTable, patch_key, split_patch_key
from .model.partition import Partition
from .model.replan import (
    ReplanError,
    check_without,
    plan_dirname,
    reassign_patches,
    rehome_visits,
    revised_spec,
    revision_groups,
)
from .model.sky import sky_map_for
from .model.spec import CampaignSpec
from .model.staging import reads_only_campaign_inputs
from .model.transfers import (
    NOMINAL_BYTES,
    detector_needs,
    link_bytes,
    transfer_rows,
    visit_costs,
)

__all__ = ["ReplanError", "Revision", "current_revision", "replan"]

#: Overlap rows read at a time when the transfers are recomputed (bounded memory at DR1).
_BATCH_ROWS = 1 << 21


@dataclass(frozen=True)
class Revision:
    """The plan a work directory runs now: its number, directory and the sites lost so far."""

    number: int
    plan_dir: Path
    lost: tuple[str, ...]
    info: dict[str, Any]


def current_revision(workdir: str | Path) -> Revision:
    """The newest plan revision of a work directory (0, ``plan/``, when never re-planned)."""
    root = Path(workdir)
    numbers = [
        int(p.name[len("plan-r") :])
        for p in root.glob("plan-r*")
        if p.name[len("plan-r") :].isdigit() and (p / "revision.json").exists()
    ]
    if not numbers:
        return Revision(0, root / "plan", (), {})
    n = max(numbers)
    directory = root / plan_dirname(n)
    info = json.loads((directory / "revision.json").read_text())
    return Revision(n, directory, tuple(info["lost"]), info)


def _finished_groups(ledger: Ledger, groups: dict[str, Any], sites: Sequence[str]) -> set[Any]:
    """(step, site, group) of the sites' groups whose products reached the hub, or had no work."""
    out = set()
    for key, site_step in groups.items():
        step, _, site = key.partition("@")
        if site not in sites:
            continue
        for group in site_step:
            records = ledger.records(step, site, group=group.name)
            if any(r.state == "SKIPPED" for r in records) or any(
                r.stage == "arrive" and r.done for r in records
            ):
                out.add((step, site, group.name))
    return out


def _patch_work(plan_dir: Path, keys: np.ndarray) -> np.ndarray:
    """Detector-patch overlaps of each patch key (the plan's measure of work)."""
    counts: dict[int, int] = {}
    reader = pq.ParquetFile(plan_dir / "overlaps.parquet")
    for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=["tract", "patch"]):
        k, c = np.unique(
            patch_key(batch["tract"].to_numpy(), batch["patch"].to_numpy()), return_counts=True
        )
        for key, n in zip(k.tolist(), c.tolist(), strict=True):
            counts[key] = counts.get(key, 0) + n
    return np.array([counts.get(int(k), 0) for k in keys], dtype=np.int64)


def _overlap_batches(plan_dir: Path) -> Any:
    """The plan's overlap rows in batches that never split a visit, sorted by (visit, detector)."""
    reader = pq.ParquetFile(plan_dir / "overlaps.parquet")
    carry: pd.DataFrame | None = None
    for batch in reader.iter_batches(batch_size=_BATCH_ROWS):
        frame = batch.to_pandas()
        if carry is not None:
            frame = pd.concat([carry, frame], ignore_index=True)
        # Rows of a visit are consecutive (the planner writes them visit by visit): keep the
        # last visit's for the next batch, which may hold more of its rows.
        last = frame["visit"].iat[-1]
        tail = frame["visit"].to_numpy() == last
        carry, frame = frame.loc[tail], frame.loc[~tail]
        if len(frame):
            yield frame.sort_values(["visit", "detector"], kind="stable")
    if carry is not None and len(carry):
        yield carry.sort_values(["visit", "detector"], kind="stable")


def _table(frame: pd.DataFrame) -> OverlapTable:
    return OverlapTable(
        frame["visit"].to_numpy(),
        frame["detector"].to_numpy(),
        frame["tract"].to_numpy(),
        frame["patch"].to_numpy(),
    )


def replan(
    spec: CampaignSpec,
    workdir: str | Path,
    without: Sequence[str],
    *,
    reason: str | None = None,
    spec_label: str = "",
    plots: bool = True,
) -> dict[str, Any]:
    """Write the next plan revision, without the sites ``without``.

    Parameters
    ----------
    spec : `CampaignSpec`
        The operator's spec (every site, the lost ones included).
    workdir : `str` or `pathlib.Path`
        The campaign's work directory (its plan and ledger).
    without : sequence of `str`
        The sites lost now.
    reason : `str`, optional
        Why, as the operator says it (recorded in the ledger and the summary).
    spec_label : `str`, optional
        The spec's path, for errors.
    plots : `bool`, optional
        Draw ``partition.png`` and ``replan.png`` (before and after).

    Returns
    -------
    revision : `dict`
        The ``revision`` section of the new ``summary.json``.

    Raises
    ------
    ReplanError
        The sites named are not ones to lose (the hub, every site, unknown, lost already), a
        site-step is running, or there is no plan yet; the message says what to do.
    """
    root = Path(workdir).absolute()
    current = current_revision(root)
    old_dir = current.plan_dir
    if not (old_dir / "summary.json").exists():
        raise ReplanError(
            f"{root} has no plan to revise ({old_dir / 'summary.json'} is missing): run the "
            "campaign (or `drp-campaign run`) first; a site lost before anything ran needs no "
            "re-plan, only a spec without it"
        )
    lose = check_without(spec, current.lost, list(without), spec_label=spec_label)
    ledger = Ledger(root / "ledger.sqlite")
    busy = ledger.live_claims()
    if busy:
        held = ", ".join(
            f"{step} at {site} (process {pid} on {host})" for step, site, host, pid in busy
        )
        raise ReplanError(
            f"a step is running: {held}. Wait for it to finish, or stop it (cancel its flow run, "
            "or kill the process), then re-plan: the new plan must not change under a running "
            "site-step"
        )
    number = current.number + 1
    lost = (*current.lost, *lose)
    new_spec = revised_spec(spec, lost)
    why = reason or f"{', '.join(lose)} lost"
    ledger.start(CAMPAIGN, CAMPAIGN, "replan", group=f"r{number}")
    t0 = time.monotonic()
    sky = sky_map_for(spec.skymap)

    # Patches: the lost sites' go to the others; every other keeps its owner.
    patches = pq.read_table(old_dir / "patches.parquet").to_pandas()
    keys = patch_key(patches["tract"].to_numpy(), patches["patch"].to_numpy())
    order = np.argsort(keys, kind="stable")
    patches = patches.iloc[order].reset_index(drop=True)
    keys = keys[order]
    work = _patch_work(old_dir, keys)
    moved = reassign_patches(sky, keys, patches["site"].to_numpy(), work, new_spec.shares)
    sites = tuple(new_spec.site_names)
    total_work = float(work.sum()) or 1.0
    partition = Partition(
        policy=spec.partition.policy,
        sites=sites,
        keys=keys,
        owner=np.array([sites.index(s) for s in moved.owner], dtype=np.int8),
        work=work,
        shares={s: moved.work[s] / total_work for s in sites},
        targets=dict(new_spec.shares),
        note=moved.note,
        tracts_by_site={
            s: sorted({int(t) for t in split_patch_key(keys[moved.owner == s])[0]}) for s in sites
        },
    )

    # Visits: the lost sites' are re-homed under the new partition.
    visits = pq.read_table(old_dir / "visits.parquet").to_pandas()
    vid = visits["visit"].to_numpy()
    moving = visits["site"].isin(lose).to_numpy()
    cost = np.zeros((vid.size, len(sites)), dtype=np.int64)
    ovl = np.zeros((vid.size, len(sites)), dtype=np.int64)
    if moving.any():
        mine = pq.read_table(
            old_dir / "overlaps.parquet", filters=[("visit", "in", [int(v) for v in vid[moving]])]
        ).to_pandas()
        needs = detector_needs(_table(mine.sort_values(["visit", "detector"])), partition)
        cv, cc, co = visit_costs(needs, len(sites))
        index = pd.Index(vid)
        cost[index.get_indexer(cv)] = cc
        ovl[index.get_indexer(cv)] = co
    home = rehome_visits(vid, visits["site"].to_numpy(), cost, ovl, new_spec.shares)
    rehomed = {
        int(v): (str(a), str(b))
        for v, a, b in zip(vid, visits["site"], home, strict=True)
        if a != b
    }
    new_visits = visits.assign(site=home.astype(str))

    tmp = root / f".{plan_dirname(number)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # unchanged: shared with the revision before (the largest file of a plan)
        os.link(old_dir / "overlaps.parquet", tmp / "overlaps.parquet")
    except OSError:  # a file system without hard links
        shutil.copyfile(old_dir / "overlaps.parquet", tmp / "overlaps.parquet")
    ptract, ppatch = split_patch_key(keys)
    patches_out = pd.DataFrame({"tract": ptract, "patch": ppatch, "site": moved.owner.astype(str)})
    pq.write_table(pa.Table.from_pandas(patches_out, preserve_index=False), tmp / "patches.parquet")
    pq.write_table(pa.Table.from_pandas(new_visits, preserve_index=False), tmp / "visits.parquet")
    det = pq.read_table(old_dir / "detectors.parquet")
    home_of = pd.Series(home.astype(str), index=vid)
    det = det.set_column(
        det.schema.get_field_index("site"),
        "site",
        pa.array(home_of.loc[det["visit"].to_numpy()].to_numpy().astype(str)),
    )
    pq.write_table(det, tmp / "detectors.parquet")

    # Transfers of the new plan, in batches of whole visits.
    home_sorted = pd.Series([sites.index(s) for s in home.astype(str)], index=vid).sort_index()
    links = np.zeros((len(sites), len(sites)), dtype=np.int64)
    writer: pq.ParquetWriter | None = None
    names = np.asarray(sites)
    n_transfers = 0
    try:
        for frame in _overlap_batches(old_dir):
            needs = detector_needs(_table(frame), partition)
            v, d, src, dst = transfer_rows(
                needs, home_sorted.to_numpy(), home_sorted.index.to_numpy()
            )
            table = pa.table(
                {
                    "visit": v,
                    "detector": d,
                    "src_site": names[src.astype(np.int64)] if v.size else np.array([], str),
                    "dst_site": names[dst.astype(np.int64)] if v.size else np.array([], str),
                    "bytes": np.full(v.size, NOMINAL_BYTES["pvi"], dtype=np.int64),
                }
            )
            writer = writer or pq.ParquetWriter(tmp / "transfers.parquet", table.schema)
            writer.write_table(table)
            n_transfers += v.size
            np.add.at(links, (src.astype(np.int64), dst.astype(np.int64)), 1)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        pq.write_table(
            pq.read_table(old_dir / "transfers.parquet").slice(0, 0), tmp / "transfers.parquet"
        )

    # Groups: the remaining sites keep theirs; the lost ones' unfinished work is new groups.
    old_groups = groups_from_document(json.loads((old_dir / "groups.json").read_text()))
    finished = _finished_groups(ledger, old_groups, lose)
    groups = revision_groups(new_spec, old_groups, finished, new_visits, patches_out, lose, number)
    (tmp / "groups.json").write_text(json.dumps(groups_document(groups)) + "\n")
    redone = {
        key: [g.name for g in site_step if g.revision == number]
        for key, site_step in groups.items()
        if any(g.revision == number for g in site_step)
    }
    kept_lost = sorted(f"{step}@{site}#{name}" for step, site, name in finished)

    # Summary: the first plan's sections for the new plan, and what the failover costs.
    first = json.loads((root / "plan" / "summary.json").read_text())
    pvi = NOMINAL_BYTES["pvi"]
    planned = int(links.sum()) * pvi
    # Raws move only for a re-homed visit redone in a step that reads campaign inputs alone
    # (step1): the later steps read products, which the hub holds. At most, because a visit's
    # raws may be staged for one of them while its other inputs are at the site already.
    from .backends.pipeline import step_dataflow

    flows = step_dataflow(spec.pipeline.uri, [s.subset for s in spec.steps])
    redo_visits = {
        v
        for gs in groups.values()
        for g in gs
        if g.revision == number and reads_only_campaign_inputs(spec, g.step, flows)
        for v in g.visits or ()
    }
    raws = len(redo_visits & set(rehomed))
    info: dict[str, Any] = {
        "revision": number,
        "based_on": current.number,
        "without": list(lose),
        "lost": list(lost),
        "reason": why,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "moved": {
            "tracts": {str(t): {"from": a, "to": b} for t, (a, b) in moved.moved_tracts.items()},
            "patches": int(np.sum(moved.owner != patches["site"].to_numpy().astype(str))),
            "visits": {str(v): {"from": a, "to": b} for v, (a, b) in sorted(rehomed.items())},
        },
        "kept": kept_lost,
        "redone_groups": redone,
        "note": moved.note,
        "bytes": {
            "first_plan_planned": int(first["bytes"]["planned"]),
            "planned": planned,
            "overlap_extra": planned - int(first["bytes"]["planned"]),
            "raws_at_most": raws * NOMINAL_BYTES["raw_visit"],
            "extra": planned - int(first["bytes"]["planned"]) + raws * NOMINAL_BYTES["raw_visit"],
        },
    }
    summary = {
        **first,
        "sites": {s: {**first["sites"][s], "share": new_spec.shares[s]} for s in sites},
        "partition": {
            "policy": partition.policy,
            "tracts": partition.tracts_by_site,
            "note": moved.note,
        },
        "counts": {
            **first["counts"],
            "transfers": n_transfers,
            "visits_per_site": {s: int(np.sum(home == s)) for s in sites},
        },
        "bytes": {
            "planned": planned,
            "links": link_bytes(sites, links),
        },
        "work_share": {
            s: {
                "target": new_spec.shares[s],
                "single_visit": round(float(np.mean(home == s)), 6),
                "coadd": round(partition.shares[s], 6),
            }
            for s in sites
        },
        "groups": {key: len(site_step) for key, site_step in groups.items()},
        "revision": info,
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if plots:
        from .report.plots import plot_partition, plot_replan

        plot_partition(tmp, sky, spec.instrument)
        plot_replan(old_dir, tmp, sky)
    (tmp / "revision.json").write_text(json.dumps(info, indent=2) + "\n")
    final = root / plan_dirname(number)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the revision exists whole, or not at all
    ledger.finish(
        CAMPAIGN,
        CAMPAIGN,
        "replan",
        {**info, "plan_dir": str(final), "seconds": round(time.monotonic() - t0, 3)},
        group=f"r{number}",
    )
    return info
