"""Pictures of a plan: the partition sky map and the site-to-site transfer matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..model.sky import RingsSkyMap  # noqa: E402

__all__ = ["SITE_COLOURS", "plot_partition", "plot_replan", "plot_transfers"]

#: Colour-blind-safe (Okabe-Ito) colours, one per site in spec order.
SITE_COLOURS = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
]

_MAX_PATCHES_DRAWN = 40_000
_MAX_CROSSING_DRAWN = 20_000


def _mean_ra(ra: np.ndarray) -> float:
    """The circular mean of right ascensions (degrees), the centre the pictures unwrap around."""
    r = np.radians(ra)
    return float(np.degrees(np.arctan2(np.sin(r).mean(), np.cos(r).mean())) % 360.0)


def _unwrap(ra: np.ndarray, centre: float) -> np.ndarray:
    """RA continuous around ``centre`` (so a field across RA 0 is not torn in two)."""
    return centre + ((ra - centre + 180.0) % 360.0) - 180.0


def plot_partition(plan_dir: Path, sky: RingsSkyMap, instrument: str) -> Path:
    """Draw ``partition.png``: each site's patches filled in its colour, visit footprints outlined,
    PVIs that must cross to another site drawn apart in red.

    Parameters
    ----------
    plan_dir : `pathlib.Path`
        A plan directory holding the parquet files.
    sky : `RingsSkyMap`
        The sky map (for patch polygons).
    instrument : str
        Instrument name, for the title.

    Returns
    -------
    path : `pathlib.Path`
        The PNG written.
    """
    patches = pq.read_table(plan_dir / "patches.parquet").to_pandas()
    visits = pq.read_table(plan_dir / "visits.parquet").to_pandas()
    sites = list(dict.fromkeys(_site_order(plan_dir)))
    colour = {s: SITE_COLOURS[i % len(SITE_COLOURS)] for i, s in enumerate(sites)}
    centre = _mean_ra(visits["ra"].to_numpy())
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(16, 7.5), dpi=100, sharex=True, sharey=True)

    # Patches (or whole tracts when there are too many patches to draw legibly).
    polys: list[np.ndarray] = []
    faces: list[str] = []
    if len(patches) <= _MAX_PATCHES_DRAWN:
        for t, p, s in patches[["tract", "patch", "site"]].itertuples(index=False):
            polys.append(_poly_radec(sky[int(t)].patch_inner_polygon(int(p)), centre))
            faces.append(colour[s])
        unit = "patch"
    else:
        first = patches.groupby("tract", sort=True)["site"].first()
        for t, s in first.items():
            info = sky[int(t)]
            ra0, ra1 = info.inner_ra_deg
            de0, de1 = info.inner_dec_deg
            ras = _unwrap(np.array([ra0, ra1, ra1, ra0]), centre)
            polys.append(np.column_stack([ras, [de0, de0, de1, de1]]))
            faces.append(colour[s])
        unit = "tract"
    for axis, alpha in ((ax, 0.45), (bx, 0.25)):
        axis.add_collection(
            PolyCollection(polys, facecolors=faces, edgecolors="white", linewidths=0.3, alpha=alpha)
        )

    # Left: visit footprints, boresights marked in their home site's colour.
    radius = 1.75 if instrument != "LSSTComCam" else 0.4
    step = max(1, len(visits) // 300)
    th = np.linspace(0, 2 * np.pi, 60)
    for ra, dec in visits[["ra", "dec"]].to_numpy()[::step]:
        ax.plot(
            _unwrap(ra + radius * np.cos(th) / max(np.cos(np.radians(dec)), 0.05), centre),
            dec + radius * np.sin(th),
            color="0.3",
            lw=0.3,
            alpha=0.35,
        )
    dstep = max(1, len(visits) // 50_000)
    vsub = visits.iloc[::dstep]
    ax.scatter(
        _unwrap(vsub["ra"].to_numpy(), centre),
        vsub["dec"],
        s=9,
        c=[colour[s] for s in vsub["site"]],
        edgecolors="black",
        linewidths=0.3,
        zorder=3,
    )
    ax.set_title(
        f"Sites' {unit}es and visits (dot = boresight, in its home site's colour)"
        if unit == "patch"
        else "Sites' tracts and visits (dot = boresight)"
    )

    # Right: the PVIs that must cross to another site, as a density of their outlines.
    det = pq.read_table(plan_dir / "detectors.parquet", columns=["visit", "detector", "region"])
    xfer = pq.read_table(plan_dir / "transfers.parquet", columns=["visit", "detector"])
    n_cross = int(xfer.num_rows)
    n_pvi = 0
    if n_cross:
        key_x = xfer["visit"].to_numpy().astype(np.int64) * 1024 + xfer["detector"].to_numpy()
        key_d = det["visit"].to_numpy().astype(np.int64) * 1024 + det["detector"].to_numpy()
        crossing = np.isin(key_d, np.unique(key_x))
        n_pvi = int(crossing.sum())
        idx = np.flatnonzero(crossing)[:: max(1, n_pvi // _MAX_CROSSING_DRAWN)]
        # Regions have any number of vertices (a registry's polygons): cut by the list offsets.
        regions = det["region"].combine_chunks()
        offsets = regions.offsets.to_numpy()
        offsets = offsets - offsets[0]
        flat = regions.flatten().flatten().to_numpy().reshape(-1, 2)
        verts = [flat[offsets[i] : offsets[i + 1]] for i in idx]
        cross_polys = [np.column_stack([_unwrap(v[:, 0], centre), v[:, 1]]) for v in verts]
        bx.add_collection(
            PolyCollection(
                cross_polys,
                facecolors="#D00000",
                edgecolors="none",
                alpha=min(0.5, max(0.004, 30.0 / len(cross_polys))),
            )
        )
    bx.set_title(f"{n_pvi:,} of {det.num_rows:,} PVIs cross sites ({n_cross:,} transfers)")

    mid = float(np.radians(visits["dec"].mean()))
    for axis in (ax, bx):
        axis.autoscale_view()
        axis.set_xlabel("RA (deg)")
        axis.set_aspect(1.0 / max(np.cos(mid), 0.2))
        axis.grid(True, lw=0.3, alpha=0.5)
    ax.invert_xaxis()  # RA grows to the east, drawn to the left as on the sky (shared x)
    ax.set_ylabel("Dec (deg)")
    handles = [Patch(facecolor=colour[s], alpha=0.6, label=s) for s in sites]
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.9)
    bx.legend(
        handles=[*handles, Patch(facecolor="#D00000", alpha=0.5, label="crossing PVIs")],
        loc="upper right",
        fontsize=9,
        framealpha=0.9,
    )
    fig.suptitle(f"Partition: {len(patches):,} patches, {len(visits):,} visits")
    fig.tight_layout()
    out = plan_dir / "partition.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _site_order(plan_dir: Path) -> list[str]:
    import json

    summary = json.loads((plan_dir / "summary.json").read_text())
    return list(summary["sites"])


def _poly_radec(poly: Any, centre: float) -> np.ndarray:
    from lsst.sphgeom import LonLat

    pts = [LonLat(v) for v in poly.getVertices()]
    ra = np.array([p.getLon().asDegrees() for p in pts])
    dec = np.array([p.getLat().asDegrees() for p in pts])
    return np.column_stack([_unwrap(ra, centre), dec])


def plot_transfers(plan_dir: Path, summary: dict[str, Any]) -> Path:
    """Draw ``transfers.png``: site-to-site bytes as a matrix, and planned bytes against the lower
    bound and a naive round-robin assignment.

    Parameters
    ----------
    plan_dir : `pathlib.Path`
        Where to write.
    summary : dict
        The plan summary (``summary.json`` content).

    Returns
    -------
    path : `pathlib.Path`
    """
    sites = list(summary["sites"])
    n = len(sites)
    mat = np.zeros((n, n))
    for link, b in summary["bytes"]["links"].items():
        a, d = link.split("->")
        mat[sites.index(a), sites.index(d)] = b / 1e9
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(12, 5), dpi=110, gridspec_kw={"width_ratios": [1.2, 1]}
    )
    im = ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(n), sites)
    ax.set_yticks(range(n), sites)
    ax.set_xlabel("destination site")
    ax.set_ylabel("source (home) site")
    peak = mat.max() or 1.0
    for i in range(n):
        for j in range(n):
            txt = "-" if i == j else f"{mat[i, j]:,.1f} GB"
            ax.text(
                j,
                i,
                txt,
                ha="center",
                va="center",
                color="white" if mat[i, j] > 0.6 * peak else "black",
                fontsize=9,
            )
    ax.set_title("Overlap PVIs moved between sites")
    fig.colorbar(im, ax=ax, label="GB", fraction=0.046)
    b = summary["bytes"]
    labels = ["lower bound", "planned", "naive round-robin"]
    vals = [b["lower_bound"] / 1e9, b["planned"] / 1e9, b["naive_round_robin"] / 1e9]
    bars = bx.bar(labels, vals, color=["#999999", "#0072B2", "#D55E00"])
    for bar, v in zip(bars, vals, strict=True):
        bx.text(
            bar.get_x() + bar.get_width() / 2,
            v,
            f"{v:,.1f} GB",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    bx.set_ylabel("GB moved between sites")
    bx.set_title(f"planned / lower bound = {b['planned_over_lower_bound']:.3f}")
    fig.tight_layout()
    out = plan_dir / "transfers.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_replan(before_dir: Path, after_dir: Path, sky: RingsSkyMap) -> Path:
    """Draw ``replan.png`` in ``after_dir``: the partition before and after a re-plan, each site
    in its colour (the first plan's colours), the re-assigned patches hatched and outlined in
    black after; the lost sites' visits marked where they were homed and where they went.

    Parameters
    ----------
    before_dir, after_dir : `pathlib.Path`
        The plan directories of the revision re-planned and of the new one.
    sky : `RingsSkyMap`
        The sky map (for patch polygons).

    Returns
    -------
    path : `pathlib.Path`
        The PNG written.
    """
    import json

    before = pq.read_table(before_dir / "patches.parquet").to_pandas()
    after = pq.read_table(after_dir / "patches.parquet").to_pandas()
    visits_b = pq.read_table(before_dir / "visits.parquet").to_pandas()
    visits_a = pq.read_table(after_dir / "visits.parquet").to_pandas()
    info = json.loads((after_dir / "summary.json").read_text())["revision"]
    first = Path(before_dir).parent / "plan" / "summary.json"
    order = list(json.loads(first.read_text())["sites"]) if first.exists() else []
    order += [s for s in dict.fromkeys([*before["site"], *after["site"]]) if s not in order]
    colour = {s: SITE_COLOURS[i % len(SITE_COLOURS)] for i, s in enumerate(order)}
    centre = _mean_ra(visits_a["ra"].to_numpy())
    merged = before.merge(after, on=["tract", "patch"], suffixes=("_before", "_after"))
    moved = merged["site_before"] != merged["site_after"]
    by_tract = len(merged) > _MAX_PATCHES_DRAWN

    def polygons(rows: Any) -> list[np.ndarray]:
        out = []
        for t, p in rows[["tract", "patch"]].itertuples(index=False):
            if by_tract:
                info_t = sky[int(t)]
                ra0, ra1 = info_t.inner_ra_deg
                de0, de1 = info_t.inner_dec_deg
                ras = _unwrap(np.array([ra0, ra1, ra1, ra0]), centre)
                out.append(np.column_stack([ras, [de0, de0, de1, de1]]))
            else:
                out.append(_poly_radec(sky[int(t)].patch_inner_polygon(int(p)), centre))
        return out

    rows = merged.drop_duplicates("tract") if by_tract else merged
    polys = polygons(rows)
    fig, axes = plt.subplots(1, 2, figsize=(15, 7), dpi=100, sharex=True, sharey=True)
    for axis, column, visits in (
        (axes[0], "site_before", visits_b),
        (axes[1], "site_after", visits_a),
    ):
        axis.add_collection(
            PolyCollection(
                polys,
                facecolors=[colour[s] for s in rows[column]],
                edgecolors="white",
                linewidths=0.3,
                alpha=0.5,
            )
        )
        axis.scatter(
            _unwrap(visits["ra"].to_numpy(), centre),
            visits["dec"],
            s=12,
            c=[colour[s] for s in visits["site"]],
            edgecolors="black",
            linewidths=0.3,
            zorder=3,
        )
    moved_rows = rows.loc[moved.loc[rows.index]] if len(rows) else rows
    if len(moved_rows):
        axes[1].add_collection(
            PolyCollection(
                polygons(moved_rows),
                facecolors="none",
                edgecolors="black",
                hatch="//",
                linewidths=0.6,
            )
        )
    rehomed = visits_a.loc[visits_a["visit"].astype(str).isin(info["moved"]["visits"])]
    axes[1].scatter(
        _unwrap(rehomed["ra"].to_numpy(), centre),
        rehomed["dec"],
        s=60,
        facecolors="none",
        edgecolors="black",
        linewidths=1.2,
        zorder=4,
    )
    lost = ", ".join(info["without"])
    axes[0].set_title(f"Before: revision {info['based_on']}")
    axes[1].set_title(
        f"After: revision {info['revision']} without {lost}\n"
        f"{int(moved.sum()):,} patches re-assigned (hatched), {len(rehomed)} visits re-homed "
        "(circled)"
    )
    mid = float(np.radians(visits_a["dec"].mean()))
    for axis in axes:
        axis.autoscale_view()
        axis.set_xlabel("RA (deg)")
        axis.set_aspect(1.0 / max(np.cos(mid), 0.2))
        axis.grid(True, lw=0.3, alpha=0.5)
    axes[0].invert_xaxis()
    axes[0].set_ylabel("Dec (deg)")
    handles = [Patch(facecolor=colour[s], alpha=0.6, label=s) for s in order]
    handles.append(Patch(facecolor="none", edgecolor="black", hatch="//", label="re-assigned"))
    axes[1].legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.9)
    fig.suptitle(f"Re-plan without {lost}: {info['reason']}")
    fig.tight_layout()
    out = Path(after_dir) / "replan.png"
    fig.savefig(out)
    plt.close(fig)
    return out
