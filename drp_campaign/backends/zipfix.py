"""Work around a CPython ``zipfile`` bug that corrupts reads of QuantumGraph files.

``zipfile._SharedFile.seek(offset, SEEK_CUR)`` moves relative to the *underlying* file's position,
not to the member's own, so when two members of one archive are open at once (pipe_base's
multi-block ``.qg`` reader keeps an index member and a data member open) a relative seek can land
in the other member's bytes. ``ZipExtFile.seek`` uses such a relative seek for stored members, so
random-order reads of a graph (as ``aggregate-graph``'s scanners do) occasionally end with
``EOFError``: seen here on Python 3.12.1 for 1 quantum in 1,274 read in shuffled order. This is
CPython gh-127847, fixed upstream in 3.12.9 and 3.13.2; the replacement below is that fix (seek
relative to the member's own position). Applying it is idempotent and harmless where the bug is
already fixed.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

__all__ = ["apply", "is_broken"]


def _seek(self: Any, offset: int, whence: int = os.SEEK_SET) -> int:
    with self._lock:
        if self._writing():
            raise ValueError(
                "Can't reposition in the ZIP file while there is an open writing handle on it. "
                "Close the writing handle before trying to read."
            )
        if whence == os.SEEK_CUR:
            self._file.seek(self._pos + offset)
        else:
            self._file.seek(offset, whence)
        self._pos = self._file.tell()
        return int(self._pos)


def apply() -> None:
    """Patch ``zipfile._SharedFile.seek`` in this process (idempotent)."""
    shared = zipfile._SharedFile  # type: ignore[attr-defined]
    if shared.seek is not _seek:
        shared.seek = _seek


def is_broken() -> bool:
    """Whether this interpreter's ``zipfile`` still has the bug (before :func:`apply`).

    Reads a stored member after a relative seek while another member of the archive is open.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a", b"0123456789" * 100)
        zf.writestr("b", b"abcdefghij" * 100)
    with zipfile.ZipFile(buf) as zf, zf.open("a") as a, zf.open("b") as b:
        a.read(1)
        b.seek(500)
        return b.read(3) != b"abc"
