"""Embedded workload backend: run a saved QuantumGraph the way production jobs do, on Dask.

Production (BPS + PanDA) runs every quantum through the quantum-backed butler (QBB): the graph
carries datastore records, ``pipetask pre-exec-init-qbb`` writes the init-outputs once, each job
runs ``pipetask run-qbb`` on its quanta without touching the registry, and the final job merges the
outputs into the repository with ``butler aggregate-graph``. We do exactly those three things, but
quanta run as Dask tasks on long-lived workers that import the stack and read the graph once
(``pipetask run -j N`` starts a fresh process per quantum: 24x slower here, middleware-notes.md).

Each quantum is one Dask task whose dependencies are its predecessors in the graph, so the
scheduler keeps every worker busy as soon as inputs exist; a failed quantum's descendants are
skipped and reported, never run on partial inputs.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "ExecutionReport",
    "LocalService",
    "QuantumFailure",
    "QuantumOutcome",
    "aggregate",
    "execute_graph",
    "pre_exec_init",
]

_LOG = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, "QuantumOutcome"], None]


@dataclass(frozen=True)
class QuantumOutcome:
    """What happened to one quantum."""

    quantum_id: str
    task: str
    data_id: dict[str, Any]
    status: str  # "succeeded" | "failed" | "skipped"
    seconds: float = 0.0
    error: str = ""
    log_tail: tuple[str, ...] = ()


@dataclass
class ExecutionReport:
    """Counts and failures of one graph execution."""

    graph: str
    n_quanta: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    per_task: dict[str, int] = field(default_factory=dict)
    failures: list[QuantumOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every quantum succeeded."""
        return self.succeeded == self.n_quanta

    def describe_failures(self, limit: int = 5) -> str:
        """A report naming each failing quantum's task, data ID and last log lines."""
        lines = []
        for f in self.failures[:limit]:
            dims = ", ".join(f"{k}={v}" for k, v in f.data_id.items())
            lines.append(f"- {f.task} ({dims}): {f.error}")
            lines.extend(f"    | {line}" for line in f.log_tail)
        more = len(self.failures) - limit
        if more > 0:
            lines.append(f"- ... and {more} more failed quanta")
        if self.skipped:
            lines.append(f"- {self.skipped} quanta skipped because an upstream quantum failed")
        return "\n".join(lines)


class QuantumFailure(RuntimeError):
    """Raised when a graph's execution had failed quanta; the message names them."""

    def __init__(self, report: ExecutionReport) -> None:
        self.report = report
        super().__init__(
            f"{report.failed} of {report.n_quanta} quanta failed in {report.graph}:\n"
            + report.describe_failures()
        )


# --- worker side (one cache per worker process) ---------------------------------------------


def _import_mocks() -> None:
    # The mock storage classes and formatters exist only after this import; every process that
    # reads or writes mock datasets needs it (middleware-notes.md). Every process that reads
    # graphs also needs the zipfile fix (see drp_campaign.backends.zipfix).
    import lsst.pipe.base.tests.mocks  # noqa: F401

    from .. import zipfix

    zipfix.apply()


@lru_cache(maxsize=4)
def _worker_state(graph_path: str, butler_config: str) -> tuple[Any, Any, Any]:
    """Read the graph's execution quanta and build an executor once per worker and graph."""
    _import_mocks()
    from lsst.daf.butler import QuantumBackedButler
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph
    from lsst.pipe.base.single_quantum_executor import SingleQuantumExecutor

    qg = PredictedQuantumGraph.read_execution_quanta(graph_path)
    qg.build_execution_quanta()
    xgraph = qg.quantum_only_xgraph
    dataset_types = {
        node.name: node.dataset_type for node in qg.pipeline_graph.dataset_types.values()
    }
    universe = qg.pipeline_graph.universe

    def factory(quantum: Any) -> Any:
        return QuantumBackedButler.initialize(
            config=butler_config, quantum=quantum, dimensions=universe, dataset_types=dataset_types
        )

    executor = SingleQuantumExecutor(
        butler=None,
        limited_butler_factory=factory,
        skip_existing=True,  # a rerun after a crash redoes only what has no outputs
        clobber_outputs=True,
        raise_on_partial_outputs=True,
    )
    return qg, xgraph, executor


