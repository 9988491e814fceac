"""The secrets scanner finds every planted secret, in every form and container, and only those."""

from __future__ import annotations

import base64
import bz2
import gzip
import json
import lzma
import os
import re
import sqlite3
import zipfile
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drp_campaign import secrets_scan
from drp_campaign.secrets_scan import Finding, ScanError, encoded_forms, scan

SECRET = "s3cr3t/P@ss word+42"  # has characters every encoding changes
TOKEN = "eyJhbGciOiJSUzI1NiJ9.tok-en_value"
FILLER = bytes(range(256)) * 64


def sources(findings: list[Finding]) -> set[str]:
    return {f.source for f in findings}


def test_plain_offsets_and_secret_index(tmp_path: Path) -> None:
    data = b"x" * 10 + SECRET.encode() + b"y" * 5 + TOKEN.encode()
    (tmp_path / "a.bin").write_bytes(data)
    findings = scan([tmp_path], [SECRET, TOKEN])
    plain = [f for f in findings if f.form == "plain"]
    assert plain == [
        Finding(str(tmp_path / "a.bin"), 10, 0, "plain"),
        Finding(str(tmp_path / "a.bin"), 10 + len(SECRET) + 5, 1, "plain"),
    ]


def test_clean_tree_has_no_findings(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "noise.bin").write_bytes(FILLER + os.urandom(4096))
    (tmp_path / "log.txt").write_text("password=********\n")
    assert scan([tmp_path], [SECRET, TOKEN], [("log", "user logged in\n")]) == []


@pytest.mark.parametrize(
    "encoded",
    [
        quote(SECRET, safe=""),
        re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(SECRET, safe="")),
        SECRET.replace(" ", "+").replace("/", "%2F").replace("@", "%40").replace("+42", "%2B42"),
        json.dumps({"password": SECRET}),
        SECRET.encode().hex(),
        base64.b64encode(SECRET.encode()).decode(),
        # HTTP Basic: the secret at every byte alignment inside a longer base64 string.
        base64.b64encode(b"u:" + SECRET.encode()).decode(),
        base64.b64encode(b"us:" + SECRET.encode() + b"!").decode(),
        base64.b64encode(b"user:" + SECRET.encode()).decode(),
        base64.urlsafe_b64encode(b"xx" + SECRET.encode()).decode(),
    ],
)
def test_encoded_forms_are_found(tmp_path: Path, encoded: str) -> None:
    (tmp_path / "f.txt").write_bytes(FILLER + encoded.encode() + FILLER)
    findings = scan([tmp_path], [SECRET])
    assert findings, encoded
    assert all(f.secret == 0 for f in findings)


def test_utf16_and_json_unicode(tmp_path: Path) -> None:
    secret = "pässwörd-Ünïcode"
    (tmp_path / "w.bin").write_bytes(b"\xff\xfe" + secret.encode("utf-16-le"))
    (tmp_path / "j.json").write_text(json.dumps({"p": secret}))  # \u00e4 escapes
    found = {(Path(f.source).name, f.form) for f in scan([tmp_path], [secret])}
    assert ("w.bin", "utf-16-le") in found
    assert ("j.json", "json") in found


def test_match_across_block_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets_scan, "_BLOCK", 64)
    data = b"a" * 60 + TOKEN.encode() + b"b" * 100 + TOKEN.encode()
    (tmp_path / "big").write_bytes(data)
    plain = [f.offset for f in scan([tmp_path], [TOKEN]) if f.form == "plain"]
    assert plain == [60, 60 + len(TOKEN) + 100]  # each once, at its true offset


