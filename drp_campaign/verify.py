"""Is a multi-site run the same as a single-site run? Compare products and their provenance.

Two runs are equal when the hub's published products and the single-site reference's products
are the same set of (dataset type, data ID), each present once, and every product was made by the
same task from inputs with the same dataset types and data IDs, recursively (the mock datasets
record the quantum and its inputs that made them). Dataset UUIDs and RUN names differ between the
runs by construction and are left out of the comparison.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.butler import open_repo

__all__ = ["Verification", "compare_runs", "product_signatures", "reference_and_compare"]

Key = tuple[str, str]  # (dataset type, data ID as canonical JSON)


@dataclass
class Verification:
    """The outcome of comparing a run with the reference."""

    equal: bool
    n_reference: int
    n_candidate: int
    missing: list[str] = field(default_factory=list)  # in the reference, not in the run
    extra: list[str] = field(default_factory=list)  # in the run, not in the reference
    duplicated: list[str] = field(default_factory=list)  # more than once in the run
    differing: list[str] = field(default_factory=list)  # same data ID, other provenance
    per_type: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per kind of difference, or that the runs are equal."""
        if self.equal:
            return (
                f"equal: {self.n_candidate} products of {len(self.per_type)} dataset types, "
                "same data IDs and provenance"
            )
        parts = []
        for name in ("missing", "extra", "duplicated", "differing"):
            items = getattr(self, name)
            if items:
                parts.append(f"{len(items)} {name} (e.g. {', '.join(items[:3])})")
        return "; ".join(parts)


def _strip(obj: Any) -> Any:
    """Drop what legitimately differs between runs (UUIDs, RUN names), sort lists canonically."""
    if isinstance(obj, dict):
        return {
            k: _strip(v) for k, v in sorted(obj.items()) if k not in ("dataset_id", "run", "id")
        }
    if isinstance(obj, list):
        items = [_strip(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    return obj


def _data_id(ref: Any) -> str:
    return json.dumps({k: ref.dataId[k] for k in ref.dataId.required}, sort_keys=True, default=str)


def product_signatures(
    repo: str | Path, collection: str, is_product: Callable[[str], bool], run_prefix: str = ""
) -> tuple[dict[Key, str], Counter[Key]]:
    """Provenance signature of every product in a collection, and how often each key occurs.

    Parameters
    ----------
    repo : `str` or `pathlib.Path`
        Repository root.
    collection : `str`
        Collection to read (a CHAINED collection is searched whole, not only first matches).
    is_product : callable
        Which dataset types to compare.
    run_prefix : `str`, optional
        Only datasets in RUN collections starting with it (the campaign's outputs, not the
        raws and calibrations the chain also reaches).

    Returns
    -------
    signatures : `dict`
        (dataset type, data ID) -> SHA-256 of the stripped provenance.
    counts : `collections.Counter`
        (dataset type, data ID) -> number of datasets (more than one is a duplicate).
    """
    import lsst.pipe.base.tests.mocks  # noqa: F401  (mock storage classes)

    signatures: dict[Key, str] = {}
    counts: Counter[Key] = Counter()
    with open_repo(repo, writeable=False) as butler:
        instruments = [r.name for r in butler.query_dimension_records("instrument", explain=False)]
        skymaps = [r.name for r in butler.query_dimension_records("skymap", explain=False)]
        for dataset_type in sorted(butler.registry.queryDatasetTypes(), key=lambda d: d.name):
            if not is_product(dataset_type.name):
                continue
            dims = set(dataset_type.dimensions.names)
            terms, bind = [], {}
            if "instrument" in dims and instruments:
                terms.append("instrument IN (insts)")
                bind["insts"] = instruments
            if "skymap" in dims and skymaps:
                terms.append("skymap IN (sms)")
                bind["sms"] = skymaps
            refs = butler.query_datasets(
                dataset_type,
                collections=collection,
                find_first=False,
                where=" AND ".join(terms),
                bind=bind,
                explain=False,
                limit=None,
            )
            for ref in refs:
                if not ref.run.startswith(run_prefix):
                    continue
                key = (dataset_type.name, _data_id(ref))
                counts[key] += 1
                path = Path(butler.getURI(ref).ospath)
                content = _strip(json.loads(path.read_text()))
                signatures[key] = hashlib.sha256(
                    json.dumps(content, sort_keys=True, default=str).encode()
                ).hexdigest()
    return signatures, counts


def compare_runs(
    candidate_repo: str | Path,
    candidate_collection: str,
    reference_repo: str | Path,
    reference_collection: str,
    is_product: Callable[[str], bool],
    run_prefix: str = "",
) -> Verification:
    """Compare a run's products with the reference's.

    Parameters
    ----------
    candidate_repo, reference_repo : `str` or `pathlib.Path`
        Repositories (the hub's, and the single-site reference's).
    candidate_collection, reference_collection : `str`
        Their output collections.
    is_product : callable
        Which dataset types to compare.
    run_prefix : `str`, optional
        Only outputs in RUN collections starting with it (see `product_signatures`).

    Returns
    -------
    verification : `Verification`
    """
    cand, cand_counts = product_signatures(
        candidate_repo, candidate_collection, is_product, run_prefix
    )
    ref, _ = product_signatures(reference_repo, reference_collection, is_product, run_prefix)

    def name(key: Key) -> str:
        return f"{key[0]} {key[1]}"

    missing = sorted(name(k) for k in ref.keys() - cand.keys())
    extra = sorted(name(k) for k in cand.keys() - ref.keys())
    duplicated = sorted(name(k) for k, n in cand_counts.items() if n > 1)
    differing = sorted(name(k) for k in ref.keys() & cand.keys() if ref[k] != cand[k])
    per_type = Counter(k[0] for k in cand)
    return Verification(
        equal=not (missing or extra or duplicated or differing) and bool(ref),
        n_reference=len(ref),
        n_candidate=sum(cand_counts.values()),
        missing=missing,
        extra=extra,
        duplicated=duplicated,
        differing=differing,
        per_type=dict(sorted(per_type.items())),
    )


def reference_and_compare(run: Any) -> Verification:
    """Run the single-site reference in ``<workdir>/reference`` (resumable) and compare.

    Parameters
    ----------
    run : `drp_campaign.campaign.CampaignRun`
        The multi-site campaign (its spec, visits, Dask client, ledger and hub).

    Returns
    -------
    verification : `Verification`
        The hub's ``<campaign>/output`` against the reference's ``<campaign>/reference``.
    """
    from .campaign import campaign_output
    from .driver import reference_collection, run_single_site
    from .ledger import CAMPAIGN

    ref_root = run.workdir / "reference"

    def work() -> dict[str, Any]:
        result = run_single_site(
            run.spec,
            ref_root,
            run.visits(),
            run.client,
            hub=run.repo_uri(run.hub),
            tracts=run.tracts(),
        )
        return {"n_quanta": result.n_quanta, "wall_s": result.wall_s}

    run.run_stage(CAMPAIGN, CAMPAIGN, "reference", work)
    return compare_runs(
        run.repo_uri(run.hub),
        campaign_output(run.spec.campaign),
        ref_root,
        reference_collection(run.spec.campaign),
        run.is_product,
        run_prefix=f"{run.spec.campaign}/",
    )