def _run_quantum(graph_path: str, butler_config: str, quantum_id: str, *upstream: Any) -> Any:
    """Execute one quantum (a Dask task); ``upstream`` are its predecessors' outcomes."""
    qg, xgraph, executor = _worker_state(graph_path, butler_config)
    qid = uuid.UUID(quantum_id)
    node = xgraph.nodes[qid]
    task = node["task_label"]
    data_id = {k: v for k, v in node["data_id"].required.items()}
    if any(u.status != "succeeded" for u in upstream):
        return QuantumOutcome(quantum_id, task, data_id, "skipped", error="upstream failed")
    from lsst.daf.butler.logging import ButlerLogRecords

    records = ButlerLogRecords([])
    t0 = time.perf_counter()
    try:
        executor.execute(
            node["pipeline_node"], node["quantum"], quantum_id=qid, log_records=records
        )
    except Exception as exc:  # report it: the driver names the quantum, never hides it
        tail = [f"{r.levelname} {r.name}: {r.message}" for r in list(records)[-8:]]
        tail += traceback.format_exception_only(exc)[-1:]
        return QuantumOutcome(
            quantum_id,
            task,
            data_id,
            "failed",
            time.perf_counter() - t0,
            f"{type(exc).__name__}: {exc}",
            tuple(line.rstrip() for line in tail),
        )
    return QuantumOutcome(quantum_id, task, data_id, "succeeded", time.perf_counter() - t0)


def _graph_order(graph_path: str) -> list[tuple[str, list[str]]]:
    """Quanta in topological order with their predecessors (driver side, header read only)."""
    _import_mocks()
    import networkx
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    qg = PredictedQuantumGraph.read_execution_quanta(graph_path)
    xgraph = qg.quantum_only_xgraph
    return [
        (str(q), [str(p) for p in xgraph.predecessors(q)])
        for q in networkx.lexicographical_topological_sort(xgraph, key=str)
    ]


# --- driver side ------------------------------------------------------------------------------


def pre_exec_init(graph_path: str | Path, butler_config: str | Path) -> None:
    """Write the graph's init-outputs (task configs, schemas) once, as ``pre-exec-init-qbb``.

    Parameters
    ----------
    graph_path : str or `pathlib.Path`
        A saved predicted QuantumGraph (``.qg``) built with datastore records.
    butler_config : str or `pathlib.Path`
        The repository the graph was built against (or one holding copies of its inputs).
    """
    _import_mocks()
    from lsst.pipe.base.pipeline_graph import TaskImportMode
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    with PredictedQuantumGraph.open(
        str(graph_path), import_mode=TaskImportMode.ASSUME_CONSISTENT_EDGES
    ) as reader:
        reader.read_init_quanta()
    qg = reader.finish()
    with qg.make_init_qbb(str(butler_config)) as butler:
        qg.init_output_run(butler)


def execute_graph(
    graph_path: str | Path,
    butler_config: str | Path,
    client: Any,
    *,
    progress: ProgressFn | None = None,
) -> ExecutionReport:
    """Run every quantum of a saved graph on a Dask client through the quantum-backed butler.

    Parameters
    ----------
    graph_path : str or `pathlib.Path`
        The saved graph.
    butler_config : str or `pathlib.Path`
        The site's repository.
    client : `distributed.Client`
        Workers should be processes with one thread each (the Butler is not thread-safe).
    progress : callable, optional
        ``progress(done, total, outcome)`` after each quantum.

    Returns
    -------
    report : `ExecutionReport`
        Never raises for failed quanta; see :class:`QuantumFailure` for callers that must.
    """
    from distributed import as_completed

    graph, config = str(graph_path), str(butler_config)
    t0 = time.perf_counter()
    order = _graph_order(graph)
    report = ExecutionReport(graph=graph, n_quanta=len(order))
    futures: dict[str, Any] = {}
    run = uuid.uuid4().hex[:8]  # keys unique per execution: a rerun must not reuse old results
    for qid, preds in order:
        futures[qid] = client.submit(
            _run_quantum,
            graph,
            config,
            qid,
            *[futures[p] for p in preds],
            key=f"quantum-{run}-{qid}",
            pure=False,
        )
    for done, fut in enumerate(as_completed(list(futures.values())), start=1):
        outcome: QuantumOutcome = fut.result()
        if outcome.status == "succeeded":
            report.succeeded += 1
            report.per_task[outcome.task] = report.per_task.get(outcome.task, 0) + 1
        elif outcome.status == "failed":
            report.failed += 1
            report.failures.append(outcome)
        else:
            report.skipped += 1
        if progress:
            progress(done, len(order), outcome)
    report.failures.sort(key=lambda f: (f.task, sorted(f.data_id.items())))
    report.wall_s = time.perf_counter() - t0
    return report


def aggregate(graph_path: str | Path, butler_config: str | Path) -> None:
    """Merge the executed graph's outputs into the repository, as BPS's final job does.

    Registers the dataset types, ingests every output the quanta wrote and updates the output
    chain (``butler aggregate-graph --register-dataset-types --update-output-chain
    --mock-storage-classes``).
    """
    _import_mocks()
    from lsst.pipe.base.quantum_graph import aggregator

    config = aggregator.AggregatorConfig(
        register_dataset_types=True,
        update_output_chain=True,
        mock_storage_classes=True,
        n_processes=1,
    )
    aggregator.aggregate_graph(str(graph_path), str(butler_config), config)


# --- the WorkloadService of the embedded default -----------------------------------------------


