"""Search files and captured texts for secrets, without ever printing them.

The campaign must never write a credential where it does not belong: not in logs, artifacts, flow
parameters, BPS files, reports, or the Prefect server's database in clear. A test runs a campaign
with known secret values and calls `scan` on everything it wrote and every log line it captured;
any `Finding` is a leak.

A secret can hide in more than its plain form, so `scan` also looks for the encodings a leak
usually takes: percent-encoding (URLs, query strings), base64 at each of the three byte
alignments (HTTP ``Basic`` headers carry ``user:password`` inside a longer base64 string), hex,
JSON string escapes and UTF-16. Files are read as bytes, in blocks (memory stays flat on large
files), and containers whose bytes hide their content are also opened: gzip, bzip2 and xz
streams, zip members, SQLite databases (every text and blob value, which also covers values split
across overflow pages) and Parquet files (every string and binary value of every column, which
covers compressed pages). The raw bytes of every file are always scanned too, so deleted rows
still present in free SQLite pages are found. Containers are opened one level deep (a zip inside
a zip is scanned raw only).

Pure: the standard library only, plus pyarrow imported when a Parquet file is met.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import json
import lzma
import os
import sqlite3
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, quote_plus

__all__ = ["MIN_SECRET_LENGTH", "Finding", "ScanError", "encoded_forms", "scan"]

#: Shorter secrets would match by chance in binary data; credentials are longer than this anyway.
MIN_SECRET_LENGTH = 6

#: Shortest base64 fragment worth searching: shorter ones match random base64 by chance.
_MIN_BASE64_CORE = 6

#: Bytes read at a time; matches across block boundaries are kept by overlapping the blocks.
_BLOCK = 8 << 20

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"SQLite format 3\x00", "sqlite"),
    (b"PAR1", "parquet"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip archive
)


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class ScanError(RuntimeError):
    """A file that could not be scanned completely (unreadable, or a corrupt container).

    Raised rather than skipped: a scanner that silently passes over a file proves nothing.
    """


@dataclass(frozen=True, order=True)
class Finding:
    """One occurrence of a secret.

    Attributes
    ----------
    source : `str`
        The file path, with ``::<where>`` for a value inside a container (``db::sqlite:table.col
        row 3``, ``f.zip::member``), or the label of an extra text.
    offset : `int`
        Byte offset in the file, member or value (character offset in an extra text).
    secret : `int`
        Index of the secret in the sequence given to `scan`; never the secret itself.
    form : `str`
        How it was encoded: ``plain``, ``url``, ``base64+1`` (base64 at byte alignment 1) ...
    """

    source: str
    offset: int
    secret: int
    form: str

    def __str__(self) -> str:
        return f"{self.source} @ {self.offset}: secret #{self.secret} ({self.form})"


# ----------------------------------------------------------------------------------------------
# Encoded forms


def _base64_cores(data: bytes) -> Iterator[tuple[str, str]]:
    """Base64 fragments that encode ``data`` wherever it sits in a longer base64 stream.

    Base64 is a plain bit stream cut in 6-bit characters, so with ``k`` bytes before the secret
    the characters that depend only on secret bits are the same whatever those bytes are.
    """
    n = len(data)
    for k in range(3):
        encoded = base64.b64encode(b"\x00" * k + data + b"\x00\x00").decode("ascii")
        first = (8 * k + 5) // 6  # first character starting inside the secret
        stop = (8 * (k + n)) // 6  # characters ending inside the secret
        core = encoded[first:stop]
        if len(core) >= _MIN_BASE64_CORE:
            yield f"base64+{k}", core
            urlsafe = core.replace("+", "-").replace("/", "_")
            if urlsafe != core:
                yield f"base64url+{k}", urlsafe


def encoded_forms(secret: str) -> list[tuple[str, bytes]]:
    """The byte strings whose presence reveals ``secret``.

    Parameters
    ----------
    secret : `str`
        The secret.

    Returns
    -------
    forms : `list` [`tuple` [`str`, `bytes`]]
        ``(form name, bytes)``, distinct byte strings, plain form first.

    Raises
    ------
    ValueError
        If the secret is shorter than `MIN_SECRET_LENGTH` (it would match by chance).
    """
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"a secret of {len(secret)} characters is too short to search for "
            f"(minimum {MIN_SECRET_LENGTH}): it would match by chance"
        )
    raw = secret.encode("utf-8")
    text_forms: list[tuple[str, str]] = [("plain", secret)]
    for safe in ("", "/"):
        url = quote(secret, safe=safe)
        text_forms.append(("url", url))
        # RFC 3986 allows lower-case hex digits and some encoders use them.
        text_forms.append(("url", _lower_percent(url)))
    text_forms.append(("url+", quote_plus(secret, safe="")))
    text_forms.append(("json", json.dumps(secret)[1:-1]))
    text_forms.append(("json", json.dumps(secret, ensure_ascii=False)[1:-1]))
    text_forms.append(("hex", raw.hex()))
    text_forms.append(("hex", raw.hex().upper()))
    text_forms.extend(_base64_cores(raw))

    forms: list[tuple[str, bytes]] = []
    seen: set[bytes] = set()
    for name, text in text_forms:
        _add(forms, seen, name, text.encode("utf-8"))
    _add(forms, seen, "utf-16-le", secret.encode("utf-16-le"))
    _add(forms, seen, "utf-16-be", secret.encode("utf-16-be"))
    return forms


def _lower_percent(text: str) -> str:
    parts = text.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


def _add(forms: list[tuple[str, bytes]], seen: set[bytes], name: str, value: bytes) -> None:
    if value and value not in seen:
        seen.add(value)
        forms.append((name, value))


# ----------------------------------------------------------------------------------------------
# Searching


@dataclass(frozen=True)
class _Pattern:
    secret: int
    form: str
    value: bytes


class _Scanner:
    def __init__(self, secrets: Sequence[str]) -> None:
        self.patterns = [
            _Pattern(index, form, value)
            for index, secret in enumerate(secrets)
            for form, value in encoded_forms(secret)
        ]
        self.longest = max((len(p.value) for p in self.patterns), default=1)
        self.findings: list[Finding] = []

    def search(self, data: bytes, source: str, base: int = 0, min_end: int = 0) -> None:
        """Record every occurrence in ``data`` that ends after ``min_end`` (block overlap)."""
        for pattern in self.patterns:
            start = data.find(pattern.value)
            while start >= 0:
                if start + len(pattern.value) > min_end:
                    self.findings.append(
                        Finding(source, base + start, pattern.secret, pattern.form)
                    )
                start = data.find(pattern.value, start + 1)

    def search_stream(self, stream: _Readable, source: str) -> None:
        """Search a binary stream block by block; blocks overlap so no match is cut."""
        keep = self.longest - 1
        tail = b""
        base = 0  # offset of tail[0] in the stream
        while block := stream.read(_BLOCK):
            data = tail + block
            # Matches lying wholly in the tail were recorded with the previous block.
            self.search(data, source, base, min_end=len(tail))
            tail = data[-keep:] if keep else b""
            base += len(data) - len(tail)

    def search_value(self, value: Any, source: str) -> None:
        """Search a decoded value (text, bytes, or nested lists and dicts of them)."""
        if isinstance(value, str):
            self.search(value.encode("utf-8", "surrogatepass"), source)
        elif isinstance(value, bytes | bytearray | memoryview):
            self.search(bytes(value), source)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.search_value(key, source)
                self.search_value(item, source)
        elif isinstance(value, list | tuple):
            for item in value:
                self.search_value(item, source)


# ----------------------------------------------------------------------------------------------
# Files and containers


def _kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def _scan_sqlite(scanner: _Scanner, path: Path, source: str) -> None:
    # Read-only: the scan must not change what it inspects (a live server's DB included).
    # mode=ro still reads a write-ahead log; immutable=1 is the fallback when the -shm file
    # cannot be opened, and then the -wal file is scanned raw on its own.
    uri = path.resolve().as_uri()
    try:
        con = sqlite3.connect(f"{uri}?mode=ro", uri=True)
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        con = sqlite3.connect(f"{uri}?immutable=1", uri=True)
    try:
        con.text_factory = bytes  # raw bytes even for text that is not valid UTF-8
        tables = [
            row[0].decode("utf-8")
            for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            # The table name comes from the database itself, quoted as an identifier.
            cursor = con.execute(f"SELECT * FROM {quoted}")
            columns = [d[0] for d in cursor.description]
            for row_number, row in enumerate(cursor):
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        where = f"{source}::sqlite:{table}.{column} row {row_number}"
                        scanner.search(value, where)
    finally:
        con.close()


def _scan_parquet(scanner: _Scanner, path: Path, source: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    row0 = 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group)
        for name, column in zip(table.column_names, table.columns, strict=True):
            kind = column.type
            if pa.types.is_integer(kind) or pa.types.is_floating(kind):
                continue  # cannot hold text
            if pa.types.is_boolean(kind) or pa.types.is_temporal(kind):
                continue
            for row, value in enumerate(column.to_pylist()):
                scanner.search_value(value, f"{source}::parquet:{name} row {row0 + row}")
        row0 += table.num_rows


def _scan_file(scanner: _Scanner, path: Path) -> None:
    source = str(path)
    with open(path, "rb") as f:
        scanner.search_stream(f, source)
    kind = _kind(path)
    openers: dict[str, Callable[[Path], AbstractContextManager[_Readable]]] = {
        "gzip": lambda p: gzip.open(p, "rb"),
        "bzip2": lambda p: bz2.open(p, "rb"),
        "xz": lambda p: lzma.open(p, "rb"),
    }
    if kind in openers:
        with openers[kind](path) as stream:
            scanner.search_stream(stream, f"{source}::{kind}")
    elif kind == "zip":
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    with archive.open(info) as member:
                        scanner.search_stream(member, f"{source}::{info.filename}")
    elif kind == "sqlite":
        _scan_sqlite(scanner, path, source)
    elif kind == "parquet":
        _scan_parquet(scanner, path, source)


def _files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (or ``root`` itself), without following symlinks."""
    info = os.lstat(root)
    if stat.S_ISREG(info.st_mode):
        yield root
    elif stat.S_ISDIR(info.st_mode):
        for directory, dirs, files in os.walk(root, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                path = Path(directory) / name
                # Symlinks point at files scanned where they live (or outside the roots);
                # sockets and FIFOs hold no data at rest.
                if stat.S_ISREG(os.lstat(path).st_mode):
                    yield path


def scan(
    paths: Iterable[Path],
    secrets: Iterable[str],
    extra_texts: Iterable[tuple[str, str]] = (),
) -> list[Finding]:
    """Find every occurrence of any secret in files and texts.

    Parameters
    ----------
    paths : `~collections.abc.Iterable` [`pathlib.Path`]
        Files and directories; directories are walked recursively (symlinks not followed).
    secrets : `~collections.abc.Iterable` [`str`]
        The secret values; findings refer to them by index. Each must have at least
        `MIN_SECRET_LENGTH` characters.
    extra_texts : `~collections.abc.Iterable` [`tuple` [`str`, `str`]]
        ``(label, text)`` pairs searched like files, e.g. captured log lines.

    Returns
    -------
    findings : `list` [`Finding`]
        Sorted; empty when nothing leaked. They name where, never what.

    Raises
    ------
    ScanError
        If a path is missing or a file cannot be read or decoded completely.
    ValueError
        If a secret is too short to search for.
    """
    scanner = _Scanner(list(secrets))
    for root in paths:
        try:
            for path in _files(Path(root)):
                try:
                    _scan_file(scanner, path)
                except ScanError:
                    raise
                except Exception as exc:
                    # Name the file and the error class only: a message could quote content.
                    raise ScanError(
                        f"cannot scan {path}: {type(exc).__name__} while reading it"
                    ) from None
        except OSError as exc:
            raise ScanError(f"cannot scan {root}: {exc.strerror or type(exc).__name__}") from None
    for label, text in extra_texts:
        # Offsets in a text are character offsets: search the text's own characters.
        for pattern in scanner.patterns:
            if pattern.form.startswith("utf-16"):
                continue  # a Python str has no byte order; its UTF-8 forms cover it
            needle = pattern.value.decode("utf-8")
            start = text.find(needle)
            while start >= 0:
                scanner.findings.append(Finding(label, start, pattern.secret, pattern.form))
                start = text.find(needle, start + 1)
    return sorted(set(scanner.findings))
