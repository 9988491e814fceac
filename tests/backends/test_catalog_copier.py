"""The embedded copier: kernel copy with read-back verification, and its user-space fallback."""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from drp_campaign.backends.interfaces import BLOCK_SIZE, DID, NewFile, RuleState
from drp_campaign.backends.local.catalog import EmbeddedCatalog

SRC, DST = "SRC_DISK", "DST_DISK"
_PATTERN = bytes(range(251))


def _transfer(tmp_path: Path, sizes: list[int]) -> tuple[EmbeddedCatalog, list[NewFile], str]:
    """Register files of the given sizes at SRC, rule them to DST and run the transfers."""
    cat = EmbeddedCatalog(tmp_path / "db", max_attempts=1)
    for rse in (SRC, DST):
        cat.add_rse(rse, tmp_path / rse)
    cat.add_scope("s")
    files = []
    for i, size in enumerate(sizes):
        # A period of 251 bytes never lines up with the copy block: a block copied twice or
        # out of order changes the checksum.
        data = (_PATTERN[i:] + _PATTERN[:i]) * (size // 251 + 1)
        data = data[:size]
        path = cat.rse_root(SRC) / "s" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(NewFile("s", f"f{i}", size, f"{zlib.adler32(data):08x}"))
    cat.register_replicas(SRC, files)
    ds = DID("s", "ds")
    cat.add_dataset(ds)
    cat.attach(ds, [f.did for f in files])
    rule = cat.add_rule(ds, DST)
    cat.process_transfers()
    return cat, files, rule


#: Empty, tiny, a page, just over one copy block, several blocks and a part.
SIZES = [0, 1, 4096, BLOCK_SIZE + 17, 9 * BLOCK_SIZE + BLOCK_SIZE // 3]


def _assert_copied(cat: EmbeddedCatalog, files: list[NewFile], rule: str) -> None:
    assert cat.get_rule(rule).state is RuleState.OK
    for f in files:
        src = (cat.rse_root(SRC) / "s" / f.name).read_bytes()
        assert (cat.rse_root(DST) / "s" / f.name).read_bytes() == src
    leftovers = [p.name for p in (cat.rse_root(DST) / "s").iterdir() if p.name.endswith(".part")]
    assert leftovers == []


def test_kernel_copy(tmp_path: Path) -> None:
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range on this platform")
    cat, files, rule = _transfer(tmp_path, SIZES)
    _assert_copied(cat, files, rule)


def _refusing(err: int) -> Callable[..., int]:
    def copy_file_range(*args: object, **kwargs: object) -> int:
        raise OSError(err, os.strerror(err))

    return copy_file_range


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EINVAL, errno.ENOSYS])
def test_user_space_copy_when_the_kernel_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    monkeypatch.setattr(os, "copy_file_range", _refusing(err), raising=False)
    cat, files, rule = _transfer(tmp_path, SIZES)
    _assert_copied(cat, files, rule)


def test_user_space_copy_without_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    cat, files, rule = _transfer(tmp_path, SIZES)
    _assert_copied(cat, files, rule)


def test_recopy_when_the_kernel_claims_end_of_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems answer 0 bytes (end of file) instead of an error.
    monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: 0, raising=False)
    cat, files, rule = _transfer(tmp_path, SIZES)
    _assert_copied(cat, files, rule)


def test_what_landed_is_verified_not_what_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy that corrupts the destination: the read-back checksum must catch it.
    def corrupting(src: int, dst: int, count: int, *args: object) -> int:
        data = os.read(src, count)
        if data:
            os.write(dst, bytes([data[0] ^ 0xFF]) + data[1:])
        return len(data)

    monkeypatch.setattr(os, "copy_file_range", corrupting, raising=False)
    cat, files, rule = _transfer(tmp_path, [5000])
    assert cat.get_rule(rule).state is RuleState.STUCK
    assert "checksum mismatch" in (cat.get_rule(rule).error or "")
    assert not (cat.rse_root(DST) / "s" / "f0").exists()
    assert list((cat.rse_root(DST) / "s").iterdir()) == []  # no temporary left behind