class LocalService:
    """The embedded `WorkloadService`: runs a site's BPS submission on a Dask client.

    It reads what it needs from the rendered BPS submit file (``payload.butlerConfig``) and
    executes the prebuilt graph the way a BPS workflow does: ``pre-exec-init``, every quantum
    through the quantum-backed butler, then the final job (`aggregate`). It is synchronous:
    `submit` returns once the run has ended, and `status` reports what the run left in
    ``state_dir`` (so a new process, after a crash, sees it too). A resubmission after a crash
    skips the quanta whose outputs exist already (``skip_existing``), so nothing is done twice.
    It is not a BPS ``BaseWmsService``; the submit file's ``wmsServiceClass`` names it so that
    the file says which system runs it.

    Parameters
    ----------
    client : `distributed.Client`
        Dask client with process workers (one thread each).
    state_dir : `str` or `pathlib.Path`
        Where each run's status is kept (``<run_id>.json``).
    progress : callable, optional
        ``progress(done, total, outcome)`` after each quantum.
    """

    def __init__(
        self, client: Any, state_dir: str | Path, *, progress: ProgressFn | None = None
    ) -> None:
        self.client = client
        self.state_dir = Path(state_dir)
        self.progress = progress

    def ping(self) -> None:
        """The local executor answers as long as its Dask client does."""
        from ..interfaces import WorkloadError

        if self.client.status != "running":
            raise WorkloadError(f"the local Dask client is {self.client.status}")

    @staticmethod
    def _run_id(submit_yaml: Path) -> str:
        return f"local-{submit_yaml.stem}"

    def submit(self, submit_yaml: Path, graph: Path | None = None) -> str:
        """Execute the graph of a submission and merge its outputs; returns the run id."""
        import yaml

        from ..interfaces import WorkloadError

        if graph is None:
            raise WorkloadError(
                f"{submit_yaml}: the local executor needs the prebuilt graph (build it first)"
            )
        config = yaml.safe_load(Path(submit_yaml).read_text())
        butler_config = str(config["payload"]["butlerConfig"])
        run_id = self._run_id(Path(submit_yaml))
        common = {"graph": str(graph), "submit_yaml": str(submit_yaml)}
        self._write(run_id, {"state": "RUNNING", **common})
        pre_exec_init(graph, butler_config)
        report = execute_graph(graph, butler_config, self.client, progress=self.progress)
        state = "SUCCEEDED"
        if report.ok:
            aggregate(graph, butler_config)  # the final job
        else:
            state = "FAILED"
        labels: dict[str, dict[str, int]] = {}
        for task, n in report.per_task.items():
            labels.setdefault(task, {"total": 0, "succeeded": 0, "failed": 0})
            labels[task]["succeeded"] += n
            labels[task]["total"] += n
        for failure in report.failures:
            labels.setdefault(failure.task, {"total": 0, "succeeded": 0, "failed": 0})
            labels[failure.task]["failed"] += 1
            labels[failure.task]["total"] += 1
        self._write(
            run_id,
            {
                "state": state,
                **common,
                "labels": labels,
                "n_quanta": report.n_quanta,
                "wall_s": report.wall_s,
                "message": "" if report.ok else report.describe_failures(),
            },
        )
        return run_id

    def _write(self, run_id: str, status: dict[str, Any]) -> None:
        import json
        import os

        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{run_id}.json.tmp"
        tmp.write_text(json.dumps(status, sort_keys=True))
        os.replace(tmp, self.state_dir / f"{run_id}.json")

    def status(self, run_id: str) -> Any:
        """The state a run left (RUNNING if its process died mid-run: resubmit it)."""
        import json

        from ..interfaces import LabelReport, WorkloadError, WorkloadState, WorkloadStatus

        path = self.state_dir / f"{run_id}.json"
        if not path.exists():
            raise WorkloadError(f"no local run {run_id!r} in {self.state_dir}")
        data = json.loads(path.read_text())
        labels = tuple(
            LabelReport(label, c["total"], c["succeeded"], c["failed"], (1,) if c["failed"] else ())
            for label, c in sorted(data.get("labels", {}).items())
        )
        return WorkloadStatus(run_id, WorkloadState(data["state"]), labels, data.get("message", ""))

    def cancel(self, run_id: str) -> None:
        """Nothing runs in the background: a cancelled flow stops the synchronous run itself."""

    def restart(self, run_id: str) -> str:
        """Run the failed quanta again (the others are skipped as their outputs exist)."""
        import json

        data = json.loads((self.state_dir / f"{run_id}.json").read_text())
        submit_yaml = Path(str(data.get("submit_yaml", "")))
        if not submit_yaml.exists():
            from ..interfaces import WorkloadError

            raise WorkloadError(f"local run {run_id!r} cannot be restarted: submit file missing")
        return self.submit(submit_yaml, Path(data["graph"]))