def test_compressed_streams_and_zip_members(tmp_path: Path) -> None:
    payload = FILLER + SECRET.encode() + FILLER
    (tmp_path / "a.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "a.bz2").write_bytes(bz2.compress(payload))
    (tmp_path / "a.xz").write_bytes(lzma.compress(payload))
    with zipfile.ZipFile(tmp_path / "a.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("dir/clean.txt", "nothing here")
        z.writestr("dir/inner.yaml", payload)
    # The compressed bytes hide the secret; only decoding finds it.
    for name in ("a.gz", "a.bz2", "a.xz", "a.zip"):
        assert SECRET.encode() not in (tmp_path / name).read_bytes()
    found = sources(scan([tmp_path], [SECRET]))
    assert found == {
        f"{tmp_path / 'a.gz'}::gzip",
        f"{tmp_path / 'a.bz2'}::bzip2",
        f"{tmp_path / 'a.xz'}::xz",
        f"{tmp_path / 'a.zip'}::dir/inner.yaml",
    }


def test_sqlite_values_including_overflow_and_deleted_rows(tmp_path: Path) -> None:
    db = tmp_path / "prefect.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA page_size = 512")
    # Some builds default to secure_delete (zeroing freed pages); ours may not.
    con.execute("PRAGMA secure_delete = OFF")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data TEXT, blob BLOB)")
    # A value longer than a page is split over overflow pages; place the secret on the cut.
    for shift in range(0, 600, 7):
        con.execute("INSERT INTO t (data) VALUES (?)", ("z" * shift + TOKEN + "z" * 900,))
    con.execute("INSERT INTO t (blob) VALUES (?)", (b"\x00" + SECRET.encode("utf-16-le"),))
    con.execute("CREATE TABLE gone (v TEXT)")
    con.execute("INSERT INTO gone VALUES (?)", (SECRET + "-deleted",))
    con.commit()
    con.execute("DELETE FROM gone")  # secure_delete is off: the bytes stay in a free page
    con.commit()
    con.close()
    findings = scan([db], [TOKEN, SECRET])
    token_rows = {f.source for f in findings if f.secret == 0 and "::sqlite:t.data" in f.source}
    assert len(token_rows) == len(range(0, 600, 7))  # every row, cut or not
    assert any(f.secret == 1 and "::sqlite:t.blob" in f.source for f in findings)
    assert any(f.secret == 1 and f.source == str(db) and f.form == "plain" for f in findings)


def test_parquet_compressed_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "n": list(range(1000)),
            "s": [f"row{i}" if i != 777 else f"pre-{SECRET}" for i in range(1000)],
            "nested": [[{"k": "v"}] if i != 3 else [{"k": TOKEN}] for i in range(1000)],
        }
    )
    path = tmp_path / "t.parquet"
    # Without statistics the footer holds no min/max values: only the compressed pages do.
    pq.write_table(table, path, compression="zstd", row_group_size=300, write_statistics=False)
    assert SECRET.encode() not in path.read_bytes()
    findings = scan([path], [SECRET, TOKEN])
    assert Finding(f"{path}::parquet:s row 777", 4, 0, "plain") in findings
    assert any(f.secret == 1 and f.source == f"{path}::parquet:nested row 3" for f in findings)


def test_extra_texts_char_offsets() -> None:
    line = f"INFO connecting with token={TOKEN} to host"
    basic = "Authorization: Basic " + base64.b64encode(f"u:{SECRET}".encode()).decode()
    findings = scan([], [SECRET, TOKEN], [("log:1", line), ("log:2", basic), ("log:3", "ok")])
    assert Finding("log:1", line.index(TOKEN), 1, "plain") in findings
    assert {f.source for f in findings} == {"log:1", "log:2"}
    assert all(f.secret == 0 for f in findings if f.source == "log:2")


def test_finding_text_never_contains_the_secret(tmp_path: Path) -> None:
    (tmp_path / "f").write_text(SECRET)
    findings = scan([tmp_path], [SECRET])
    assert findings
    for finding in findings:
        assert SECRET not in str(finding) and SECRET not in repr(finding)


def test_symlinks_not_followed_and_missing_path_raises(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside / "secret.txt")
    (root / "dirlink").symlink_to(outside)
    assert scan([root], [SECRET]) == []
    with pytest.raises(ScanError, match="cannot scan"):
        scan([tmp_path / "missing"], [SECRET])


def test_corrupt_container_raises_without_quoting_content(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(SECRET.encode() * 50)[:40])  # truncated stream
    with pytest.raises(ScanError) as info:
        scan([bad], [SECRET])
    assert str(bad) in str(info.value)
    assert SECRET not in str(info.value)


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        encoded_forms("abc")


def test_forms_are_distinct_and_plain_first() -> None:
    forms = encoded_forms(SECRET)
    assert forms[0] == ("plain", SECRET.encode())
    values = [v for _, v in forms]
    assert len(values) == len(set(values))
    # An alphanumeric secret has no distinct url or json form.
    names = {n for n, _ in encoded_forms("abcdef123")}
    assert "url" not in names and "json" not in names and "plain" in names
