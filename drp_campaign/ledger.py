"""The campaign ledger: one SQLite file in the work directory that makes every stage resumable.

Every unit of work is a *stage* of a (step, site): ``setup``, ``distribute``, ``stage``,
``build``, ``submit``, ``merge``, ``publish``, ``arrive`` ... Its row holds its state, when it
started and ended, its figures (JSON) and the error that stopped it. The deterministic names a
stage creates (output run, graph file, workload run id, rule ids) are recorded *before* the side
effect that uses them, so a rerun after a crash finds them and resumes (polls the submitted run,
re-reads the rule) instead of doing the work twice.

A (step, site) is run by one process at a time: `Ledger.claim` takes a lease recorded with the
holder's host and PID. A second run of the same site-step gets `SiteStepBusy` naming the holder;
a lease whose holder died (SIGKILL, a lost node) is taken over, because the PID is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CAMPAIGN", "Ledger", "SiteStepBusy", "StageRecord", "StageState", "pid_alive"]

CAMPAIGN = "*"  # the step (and site) of campaign-wide stages (plan, setup, distribute, report)


class StageState:
    """The states a stage goes through (strings, so the ledger stays readable with sqlite3)."""

    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"  # nothing to do (e.g. a site with no visit in a tract-sharded step)


@dataclass(frozen=True)
class StageRecord:
    """One row of the ledger."""

    step: str
    site: str
    stage: str
    state: str
    started: float | None
    finished: float | None
    figures: dict[str, Any]
    error: str | None
    attempts: int
    group: str = ""  # the group of the site-step ("" for the site-step's own stages)

    @property
    def done(self) -> bool:
        """Whether the stage needs no more work (DONE or SKIPPED)."""
        return self.state in (StageState.DONE, StageState.SKIPPED)

    @property
    def seconds(self) -> float | None:
        """Wall time of the last attempt, once finished."""
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


class SiteStepBusy(RuntimeError):
    """Another live process holds the (step, site): never run it twice at once."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    step TEXT NOT NULL, site TEXT NOT NULL, grp TEXT NOT NULL DEFAULT '', stage TEXT NOT NULL,
    state TEXT NOT NULL, started REAL, finished REAL, figures TEXT NOT NULL DEFAULT '{}',
    error TEXT, attempts INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL,
    PRIMARY KEY (step, site, grp, stage)
);
CREATE TABLE IF NOT EXISTS names (
    step TEXT NOT NULL, site TEXT NOT NULL, grp TEXT NOT NULL DEFAULT '', key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (step, site, grp, key)
);
CREATE TABLE IF NOT EXISTS leases (
    step TEXT NOT NULL, site TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    token TEXT NOT NULL, acquired REAL NOT NULL,
    PRIMARY KEY (step, site)
);
"""


def _migrate(c: sqlite3.Connection) -> None:
    """Give a ledger written before groups existed their ``grp`` column (rows keep ``""``)."""
    for table in ("stages", "names"):
        columns = {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
        if columns and "grp" not in columns:
            # The primary key gains the column, which ALTER TABLE cannot do: copy the rows.
            c.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
            c.executescript(_SCHEMA)
            keep = ", ".join(sorted(columns))
            c.execute(f"INSERT INTO {table} ({keep}) SELECT {keep} FROM {table}_v1")
            c.execute(f"DROP TABLE {table}_v1")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host is alive (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A zombie (killed, not yet reaped by its parent) is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class Ledger:
    """The durable record of a campaign's progress (``<workdir>/ledger.sqlite``).

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The SQLite file (created with its parent directory if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as c:
            _migrate(c)
            c.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per call: the ledger is shared by threads (concurrent
        # sites) and processes (a rerun beside a stuck run), and WAL lets readers go on.
        c = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            yield c
        finally:
            c.close()

    # ------------------------------------------------------------------------------ stages
    def get(self, step: str, site: str, stage: str, *, group: str = "") -> StageRecord | None:
        """Return a stage's record, or `None` if it never started."""
        with self._connect() as c:
            row = c.execute(
                "SELECT * FROM stages WHERE step=? AND site=? AND grp=? AND stage=?",
                (step, site, group, stage),
            ).fetchone()
        return None if row is None else self._record(row)

    def is_done(self, step: str, site: str, stage: str, *, group: str = "") -> bool:
        """Whether a stage is DONE or SKIPPED."""
        record = self.get(step, site, stage, group=group)
        return record is not None and record.done

    def start(self, step: str, site: str, stage: str, *, group: str = "") -> StageRecord:
        """Mark a stage RUNNING (a new attempt); returns the record as it was before."""
        now = time.time()
        key = (step, site, group, stage)
        with self._connect() as c:
            c.execute("BEGIN IMMEDIATE")
            row = c.execute(
                "SELECT * FROM stages WHERE step=? AND site=? AND grp=? AND stage=?", key
            ).fetchone()
            if row is None:
                seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM stages").fetchone()[0]
                c.execute(
                    "INSERT INTO stages (step, site, grp, stage, state, started, attempts, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                    (*key, StageState.RUNNING, now, seq),
                )
            else:
                c.execute(
                    "UPDATE stages SET state=?, started=?, finished=NULL, error=NULL, "
                    "attempts=attempts+1 WHERE step=? AND site=? AND grp=? AND stage=?",
                    (StageState.RUNNING, now, *key),
                )
            c.execute("COMMIT")
        before = self._record(row) if row is not None else None
        return before or StageRecord(step, site, stage, "NEW", None, None, {}, None, 0, group)

    def finish(
        self,
        step: str,
        site: str,
        stage: str,
        figures: Mapping[str, Any] | None = None,
        *,
        skipped: bool = False,
        group: str = "",
    ) -> None:
        """Mark a stage DONE (or SKIPPED) with its figures."""
        state = StageState.SKIPPED if skipped else StageState.DONE
        with self._connect() as c:
            c.execute(
                "UPDATE stages SET state=?, finished=?, figures=? "
                "WHERE step=? AND site=? AND grp=? AND stage=?",
                (
                    state,
                    time.time(),
                    json.dumps(dict(figures or {}), sort_keys=True),
                    step,
                    site,
                    group,
                    stage,
                ),
            )

    def fail(self, step: str, site: str, stage: str, error: str, *, group: str = "") -> None:
        """Mark a stage FAILED with the error that stopped it."""
        with self._connect() as c:
            c.execute(
                "UPDATE stages SET state=?, finished=?, error=? "
                "WHERE step=? AND site=? AND grp=? AND stage=?",
                (StageState.FAILED, time.time(), error[:4000], step, site, group, stage),
            )

    def records(
        self, step: str | None = None, site: str | None = None, *, group: str | None = None
    ) -> list[StageRecord]:
        """Every stage record (optionally of one step, site and/or group), in start order.

        ``group=None`` gives the rows of every group and those of the site-step itself;
        ``group=""`` only the site-step's own.
        """
        sql, args = "SELECT * FROM stages WHERE 1=1", []
        for column, value in (("step", step), ("site", site), ("grp", group)):
            if value is not None:
                sql += f" AND {column}=?"
                args.append(value)
        with self._connect() as c:
            rows = c.execute(sql + " ORDER BY seq", args).fetchall()
        return [self._record(r) for r in rows]

    def groups(self, step: str, site: str) -> list[str]:
        """The groups of a (step, site) that have ledger rows, sorted."""
        with self._connect() as c:
            rows = c.execute(
                "SELECT DISTINCT grp FROM stages WHERE step=? AND site=? AND grp != '' "
                "UNION SELECT DISTINCT grp FROM names WHERE step=? AND site=? AND grp != ''",
                (step, site, step, site),
            ).fetchall()
        return sorted(str(r[0]) for r in rows)

    def reset(
        self, step: str, site: str, stages: list[str] | None = None, *, group: str | None = ""
    ) -> int:
        """Forget stages of a (step, site) so they run again (an operator's explicit rerun).

        ``group`` selects one group's rows (``""``: the site-step's own; `None`: all).
        """
        sql, args = "DELETE FROM stages WHERE step=? AND site=?", [step, site]
        if group is not None:
            sql += " AND grp=?"
            args.append(group)
        if stages is not None:
            sql += f" AND stage IN ({','.join('?' * len(stages))})"
            args.extend(stages)
        with self._connect() as c:
            return c.execute(sql, args).rowcount

    @staticmethod
    def _record(row: sqlite3.Row) -> StageRecord:
        return StageRecord(
            row["step"],
            row["site"],
            row["stage"],
            row["state"],
            row["started"],
            row["finished"],
            json.loads(row["figures"]),
            row["error"],
            row["attempts"],
            row["grp"],
        )

    # ------------------------------------------------------------------------------- names
    def name(self, step: str, site: str, key: str, *, group: str = "") -> str | None:
        """A deterministic name recorded for a (step, site[, group]), or `None`."""
        with self._connect() as c:
            row = c.execute(
                "SELECT value FROM names WHERE step=? AND site=? AND grp=? AND key=?",
                (step, site, group, key),
            ).fetchone()
        return None if row is None else str(row[0])

    def set_name(self, step: str, site: str, key: str, value: str, *, group: str = "") -> None:
        """Record a name (overwrites: the latest submission id wins after a restart)."""
        with self._connect() as c:
            c.execute(
                "INSERT INTO names (step, site, grp, key, value) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (step, site, grp, key) DO UPDATE SET value=excluded.value",
                (step, site, group, key, value),
            )

    def delete_names(
        self, step: str, site: str, keys: Iterable[str] | None = None, *, group: str = ""
    ) -> int:
        """Forget names of a (step, site[, group]): ``keys``, or all (for a fresh attempt)."""
        sql, args = "DELETE FROM names WHERE step=? AND site=? AND grp=?", [step, site, group]
        if keys is not None:
            keys = list(keys)
            sql += f" AND key IN ({','.join('?' * len(keys))})"
            args.extend(keys)
        with self._connect() as c:
            return c.execute(sql, args).rowcount

    def names(
        self, step: str | None = None, site: str | None = None, *, group: str = ""
    ) -> dict[str, str]:
        """Names of one (step, site[, group]) as ``key -> value`` (every name, keyed
        ``step/site[/group]/key``, when step and site are both `None`)."""
        with self._connect() as c:
            rows = c.execute("SELECT * FROM names ORDER BY step, site, grp, key").fetchall()
        if step is None and site is None:
            return {
                "/".join(p for p in (r["step"], r["site"], r["grp"], r["key"]) if p): r["value"]
                for r in rows
            }
        return {
            r["key"]: r["value"]
            for r in rows
            if r["step"] == step and r["site"] == site and r["grp"] == group
        }

    # ------------------------------------------------------------------------------ leases
    def live_claims(self) -> list[tuple[str, str, str, int]]:
        """The site-steps a live process holds now: ``(step, site, host, pid)``.

        A lease of a process on this host that is gone does not count (it crashed); one held
        from another host always does (its liveness cannot be told from here).
        """
        host = socket.gethostname()
        with self._connect() as c:
            rows = c.execute(
                "SELECT step, site, host, pid FROM leases ORDER BY step, site"
            ).fetchall()
        return [
            (str(r["step"]), str(r["site"]), str(r["host"]), int(r["pid"]))
            for r in rows
            if r["host"] != host or pid_alive(int(r["pid"]))
        ]

    @contextmanager
    def claim(self, step: str, site: str) -> Iterator[None]:
        """Hold the (step, site) for this process while the block runs.

        Raises
        ------
        SiteStepBusy
            If a live process on this host (or any process on another host) holds it.
        """
        host, pid = socket.gethostname(), os.getpid()
        owner = f"{host}:{pid}:{threading.get_ident()}:"
        token = f"{owner}{time.time_ns()}"
        with self._connect() as c:
            c.execute("BEGIN IMMEDIATE")
            row = c.execute("SELECT * FROM leases WHERE step=? AND site=?", (step, site)).fetchone()
            if row is not None and not str(row["token"]).startswith(owner):
                # Another thread of this process counts as alive; on this host a PID that is
                # gone means the holder crashed, and its lease is taken over.
                dead = (
                    row["host"] == host
                    and int(row["pid"]) != pid
                    and not pid_alive(int(row["pid"]))
                )
                if not dead:
                    c.execute("ROLLBACK")
                    since = time.strftime("%H:%M:%S", time.localtime(row["acquired"]))
                    raise SiteStepBusy(
                        f"{step} at {site} is already being run by process {row['pid']} on "
                        f"{row['host']} (since {since}); wait for it to finish, or stop it "
                        f"before rerunning. Nothing was submitted twice."
                    )
            c.execute(
                "INSERT OR REPLACE INTO leases (step, site, host, pid, token, acquired) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (step, site, host, pid, token, time.time()),
            )
            c.execute("COMMIT")
        try:
            yield
        finally:
            with self._connect() as c:
                c.execute(
                    "DELETE FROM leases WHERE step=? AND site=? AND token=?", (step, site, token)
                )
