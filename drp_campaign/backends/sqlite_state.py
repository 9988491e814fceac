"""Small SQLite state files shared by threads: the embedded catalog, monitors, event cursors.

Each thread gets its own connection (a `sqlite3.Connection` must not be shared between threads
while in use), in autocommit mode so that every operation is exactly one transaction begun
explicitly, of the kind the caller chooses (``BEGIN`` to read a consistent snapshot, ``BEGIN
IMMEDIATE`` to write without a later lock upgrade failing).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ThreadLocalSQLite"]


class ThreadLocalSQLite:
    """One connection per thread to a SQLite file, and explicit transactions.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The database file.
    synchronous : `str`, optional
        ``PRAGMA synchronous`` for each connection (SQLite's default when `None`).
    busy_timeout_ms : `int`, optional
        How long a connection waits for another writer's lock.
    """

    def __init__(
        self, path: str | Path, *, synchronous: str | None = None, busy_timeout_ms: int = 60000
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (rows are `sqlite3.Row`: by index or by name)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None
            )
            conn.row_factory = sqlite3.Row
            if self.synchronous is not None:
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection: committed, or rolled back on error."""
        conn = self.conn()
        conn.execute(begin)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection (a later call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
