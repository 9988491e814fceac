"""The embedded workload: a real QuantumGraph executed through the quantum-backed butler on Dask
workers, then aggregated into the repository as BPS's final job does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lsst.pipe.base.tests.mocks  # noqa: F401  (mock storage classes in this process too)
import pytest
from lsst.daf.butler import Butler
from lsst.pipe.base.tests.mocks import DirectButlerRepo, DynamicTestPipelineTaskConfig, MockDataset

from drp_campaign.backends.local.workload import (
    QuantumFailure,
    aggregate,
    execute_graph,
    pre_exec_init,
)
from drp_campaign.planner import dask_client


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    # Two single-threaded worker processes, as the site executor runs them.
    with dask_client(workers=2) as c:
        yield c


def _chain_graph(root: Path, fail_detector: int | None = None) -> tuple[Path, str, int]:
    """Build a 3-task chain per (instrument, detector) in a real repo; return (graph, repo, n)."""
    with DirectButlerRepo.make_temporary("base.yaml") as (repo, tmp):
        for label in ("isr", "calibrate", "measure"):
            config = DynamicTestPipelineTaskConfig()
            if label == "calibrate" and fail_detector is not None:
                config.fail_condition = f"detector = {fail_detector}"
            repo.add_task(label, dimensions=["detector"], config=config)
        builder = repo.make_quantum_graph_builder(output_run="out/run")
        components = builder.finish(output="out", attach_datastore_records=True)
        graph = root / "chain.qg"
        components.write(graph)
        n = len(components.assemble())
        # Keep the repository: copy it beside the graph (the context removes its directory).
        import shutil

        dest = root / "repo"
        shutil.copytree(tmp, dest)
    return graph, str(dest), n


def test_execute_and_aggregate_a_real_graph(tmp_path: Path, client: object) -> None:
    graph, repo, n = _chain_graph(tmp_path)
    assert n == 3 * 4  # base.yaml has four detectors of Cam1
    pre_exec_init(graph, repo)
    seen: list[str] = []
    report = execute_graph(graph, repo, client, progress=lambda d, t, o: seen.append(o.task))
    assert report.ok and report.succeeded == n and report.failed == report.skipped == 0
    assert report.per_task == {"isr": 4, "calibrate": 4, "measure": 4}
    assert len(seen) == n
    aggregate(graph, repo)
    with Butler.from_config(repo) as butler:
        refs = butler.query_datasets("dataset_auto3", collections="out", instrument="Cam1")
        assert len(refs) == 4
        # Provenance: each measure output was made from the calibrate output of its detector.
        out = butler.get(refs[0])
        assert isinstance(out, MockDataset)
        assert out.quantum is not None
        inputs = [i for conn in out.quantum.inputs.values() for i in conn]
        assert inputs and all(i.data_id["detector"] == refs[0].dataId["detector"] for i in inputs)


def test_failure_names_the_quantum_and_skips_descendants(tmp_path: Path, client: object) -> None:
    graph, repo, n = _chain_graph(tmp_path, fail_detector=2)
    pre_exec_init(graph, repo)
    report = execute_graph(graph, repo, client)
    assert not report.ok
    assert report.failed == 1 and report.skipped == 1 and report.succeeded == n - 2
    failure = report.failures[0]
    assert failure.task == "calibrate" and failure.data_id["detector"] == 2
    message = str(QuantumFailure(report))
    assert "calibrate (instrument=Cam1, detector=2)" in message
    assert "1 quanta skipped because an upstream quantum failed" in message
